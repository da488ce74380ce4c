"""Where images come from: an image folder or a CSV manifest, indexed once, and decoding to RGB.

Three layouts are understood (see the README):

* ``ROOT/<class>/<image>``: each image is its own group.
* ``ROOT/<group>/<class>/<image>``: the group (patient, slide) is kept whole within one split.
  Detected when the subfolders of ROOT hold folders rather than images.
* a CSV manifest with a header ``path,label[,group][,split]``: paths relative to the manifest's
  folder (or absolute inside it); a ``split`` column fixes the split. A ``slide`` column (as
  ``histossl data tile`` writes) serves as the group when there is no ``group`` column.

Unlabelled data sets (``labels: false``, pretraining only) are a folder of images at any depth
(the first-level folder, e.g. the slide, is the group when images sit below one) or a manifest
whose label column, if any, is ignored.

Folders are scanned to a fixed depth, so symlinked folders are followed once but a symlink loop
cannot make the scan recurse forever. Hidden files and files without an image suffix are ignored.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histossl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "test")


class UnreadableImage(DataError):
    """An image file Pillow cannot open or fully decode (truncated, empty, not an image)."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make field-wise equality ambiguous
class ImageIndex:
    """Every image of a data set with its class, group and (from a manifest) split.

    Attributes:
        root: The image folder, or the manifest's folder.
        paths: Absolute paths, sorted by their string.
        labels: ``(N,)`` int64 index into ``classes``; -1 everywhere when unlabelled.
        classes: Sorted class names.
        groups: ``(N,)`` str group (patient, slide); without groups each image is its own group.
        has_groups: Whether the data set named groups.
        splits: ``(N,)`` str ``train``/``val``/``test`` from a manifest's split column, else None.
    """

    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray
    has_groups: bool
    splits: np.ndarray | None = None
    labelled: bool = True  # False: ``labels`` is all -1 and ``classes`` empty (pretraining only)

    def __len__(self) -> int:
        return len(self.paths)


# ----------------------------------------------------------------------------------------------
# Indexing


def load_index(path: str | Path, labels: bool = True) -> ImageIndex:
    """Index an image folder or CSV manifest, refusing data sets that cannot be trained on.

    Args:
        path: An image folder (``ROOT/<class>/…`` or ``ROOT/<group>/<class>/…``) or a ``.csv`` manifest.
        labels: False: an unlabelled pool (images at any depth, no class folders).

    Returns:
        The index, with at least two classes and no empty class folder (when labelled).

    Raises:
        DataError: Missing path, no images, an empty class folder, a single class, a bad manifest row.
    """
    index, problems = scan(path, labels)
    if not labels:
        return index
    if problems:
        raise DataError(problems[0])
    if len(index.classes) < 2:
        only = index.classes[0] if index.classes else "none"
        raise DataError(f"{index.root}: needs at least 2 classes, found 1 ({only!r})")
    return index


def scan(path: str | Path, labels: bool = True) -> tuple[ImageIndex, list[str]]:
    """Index a data set without refusing it for problems a report can still describe.

    ``histossl data inspect`` uses this to show an empty class folder or a single class;
    :func:`load_index` turns the same problems into errors.

    Returns:
        The index and a list of one-line problems (empty class folders).

    Raises:
        DataError: A missing path, a folder with no images, or a bad manifest row.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: expected an image folder or a .csv manifest")
        return _index_manifest(path, labels), []
    return _index_folder(path) if labels else (_index_unlabelled_folder(path), [])


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot list {folder}: {err.strerror}") from None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop (ELOOP) or an entry that vanished: not an image we can use
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _images_in(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder) if _is_image_name(e.name) and _is_file(e)]


def _subfolders(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder) if _is_dir(e)]


def _index_folder(root: Path) -> tuple[ImageIndex, list[str]]:
    top = _subfolders(root)
    if not top:
        where = "has images but no class folders" if _images_in(root) else "has no class folders"
        raise DataError(f"{root}: {where}; expected ROOT/<class>/<image> or ROOT/<group>/<class>/<image> "
                        "(unlabelled images: set datasets.<name>.labels: false)")
    # Grouped when no top-level folder holds images itself but some hold folders.
    grouped = not any(_images_in(d) for d in top) and any(_subfolders(d) for d in top)
    records: list[tuple[Path, str, str]] = []  # (path, class, group)
    problems: list[str] = []
    for folder in top:
        class_dirs = _subfolders(folder) if grouped else [folder]
        if grouped and not class_dirs:
            problems.append(f"group folder {folder} holds no class folders")
        for class_dir in class_dirs:
            images = _images_in(class_dir)
            if not images:
                problems.append(f"class folder {class_dir} holds no images")
            group = folder.name if grouped else ""
            records.extend((p, class_dir.name, group) for p in images)
    if not records:
        raise DataError(f"{root}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    if not grouped:  # each image is its own group, named by its path under ROOT (unique)
        records = [(p, c, p.relative_to(root).as_posix()) for p, c, _ in records]
    return _make_index(root, records, has_groups=grouped, splits=None), problems


# Deep enough for ROOT/<site>/<slide>/<region>/<image>; a fixed depth keeps a symlink loop finite.
MAX_UNLABELLED_DEPTH = 8


def _index_unlabelled_folder(root: Path) -> ImageIndex:
    """Every image below ``root`` (any depth); the first-level folder is its group (e.g. the slide)."""
    records: list[tuple[Path, str, str]] = []
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        for image in _images_in(folder):
            rel = image.relative_to(root)
            records.append((image, "", rel.parts[0] if len(rel.parts) > 1 else rel.as_posix()))
        if depth < MAX_UNLABELLED_DEPTH:
            pending.extend((d, depth + 1) for d in _subfolders(folder))
    if not records:
        raise DataError(f"{root}: no images found at any depth (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    has_groups = any(len(p.relative_to(root).parts) > 1 for p, _, _ in records)
    return _make_index(root, records, has_groups=has_groups, splits=None, labelled=False)


def _make_index(
    root: Path, records: list[tuple[Path, str, str]], has_groups: bool, splits: list[str] | None, labelled: bool = True
) -> ImageIndex:
    order = sorted(range(len(records)), key=lambda i: str(records[i][0]))
    classes = sorted({c for _, c, _ in records}) if labelled else []
    class_id = {c: i for i, c in enumerate(classes)}
    return ImageIndex(
        root=root,
        paths=[records[i][0] for i in order],
        labels=np.array([class_id.get(records[i][1], -1) for i in order], dtype=np.int64),
        classes=classes,
        groups=np.array([records[i][2] for i in order], dtype=str),
        has_groups=has_groups,
        splits=None if splits is None else np.array([splits[i] for i in order], dtype=str),
        labelled=labelled,
    )


def _index_manifest(manifest: Path, labelled: bool = True) -> ImageIndex:
    root = manifest.parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            for needed in ("path", "label") if labelled else ("path",):
                if needed not in columns:
                    got = ",".join(columns) or "nothing"
                    header = "path,label[,group][,split]" if labelled else "path[,group][,split] (labels: false)"
                    hint = " (unlabelled images: set datasets.<name>.labels: false)" if labelled and "path" in columns else ""
                    raise DataError(f"{manifest}: header must name columns {header}; got {got}{hint}")
            reader.fieldnames = columns
            group_column = "group" if "group" in columns else "slide" if "slide" in columns else None
            has_groups, has_splits = group_column is not None, "split" in columns
            records, splits, seen = [], [], set()
            for row in reader:
                where = f"{manifest} row {reader.line_num}"
                path = _manifest_path(root, (row.get("path") or "").strip(), where)
                if path in seen:
                    raise DataError(f"{where}: {path} is listed twice")
                seen.add(path)
                label = (row.get("label") or "").strip() if labelled else ""
                if labelled and not label:
                    raise DataError(f"{where}: empty label")
                group = (row.get(group_column) or "").strip() if has_groups else path.relative_to(root).as_posix()
                if not group:
                    raise DataError(f"{where}: empty group")
                if has_splits:
                    split = (row.get("split") or "").strip().lower()
                    if split not in SPLIT_NAMES:
                        raise DataError(f"{where}: split {row.get('split')!r} is not one of train, val, test")
                    splits.append(split)
                records.append((path, label, group))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{manifest}: cannot read the manifest ({err})") from None
    if not records:
        raise DataError(f"{manifest}: the manifest lists no images")
    return _make_index(root, records, has_groups=has_groups, splits=splits if has_splits else None, labelled=labelled)


def _manifest_path(root: Path, text: str, where: str) -> Path:
    """Resolve a manifest path; refuse one that leaves the manifest's folder.

    The check is on the normalised path (``..`` collapsed), so a manifest cannot point the
    tool at arbitrary files on the machine.
    """
    if not text:
        raise DataError(f"{where}: empty path")
    path = Path(os.path.normpath(root / text))
    if os.path.commonpath([root, path]) != str(root):
        raise DataError(f"{where}: path {text!r} is outside the manifest's folder {root}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{where}: {text!r} is not an image file (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Decoding


def read_rgb(path: Path) -> np.ndarray:
    """Decode any image Pillow reads to ``(H, W, 3)`` uint8 RGB.

    Transparent images are composited onto white (the slide background). High bit depth is
    scaled by the range of its type (16-bit: ``value >> 8``), never clipped.

    Raises:
        UnreadableImage: The file is empty, truncated or not an image; the message names it.
    """
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: Image.open alone reads only the header, truncation shows here
            return _to_rgb(img)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableImage(f"{path}: cannot read image ({reason})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _scale_to_uint8(np.asarray(img), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map one-channel high-depth pixels to 0..255.

    16-bit (and 32-bit ``I`` holding 0..65535, as Pillow gives for some 16-bit files) keep the
    top 8 bits, so 65535 -> 255 and 32768 -> 128. Floats in [0, 1] are scaled by 255; any other
    range (floats, negative or >16-bit integers) is stretched from its min to its max.
    """
    if mode.startswith("I;16"):
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and low >= 0 and high <= 65535:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 1:
        return np.round(values * 255).astype(np.uint8)
    span = high - low if high > low else 1.0
    return np.round((values - low) / span * 255).astype(np.uint8)
