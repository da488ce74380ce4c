"""The time a study's remaining runs should take, from its own runs (histossl.pace)."""

from histossl import pace


def test_runs_are_timed_by_kind_and_budget_then_by_kind_and_unknown_kinds_give_no_estimate():
    timing = pace.Pace()
    timing.add(True, (0.05, None), 100.0)
    timing.add(True, (0.05, None), 140.0)   # fine-tuning at 5%: 120 s
    timing.add(True, (1.0, None), 600.0)    # fine-tuning at 100%: 600 s
    timing.add(False, (0.05, None), 2.0)    # on stored features
    timing.add(True, (0.5, None), None)     # a diverged run has no wall time: ignored
    assert timing.estimate(True, (0.05, None)) == 120.0
    assert timing.estimate(True, (0.25, None)) == (100 + 140 + 600) / 3  # no run at 25% yet: the kind's mean
    assert timing.left([(True, (0.05, None)), (True, (1.0, None)), (False, (1.0, None))]) == 120 + 600 + 2
    assert pace.Pace().left([(False, (None, 5))]) is None and timing.left([]) == 0.0
    assert [pace.duration(s) for s in (45, 840, 9360)] == ["45 s", "14.0 min", "2.6 h"]
