"""``random_view``: one view per image of a batch, and the output memory the caller keeps for it."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from histossl.augment.core import normalize, to_float
from histossl.augment.geometry import _crop_uint8, geometry_float
from histossl.augment.pipeline import PIPELINE, Step, apply_steps, apply_steps_fused
from histossl.config import ViewConfig

# Bytes of float planes per chunk on a CPU (32 images at 224 px, 19 MB). Measured on 2 cores at 224 px
# (docs/benchmarks/throughput.md): 4 images 274, 8 images 330, 16 images 382-404, 32 images 449-482, 64
# images 433 and 128 images 358 source images/s. Small chunks pay the per-chunk parameter draws and
# Python work under the GIL too often; a chunk's temporaries stay below glibc's largest mmap threshold
# (32 MB), so after the first batch they come from the heap without page faults.
_CPU_CHUNK_BYTES = 32 * 3 * 224 * 224 * 4


class ViewBuffer:
    """CPU memory for ``random_view``'s output, owned by the caller and reused across batches.

    A fresh tensor of 128 views at 224 px is 77 MB, which the C allocator maps from the system and
    returns to it on free, so every batch paid for fresh pages before its first pass (allocating and
    filling 77 MB took 36 ms here, 15 ms with transparent huge pages); a GPU has torch's caching
    allocator for this. The buffer has two slots used in turn, so the views of one call stay valid
    through the next call with the same buffer and are overwritten by the call after that: a training
    step's views (its backward pass included) are done with by then. A caller that keeps views longer
    clones them or passes no buffer. One buffer per call site (a method with two different view specs
    holds two); a slot is reallocated when the shape, dtype or inference mode changes.
    """

    def __init__(self, slots: int = 2) -> None:
        self._slots: list[Tensor | None] = [None] * slots
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The next slot as an uninitialised ``shape`` tensor (a new tensor object on the slot's memory)."""
        slot = self._slots[self._next]
        if slot is None or slot.shape != shape or slot.dtype != dtype or slot.is_inference() != torch.is_inference_mode_enabled():
            slot = self._slots[self._next] = torch.empty(shape, dtype=dtype)
        self._next = (self._next + 1) % len(self._slots)
        return slot.view(shape)


def random_view(
    x: Tensor,
    cfg: ViewConfig,
    size: int,
    generator: torch.Generator | None = None,
    normalized: bool = False,
    out: ViewBuffer | None = None,
    steps: tuple[Step, ...] = PIPELINE,
) -> Tensor:
    """One random view per image, every parameter drawn independently per sample.

    The geometry (random resized crop with flips and quarter turns; with ``cfg.crop`` off a resize and
    exact flips and turns), then the steps of ``pipeline.PIPELINE`` in order: HED stain jitter, colour
    jitter and grayscale, blur, solarize.

    On a GPU the whole batch goes through each op at once. On a CPU the batch is processed in chunks
    of up to ``_CPU_CHUNK_BYTES``, spread over ``torch.get_num_threads()`` threads (torch releases the
    GIL), each chunk with its own generator seeded in order from ``generator``, into ``out`` when
    given; a uint8 batch is cropped per image with whole-pixel boxes and torch's uint8 (SIMD) bilinear
    resize with antialiasing (torchvision's ``RandomResizedCrop`` of a uint8 tensor, the same box
    distribution), then goes through the fused form of the same steps (``apply_steps_fused``).

    Args:
        x: a uint8 cache batch ``(B, H, W, 3)``, or float ``(B, 3, H, W)`` in ``[0, 1]``.
        cfg: which ops are on and their strengths; a probability of 0 or ``False`` skips the op.
        size: output side.
        generator: source of randomness on ``x``'s device.
        normalized: apply ``normalize`` (ImageNet mean and std) to the view.
        out: on a CPU, the caller's ``ViewBuffer`` to write into (reused across batches); ignored on a GPU.
        steps: the pixel steps after the geometry, in order (``()``: geometry only).

    Returns:
        float ``(B, 3, size, size)``; in ``[0, 1]`` unless ``normalized``.
    """
    if x.device.type != "cpu":
        return _view(x if x.is_floating_point() else to_float(x), cfg, size, generator, normalized, steps)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    shape = (x.shape[0], 3, size, size)
    result = out.take(shape, dtype) if out is not None else torch.empty(shape, dtype=dtype)
    workers = torch.get_num_threads()
    fits = max(1, _CPU_CHUNK_BYTES // (3 * size * size * 4))
    step = min(fits, -(-x.shape[0] // workers))  # at least one chunk per thread
    starts = range(0, x.shape[0], step)
    # One generator per chunk, seeded in order from ``generator``: the same views for the same seed and threads.
    seeds = torch.randint(0, 2**62, (len(starts),), generator=generator).tolist()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def chunk(start: int, seed: int) -> None:
        with torch.set_grad_enabled(grad), torch.inference_mode(inference):  # both are per thread
            part = slice(start, start + step)
            _view(x[part], cfg, size, torch.Generator().manual_seed(seed), normalized, steps, result[part])

    if workers > 1 and len(starts) > 1:  # chunks on all cores: each op of a small chunk barely parallelises
        list(_thread_pool(workers).map(chunk, starts, seeds))
    else:
        for start, seed in zip(starts, seeds):
            chunk(start, seed)
    return result


@functools.lru_cache(maxsize=4)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="histossl-views")


def _view(
    x: Tensor,
    cfg: ViewConfig,
    size: int,
    generator: torch.Generator | None,
    normalized: bool,
    steps: tuple[Step, ...],
    out: Tensor | None = None,
) -> Tensor:
    """``random_view`` of one batch (GPU) or chunk (CPU, written into ``out``)."""
    if not x.is_floating_point():  # uint8 (B, H, W, 3), CPU: the crop copied into the output, then fused steps
        buf = torch.empty((x.shape[0], 3, size, size)) if out is None else out
        buf.copy_(_crop_uint8(x, cfg, size, generator))  # 0..255
        return apply_steps_fused(buf, cfg, generator, normalized, steps)
    view = geometry_float(x, cfg, size, generator)
    view = apply_steps(view, cfg, generator, steps, inplace=view is not x)  # a new tensor: the steps may write into it
    if normalized:
        return normalize(view, out=out)
    return view if out is None else out.copy_(view)
