"""Downstream runs: an MLP (or linear) head on an encoder, trained on a fraction of the labels.

``finetune`` trains encoder and head together (the encoder at ``encoder_lr_scale`` times the head's
lr) with light augmentation; ``frozen`` trains the head alone on features computed once per encoder
and cached. The supervised baseline is a fine-tune run from ``random`` (or ``imagenet``) weights.
Model selection uses the validation split only: the checkpoint of the best validation epoch is
kept and the test split is evaluated once, with those weights, after training.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from histossl import augment
from histossl.config import Config, DownstreamConfig
from histossl.metrics import best_threshold, classification_metrics, majority_accuracy
from histossl.models.backbones import build_encoder
from histossl.models.heads import classifier_head
from histossl.train.common import (
    ArrayBatches,
    EpochCSV,
    EpochShuffle,
    RngStateInCheckpoint,
    checkpoint_callbacks,
    last_checkpoint,
    loader,
    make_optimizer,
    make_trainer,
    scheduled,
)
from histossl.train.pretrain import prepare_encoder

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


@dataclass(frozen=True)
class RunSpec:
    """One downstream run; ``name`` is its folder under ``downstream/`` and its key in results.jsonl."""

    name: str
    encoder: str  # the study's name for the encoder (a column of the report)
    method: str
    pretrain_chain: str
    pretrain_dir: str | None  # pretrain/<stage> of the encoder, None for supervised baselines
    init: str  # weights file of the pretrained encoder, or random / imagenet for baselines
    mode: str  # finetune | frozen
    lr_schedule: str
    label_fraction: float
    seed: int
    pretrain_seed: int | None = None  # the seed the encoder was pretrained with; None for baselines


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

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.encoder is None:
            return self.head(x)
        if train:
            x = augment.random_view(x, self.cfg.downstream.views, self.cfg.image_size, normalized=True)
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


@torch.no_grad()
def encode(encoder: nn.Module, images: np.ndarray, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Features (len(rows), D) of un-augmented images, in eval mode, on the encoder's device."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[rows[start : start + batch_size]])).to(device)
        out.append(encoder(augment.normalize(augment.to_float(chunk))).float().cpu())
    return torch.cat(out).numpy()


def cached_features(cfg: Config, encoder_path: Path, data: TargetData, path: Path) -> np.ndarray:
    """Features of every target image for a frozen encoder, computed once and kept at ``path``."""
    if path.is_file():
        return np.load(path, mmap_mode="r")
    encoder = build_encoder(cfg.backbone, str(encoder_path))
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        encoder = encoder.cuda()
    rows = np.arange(len(data.labels))
    features = encode(encoder, data.images, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, features)
    tmp.replace(path)
    return features


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def run(cfg: Config, spec: RunSpec, data: TargetData, labeled: np.ndarray, run_dir: Path) -> dict:
    """Train one downstream run (resuming from its last checkpoint) and evaluate the test split once.

    Returns the results.jsonl record. Test labels are read only after training has finished.
    """
    d = cfg.downstream
    start = time.time()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    n_classes = len(data.classes)
    lr = run_lr(cfg, spec.lr_schedule)
    weights = class_weights(data.labels[labeled], n_classes) if d.class_weighted else None
    batch = min(d.batch_size, len(labeled))
    drop_last = len(labeled) % batch == 1  # a last batch of one breaks batch norm
    if spec.mode == "frozen":
        # One cache per encoder file: a pretraining stage (each pretraining seed its own), or the one encoder of ``evaluate``.
        feature_file = run_dir.parent.parent / "features" / f"{Path(spec.pretrain_dir or spec.encoder).name}.npy"
        features = np.asarray(cached_features(cfg, Path(spec.init), data, feature_file), dtype=np.float32)
        head = classifier_head(features.shape[1], n_classes, d.head, d.hidden_dim, d.dropout)
        module = DownstreamModule(None, head, cfg, lr, spec.lr_schedule, weights)
        train_set = TensorDataset(torch.from_numpy(features[labeled]), torch.from_numpy(data.labels[labeled]))
        val_set = TensorDataset(torch.from_numpy(features[data.val]), torch.from_numpy(data.labels[data.val]))
        train_loader = DataLoader(train_set, batch_size=batch, sampler=EpochShuffle(train_set, spec.seed), drop_last=drop_last)
        val_loader = DataLoader(val_set, batch_size=1024)
        epochs, val_every, batches = d.frozen_epochs, 1, None
    else:
        encoder = build_encoder(cfg.backbone, spec.init)
        head = classifier_head(encoder.num_features, n_classes, d.head, d.hidden_dim, d.dropout)
        prepare_encoder(encoder, cfg)
        module = DownstreamModule(encoder, head, cfg, lr, spec.lr_schedule, weights)
        train_set = ArrayBatches(data.images, labeled, data.labels)
        train_loader = loader(train_set, batch, shuffle=True, drop_last=drop_last, cfg=cfg.trainer, seed=spec.seed)
        val_loader = loader(ArrayBatches(data.images, data.val, data.labels), 256, False, False, cfg.trainer, spec.seed)
        epochs, val_every, batches = finetune_epochs(d, len(train_loader))
    ckpt_dir = run_dir / "checkpoints"
    select_mode = "min" if d.select_metric == "val_loss" else "max"
    *last, best_checkpoint = checkpoint_callbacks(ckpt_dir, d.select_metric, select_mode, resumable=spec.mode == "finetune", every=val_every)
    trainer = make_trainer(
        cfg.trainer if spec.mode == "finetune" else frozen_trainer(cfg),
        epochs,
        [EpochCSV(run_dir / "metrics.csv", METRIC_COLUMNS, verbose=spec.mode == "finetune"), *last, best_checkpoint],
        run_dir,
        validate=True,
        val_every=val_every,
        train_batches=batches,
    )
    resume = last_checkpoint(ckpt_dir)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    if not trainer.is_global_zero:  # another rank of a multi-process fit: rank 0 evaluates and records
        return {}
    best_path = Path(best_checkpoint.best_model_path) if best_checkpoint.best_model_path else ckpt_dir / "best.ckpt"
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    module.eval()

    @torch.no_grad()
    def logits_of(rows: np.ndarray) -> np.ndarray:
        if spec.mode == "frozen":
            return module.head(torch.from_numpy(features[rows])).numpy()
        return predict(module, data.images, rows)

    val_logits, val_labels = logits_of(data.val), data.labels[data.val]
    val = classification_metrics(val_logits, val_labels, n_classes)  # argmax decisions: what tuning compares
    threshold = None
    if d.threshold == "val" and n_classes == 2:  # chosen on validation, with the selected weights
        threshold = best_threshold(val_logits, val_labels)
    # The test split, once, with the weights and threshold chosen on validation (never in a tuning study).
    test_labels = data.labels[data.test]
    metrics = dict.fromkeys(("loss", "acc", "balanced_acc", "macro_f1", "auroc", "confusion_matrix"))
    if d.test:
        metrics = classification_metrics(logits_of(data.test), test_labels, n_classes, threshold)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {
        "method": spec.method,
        "pretrain_chain": spec.pretrain_chain,
        "mode": spec.mode,
        "label_fraction": spec.label_fraction,
        "n_labeled": int(len(labeled)),
        "lr": lr,
        "lr_schedule": spec.lr_schedule,
        "seed": spec.seed,
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "best_epoch": int(best["epoch"]),
        "threshold": threshold,
        "test_loss": metrics["loss"],
        "test_acc": metrics["acc"],
        "test_balanced_acc": metrics["balanced_acc"],
        "test_macro_f1": metrics["macro_f1"],
        "test_auroc": metrics["auroc"],
        "n_test": int(len(data.test)) if d.test else 0,
        "wall_s": round(time.time() - start, 2),
        "encoder": spec.encoder,
        "run": f"downstream/{spec.name}",
        "pretrain_dir": spec.pretrain_dir,
        "pretrain_seed": spec.pretrain_seed,
        "init": spec.init,
        "head": d.head,
        "backbone": cfg.backbone.name,
        "image_size": cfg.image_size,
        "select_metric": d.select_metric,
        "n_val": int(len(data.val)),
        "classes": list(data.classes),
        "confusion_matrix": metrics["confusion_matrix"],
        "test_majority_acc": majority_accuracy(test_labels) if d.test else None,
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "val_balanced_acc": val["balanced_acc"],
        "val_auroc": val["auroc"],
        "config": "config.yaml",
    }


def finetune_epochs(d: DownstreamConfig, batches_per_epoch: int) -> tuple[int, int, int | None]:
    """(epochs, validate every n epochs, batches per epoch or None for all) of a fine-tuning run.

    With ``steps`` every fraction gets about the same number of optimizer steps: small subsets get
    many epochs, a subset with more than ``steps`` batches one epoch of ``steps`` batches (a random
    part of it). With ``validations`` the validation split is evaluated about that many times, at
    epochs that end the run on a validated epoch.
    """
    if d.steps is not None and d.steps < batches_per_epoch:
        return 1, 1, d.steps
    epochs = d.epochs if d.steps is None else max(1, math.ceil(d.steps / max(1, batches_per_epoch)))
    every = 1 if d.validations == 0 else max(1, epochs // d.validations)
    return math.ceil(epochs / every) * every, every, None


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


