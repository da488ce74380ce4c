"""Batched augmentation on the training device, with independent random parameters per image.

Images arrive from the decoded uint8 cache as whole batches. Every op works on a float batch
``(B, 3, H, W)`` in ``[0, 1]`` with tensor ops only: parameters are drawn per sample as ``(B, ...)``
tensors, probability gates are masks (or identity parameters), and on a GPU there is no Python loop
over the batch and no host sync. The only Python branches look at Python numbers from the config: an
op that is switched off (probability 0, strength 0, ``False``) is skipped and costs nothing. On a CPU,
where reading a tensor costs nothing, an op applied with probability p runs on the selected samples
only, and ``random_view`` processes chunks on all threads through a fused uint8 path.

torchvision's v2 transforms draw one parameter set per call (one crop, one jitter for the whole
batch); SimCLR needs two independent views per image and RotNet+Jitter a different jitter per rotated
copy, so the per-sample parameter logic is written here and the pixel work is done by batched
primitives (one ``grid_sample``, batched 3x3 colour matrices, grouped convolution). Every random draw
goes through ``generator`` when one is given, so a view is reproducible from a seed.

Modules: ``core`` (constants, conversion, normalisation), ``geometry`` (crops, flips, quarter turns),
``colour`` (stain, colour, grayscale, blur, solarize: draw and apply), ``pipeline`` (the order of the
steps, described once, and its float and fused paths), ``views`` (``random_view``, ``ViewBuffer``).
"""

from histossl.augment.colour import color_jitter, gaussian_blur, hed_jitter, random_grayscale, solarize
from histossl.augment.core import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float
from histossl.augment.geometry import random_resized_crop, rotate90
from histossl.augment.pipeline import PIPELINE, Step, apply_steps
from histossl.augment.views import ViewBuffer, random_view

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIPELINE",
    "Step",
    "ViewBuffer",
    "apply_steps",
    "color_jitter",
    "gaussian_blur",
    "hed_jitter",
    "normalize",
    "random_grayscale",
    "random_resized_crop",
    "random_view",
    "rotate90",
    "solarize",
    "to_float",
]
