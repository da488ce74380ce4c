"""Crash-safe file writing: write under a temporary name in the same folder, fsync, rename.

``tempfile.mkstemp`` creates its file with mode 0600 and ``mkdtemp`` its folder with 0700, whatever
the user's umask; renamed into place they would be unreadable by the user's group. ``apply_umask``
gives them the mode ``open`` would have given (0644 / 0755 under the usual umask 022).
"""

import json
import os
import tempfile
from pathlib import Path

from histossl.errors import HistosslError


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, folder: bool = False) -> None:
    """Give a file (``0o666``) or folder (``0o777``) made by ``tempfile`` the mode the umask allows."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise HistosslError(f"cannot write {path}: {err.strerror}") from None
    try:
        apply_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:  # survive a power cut, not only a killed process
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise HistosslError(f"cannot write {path}: {err.strerror}") from None


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never half of one.

    ``durable=False`` skips the fsync: still atomic if the process dies, cheaper for files rewritten
    every epoch that a power cut would only set back by an epoch.
    """
    _atomic_write(path, text.encode("utf-8"), durable)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, data)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
