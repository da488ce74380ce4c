"""Shared pieces of the view pipeline: constants, layout conversion, normalisation and per-sample draws."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R BT.601 luma, the weights of torchvision's rgb_to_grayscale (used by its saturation/contrast too).
_LUMA = (0.299, 0.587, 0.114)

# RGB -> YIQ (NTSC). A hue shift is a rotation of the (I, Q) chroma plane, a 3x3 matrix per sample,
# which replaces torchvision's HSV round trip (not batched over per-sample factors).
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)

# Stain optical-density vectors of haematoxylin, eosin and DAB (rows), in RGB: scikit-image's
# ``rgb_from_hed`` (Ruifrok & Johnston 2001, "Quantification of histochemical staining by colour
# deconvolution"). Row-vector convention: OD_rgb = C_hed @ RGB_FROM_HED.
_RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
# Floor on intensities before the log, as in scikit-image's separate_stains.
_OD_EPS = 1e-6

# Host copies (float64, inverses computed once); ``_constant`` moves them to a device once.
_TABLES = {
    "imagenet_mean": torch.tensor(IMAGENET_MEAN, dtype=torch.float64),
    "imagenet_std": torch.tensor(IMAGENET_STD, dtype=torch.float64),
    # normalize as one fused pass, x * (1 / std) + (-mean / std)
    "imagenet_inv_std": 1 / torch.tensor(IMAGENET_STD, dtype=torch.float64),
    "imagenet_shift": -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / torch.tensor(IMAGENET_STD, dtype=torch.float64),
    "luma": torch.tensor(_LUMA, dtype=torch.float64),
    "rgb_to_yiq": torch.tensor(_RGB_TO_YIQ, dtype=torch.float64),
    "yiq_to_rgb": torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)),
    "rgb_from_hed": torch.tensor(_RGB_FROM_HED, dtype=torch.float64),
    "hed_from_rgb": torch.linalg.inv(torch.tensor(_RGB_FROM_HED, dtype=torch.float64)),
}


def to_float(batch: Tensor) -> Tensor:
    """Cache batch to network layout.

    Args:
        batch: uint8 ``(B, H, W, 3)``.

    Returns:
        float32 ``(B, 3, H, W)`` in ``[0, 1]``, contiguous, on the same device.
    """
    out = torch.empty((batch.shape[0], 3, *batch.shape[1:3]), dtype=torch.float32, device=batch.device)
    return out.copy_(batch.permute(0, 3, 1, 2)).div_(255.0)  # two passes, no strided float copy


def normalize(x: Tensor, out: Tensor | None = None) -> Tensor:
    """ImageNet mean/std normalisation of a float ``(B, 3, H, W)`` batch in ``[0, 1]`` (one pass, into ``out`` if given)."""
    scale = _constant("imagenet_inv_std", x).view(1, 3, 1, 1)
    shift = _constant("imagenet_shift", x).view(1, 3, 1, 1)
    return torch.addcmul(shift, x, scale, out=out) if out is not None else torch.addcmul(shift, x, scale)


def _constant(name: str, x: Tensor) -> Tensor:
    """A constant of ``_TABLES`` on ``x``'s device and dtype.

    Cached per device: a fresh host-to-GPU copy from pageable memory on every call would synchronise
    the stream each time.
    """
    return _cached_constant(name, x.device, x.dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _TABLES[name].to(device=device, dtype=dtype)


def _uniform(shape: tuple[int, ...], low: float, high: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(low, high) of ``shape`` on ``x``'s device, drawn through ``generator``."""
    return torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) * (high - low) + low


def _bernoulli(batch: int, p: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Boolean ``(batch,)`` gate, True with probability ``p`` per sample."""
    return torch.rand((batch,), generator=generator, device=x.device) < p


def _selected(apply: Tensor) -> Tensor | None:
    """Indices of the samples a ``(B,)`` gate selects when the batch is on a CPU, else None.

    On a CPU reading the gate is free (no device to wait for), so an op applied with probability p
    runs on the selected samples only, which leaves the others bit-exact and saves ``1 - p`` of its
    work; on a GPU the masked form is kept, so a step stays free of host syncs.
    """
    return apply.nonzero().squeeze(1) if apply.device.type == "cpu" else None


def _apply_colour_matrix(x: Tensor, matrix: Tensor, offset: Tensor | None = None) -> Tensor:
    """``y[b, c] = sum_d matrix[b, c, d] * x[b, d] (+ offset[b, c])`` per pixel.

    Args:
        x: ``(B, 3, H, W)``.
        matrix: ``(B, 3, 3)``.
        offset: optional ``(B, 3)``.
    """
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    y = torch.bmm(matrix, flat) if offset is None else torch.baddbmm(offset.unsqueeze(-1), matrix, flat)
    return y.view(b, c, h, w)
