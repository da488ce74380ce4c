"""What a data set looked like when a study used it: a fingerprint of its contents, and what changed since.

The fingerprint hashes, for every image, its path relative to the data set's root, its size and a
hash of its bytes. A copy of the data set (to another disk, a cluster, a fresh mount) has new
modification times but the same fingerprint; an image replaced, added or removed changes it. The
bytes are read once per study folder: the per-file listing behind each fingerprint
(``OUT/fingerprints/<data set>-<digest>.tsv``: path, size, mtime, hash) lets the next command skip
every file whose size and mtime are unchanged, and says what changed.

It is kept with the split (``split.csv.json``), each pretraining stage (``stage.json``) and each
record (``data_fingerprint``), so a resumed study can tell which of its results were made from
other data. Fingerprints written before content hashing (no ``"content"`` field) hashed sizes and
modification times; they are compared by the files' paths and sizes (``differs``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from histossl.data.sources import ImageIndex
from histossl.errors import DataError
from histossl.io import atomic_write_text

FOLDER = "fingerprints"
Listing = dict[str, tuple[int, int, str]]  # relative path -> (size, mtime_ns, content hash; "" in older listings)


def listing(index: ImageIndex, known: Listing | None = None) -> Listing:
    """``{relative path: (size, mtime_ns, content hash)}``; a file with the size and mtime it has in
    ``known`` keeps its hash there instead of being read again."""
    known = known or {}
    files = {}
    for path in index.paths:
        rel = path.relative_to(index.root).as_posix() if path.is_relative_to(index.root) else str(path)
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
            before = known.get(rel)
            if before and before[:2] == (size, mtime) and before[2]:
                files[rel] = before
                continue
            with open(path, "rb") as f:
                files[rel] = (size, mtime, hashlib.file_digest(f, "sha256").hexdigest()[:32])
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}") from None
    return files


def fingerprint(index: ImageIndex, files: Listing | None = None) -> dict:
    """``{"path", "n_images", "digest", "content"}``: the digest changes when an image is added, removed or its bytes change."""
    files = listing(index) if files is None else files
    digest = hashlib.sha256()
    for rel in sorted(files):
        size, _, content = files[rel]
        digest.update(f"{rel}\0{size}\0{content}\n".encode("utf-8", "surrogateescape"))
    return {"path": str(index.root), "n_images": len(files), "digest": digest.hexdigest()[:16], "content": True}


def save_listing(out: Path, name: str, print_: dict, files: Listing) -> None:
    """Keep the per-file listing behind a fingerprint, the cache of the next command's hashes."""
    path = Path(out) / FOLDER / f"{name}-{print_['digest']}.tsv"
    text = "".join(f"{rel}\t{size}\t{mtime}\t{content}\n" for rel, (size, mtime, content) in sorted(files.items()))
    if not path.is_file() or path.read_text(encoding="utf-8", errors="surrogateescape") != text:
        # durable=False: lost in a power cut, the next command reads the bytes again
        atomic_write_text(path, text, durable=False)


@functools.lru_cache(maxsize=8)
def _read_listing(path: Path, mtime_ns: int) -> Listing:
    files = {}
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        rel, *fields = line.split("\t")
        if len(fields) > 3:  # a tab in the path
            rel, fields = "\t".join([rel, *fields[:-3]]), fields[-3:]
        if len(fields) == 2:  # written before content hashing: size and mtime
            fields.append("")
        files[rel] = (int(fields[0]), int(fields[1]), fields[2])
    return files


def load_listing(out: Path, name: str, digest: str) -> Listing | None:
    """The listing kept for a fingerprint's digest, or None."""
    path = Path(out) / FOLDER / f"{name}-{digest}.tsv"
    return _read_listing(path, path.stat().st_mtime_ns) if path.is_file() else None


def describe_change(out: Path, name: str, old: dict, new: dict, files: Listing) -> str:
    """``3 images added, 1 removed, 2 modified (added: a.png, b.png; removed: c.png; ...)``, or the counts alone."""
    before = load_listing(out, name, old.get("digest", ""))
    if before is None:
        return f"{old.get('n_images', '?')} images then, {new['n_images']} now"
    added = sorted(set(files) - set(before))
    removed = sorted(set(before) - set(files))
    modified = sorted(rel for rel in set(files) & set(before)
                      if files[rel][0] != before[rel][0] or (before[rel][2] and files[rel][2] != before[rel][2]))
    parts = [f"{len(added)} images added, {len(removed)} removed, {len(modified)} modified"]
    examples = [f"{kind}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for kind, items in (("added", added), ("removed", removed), ("modified", modified)) if items]
    return parts[0] + (f" ({'; '.join(examples)})" if examples else "")


def differs(saved: dict | None, current: dict, out: Path | None = None, name: str = "") -> bool:
    """Whether a saved fingerprint shows other data than ``current``.

    A missing one (results from before fingerprints) is unknown, not changed. One from before content
    hashing is compared by the image count and, where its listing is kept in ``out``, by each image's
    path and size: a copy of the data (new modification times) is the same data.
    """
    if not (isinstance(saved, dict) and "digest" in saved):
        return False
    if saved.get("content") or saved["digest"] == current["digest"]:
        return saved["digest"] != current["digest"]
    if saved.get("n_images") != current["n_images"]:
        return True
    before = load_listing(out, name, saved["digest"]) if out is not None else None
    now = load_listing(out, name, current["digest"]) if out is not None else None
    if before is None or now is None:
        return False
    return {rel: v[0] for rel, v in before.items()} != {rel: v[0] for rel, v in now.items()}
