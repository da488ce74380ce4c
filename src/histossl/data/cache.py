"""Decode every image once into a memory-mapped uint8 array, reused across runs.

Training reads the same small patches for many epochs and many runs; decoding PNG/JPEG/TIFF each
time would dominate. The cache lives in ``cache_root()/<key>/`` where the key hashes the image
size, the resize method, the stain normalisation (method, reference file) if any and, per file,
its path, size and modification time: touching or replacing a file makes a new cache, and a
normalised cache never collides with the raw one.

A cache folder is built under ``<key>.partial`` and renamed into place when complete, so a killed
process never leaves a half cache that a later run trusts. The build writes blocks of images into
the memory-mapped array and, after each block is flushed, a progress marker; a build that was
killed resumes from the last marker instead of starting over, and memory stays at one block
(a 150k-patch pool at 224 px is a 22 GB array, never held in RAM).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image

from histossl.data import sources, stain
from histossl.data.sources import ImageIndex, UnreadableImage
from histossl.errors import DataError
from histossl.io import apply_umask

# Bump when the decoded pixels would change (resize filter, crop rule, colour conversion).
RESIZE_VERSION = "shorter-side-bicubic-centre-crop-v1"
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
BLOCK = 512  # images decoded between two progress markers (224 px: 77 MB in memory)


@dataclass
class DecodedImages:
    """Decoded, resized images of an index.

    Attributes:
        images: ``(M, S, S, 3)`` uint8, memory-mapped read-only.
        keep: ``(M,)`` int64 indices into the ImageIndex of the images in ``images``.
        skipped: ``(path, reason)`` of the unreadable images left out.
        stain_fallbacks: Images kept unnormalised because the stain method could not fit them
            (background only, a single colour).
    """

    images: np.ndarray
    keep: np.ndarray
    skipped: list[tuple[str, str]]
    stain_fallbacks: int = 0


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
    stain_normalization=None,
) -> DecodedImages:
    """Decoded ``image_size`` squares of every image in ``index``, from the cache or decoded now.

    Args:
        index: The images.
        image_size: Side ``S`` of the square each image is resized and centre-cropped to.
        cache_dir: Cache folder; "" uses :func:`cache_root`'s default.
        skip_unreadable: Leave unreadable images out (listed in ``skipped``) instead of refusing.
        progress: Print a progress line to stderr every few seconds while decoding.
        stain_normalization: A ``StainNormalizationConfig`` (method, reference image) applied to
            each decoded square, or None.

    Raises:
        DataError: Unreadable images and ``skip_unreadable`` is False (names the first few);
            a file vanished; no image readable; a stain reference that is all background.
    """
    target = None
    if stain_normalization is not None:  # fitted first: a bad reference fails before anything is written
        target = stain.load_reference(stain_normalization.method, stain_normalization.reference)
    folder = cache_root(cache_dir) / _cache_key(index, image_size, stain_normalization)
    if not (folder / META_FILE).is_file():
        _build(folder, index, image_size, progress, target)
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
    return DecodedImages(images=images, keep=keep, skipped=skipped, stain_fallbacks=meta.get("stain_fallbacks", 0))


def _cache_key(index: ImageIndex, image_size: int, stain_normalization=None) -> str:
    digest = hashlib.sha256(f"{image_size}\n{RESIZE_VERSION}\n".encode())
    if stain_normalization is not None:  # absent for raw caches, so their keys are those of earlier versions
        ref = Path(stain_normalization.reference).expanduser().resolve()
        st = os.stat(ref)
        digest.update(f"stain\0{stain.STAIN_VERSION}\0{stain_normalization.method}\0{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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


def _decode_one(task: tuple[Path, int, stain.StainTarget | None]) -> tuple[np.ndarray, bool] | str:
    """One image decoded, resized and (if asked) stain-normalised; a string says why it is unreadable."""
    path, size, target = task
    try:
        square = resize_square(sources.read_rgb(path), size)
    except UnreadableImage as err:
        return str(err).removeprefix(f"{path}: ")
    if target is None:
        return square, False
    normalised = stain.normalize(square, target)
    return (square, True) if normalised is None else (normalised, False)


def _build(folder: Path, index: ImageIndex, size: int, progress: bool, target: stain.StainTarget | None = None) -> None:
    """Decode into ``<folder>.partial`` block by block, resuming from its marker; rename when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")
    lock_path = folder.with_name(folder.name + ".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process building the same cache waits, then finds it done
        if (folder / META_FILE).is_file():
            return
        state = _resume_state(partial, len(index), size)
        if state["done"] == 0:
            partial.mkdir(exist_ok=True)
            # One slot per image; readable images are packed at the front, so a skipped image costs
            # only an unused slot at the end instead of a second pass to compact the file.
            np.lib.format.open_memmap(partial / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(index), size, size, 3)).flush()
        images = np.load(partial / IMAGES_FILE, mmap_mode="r+")
        keep, skipped, fallbacks = state["keep"], [tuple(s) for s in state["skipped"]], state["stain_fallbacks"]
        reporter = _Progress(f"decoding {index.root.name}", len(index), enabled=progress, resumed=state["done"])
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL while decoding
            for start in range(state["done"], len(index), BLOCK):
                stop = min(start + BLOCK, len(index))
                tasks = [(index.paths[i], size, target) for i in range(start, stop)]
                for i, result in zip(range(start, stop), pool.map(_decode_one, tasks, chunksize=16)):
                    if isinstance(result, str):
                        skipped.append((str(index.paths[i]), result))
                    else:
                        images[len(keep)] = result[0]
                        keep.append(i)
                        fallbacks += result[1]
                    reporter.update(i + 1)
                images.flush()  # pixels on disk before the marker says they are
                marker = {"n": len(index), "size": size, "done": stop, "keep": keep, "skipped": skipped, "stain_fallbacks": fallbacks}
                _write_json(partial / PROGRESS_FILE, marker)
        reporter.done()
        del images
        meta = {"image_size": size, "resize": RESIZE_VERSION, "root": str(index.root),
                "paths": [str(p) for p in index.paths], "keep": keep, "skipped": skipped, "stain_fallbacks": fallbacks,
                "stain": None if target is None else target.method}
        _write_json(partial / META_FILE, meta)
        (partial / PROGRESS_FILE).unlink()
        os.rename(partial, folder)
        # Removed only after success, while held: a waiter on the old file then finds the meta file.
        lock_path.unlink()


def _resume_state(partial: Path, n: int, size: int) -> dict:
    """The marker of an interrupted build of the same images, or a fresh start."""
    fresh = {"done": 0, "keep": [], "skipped": [], "stain_fallbacks": 0}
    try:
        state = json.loads((partial / PROGRESS_FILE).read_text())
        if state["n"] == n and state["size"] == size and (partial / IMAGES_FILE).is_file():
            return state
    except (OSError, ValueError, KeyError):
        pass
    if partial.exists():
        shutil.rmtree(partial)
    return fresh


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class _Progress:
    """A line on stderr every few seconds: ``decoding idc-breast: 4000/10194 (39%)``."""

    def __init__(self, label: str, total: int, enabled: bool, every_s: float = 3.0, resumed: int = 0):
        self.label, self.total, self.enabled, self.every_s = label, total, enabled, every_s
        self.start = self.last = time.monotonic()
        if enabled and resumed:
            print(f"{label}: resuming an interrupted build at {resumed}/{total}", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            print(f"{self.label}: {done}/{self.total} ({100 * done // self.total}%)", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.last - self.start > 0:  # only after a long decode that printed before
            elapsed = time.monotonic() - self.start
            print(f"{self.label}: {self.total}/{self.total} in {elapsed:.0f} s", file=sys.stderr, flush=True)


def cache_key(index: ImageIndex, image_size: int, stain_normalization=None) -> str:
    """The key of the decoded images of ``index`` at ``image_size`` (their folder name in the cache)."""
    return _cache_key(index, image_size, stain_normalization)
