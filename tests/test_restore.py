"""A study folder rebuilt from its published copy: only the missing runs run, and only the encoders
they read are pretrained again (benchmarks/publish_report.py --restore, study.unrecorded_encoders)."""

import json

from histossl import records
from histossl.cli import main
from histossl.report.flags import find_flags
from histossl.report.records import Stage, load_stages

from conftest import load_benchmark
from test_study import study_args


def test_a_restored_study_retrains_only_the_encoders_its_missing_runs_read(tmp_path):
    publish = load_benchmark("publish_report")
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
    # Same code, same machine: the retrained stage has the published curve, and says so.
    assert (out / "pretrain" / simclr / "metrics.csv").read_text() == (first / "pretrain" / simclr / "metrics.csv").read_text()
    assert (out / "pretrain" / simclr / "metrics.first.csv").read_text() == (docs / "pretrain" / simclr / "metrics.csv").read_text()
    stage_json = json.loads((out / "pretrain" / simclr / "stage.json").read_text())
    assert stage_json["remade"]["same_curve"] is True
    assert not [f for f in find_flags(records.load(out / "results.jsonl"), load_stages(out)) if f.kind == "remade"]
    assert "remade" not in json.loads((out / "pretrain" / rotnet / "stage.json").read_text())  # not retrained
    report = (out / "report.md").read_text()
    assert rotnet in report and simclr in report  # both stages described, from their published stage.json


def test_restore_refuses_a_folder_with_records(tmp_path):
    publish = load_benchmark("publish_report")
    (tmp_path / "docs").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("{}\n")
    try:
        publish.restore(tmp_path / "docs", tmp_path / "out")
    except SystemExit as stop:
        assert "results.jsonl exists" in str(stop)
    else:
        raise AssertionError("restore overwrote a folder with records")


def test_a_remade_encoder_whose_curve_differs_is_flagged():
    def stage(remade):
        info = {"method": "rotnet", "chain": "ebhi", **({"remade": remade} if remade else {})}
        return Stage("pretrain/rotnet_ebhi_8ef45ee9_seed1", info, [0, 1], [1.3, 1.14586], [0.36, 0.41], [], [])

    differs = {"same_curve": False, "first_last_epoch": {"epoch": "1", "pretext_loss": "1.1454"}}
    flags = [f for f in find_flags([], [stage(differs)]) if f.kind == "remade"]
    assert len(flags) == 1 and flags[0].stage == "pretrain/rotnet_ebhi_8ef45ee9_seed1"
    assert "1.1454 then, 1.14586 now" in flags[0].message and "not the same weights" in flags[0].message
    assert not [f for f in find_flags([], [stage({"same_curve": True}), stage(None)]) if f.kind == "remade"]


def test_runs_on_stages_missing_from_a_partly_restored_folder_are_flagged_once():
    described = Stage("pretrain/simclr_ebhi_4366b5d2_seed1", {"method": "simclr"}, [0], [4.3], [0.1], [], [])
    records = [{"run": f"r{i}", "pretrain_dir": folder} for i, folder in
               enumerate(["pretrain/simclr_ebhi_4366b5d2_seed1", "pretrain/simclr_ebhi_aaaa_seed0/", "pretrain/simclr_ebhi_aaaa_seed0"])]
    flags = [f for f in find_flags(records, [described]) if f.kind == "undescribed"]
    assert len(flags) == 1 and flags[0].message.startswith("2 runs read encoders of 1 pretraining stages")
    assert "`pretrain/simclr_ebhi_aaaa_seed0`" in flags[0].message
    # A folder with no stage at all (a copy published before stages were) says so in its header instead.
    assert not [f for f in find_flags(records, []) if f.kind == "undescribed"]
    assert not [f for f in find_flags(records[:1], [described]) if f.kind == "undescribed"]


def test_a_stage_stopped_while_trained_again_is_reported_from_its_first_training(tmp_path):
    folder = tmp_path / "pretrain" / "barlow_twins_ebhi_1_seed4"
    folder.mkdir(parents=True)
    (folder / "stage.first.json").write_text('{"method": "barlow_twins", "epochs": 16}')
    (folder / "metrics.first.csv").write_text("epoch,pretext_loss\n0,9.5\n15,1.2\n")
    (folder / "metrics.csv").write_text("epoch,pretext_loss\n0,9.5\n")  # the retraining, stopped after one epoch
    (stage,) = load_stages(tmp_path)
    assert stage.info == {"method": "barlow_twins", "epochs": 16} and stage.pretext_loss == [9.5, 1.2]
