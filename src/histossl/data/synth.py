"""The embedded default data set: procedurally generated H&E-like tissue patches.

Every patch is drawn as two stain concentration maps, haematoxylin (nuclei) and eosin (cytoplasm,
fibres, membranes), and turned into RGB with Beer-Lambert optical densities and the stain vectors of
Ruifrok & Johnston (2001, "Quantification of histochemical staining by color deconvolution"). Colour
therefore comes only from the stain model, and the classes differ by structure, not by hue:

- each image's overall H and E amount is pulled towards a random amount drawn from one range shared by
  every class, and each simulated slide (group) perturbs the stain vectors, the stain strengths, the
  white point and the illumination, so per-image colour statistics overlap across classes and do not
  transfer between slides;
- the classes are told apart by nucleus size, density and shape, fibres, fat-cell membranes, gland
  lumens, necrotic fragments and empty glass;
- some structures have an orientation, as in real sections (fibres and elongated nuclei biased towards
  a per-slide direction near the horizontal, gland nuclei on the lower (basal) side of the lumen, tissue
  edges mostly at the bottom of a background or mucus patch, illumination falling off from the top), so
  a rotation pretext task (RotNet, Gidaris et al. 2018, arXiv:1803.07728) is learnable but not trivial.

Lengths are given in pixels of a 64 px patch and scaled with ``size`` (a larger ``image_size`` is the
same field of view at a finer resolution).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histossl.config import SynthConfig, to_dict
from histossl.errors import DataError
from histossl.io import apply_umask

# Ruifrok & Johnston (2001) optical-density vectors (R, G, B) of haematoxylin and eosin.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])

MANIFEST_NAME = "synth.json"
_FORMAT_VERSION = 1  # bump when the images a config produces change, so an old folder is not reused

# Each image's stain amount (mean concentration) and contrast (std / mean of the concentration) are
# pulled towards random values drawn from ranges shared by all classes, this far in log space: 1 would
# erase every difference in how much stain a class takes up and how patchy it is, 0 keeps the natural
# one. The structure (where the stain is) is untouched: contrast changes are affine per map.
AMOUNT_MATCHING = 0.7
CONTRAST_MATCHING = 0.3
H_AMOUNT_RANGE = (0.08, 0.45)  # mean haematoxylin concentration of a patch, before the slide's gain
E_AMOUNT_RANGE = (0.12, 0.55)
CONTRAST_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class SlideStain:
    """What one simulated slide does to every patch on it: stain, scanner and sectioning."""

    haematoxylin_od: np.ndarray  # (3,) unit optical-density vector, perturbed from Ruifrok & Johnston
    eosin_od: np.ndarray  # (3,)
    haematoxylin_gain: float  # multiplies the H concentrations (staining time, section thickness)
    eosin_gain: float
    white: np.ndarray  # (3,) background intensity per channel in [0, 255]: brightness and tint
    illumination_falloff: float  # relative intensity lost from the top row to the bottom row
    fibre_angle: float  # radians from the image x axis: preferred direction of fibres and nuclei
    fibre_angle_spread: float  # radians: how far one patch's direction strays from fibre_angle


def random_slide_stain(rng: np.random.Generator) -> SlideStain:
    """Draw the stain, scanner and sectioning variation of one slide."""

    def perturbed(vector: np.ndarray) -> np.ndarray:
        # multiplicative jitter, plus a little absorption in every channel (real eosin is pinker than
        # the pure green absorber of the reference vector on most slides)
        v = vector * np.exp(rng.normal(0.0, 0.12, 3)) + rng.uniform(0.0, 0.15, 3)
        return v / np.linalg.norm(v)

    brightness = rng.uniform(0.82, 1.0)
    tint = np.exp(rng.normal(0.0, 0.035, 3))
    return SlideStain(
        haematoxylin_od=perturbed(HAEMATOXYLIN_OD),
        eosin_od=perturbed(EOSIN_OD),
        haematoxylin_gain=float(np.exp(rng.normal(0.0, 0.25))),
        eosin_gain=float(np.exp(rng.normal(0.0, 0.25))),
        white=np.clip(255.0 * brightness * tint, 150.0, 255.0),
        illumination_falloff=float(rng.uniform(0.0, 0.12)),
        # sections are cut along one direction; fibres lie mostly across the cut, so near horizontal
        fibre_angle=float(rng.normal(0.0, np.deg2rad(25.0))),
        fibre_angle_spread=float(rng.uniform(np.deg2rad(10.0), np.deg2rad(35.0))),
    )


# ----------------------------------------------------------------------------------------------
# Drawing blocks on (size, size) float maps


@functools.lru_cache(maxsize=256)
def _gaussian_transfer(size: int, along: float, across: float, angle: float) -> np.ndarray:
    """rfft2-domain transfer of a periodic Gaussian filter with std ``along`` pixels in direction
    ``angle`` (radians from the x axis, counter-clockwise as seen) and ``across`` pixels across it."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    dx, dy = np.cos(angle), -np.sin(angle)  # image rows grow downwards
    f_along = fx * dx + fy * dy
    f_across = -fx * dy + fy * dx
    return np.exp(-2.0 * np.pi**2 * ((f_along * along) ** 2 + (f_across * across) ** 2))


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur of (..., size, size) maps; sigma in pixels."""
    transfer = _gaussian_transfer(images.shape[-1], sigma, sigma, 0.0)
    return np.fft.irfft2(np.fft.rfft2(images) * transfer, s=images.shape[-2:])


def _noise(rng: np.random.Generator, size: int, along: float, across: float | None = None, angle: float = 0.0) -> np.ndarray:
    """Smooth Gaussian noise, zero mean and unit std, correlated over ``along`` pixels in direction
    ``angle`` (radians from the x axis, counter-clockwise as seen) and ``across`` pixels across it."""
    if across is None or across == along:
        across, angle = along, 0.0  # isotropic: one cached transfer
    transfer = _gaussian_transfer(size, along, across, angle)
    # white noise drawn directly in the frequency domain saves the forward transform
    spectrum = rng.standard_normal((2, *transfer.shape))
    out = np.fft.irfft2((spectrum[0] + 1j * spectrum[1]) * transfer, s=(size, size))
    out -= out.mean()
    return out / (out.std() + 1e-8)


def _ellipses(
    size: int,
    cy: np.ndarray,
    cx: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    angle: np.ndarray,
    value: np.ndarray,
    rim: float = 0.0,
) -> np.ndarray:
    """Sum of filled soft-edged ellipses: centre (cy, cx), semi-axes rx (along ``angle``) and ry.

    Each ellipse is evaluated on a small window around its centre and scattered with bincount, so the
    cost grows with the ellipses' area, not with the image. ``rim`` > 0 darkens the rim (vesicular
    nuclei with chromatin on the membrane).
    """
    n = len(cy)
    if n == 0:
        return np.zeros((size, size))
    half = int(np.ceil(max(rx.max(), ry.max()))) + 1
    offsets = np.arange(-half, half + 1)
    # pixel (row, col) relative to each centre's pixel; centres may lie up to `half` outside the image,
    # so draw on a canvas padded by 2 * half on each side and crop
    iy = np.clip(np.floor(cy).astype(int), -half, size + half - 1)
    ix = np.clip(np.floor(cx).astype(int), -half, size + half - 1)
    frac_y = (iy + 0.5 - cy)[:, None, None]
    frac_x = (ix + 0.5 - cx)[:, None, None]
    ddy = offsets[None, :, None] + frac_y  # (n, w, 1)
    ddx = offsets[None, None, :] + frac_x  # (n, 1, w)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (ddx * cos - ddy * sin) / rx[:, None, None]  # along the major axis (angle counter-clockwise as seen)
    v = (ddx * sin + ddy * cos) / ry[:, None, None]
    dist = np.sqrt(u * u + v * v)  # (n, w, w)
    edge = np.maximum(np.minimum(rx, ry), 0.5)[:, None, None]  # about one pixel of soft edge
    fill = np.clip((1.0 - dist) * edge + 0.5, 0.0, 1.0)
    if rim > 0:
        fill *= 1.0 - rim + rim * np.minimum(dist, 1.0) ** 2
    fill *= value[:, None, None]
    padded = size + 4 * half
    rows = (iy + 2 * half)[:, None, None] + offsets[None, :, None]
    cols = (ix + 2 * half)[:, None, None] + offsets[None, None, :]
    flat = (rows * padded + cols).ravel()
    canvas = np.bincount(flat, weights=fill.ravel(), minlength=padded * padded).reshape(padded, padded)
    return canvas[2 * half : 2 * half + size, 2 * half : 2 * half + size]


def _nuclei(
    rng: np.random.Generator,
    size: int,
    count: int,
    radius: tuple[float, float],
    elongation: tuple[float, float],
    angle: float | None,
    angle_spread: float,
    darkness: tuple[float, float],
    density: np.ndarray | None = None,
    rim: float = 0.0,
) -> np.ndarray:
    """Haematoxylin map of ``count`` nuclei at random places (optionally thinned by a density map).

    ``radius`` is the range of the minor semi-axis; ``elongation`` the range of major/minor; ``angle``
    the preferred direction of the major axis (None: uniform) and ``angle_spread`` its std.
    """
    if density is not None:  # rejection sampling: draw extra centres, keep them with prob ∝ density
        cy, cx = rng.uniform(0, size, (2, count * 3))
        keep = rng.uniform(0, 1, count * 3) < density[cy.astype(int), cx.astype(int)]
        cy, cx = cy[keep][:count], cx[keep][:count]
    else:
        cy, cx = rng.uniform(0, size, (2, count))
    n = len(cy)
    minor = rng.uniform(*radius, n)
    major = minor * rng.uniform(*elongation, n)
    if angle is None:
        angles = rng.uniform(0, np.pi, n)
    else:
        angles = angle + rng.normal(0.0, angle_spread, n)
    return _ellipses(size, cy, cx, minor, major, angles, rng.uniform(*darkness, n), rim=rim)


# ----------------------------------------------------------------------------------------------
# Tissue classes: each returns (haematoxylin, eosin) concentration maps of shape (size, size)

Maps = tuple[np.ndarray, np.ndarray]


def _direction(rng: np.random.Generator, stain: SlideStain) -> float:
    """This patch's fibre / nucleus direction: the slide's, strayed a little."""
    return stain.fibre_angle + rng.normal(0.0, stain.fibre_angle_spread)


def _tumour(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Adenocarcinoma: crowded, large, pleomorphic, vesicular nuclei; glands whose nuclei sit on the
    basal (lower) side of a clear lumen."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    eosin = 0.45 + 0.12 * _noise(rng, size, 3 * s)
    lumen = np.zeros((size, size))
    gland_nuclei = []
    for _ in range(rng.integers(1, 3)):
        gy, gx = rng.uniform(0.15 * size, 0.85 * size, 2)
        ry, rx = rng.uniform(3 * s, 8 * s), rng.uniform(5 * s, 12 * s)
        inside = ((yy - gy) / ry) ** 2 + ((xx - gx) / rx) ** 2
        lumen = np.maximum(lumen, np.clip((1.0 - inside) * 3.0, 0.0, 1.0))
        # columnar epithelium round the lumen, most nuclei on the basal side (below, +y)
        n = int(rng.integers(10, 18))
        phi = rng.vonmises(np.pi / 2, 1.2, n)  # angle in image coords (y down): pi/2 is below
        offset = rng.uniform(2.0, 3.5, n) * s  # from the lumen's surface into the epithelium
        ny = gy + ry * np.sin(phi) + offset * np.sin(phi)
        nx = gx + rx * np.cos(phi) + offset * np.cos(phi)
        gland_nuclei.append((ny, nx, -phi))  # long axis radial (columnar cells)
    hx = _nuclei(rng, size, int(rng.integers(45, 65) * s * s), (1.8 * s, 2.7 * s), (1.1, 1.8),
                 _direction(rng, stain), 0.6, (0.9, 1.4), rim=0.35)
    for gy, gx, phi in gland_nuclei:
        n = len(gy)
        minor = rng.uniform(1.4 * s, 2.0 * s, n)
        hx += _ellipses(size, gy, gx, minor, minor * rng.uniform(1.6, 2.4, n), phi, rng.uniform(1.0, 1.4, n), rim=0.3)
    hx = np.minimum(hx, 1.6) * (1.0 - lumen)
    eosin = eosin * (1.0 - 0.9 * lumen)
    return hx, eosin


def _stroma(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Collagen: wavy eosinophilic fibres along the slide's direction, sparse spindle nuclei along them."""
    angle = _direction(rng, stain)
    fibres = _noise(rng, size, 9 * s, 0.9 * s, angle)
    bundles = _noise(rng, size, 6 * s)
    eosin = np.clip(0.55 + 0.35 * np.tanh(1.3 * fibres) + 0.15 * bundles, 0.02, None)
    eosin *= np.clip(1.2 + 0.8 * _noise(rng, size, 5 * s, 1.5 * s, angle), 0.0, 1.0)  # clefts
    hx = _nuclei(rng, size, int(rng.integers(4, 11) * s * s), (0.7 * s, 1.1 * s), (3.0, 5.0),
                 angle, 0.15, (0.9, 1.4))
    return hx + 0.04, eosin


def _lymphocytes(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Sheets of small, round, dark, evenly stained nuclei with scant cytoplasm."""
    density = np.clip(0.75 + 0.35 * _noise(rng, size, 6 * s), 0.05, 1.0)
    hx = _nuclei(rng, size, int(rng.integers(90, 130) * s * s), (1.4 * s, 1.9 * s), (1.0, 1.2),
                 None, 0.0, (1.0, 1.4), density=density)
    eosin = np.clip(0.18 + 0.06 * _noise(rng, size, 2 * s), 0.02, None)
    return np.minimum(hx, 1.7), eosin


def _adipose(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Fat: large empty cells (Voronoi cells) bounded by thin pink membranes, rare flat nuclei."""
    n = int(rng.integers(6, 12))
    seeds = rng.uniform(-0.15 * size, 1.15 * size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    # cells stretched along the slide's direction, as the section was compressed across it
    angle = _direction(rng, stain)
    stretch = rng.uniform(1.0, 1.35)
    cos, sin = np.cos(angle), np.sin(angle)
    def along_across(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x * cos - y * sin) / stretch, x * sin + y * cos
    pu, pv = along_across(yy, xx)
    su, sv = along_across(seeds[:, 0], seeds[:, 1])
    dist = np.sqrt((pu[None] - su[:, None, None]) ** 2 + (pv[None] - sv[:, None, None]) ** 2)  # (n, size, size)
    two = np.partition(dist, 1, axis=0)[:2]
    gap = two[1] - two[0]  # 0 on the membrane between two cells
    width = rng.uniform(0.6, 1.0) * s
    membrane = np.exp(-0.5 * (gap / width) ** 2)
    eosin = 0.9 * membrane * (1.0 + 0.2 * _noise(rng, size, 2 * s)) + 0.03
    on_membrane = np.argwhere(gap < 0.5 * s)
    hx = np.full((size, size), 0.02)
    if len(on_membrane):
        pick = on_membrane[rng.integers(0, len(on_membrane), rng.integers(0, 3))] + 0.5
        k = len(pick)
        hx += _ellipses(size, pick[:, 0], pick[:, 1], np.full(k, 0.8 * s), np.full(k, 2.5 * s),
                        rng.uniform(0, np.pi, k), rng.uniform(0.8, 1.2, k))
    return hx, eosin


def _edge(rng: np.random.Generator, size: int, s: float, probability: float) -> np.ndarray:
    """A soft tissue mask with a tissue/glass boundary, mostly at the bottom of the patch; or zeros."""
    if rng.uniform() >= probability:
        return np.zeros((size, size))
    yy = np.arange(size)[:, None] + 0.5
    wobble = 3.0 * s * _noise(rng, size, 8 * s)[0][None, :]
    mask = np.clip((yy - rng.uniform(0.45, 0.85) * size + wobble) / (1.5 * s), 0.0, 1.0)
    side = rng.choice(4, p=[0.7, 0.1, 0.1, 0.1])  # 0: tissue below the boundary
    return np.rot90(mask, side)


def _mucus(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Mucin: pale, wispy, faintly basophilic strands; a few floating cells; sometimes epithelium."""
    angle = rng.uniform(0, np.pi)
    wisps = _noise(rng, size, 7 * s, 2.5 * s, angle)
    smooth = _noise(rng, size, 10 * s)
    amount = np.clip(0.35 + 0.25 * np.tanh(wisps) + 0.15 * smooth, 0.02, None)
    hx = 0.35 * amount + _nuclei(rng, size, int(rng.integers(0, 5) * s * s), (1.0 * s, 1.8 * s), (1.0, 1.6),
                                 None, 0.0, (0.6, 1.0))
    eosin = 0.55 * amount
    edge = _edge(rng, size, s, 0.35)  # mucosa next to the pool: dense cells under pink cytoplasm
    if edge.any():
        tissue_h = _nuclei(rng, size, int(45 * s * s), (1.2 * s, 1.8 * s), (1.5, 2.5), np.pi / 2, 0.3, (0.9, 1.3))
        hx = hx * (1 - edge) + edge * (0.05 + tissue_h)
        eosin = eosin * (1 - edge) + edge * 0.55
    return hx, eosin


def _debris(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Necrosis: irregular eosinophilic clumps, ghost cells and karyorrhectic nuclear dust."""
    clumps = np.clip(_noise(rng, size, 3.5 * s) + 0.3, 0.0, None)
    eosin = 0.12 + 0.5 * np.tanh(clumps) + 0.05 * _noise(rng, size, 1.0 * s)
    ghosts = _nuclei(rng, size, int(rng.integers(6, 14) * s * s), (2.0 * s, 3.0 * s), (1.0, 1.5), None, 0.0, (0.2, 0.35))
    dust = _nuclei(rng, size, int(rng.integers(30, 70) * s * s), (0.5 * s, 1.2 * s), (1.0, 2.5), None, 0.0, (1.0, 1.8))
    pyknotic = _nuclei(rng, size, int(rng.integers(3, 9) * s * s), (1.0 * s, 1.6 * s), (1.0, 1.2), None, 0.0, (1.4, 1.9))
    hx = 0.06 + 0.1 * np.clip(_noise(rng, size, 4 * s), 0, None) + ghosts + dust + pyknotic
    return np.minimum(hx, 2.0), np.clip(eosin, 0.02, None)


def _background(rng: np.random.Generator, stain: SlideStain, size: int, s: float) -> Maps:
    """Glass: faint uneven mounting medium, dust, often a tissue edge at the bottom of the patch."""
    haze = np.clip(_noise(rng, size, 10 * s), -1.0, None) + 0.3 * _noise(rng, size, 1.5 * s)
    hx = 0.12 + 0.05 * haze
    eosin = 0.16 + 0.08 * haze
    dust = _nuclei(rng, size, int(rng.integers(0, 4)), (0.5 * s, 1.0 * s), (1.0, 3.0), None, 0.0, (0.3, 0.8))
    hx = hx + dust
    edge = _edge(rng, size, s, 0.6)
    if edge.any():  # stroma beyond the edge
        angle = _direction(rng, stain)
        tissue_e = np.clip(0.55 + 0.3 * np.tanh(_noise(rng, size, 8 * s, 1.0 * s, angle)), 0.02, None)
        tissue_h = 0.05 + _nuclei(rng, size, int(10 * s * s), (0.8 * s, 1.2 * s), (2.5, 4.0), angle, 0.2, (0.9, 1.3))
        hx = hx * (1 - edge) + edge * tissue_h
        eosin = eosin * (1 - edge) + edge * tissue_e
    return hx, eosin


CLASS_RENDERERS: dict[str, Callable[[np.random.Generator, SlideStain, int, float], Maps]] = {
    "tumour": _tumour,
    "stroma": _stroma,
    "lymphocytes": _lymphocytes,
    "adipose": _adipose,
    "mucus": _mucus,
    "debris": _debris,
    "background": _background,
}


def check_classes(classes: list[str]) -> None:
    """Raise ValueError naming any class the generator cannot draw, and listing those it can."""
    for name in classes:
        if name not in CLASS_RENDERERS:
            raise ValueError(f"unknown synthetic tissue class {name!r}; known: {', '.join(CLASS_RENDERERS)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"synthetic tissue classes repeat: {', '.join(classes)}")


# ----------------------------------------------------------------------------------------------
# From stain concentrations to an RGB patch


def _match_stats(concentration: np.ndarray, rng: np.random.Generator, amount_range: tuple[float, float]) -> np.ndarray:
    """Move a concentration map's mean and contrast part of the way towards random shared targets."""
    mean = max(float(concentration.mean()), 1e-3)
    contrast = max(float(concentration.std()) / mean, 1e-3)
    target_mean = np.exp(rng.uniform(*np.log(amount_range)))
    target_contrast = np.exp(rng.uniform(*np.log(CONTRAST_RANGE)))
    new_mean = mean * (target_mean / mean) ** AMOUNT_MATCHING
    stretch = (target_contrast / contrast) ** CONTRAST_MATCHING
    return np.clip(new_mean * (1.0 + (concentration / mean - 1.0) * stretch), 0.0, None)


def synth_image(cls: str, rng: np.random.Generator, stain: SlideStain, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 RGB patch of tissue class ``cls`` on a slide stained as ``stain``."""
    check_classes([cls])
    s = size / 64.0
    hx, eosin = CLASS_RENDERERS[cls](rng, stain, size, s)
    hx = _match_stats(hx, rng, H_AMOUNT_RANGE) * stain.haematoxylin_gain
    eosin = _match_stats(eosin, rng, E_AMOUNT_RANGE) * stain.eosin_gain
    blur = rng.uniform(0.35, 0.9) * s  # focus varies patch to patch
    hx, eosin = np.clip(_gaussian_blur(np.stack([hx, eosin]), round(blur, 2)), 0.0, None)
    # Beer-Lambert: I = I0 * exp(-OD), OD = sum of concentration x stain vector
    vectors = np.stack([stain.haematoxylin_od, stain.eosin_od]).astype(np.float32)  # (2, 3)
    od = np.stack([hx, eosin], axis=-1).astype(np.float32) @ vectors  # (size, size, 3)
    rows = (np.arange(size, dtype=np.float32) + 0.5)[:, None, None] / size
    illumination = 1.0 + stain.illumination_falloff * (0.5 - rows)  # brighter at the top
    white = (stain.white * rng.uniform(0.93, 1.05)).astype(np.float32)  # exposure varies patch to patch
    rgb = white * illumination * np.exp(-od)
    noise = rng.standard_normal(rgb.shape, dtype=np.float32)
    rgb += np.float32(rng.uniform(1.5, 4.0)) * noise  # sensor noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The data set on disk


def group_name(index: int) -> str:
    return f"slide{index:02d}"


def _class_key(name: str) -> int:
    """A stable number per class name, so a patch does not change when other classes are added."""
    return zlib.crc32(name.encode("utf-8"))


def _manifest(cfg: SynthConfig) -> dict:
    return {"format": _FORMAT_VERSION, "config": to_dict(cfg)}


def _expected_files(cfg: SynthConfig) -> int:
    return cfg.n_groups * len(cfg.classes) * cfg.per_class_per_group


def _is_complete(out_dir: Path, cfg: SynthConfig) -> bool:
    """True when ``out_dir`` holds every image of ``cfg`` and its manifest says ``cfg``."""
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest != _manifest(cfg):
        return False
    return sum(1 for _ in out_dir.glob("*/*/*.png")) == _expected_files(cfg)


def _write_group(root: Path, cfg: SynthConfig, g: int) -> str:
    """Write every image of slide ``g`` under ``root``; the images depend only on (seed, g, class, i)."""
    stain = random_slide_stain(np.random.default_rng([cfg.seed, g]))
    group = group_name(g)
    for cls in cfg.classes:
        folder = root / group / cls
        folder.mkdir(parents=True)
        for i in range(cfg.per_class_per_group):
            rng = np.random.default_rng([cfg.seed, g, _class_key(cls), i])
            image = synth_image(cls, rng, stain, cfg.image_size)
            Image.fromarray(image).save(folder / f"{group}_{cls}_{i:04d}.png", compress_level=1)
    return group


def _generate(root: Path, cfg: SynthConfig, progress: bool) -> None:
    for g in range(cfg.n_groups):
        group = _write_group(root, cfg, g)
        if progress:
            print(f"synth: {group} done ({g + 1}/{cfg.n_groups})", file=sys.stderr, flush=True)
    (root / MANIFEST_NAME).write_text(json.dumps(_manifest(cfg), indent=2) + "\n")


def synthesize(out_dir: Path, cfg: SynthConfig, progress: bool = False) -> Path:
    """Write the synthetic data set as ``out_dir/<group>/<class>/<group>_<class>_<i:04d>.png``.

    Deterministic by ``cfg.seed``. The images are written into a temporary folder beside ``out_dir``
    and renamed into place, so a killed run leaves no half data set. A folder that already holds the
    complete set of the same ``cfg`` is reused; any other non-empty folder is refused (DataError).
    One process: the default set takes a few seconds, less than starting worker processes would save.
    """
    out_dir = Path(out_dir)
    check_classes(list(cfg.classes))
    if out_dir.exists():
        if _is_complete(out_dir, cfg):
            return out_dir
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise DataError(
                f"{out_dir} exists and does not hold the synthetic data set of this config; "
                "remove it or choose another folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    apply_umask(tmp, folder=True)
    try:
        _generate(tmp, cfg, progress)
        try:
            os.replace(tmp, out_dir)  # atomic; replaces an empty folder
        except OSError:
            if not _is_complete(out_dir, cfg):  # another process may have finished the same set first
                raise DataError(f"cannot move the synthetic data set into {out_dir}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------
# A picture of the data set


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def draw_grid(root: Path, out_png: Path, per_class: int = 6, seed: int = 0) -> Path:
    """Save a labelled grid of patches: one row per class, the class name on the left, each column
    from a different slide where there are enough (slide names under the tiles)."""
    root, out_png = Path(root), Path(out_png)
    try:
        classes = json.loads((root / MANIFEST_NAME).read_text())["config"]["classes"]
    except (OSError, ValueError, KeyError):
        classes = sorted({p.name for p in root.glob("*/*") if p.is_dir()})
    groups = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes or not groups:
        raise DataError(f"{root}: no <group>/<class>/*.png images to draw")
    rng = np.random.default_rng(seed)
    tile, pad, label_width, caption = 96, 4, 120, 14
    title_height = 28
    width = label_width + per_class * (tile + pad) + pad
    height = title_height + len(classes) * (tile + caption + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), f"synthetic H&E patches ({root.name}): one row per class, columns from different slides",
              fill="black", font=_font(13))
    name_font, caption_font = _font(15), _font(10)
    for row, cls in enumerate(classes):
        top = title_height + row * (tile + caption + pad)
        draw.text((pad, top + tile // 2 - 8), cls, fill="black", font=name_font)
        order = rng.permutation(len(groups))
        picked = [groups[order[k % len(groups)]] for k in range(per_class)]
        for col, group in enumerate(picked):
            files = sorted((root / group / cls).glob("*.png"))
            if not files:
                continue
            with Image.open(files[rng.integers(len(files))]) as image:
                patch = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
            left = label_width + pad + col * (tile + pad)
            canvas.paste(patch, (left, top))
            draw.text((left, top + tile + 1), group, fill="dimgray", font=caption_font)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # an adaptive palette keeps the noisy tiles' PNG small
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out_png, optimize=True)
    return out_png
