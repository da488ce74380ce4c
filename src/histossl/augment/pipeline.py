"""The view pipeline, described once: ``PIPELINE`` lists the pixel steps after the geometry, in order.

A view is the geometry (random resized crop, flips, quarter turns; ``geometry.py``) followed by the
steps of ``PIPELINE``. Each ``Step`` has one parameter draw (per sample, through the generator) and
two applications of those parameters: ``apply`` on a float batch in ``[0, 1]`` (any device) and
``fused`` on the uint8 CPU path's buffer, which holds ``u * scale + shift`` per channel (a ``Frame``)
so that the division by 255 and the ImageNet normalisation fold into the colour matrix instead of
costing passes of their own. Both paths walk the same tuple, so they draw the same numbers in the same
order and agree up to float rounding (``tests/test_augment.py``); RotNet+Jitter runs the same steps on
its rotated copies (``apply_steps``).

The stain jitter comes before the colour jitter because colour deconvolution assumes the real stain
colours of the slide, which a hue shift would no longer have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from histossl.augment.colour import (
    _blur_apply,
    _blur_params,
    _colour_params,
    _hed_apply,
    _hed_params,
    _separable_blur,
    _solarize_apply,
)
from histossl.augment.core import _OD_EPS, _TABLES, _apply_colour_matrix, _bernoulli
from histossl.config import ViewConfig


@dataclass(frozen=True)
class Frame:
    """What the fused path's buffer holds: ``u * scale + shift`` per channel, ``u`` the image in ``[0, 1]``."""

    scale: tuple[float, float, float]
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def column(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``scale`` and ``shift`` as ``(1, 3, 1)`` tensors on ``x``'s device."""
        return (torch.tensor(self.scale, dtype=x.dtype).view(1, 3, 1), torch.tensor(self.shift, dtype=x.dtype).view(1, 3, 1))


UNIT = Frame((1.0, 1.0, 1.0))
BYTES = Frame((255.0, 255.0, 255.0))  # the uint8 crop copied to float, before any division
NORMALIZED = Frame(tuple(_TABLES["imagenet_inv_std"].tolist()), tuple(_TABLES["imagenet_shift"].tolist()))


@dataclass(frozen=True)
class Step:
    """One pixel step: its parameter draw and its float and fused applications.

    ``draw(x, cfg, generator, frame)`` returns the step's parameters, or None when the config switches
    it off (nothing is drawn then). ``apply(x, params, inplace)`` returns the float batch with the step
    applied (into ``x`` when ``inplace``). ``fused(planes, params, frame, target)`` works in place on
    the fused path's ``(B, 3, H * W)`` planes and returns their new frame.
    """

    name: str
    draw: Callable[[Tensor, ViewConfig, torch.Generator | None, Frame], Any]
    apply: Callable[[Tensor, Any, bool], Tensor]
    fused: Callable[[Tensor, Any, Frame, Frame], Frame]


def convert(planes: Tensor, frame: Frame, target: Frame) -> Frame:
    """Rewrite ``planes`` (in place) from ``frame`` to ``target``; returns ``target``."""
    if frame == target:
        return target
    if frame == BYTES and target == UNIT:  # exactly to_float's division
        planes.div_(255.0)
        return target
    (scale, shift), (new_scale, new_shift) = frame.column(planes), target.column(planes)
    ratio = new_scale / scale
    torch.addcmul(new_shift - shift * ratio, planes, ratio, out=planes)
    return target


# -- HED stain jitter --------------------------------------------------------------------------


def _hed_draw(x: Tensor, cfg: ViewConfig, generator: torch.Generator | None, frame: Frame) -> Any:
    if cfg.hed_jitter_prob <= 0:
        return None
    return _hed_params(x, cfg.hed_jitter_sigma, cfg.hed_jitter_bias, cfg.hed_jitter_prob, generator)


def _hed_fused(planes: Tensor, params: Any, frame: Frame, target: Frame) -> Frame:
    """On log intensities of the ``scale`` frame: ``log(v / s) = log(v) - c``, so ``M (l - c) + o + c = M l + o + c - M c``."""
    apply, matrix, offset = params
    if any(frame.shift) or len(set(frame.scale)) > 1:  # the log needs one scale and no shift
        frame = convert(planes, frame, UNIT)
    s = frame.scale[0]
    c = math.log(s)
    offset = offset + c * (1 - matrix.sum(dim=2))
    chosen = apply.nonzero().squeeze(1)
    if len(chosen):
        log_rgb = planes[chosen].clamp_(min=_OD_EPS * s).log_()
        jittered = torch.baddbmm(offset[chosen].unsqueeze(-1), matrix[chosen], log_rgb).exp_().clamp_(max=s)
        planes.index_copy_(0, chosen, jittered)
    return frame


# -- colour jitter and grayscale ---------------------------------------------------------------


def _colour_draw(x: Tensor, cfg: ViewConfig, generator: torch.Generator | None, frame: Frame) -> Any:
    scale_shift = None if frame == UNIT else tuple(t.view(3) for t in frame.column(x))
    matrix, offset = _colour_params(
        x,
        cfg.color_jitter_brightness,
        cfg.color_jitter_contrast,
        cfg.color_jitter_saturation,
        cfg.color_jitter_hue,
        cfg.color_jitter_prob,
        cfg.grayscale_prob,
        generator,
        frame=scale_shift,
    )
    return None if matrix is None else (matrix, offset)


def _colour_apply(x: Tensor, params: Any, inplace: bool) -> Tensor:
    matrix, offset = params
    return _apply_colour_matrix(x, matrix, offset).clamp_(0, 1)


def _colour_fused(planes: Tensor, params: Any, frame: Frame, target: Frame) -> Frame:
    """``target``-frame output of ``clamp(M u + o, 0, 1)`` with ``u = (v - shift) / scale``: one product, one clamp.

    ``y = t_s (M (v - s_h) / s + o) + t_h``, clamped to ``[t_h, t_s + t_h]`` (the image of ``[0, 1]``).
    """
    matrix, offset = params
    (scale, shift), (new_scale, new_shift) = frame.column(planes), target.column(planes)
    b = planes.shape[0]
    offset = offset if offset is not None else torch.zeros(b, 3)
    if any(frame.shift):
        offset = offset - (matrix @ (shift / scale).view(3, 1)).squeeze(-1)
    mixed = torch.baddbmm(offset.unsqueeze(-1) * new_scale + new_shift, matrix * new_scale / scale.view(1, 1, 3), planes)
    low, high = target.shift, [s + h for s, h in zip(target.scale, target.shift)]
    for c in range(3):  # scalar bounds: twice as fast as one clamp with (1, 3, 1) bound tensors
        torch.clamp(mixed[:, c], min=low[c], max=high[c], out=planes[:, c])
    return target


# -- blur ----------------------------------------------------------------------------------------


def _blur_draw(x: Tensor, cfg: ViewConfig, generator: torch.Generator | None, frame: Frame) -> Any:
    if cfg.blur_prob <= 0 or cfg.blur_sigma_max <= 0:
        return None
    return _blur_params(x, cfg.blur_sigma_max, cfg.blur_prob, generator)


def _blur_fused(planes: Tensor, params: Any, frame: Frame, target: Frame) -> Frame:
    """Blur in any frame: it commutes with a per-channel affine map (each kernel sums to 1)."""
    apply, kernel, radius = params
    chosen = apply.nonzero().squeeze(1)
    if len(chosen):
        side = math.isqrt(planes.shape[2])
        images = planes.view(planes.shape[0], 3, side, side)
        images.index_copy_(0, chosen, _separable_blur(images[chosen], kernel[chosen], radius))
    return frame


# -- solarize ------------------------------------------------------------------------------------


def _solarize_draw(x: Tensor, cfg: ViewConfig, generator: torch.Generator | None, frame: Frame) -> Any:
    return _bernoulli(x.shape[0], cfg.solarize_prob, x, generator) if cfg.solarize_prob > 0 else None


def _solarize_fused(planes: Tensor, params: Any, frame: Frame, target: Frame) -> Frame:
    scale, shift = frame.column(planes)
    planes.copy_(_solarize_apply(planes.unsqueeze(-1), params, scale.unsqueeze(-1), shift.unsqueeze(-1)).squeeze(-1))
    return frame


HED_JITTER = Step("hed_jitter", _hed_draw, _hed_apply, _hed_fused)
COLOUR = Step("colour", _colour_draw, _colour_apply, _colour_fused)  # colour jitter then grayscale, one matrix
BLUR = Step("blur", _blur_draw, _blur_apply, _blur_fused)
SOLARIZE = Step("solarize", _solarize_draw, lambda x, gate, inplace: _solarize_apply(x, gate), _solarize_fused)

# The order every path follows, after the geometry.
PIPELINE: tuple[Step, ...] = (HED_JITTER, COLOUR, BLUR, SOLARIZE)


def apply_steps(
    x: Tensor,
    cfg: ViewConfig,
    generator: torch.Generator | None = None,
    steps: tuple[Step, ...] = PIPELINE,
    inplace: bool = False,
) -> Tensor:
    """The pixel steps of a view on a float batch ``(B, 3, H, W)`` in ``[0, 1]``, drawn per sample.

    Args:
        x: float ``(B, 3, H, W)`` in ``[0, 1]``.
        cfg: which steps are on and their strengths.
        generator: source of randomness on ``x``'s device.
        steps: the steps, in order (``PIPELINE`` unless a test reorders them).
        inplace: ``x`` may be overwritten (the caller owns it).
    """
    with torch.autocast(x.device.type, enabled=False):  # pixels in x's precision, also inside a bf16-mixed training step
        for step in steps:
            params = step.draw(x, cfg, generator, UNIT)
            if params is not None:
                y = step.apply(x, params, inplace)
                inplace, x = inplace or y is not x, y
    return x


def apply_steps_fused(
    buf: Tensor, cfg: ViewConfig, generator: torch.Generator | None, normalized: bool, steps: tuple[Step, ...] = PIPELINE
) -> Tensor:
    """``apply_steps`` then (if ``normalized``) ``normalize``, on a CPU buffer holding 0..255, in place.

    Equal to the float path with the same draws up to float rounding (tested). Processing the
    stain-jittered images one by one in place instead of gathering them was 5% faster at 224 px and
    27% slower at 48 px (measured), so they are gathered.
    """
    planes, frame = buf.view(buf.shape[0], 3, -1), BYTES
    target = NORMALIZED if normalized else UNIT
    for step in steps:
        params = step.draw(buf, cfg, generator, frame)
        if params is not None:
            frame = step.fused(planes, params, frame, target)
    convert(planes, frame, target)
    return buf
