"""Batched augmentation on the training device, with independent random parameters per image.

Images arrive from the decoded uint8 cache as whole batches. Every op here works on a float batch
``(B, 3, H, W)`` in ``[0, 1]`` with tensor ops only: parameters are drawn per sample as ``(B, ...)``
tensors, probability gates are masks (or identity parameters), and on a GPU there is no Python loop
over the batch and no host sync (no ``.item()``, no branching on tensor values). The only Python
branches look at Python numbers from the config: an op that is switched off (probability 0, strength
0, ``False``) is skipped and costs nothing. On a CPU, where reading a tensor costs nothing, three
things differ (see ``random_view``): the batch is processed in chunks on all threads, uint8 images
are cropped per image by torch's SIMD uint8 resize and go through a fused version of the same ops
(``_view_uint8``), and an op applied with probability p runs on the selected samples only.

torchvision's v2 transforms draw one parameter set per call (one crop, one jitter for the whole batch);
SimCLR needs two independent views per image and RotNet+Jitter a different jitter per rotated copy,
so the per-sample parameter logic is written here and the pixel work is done by batched primitives
(one ``grid_sample``, batched 3x3 colour matrices, grouped convolution).

Every random draw goes through ``generator`` when one is given (a ``torch.Generator`` on the batch's
device), so a view is reproducible from a seed.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from histossl.config import ViewConfig

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


# ----------------------------------------------------------------------------------------------
# Conversion


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


# ----------------------------------------------------------------------------------------------
# Geometry


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


# ----------------------------------------------------------------------------------------------
# Colour


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
    apply = _bernoulli(x.shape[0], p, x, generator).view(-1, 1, 1, 1)
    if normalized:  # v = (u - mean) / std: u >= 0.5 <=> v >= (0.5 - mean) / std; 1 - u <=> (1 - 2 mean) / std - v
        inv_std, shift = _constant("imagenet_inv_std", x).view(1, 3, 1, 1), _constant("imagenet_shift", x).view(1, 3, 1, 1)
        threshold, mirror = 0.5 * inv_std + shift, inv_std + 2 * shift
    else:
        threshold, mirror = 0.5, 1.0
    return torch.where(apply & (x >= threshold), mirror - x, x)


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
    x_scale: float = 1.0,
) -> tuple[Tensor | None, Tensor | None]:
    """The per-sample ``(B, 3, 3)`` matrix and ``(B, 3)`` offset of ``_colour_and_grey`` (None: identity, zero).

    ``x`` is only read for the contrast mean, as ``x * x_scale`` (the fused uint8 path keeps 0..255).
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
            mean = x.mean(dim=(2, 3)) @ luma * x_scale  # (B,)
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
    apply, kernel, radius = _blur_params(x, sigma_max, p, generator)
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
    apply, matrix, offset = _hed_params(x, sigma, bias, p, generator)
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


# ----------------------------------------------------------------------------------------------
# A whole view


# Bytes of float planes per chunk on a CPU (32 images at 224 px, 19 MB). Measured on 2 cores at 224 px
# (benchmarks/throughput.md): 4 images 274, 8 images 330, 16 images 382-404, 32 images 449-482, 64
# images 433 and 128 images 358 source images/s. Small chunks pay the per-chunk parameter draws and
# Python work under the GIL too often; a chunk's temporaries stay below glibc's largest mmap threshold
# (32 MB), so after the first batch they come from the heap without page faults.
_CPU_CHUNK_BYTES = 32 * 3 * 224 * 224 * 4


def random_view(
    x: Tensor, cfg: ViewConfig, size: int, generator: torch.Generator | None = None, normalized: bool = False
) -> Tensor:
    """One random view per image, every parameter drawn independently per sample.

    Order: random resized crop with flips and quarter turns, then HED stain jitter, colour jitter,
    grayscale, blur and solarize. The stain jitter comes before the colour jitter because colour deconvolution
    assumes the real stain colours of the slide, which a hue shift would no longer have. With
    ``cfg.crop`` off the image is resized to ``size`` (only if needed) and flipped/rotated exactly.

    On a GPU the whole batch goes through each op at once; the crop, flips and quarter turns are one
    bilinear ``grid_sample`` with sub-pixel boxes. On a CPU the batch is processed in chunks of up to
    ``_CPU_CHUNK_BYTES``, spread over ``torch.get_num_threads()`` threads (torch releases the GIL), each
    chunk with its own generator seeded in order from ``generator``, into an output buffer reused
    across batches (``_output``); a uint8 batch is cropped per image with whole-pixel boxes and torch's
    uint8 (SIMD) bilinear resize with antialiasing, then converted to float: torchvision's
    ``RandomResizedCrop`` of a uint8 tensor, without a float pass over the full-size image. Both draw
    the boxes from the same distribution.

    Args:
        x: a uint8 cache batch ``(B, H, W, 3)``, or float ``(B, 3, H, W)`` in ``[0, 1]``.
        cfg: which ops are on and their strengths; a probability of 0 or ``False`` skips the op.
        size: output side.
        generator: source of randomness on ``x``'s device.
        normalized: apply ``normalize`` (ImageNet mean and std) to the view.

    Returns:
        float ``(B, 3, size, size)``; in ``[0, 1]`` unless ``normalized``.
    """
    if x.device.type != "cpu":
        return _view(x if x.is_floating_point() else to_float(x), cfg, size, generator, normalized)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    out = _output((x.shape[0], 3, size, size), dtype)
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
            _view(x[part], cfg, size, torch.Generator().manual_seed(seed), normalized, out[part])

    if workers > 1 and len(starts) > 1:  # chunks on all cores: each op of a small chunk barely parallelises
        list(_thread_pool(workers).map(chunk, starts, seeds))
    else:
        for start, seed in zip(starts, seeds):
            chunk(start, seed)
    return out


# The last CPU output buffers, by (shape, dtype, inference mode): (tensor, storage use count when unshared).
_buffers: dict[tuple, tuple[Tensor, int]] = {}
_buffers_lock = threading.Lock()


def _output(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor for ``random_view``'s output, reusing the last one when nobody holds it.

    A fresh tensor of 128 views at 224 px is 77 MB, which the C allocator maps from the system and
    returns to it on free, so every batch paid for fresh pages before its first pass (allocating and
    filling 77 MB took 36 ms here, 15 ms with transparent huge pages); a GPU has torch's caching
    allocator for this. The buffer is reused only when no tensor but the
    cached one shares its storage (the caller dropped the last views and autograd is done with them),
    and at most two are kept.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a private API: without it, allocate every time
        return torch.empty(shape, dtype=dtype)
    key = (shape, dtype, torch.is_inference_mode_enabled())
    with _buffers_lock:
        cached = _buffers.get(key)
        if cached is None or use_count(cached[0].untyped_storage()._cdata) != cached[1]:
            buffer = torch.empty(shape, dtype=dtype)
            cached = _buffers[key] = (buffer, use_count(buffer.untyped_storage()._cdata))
            while len(_buffers) > 2:
                del _buffers[next(iter(_buffers))]
        return cached[0].view(shape)  # a new tensor on the storage: holding it marks the buffer as taken


@functools.lru_cache(maxsize=4)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="histossl-views")


def _view(
    x: Tensor, cfg: ViewConfig, size: int, generator: torch.Generator | None, normalized: bool, out: Tensor | None = None
) -> Tensor:
    """``random_view`` of one batch (GPU) or chunk (CPU, written into ``out``)."""
    if not x.is_floating_point():  # uint8 (B, H, W, 3), CPU
        return _view_uint8(x, cfg, size, generator, normalized, out)
    source = x
    if cfg.crop:
        boxes = _crop_boxes(x, (cfg.crop_scale_min, cfg.crop_scale_max), (1 / cfg.crop_ratio_max, cfg.crop_ratio_max), generator)
        x = _sample_boxes(x, boxes, size, _dihedral(x, cfg.hflip, cfg.vflip, cfg.rot90, generator))
    else:
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = _random_flips(x, cfg.hflip, cfg.vflip, generator)
        if cfg.rot90:
            x = rotate90(x, torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device))
    own = x is not source  # a new tensor: the steps below may write into it
    x = hed_jitter(x, cfg.hed_jitter_sigma, cfg.hed_jitter_bias, cfg.hed_jitter_prob, generator, inplace=own)
    x = _colour_and_grey(
        x,
        cfg.color_jitter_brightness,
        cfg.color_jitter_contrast,
        cfg.color_jitter_saturation,
        cfg.color_jitter_hue,
        cfg.color_jitter_prob,
        cfg.grayscale_prob,
        generator,
    )
    x = gaussian_blur(x, cfg.blur_sigma_max, cfg.blur_prob, generator, inplace=own)
    x = solarize(x, cfg.solarize_prob, generator)
    if normalized:
        return normalize(x, out=out)
    return x if out is None else out.copy_(x)


def _view_uint8(
    x: Tensor, cfg: ViewConfig, size: int, generator: torch.Generator | None, normalized: bool, out: Tensor | None
) -> Tensor:
    """``_view`` of a uint8 CPU chunk, fused: the same draws and the same ops as the float path, fewer passes.

    The crop is ``_crop_uint8``, copied into the output; the float copy keeps the 0..255 scale, so
    the division by 255 and the normalisation fold into the per-sample colour matrix (one matrix
    product and one clamp, with the bounds of ``[0, 1]`` carried through the normalisation), and the
    stain jitter's log intensities take ``log 255`` into its offset. Blur comes after the
    normalisation, with which it commutes (a per-channel affine map; each kernel sums to 1). Equal to
    ``hed_jitter``, ``_colour_and_grey``, ``gaussian_blur`` and ``normalize`` in turn, with the same
    draws, up to float rounding (tested). Processing the stain-jittered images one by one in place
    instead of gathering them was 5% faster at 224 px and 27% slower at 48 px (measured), so they are
    gathered.
    """
    buf = torch.empty((x.shape[0], 3, size, size)) if out is None else out
    buf.copy_(_crop_uint8(x, cfg, size, generator))  # 0..255
    b, planes = buf.shape[0], buf.view(buf.shape[0], 3, size * size)
    if cfg.hed_jitter_prob > 0:
        apply, matrix, offset = _hed_params(buf, cfg.hed_jitter_sigma, cfg.hed_jitter_bias, cfg.hed_jitter_prob, generator)
        # On log intensities of the 0..255 scale: log(v / 255) = log(v) - c, so M (l - c) + o + c = M l + o + c (1 - M 1).
        c = math.log(255.0)
        offset = offset + c * (1 - matrix.sum(dim=2))
        chosen = apply.nonzero().squeeze(1)
        if len(chosen):
            log_rgb = planes[chosen].clamp_(min=_OD_EPS * 255).log_()
            jittered = torch.baddbmm(offset[chosen].unsqueeze(-1), matrix[chosen], log_rgb).exp_().clamp_(max=255.0)
            planes.index_copy_(0, chosen, jittered)
    matrix, offset = _colour_params(
        buf,
        cfg.color_jitter_brightness,
        cfg.color_jitter_contrast,
        cfg.color_jitter_saturation,
        cfg.color_jitter_hue,
        cfg.color_jitter_prob,
        cfg.grayscale_prob,
        generator,
        x_scale=1 / 255,
    )
    # y = scale * (M x / 255 + o) + shift, clamped to the image of [0, 1] under scale and shift.
    scale = _constant("imagenet_inv_std", buf).view(1, 3, 1) if normalized else torch.ones(1, 3, 1)
    shift = _constant("imagenet_shift", buf).view(1, 3, 1) if normalized else torch.zeros(1, 3, 1)
    if matrix is None and not normalized:  # already in [0, 255]: no clamp; a division, exactly to_float's
        planes.div_(255.0)
    elif matrix is None:
        torch.addcmul(shift, planes, scale / 255, out=planes)
    else:
        offset = (offset if offset is not None else torch.zeros(b, 3)).unsqueeze(-1) * scale + shift
        mixed = torch.baddbmm(offset, matrix * (scale / 255), planes)
        low, high = shift.flatten().tolist(), (scale + shift).flatten().tolist()
        for c in range(3):  # scalar bounds: twice as fast as one clamp with (1, 3, 1) bound tensors
            torch.clamp(mixed[:, c], min=low[c], max=high[c], out=planes[:, c])
    if cfg.blur_prob > 0 and cfg.blur_sigma_max > 0:
        apply, kernel, radius = _blur_params(buf, cfg.blur_sigma_max, cfg.blur_prob, generator)
        chosen = apply.nonzero().squeeze(1)
        if len(chosen):
            buf.index_copy_(0, chosen, _separable_blur(buf[chosen], kernel[chosen], radius))
    if cfg.solarize_prob > 0:
        buf.copy_(solarize(buf, cfg.solarize_prob, generator, normalized))
    return buf


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


def _time_views(batch: int = 128, sizes: tuple[int, ...] = (64, 224), repeats: int = 20) -> None:
    """Print milliseconds per ``random_view`` of a uint8 batch (run by hand: ``python -m histossl.augment``)."""
    import time

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ViewConfig()
    for size in sizes:
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        for _ in range(3):  # warm-up
            random_view(images, cfg, size, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            random_view(images, cfg, size, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / repeats * 1e3
        print(f"random_view B={batch} {size}px on {device} ({torch.get_num_threads()} threads): {ms:.1f} ms")


if __name__ == "__main__":
    _time_views()
