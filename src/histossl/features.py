"""The feature store: a frozen encoder's features of every target image, computed once per encoder file.

Every protocol that reads a frozen encoder (``frozen``, ``linear``, ``knn``, ...) at every label
budget and seed reads the same array, so an encoder is run over the target data once per study, as
eva writes its embeddings once (``ClassificationEmbeddingsWriter``). The file is keyed by the
encoder file's content (sha256) and by the data (the decoded-image cache key and image size), so a
retrained encoder or changed data gets new features and an unchanged one never recomputes:

    OUT/features/<sha256 of the encoder file, 16 hex>_<data key>.npy    float32 (N, D), row i = image i
    OUT/features/<same>.json                                             manifest: encoder file, hashes, shape, time
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histossl import augment
from histossl.config import Config
from histossl.io import atomic_write_json
from histossl.models.backbones import build_encoder

log = logging.getLogger(__name__)
FOLDER = "features"
_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime within a process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def store_path(folder: Path, encoder_file: Path, data_key: str) -> Path:
    """Where the features of ``encoder_file`` on the data ``data_key`` are kept under ``folder``."""
    return Path(folder) / f"{file_digest(encoder_file)[:16]}_{data_key}.npy"


def training_device(cfg: Config) -> torch.device:
    """The GPU when there is one and the trainer may use it, else the CPU."""
    use_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if use_gpu else "cpu")


@torch.no_grad()
def encode(encoder: nn.Module, images: np.ndarray, rows: np.ndarray, batch_size: int = 256, label: str = "") -> np.ndarray:
    """Features ``(len(rows), D)`` of the plain (un-augmented) images, in eval mode, on the encoder's device.

    Logs a progress line about every 10% of a long encode.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    start, every = time.monotonic(), max(1, (len(rows) // batch_size) // 10)
    for i, first in enumerate(range(0, len(rows), batch_size)):
        chunk = torch.from_numpy(np.ascontiguousarray(images[rows[first : first + batch_size]])).to(device)
        out.append(encoder(augment.normalize(augment.to_float(chunk))).float().cpu())
        done = min(first + batch_size, len(rows))
        if label and len(rows) > 10 * batch_size and (i + 1) % every == 0:
            log.info("features of %s: %d/%d images (%.0f images/s)", label, done, len(rows), done / max(time.monotonic() - start, 1e-9))
    return torch.cat(out).numpy()


def features(cfg: Config, encoder_file: Path, images: np.ndarray, folder: Path, data_key: str) -> np.ndarray:
    """Features of every image for a frozen encoder file: read from the store, or computed and stored.

    Args:
        cfg: The study config (backbone, trainer accelerator).
        encoder_file: The encoder's weights file.
        images: ``(N, S, S, 3)`` uint8, the decoded target images.
        folder: The store, ``OUT/features``.
        data_key: Names the data the images are (see ``study.target_data``).

    Returns:
        ``(N, D)`` float32, memory-mapped read-only.
    """
    path = store_path(folder, encoder_file, data_key)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    encoder = build_encoder(cfg.backbone, str(encoder_file)).to(training_device(cfg))
    start = time.monotonic()
    array = encode(encoder, images, np.arange(len(images)), label=str(encoder_file)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)
    atomic_write_json(path.with_suffix(".json"), {
        "encoder_file": str(encoder_file),
        "encoder_sha256": file_digest(encoder_file),
        "data_key": data_key,
        "shape": list(array.shape),
        "backbone": cfg.backbone.name,
        "image_size": int(images.shape[1]),
        "device": str(next(encoder.parameters()).device),
        "encode_s": round(time.monotonic() - start, 2),
    })
    log.info("features of %s: %d x %d in %.1f s, kept at %s", encoder_file, *array.shape, time.monotonic() - start, path)
    return np.load(path, mmap_mode="r")


def manifest(path: Path) -> dict:
    """The json manifest beside a feature file."""
    return json.loads(Path(path).with_suffix(".json").read_text())
