"""``histossl data tile``: tissue patches from whole-slide images, one folder per slide, and a manifest.

Any format OpenSlide reads (.svs, .tif, .ndpi, .mrxs, .scn, ...), through ``openslide-python`` and
``openslide-bin`` (the C library in a wheel: no system install). For each slide:

1. the resolution of level 0 from its metadata (``openslide.mpp-x``, else the objective power,
   taking 10x as 1 µm/px), or ``--slide-mpp``; none of these is an error naming the slide;
2. a grid of non-overlapping patches covering ``patch_size`` pixels at the requested µm/px, read
   from the pyramid level just finer than that and resized down (the best level for the downsample);
3. the tissue fraction of each patch from a thumbnail mask (``tissue.py``); patches below
   ``tissue_fraction`` are dropped;
4. PNGs into ``OUT/<slide>/`` (or ``OUT/<slide>/<label>/`` with a label per slide) and, last, a
   ``.tiles.json`` marker holding the slide's manifest rows and settings.

Slides run one process each. A slide whose marker matches the settings is skipped on a rerun; a
slide without a marker (interrupted) is redone from scratch. A slide that fails (not a slide,
truncated) is named on one line and the others go on; the command exits 1 at the end.
``OUT/manifest.csv`` lists every tiled slide's patches: path,slide[,label],x,y,level,mpp,tissue_fraction.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histossl.data.tissue import region_fractions, tissue_mask
from histossl.errors import ConfigError, DataError, HistosslError

# Suffixes OpenSlide opens (openslide.org/formats); a folder is searched for these only.
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi"}
MARKER = ".tiles.json"
MANIFEST = "manifest.csv"
THUMB_PIXELS_PER_PATCH = 32  # thumbnail resolution: a patch spans about 32x32 mask pixels
MAX_THUMB_SIDE = 4096
MICRONS_AT_10X = 1.0  # the usual convention: 10x ~ 1 µm/px, 20x ~ 0.5, 40x ~ 0.25


@dataclass(frozen=True)
class TileSettings:
    """What shapes the patches; a slide tiled with other settings is tiled again."""

    patch_size: int = 224
    mpp: float | None = 0.5  # microns per pixel of the patches; or
    magnification: float | None = None  # objective magnification of the patches
    slide_mpp: float | None = None  # level-0 µm/px for slides whose metadata lacks it
    tissue_fraction: float = 0.5

    @classmethod
    def from_args(cls, patch_size: int, mpp: float | None, magnification: float | None,
                  slide_mpp: float | None, tissue_fraction: float) -> TileSettings:
        """Checked settings from the command line; a bad value is a ConfigError naming the option."""
        if patch_size < 8:
            raise ConfigError(f"--patch-size {patch_size}: must be at least 8")
        for option, value in (("--mpp", mpp), ("--magnification", magnification), ("--slide-mpp", slide_mpp)):
            if value is not None and not value > 0:
                raise ConfigError(f"{option} {value}: must be positive")
        if not 0 < tissue_fraction <= 1:
            raise ConfigError(f"--tissue-fraction {tissue_fraction}: must be in (0, 1]")
        if mpp is None and magnification is None:
            mpp = 0.5
        return cls(patch_size, mpp, magnification, slide_mpp, tissue_fraction)


@dataclass(frozen=True)
class SlideResult:
    name: str
    patches: int = 0
    seconds: float = 0.0
    error: str = ""


# ----------------------------------------------------------------------------------------------
# The whole command


def tile_slides(path: str | Path, out: str | Path, settings: TileSettings, labels_csv: str | Path | None = None,
                workers: int = 0, progress: bool = True) -> Path:
    """Tile every slide at ``path`` (a slide or a folder of slides) into ``out``; returns the manifest.

    Raises:
        DataError: No slides at ``path``; a bad labels CSV.
        HistosslError: Some slides failed (each was named on stderr); the others are tiled and in the manifest.
    """
    slides = find_slides(Path(path))
    labels = read_labels(Path(labels_csv)) if labels_csv else None
    out = Path(out)
    todo, failed, done = [], [], 0
    seen: set[str] = set()
    for slide in slides:
        name, label = slide.stem, None
        if name in seen:
            failed.append(SlideResult(name, error=f"{slide}: another slide is also named {name!r}; rename one"))
            continue
        seen.add(name)
        if labels is not None:
            label = labels.get(name, labels.get(slide.name))
            if label is None:
                failed.append(SlideResult(name, error=f"{slide}: no label for slide {name!r} in {labels_csv}"))
                continue
        if _is_done(out / name, settings, label):
            done += 1
            _say(progress, f"{name}: already tiled, skipped")
        else:
            todo.append((slide, out / name, settings, label, progress))
    for result in failed:
        _say(True, f"histossl: {result.error}")
    workers = workers or min(len(todo), os.cpu_count() or 1)
    for i, result in enumerate(_run(todo, workers), 1):
        if result.error:
            failed.append(result)
            _say(True, f"histossl: {result.error}")
        else:
            done += 1
            _say(progress, f"[{i}/{len(todo)}] {result.name}: {result.patches} patches in {result.seconds:.0f} s")
    manifest = write_manifest(out) if done else None
    if failed:
        names = ", ".join(r.name for r in failed)
        kept = f"; the other slides are in {manifest}" if manifest else "; nothing was written"
        raise HistosslError(f"{len(failed)} of {len(slides)} slides failed ({names}), each named above{kept}")
    return manifest


def find_slides(path: Path) -> list[Path]:
    """A slide file, or the slide files of a folder (by suffix), sorted."""
    if not path.exists():
        raise DataError(f"slide or folder not found: {path}")
    if path.is_file():
        return [path]
    slides = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith("."))
    if not slides:
        raise DataError(f"{path}: no slides (suffixes {', '.join(sorted(SLIDE_SUFFIXES))})")
    return slides


def read_labels(path: Path) -> dict[str, str]:
    """``slide,label`` rows: the slide by file name or stem."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"slide", "label"} <= set(reader.fieldnames or []):
                raise DataError(f"{path}: header must name columns slide,label; got {','.join(reader.fieldnames or []) or 'nothing'}")
            labels = {row["slide"].strip(): row["label"].strip() for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the labels CSV ({err})") from None
    empty = [s for s, label in labels.items() if not label]
    if empty:
        raise DataError(f"{path}: slide {empty[0]!r} has an empty label")
    return labels


def _run(todo: list[tuple], workers: int):
    if workers <= 1 or len(todo) <= 1:
        yield from (_tile_safely(task) for task in todo)
        return
    # spawn: a forked child of a process holding OpenMP threads (torch in tests) can deadlock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_tile_safely, todo)


def _say(enabled: bool, line: str) -> None:
    if enabled:
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# One slide


def _tile_safely(task: tuple) -> SlideResult:
    """Tile one slide; any failure becomes a one-line error naming it (the other slides go on)."""
    slide, folder, settings, label, progress = task
    start = time.monotonic()
    try:
        n = tile_slide(slide, folder, settings, label, progress)
    except Exception as err:  # OpenSlide and Pillow raise many types for broken files
        if folder.exists() and not (folder / MARKER).exists():  # no half slide left behind
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, HistosslError):
            return SlideResult(folder.name, error=str(err))
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return SlideResult(folder.name, error=f"{slide}: cannot tile the slide, damaged or truncated? ({reason})")
    return SlideResult(folder.name, n, time.monotonic() - start)


def tile_slide(slide_path: Path, folder: Path, settings: TileSettings, label: str | None = None, progress: bool = False) -> int:
    """Write the tissue patches of one slide into ``folder`` (emptied first); returns how many.

    Raises:
        DataError: Not a slide, no resolution, finer than the slide, no patch with enough tissue.
    """
    import openslide

    try:
        slide = openslide.OpenSlide(str(slide_path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise DataError(f"{slide_path}: not a slide OpenSlide can read (another kind of file, or truncated)") from None
    except openslide.OpenSlideError as err:
        raise DataError(f"{slide_path}: cannot open the slide ({str(err).splitlines()[0]})") from None
    with slide:
        base_mpp, downsample = _resolution(slide, settings, slide_path)
        width, height = slide.dimensions
        step = settings.patch_size * downsample  # patch side in level-0 pixels
        xs = np.arange(int(width // step)) * step
        ys = np.arange(int(height // step)) * step
        if len(xs) == 0 or len(ys) == 0:
            raise DataError(f"{slide_path}: {width}x{height} px is smaller than one patch ({step:.0f} level-0 px)")
        grid = np.array([(x, y) for y in ys for x in xs])
        fractions = _tissue_fractions(slide, grid, step)
        keep = np.flatnonzero(fractions >= settings.tissue_fraction)
        if len(keep) == 0:
            raise DataError(f"{slide_path}: no patch reaches --tissue-fraction {settings.tissue_fraction:g} "
                            f"(the best has {fractions.max():.2f}); lower it")
        level = slide.get_best_level_for_downsample(downsample + 1e-6)
        read_side = max(1, round(step / slide.level_downsamples[level]))
        if folder.exists():  # an interrupted earlier run: start the slide afresh
            shutil.rmtree(folder)
        target = folder / label if label else folder
        target.mkdir(parents=True)
        rows, last = [], time.monotonic()
        out_mpp = round(base_mpp * downsample, 4)
        for n, i in enumerate(keep, 1):
            x, y = int(round(grid[i, 0])), int(round(grid[i, 1]))
            region = slide.read_region((x, y), level, (read_side, read_side))
            patch = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region).convert("RGB")
            if read_side != settings.patch_size:
                patch = patch.resize((settings.patch_size, settings.patch_size), Image.Resampling.BICUBIC)
            image = target / f"{folder.name}_x{x}_y{y}.png"
            patch.save(image, compress_level=3)
            rows.append({"path": image.relative_to(folder.parent).as_posix(), "slide": folder.name,
                         **({"label": label} if label else {}), "x": x, "y": y, "level": level,
                         "mpp": out_mpp, "tissue_fraction": round(float(fractions[i]), 4)})
            if progress and time.monotonic() - last > 3:
                last = time.monotonic()
                _say(True, f"{folder.name}: {n}/{len(keep)} patches")
    marker = {"settings": asdict(settings), "label": label, "slide": str(slide_path), "rows": rows}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, folder / MARKER)  # last: a slide without it is redone
    return len(rows)


def _resolution(slide, settings: TileSettings, slide_path: Path) -> tuple[float, float]:
    """Level-0 µm/px and the downsample from level 0 to the patches."""
    props = slide.properties
    base_mpp = settings.slide_mpp or _float(props.get("openslide.mpp-x"))
    objective = _float(props.get("openslide.objective-power"))
    if base_mpp is None and objective:
        base_mpp = MICRONS_AT_10X * 10 / objective
    if base_mpp is None:
        raise DataError(f"{slide_path}: no resolution in the slide's metadata (openslide.mpp-x, "
                        "openslide.objective-power); give --slide-mpp (µm per pixel of level 0)")
    if settings.magnification is not None:
        objective = objective or MICRONS_AT_10X * 10 / base_mpp
        downsample = objective / settings.magnification
    else:
        downsample = settings.mpp / base_mpp
    if downsample < 0.99:  # 1% slack: 0.5 µm/px from a 0.499 µm/px slide is level 0 as it is
        asked = f"{settings.magnification:g}x" if settings.magnification else f"{settings.mpp:g} µm/px"
        raise DataError(f"{slide_path}: {asked} is finer than the slide's {base_mpp:g} µm/px; ask for a coarser resolution")
    return base_mpp, max(downsample, 1.0)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def _tissue_fractions(slide, grid: np.ndarray, step: float) -> np.ndarray:
    """Tissue fraction of each patch ``(x, y)`` of side ``step`` (level-0 px), from a thumbnail mask."""
    width, height = slide.dimensions
    scale = min(THUMB_PIXELS_PER_PATCH / step, MAX_THUMB_SIDE / max(width, height), 1.0)
    thumb = slide.get_thumbnail((max(1, round(width * scale)), max(1, round(height * scale))))
    rgb = np.asarray(thumb.convert("RGB"))
    sx, sy = rgb.shape[1] / width, rgb.shape[0] / height
    boxes = np.column_stack([grid[:, 0] * sx, grid[:, 1] * sy, (grid[:, 0] + step) * sx, (grid[:, 1] + step) * sy])
    return region_fractions(tissue_mask(rgb), boxes)


# ----------------------------------------------------------------------------------------------
# Markers and the manifest


def _is_done(folder: Path, settings: TileSettings, label: str | None) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("settings") == asdict(settings) and marker.get("label") == label


def write_manifest(out: Path) -> Path:
    """``OUT/manifest.csv`` from the markers of every tiled slide in ``out``."""
    rows = []
    for folder in sorted(p for p in out.iterdir() if (p / MARKER).is_file()):
        rows.extend(json.loads((folder / MARKER).read_text())["rows"])
    columns = ["path", "slide"] + (["label"] if any("label" in r for r in rows) else []) + ["x", "y", "level", "mpp", "tissue_fraction"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = out / MANIFEST
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)
    return path
