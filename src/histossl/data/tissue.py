"""Tissue detection on a slide thumbnail: stained tissue in, glass background and pen ink out.

H&E tissue is saturated (pink eosin, purple haematoxylin); glass is bright and grey. The saturation
threshold is Otsu's (1979) on the thumbnail, floored so that a slide that is nearly all glass
does not split its noise in two (the rule histolab and slideflow use, on saturation as in
tiatoolbox's ``OtsuTissueMasker`` on grey). Pen marks are saturated too, but their hue is outside
the H&E range: blue and green ink (hue 70-250 degrees) and black ink (dark) are removed.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.07  # floor of the Otsu threshold: glass with JPEG noise stays below it
MIN_VALUE = 0.2  # darker than this is black ink or a fold, not stained tissue
PEN_HUES = (70.0, 250.0)  # degrees: green to blue ink; H&E lies in 250-360 and 0-40 (purple to pink)
PEN_MIN_SATURATION = 0.15  # a weakly saturated pixel in that range is glass, not ink


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(..., 3)`` uint8 RGB -> hue in degrees [0, 360), saturation and value in [0, 1]."""
    x = rgb.astype(np.float64) / 255.0
    value = x.max(axis=-1)
    chroma = value - x.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-12), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(chroma, 1e-12)
    hue = np.select(
        [chroma == 0, value == r, value == g],
        [0.0, ((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    ) * 60.0
    return hue % 360, saturation, value


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][np.argmax(between)])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: stained tissue in a thumbnail ``(H, W, 3)`` uint8."""
    hue, saturation, value = rgb_to_hsv(rgb)
    threshold = max(otsu_threshold(saturation), MIN_SATURATION)
    pen = (hue >= PEN_HUES[0]) & (hue <= PEN_HUES[1]) & (saturation >= PEN_MIN_SATURATION)
    return (saturation >= threshold) & (value >= MIN_VALUE) & ~pen


def region_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over each box ``(x0, y0, x1, y1)`` in mask pixels (an integral image: O(1) per box)."""
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(boxes[:, 0]).astype(int), 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int), 0, h)
    x1 = np.clip(np.ceil(boxes[:, 2]).astype(int), 0, w)
    y1 = np.clip(np.ceil(boxes[:, 3]).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / area
