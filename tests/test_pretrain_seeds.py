"""Pretraining seeds: each encoder pretrained once per seed, downstream seed i on pretraining seed i,
pretraining deterministic for a given seed, and stage folders of existing studies unchanged."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from histossl import config, records
from histossl.cli import main
from histossl.errors import ConfigError
from histossl.features import file_digest
from histossl.train import pretrain
from test_study import TINY

ONE = ["downstream.fractions=[1.0]", "downstream.modes=[frozen]", "downstream.baselines=[]"]


def study_args(out, *extra: str, command: str = "study") -> list[str]:
    """A one-encoder (SimCLR) version of test_study's tiny study."""
    empty = out.parent / f"{out.name}.yaml"
    empty.write_text("name: tiny\n")
    sets = [s for s in TINY if not s.startswith("encoders.rotnet")] + list(extra)
    return [command, str(empty), "--out", str(out), *sum((["--set", s] for s in sets), [])]


def _weights(path):
    return load_file(str(path))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_seeds")
    assert main(study_args(out, *ONE, "pretrain.seeds=[0, 1]", "downstream.seeds=[0, 1]")) == 0
    return out


def test_each_downstream_seed_runs_on_its_own_pretraining(two_seeds):
    stages = sorted((two_seeds / "pretrain").iterdir(), key=lambda s: json.loads((s / "stage.json").read_text())["seed"])
    assert [json.loads((s / "stage.json").read_text())["seed"] for s in stages] == [0, 1]
    assert [s.name.endswith("_seed1") for s in stages] == [False, True]
    assert not _same(_weights(stages[0] / "encoder.safetensors"), _weights(stages[1] / "encoder.safetensors"))
    runs = {r["seed"]: r for r in records.load(two_seeds / "results.jsonl")}
    assert set(runs) == {0, 1}
    for seed, stage in zip((0, 1), stages):
        assert runs[seed]["pretrain_seed"] == seed
        assert runs[seed]["pretrain_dir"] == f"pretrain/{stage.name}"
    assert runs[0]["run"].endswith("__s0") and runs[1]["run"].endswith("__s1__p1")
    # Frozen runs read features of their own encoder, not of the entry's first pretraining.
    features = {f.stem.split("_")[0]: np.load(f) for f in (two_seeds / "features").glob("*.npy")}
    assert set(features) == {file_digest(s / "encoder.safetensors")[:16] for s in stages}
    assert not np.array_equal(*features.values())
    assert "pretraining as well as downstream seeds" in (two_seeds / "report.md").read_text()


def test_pretraining_is_deterministic_and_the_study_seed_keeps_its_stage(two_seeds, tmp_path):
    # A one-seed study makes the same stage folder, bit for bit, as the first seed of the two-seed
    # study: adding pretraining seeds to a finished study's config reuses what it pretrained.
    out = tmp_path / "one"
    assert main(study_args(out, *ONE, command="pretrain")) == 0
    (stage,) = (out / "pretrain").iterdir()
    first = two_seeds / "pretrain" / stage.name
    assert first.is_dir()
    assert _same(_weights(stage / "encoder.safetensors"), _weights(first / "encoder.safetensors"))
    assert (stage / "metrics.csv").read_text() == (first / "metrics.csv").read_text()


def test_committed_stage_names_are_unchanged_by_the_seeds_option():
    # Folders named before pretrain.seeds existed still resolve (test_idc_reports checks the committed ones).
    cfg = config.load(None, ["encoders.simclr.method=simclr"])
    (stage,) = pretrain.plan_stages(cfg, cfg.encoders["simclr"])
    (same,) = pretrain.plan_stages(config.load(None, ["encoders.simclr.method=simclr", "pretrain.seeds=[0, 1]", "downstream.seeds=[0, 1]"]),
                                   cfg.encoders["simclr"], 0)
    (other,) = pretrain.plan_stages(cfg, cfg.encoders["simclr"], 1)
    assert same.folder == stage.folder and "seeds" not in stage.key["pretrain"]
    assert other.folder != stage.folder and other.folder.endswith("_seed1") and other.seed == 1


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["pretrain.seeds=[0, 0]"], "distinct"),
        (["pretrain.seeds=[0, 1]", "downstream.seeds=[0, 1, 2]"], "do not divide"),
        (["pretrain.seeds=[0, 1, 2]", "downstream.seeds=[0]"], "do not divide"),
    ],
)
def test_bad_pretraining_seeds_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=rf"pretrain\.seeds.*{fragment}"):
        config.load(None, overrides)


def test_a_study_from_before_the_option_resumes(two_seeds, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(study_args(out, *ONE)) == 0
    saved = out / "config.yaml"
    text = saved.read_text()
    assert "seeds: []" in text
    saved.write_text(text.replace("  seeds: []\n", "", 1))  # as histossl wrote it before pretrain.seeds
    before = (out / "results.jsonl").read_text()
    assert main(study_args(out, *ONE)) == 0
    assert (out / "results.jsonl").read_text() == before
