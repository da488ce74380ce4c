"""Decode every image once into a memory-mapped uint8 array, reused across runs.

Training reads the same small patches for many epochs and many runs; decoding PNG/JPEG/TIFF each
time would dominate. The cache lives in ``cache_root()/<key>/`` where the key hashes the image
size, the resize method and, per file, its path, size and modification time: touching or
replacing a file makes a new cache. A cache folder is built under a temporary name and renamed
into place when complete, so a killed process never leaves a half cache that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image

from histossl.data import sources
from histossl.data.sources import ImageIndex, UnreadableImage
from histossl.errors import DataError
from histossl.io import apply_umask

# Bump when the decoded pixels would change (resize filter, crop rule, colour conversion).
RESIZE_VERSION = "shorter-side-bicubic-centre-crop-v1"
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"


@dataclass
class DecodedImages:
    """Decoded, resized images of an index.

    Attributes:
        images: ``(M, S, S, 3)`` uint8, memory-mapped read-only.
        keep: ``(M,)`` int64 indices into the ImageIndex of the images in ``images``.
        skipped: ``(path, reason)`` of the unreadable images left out.
    """

    images: np.ndarray
    keep: np.ndarray
    skipped: list[tuple[str, str]]


def cache_root(cache_dir: str | Path = "") -> Path:
    """The cache folder: ``cache_dir``, else ``$HISTOSSL_CACHE_DIR``, else ``~/.cache/histossl``."""
    chosen = str(cache_dir) or os.environ.get("HISTOSSL_CACHE_DIR", "") or "~/.cache/histossl"
    return Path(chosen).expanduser()


def decode_cached(
    index: ImageIndex,
    image_size: int,
    cache_dir: str | Path = "",
    skip_unreadable: bool = False,
    progress: bool = True,
) -> DecodedImages:
    """Decoded ``image_size`` squares of every image in ``index``, from the cache or decoded now.

    Args:
        index: The images.
        image_size: Side ``S`` of the square each image is resized and centre-cropped to.
        cache_dir: Cache folder; "" uses :func:`cache_root`'s default.
        skip_unreadable: Leave unreadable images out (listed in ``skipped``) instead of refusing.
        progress: Print a progress line to stderr every few seconds while decoding.

    Raises:
        DataError: Unreadable images and ``skip_unreadable`` is False (names the first few);
            a file vanished; no image readable.
    """
    folder = cache_root(cache_dir) / _cache_key(index, image_size)
    if not (folder / META_FILE).is_file():
        _build(folder, index, image_size, progress)
    meta = json.loads((folder / META_FILE).read_text())
    skipped = [(p, reason) for p, reason in meta["skipped"]]
    if skipped and not skip_unreadable:
        first = "; ".join(f"{p} ({reason})" for p, reason in skipped[:3])
        raise DataError(
            f"{len(skipped)} unreadable image(s) in {index.root}: {first}"
            f"{' ...' if len(skipped) > 3 else ''}; set datasets.<name>.skip_unreadable: true to skip them"
        )
    keep = np.array(meta["keep"], dtype=np.int64)
    if len(keep) == 0:
        raise DataError(f"{index.root}: none of the {len(index)} images could be read")
    images = np.load(folder / IMAGES_FILE, mmap_mode="r")[: len(keep)]
    return DecodedImages(images=images, keep=keep, skipped=skipped)


def _cache_key(index: ImageIndex, image_size: int) -> str:
    digest = hashlib.sha256(f"{image_size}\n{RESIZE_VERSION}\n".encode())
    for path in index.paths:
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}") from None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic, antialiased when shrinking), then centre-crop.

    Keeping the aspect ratio keeps nuclei round; cropping the longer side loses only the margin of
    the (rare) non-square patches, where stretching would distort every one of them.
    """
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(rgb)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)  # Pillow widens the filter when shrinking
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _decode_one(task: tuple[Path, int]) -> np.ndarray | str:
    path, size = task
    try:
        return resize_square(sources.read_rgb(path), size)
    except UnreadableImage as err:
        return str(err).removeprefix(f"{path}: ")


def _build(folder: Path, index: ImageIndex, size: int, progress: bool) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    apply_umask(tmp, folder=True)
    try:
        # One slot per image; readable images are packed at the front, so a skipped image costs
        # only an unused slot at the end instead of a second pass to compact the file.
        images = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(index), size, size, 3))
        keep, skipped = [], []
        tasks = [(p, size) for p in index.paths]
        reporter = _Progress(f"decoding {index.root.name}", len(tasks), enabled=progress)
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL while decoding
            for i, result in enumerate(pool.imap(_decode_one, tasks, chunksize=32)):
                if isinstance(result, str):
                    skipped.append((str(index.paths[i]), result))
                else:
                    images[len(keep)] = result
                    keep.append(i)
                reporter.update(i + 1)
        reporter.done()
        images.flush()
        del images
        meta = {"image_size": size, "resize": RESIZE_VERSION, "root": str(index.root),
                "paths": [str(p) for p in index.paths], "keep": keep, "skipped": skipped}
        (tmp / META_FILE).write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META_FILE).is_file():  # not a finished cache from a concurrent process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Progress:
    """A line on stderr every few seconds: ``decoding idc-breast: 4000/10194 (39%)``."""

    def __init__(self, label: str, total: int, enabled: bool, every_s: float = 3.0):
        self.label, self.total, self.enabled, self.every_s = label, total, enabled, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            print(f"{self.label}: {done}/{self.total} ({100 * done // self.total}%)", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.last - self.start > 0:  # only after a long decode that printed before
            elapsed = time.monotonic() - self.start
            print(f"{self.label}: {self.total}/{self.total} in {elapsed:.0f} s", file=sys.stderr, flush=True)
