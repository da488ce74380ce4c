"""What a data set looked like when a study used it: a cheap fingerprint, and what changed since.

The fingerprint hashes, for every image, its path relative to the data set's root, its size and its
modification time (no pixel is read: a ``stat`` per file). It is kept with the split
(``split.csv.json``), each pretraining stage (``stage.json``) and each record (``data_fingerprint``),
so a resumed study can tell which of its results were made from other data. The per-file listing of
each fingerprint is kept in ``OUT/fingerprints/<data set>-<digest>.tsv`` to say what changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from histossl.data.sources import ImageIndex
from histossl.errors import DataError
from histossl.io import atomic_write_text

FOLDER = "fingerprints"


def listing(index: ImageIndex) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every image of the index."""
    files = {}
    for path in index.paths:
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}") from None
        rel = path.relative_to(index.root).as_posix() if path.is_relative_to(index.root) else str(path)
        files[rel] = (st.st_size, st.st_mtime_ns)
    return files


def fingerprint(index: ImageIndex, files: dict[str, tuple[int, int]] | None = None) -> dict:
    """``{"path", "n_images", "digest"}``: the digest changes when an image is added, removed, resized or touched."""
    files = listing(index) if files is None else files
    digest = hashlib.sha256()
    for rel in sorted(files):
        size, mtime = files[rel]
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return {"path": str(index.root), "n_images": len(files), "digest": digest.hexdigest()[:16]}


def save_listing(out: Path, name: str, print_: dict, files: dict[str, tuple[int, int]]) -> None:
    """Keep the per-file listing behind a fingerprint (once per digest) for later comparisons."""
    path = Path(out) / FOLDER / f"{name}-{print_['digest']}.tsv"
    if not path.is_file():
        # durable=False: lost in a power cut, it only makes a later message less detailed
        atomic_write_text(path, "".join(f"{rel}\t{size}\t{mtime}\n" for rel, (size, mtime) in sorted(files.items())), durable=False)


def _load_listing(out: Path, name: str, digest: str) -> dict[str, tuple[int, int]] | None:
    path = Path(out) / FOLDER / f"{name}-{digest}.tsv"
    if not path.is_file():
        return None
    files = {}
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        rel, size, mtime = line.rsplit("\t", 2)
        files[rel] = (int(size), int(mtime))
    return files


def describe_change(out: Path, name: str, old: dict, new: dict, files: dict[str, tuple[int, int]]) -> str:
    """``3 images added, 1 removed, 2 modified (added: a.png, b.png; removed: c.png; ...)``, or the counts alone."""
    before = _load_listing(out, name, old.get("digest", ""))
    if before is None:
        return f"{old.get('n_images', '?')} images then, {new['n_images']} now"
    added = sorted(set(files) - set(before))
    removed = sorted(set(before) - set(files))
    modified = sorted(rel for rel in set(files) & set(before) if files[rel] != before[rel])
    parts = [f"{len(added)} images added, {len(removed)} removed, {len(modified)} modified"]
    examples = [f"{kind}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for kind, items in (("added", added), ("removed", removed), ("modified", modified)) if items]
    return parts[0] + (f" ({'; '.join(examples)})" if examples else "")


def differs(saved: dict | None, current: dict) -> bool:
    """Whether a saved fingerprint shows other data; a missing one (results from before fingerprints) is unknown, not changed."""
    return isinstance(saved, dict) and "digest" in saved and saved["digest"] != current["digest"]
