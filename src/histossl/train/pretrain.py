"""Pretext pretraining: chained stages, each a Lightning fit that resumes from its last checkpoint.

An encoder entry of the config (method, init, chain of data sets) becomes a list of stages. Stage k
starts from stage k-1's ``encoder.safetensors``; the first starts from ``init``. A stage folder is
named by its method, its path and a hash of everything that shaped it, so two entries that share a
prefix (imagenet>other and imagenet>other>target) pretrain it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from histossl import ranks
from histossl.config import Config, EncoderConfig, OptimConfig, encoder_chain, stage_epochs, to_dict, value_before
from histossl.errors import ConfigError, HistosslError
from histossl.io import atomic_write_json
from histossl.methods import METHODS, Method, method_settings, settings_key
from histossl.models.backbones import Encoder, build_encoder, save_encoder
from histossl.train.common import (
    ArrayBatches,
    EpochCSV,
    RngStateInCheckpoint,
    checkpoint_callbacks,
    last_checkpoint,
    loader,
    make_optimizer,
    make_trainer,
    parameter_groups,
    read_csv,
    scheduled,
)

log = logging.getLogger(__name__)
# Bumped when a pretraining checkpoint's content changes so that an older one cannot be resumed.
CHECKPOINT_FORMAT = 2  # 2: the method owns the encoder; optimizer groups without decay on biases and norms


def metric_columns(method: Method) -> list[str]:
    """metrics.csv columns of a stage: pretext accuracy, or the collapse signal for methods without one."""
    return ["epoch", "pretext_loss", *method.metric_names, "lr"]


def hashed(config) -> object:
    """``to_dict`` for a stage key, leaving out ``added_later`` fields that hold their earlier value.

    A field added to a config that a stage key holds (data set, split, views, optimizer, backbone)
    must carry ``metadata=config.added_later()``, or every existing stage folder gets a new name
    (``tests/test_stage_names.py`` fails).
    """
    if dataclasses.is_dataclass(config):
        return {
            f.name: hashed(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if not (f.metadata.get("added_later") and getattr(config, f.name) == value_before(f))
        }
    return to_dict(config)


@dataclass(frozen=True)
class Stage:
    """One pretraining stage: ``method`` on data set ``dataset``, starting from ``init``."""

    folder: str  # pretrain/<folder>
    method: str
    dataset: str
    epochs: int
    init: str  # random | imagenet | a weights file | "stage:<folder>" (the previous stage's encoder)
    chain: str  # e.g. imagenet>other>target, the path up to and including this stage
    key: dict  # everything that shaped this stage (hashed into the folder name)
    seed: int = 0  # the pretraining seed
    settings: Any = None  # the method's resolved settings dataclass (histossl.methods.method_settings)


def init_label(init: str) -> str:
    if init in ("random", "imagenet"):
        return init
    return Path(init).stem


def chain_name(init: str, datasets: list[str]) -> str:
    """``imagenet>oral>idc``; a random start is left out (``oral>idc``)."""
    start = [] if init == "random" else [init_label(init)]
    return ">".join(start + list(datasets))


def plan_stages(cfg: Config, entry: EncoderConfig, seed: int | None = None) -> list[Stage]:
    """The stages that make the encoder of ``entry`` with pretraining ``seed`` (the study seed), in order.

    A seed other than the study seed is hashed into the key and shown in the folder name (``_seed1``).
    """
    seed = cfg.seed if seed is None else seed
    METHODS.get(entry.method)  # unknown names fail here, listing the registered ones
    p = cfg.pretrain
    # Shared settings and the chosen method's settings only (pretrain.methods of other methods, and
    # view fields added later at their default, stay out: committed stage folders keep their names).
    shared = {"epochs": None, "batch_size": p.batch_size, "optim": hashed(p.optim), "views": hashed(p.views)}
    pretrain_key = shared | {"method": settings_key(cfg, entry)}
    settings = method_settings(cfg, entry)
    stages: list[Stage] = []
    previous: dict = {"init": entry.init}
    init = entry.init
    chain = encoder_chain(cfg, entry)
    for i, (dataset, epochs) in enumerate(zip(chain, stage_epochs(cfg, entry))):
        ds = cfg.datasets[dataset]
        key = {
            "previous": previous,
            "method": entry.method,
            "dataset": dataset,
            "data": hashed(ds) | ({"synth": hashed(cfg.synth)} if ds.synthetic else {}),
            "split": hashed(cfg.split) if dataset == cfg.target else None,
            "epochs": epochs,
            "pretrain": pretrain_key,
            "backbone": hashed(cfg.backbone),
            "image_size": cfg.image_size,
            "seed": seed,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        path = chain_name(entry.init, chain[: i + 1])
        folder = f"{entry.method}_{path.replace('>', '-')}_{digest}" + ("" if seed == cfg.seed else f"_seed{seed}")
        stages.append(Stage(folder, entry.method, dataset, key["epochs"], init, path, key, seed, settings))
        previous, init = {"stage": folder}, f"stage:{folder}"
    return stages


class PretrainModule(RngStateInCheckpoint, pl.LightningModule):
    """Wires a pretext method (which owns the encoder) for Lightning; logs the epoch's mean metrics."""

    def __init__(self, method: Method, optim: OptimConfig) -> None:
        super().__init__()
        self.method = method
        self.optim = optim
        self.metric_names = ["pretext_loss", *method.metric_names]
        # Sums of the loss and each metric over the epoch's steps, then the step count.
        self.register_buffer("_sums", torch.zeros(len(self.metric_names) + 1), persistent=False)

    @property
    def encoder(self) -> torch.nn.Module:
        return self.method.encoder

    def training_step(self, batch, batch_idx):
        images, _ = batch
        out = self.method.step(images)
        values = [out.loss.detach().float(), *(out.metrics[name].float() for name in self.metric_names[1:])]
        self._sums += torch.stack([*values, torch.ones((), device=self.device)])
        for name, value in zip(self.metric_names, values):
            self.log(name, value, prog_bar=name in ("pretext_loss", "pretext_acc"), on_step=True, on_epoch=False)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After the optimizer step: teachers (EMA), temperatures and other schedules of the step count.
        self.method.after_optimizer_step(self.trainer.global_step, int(self.trainer.estimated_stepping_batches))

    def summarize_epoch(self) -> dict:
        """The epoch's mean loss and metrics over every step of every process."""
        sums = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        self._sums.zero_()
        count = max(float(sums[-1]), 1.0)
        means = {name: float(sums[i]) / count for i, name in enumerate(self.metric_names)}
        if not math.isfinite(means["pretext_loss"]):  # checked here, where the sums are read anyway (no extra sync)
            raise HistosslError(
                f"pretraining diverged: the pretext loss became {means['pretext_loss']} in epoch {self.current_epoch + 1}; "
                "lower pretrain.optim.lr, or set pretrain.optim.optimizer=adamw with pretrain.optim.lr=1e-3 (what trained every "
                "method in docs/benchmarks/methods-ebhi); the last good epoch's checkpoint is kept"
            )
        return {"epoch": self.current_epoch, **means, "lr": self.optimizers().param_groups[0]["lr"]}

    def configure_optimizers(self):
        o = self.optim
        groups = parameter_groups(self.method.trained_parameters(), o.weight_decay)
        optimizer = make_optimizer(o.optimizer, groups, o.lr, o.weight_decay, o.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        return scheduled(optimizer, total, o.warmup_epochs * steps_per_epoch, o.lr_schedule)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["pretrain_format"] = CHECKPOINT_FORMAT

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("pretrain_format") != CHECKPOINT_FORMAT:
            raise HistosslError(
                "the pretraining checkpoint was written by an older histossl (before the method interface); "
                "delete its checkpoints/ folder to restart the stage"
            )
        super().on_load_checkpoint(checkpoint)


def stage_done(folder: Path) -> bool:
    """A stage folder holds its encoder and its ``stage.json`` (written last)."""
    return (folder / "stage.json").is_file() and (folder / "encoder.safetensors").is_file()


def resolve_init(init: str, pretrain_root: Path) -> str:
    if init.startswith("stage:"):
        return str(pretrain_root / init.removeprefix("stage:") / "encoder.safetensors")
    return init


def run_stage(
    cfg: Config, stage: Stage, images: np.ndarray, rows: np.ndarray, pretrain_root: Path, encoder_name: str, data_print: dict | None = None
) -> Path:
    """Train one stage (or resume it, or skip it when its encoder exists). Returns the encoder path.

    ``data_print``: the fingerprint of the stage's data set, kept in ``stage.json`` (see ``histossl.stale``).
    """
    folder = pretrain_root / stage.folder
    encoder_path = folder / "encoder.safetensors"
    if stage_done(folder):
        log.info("pretrain %s: done, reusing %s", stage.folder, encoder_path)
        return encoder_path
    batch = cfg.pretrain.batch_size
    settings = stage.settings
    needed, setting = METHODS.get(stage.method).min_images(settings, cfg.pretrain)
    if len(rows) < needed:
        raise ConfigError(f"{setting}={needed} is larger than the {len(rows)} images of data set {stage.dataset!r}")
    folder.mkdir(parents=True, exist_ok=True)
    if ranks.is_owner():
        atomic_write_json(folder / "stage_key.json", stage.key)
        keep_first_training(folder)
    pl.seed_everything(stage.seed, workers=True, verbose=False)
    encoder = build_encoder(cfg.backbone, resolve_init(stage.init, pretrain_root))
    prepare_encoder(encoder, cfg)
    method = METHODS.get(stage.method)(encoder, settings, cfg.pretrain, cfg.image_size)
    module = PretrainModule(method, cfg.pretrain.optim)
    ckpt_dir = folder / "checkpoints"
    trainer = make_trainer(
        cfg.trainer,
        stage.epochs,
        [EpochCSV(folder / "metrics.csv", metric_columns(method)), *checkpoint_callbacks(ckpt_dir)],
        folder,
        validate=False,
    )
    data = loader(ArrayBatches(images, rows), batch, shuffle=True, drop_last=True, cfg=cfg.trainer, seed=stage.seed)
    resume = last_checkpoint(ckpt_dir)
    if resume:
        log.info("pretrain %s: resuming from %s", stage.folder, resume)
    start = time.time()
    trainer.fit(module, data, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.is_global_zero:
        save_encoder(method.exported_encoder(), encoder_path)
        atomic_write_json(
            folder / "stage.json",
            {
                "stage": stage.folder,
                "encoder": encoder_name,
                "method": stage.method,
                "dataset": stage.dataset,
                "chain": stage.chain,
                "init": stage.init,
                "epochs": stage.epochs,
                "seed": stage.seed,
                "n_images": int(len(rows)),
                "pretext_chance": method.chance,  # null: no pretext accuracy (collapse is measured instead)
                "backbone": cfg.backbone.name,
                "stem": cfg.backbone.stem,
                "image_size": cfg.image_size,
                "wall_s": round(time.time() - start, 1),
                "data": data_print,
                **remade(folder),
            },
        )
    # The other ranks of a multi-process fit wait until rank 0 has written the encoder: the next stage
    # of a chain, or the first fine-tuning run, loads it at once (without this, rank 1 of a torchrun
    # study could read it before it existed and exit while rank 0 waited for it in the next fit).
    trainer.strategy.barrier("pretraining stage written")
    return encoder_path


# Kept as stage.first.json, metrics.first.csv (report.records.FIRST_TRAINING, read by its described_by).
FIRST_TRAINING = ("stage.json", "metrics.csv")


def keep_first_training(folder: Path) -> None:
    """A stage described but without weights or a checkpoint (a study restored from its published copy):
    keep the first training's description and curve aside before training it again."""
    if (folder / "stage.json").is_file() and not (folder / "checkpoints" / "last.ckpt").is_file():
        for name in FIRST_TRAINING:
            if (folder / name).is_file():
                (folder / name).replace(folder / name.replace(".", ".first.", 1))


def remade(folder: Path) -> dict:
    """For a stage trained again after a restore, ``{"remade": {...}}``: whether its curve is the first
    training's (same seed and recipe; bit for bit only with the same code on the same kind of CPU)."""
    if not (folder / "stage.first.json").is_file():
        return {}
    first, now = read_csv(folder / "metrics.first.csv"), read_csv(folder / "metrics.csv")
    return {"remade": {"same_curve": first == now, "first_last_epoch": first[-1] if first else None}}


def prepare_encoder(encoder: Encoder, cfg: Config) -> None:
    """GPU options: channels_last memory format and torch.compile, both off by default."""
    if cfg.trainer.channels_last:
        encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    if cfg.trainer.compile:
        encoder.net = torch.compile(encoder.net)
