"""histossl.stats against values computed by hand (t tables, closed forms), and the group bootstrap."""

import math

import numpy as np
import pytest

from histossl.stats import group_bootstrap, holm, paired_difference, seeds_needed, t_interval


def test_t_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5, sample sd sqrt(5/3); t(0.975, 3) = 3.182446 (t table).
    i = t_interval([1, 2, 3, 4])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert (i.mean, i.n) == (2.5, 4)
    assert i.std == pytest.approx(math.sqrt(5 / 3))
    assert (i.low, i.high) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-5)
    assert i.excludes_zero()
    one = t_interval([0.7])
    assert one.n == 1 and not one.has_interval and not one.excludes_zero()


def test_paired_difference_by_hand():
    # Differences 0.10, 0.05, 0.10: mean 1/12, sd sqrt(1/1200), t = 5.0 with 2 degrees of freedom.
    # For 2 df the t CDF is 0.5 + t / (2 sqrt(2 + t^2)), so p = 1 - 5 / sqrt(27); t(0.975, 2) = 4.302653.
    d = paired_difference({0: 0.80, 1: 0.70, 2: 0.90, 3: 0.5}, {0: 0.70, 1: 0.65, 2: 0.80, 9: 0.1})
    assert d.seeds == (0, 1, 2)  # only the seeds both sides have are paired
    assert d.difference.mean == pytest.approx(1 / 12)
    assert d.difference.std == pytest.approx(math.sqrt(1 / 1200))
    assert d.p_value == pytest.approx(1 - 5 / math.sqrt(27))
    half = 4.302653 * math.sqrt(1 / 1200) / math.sqrt(3)
    assert (d.difference.low, d.difference.high) == pytest.approx((1 / 12 - half, 1 / 12 + half), abs=1e-6)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    same = paired_difference({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})  # no spread: no test
    assert math.isnan(same.p_value)


def test_holm_on_known_p_values():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.5, math.nan, 0.01])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_seeds_needed_by_hand():
    # sd = mean: t(0.975, n-1)/sqrt(n) < 1 first at n = 7 (2.447/2.646 = 0.925; n = 6: 2.571/2.449 = 1.05).
    assert seeds_needed(1.0, 1.0) == 7
    assert seeds_needed(1.0, -1.0) == 7
    # Differences 0.02, -0.01, 0.03: ratio 0.6405; n = 12: 2.201/3.464 = 0.635 (n = 11: 2.228/3.317 = 0.672).
    d = paired_difference({0: 0.02, 1: -0.01, 2: 0.03}, {0: 0.0, 1: 0.0, 2: 0.0}).difference
    assert seeds_needed(d.std, d.mean) == 12
    assert seeds_needed(1.0, 0.0) is None and seeds_needed(math.nan, 0.1) is None
    assert seeds_needed(1.0, 1e-4) == 1001


def _grouped(n_groups=10, per_group=100, seed=0):
    """Each group entirely right or entirely wrong: images of a group are far from independent."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(2), n_groups * per_group // 2)
    groups = np.repeat(np.arange(n_groups), per_group)
    right = np.repeat(np.arange(n_groups) % 2 == 0, per_group)
    preds = np.where(right, labels, 1 - labels)
    order = rng.permutation(len(labels))
    return labels[order], preds[order], groups[order].astype(str)


def test_bootstrap_resamples_groups_not_images():
    labels, preds, groups = _grouped()
    by_group = group_bootstrap(labels, preds, groups)
    by_image = group_bootstrap(labels, preds)
    assert by_group.mean == pytest.approx(0.5) and by_image.mean == pytest.approx(0.5)
    assert by_group.n == 10 and by_image.n == 1000
    # 10 independent units, half right: the interval spans tens of points; 1000 images would give a few.
    assert by_group.high - by_group.low > 0.3
    assert by_image.high - by_image.low < 0.1
    assert by_group == group_bootstrap(labels, preds, groups)  # seeded: reproducible


def test_paired_bootstrap_of_identical_runs_is_zero():
    labels, preds, groups = _grouped()
    i = group_bootstrap(labels, preds, groups, other_preds=preds)
    assert (i.mean, i.low, i.high) == (0.0, 0.0, 0.0)
    better = group_bootstrap(labels, labels, groups, other_preds=preds)
    assert better.mean == pytest.approx(0.5) and better.low > 0
    with pytest.raises(ValueError):
        group_bootstrap(labels, preds[:-1], groups)
    assert not group_bootstrap([0, 1], [0, 1], ["a", "a"]).has_interval  # one group: no interval
