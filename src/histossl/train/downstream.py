"""Downstream runs: what every protocol shares, and the runner that turns one run into its record.

A run is an encoder, a protocol (``histossl.protocols``: finetune, frozen, linear, knn, ...), a label
budget (a fraction of the train split, or k images per class) and a seed. ``run`` seeds, lets the
protocol fit and choose on the validation split only, and evaluates the test split once.
The Lightning module and the fit-and-select loop here are shared by the protocols that train a
head (``finetune`` trains encoder and head; ``frozen`` a head on the feature store). The
supervised baseline is a finetune run from ``random`` (or ``imagenet``) weights.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping
import torch
from torch import nn
from torch.nn import functional as F

from histossl import augment
from histossl.config import Config, DownstreamConfig
from histossl import predictions
from histossl.data.splits import labels_per_class
from histossl.metrics import best_threshold, classification_metrics, decisions, majority_accuracy
from histossl.records import RunRecord
from histossl.train.common import (
    EpochCSV,
    RngStateInCheckpoint,
    checkpoint_callbacks,
    last_checkpoint,
    make_optimizer,
    make_trainer,
    scheduled,
)

log = logging.getLogger(__name__)
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_auroc", "lr"]


@dataclass(frozen=True)
class TargetData:
    """The labelled target data every downstream run shares (rows of the decoded cache)."""

    images: np.ndarray  # uint8 (N, S, S, 3), memory-mapped
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    train: np.ndarray  # row indices of the train split
    val: np.ndarray
    test: np.ndarray
    key: str = ""  # names the decoded images (data and image size): part of the feature store's key
    paths: list[str] | None = None  # per row, relative to the data set's root (for test_predictions.csv)
    groups: np.ndarray | None = None  # per row, the patient or slide


@dataclass(frozen=True)
class RunSpec:
    """One downstream run; ``name`` is its folder under ``downstream/`` and its key in results.jsonl."""

    name: str
    encoder: str  # the study's name for the encoder (a column of the report)
    method: str
    pretrain_chain: str
    pretrain_dir: str | None  # pretrain/<stage> of the encoder, None for supervised baselines
    init: str  # weights file of the pretrained encoder, or random / imagenet for baselines
    protocol: str  # a registered protocol: finetune, frozen, linear, knn, ...
    lr_schedule: str | None  # None for protocols without one
    label_fraction: float | None  # the budget: a fraction of the train split, or
    seed: int
    pretrain_seed: int | None = None  # the seed the encoder was pretrained with; None for baselines
    shots: int | None = None  # ... labelled train images per class (label_fraction None)

    @property
    def budget(self) -> float | tuple[str, int]:
        """The key of this run's labelled subset: the fraction, or ``("shots", k)``."""
        return self.label_fraction if self.shots is None else ("shots", self.shots)


def run_lr(cfg: Config, schedule: str) -> float:
    d = cfg.downstream
    return d.constant_lr if (schedule == "constant" and d.constant_lr is not None) else d.lr


class DownstreamModule(RngStateInCheckpoint, pl.LightningModule):
    """Head on an encoder (``finetune``) or on cached features (``encoder=None``, ``frozen``)."""

    def __init__(self, encoder: nn.Module | None, head: nn.Module, cfg: Config, lr: float, schedule: str, class_weights: torch.Tensor | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.cfg = cfg
        self.lr = lr
        self.schedule = schedule
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(head_out(head)), persistent=False)
        self.register_buffer("_sums", torch.zeros(3), persistent=False)
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self.val_metrics: dict = {}
        self._view_buffer = augment.ViewBuffer()  # CPU views' memory, reused across steps

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.encoder is None:
            return self.head(x)
        if train:
            x = augment.random_view(x, self.cfg.downstream.views, self.cfg.image_size, normalized=True, out=self._view_buffer)
        else:
            x = augment.normalize(augment.to_float(x))
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x, train=True)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        correct = (logits.detach().argmax(1) == y).float().sum()
        self._sums += torch.stack([loss.detach() * len(y), correct, torch.tensor(float(len(y)), device=self.device)])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val_logits.append(self(x).float())
        self._val_labels.append(y)

    def on_validation_epoch_end(self) -> None:
        logits = self._gather_in_order(torch.cat(self._val_logits))
        labels = self._gather_in_order(torch.cat(self._val_labels))
        self._val_logits.clear()
        self._val_labels.clear()
        m = classification_metrics(logits.cpu().numpy(), labels.cpu().numpy(), head_out(self.head))
        weighted = F.cross_entropy(logits, labels, weight=self.class_weights).item()
        self.val_metrics = {
            "val_loss": weighted,
            "val_acc": m["acc"],
            "val_balanced_acc": m["balanced_acc"],
            "val_auroc": m["auroc"] if not math.isnan(m["auroc"]) else 0.0,
        }
        for key, value in self.val_metrics.items():
            self.log(key, value, sync_dist=False)

    def _gather_in_order(self, local: torch.Tensor) -> torch.Tensor:
        """The validation outputs of every process, in data set order, without the sampler's padding.

        Under DDP, Lightning's DistributedSampler (no shuffling) gives process r the items r, r + W,
        r + 2W, ... and repeats the first items to make the shares equal; interleaving the gathered
        shares restores the order, and cutting at the data set's length drops the repeats.
        """
        if self.trainer.world_size == 1:
            return local
        shares = self.all_gather(local)  # (W, n_local, ...)
        ordered = shares.transpose(0, 1).reshape(-1, *local.shape[1:])
        return ordered[: len(self.trainer.val_dataloaders.dataset)]

    def summarize_epoch(self) -> dict:
        """Training loss/accuracy of the epoch (all processes) and the validation metrics."""
        sums = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        self._sums.zero_()
        count = max(float(sums[2]), 1.0)
        validated, self.val_metrics = self.val_metrics, {}  # an epoch without validation gets empty cells
        return {
            "epoch": self.current_epoch,
            "train_loss": float(sums[0]) / count,
            "train_acc": float(sums[1]) / count,
            "lr": self.optimizers().param_groups[-1]["lr"],
            **validated,
        }

    def configure_optimizers(self):
        d = self.cfg.downstream
        groups = [{"params": self.head.parameters(), "lr": self.lr}]
        if self.encoder is not None:
            groups.insert(0, {"params": self.encoder.parameters(), "lr": self.lr * d.encoder_lr_scale})
        optimizer = make_optimizer(d.optimizer, groups, self.lr, d.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        return scheduled(optimizer, total, 0, self.schedule)


def head_out(head: nn.Module) -> int:
    last = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass(frozen=True)
class Trained:
    """How a Lightning-trained run ended: steps and epochs taken, the epoch kept, and why it stopped.

    ``stopped`` is ``early`` (validation stopped improving for ``patience`` validations), ``max``
    (it reached its maximum of epochs while early stopping was on: maybe still improving, which the
    report flags when the kept epoch is among the last ones) or ``budget`` (a fixed budget by choice).
    """

    steps: int
    best_epoch: int
    epochs_run: int
    stopped: str

    def fields(self) -> dict:
        return {"steps": self.steps, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "stopped": self.stopped}


def fit_and_select(
    cfg: Config, module: DownstreamModule, train_loader, val_loader, run_dir: Path,
    plan: EpochPlan, early_stopping: bool = True,
) -> Trained | None:
    """Train ``module`` (resuming from its last checkpoint) and load the weights of the best validation epoch.

    Shared by the protocols that train a head with Lightning (``finetune``, ``frozen``). The selection
    metric is ``downstream.select_metric``; with ``early_stopping`` and ``downstream.patience`` set,
    Lightning's ``EarlyStopping`` ends the run when that metric has not improved for ``patience``
    validations (its state is in the resumable checkpoint). The checkpoints are removed afterwards.
    """
    d = cfg.downstream
    trains_encoder = module.encoder is not None
    ckpt_dir = run_dir / "checkpoints"
    select_mode = "min" if d.select_metric == "val_loss" else "max"
    *last, best_checkpoint = checkpoint_callbacks(ckpt_dir, d.select_metric, select_mode, resumable=trains_encoder, every=plan.val_every)
    stopper = None
    if early_stopping and d.patience is not None:
        stopper = EarlyStoppingAfter(plan.min_epochs, monitor=d.select_metric, mode=select_mode, patience=d.patience, check_finite=False)
    trainer = make_trainer(
        cfg.trainer if trains_encoder else frozen_trainer(cfg),
        plan.epochs,
        [EpochCSV(run_dir / "metrics.csv", METRIC_COLUMNS, verbose=trains_encoder), *last, best_checkpoint,
         *([stopper] if stopper else [])],
        run_dir,
        validate=True,
        val_every=plan.val_every,
        train_batches=plan.batches,
    )
    resume = last_checkpoint(ckpt_dir)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    if not trainer.is_global_zero:  # another rank of a multi-process fit: rank 0 evaluates and records
        return None
    best_path = Path(best_checkpoint.best_model_path) if best_checkpoint.best_model_path else ckpt_dir / "best.ckpt"
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    module.eval()
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    stopped = how_it_ended(stopper is not None, stopper is not None and stopper.stopped_epoch > 0, int(best["epoch"]),
                           int(trainer.current_epoch), d.patience, plan.val_every)
    return Trained(int(trainer.global_step), int(best["epoch"]), int(trainer.current_epoch), stopped)


def how_it_ended(watched: bool, fired: bool, best_epoch: int, epochs_run: int, patience: int | None, every: int) -> str:
    """``budget`` (no early stopping), ``early`` or ``max`` (the maximum came while validation was still improving).

    ``early`` also when the maximum came with no better validation in the last ``patience`` ones: with
    ``min_steps`` early stopping counts from the first validation after the minimum, so a run whose
    best epoch came before it can reach the maximum without early stopping firing, long after it
    stopped improving (0-based ``best_epoch``).
    """
    if not watched:
        return "budget"
    if fired or (patience is not None and epochs_run - (best_epoch + 1) >= patience * every):
        return "early"
    return "max"


def spec_fields(cfg: Config, spec: RunSpec) -> dict:
    """The fields of a run's record that its spec and the config fix before it runs."""
    return dict(
        method=spec.method, pretrain_chain=spec.pretrain_chain, protocol=spec.protocol, label_fraction=spec.label_fraction,
        shots=spec.shots, lr_schedule=spec.lr_schedule, seed=spec.seed, encoder=spec.encoder, run=f"downstream/{spec.name}",
        pretrain_dir=spec.pretrain_dir, pretrain_seed=spec.pretrain_seed, init=spec.init, backbone=cfg.backbone.name,
        image_size=cfg.image_size, config="config.yaml",
    )


def run(cfg: Config, spec: RunSpec, data: TargetData, labeled: np.ndarray, run_dir: Path, features: np.ndarray | None = None) -> RunRecord | None:
    """One downstream run under its protocol, then the test split once; returns its record.

    The protocol fits on the labelled subset and chooses what it chooses on the validation split
    only; the decision threshold (two classes, ``downstream.threshold: val``) is chosen on
    validation too. Test labels are read only after that, once.

    Args:
        features: ``(N, D)`` features of every target image from the feature store, for protocols
            with ``uses_features``; None otherwise.
    """
    from histossl.protocols import PROTOCOLS, Job  # the protocols import this module

    d = cfg.downstream
    start = time.time()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    protocol = PROTOCOLS.get(spec.protocol)()
    n_classes = len(data.classes)
    fitted = protocol.fit(Job(cfg, spec, data, labeled, run_dir, features))
    if fitted is None:  # a rank other than 0 of a multi-process fit: rank 0 evaluates and records
        return None
    val_logits, val_labels = fitted.logits(data.val), data.labels[data.val]
    val = classification_metrics(val_logits, val_labels, n_classes)  # argmax decisions: what tuning compares
    threshold = None
    if d.threshold == "val" and n_classes == 2:  # chosen on validation, with the selected weights
        threshold = best_threshold(val_logits, val_labels)
    # The test split, once, with the weights and threshold chosen on validation (never in a tuning study).
    test_labels = data.labels[data.test]
    metrics = dict.fromkeys(("loss", "acc", "balanced_acc", "macro_f1", "auroc", "confusion_matrix"))
    if d.test:
        test_logits = fitted.logits(data.test)
        metrics = classification_metrics(test_logits, test_labels, n_classes, threshold)
        save_test_predictions(run_dir / predictions.FILE, data, decisions(test_logits, threshold))
    return RunRecord(
        **spec_fields(cfg, spec),
        n_labeled=int(len(labeled)),
        lr=fitted.lr,
        epochs=fitted.epochs,
        steps=fitted.steps,
        best_epoch=fitted.best_epoch,
        epochs_run=fitted.epochs_run,
        stopped=fitted.stopped,
        threshold=threshold,
        test_loss=metrics["loss"] if protocol.has_loss else None,
        test_acc=metrics["acc"],
        test_balanced_acc=metrics["balanced_acc"],
        test_macro_f1=metrics["macro_f1"],
        test_auroc=metrics["auroc"],
        n_test=int(len(data.test)) if d.test else 0,
        wall_s=round(time.time() - start, 2),
        head=d.head if fitted.epochs is not None else None,
        select_metric=d.select_metric,
        n_val=int(len(data.val)),
        classes=list(data.classes),
        confusion_matrix=metrics["confusion_matrix"],
        test_majority_acc=majority_accuracy(test_labels) if d.test else None,
        val_loss=val["loss"] if protocol.has_loss else None,
        val_acc=val["acc"],
        val_balanced_acc=val["balanced_acc"],
        val_auroc=val["auroc"],
        labels_per_class=labels_per_class(data.labels, labeled, n_classes),
        chosen=fitted.chosen,
    )


def save_test_predictions(path: Path, data: TargetData, preds: np.ndarray) -> None:
    """Per test image: path, group, true and predicted class, for bootstrap intervals over test groups."""
    rows = data.test
    paths = [data.paths[i] for i in rows] if data.paths is not None else [str(i) for i in rows]
    groups = [str(g) for g in data.groups[rows]] if data.groups is not None else paths
    names = np.asarray(data.classes, dtype=object)
    predictions.write(path, paths, groups, list(names[data.labels[rows]]), list(names[preds]))


class EpochPlan(NamedTuple):
    """How long a Lightning-trained run may train and how often it is validated."""

    epochs: int  # the most epochs
    val_every: int  # validate every n epochs
    batches: int | None  # batches per epoch (None: all)
    min_epochs: int = 0  # early stopping starts counting after these


# Validations within ``downstream.min_steps``: enough to keep the best epoch, few enough to stay cheap.
MIN_STEPS_VALIDATIONS = 10


def finetune_epochs(d: DownstreamConfig, batches_per_epoch: int) -> EpochPlan:
    """The epoch plan of a fine-tuning run.

    With ``steps`` every fraction gets about the same number of optimizer steps: small subsets get
    many epochs, a subset with more than ``steps`` batches one epoch of ``steps`` batches (a random
    part of it). With ``validations`` the validation split is evaluated about that many times, at
    epochs that end the run on a validated epoch. Otherwise ``epochs`` is the maximum, with
    ``min_steps`` applied (``with_min_steps``).
    """
    if d.steps is not None and d.steps < batches_per_epoch:
        return EpochPlan(1, 1, d.steps)
    epochs = d.epochs if d.steps is None else max(1, math.ceil(d.steps / max(1, batches_per_epoch)))
    every = 1 if d.validations == 0 else max(1, epochs // d.validations)
    if d.steps is None:
        return with_min_steps(d, epochs, every, batches_per_epoch)
    return EpochPlan(math.ceil(epochs / every) * every, every, None)


def with_min_steps(d: DownstreamConfig, epochs: int, every: int, batches_per_epoch: int) -> EpochPlan:
    """``epochs`` (the maximum) and validation every ``every`` epochs, after ``downstream.min_steps``.

    A run then trains at least ``min_steps`` optimizer steps (``min_epochs``) before early stopping
    starts counting, is validated about ``MIN_STEPS_VALIDATIONS`` times within them (every epoch for a
    large subset, every few epochs for a small one), and may take ``patience`` more validations after
    them whatever ``epochs`` says.
    """
    if not d.min_steps:
        return EpochPlan(math.ceil(epochs / every) * every, every, None)
    min_epochs = math.ceil(d.min_steps / max(1, batches_per_epoch))
    every = max(every, min_epochs // MIN_STEPS_VALIDATIONS)
    epochs = max(epochs, min_epochs + (d.patience or 0) * every)
    return EpochPlan(math.ceil(epochs / every) * every, every, None, min_epochs)


class EarlyStoppingAfter(EarlyStopping):
    """Lightning's ``EarlyStopping`` that starts watching only once ``start_epochs`` epochs are done.

    (Lightning's own ``min_epochs`` lets the patience run out before the minimum and then stops at it,
    even when the metric has started to improve: a small subset that leaves chance late is cut.)
    """

    def __init__(self, start_epochs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.start_epochs = start_epochs

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.current_epoch + 1 >= self.start_epochs:
            super()._run_early_stopping_check(trainer)


def frozen_trainer(cfg: Config):
    """A head on cached features is tiny: one CPU process, no progress bar per run."""
    return replace(cfg.trainer, accelerator="cpu", devices="1", strategy="auto", num_nodes=1, precision="32-true", progress=False)


@torch.no_grad()
def predict(module: DownstreamModule, images: np.ndarray, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    module.eval()
    device = next(module.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[rows[start : start + batch_size]])).to(device)
        out.append(module(chunk).float().cpu())
    return torch.cat(out).numpy()


