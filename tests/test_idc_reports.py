"""The committed IDC reports (docs/benchmarks/idc) reproduce from their configs: the same patient-level
split and the same label subsets come out of ../shared/data, and the records match the configs."""

import json
from pathlib import Path

import numpy as np
import pytest

from histossl import config
from histossl.data.sources import load_index
from histossl.data.splits import label_subsets, make_split, save_split
from histossl.train import pretrain

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks" / "idc"


@pytest.mark.parametrize("name", ["idc-cpu", "idc-chain-cpu"])
def test_committed_split_subsets_and_records_reproduce(name, shared_data, tmp_path):
    folder = DOCS / name
    if not (folder / "results.jsonl").is_file():
        pytest.skip(f"{folder}: no committed report")
    cfg = config.load(REPO / "configs" / f"{name}.yaml")
    index = load_index(shared_data / "idc-breast")
    split = make_split(index, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
    save_split(tmp_path / "split.csv", index, split)
    assert (tmp_path / "split.csv").read_text() == (folder / "split.csv").read_text()
    # Patient-level: no patient on two sides of the split.
    sides = {}
    for group, side in zip(index.groups, split):
        assert sides.setdefault(group, side) == side, group

    train = np.flatnonzero(split == "train")
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    expected = {
        (r["method"], r["pretrain_chain"], r["mode"], r["label_fraction"], r["seed"]) for r in records
    }
    assert len(expected) == len(records)  # no run twice
    assert {r["seed"] for r in records} == set(cfg.downstream.seeds)
    assert {r["label_fraction"] for r in records} == set(cfg.downstream.fractions)
    # Each SSL record names the stage its config plans for it: downstream seed i on pretraining seed i mod n.
    p_seeds = config.pretrain_seeds(cfg)
    for r in (r for r in records if r["method"] != "supervised"):
        p_seed = p_seeds[cfg.downstream.seeds.index(r["seed"]) % len(p_seeds)]
        stage = pretrain.plan_stages(cfg, cfg.encoders[r["encoder"]], p_seed)[-1]
        assert r["pretrain_dir"] == f"pretrain/{stage.folder}", r["run"]
        assert r.get("pretrain_seed", cfg.seed) == p_seed, r["run"]
    for seed in cfg.downstream.seeds:
        subsets = label_subsets(index.labels, train, cfg.downstream.fractions, seed)
        for r in (r for r in records if r["seed"] == seed):
            assert r["n_labeled"] == len(subsets[r["label_fraction"]]), r["run"]
            assert r["n_test"] == int((split == "test").sum()) and r["n_val"] == int((split == "val").sum())


def test_committed_tuning_sweep_never_evaluated_the_test_split():
    variants = sorted(p for p in (DOCS / "tuning").iterdir() if p.is_dir())
    table = (DOCS / "tuning.md").read_text()
    assert len(variants) >= 7
    for folder in variants:
        assert f"| {folder.name} |" in table, f"{folder.name} is not in tuning.md's table"
        cfg = config.load(folder / "config.yaml")
        assert cfg.downstream.test is False and cfg.downstream.fractions == [0.05], folder.name
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        assert records and all(r["test_acc"] is None and r["n_test"] == 0 for r in records), folder.name
        assert all(0 < r["val_balanced_acc"] <= 1 for r in records), folder.name
        assert {r["seed"] for r in records} == {0, 1, 2}, folder.name
