"""The study end to end on a tiny synthetic set: records, report, model selection, frozen vs fine-tune."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histossl import config, features, records, study
from histossl.protocols import finetune
from histossl.cli import main
from histossl.train import downstream

TINY = [
    "image_size=16",
    "synth.n_groups=4",
    "synth.per_class_per_group=6",
    "synth.image_size=16",
    "synth.classes=[tumour, stroma, adipose]",
    "split.val_fraction=0.25",
    "split.test_fraction=0.25",
    "pretrain.epochs=1",
    "pretrain.batch_size=8",
    "encoders.rotnet.method=rotnet",
    "encoders.simclr.method=simclr",
    "downstream.fractions=[0.5, 1.0]",
    "downstream.lr_schedules=[cosine]",
    "downstream.epochs=2",
    "downstream.frozen_epochs=3",
    "downstream.batch_size=8",
    "trainer.progress=false",
]


def tiny_config(*extra: str) -> config.Config:
    return config.load(None, TINY + list(extra))


def study_args(out: Path, *extra: str) -> list[str]:
    empty = out.parent / f"{out.name}.yaml"
    empty.write_text("name: tiny\n")
    return ["study", str(empty), "--out", str(out), *sum((["--set", s] for s in TINY + list(extra)), [])]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(study_args(out)) == 0
    return out


def test_study_writes_contract_outputs(finished_study):
    out = finished_study
    recs = records.load(out / "results.jsonl")
    # 2 encoders x 2 modes x 2 fractions, and the supervised baseline at 2 fractions
    assert len(recs) == 10
    assert len({r["run"] for r in recs}) == 10
    fields = ["method", "pretrain_chain", "mode", "label_fraction", "n_labeled", "lr", "lr_schedule", "seed", "epochs",
              "best_epoch", "test_loss", "test_acc", "test_balanced_acc", "test_macro_f1", "test_auroc", "n_test", "wall_s"]
    for r in recs:
        assert all(f in r for f in fields), r
        assert (out / r["run"] / "metrics.csv").is_file()
    assert {r["method"] for r in recs} == {"rotnet", "simclr", "supervised"}
    assert {r["pretrain_chain"] for r in recs} == {"target", "none"}
    for stage in (out / "pretrain").iterdir():
        assert (stage / "encoder.safetensors").is_file() and (stage / "metrics.csv").is_file()
        assert (stage / "checkpoints" / "last.ckpt").is_file()
    cfg_text = (out / "config.yaml").read_text()
    assert "select_metric" in cfg_text  # every default filled in
    report = (out / "report.md").read_text()
    assert "rotnet" in report and "supervised" in report and " / " in report
    # Provenance: every record says what made it; the command, its machine and wall time are logged.
    assert all(r["device"] and r["torch_version"] == torch.__version__ and r["histossl_version"] for r in recs)
    invocations = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert [i["event"] for i in invocations[:2]] == ["start", "end"] and invocations[1]["status"] == "finished"
    assert invocations[0]["command"].startswith("histossl study ") and invocations[1]["wall_s"] > 0
    assert "## Provenance" in report and "| finished |" in report and invocations[0]["machine"] in report


def test_fractions_follow_the_saved_subsets(finished_study):
    out = finished_study
    subsets = json.loads((out / "subsets.json").read_text())["0"]
    small, full = set(subsets["0.5"]["paths"]), set(subsets["1.0"]["paths"])
    assert small < full
    by_fraction = {r["label_fraction"]: r["n_labeled"] for r in records.load(out / "results.jsonl")}
    assert by_fraction == {0.5: len(small), 1.0: len(full)}


def test_rerun_redoes_nothing_and_report_rebuilds_identically(finished_study, capsys):
    out = finished_study
    before = (out / "results.jsonl").read_text()
    assert main(study_args(out)) == 0
    assert (out / "results.jsonl").read_text() == before
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_changed_config_refuses_to_mix_into_the_same_folder(finished_study, capsys):
    assert main(study_args(finished_study, "downstream.epochs=3")) == 2
    assert "downstream.epochs" in capsys.readouterr().err


def _target(cfg, out):
    data, subsets = study.target_data(cfg, study.load_dataset(cfg, cfg.target, out), out)
    return data, subsets


def _spec(out: Path, mode: str, init: str) -> downstream.RunSpec:
    return downstream.RunSpec(
        name=f"x__{mode}", encoder="x", method="rotnet", pretrain_chain="target", pretrain_dir=None,
        init=init, protocol=mode, lr_schedule="cosine", label_fraction=1.0, seed=0,
    )


def _encoder_file(out: Path) -> str:
    return str(next((out / "pretrain").glob("rotnet_*")) / "encoder.safetensors")


def test_frozen_leaves_encoder_unchanged_finetune_changes_it(finished_study, tmp_path, monkeypatch):
    cfg = tiny_config()
    data, subsets = _target(cfg, finished_study)
    encoder_file = _encoder_file(finished_study)
    built = []
    real_build = finetune.build_encoder

    def spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(features, "build_encoder", spy)
    monkeypatch.setattr(finetune, "build_encoder", spy)
    from safetensors.torch import load_file

    start = load_file(encoder_file)
    for mode in ("frozen", "finetune"):
        built.clear()
        stored = features.features(cfg, Path(encoder_file), data.images, tmp_path / "features", data.key) if mode == "frozen" else None
        downstream.run(cfg, _spec(tmp_path, mode, encoder_file), data, subsets[0][1.0], tmp_path / mode, stored)
        trained = {k.removeprefix("net."): v for k, v in built[0].state_dict().items()}
        changed = any(not torch.equal(start[k], trained[k]) for k in start if k.endswith("weight"))
        assert changed == (mode == "finetune"), mode
    assert all(torch.equal(v, load_file(encoder_file)[k]) for k, v in start.items())


def test_test_labels_cannot_influence_model_selection(finished_study, tmp_path):
    cfg = tiny_config("downstream.epochs=3")
    data, subsets = _target(cfg, finished_study)
    spec = _spec(tmp_path, "finetune", _encoder_file(finished_study))
    first = downstream.run(cfg, spec, data, subsets[0][1.0], tmp_path / "a")
    labels = data.labels.copy()
    rng = np.random.default_rng(0)
    labels[data.test] = (labels[data.test] + 1 + rng.integers(0, 2, len(data.test))) % 3  # every test label wrong
    shuffled = dataclasses.replace(data, labels=labels)
    second = downstream.run(cfg, spec, shuffled, subsets[0][1.0], tmp_path / "b")
    assert second.best_epoch == first.best_epoch
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()
    assert second.confusion_matrix != first.confusion_matrix and second.test_loss != first.test_loss


def test_seed_report_config_parses():
    cfg = config.load(Path(__file__).parents[1] / "configs" / "seed-report.yaml")
    assert cfg.backbone.name == "resnet50" and cfg.image_size == 224
    assert {e.method for e in cfg.encoders.values()} == {"rotnet", "rotnet_jitter", "simclr"}
    chains = {
        ">".join(([e.init] if e.init != "random" else []) + config.encoder_chain(cfg, e))
        for e in cfg.encoders.values()
        if e.method == "simclr"
    }
    assert chains == {"imagenet>target", "other", "imagenet>other", "other>target", "imagenet>other>target"}
    assert cfg.downstream.fractions == [0.05, 0.25, 0.5, 1.0] and cfg.downstream.constant_lr == 5e-6


def test_best_threshold_maximises_validation_balanced_accuracy():
    from histossl.metrics import best_threshold, classification_metrics

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(300, int), np.ones(60, int)]  # imbalanced, as IDC
    score = rng.normal(0, 1, 360) + 1.2 * labels - 1.5  # class 1 is rarely the argmax
    logits = np.stack([np.zeros(360), score], 1)
    t = best_threshold(logits, labels)
    tuned = classification_metrics(logits, labels, 2, t)["balanced_acc"]
    grid = max(classification_metrics(logits, labels, 2, g)["balanced_acc"] for g in np.linspace(0.01, 0.99, 99))
    assert tuned >= grid - 1e-9
    assert tuned > classification_metrics(logits, labels, 2)["balanced_acc"] + 0.1
    assert best_threshold(logits[:300], labels[:300]) == 0.5  # one class: nothing to choose


def test_step_budget_validation_interval_and_validation_threshold(tmp_path):
    cfg = tiny_config("synth.classes=[tumour, stroma]", "downstream.steps=24", "downstream.validations=2",
                      "downstream.threshold=val", "downstream.batch_size=4")
    data, subsets = _target(cfg, tmp_path / "study")
    labeled = subsets[0][0.5]
    spec = dataclasses.replace(_spec(tmp_path, "finetune", "random"), label_fraction=0.5)
    rec = downstream.run(cfg, spec, data, labeled, tmp_path / "run")
    per_epoch = -(-len(labeled) // 4)
    every = max(1, -(-24 // per_epoch) // 2)
    assert every > 1
    assert rec.epochs % every == 0 and rec.epochs * per_epoch >= 24 > (rec.epochs - every) * per_epoch
    assert rec.steps == rec.epochs * per_epoch - (len(labeled) % 4 == 1) * rec.epochs
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    validated = [int(r.split(",")[0]) for r in rows if r.split(",")[4] != ""]
    assert validated == [e for e in range(rec.epochs) if (e + 1) % every == 0]
    assert rec.best_epoch in validated
    assert 0 < rec.threshold <= 1


def test_step_budget_caps_an_epoch_of_a_large_subset():
    d = config.load(None, ["downstream.steps=50", "downstream.validations=3"]).downstream
    assert downstream.finetune_epochs(d, 111) == (1, 1, 50, 0)  # 100% of IDC: half an epoch
    assert downstream.finetune_epochs(d, 6) == (9, 3, None, 0)  # 5%: nine epochs, validated every third
    assert downstream.finetune_epochs(dataclasses.replace(d, steps=None, epochs=4), 6) == (4, 1, None, 0)


def test_tuning_run_never_reads_the_test_split(finished_study, tmp_path):
    cfg = tiny_config("downstream.test=false")
    data, subsets = _target(cfg, finished_study)
    labels = data.labels.copy()
    labels[data.test] = 99  # not a class: any use of the test labels would fail
    images = np.array(data.images)
    images[data.test] = 0
    blinded = dataclasses.replace(data, labels=labels, images=images)
    for mode in ("frozen", "finetune"):
        spec = _spec(tmp_path, mode, _encoder_file(finished_study))
        stored = features.features(cfg, Path(spec.init), data.images, tmp_path / "features", data.key) if mode == "frozen" else None
        rec = downstream.run(cfg, spec, blinded, subsets[0][1.0], tmp_path / mode, stored)
        assert rec.test_acc is None and rec.test_auroc is None and rec.n_test == 0
        assert 0 <= rec.val_balanced_acc <= 1 and rec.val_loss > 0


def test_tuning_study_records_validation_and_writes_no_report(tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(study_args(out, "downstream.test=false", "downstream.fractions=[1.0]", "downstream.modes=[frozen]",
                           "downstream.baselines=[]", "encoders={simclr: {method: simclr}}")) == 0
    recs = records.load(out / "results.jsonl")
    assert len(recs) == 1 and recs[0]["test_acc"] is None and recs[0]["val_auroc"] is not None
    assert not (out / "report.md").exists()
    assert "results:" in capsys.readouterr().out


def test_each_run_saves_its_test_predictions_with_groups(finished_study):
    """test_predictions.csv: one row per test image with its group; it reproduces the record's balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    from histossl import predictions

    split = {}
    for line in (finished_study / "split.csv").read_text().splitlines()[1:]:
        path, label, group, part = line.split(",")
        split[path] = (label, group, part)
    for r in records.load(finished_study / "results.jsonl"):
        found = predictions.read(finished_study / r["run"] / predictions.FILE)
        assert found is not None and len(found.paths) == r["n_test"]
        assert all(split[p] == (label, group, "test") for p, label, group in zip(found.paths, found.labels, found.groups))
        assert len(set(found.groups)) < len(found.groups)  # a synthetic slide holds many test images
        assert balanced_accuracy_score(found.labels, found.preds) == pytest.approx(r["test_balanced_acc"])


def test_runs_go_seed_by_seed_stored_features_first_within_a_seed(tmp_path):
    from histossl.train import pretrain

    cfg = tiny_config("downstream.protocols=[finetune, linear]", "downstream.seeds=[3, 1]")
    encoders = {name: [pretrain.plan_stages(cfg, entry)[-1]] for name, entry in cfg.encoders.items()}
    planned = study.run_specs(cfg, encoders, tmp_path)
    ordered = study.in_run_order(cfg, planned)
    assert sorted(s.name for s in ordered) == sorted(s.name for s in planned)
    assert [s.seed for s in ordered] == sorted((s.seed for s in ordered), key=[3, 1].index)  # seed 3 whole, then 1
    for seed in (3, 1):
        kinds = [s.protocol for s in ordered if s.seed == seed]
        assert kinds == sorted(kinds, key=["linear", "finetune"].index)
        assert {s.encoder for s in ordered if s.seed == seed and s.protocol == "finetune"} == {"rotnet", "simclr", "supervised"}


def test_a_study_pretrains_each_seeds_encoders_just_before_that_seeds_runs(tmp_path, monkeypatch):
    from histossl.train import pretrain

    cfg = tiny_config("downstream.protocols=[linear]", "downstream.seeds=[3, 1]", "pretrain.seeds=[3, 1]")
    specs = study.run_specs(cfg, study.last_stages(study.plan_encoders(cfg)), tmp_path)
    calls = []
    monkeypatch.setattr(study, "pretrain_all", lambda cfg, out, needed: calls.append(("pretrain", needed)))
    monkeypatch.setattr(study, "run_downstream", lambda cfg, out, specs, seed: calls.append(("run", seed)))
    study.pretrain_and_run(cfg, tmp_path, specs)
    folders = {seed: {Path(s.pretrain_dir).name for s in specs if s.seed == seed and s.pretrain_dir} for seed in (3, 1)}
    assert folders[3].isdisjoint(folders[1]) and len(folders[3]) == len(cfg.encoders)
    assert calls == [("pretrain", folders[3]), ("run", 3), ("pretrain", folders[1]), ("run", 1)]


def test_a_protocol_runs_at_its_own_budgets_and_the_baselines_at_fine_tunings(tmp_path):
    from histossl.train import pretrain

    cfg = tiny_config("downstream.protocols=[finetune, linear]", "downstream.fractions=[0.25, 0.5, 1.0]", "downstream.shots=[2]",
                      "downstream.budgets_of={finetune: {fractions: [1.0], shots: [2]}}")
    encoders = {name: [pretrain.plan_stages(cfg, entry)[-1]] for name, entry in cfg.encoders.items()}
    budgets = {}
    for spec in study.run_specs(cfg, encoders, tmp_path):
        budgets.setdefault((spec.encoder, spec.protocol), set()).add(spec.budget)
    assert budgets[("simclr", "linear")] == {0.25, 0.5, 1.0, ("shots", 2)}
    assert budgets[("simclr", "finetune")] == budgets[("supervised", "finetune")] == {1.0, ("shots", 2)}
    # The baselines at budgets of their own: the encoders fine-tuned at 25% only, supervised at 25% and 100%.
    cfg = tiny_config("downstream.protocols=[finetune, linear]", "downstream.fractions=[0.25, 0.5, 1.0]",
                      "downstream.budgets_of={finetune: {fractions: [0.25]}, supervised: {fractions: [0.25, 1.0]}}")
    budgets = {}
    for spec in study.run_specs(cfg, encoders, tmp_path):
        budgets.setdefault((spec.encoder, spec.protocol), set()).add(spec.budget)
    assert budgets[("simclr", "finetune")] == {0.25} and budgets[("supervised", "finetune")] == {0.25, 1.0}
    assert budgets[("simclr", "linear")] == {0.25, 0.5, 1.0}


def test_an_encoder_evaluated_with_some_protocols_only(tmp_path):
    from histossl.train import pretrain

    cfg = tiny_config("downstream.protocols=[finetune, linear, knn]", "downstream.fractions=[1.0]",
                      "encoders={simclr: {method: simclr}, rotnet: {method: rotnet, protocols: [linear, knn]}}")
    encoders = {name: [pretrain.plan_stages(cfg, entry)[-1]] for name, entry in cfg.encoders.items()}
    protocols = {}
    for spec in study.run_specs(cfg, encoders, tmp_path):
        protocols.setdefault(spec.encoder, set()).add(spec.protocol)
    assert protocols == {"simclr": {"finetune", "linear", "knn"}, "rotnet": {"linear", "knn"}, "supervised": {"finetune"}}
    # A protocol the study does not run is refused, naming the key.
    with pytest.raises(config.ConfigError, match=r"encoders\.rotnet\.protocols"):
        tiny_config("downstream.protocols=[finetune, linear]", "encoders={rotnet: {method: rotnet, protocols: [knn]}}")


def test_min_steps_keeps_a_small_subset_training_and_spaces_its_validations():
    d = config.load(None, ["downstream.min_steps=300", "downstream.patience=5", "downstream.epochs=30"]).downstream
    # 5% of a set: 2 batches an epoch -> at least 150 epochs, validated every 15, room for 5 more validations.
    assert downstream.finetune_epochs(d, 2) == (225, 15, None, 150)
    # 100%: 21 batches an epoch -> at least 15 epochs, validated every epoch; the maximum of 30 stands.
    assert downstream.finetune_epochs(d, 21) == (30, 1, None, 15)
    # A fixed step budget ignores it.
    assert downstream.finetune_epochs(dataclasses.replace(d, steps=40), 2)[3] == 0


def test_bf16_mixed_trains_on_cpu_and_warns_where_bf16_is_emulated(tmp_path, monkeypatch, caplog):
    from histossl import preflight

    out = tmp_path / "bf16"
    monkeypatch.setattr(preflight, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="histossl.preflight"):
        assert main(study_args(out, "trainer.precision=bf16-mixed", "encoders={simclr: {method: simclr}}",
                               "downstream.protocols=[finetune, linear]", "downstream.fractions=[1.0]")) == 0
    assert "without native bfloat16" in caplog.text and "trainer.precision=32-true" in caplog.text
    recs = records.load(out / "results.jsonl")
    assert {r["run"].split("__")[1] for r in recs} == {"finetune", "linear"} and len(recs) == 3
    assert all(np.isfinite(r["test_loss"]) and r.get("status") != "diverged" for r in recs)


def test_a_study_stopped_part_way_is_reported_as_partial(finished_study, tmp_path):
    import shutil

    from histossl.report import build_report

    out = tmp_path / "partial"
    shutil.copytree(finished_study, out)
    planned = json.loads((out / "plan.json").read_text())["runs"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sorted(planned) == sorted(json.loads(line)["run"] for line in lines)
    assert "Partial" not in build_report(out).read_text()
    (out / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    text = build_report(out).read_text()
    assert f"**Partial: {len(planned) - 2} of the {len(planned)} planned runs are recorded**, 2 still to run" in text
