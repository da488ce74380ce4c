"""Milliseconds per ``augment.random_view`` of a uint8 batch, alone (no model, no loader).

    python benchmarks/views_speed.py                      # 128 images, 64 and 224 px, default views
    python benchmarks/views_speed.py --sizes 224 --views 2 --repeats 7

``--views 2`` draws two views per image in one call (SimCLR's ``draw_views``); the output memory is
a ``ViewBuffer`` reused across calls, as in training. Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl import augment  # noqa: E402
from histossl.config import ViewConfig  # noqa: E402


def time_views(batch: int, size: int, views: int, repeats: int, device: str) -> float:
    """Mean milliseconds per call after 3 warm-up calls."""
    images = torch.randint(0, 256, (batch * views, size, size, 3), dtype=torch.uint8, device=device)
    generator, buffer, cfg = torch.Generator(device=device).manual_seed(0), augment.ViewBuffer(), ViewConfig()
    for _ in range(3):
        augment.random_view(images, cfg, size, generator, normalized=True, out=buffer)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        augment.random_view(images, cfg, size, generator, normalized=True, out=buffer)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="source images per call")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--views", type=int, default=1, help="views per image, drawn in one call")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for size in args.sizes:
        ms = time_views(args.batch, size, args.views, args.repeats, device)
        print(f"random_view B={args.batch}x{args.views} {size}px on {device} ({torch.get_num_threads()} threads): {ms:.1f} ms")


if __name__ == "__main__":
    main()
