"""Colour steps of a view: HED stain jitter, colour jitter and grayscale, blur, solarize.

Each step is a parameter draw (``_*_params``, per sample, through the generator) and an application of
those parameters, so that every path of ``histossl.augment.pipeline`` draws the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from histossl.augment.core import _OD_EPS, _apply_colour_matrix, _bernoulli, _constant, _selected, _uniform


def color_jitter(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Colour jitter with independent factors per sample, applied with probability ``p`` per sample.

    Factors follow torchvision's ColorJitter: brightness, contrast and saturation in
    ``[max(0, 1 - s), 1 + s]``, hue in ``[-hue, hue]`` (a fraction of a full turn). Deviations, for
    one pass over the pixels: the order is fixed (brightness, contrast, saturation, hue) instead of a
    random permutation; the hue shift is a rotation of the YIQ chroma plane instead of an HSV round
    trip; and the four are one 3x3 matrix and offset per sample (all are linear in the pixel, the
    contrast mean is one number per image), so torchvision's clamps to ``[0, 1]`` after brightness and
    contrast become one clamp at the end (a highlight that a factor above 1 pushes past 1 is no longer
    flattened before the contrast and saturation steps). Samples that are not jittered get identity
    factors, which leave them bit-exact.

    Args:
        x: float ``(B, 3, H, W)`` in ``[0, 1]``.
        brightness: strength of the brightness factor.
        contrast: strength of the contrast factor.
        saturation: strength of the saturation factor.
        hue: largest hue shift, in ``[0, 0.5]``.
        p: probability that a sample is jittered.
        generator: source of randomness on ``x``'s device.

    Returns:
        float ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    return _colour_and_grey(x, brightness, contrast, saturation, hue, p, 0.0, generator)


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample by its luma (in all 3 channels) with probability ``p``.

    Args:
        x: float ``(B, 3, H, W)``.
        p: probability per sample.
        generator: source of randomness on ``x``'s device.
    """
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, x, generator).view(-1, 1, 1, 1)
    grey = torch.einsum("bchw,c->bhw", x, _constant("luma", x)).unsqueeze(1)
    return torch.where(apply, grey.expand_as(x), x)


def solarize(x: Tensor, p: float, generator: torch.Generator | None = None, normalized: bool = False) -> Tensor:
    """Invert the pixels at or above half intensity (``v -> 1 - v`` for ``v >= 0.5``) with probability ``p``.

    BYOL (Grill et al. 2020, arXiv 2006.07733) and DINO solarize one of their views; torchvision's
    ``RandomSolarize(threshold=0.5)`` on a float image. With ``normalized`` the batch is already
    ImageNet-normalised and the threshold and the inversion are carried through the normalisation
    (a per-channel affine map), so the result equals solarizing before ``normalize``.

    Args:
        x: float ``(B, 3, H, W)``, in ``[0, 1]`` or normalised.
        p: probability per sample.
        generator: source of randomness on ``x``'s device.
        normalized: whether ``x`` is ImageNet-normalised.
    """
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, x, generator)
    if normalized:  # v = (u - mean) / std: u >= 0.5 <=> v >= (0.5 - mean) / std; 1 - u <=> (1 - 2 mean) / std - v
        return _solarize_apply(x, apply, _constant("imagenet_inv_std", x).view(1, 3, 1, 1), _constant("imagenet_shift", x).view(1, 3, 1, 1))
    return _solarize_apply(x, apply)


def _solarize_apply(x: Tensor, apply: Tensor, scale: Tensor | float = 1.0, shift: Tensor | float = 0.0) -> Tensor:
    """Solarize the samples of the ``(B,)`` gate ``apply``; ``x`` holds ``u * scale + shift`` for ``u`` in ``[0, 1]``.

    The threshold ``u >= 0.5`` and the inversion ``u -> 1 - u`` are carried through the per-channel
    affine map: ``v >= 0.5 scale + shift`` and ``v -> scale + 2 shift - v``.
    """
    threshold, mirror = 0.5 * scale + shift, scale + 2 * shift
    return torch.where(apply.view(-1, 1, 1, 1) & (x >= threshold), mirror - x, x)


def _colour_and_grey(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grey_p: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Colour jitter (see ``color_jitter``) then random grayscale, as one matrix and offset per sample.

    Brightness, contrast, saturation, hue and grayscale are each a 3x3 matrix per sample (contrast with
    a grey offset), so ``random_view`` multiplies them into one and touches the pixels once after the
    contrast mean (grayscale: every row is the luma; not applied: the identity).
    """
    matrix, offset = _colour_params(x, brightness, contrast, saturation, hue, jitter_p, grey_p, generator)
    if matrix is None:
        return x
    return _apply_colour_matrix(x, matrix, offset).clamp_(0, 1)


def _colour_params(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grey_p: float,
    generator: torch.Generator | None,
    frame: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The per-sample ``(B, 3, 3)`` matrix and ``(B, 3)`` offset of ``_colour_and_grey`` (None: identity, zero).

    ``x`` is only read for the contrast mean. ``frame``: ``(scale, shift)``, each ``(3,)``, when ``x``
    holds ``u * scale + shift`` per channel instead of ``u`` in ``[0, 1]`` (the fused uint8 path).
    """
    jitter = jitter_p > 0 and bool(brightness or contrast or saturation or hue)
    if not jitter and grey_p <= 0:
        return None, None
    b = x.shape[0]
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    luma = _constant("luma", x)
    matrix = None  # (B, 3, 3) acting on column pixels; None: the identity
    offset = None  # (B, 3) added after ``matrix``; None: zero
    if jitter:
        apply = _bernoulli(b, jitter_p, x, generator)

        def factor(strength: float) -> Tensor:
            f = _uniform((b,), max(0.0, 1 - strength), 1 + strength, x, generator)
            return torch.where(apply, f, torch.ones_like(f))

        if brightness:
            gain = factor(brightness)
            matrix = gain.view(-1, 1, 1) * eye
        if contrast:
            # Blend towards the mean grey level of each (brightened) image, as torchvision's
            # adjust_contrast: c * x + (1 - c) * mean, the mean as one offset per sample.
            c = factor(contrast)
            channel_mean = x.mean(dim=(2, 3))  # (B, 3)
            if frame is not None:
                channel_mean = (channel_mean - frame[1]) / frame[0]
            mean = channel_mean @ luma  # (B,)
            if brightness:
                mean = mean * gain
            offset = ((1 - c) * mean).view(-1, 1).expand(b, 3)
            matrix = c.view(-1, 1, 1) * (eye if matrix is None else matrix)
        if saturation:
            # Blend towards the per-pixel grey: s * I + (1 - s) * 1 luma^T.
            s = factor(saturation).view(-1, 1, 1)
            saturation_matrix = s * eye + (1 - s) * luma.view(1, 1, 3)
            matrix = saturation_matrix if matrix is None else saturation_matrix @ matrix
        if hue:
            theta = _uniform((b,), -hue, hue, x, generator) * (2 * math.pi)
            theta = torch.where(apply, theta, torch.zeros_like(theta))
            cos, sin = torch.cos(theta), torch.sin(theta)
            zero = torch.zeros_like(cos)
            # Rotation of the (I, Q) plane minus the identity, so that theta = 0 gives exactly I below.
            # Clockwise in (I, Q), so that a positive shift turns red towards yellow as torchvision's.
            rot_minus_eye = torch.stack(
                [
                    torch.stack([zero, zero, zero], -1),
                    torch.stack([zero, cos - 1, sin], -1),
                    torch.stack([zero, -sin, cos - 1], -1),
                ],
                -2,
            )
            to_yiq, from_yiq = _constant("rgb_to_yiq", x), _constant("yiq_to_rgb", x)
            hue_matrix = eye + from_yiq @ rot_minus_eye @ to_yiq
            matrix = hue_matrix if matrix is None else hue_matrix @ matrix
    if grey_p > 0:
        grey = _bernoulli(b, grey_p, x, generator).view(-1, 1, 1)
        grey_matrix = torch.where(grey, luma.view(1, 1, 3).expand(b, 3, 3), eye)
        matrix = grey_matrix if matrix is None else grey_matrix @ matrix
        # The contrast offset is grey (equal in R, G, B); saturation, hue and grayscale map grey to
        # itself (their rows sum to 1), so it passes through them unchanged.
    return matrix, offset


def gaussian_blur(
    x: Tensor, sigma_max: float, p: float, generator: torch.Generator | None = None, inplace: bool = False
) -> Tensor:
    """Gaussian blur with probability ``p`` and a per-sample sigma in ``[0.1, sigma_max]`` pixels.

    SimCLR (Chen et al. 2020, arXiv 2002.05709) draws sigma in [0.1, 2.0]; the kernel radius here is
    ``ceil(3 * sigma_max)`` for every sample (one shape for the batch). Separable: a horizontal and a
    vertical grouped convolution with one kernel per (sample, channel), on a reflect-padded image as
    torchvision's gaussian_blur. Samples that are not blurred get a unit impulse (bit-exact identity).

    Args:
        x: float ``(B, C, H, W)``.
        sigma_max: largest standard deviation in pixels (at least 0.1).
        p: probability per sample.
        generator: source of randomness on ``x``'s device.
        inplace: on a CPU, write the blurred samples into ``x`` instead of a copy.
    """
    if p <= 0 or sigma_max <= 0:
        return x
    return _blur_apply(x, _blur_params(x, sigma_max, p, generator), inplace)


def _blur_apply(x: Tensor, params: tuple[Tensor, Tensor, int], inplace: bool = False) -> Tensor:
    """``gaussian_blur`` with drawn ``_blur_params``."""
    apply, kernel, radius = params
    chosen = _selected(apply)
    if chosen is not None:  # CPU: blur only the selected samples (p = 0.2 of them by default)
        if len(chosen) == 0:
            return x
        return (x.index_copy_ if inplace else x.index_copy)(0, chosen, _separable_blur(x[chosen], kernel[chosen], radius))
    impulse = torch.zeros_like(kernel)
    impulse[:, radius] = 1
    return _separable_blur(x, torch.where(apply.view(-1, 1), kernel, impulse), radius)


def _blur_params(x: Tensor, sigma_max: float, p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
    """``gaussian_blur``'s gate ``(B,)``, normalised 1-D kernels ``(B, 2 * radius + 1)`` and radius."""
    b, _, h, w = x.shape
    sigma_max = max(sigma_max, 0.1)
    radius = min(math.ceil(3 * sigma_max), h - 1, w - 1)  # reflect padding needs radius < side
    apply = _bernoulli(b, p, x, generator)
    sigma = _uniform((b,), 0.1, sigma_max, x, generator)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma.view(-1, 1) ** 2))
    return apply, kernel / kernel.sum(dim=1, keepdim=True), radius


def _separable_blur(x: Tensor, kernel: Tensor, radius: int) -> Tensor:
    """Reflect-pad ``x`` ``(N, C, H, W)`` and convolve each sample with its 1-D ``kernel[n]`` ``(N, K)``
    along the width then the height (grouped convolutions, one group per (sample, channel))."""
    n, c, h, w = x.shape
    kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, K)
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect").view(1, n * c, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def hed_jitter(
    x: Tensor, sigma: float, bias: float, p: float, generator: torch.Generator | None = None, inplace: bool = False
) -> Tensor:
    """Stain augmentation in HED space, with probability ``p`` and independent noise per sample.

    Tellez et al. 2018, "Quantifying the effects of data augmentation and stain color normalization in
    convolutional neural networks for computational pathology" (arXiv 1808.05896): RGB -> optical
    density ``-ln(rgb)`` -> haematoxylin/eosin/DAB concentrations by colour deconvolution (Ruifrok &
    Johnston 2001, the inverse of scikit-image's ``rgb_from_hed``); H and E become ``c * alpha + beta``
    with ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)``; DAB is left alone; back to
    RGB, clamped to ``[0, 1]``. Concentrations are in natural-log optical-density units; scikit-image >=
    0.19 divides them by ``ln(1e6)``, so its ``bias`` equals about ``13.8 * bias`` here.

    Deconvolution, jitter and reconvolution are linear in optical density, so they fold into one 3x3
    matrix and offset per sample: one log, one batched matrix product, one exp. Samples that are not
    jittered get ``alpha = 1, beta = 0`` (an exact identity matrix), so on a GPU they only go through
    the log/exp round trip (float rounding; intensities below 1e-6 are raised to 1e-6); on a CPU they
    are left untouched (see ``_selected``).

    Args:
        x: float ``(B, 3, H, W)`` RGB in ``[0, 1]``.
        sigma: multiplicative noise on H and E.
        bias: additive noise on H and E (optical density).
        p: probability per sample.
        generator: source of randomness on ``x``'s device.
        inplace: on a CPU, write the jittered samples into ``x`` instead of a copy.
    """
    if p <= 0:
        return x
    return _hed_apply(x, _hed_params(x, sigma, bias, p, generator), inplace)


def _hed_apply(x: Tensor, params: tuple[Tensor, Tensor, Tensor], inplace: bool = False) -> Tensor:
    """``hed_jitter`` with drawn ``_hed_params``."""
    apply, matrix, offset = params
    chosen = _selected(apply)
    if chosen is not None:  # CPU: the log/exp round trip on the jittered samples only; the rest stay exact
        if len(chosen) == 0:
            return x
        log_rgb = x[chosen].clamp_(min=_OD_EPS).log_()
        jittered = _apply_colour_matrix(log_rgb, matrix[chosen], offset[chosen]).exp_().clamp_(max=1)
        return (x.index_copy_ if inplace else x.index_copy)(0, chosen, jittered)
    log_rgb = x.clamp(min=_OD_EPS).log_()
    return _apply_colour_matrix(log_rgb, matrix, offset).exp_().clamp_(max=1)


def _hed_params(
    x: Tensor, sigma: float, bias: float, p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``hed_jitter``'s gate ``(B,)``, and matrix ``(B, 3, 3)`` and offset ``(B, 3)`` acting on column log intensities."""
    b = x.shape[0]
    apply = _bernoulli(b, p, x, generator).view(-1, 1)
    alpha = _uniform((b, 2), 1 - sigma, 1 + sigma, x, generator)
    beta = _uniform((b, 2), -bias, bias, x, generator)
    zero = torch.zeros((b, 1), device=x.device, dtype=x.dtype)
    alpha_minus_one = torch.where(apply, torch.cat([alpha - 1, zero], dim=1), 0.0)  # DAB keeps factor 1
    beta = torch.where(apply, torch.cat([beta, zero], dim=1), 0.0)

    rgb_from_hed, hed_from_rgb = _constant("rgb_from_hed", x), _constant("hed_from_rgb", x)
    # Row vectors: OD' = (OD @ hed_from_rgb) diag(alpha) @ rgb_from_hed + beta @ rgb_from_hed
    #                  = OD @ (I + hed_from_rgb diag(alpha - 1) rgb_from_hed) + beta @ rgb_from_hed.
    # Writing the matrix as I + ... keeps alpha = 1 exactly the identity. With log(rgb) = -OD the same
    # matrix acts on log intensities and the offset changes sign; transposed for column pixels.
    row_matrix = torch.eye(3, device=x.device, dtype=x.dtype) + hed_from_rgb @ (
        alpha_minus_one.unsqueeze(-1) * rgb_from_hed
    )
    offset = -(beta @ rgb_from_hed)  # (B, 3)
    return apply.view(-1), row_matrix.transpose(1, 2), offset
