"""Where a number came from: the machine, the library versions and each command that worked on a study.

Every ``histossl study``/``pretrain``/``evaluate`` appends two lines to ``OUT/invocations.jsonl``: one
when it starts (command, machine, versions) and one when it ends (exit status, wall time). A start
without an end is a process that was killed (or is still running). The report lists them, so a
study resumed across sessions or machines shows each part and its cost.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from histossl import __version__, records

INVOCATIONS = "invocations.jsonl"
_command: list[str] | None = None  # the CLI's arguments (``set_command``); None: ``sys.argv[1:]``


def set_command(argv: list[str]) -> None:
    """Remember the arguments of this ``histossl`` command (the CLI calls it; tests pass their own argv)."""
    global _command
    _command = list(argv)


@lru_cache(maxsize=1)
def machine() -> str:
    """``NVIDIA H100 80GB HBM3 x1`` or ``CPU AMD EPYC, 2 cores, 2 torch threads``: what trained the models."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return ", ".join(f"{name} x{names.count(name)}" for name in dict.fromkeys(names))
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers, and histossl's git commit if any."""
    import lightly
    import pytorch_lightning
    import torch
    import torchvision

    found = {
        "histossl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "lightly": lightly.__version__,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        source = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            found["histossl_commit"] = commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    return found


def record_fields() -> dict[str, str]:
    """The provenance fields every results.jsonl record carries."""
    v = versions()
    return {"device": machine(), "torch_version": v["torch"], "histossl_version": v.get("histossl_commit", v["histossl"])}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def invocation(out: Path) -> Iterator[None]:
    """Log this command's start and end in ``OUT/invocations.jsonl`` (call it inside the study lock)."""
    ident = uuid.uuid4().hex[:12]
    command = shlex.join(["histossl", *(sys.argv[1:] if _command is None else _command)])
    path = Path(out) / INVOCATIONS
    records.append(path, {"id": ident, "event": "start", "time": _now(), "command": command, "machine": machine(), "versions": versions()})
    start = time.monotonic()
    status = "interrupted"
    try:
        yield
        status = "finished"
    except Exception as err:
        status = f"failed: {type(err).__name__}"
        raise
    finally:
        with contextlib.suppress(Exception):  # a full disk must not hide the original error
            records.append(path, {"id": ident, "event": "end", "time": _now(), "status": status, "wall_s": round(time.monotonic() - start, 1)})


def load(out: Path) -> list[dict]:
    """One dict per command: start fields plus ``status`` and ``wall_s`` (``None`` when it never ended)."""
    runs: dict[str, dict] = {}
    for line in records.load(Path(out) / INVOCATIONS, repair=False):
        ident = line.get("id")
        if line.get("event") == "start":
            runs[ident] = {**line, "status": None, "wall_s": None}
        elif line.get("event") == "end" and ident in runs:
            runs[ident].update(status=line.get("status"), wall_s=line.get("wall_s"), end=line.get("time"))
    return list(runs.values())
