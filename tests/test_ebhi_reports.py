"""The EBHI-Seg study (configs/ebhi-cpu.yaml) and its tuning: the split keeps every case whole and is
the committed one; the committed study is the config's, its records the runs the config plans, its
labelled subsets training images of the sizes the records name; the tuning studies never evaluated
the test split."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from histossl import config, study
from histossl.data.sources import load_index
from histossl.data.splits import make_split, save_split

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"
STUDY = DOCS / "ebhi" / "ebhi-cpu"
# The study's and the methods benchmark's (every run of it: same config split, same data).
COMMITTED_SPLITS = [DOCS / "ebhi" / "ebhi-cpu" / "split.csv", *sorted((DOCS / "methods-ebhi").glob("*/split.csv"))]


def test_the_study_split_keeps_cases_whole_and_is_the_committed_one(shared_data, tmp_path):
    cfg = config.load(REPO / "configs" / "ebhi-cpu.yaml")
    index = load_index(shared_data / "ebhi-seg")
    split = make_split(index, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
    sides: dict[str, str] = {}
    for group, side in zip(index.groups, split):
        assert sides.setdefault(group, side) == side, f"case {group} is on two sides of the split"
    assert len(sides) == 524 and {"train", "val", "test"} == set(split)
    for label in np.unique(index.labels):  # every class, the rare ones included, is in every split
        assert {"train", "val", "test"} <= set(split[index.labels == label]), label
    save_split(tmp_path / "split.csv", index, split)
    committed = [path for path in COMMITTED_SPLITS if path.is_file()]
    assert committed  # the methods benchmark's runs at least
    for path in committed:  # the methods benchmark and the study use the same split
        assert path.read_text() == (tmp_path / "split.csv").read_text(), path


@pytest.mark.skipif(not (STUDY / "results.jsonl").is_file(), reason="the EBHI study is not committed yet")
def test_the_committed_study_is_the_configs_and_ran_its_plan():
    cfg = config.load(REPO / "configs" / "ebhi-cpu.yaml")
    assert config.load(STUDY / "config.yaml") == cfg  # the committed report is this config's
    planned = {f"downstream/{s.name}" for s in study.run_specs(cfg, study.last_stages(study.plan_encoders(cfg)), STUDY)}
    assert set(json.loads((STUDY / "plan.json").read_text())["runs"]) == planned
    runs = [json.loads(line)["run"] for line in (STUDY / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(runs) == len(set(runs)) and set(runs) <= planned  # no run twice, none the config does not plan
    partial = set(runs) != planned
    assert partial == ("**Partial:" in (STUDY / "report.md").read_text(encoding="utf-8"))  # a partial report says so first


@pytest.mark.skipif(not (STUDY / "subsets.json").is_file(), reason="the EBHI study's subsets are not committed yet")
def test_the_committed_labelled_subsets_are_training_images_and_the_records_sizes():
    with open(STUDY / "split.csv", newline="") as f:
        train = {row["path"] for row in csv.DictReader(f) if row["split"] == "train"}
    subsets = json.loads((STUDY / "subsets.json").read_text())
    for seed, by_budget in subsets.items():
        for budget, subset in by_budget.items():
            assert set(subset["paths"]) <= train and len(set(subset["paths"])) == subset["n"], (seed, budget)
    for line in (STUDY / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        budget = f"{record['shots']}-shot" if record.get("shots") else str(record["label_fraction"])
        assert record["n_labeled"] == subsets[str(record["seed"])][budget]["n"], record["run"]


def tuning_folders() -> list[Path]:
    root = DOCS / "ebhi" / "tuning"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.mark.skipif(not tuning_folders(), reason="the EBHI tuning study is not committed yet")
def test_the_committed_tuning_studies_never_evaluated_the_test_split():
    for folder in tuning_folders():
        cfg = config.load(folder / "config.yaml")
        assert cfg.downstream.test is False, folder.name
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
        assert records, folder.name
        for r in records:
            assert r["n_test"] == 0 and all(r[k] is None for k in r if k.startswith("test_")), (folder.name, r["run"])
            assert 0 < r["val_balanced_acc"] <= 1, (folder.name, r["run"])
