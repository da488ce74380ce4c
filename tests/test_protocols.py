"""Evaluation protocols, label budgets, the feature store and the run record.

kNN against a brute-force loop, the linear probe against scikit-learn called directly, shot subsets,
the feature store's reuse and recomputation, committed records through the typed record and the
report, and a protocol registered here running through a study and its report with no other change.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from histossl import config, features, records
from histossl.cli import main
from histossl.data.splits import label_subsets, shot_subsets
from histossl.errors import ConfigError
from histossl.models.backbones import build_encoder, save_encoder
from histossl.protocols import PROTOCOLS, Fitted, Job, Protocol
from histossl.protocols.knn import knn_votes
from histossl.report import build_report
from histossl.train.downstream import RunSpec, TargetData, run

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# A protocol registered by a test: the study and the report must take it with no other change.


@PROTOCOLS.register("nearest_centroid")
class NearestCentroid(Protocol):
    """Class means of the labelled features; score = minus the squared distance to each mean."""

    def fit(self, job: Job) -> Fitted:
        x = np.asarray(job.features, dtype=np.float64)
        y = job.data.labels[job.labeled]
        n_classes = len(job.data.classes)
        means = np.stack([x[job.labeled][y == c].mean(0) if (y == c).any() else np.full(x.shape[1], np.inf)
                          for c in range(n_classes)])

        def logits(rows):
            d = ((x[rows][:, None, :] - means[None]) ** 2).sum(-1)
            return -np.nan_to_num(d, posinf=1e12)

        return Fitted(logits)


def _blobs(n_per_class=40, n_classes=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = (centres[labels] + rng.normal(0, 1.5, (len(labels), dim))).astype(np.float32)
    order = rng.permutation(len(labels))
    return x[order], labels[order].astype(np.int64)


def _job(tmp_path, protocol, labeled_per_class=10, **downstream):
    x, y = _blobs()
    rows = np.arange(len(y))
    train, val, test = rows[: len(y) // 2], rows[len(y) // 2 : 3 * len(y) // 4], rows[3 * len(y) // 4 :]
    data = TargetData(np.zeros((len(y), 4, 4, 3), np.uint8), y, ["a", "b", "c"], train, val, test, "k")
    labeled = shot_subsets(y, train, [labeled_per_class], seed=0)[labeled_per_class]
    cfg = config.load(None, [f"downstream.{k}={v}" for k, v in downstream.items()])
    spec = RunSpec(name="x", encoder="x", method="m", pretrain_chain="t", pretrain_dir=None, init="x",
                   protocol=protocol, lr_schedule=None, label_fraction=None, shots=labeled_per_class, seed=0)
    return Job(cfg, spec, data, labeled, tmp_path, x), x, y


def test_knn_votes_match_a_brute_force_loop():
    rng = np.random.default_rng(1)
    train, queries = rng.normal(size=(50, 6)), rng.normal(size=(17, 6))
    labels = rng.integers(0, 3, 50)
    t = 0.07
    got = knn_votes(torch.tensor(train), torch.tensor(labels), torch.tensor(queries), [1, 5, 20], t, 3, batch_size=4)
    for k in (1, 5, 20):
        for i, q in enumerate(queries):
            cos = [q @ v / (np.linalg.norm(q) * np.linalg.norm(v)) for v in train]
            nearest = sorted(range(50), key=lambda j: -cos[j])[:k]
            votes = np.zeros(3)
            for j in nearest:
                votes[labels[j]] += np.exp(cos[j] / t)
            np.testing.assert_allclose(got[k][i], votes / votes.sum(), rtol=1e-4, atol=1e-9)


def test_knn_protocol_chooses_k_on_validation_and_has_no_loss(tmp_path):
    job, x, y = _job(tmp_path, "knn", **{"knn_k_grid": "[1,3,50]"})
    fitted = PROTOCOLS.get("knn")().fit(job)
    assert fitted.chosen["k"] in (1, 3, 30)  # 50 is capped at the 30 labelled images
    shares = np.exp(fitted.logits(job.data.test))
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-6)
    record = run(job.cfg, job.spec, job.data, job.labeled, tmp_path, x)
    assert record.test_loss is None and record.val_loss is None and record.lr_schedule is None
    assert record.protocol == "knn" and record.shots == 10 and record.labels_per_class == [10, 10, 10]
    assert record.test_balanced_acc > 0.5  # well-separated blobs


def test_linear_probe_matches_scikit_learn_called_directly(tmp_path):
    grid = [0.001, 0.1, 10.0]
    job, x, y = _job(tmp_path, "linear", linear_c_grid=str(grid))
    fitted = PROTOCOLS.get("linear")().fit(job)
    d = job.data
    scaler = StandardScaler().fit(x[job.labeled])
    scores = {}
    for c in grid:
        model = LogisticRegression(C=c, max_iter=2000, random_state=0).fit(scaler.transform(x[job.labeled]), y[job.labeled])
        scores[c] = balanced_accuracy_score(y[d.val], model.predict(scaler.transform(x[d.val])))
    best = max(grid, key=lambda c: (scores[c], -grid.index(c)))
    assert fitted.chosen == {"C": best}
    model = LogisticRegression(C=best, max_iter=2000, random_state=0).fit(scaler.transform(x[job.labeled]), y[job.labeled])
    np.testing.assert_allclose(fitted.logits(d.test), model.predict_log_proba(scaler.transform(x[d.test])), rtol=1e-6, atol=1e-8)


def test_shot_subsets_nested_per_class_seeded_and_refused_when_too_large():
    labels = np.repeat([0, 1, 2], [30, 12, 50])
    train = np.arange(0, 92, 1)[np.arange(92) % 4 != 0]  # three quarters of every class
    shots = [1, 5, 9]
    first, again, other = (shot_subsets(labels, train, shots, seed) for seed in (3, 3, 4))
    for k in shots:
        assert np.bincount(labels[first[k]], minlength=3).tolist() == [k, k, k]
        assert np.isin(first[k], train).all()
        assert np.array_equal(first[k], again[k])  # identical for every method and protocol at one seed
    assert np.isin(first[1], first[5]).all() and np.isin(first[5], first[9]).all()
    assert not np.array_equal(first[5], other[5])
    # The shots take the same per-class order as the fractions: the 1-shot image starts every fraction.
    fractions = label_subsets(labels, train, [0.1, 0.5], seed=3)
    assert np.isin(first[1], fractions[0.1]).all()
    with pytest.raises(ConfigError, match=r"downstream.shots: 10 exceeds the 9 training images of class 'b'"):
        shot_subsets(labels, train, [10], 0, classes=["a", "b", "c"])
    with pytest.raises(ConfigError, match="downstream.shots"):
        shot_subsets(labels, train, [0], 0)


def test_feature_store_reused_and_recomputed_when_the_encoder_file_changes(tmp_path, monkeypatch):
    cfg = config.load(None, ["backbone.name=resnet18", "trainer.accelerator=cpu"])
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    encoder_file = tmp_path / "encoder.safetensors"
    torch.manual_seed(0)
    save_encoder(build_encoder(cfg.backbone, "random"), encoder_file)
    calls = []
    real = features.encode
    monkeypatch.setattr(features, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    store = tmp_path / "features"
    first = np.array(features.features(cfg, encoder_file, images, store, "data1"))
    again = np.array(features.features(cfg, encoder_file, images, store, "data1"))
    assert len(calls) == 1 and np.array_equal(first, again)
    manifest = features.manifest(features.store_path(store, encoder_file, "data1"))
    assert manifest["shape"] == list(first.shape) and manifest["encoder_sha256"] == features.file_digest(encoder_file)
    features.features(cfg, encoder_file, images, store, "data2")  # other data: other features
    assert len(calls) == 2
    torch.manual_seed(1)
    save_encoder(build_encoder(cfg.backbone, "random"), encoder_file)  # same path, new weights
    changed = np.array(features.features(cfg, encoder_file, images, store, "data1"))
    assert len(calls) == 3 and not np.allclose(changed, first)
    assert len(list(store.glob("*.npy"))) == 3


# ------------------------------------------------------------------------------------------------
# Records written before protocols: the typed record keeps them whole, the report renders them unchanged.

COMMITTED = sorted(p.parent for p in (REPO / "docs").rglob("results.jsonl") if (p.parent / "report.md").is_file())


def _record_sections(report: str) -> str:
    """The parts of a report that come from results.jsonl alone (stages and curves are not committed)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Test loss"))
    end = next((i for i, line in enumerate(lines) if i > start and line in (
        "## Pretraining", "## Downstream training curves", "## Confusion matrices", "## Provenance")), len(lines))
    runs_line = next(line for line in lines if "downstream runs**" in line)
    # A column's ⚠ says its pretraining stage never left chance: the stages are not committed.
    body = [line.replace(" ⚠ |", " |") if line.startswith("| labels |") else line for line in lines[start:end]
            if not line.startswith(("![", "*Figure:"))]  # a figure's link depends on whether its file is committed
    return "\n".join([runs_line, *body])


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_records_load_whole_and_rebuild_their_reports(folder, tmp_path):
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    typed, problems = records.read(folder)
    assert not problems and len(typed) == len(lines)
    for raw, record in zip(lines, typed):
        if "protocol" in raw:  # written since protocols existed: read and written back as it is
            assert record.protocol == raw["protocol"] and record.to_dict() == raw
            continue
        assert record.protocol == raw["mode"] and record.shots is None
        assert record.to_dict() == {**raw, "protocol": raw["mode"]}
        assert {k: v for k, v in record.to_dict().items() if k != "protocol"} == raw  # nothing lost on a rewrite
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    build_report(copy)
    assert _record_sections((copy / "report.md").read_text()) == _record_sections((folder / "report.md").read_text())


def test_records_read_repairs_nothing_skips_torn_lines_and_keeps_the_later_duplicate(tmp_path):
    good = {"method": "m", "mode": "frozen", "seed": 0, "label_fraction": 0.5, "test_acc": 0.5, "run": "downstream/a", "x": 1}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "test_acc": 0.75}) + "\n" + '{"method": "m", "mo')
    found, problems = records.read(tmp_path)
    assert [r.test_acc for r in found] == [0.75] and found[0].extra == {"x": 1} and found[0].protocol == "frozen"
    assert len(problems) == 2 and "line 3" in problems[0] and "repeats run" in problems[1]
    assert path.read_text().endswith('"mo')  # read() only reads
    assert records.finished_runs(path) == {"downstream/a"} and path.read_text().endswith("}\n")  # the study repairs


# ------------------------------------------------------------------------------------------------
# Through the study and the report.

TINY = [
    "image_size=16", "synth.n_groups=4", "synth.per_class_per_group=6", "synth.image_size=16",
    "synth.classes=[tumour, stroma, adipose]", "split.val_fraction=0.25", "split.test_fraction=0.25",
    "pretrain.epochs=1", "pretrain.batch_size=8", "encoders.rotnet.method=rotnet", "encoders.simclr.method=simclr",
    "downstream.fractions=[0.5]", "downstream.shots=[1, 2]", "downstream.seeds=[0, 1]", "downstream.lr_schedules=[cosine]",
    "downstream.epochs=1", "downstream.batch_size=8", "downstream.baselines=[]", "trainer.progress=false",
]


def _args(out, *extra):
    empty = out.parent / f"{out.name}.yaml"
    empty.write_text("name: tiny\n")
    return ["study", str(empty), "--out", str(out), *sum((["--set", s] for s in TINY + list(extra)), [])]


def test_a_protocol_registered_in_a_test_runs_through_the_study_and_the_report(tmp_path, monkeypatch):
    calls = []
    real = features.encode
    monkeypatch.setattr(features, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "study"
    assert main(_args(out, "downstream.protocols=[nearest_centroid, linear, knn]")) == 0
    recs = [r.to_dict() for r in records.read(out)[0]]
    # 2 encoders x 3 protocols x 3 budgets x 2 seeds, no lr schedule axis for any of them
    assert len(recs) == 36 and {r["protocol"] for r in recs} == {"nearest_centroid", "linear", "knn"}
    assert all(r["lr_schedule"] is None and (r["label_fraction"] is None) != (r["shots"] is None) for r in recs)
    assert len(calls) == 2 and len(list((out / "features").glob("*.npy"))) == 2  # once per encoder file
    # The same labelled images for every encoder and protocol at one seed and budget.
    by_budget = {}
    for r in recs:
        by_budget.setdefault((r["seed"], r["label_fraction"], r["shots"]), set()).add((r["n_labeled"], tuple(r["labels_per_class"])))
    assert all(len(v) == 1 for v in by_budget.values())
    assert next(iter(by_budget[(0, None, 2)]))[1] == (2, 2, 2)
    subsets = json.loads((out / "subsets.json").read_text())
    assert subsets["0"]["2-shot"]["per_class"] == [2, 2, 2] and set(subsets["0"]["1-shot"]["paths"]) < set(subsets["0"]["2-shot"]["paths"])
    report = (out / "report.md").read_text()
    assert "**nearest_centroid** (" in report and "**kNN (frozen encoder)** (" in report and "**Linear probe (frozen encoder)**" in report
    assert "| 1 shot |" in report and "| 2 shots |" in report and "| 50% |" in report
    assert "no test loss" in report and "× protocols linear, knn, nearest_centroid ×" in report
    assert "Label budget 1 shot leaves classes with fewer than 2 labelled images" in report
    assert (out / "figures" / "accuracy_vs_shots.png").is_file() and (out / "figures" / "accuracy_vs_fraction.png").is_file()
    before = (out / "results.jsonl").read_text()
    assert main(_args(out, "downstream.protocols=[nearest_centroid, linear, knn]")) == 0  # resumes: nothing redone
    assert (out / "results.jsonl").read_text() == before and len(calls) == 2


@pytest.mark.parametrize("setting, message", [
    ("downstream.shots=[99]", "downstream.shots: 99 exceeds the"),
    ("downstream.shots=[0]", "downstream.shots: each budget must be at least 1"),
    ("downstream.fractions=[0]", "downstream.fractions"),
    ("downstream.protocols=[finetune, lineer]", "downstream.protocols: unknown protocol 'lineer'; registered:"),
])
def test_bad_budgets_and_protocols_are_one_line_config_errors(setting, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(_args(out, "downstream.protocols=[knn]", setting)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "results.jsonl").exists()


def test_adding_protocols_and_shots_to_a_finished_study_resumes_it(tmp_path):
    from histossl import study

    out = tmp_path / "grow"
    out.mkdir()
    first = config.load(None, ["downstream.modes=[finetune]"])
    study.write_config(first, out)
    (out / "results.jsonl").write_text('{"method": "m", "mode": "finetune", "seed": 0, "label_fraction": 0.05, "test_acc": 0.5, "run": "downstream/a"}\n')
    grown = config.load(None, ["downstream.protocols=[finetune, linear, knn]", "downstream.shots=[5]"])
    study.check_config(grown, out)  # only adds protocols and a budget: accepted, and it describes all the work now
    study.write_config(grown, out)
    assert config.load(out / "config.yaml").downstream.protocols == ["finetune", "linear", "knn"]
    with pytest.raises(ConfigError, match="downstream.protocols"):  # dropping one would mix studies
        study.check_config(config.load(None, ["downstream.protocols=[linear]"]), out)
    # Fine-tuning at fewer budgets would drop recorded runs; at more (or all of them again), adds runs.
    narrowed = config.load(None, ["downstream.protocols=[finetune, linear, knn]", "downstream.shots=[5]",
                                  "downstream.budgets_of={finetune: {fractions: [0.05]}}"])
    with pytest.raises(ConfigError, match="downstream.budgets_of"):
        study.check_config(narrowed, out)
    restricted = tmp_path / "restricted"
    restricted.mkdir()
    study.write_config(narrowed, restricted)
    (restricted / "results.jsonl").write_text((out / "results.jsonl").read_text())
    study.check_config(grown, restricted)  # fine-tuning back at every budget: accepted
    study.write_config(grown, restricted)
    assert config.load(restricted / "config.yaml").downstream.budgets_of == {}
    other = config.load(None, ["downstream.protocols=[finetune, linear, knn]", "downstream.shots=[5]", "downstream.lr=0.5"])
    study.write_config(other, out)  # never overwritten by a config that changes a recorded setting
    assert config.load(out / "config.yaml").downstream.lr == grown.downstream.lr
