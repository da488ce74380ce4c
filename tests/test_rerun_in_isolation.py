"""benchmarks/rerun_in_isolation.py: a recorded run rerun alone, on the study's own encoder of its own
pretraining seed, gives the recorded numbers; a record that does not match is reported."""

import json

from histossl.cli import main

from conftest import load_benchmark
from test_study import study_args


def test_runs_rerun_alone_reproduce_their_records_and_a_changed_record_is_caught(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study"
    with caplog.at_level("INFO", logger="histossl.study"):
        assert main(study_args(study, "encoders={simclr: {method: simclr, protocols: [finetune, linear]}}", "pretrain.seeds=[0, 1]", "downstream.seeds=[0, 1]",
                               "downstream.fractions=[0.5]", "downstream.protocols=[finetune, linear]")) == 0
    assert "left at this pace" in caplog.text  # the study says how long its remaining runs should take
    names = ["simclr__finetune__cosine__f0.5__s1__p1", "downstream/simclr__linear__f0.5__s1__p1",
             "supervised__finetune__cosine__f0.5__s0"]
    rerun = load_benchmark("rerun_in_isolation")
    assert rerun.main([str(study), *names, "--out", str(tmp_path / "alone")]) == 0
    printed = capsys.readouterr().out
    assert "largest |difference| of test_balanced_acc: 0.000000" in printed
    # Each rerun folder made only its own run, on the copied encoder (nothing pretrained again).
    for name in names:
        folder = tmp_path / "alone" / name.removeprefix("downstream/")
        assert [json.loads(line)["run"] for line in (folder / "results.jsonl").read_text().splitlines()] == [f"downstream/{folder.name}"]
        assert not list(folder.glob("pretrain/*/checkpoints"))
    # A record that the rerun does not reproduce fails the check.
    lines = (study / "results.jsonl").read_text().splitlines()
    changed = [json.loads(line) for line in lines]
    for r in changed:
        if r["run"] == "downstream/simclr__linear__f0.5__s1__p1":
            r["test_balanced_acc"] += 0.1
    (study / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert rerun.main([str(study), "simclr__linear__f0.5__s1__p1", "--out", str(tmp_path / "again")]) == 1
    assert "largest |difference| of test_balanced_acc: 0.100000" in capsys.readouterr().out
