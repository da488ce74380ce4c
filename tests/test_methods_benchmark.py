"""The methods benchmark: epochs from the calibrated seconds per epoch, and a tiny run end to end (resumable)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import load_benchmark


def test_epochs_fill_the_same_budget():
    bench = load_benchmark("methods")
    calibration = {"methods": {"cheap": {"seconds_per_epoch": 2.0}, "dear": {"seconds_per_epoch": 7.0},
                               "slow": {"seconds_per_epoch": 50.0}}}
    data, epochs = bench.with_epochs({"encoders": {}, "name": "x"}, calibration, ["cheap", "dear", "slow"], 20.0)
    assert epochs == {"cheap": 10, "dear": 2, "slow": 1}  # floor(budget / s), at least 1
    assert data["encoders"]["dear"] == {"method": "dear", "epochs": 2} and data["name"] == "x"


def test_default_methods_are_the_registry():
    from histossl.methods import METHODS

    bench = load_benchmark("methods")
    args = bench.parse_args([])
    assert args.methods is None and len(METHODS.names()) >= 10  # main() takes METHODS.names() when none are given


@pytest.fixture
def grouped_folder(tmp_path) -> Path:
    """``ROOT/<case>/<class>/*.png``: 6 cases x 2 classes x 4 images of 20 x 24 px."""
    rng = np.random.default_rng(0)
    for case in range(6):
        for name in ("a", "b"):
            folder = tmp_path / "data" / f"case{case}" / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "data"


@pytest.mark.slow
def test_tiny_run_end_to_end_and_resumes(grouped_folder, tmp_path):
    bench = load_benchmark("methods")
    out = tmp_path / "out"
    argv = ["--data", str(grouped_folder), "--out", str(out), "--budget-s", "1", "--image-size", "16", "--seeds", "1",
            "--methods", "simclr", "rotnet", "--calibration-steps", "1",
            "--set", "pretrain.batch_size=8", "--set", "split.val_fraction=0.2", "--set", "split.test_fraction=0.3",
            "--set", "downstream.fractions=[1.0]", "--set", "downstream.epochs=2", "--set", "downstream.knn_k_grid=[3]",
            "--set", "downstream.min_steps=0",  # the base config's 300 steps are 300 one-batch epochs here (minutes)
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    table = bench.main(argv)
    calibration = json.loads((out / "calibration.json").read_text())
    study = yaml.safe_load((out / "methods-study.yaml").read_text())
    for m in ("simclr", "rotnet"):
        spe = calibration["methods"][m]["seconds_per_epoch"]
        assert spe > 0 and calibration["methods"][m]["losses_finite"]
        assert study["encoders"][m] == {"method": m, "epochs": max(1, int(1 // spe))}
    assert calibration["budget_s"] == 1 and calibration["versions"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["encoder"], r["protocol"]) for r in records} == {
        *((m, p) for m in ("simclr", "rotnet") for p in ("linear", "knn", "finetune")), ("supervised", "finetune")}
    text = table.read_text()
    assert "| simclr |" in text and "| supervised |" in text and "finetune 100%" in text and "Verdict" in text
    assert "validation cases" in text and "Partial" not in text
    # The table from the runs recorded so far, when some are missing, says it is partial.
    kept = (out / "results.jsonl").read_text().splitlines()[:-2]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    assert f"Partial: {len(kept)} of {len(records)} runs recorded" in bench.main([*argv, "--table-only"]).read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == len(kept)  # nothing ran
    # A rerun reuses the calibration (same epochs, so the same study) and runs only the missing runs.
    bench.main(argv)
    assert json.loads((out / "calibration.json").read_text())["calibrated_at"] == calibration["calibrated_at"]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
