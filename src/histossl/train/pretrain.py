"""Pretext pretraining: chained stages, each a Lightning fit that resumes from its last checkpoint.

An encoder entry of the config (method, init, chain of data sets) becomes a list of stages. Stage k
starts from stage k-1's ``encoder.safetensors``; the first starts from ``init``. A stage folder is
named by its method, its path and a hash of everything that shaped it, so two entries that share a
prefix (imagenet>other and imagenet>other>target) pretrain it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from histossl import ranks
from histossl.config import Config, EncoderConfig, OptimConfig, encoder_chain, to_dict
from histossl.errors import ConfigError
from histossl.io import atomic_write_json
from histossl.methods import METHODS
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
    scheduled,
)

log = logging.getLogger(__name__)
METRIC_COLUMNS = ["epoch", "pretext_loss", "pretext_acc", "lr"]


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
    stages: list[Stage] = []
    previous: dict = {"init": entry.init}
    init = entry.init
    chain = encoder_chain(cfg, entry)
    for i, dataset in enumerate(chain):
        ds = cfg.datasets[dataset]
        key = {
            "previous": previous,
            "method": entry.method,
            "dataset": dataset,
            "data": to_dict(ds) | ({"synth": to_dict(cfg.synth)} if ds.synthetic else {}),
            "split": to_dict(cfg.split) if dataset == cfg.target else None,
            "epochs": entry.epochs or cfg.pretrain.epochs,
            "pretrain": {k: v for k, v in to_dict(cfg.pretrain).items() if k != "seeds"} | {"epochs": None},
            "backbone": to_dict(cfg.backbone),
            "image_size": cfg.image_size,
            "seed": seed,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        path = chain_name(entry.init, chain[: i + 1])
        folder = f"{entry.method}_{path.replace('>', '-')}_{digest}" + ("" if seed == cfg.seed else f"_seed{seed}")
        stages.append(Stage(folder, entry.method, dataset, key["epochs"], init, path, key, seed))
        previous, init = {"stage": folder}, f"stage:{folder}"
    return stages


class PretrainModule(RngStateInCheckpoint, pl.LightningModule):
    """Wires an encoder and a pretext method for Lightning; logs the epoch's mean loss and accuracy."""

    def __init__(self, encoder: Encoder, method: torch.nn.Module, optim: OptimConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.method = method
        self.optim = optim
        self.register_buffer("_sums", torch.zeros(3), persistent=False)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        out = self.method.step(self.encoder, images)
        self._sums += torch.stack([out.loss.detach().float(), out.accuracy.float(), torch.ones((), device=self.device)])
        self.log("pretext_loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("pretext_acc", out.accuracy, prog_bar=True, on_step=True, on_epoch=False)
        return out.loss

    def summarize_epoch(self) -> dict:
        """The epoch's mean pretext loss and accuracy over every step of every process."""
        sums = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        self._sums.zero_()
        count = max(float(sums[2]), 1.0)
        return {
            "epoch": self.current_epoch,
            "pretext_loss": float(sums[0]) / count,
            "pretext_acc": float(sums[1]) / count,
            "lr": self.optimizers().param_groups[0]["lr"],
        }

    def configure_optimizers(self):
        o = self.optim
        optimizer = make_optimizer(o.optimizer, self.parameters(), o.lr, o.weight_decay, o.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        return scheduled(optimizer, total, o.warmup_epochs * steps_per_epoch, o.lr_schedule)


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
    if encoder_path.is_file() and (folder / "stage.json").is_file():
        log.info("pretrain %s: done, reusing %s", stage.folder, encoder_path)
        return encoder_path
    batch = cfg.pretrain.batch_size
    if len(rows) < batch:
        raise ConfigError(
            f"pretrain.batch_size={batch} is larger than the {len(rows)} images of data set {stage.dataset!r}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if ranks.is_owner():
        atomic_write_json(folder / "stage_key.json", stage.key)
    pl.seed_everything(stage.seed, workers=True, verbose=False)
    encoder = build_encoder(cfg.backbone, resolve_init(stage.init, pretrain_root))
    prepare_encoder(encoder, cfg)
    method = METHODS.get(stage.method)(encoder.num_features, cfg.pretrain, cfg.image_size)
    module = PretrainModule(encoder, method, cfg.pretrain.optim)
    ckpt_dir = folder / "checkpoints"
    trainer = make_trainer(
        cfg.trainer,
        stage.epochs,
        [EpochCSV(folder / "metrics.csv", METRIC_COLUMNS), *checkpoint_callbacks(ckpt_dir)],
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
        save_encoder(encoder, encoder_path)
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
                "pretext_chance": float(getattr(method, "chance", 0.0)),
                "backbone": cfg.backbone.name,
                "stem": cfg.backbone.stem,
                "image_size": cfg.image_size,
                "wall_s": round(time.time() - start, 1),
                "data": data_print,
            },
        )
    return encoder_path


def prepare_encoder(encoder: Encoder, cfg: Config) -> None:
    """GPU options: channels_last memory format and torch.compile, both off by default."""
    if cfg.trainer.channels_last:
        encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    if cfg.trainer.compile:
        encoder.net = torch.compile(encoder.net)
