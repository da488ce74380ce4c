"""Geometry of a view: random resized crops, flips and quarter turns, per sample (float and uint8)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from histossl.augment.core import _bernoulli, _uniform
from histossl.config import ViewConfig


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate each image by ``k[i] * 90`` degrees counter-clockwise (as ``torch.rot90(x[i], k[i], (-2, -1))``).

    Exact (a pixel permutation). Square images only, so that all rotations share one shape.

    Args:
        x: ``(B, C, H, W)`` with ``H == W``.
        k: int64 ``(B,)``; any integer, taken modulo 4.

    Returns:
        ``(B, C, H, W)``.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate90 needs square images, got {tuple(x.shape[-2:])}")
    k = (k % 4).view(-1, 1, 1, 1)
    out = x
    for turns in (1, 2, 3):  # three masked selects, no loop over the batch
        out = torch.where(k == turns, torch.rot90(x, turns, dims=(-2, -1)), out)
    return out


def _random_flips(x: Tensor, hflip: bool, vflip: bool, generator: torch.Generator | None) -> Tensor:
    """Exact horizontal/vertical flips, each with probability 0.5 per sample."""
    b = x.shape[0]
    if hflip:
        x = torch.where(_bernoulli(b, 0.5, x, generator).view(-1, 1, 1, 1), x.flip(-1), x)
    if vflip:
        x = torch.where(_bernoulli(b, 0.5, x, generator).view(-1, 1, 1, 1), x.flip(-2), x)
    return x


def _crop_boxes(
    x: Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> Tensor:
    """Per-sample crop boxes with torchvision's RandomResizedCrop distribution.

    torchvision tries up to 10 (area, log-aspect) draws and keeps the first that fits, falling back to a
    centre crop clipped to the ratio range. Here all 10 tries are drawn at once as ``(B, 10)`` and the
    first valid one is selected with ``argmax`` (no sync). Boxes are continuous (sub-pixel), which the
    bilinear sampler handles.

    Returns:
        ``(B, 4)`` boxes ``(x0, y0, w, h)`` in input pixels (edges, not centres).
    """
    b, _, height, width = x.shape
    tries = 10
    area = _uniform((b, tries), scale[0], scale[1], x, generator) * (height * width)
    log_ratio = _uniform((b, tries), math.log(ratio[0]), math.log(ratio[1]), x, generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    valid = (w <= width) & (h <= height)
    first = valid.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback (no try fits): the whole image, clipped to the ratio range (torchvision's centre crop).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = height * max(ratio), float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    found = valid.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    # Position uniform over where the box fits; the fallback is centred as in torchvision.
    u = torch.rand((b, 2), generator=generator, device=x.device, dtype=x.dtype)
    u = torch.where(found.unsqueeze(1), u, torch.full_like(u, 0.5))
    x0 = u[:, 0] * (width - w)
    y0 = u[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def _dihedral(x: Tensor, hflip: bool, vflip: bool, rot90: bool, generator: torch.Generator | None) -> Tensor:
    """Per-sample 2x2 matrices on normalised output coordinates for flips then rot90, ``(B, 2, 2)``.

    With a flip probability of 0.5 each and a uniform quarter turn, the 8 symmetries of the square come
    out equally likely (tissue has no canonical orientation).
    """
    b = x.shape[0]
    m = torch.eye(2, device=x.device, dtype=x.dtype).expand(b, 2, 2)
    if hflip or vflip:
        sx = torch.ones(b, device=x.device, dtype=x.dtype)
        sy = torch.ones(b, device=x.device, dtype=x.dtype)
        if hflip:
            sx = torch.where(_bernoulli(b, 0.5, x, generator), -sx, sx)
        if vflip:
            sy = torch.where(_bernoulli(b, 0.5, x, generator), -sy, sy)
        m = torch.diag_embed(torch.stack([sx, sy], dim=1))
    if rot90:
        # Counter-clockwise quarter turn k as torch.rot90: output (u, v) samples its input at R^k (u, v)
        # with R = [[0, -1], [1, 0]] (u along the width, v along the height, both in [-1, 1]).
        k = torch.randint(0, 4, (b,), generator=generator, device=x.device)
        angle = k.to(x.dtype) * (math.pi / 2)
        cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        m = m @ rot  # the flip acts on the rotated coordinates: output = rot90(flip(crop))
    return m


def _sample_boxes(x: Tensor, boxes: Tensor, size: int, linear: Tensor | None = None) -> Tensor:
    """Bilinear resample of per-sample boxes to ``size x size`` in one ``grid_sample``.

    With a full-image box this is exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``
    (half-pixel centres, border clamping), without antialiasing.

    Args:
        x: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` as ``(x0, y0, w, h)`` in input pixels.
        size: output side.
        linear: optional ``(B, 2, 2)`` applied to output coordinates first (flips, quarter turns).
    """
    b, c, height, width = x.shape
    x0, y0, w, h = boxes.unbind(1)
    # Box in the normalised [-1, 1] coordinates of grid_sample (align_corners=False: -1 is the image edge).
    centre = torch.stack([(2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1], dim=1)
    half = torch.diag_embed(torch.stack([w / width, h / height], dim=1))
    matrix = half if linear is None else half @ linear
    # The grid of F.affine_grid, built by broadcasting: one full-size add instead of its batched matmul.
    out = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # output pixel centres
    along_u = out.view(1, size, 1) * matrix[:, :, 0].unsqueeze(1) + centre.unsqueeze(1)  # (B, size, 2)
    along_v = out.view(1, size, 1) * matrix[:, :, 1].unsqueeze(1)  # (B, size, 2)
    grid = along_u.unsqueeze(1) + along_v.unsqueeze(2)  # (B, size [v], size [u], 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    x: Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random resized crop with an independent box per sample (torchvision's box distribution).

    Args:
        x: float ``(B, C, H, W)``.
        size: output side.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio ``w / h`` (sampled log-uniformly).
        generator: source of randomness on ``x``'s device.

    Returns:
        ``(B, C, size, size)``, bilinear, one ``grid_sample`` for the whole batch.
    """
    return _sample_boxes(x, _crop_boxes(x, scale, ratio, generator), size)


def _crop_uint8(x: Tensor, cfg: ViewConfig, size: int, generator: torch.Generator | None) -> Tensor:
    """Crop (or not), resize, flip and turn each image of a uint8 CPU batch; ``(B, H, W, 3)`` -> ``(B, 3, size, size)``.

    Boxes come from ``_crop_boxes`` rounded to whole pixels as torchvision's ``RandomResizedCrop``
    (``w, h = round(...)``, corner uniform over the integer positions); the resize is
    ``F.interpolate(bilinear, antialias=True)`` on the channels-last uint8 image, which torch runs with
    its SIMD uint8 kernel. Flips (probability 0.5 each) then a uniform quarter turn, as ``_dihedral``.
    torchvision's ``v2.functional.resized_crop`` gives the same pixels but took twice as long per image
    here (it changes the memory format around the same kernel), hence the direct call.
    """
    b, height, width, _ = x.shape
    shape = torch.empty((), dtype=torch.float32).expand(b, 3, height, width)  # shape and dtype for the draws
    if cfg.crop:
        boxes = _crop_boxes(shape, (cfg.crop_scale_min, cfg.crop_scale_max), (1 / cfg.crop_ratio_max, cfg.crop_ratio_max), generator)
        w = boxes[:, 2].round().clamp(1, width)
        h = boxes[:, 3].round().clamp(1, height)
        # _crop_boxes' corner is u * (side - box) for u ~ U(0, 1): whole pixels, uniform over side - box + 1 places
        x0 = (boxes[:, 0] / (width - boxes[:, 2]).clamp(min=1e-6) * (width - w + 1)).floor().clamp(max=width - w)
        y0 = (boxes[:, 1] / (height - boxes[:, 3]).clamp(min=1e-6) * (height - h + 1)).floor().clamp(max=height - h)
        crops = torch.stack([x0, y0, w, h], 1).long().tolist()
    else:
        crops = [[0, 0, width, height]] * b
    hflip = _bernoulli(b, 0.5, shape, generator).tolist() if cfg.hflip else [False] * b
    vflip = _bernoulli(b, 0.5, shape, generator).tolist() if cfg.vflip else [False] * b
    turns = torch.randint(0, 4, (b,), generator=generator).tolist() if cfg.rot90 else [0] * b
    out = torch.empty((b, 3, size, size), dtype=torch.uint8)
    planes = x.permute(0, 3, 1, 2)  # (B, 3, H, W) views of channels-last images
    for i, (x0, y0, w, h) in enumerate(crops):
        image = planes[i : i + 1, :, y0 : y0 + h, x0 : x0 + w]
        if (h, w) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        image = image[0]
        if hflip[i]:
            image = image.flip(-1)
        if vflip[i]:
            image = image.flip(-2)
        if turns[i]:
            image = torch.rot90(image, turns[i], dims=(-2, -1))
        out[i] = image
    return out


def geometry_float(x: Tensor, cfg: ViewConfig, size: int, generator: torch.Generator | None) -> Tensor:
    """The geometry of a view on a float batch ``(B, 3, H, W)``: ``(B, 3, size, size)``.

    With ``cfg.crop`` the crop, flips and quarter turns are one bilinear ``grid_sample`` with sub-pixel
    boxes; without, the image is resized to ``size`` (only if needed) and flipped/turned exactly.
    Draws in the order of ``_crop_uint8``: boxes, horizontal flips, vertical flips, quarter turns.
    """
    if cfg.crop:
        boxes = _crop_boxes(x, (cfg.crop_scale_min, cfg.crop_scale_max), (1 / cfg.crop_ratio_max, cfg.crop_ratio_max), generator)
        return _sample_boxes(x, boxes, size, _dihedral(x, cfg.hflip, cfg.vflip, cfg.rot90, generator))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = _random_flips(x, cfg.hflip, cfg.vflip, generator)
    if cfg.rot90:
        x = rotate90(x, torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device))
    return x
