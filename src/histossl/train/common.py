"""What pretraining and downstream training share: the batch loader, the lr schedule, the optimizer,
the per-epoch CSV, the Lightning trainer and resumable checkpoints.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, RandomSampler

from histossl.config import TrainerConfig
from histossl.errors import ConfigError, Diverged, HistosslError
from histossl.io import atomic_write_text

log = logging.getLogger(__name__)


class ArrayBatches(Dataset):
    """Rows of a uint8 image array (usually the memory-mapped decoded cache) with their labels.

    A whole batch is read with one fancy-indexing slice (``__getitems__``), so a loader worker does
    no decoding and no per-image Python work; augmentation happens later, batched, on the device.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.zeros(len(images), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.sort(self.rows[np.asarray(indices, dtype=np.int64)])  # sorted reads are sequential on disk
        return torch.from_numpy(np.ascontiguousarray(self.images[rows])), torch.from_numpy(self.labels[rows])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def keep_batch(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class EpochShuffle(RandomSampler):
    """A fresh permutation every epoch, drawn from ``seed + epoch``: a run resumed at epoch k sees
    the order an uninterrupted run would have seen (Lightning calls ``set_epoch``, as it does for
    the DistributedSampler that replaces this one under DDP)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__(dataset, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, cfg: TrainerConfig, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(dataset, seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        collate_fn=keep_batch,
        pin_memory=torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"),
        persistent_workers=cfg.num_workers > 0,
        generator=generator,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warmup, then cosine to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        from lightly.utils.lars import LARS  # LARS (You et al. 2017, arXiv 1708.03888), used by SimCLR at large batch

        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"optimizer {name!r}: expected sgd, adamw or lars")


def scheduled(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str) -> dict:
    """Lightning's ``configure_optimizers`` answer with a per-step LambdaLR."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RngStateInCheckpoint:
    """Mixin for LightningModules: the torch RNG state travels in the checkpoint, so a resumed run
    draws the same augmentations it would have drawn without the interruption."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state")
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])


class EpochCSV(Callback):
    """Writes one CSV row per epoch from ``pl_module.summarize_epoch()`` (a dict of plain numbers).

    Lightning calls callbacks before the module's own hook and moves checkpoint callbacks last, so
    the row is on disk before the epoch's checkpoint. Rows of epochs at or after the current one are
    dropped first: a resumed run rewrites the epochs it redoes instead of duplicating them.
    """

    def __init__(self, path: Path, columns: list[str], verbose: bool = True) -> None:
        self.path = Path(path)
        self.columns = columns
        self.verbose = verbose

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = pl_module.summarize_epoch()  # every rank: the summary may all-reduce
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        rows = [r for r in read_csv(self.path) if int(r["epoch"]) < metrics["epoch"]]
        rows.append({k: metrics.get(k, "") for k in self.columns})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        atomic_write_text(self.path, buffer.getvalue(), durable=False)
        if self.verbose and not trainer.progress_bar_callback:  # without a bar, one line per epoch shows progress
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("epoch", "lr") and v != "")
            log.info("%s epoch %d/%d: %s", self.path.parent.name, metrics["epoch"] + 1, trainer.max_epochs, shown)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _devices(text: str):
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


class StopIfDiverged(Callback):
    """Stops a fit at the first non-finite training loss (on any process) by raising ``Diverged``.

    Training on after a NaN only produces NaN weights, and scikit-learn would later refuse their
    outputs ("Input contains NaN"). Under DDP the decision is all-reduced so every process stops at
    the same step instead of one waiting forever on the others' gradients.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise Diverged(f"non-finite training loss at epoch {trainer.current_epoch + 1}, step {trainer.global_step}")


_interrupt_requested = False


def _on_sigint(signum, frame) -> None:
    global _interrupt_requested
    _interrupt_requested = True
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: an interrupt that lands in a
    finalizer or a callback that swallows it still stops the fit at the next batch (``StopOnInterrupt``)."""
    import signal

    signal.signal(signal.SIGINT, _on_sigint)


class StopOnInterrupt(Callback):
    """Raises the KeyboardInterrupt again at the end of a batch if Ctrl-C was pressed and swallowed."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if _interrupt_requested:
            raise KeyboardInterrupt


class _Trainer(pl.Trainer):
    """``pl.Trainer`` whose ``fit`` lets Ctrl-C through as ``KeyboardInterrupt``.

    Lightning catches KeyboardInterrupt, shuts down gracefully and then calls ``sys.exit(1)``
    (pytorch_lightning/trainer/call.py); the CLI turns the re-raised interrupt into its
    ``interrupted; rerun the same command to resume`` line and exit code 130.
    """

    def fit(self, *args, **kwargs) -> None:
        try:
            super().fit(*args, **kwargs)
        except SystemExit:
            if self.interrupted:
                raise KeyboardInterrupt from None
            raise
        if self.interrupted:  # versions that return instead of exiting
            raise KeyboardInterrupt


def make_trainer(
    cfg: TrainerConfig, epochs: int, callbacks: list[Callback], root: Path, validate: bool, val_every: int = 1, train_batches: int | None = None
) -> pl.Trainer:
    """A Lightning trainer with the user's accelerator, devices, precision, strategy and nodes.

    It validates every ``val_every`` epochs; ``train_batches`` caps the batches of an epoch (None: all).
    """
    try:
        return _Trainer(
            accelerator=cfg.accelerator,
            devices=_devices(cfg.devices),
            precision=cfg.precision,
            strategy=cfg.strategy,
            num_nodes=cfg.num_nodes,
            max_epochs=epochs,
            callbacks=[*callbacks, StopIfDiverged(), StopOnInterrupt()],
            logger=False,
            default_root_dir=str(root),
            enable_progress_bar=cfg.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if validate else 0,
            check_val_every_n_epoch=val_every,
            limit_train_batches=1.0 if train_batches is None else train_batches,
            log_every_n_steps=1,
        )
    except (ValueError, TypeError, ImportError, RuntimeError, pl.utilities.exceptions.MisconfigurationException) as err:
        # ImportError: an accelerator whose library is missing (tpu without torch_xla)
        settings = f"accelerator={cfg.accelerator}, devices={cfg.devices}, precision={cfg.precision}, strategy={cfg.strategy}"
        raise ConfigError(f"trainer ({settings}): {(str(err).splitlines() or [type(err).__name__])[0]}") from None


def last_checkpoint(folder: Path) -> Path | None:
    """``folder/last.ckpt`` if there is one to resume from, after checking it loads as plain tensors.

    Lightning loads it again with ``weights_only=True``; loading it here first lets the error name
    the file (a checkpoint that carries code is refused, and the code never runs).
    """
    path = Path(folder) / "last.ckpt"
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - refused pickles and truncated files alike
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise HistosslError(f"{path}: refused to resume from this checkpoint ({first}); delete it to start over") from None
    return path


def checkpoint_callbacks(folder: Path, monitor: str | None = None, mode: str = "max", resumable: bool = True, every: int = 1) -> list[ModelCheckpoint]:
    """``last.ckpt`` every epoch (full state, to resume) and, with ``monitor``, ``best.ckpt``.

    The best epoch's checkpoint holds the weights only (a third of a full AdamW checkpoint): it is
    read once, for the test split, and never resumed from; it is considered every ``every`` epochs
    (the epochs that are validated). ``resumable=False`` skips ``last.ckpt``,
    for runs that take seconds (a head on cached features) and are cheaper to redo than to save.
    """
    # monitor=None with save_top_k=1 keeps the newest epoch under a fixed name, written every epoch
    # (save_last=True with save_top_k=0 would write last.ckpt only when training ends).
    last = ModelCheckpoint(dirpath=str(folder), filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False)
    if monitor is None:
        return [last]
    best = ModelCheckpoint(
        dirpath=str(folder),
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_weights_only=True,
        every_n_epochs=every,
        enable_version_counter=False,
    )
    return [last, best] if resumable else [best]


def parameter_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Optimizer groups: weight decay on weights, none on biases and normalisation layers.

    Biases and batch/layer-norm scales and shifts are the 1-D parameters; decaying them only pulls
    them towards 0 (Goyal et al. 2017, arXiv 1706.02677, section 5.1; BYOL and DINO exclude them too).
    """
    decay, no_decay = [], []
    for _, param in named_parameters:
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
