"""Statistics of a study's numbers: intervals over seeds, paired differences, Holm, group bootstrap.

Pure functions on numbers (scipy does the arithmetic); nothing here reads files or knows records.

* A cell (one encoder, protocol, budget) over seeds: mean, sample std, n and a 95% Student-t
  interval, ``mean ± t(0.975, n-1) · std / √n`` (``scipy.stats.t``).
* Two cells paired by seed (seed s draws the same labelled subset for every method, so the design
  is paired): the per-seed differences, their mean, the one-sample t interval and p-value
  (``scipy.stats.ttest_1samp`` on the differences, the same test as ``ttest_rel``).
* Many comparisons in one table: Holm's step-down adjustment (Holm 1979, Scand. J. Statist. 6:65-70),
  which controls the family-wise error rate without assuming independence.
* One run: a bootstrap interval over the test set that resamples whole groups (patients, slides),
  since images of one patient are not independent (``scipy.stats.bootstrap``, percentile method,
  1000 resamples as in owkin's HistoSSLscaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
N_RESAMPLES = 1000
MAX_SEEDS_NEEDED = 1000  # beyond this the "seeds needed" estimate says "more than"
# Differences equal up to rounding (0.8 - 0.7 vs 0.9 - 0.8) have no spread: a t-test on them would
# divide by a rounding error and give p ~ 0.
SPREAD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Interval:
    """A mean with its spread and 95% interval; ``low``/``high`` are NaN when it cannot be computed."""

    mean: float
    std: float  # sample std (ddof=1); NaN for one value
    n: int
    low: float
    high: float

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired by seed: the interval of the mean difference and the paired t-test's p-value.

    ``seeds`` lists the seeds present on both sides (the pairs), in order.
    """

    difference: Interval
    p_value: float  # two-sided; NaN with fewer than two pairs or no spread
    seeds: tuple


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std, n and the Student-t interval ``mean ± t(1-α/2, n-1) · std / √n``.

    One value has no interval (``low``/``high`` NaN); values without spread give a zero-width one.

    Raises:
        ValueError: ``values`` is empty.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Interval(mean, std, int(x.size), mean - half, mean + half)


def paired_difference(a: dict, b: dict, confidence: float = CONFIDENCE) -> PairedDifference | None:
    """``a - b`` over the seeds both sides have (``{seed: value}``): interval and paired t-test p-value.

    Returns None when no seed is shared. With one pair: the difference, no interval, p NaN. The
    p-value is ``scipy.stats.ttest_1samp(differences, 0)`` (identical to ``ttest_rel(a, b)``); with
    differences that do not vary (up to rounding) it is NaN, so such a difference is never "shown".
    """
    seeds = tuple(sorted(set(a) & set(b), key=lambda s: (str(type(s)), s)))
    if not seeds:
        return None
    differences = [float(a[s]) - float(b[s]) for s in seeds]
    interval = t_interval(differences, confidence)
    p = math.nan
    if len(seeds) > 1 and interval.std > SPREAD_TOLERANCE * max(1.0, abs(interval.mean)):
        p = float(sps.ttest_1samp(differences, 0.0).pvalue)
    return PairedDifference(interval, p, seeds)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; NaN stays NaN and does not count as a test.

    Step-down: sort the m finite p-values ascending, ``p'_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))``
    (i, j from 1). A hypothesis is rejected at level α when its adjusted p is below α.
    """
    finite = [(p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    finite.sort()
    m = len(finite)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def seeds_needed(differences_std: float, mean_difference: float, confidence: float = CONFIDENCE) -> int | None:
    """Paired seeds at which the observed difference would clear its own t interval.

    The smallest n >= 2 with ``t(1-α/2, n-1) · sd / √n < |mean|``, taking the observed mean and
    spread of the paired differences as if they were the truth. This is a power-free rough guide,
    not a power calculation: at that n a rerun would show the difference only about half of the
    time, and the Holm correction across the table is not included. None when the mean difference
    is zero or the spread is unknown (fewer than two pairs); ``MAX_SEEDS_NEEDED + 1`` when more
    than ``MAX_SEEDS_NEEDED`` would be needed.
    """
    if not math.isfinite(differences_std) or not math.isfinite(mean_difference) or mean_difference == 0:
        return None
    if differences_std == 0:
        return 2
    n = np.arange(2, MAX_SEEDS_NEEDED + 1)
    half = sps.t.ppf(0.5 + confidence / 2, n - 1) * differences_std / np.sqrt(n)
    hits = np.flatnonzero(half < abs(mean_difference))
    return int(n[hits[0]]) if hits.size else MAX_SEEDS_NEEDED + 1


def _group_counts(labels: np.ndarray, preds_list: list[np.ndarray], groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Per group and class: (images of the class, correct predictions by each prediction set) ``(G, C, 1+k)``."""
    classes, label_index = np.unique(labels, return_inverse=True)
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    counts = np.zeros((n_groups, len(classes), 1 + len(preds_list)))
    np.add.at(counts, (group_index, label_index, 0), 1.0)
    for k, preds in enumerate(preds_list, 1):
        np.add.at(counts, (group_index, label_index, k), (preds == labels).astype(np.float64))
    return counts, n_groups


def _balanced_accuracy(summed: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy from per-class sums ``(..., C, 1+k)``: mean recall over the classes present."""
    totals = summed[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(totals > 0, summed[..., k] / np.where(totals > 0, totals, 1.0), np.nan)
    return np.nanmean(recall, axis=-1)


def group_bootstrap(
    labels: Sequence,
    preds: Sequence,
    groups: Sequence | None = None,
    other_preds: Sequence | None = None,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Balanced accuracy of one run on its test set, with a bootstrap interval that resamples groups.

    Whole groups (patients, slides) are drawn with replacement and all their images pooled, so the
    interval reflects how many independent groups the test set holds, not how many images. Without
    ``groups`` every image is its own group. With ``other_preds`` (a second run on the same test
    images) the statistic is the paired difference ``balanced_acc(preds) - balanced_acc(other_preds)``
    on the same resampled groups. ``scipy.stats.bootstrap``, percentile method, seeded: the same
    inputs give the same interval. Describes test-set sampling only, not training randomness.

    Returns:
        Interval with the full-test-set statistic as ``mean``, ``n`` the number of groups, ``std``
        the bootstrap standard error; no interval (NaN) with fewer than two groups.
    """
    labels = np.asarray(labels)
    preds_list = [np.asarray(preds)] + ([np.asarray(other_preds)] if other_preds is not None else [])
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if not all(len(p) == len(labels) for p in preds_list) or len(groups) != len(labels):
        raise ValueError("labels, predictions and groups must have the same length")
    counts, n_groups = _group_counts(labels, preds_list, groups)

    flat = counts.reshape(n_groups, -1)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        # How often each group was drawn, per resample (B, G), times the per-group counts: the pooled
        # counts of the resampled test set (B, C, 1+k) without materialising (B, n, C, 1+k).
        index = np.asarray(index, dtype=np.int64)
        rows = index.reshape(-1, index.shape[-1])
        offsets = (np.arange(len(rows)) * n_groups)[:, None]
        drawn = np.bincount((rows + offsets).ravel(), minlength=len(rows) * n_groups).reshape(len(rows), n_groups)
        summed = (drawn @ flat).reshape(*index.shape[:-1], *counts.shape[1:])
        value = _balanced_accuracy(summed, 1)
        return value - _balanced_accuracy(summed, 2) if len(preds_list) > 1 else value

    observed = float(statistic(np.arange(n_groups)))
    if n_groups < 2:
        return Interval(observed, math.nan, n_groups, math.nan, math.nan)
    batch = max(1, min(n_resamples, 20_000_000 // n_groups))  # (batch, G) draw counts stay near 160 MB
    result = sps.bootstrap(
        (np.arange(n_groups),), statistic, n_resamples=n_resamples, confidence_level=confidence,
        method="percentile", vectorized=True, batch=batch, random_state=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(observed, float(result.standard_error), n_groups, float(ci.low), float(ci.high))
