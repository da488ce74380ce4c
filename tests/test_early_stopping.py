"""Downstream runs trained to convergence: early stopping on the validation metric, and the flag for
runs that reached their maximum while still improving."""

import numpy as np

from histossl import config
from histossl.data.splits import shot_subsets
from histossl.report.flags import find_flags
from histossl.train.downstream import RunSpec, TargetData, how_it_ended, run


def _frozen_run(tmp_path, features, labels, **downstream):
    rows = np.arange(len(labels))
    n = len(labels)
    train, val, test = rows[: n // 2], rows[n // 2 : 3 * n // 4], rows[3 * n // 4 :]
    data = TargetData(np.zeros((n, 4, 4, 3), np.uint8), labels, ["a", "b", "c"], train, val, test, "k")
    labeled = shot_subsets(labels, train, [10], seed=0)[10]
    cfg = config.load(None, [f"downstream.{k}={v}" for k, v in downstream.items()])
    spec = RunSpec(name="r", encoder="e", method="m", pretrain_chain="t", pretrain_dir=None, init="x",
                   protocol="frozen", lr_schedule="constant", label_fraction=None, shots=10, seed=0)
    return run(cfg, spec, data, labeled, tmp_path / "r", features)


def test_a_run_stops_when_validation_stops_improving(tmp_path):
    # Pure noise: nothing to learn, the validation metric stops improving after a few epochs.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)[rng.permutation(120)]
    features = rng.normal(size=(120, 8)).astype(np.float32)
    record = _frozen_run(tmp_path, features, labels, frozen_epochs=200, patience=3, select_metric="val_loss")
    assert record.stopped == "early"
    assert record.epochs == 200 and record.epochs_run < 200
    assert record.epochs_run <= record.best_epoch + 1 + 3  # stopped `patience` epochs after the best one
    assert not [f for f in find_flags([record.to_dict()], []) if f.kind == "hit_maximum"]


def test_a_run_that_hits_its_maximum_while_improving_is_flagged(tmp_path):
    # Separable classes and a tiny lr: validation loss still falls when the 3 epochs are spent.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)[rng.permutation(120)]
    features = (np.eye(3)[labels] * 3 + rng.normal(0, 0.1, (120, 3))).astype(np.float32)
    record = _frozen_run(tmp_path, features, labels, frozen_epochs=3, patience=10, lr=1.0e-4, select_metric="val_loss")
    assert record.stopped == "max" and record.epochs_run == 3 and record.best_epoch == 2
    flags = [f for f in find_flags([record.to_dict()], []) if f.kind == "hit_maximum"]
    assert len(flags) == 1 and flags[0].runs == ("downstream/r",)


def test_without_patience_every_run_takes_its_whole_budget(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)[rng.permutation(120)]
    features = rng.normal(size=(120, 8)).astype(np.float32)
    record = _frozen_run(tmp_path, features, labels, frozen_epochs=6, patience="null")
    assert record.stopped == "budget" and record.epochs_run == 6


def test_log_probabilities_of_zero_are_scores_not_divergence():
    from histossl.errors import Diverged
    from histossl.metrics import classification_metrics

    logits = np.log(np.array([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]))  # -inf where p = 0
    m = classification_metrics(logits, np.array([0, 1, 2]), 3)
    assert m["acc"] == 1.0 and np.isfinite(m["loss"])
    for broken in ([[np.nan, 0.0, 0.0]], [[np.inf, 0.0, 0.0]], [[-np.inf, -np.inf, -np.inf]]):
        try:
            classification_metrics(np.array(broken), np.array([0]), 3)
        except Diverged:
            continue
        raise AssertionError(f"{broken} did not raise Diverged")


def test_min_steps_trains_that_many_steps_before_early_stopping_may_end_a_run(tmp_path):
    # The noise run above stops after a few epochs; with min_steps it trains at least that many steps
    # (30 labelled images, batch 64: one step an epoch) and early stopping counts only after them.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)[rng.permutation(120)]
    features = rng.normal(size=(120, 8)).astype(np.float32)
    record = _frozen_run(tmp_path, features, labels, frozen_epochs=20, patience=3, select_metric="val_loss", min_steps=40)
    assert record.steps >= 40 and record.stopped == "early"
    assert record.epochs >= 40 + 3 * 4  # the maximum grew to the minimum plus patience (validated every 4th epoch)


def test_a_run_whose_best_epoch_is_long_past_when_its_maximum_comes_is_not_still_improving():
    # EBHI, 5% fine-tuning, min_steps 300: validated every 15 epochs, patience 5, maximum 225 epochs.
    assert how_it_ended(True, False, best_epoch=59, epochs_run=225, patience=5, every=15) == "early"  # 11 validations without a better one
    assert how_it_ended(True, False, best_epoch=209, epochs_run=225, patience=5, every=15) == "max"  # one validation ago
    assert how_it_ended(True, True, best_epoch=30, epochs_run=100, patience=5, every=15) == "early"
    assert how_it_ended(False, False, best_epoch=59, epochs_run=225, patience=5, every=15) == "budget"
