"""Checks that run before a study writes anything into its output folder.

A check that fails after ``config.yaml`` is written leaves a folder locked to a config that never
ran, and the corrected command is then refused as "another config". So everything that can be
known before the first epoch is checked first: the Lightning settings (by building the trainer
Lightning would build), every registered name (methods, backbone), the weights files the config
names, the data sets (indexed and decoded) and the batch sizes against the images each stage has.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from histossl import config as config_mod
from histossl.config import Config
from histossl.errors import ConfigError

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")

log = logging.getLogger(__name__)


def check_trainer(cfg: Config, out: Path) -> None:
    """Build the Lightning trainer once: an accelerator that is not there (``tpu``), a precision or a
    strategy Lightning does not know (``banana``) fail here, naming the ``trainer`` key."""
    from histossl.train.common import make_trainer

    trainer = make_trainer(cfg.trainer, 1, [], out, validate=False)
    if cfg.trainer.precision.startswith("bf16") and trainer.strategy.root_device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without native bfloat16 instructions (AVX512-BF16 or AMX): emulated, "
            "usually slower than 32-true; set trainer.precision=32-true", cfg.trainer.precision,
        )


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (on such CPUs bf16-mixed trains about 1.3-1.6x faster
    than fp32: docs/benchmarks/throughput.md); True when torch cannot tell."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def check_names(cfg: Config) -> None:
    """Registered names (backbone, each encoder's method) and the weights files the config names."""
    from histossl.methods import METHODS
    from histossl.models.backbones import BACKBONES

    try:
        BACKBONES.get(cfg.backbone.name)
    except ConfigError as err:
        raise ConfigError(f"backbone.name: {err}") from None
    for name, entry in cfg.encoders.items():
        try:
            METHODS.get(entry.method)
        except ConfigError as err:
            raise ConfigError(f"encoders.{name}.method: {err}") from None
        if Path(entry.init).suffix in WEIGHT_SUFFIXES and not Path(entry.init).expanduser().is_file():
            raise ConfigError(f"encoders.{name}.init: weights file not found: {entry.init}")
    for init in cfg.downstream.baselines:
        if Path(init).suffix in WEIGHT_SUFFIXES and not Path(init).expanduser().is_file():
            raise ConfigError(f"downstream.baselines: weights file not found: {init}")


def check_data(cfg: Config, out: Path, encoders: list[str] | None = None, downstream: bool = True) -> None:
    """Index and decode the data sets the study will use (a bad one fails now), and check that each
    pretraining stage still to run has at least ``pretrain.batch_size`` images.

    The target's pretraining images are its train split: the saved ``split.csv`` when there is one,
    else the split that would be made (computed here, not written).
    """
    from histossl.data.splits import load_or_make_split, make_split
    from histossl.study import load_dataset
    from histossl.train.pretrain import plan_stages

    entries = {n: e for n, e in cfg.encoders.items() if encoders is None or n in encoders}
    todo = [
        stage
        for entry in entries.values()
        for seed in config_mod.pretrain_seeds(cfg)
        for stage in plan_stages(cfg, entry, seed)
        if not (out / "pretrain" / stage.folder / "stage.json").is_file()
    ]
    names = list(dict.fromkeys(([cfg.target] if downstream else []) + [s.dataset for s in todo]))
    for name in names:
        ds = load_dataset(cfg, name, out, write=False)
        n = len(ds.decoded.keep)
        if name == cfg.target:
            split_file = out / "split.csv"
            if split_file.is_file():
                split = load_or_make_split(split_file, ds.index, cfg.split)
            else:
                split = make_split(ds.index, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
            n = int(np.sum(split[ds.decoded.keep] == "train"))
        if any(s.dataset == name for s in todo) and n < cfg.pretrain.batch_size:
            where = " (its train split: pretraining never sees the val or test images)" if name == cfg.target else ""
            raise ConfigError(
                f"pretrain.batch_size={cfg.pretrain.batch_size} is larger than the {n} images of data set {name!r}{where}; "
                f"set pretrain.batch_size to at most {n}"
            )


def check_out_outside_data(cfg: Config, out: Path) -> None:
    """``--out`` inside a data folder would be indexed as part of the data (its images as a class)."""
    where = Path(out).expanduser().resolve()
    for name, ds in cfg.datasets.items():
        if ds.synthetic:
            continue
        root = Path(ds.path).expanduser().resolve()
        root = root.parent if root.suffix.lower() == ".csv" else root
        if where == root or where.is_relative_to(root):
            raise ConfigError(
                f"--out {where} is inside the folder of data set {name!r} ({root}); the study's files would be read as "
                "data: choose an output folder outside it"
            )


def check_before_work(cfg: Config, out: Path, encoders: list[str] | None = None, downstream: bool = True) -> None:
    """Every check above but ``check_out_outside_data`` (run before the folder is locked), cheapest first."""
    check_names(cfg)
    check_trainer(cfg, out)
    check_data(cfg, out, encoders, downstream)
