"""Stain normalisation of H&E images to a reference image: Macenko and Reinhard, vectorised numpy.

* **Macenko** et al. 2009, "A method for normalizing histology slides for quantitative analysis"
  (ISBI): optical density ``OD = -log((I + 1) / Io)``; pixels with any channel's OD below
  ``beta`` (0.15) are background; the two main directions of the remaining OD vectors span the
  stain plane; the stain vectors are the directions at the ``alpha`` and ``100 - alpha``
  percentiles (1%) of the angle in that plane; concentrations by least squares, scaled so their
  99th percentile matches the reference's; the image is rebuilt with the reference's stains.
* **Reinhard** et al. 2001, "Color transfer between images" (IEEE CG&A): each channel of the
  paper's decorrelated l-alpha-beta space (RGB -> LMS -> log10 -> lab) is shifted and scaled to
  the reference's mean and standard deviation.

An image the method cannot fit (background only, a single colour) is returned unchanged and the
caller counts it (``normalize`` returns ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histossl.errors import DataError

IO = 240.0  # transmitted light intensity (Macenko's Io): brighter pixels are background
BETA = 0.15  # OD threshold below which a pixel is background
ALPHA = 1.0  # percentile of the angle that picks each stain vector (robust extremes)
MIN_TISSUE_PIXELS = 64  # fewer foreground pixels than this cannot define a stain plane
MIN_STD = 1e-3  # a channel flatter than this (lab units) is a single colour: Reinhard cannot scale it
# Bump when the normalised pixels would change (constants, colour space, rounding).
STAIN_VERSION = "macenko-reinhard-v1"

# Reinhard et al. 2001, eq. 1-6: RGB -> LMS, log10, then the decorrelating lab transform.
_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LMS_FLOOR = 1.0 / 255  # log10(0) is undefined: black pixels are clamped to the darkest non-zero LMS


@dataclass(frozen=True)
class StainTarget:
    """What a reference image fixes: Macenko's stain matrix and concentrations, Reinhard's lab statistics.

    Attributes:
        method: ``macenko`` or ``reinhard``.
        stain_matrix: ``(3, 2)`` OD vectors of haematoxylin and eosin (columns, unit length); Macenko.
        max_concentrations: ``(2,)`` 99th percentile of each stain's concentration; Macenko.
        lab_mean: ``(3,)`` mean of l, alpha, beta; Reinhard.
        lab_std: ``(3,)`` standard deviation of l, alpha, beta; Reinhard.
    """

    method: str
    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# Macenko


def optical_density(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> optical density ``-ln((I + 1) / Io)`` as float64."""
    return -np.log((rgb.astype(np.float64) + 1.0) / io)


def macenko_stains(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The stain matrix and the 99th-percentile concentrations of an image, or None if it has no stain plane.

    Args:
        rgb: ``(H, W, 3)`` uint8.

    Returns:
        ``(3, 2)`` unit OD vectors (haematoxylin first: the one with the larger red OD) and ``(2,)``
        concentrations; None for a background-only or single-colour image.
    """
    od = optical_density(rgb).reshape(-1, 3)
    tissue = od[np.all(od >= BETA, axis=1)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        return None
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(tissue.T))
    if eigenvalues[1] <= 1e-12:  # a single colour: no second direction, no plane
        return None
    plane = eigenvectors[:, 1:3]  # the two largest directions (eigh sorts ascending)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary; OD is positive
    projected = tissue @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, ALPHA), np.percentile(angle, 100 - ALPHA)
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin absorbs red more than eosin does: its OD vector has the larger first component.
    stains = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low], axis=1)
    stains = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    concentrations = np.linalg.lstsq(stains, od.T, rcond=None)[0]  # (2, pixels)
    max_conc = np.percentile(concentrations, 99, axis=1)
    if np.any(max_conc <= 1e-6):
        return None
    return stains, max_conc


def macenko_normalize(rgb: np.ndarray, target: StainTarget) -> np.ndarray | None:
    """Rebuild ``rgb`` with the reference's stains and concentration range; None if it cannot be fitted."""
    fitted = macenko_stains(rgb)
    if fitted is None:
        return None
    stains, max_conc = fitted
    od = optical_density(rgb).reshape(-1, 3)
    concentrations = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    concentrations *= (target.max_concentrations / max_conc)[:, None]
    out = IO * np.exp(-(target.stain_matrix @ concentrations))
    return np.clip(np.round(out.T), 0, 255).astype(np.uint8).reshape(rgb.shape)


# ----------------------------------------------------------------------------------------------
# Reinhard


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> Reinhard's l-alpha-beta (float64)."""
    lms = (rgb.astype(np.float64) / 255.0) @ _RGB_TO_LMS.T
    return np.log10(np.maximum(lms, _LMS_FLOOR)) @ _LMS_TO_LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, rounded and clipped to uint8."""
    lms = 10.0 ** (lab @ np.linalg.inv(_LMS_TO_LAB).T)
    rgb = lms @ np.linalg.inv(_RGB_TO_LMS).T * 255.0
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def reinhard_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel mean and standard deviation in lab; None for a single-colour image."""
    lab = rgb_to_lab(rgb).reshape(-1, 3)
    mean, std = lab.mean(axis=0), lab.std(axis=0)
    return None if np.any(std < MIN_STD) else (mean, std)


def reinhard_normalize(rgb: np.ndarray, target: StainTarget) -> np.ndarray | None:
    """Match each lab channel's mean and std to the reference's; None for a single-colour image."""
    stats = reinhard_stats(rgb)
    if stats is None:
        return None
    mean, std = stats
    lab = (rgb_to_lab(rgb) - mean) / std * target.lab_std + target.lab_mean
    return lab_to_rgb(lab)


# ----------------------------------------------------------------------------------------------
# One entry point


def fit_reference(method: str, rgb: np.ndarray, name: str) -> StainTarget:
    """What the reference image fixes for ``method``.

    Raises:
        DataError: The reference is all background or a single colour (names it).
    """
    if method == "macenko":
        fitted = macenko_stains(rgb)
        if fitted is None:
            raise DataError(f"stain reference {name}: no stained tissue (fewer than {MIN_TISSUE_PIXELS} pixels with "
                            f"optical density >= {BETA}); choose a reference image with H&E tissue")
        return StainTarget(method, stain_matrix=fitted[0], max_concentrations=fitted[1])
    if method == "reinhard":
        stats = reinhard_stats(rgb)
        if stats is None or macenko_stains(rgb) is None:  # Reinhard fits any image; a blank one is still a mistake
            raise DataError(f"stain reference {name}: no stained tissue (background or a single colour); "
                            "choose a reference image with H&E tissue")
        return StainTarget(method, lab_mean=stats[0], lab_std=stats[1])
    raise DataError(f"stain normalisation method {method!r} is not one of macenko, reinhard")


def load_reference(method: str, path: str | Path) -> StainTarget:
    """Fit ``method`` to the reference image at ``path`` (decoded like every other image)."""
    from histossl.data.sources import read_rgb

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"stain reference image not found: {path}")
    return fit_reference(method, read_rgb(path), str(path))


def normalize(rgb: np.ndarray, target: StainTarget) -> np.ndarray | None:
    """``rgb`` normalised to ``target``; None when the image cannot be fitted (keep it unnormalised)."""
    if target.method == "macenko":
        return macenko_normalize(rgb, target)
    return reinhard_normalize(rgb, target)


def describe(path: str | Path) -> dict:
    """The reference's stain matrix and statistics for ``histossl data inspect --stain-reference``."""
    path = Path(path).expanduser()
    macenko = load_reference("macenko", path)
    reinhard = load_reference("reinhard", path)
    return {
        "path": str(path),
        "macenko_stain_matrix": {
            "haematoxylin_od": [round(float(v), 4) for v in macenko.stain_matrix[:, 0]],
            "eosin_od": [round(float(v), 4) for v in macenko.stain_matrix[:, 1]],
        },
        "macenko_max_concentrations": [round(float(v), 4) for v in macenko.max_concentrations],
        "reinhard_lab_mean": [round(float(v), 4) for v in reinhard.lab_mean],
        "reinhard_lab_std": [round(float(v), 4) for v in reinhard.lab_std],
    }
