"""A study folder rebuilt from its published copy: only the missing runs run, and only the encoders
they read are pretrained again (benchmarks/publish_report.py --restore, study.unrecorded_encoders)."""

import importlib.util
import json
from pathlib import Path

from histossl import records
from histossl.cli import main
from test_study import study_args

REPO = Path(__file__).resolve().parents[1]


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish_report", REPO / "benchmarks" / "publish_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_restored_study_retrains_only_the_encoders_its_missing_runs_read(tmp_path):
    publish = _publish_module()
    first = tmp_path / "first"
    assert main(study_args(first)) == 0
    stages = sorted(p.name for p in (first / "pretrain").iterdir())
    assert len(stages) == 2  # rotnet and simclr, one pretraining seed

    docs = tmp_path / "docs"
    publish.publish(first, docs)
    for stage in stages:  # descriptions and curves are published, weights are not
        assert sorted(p.name for p in (docs / "pretrain" / stage).iterdir()) == ["metrics.csv", "stage.json"]

    out = tmp_path / "restored"
    publish.restore(docs, out)
    kept = [r for r in records.load(out / "results.jsonl") if r["encoder"] != "simclr"]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(study_args(out)) == 0

    rerun = {r["run"] for r in records.load(out / "results.jsonl")}
    assert rerun == {r["run"] for r in records.load(first / "results.jsonl")}
    simclr = next(s for s in stages if s.startswith("simclr"))
    rotnet = next(s for s in stages if s.startswith("rotnet"))
    assert (out / "pretrain" / simclr / "encoder.safetensors").is_file()
    assert not (out / "pretrain" / rotnet / "encoder.safetensors").exists()  # all its runs were recorded
    # Pretraining on a CPU is deterministic: the retrained stage has the published curve.
    assert (out / "pretrain" / simclr / "metrics.csv").read_text() == (first / "pretrain" / simclr / "metrics.csv").read_text()
    report = (out / "report.md").read_text()
    assert rotnet in report and simclr in report  # both stages described, from their published stage.json


def test_restore_refuses_a_folder_with_records(tmp_path):
    publish = _publish_module()
    (tmp_path / "docs").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("{}\n")
    try:
        publish.restore(tmp_path / "docs", tmp_path / "out")
    except SystemExit as stop:
        assert "results.jsonl exists" in str(stop)
    else:
        raise AssertionError("restore overwrote a folder with records")
