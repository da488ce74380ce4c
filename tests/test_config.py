"""The config tree: typed --set overrides, errors that name the key, a resolved config that round-trips."""

import pytest

from histossl import config
from histossl.errors import ConfigError


def test_set_values_are_parsed_by_type():
    cfg = config.load(None, ["downstream.fractions=[0.05, 0.5]", "pretrain.optim.lr=1e-3", "trainer.devices=2",
                             "downstream.class_weighted=true", "downstream.constant_lr=5e-6"])
    assert cfg.downstream.fractions == [0.05, 0.5]
    assert cfg.pretrain.optim.lr == 1e-3 and isinstance(cfg.pretrain.optim.lr, float)
    assert cfg.trainer.devices == "2"
    assert cfg.downstream.class_weighted is True and cfg.downstream.constant_lr == 5e-6


def test_partial_nested_override_keeps_sibling_defaults():
    cfg = config.load(None, ["pretrain.views.hed_jitter_sigma=0.1"])
    assert cfg.pretrain.views.hed_jitter_sigma == 0.1
    assert cfg.pretrain.views.crop_scale_min == config.ViewConfig().crop_scale_min


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("pretrain.epoch=3", "pretrain.epoch", "epochs"),
        ("pretrain.epochs=three", "pretrain.epochs", "integer"),
        ("downstream.modes=[finetun]", "downstream.modes.0", "'finetune' | 'frozen'"),
        ("downstream.class_weighted=maybe", "downstream.class_weighted", "true or false"),
        ("downstream.fractions=[0.5, 1.5]", "downstream.fractions", "(0, 1]"),
        ("split.test_fraction=0", "split.test_fraction", "(0, 1)"),
        ("downstream.budgets_of={knn: {fractions: [0.5]}}", "downstream.budgets_of.knn", "study's protocols"),
        ("downstream.budgets_of={supervised: {fractions: [0.3]}}", "downstream.budgets_of.supervised.fractions", "among downstream.fractions"),
        ("downstream.budgets_of={finetune: {fractions: [0.3]}}", "downstream.budgets_of.finetune.fractions", "among downstream.fractions"),
        ("downstream.budgets_of={finetune: {}}", "downstream.budgets_of.finetune", "at least one"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert key in str(err.value) and allowed in str(err.value)
    assert err.value.exit_code == 2


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(None, ["encoders.simclr.method=simclr", "downstream.seeds=[0, 1]"])
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(path)


def test_encoder_chain_defaults_to_the_target():
    cfg = config.load(None, ["target=idc", "datasets.idc.path=/data", "encoders.a.method=rotnet"])
    assert config.encoder_chain(cfg, cfg.encoders["a"]) == ["idc"]


def test_a_setting_added_later_reads_as_its_earlier_behaviour_only_in_a_written_config():
    written = config.to_dict(config.Config())
    del written["downstream"]["patience"]  # a config.yaml written before early stopping existed
    assert config.from_written(written).downstream.patience is None
    assert config.from_dict(written).downstream.patience == 10  # a user's config omits defaults
    written["downstream"]["patience"] = 4
    assert config.from_written(written).downstream.patience == 4


def test_a_stage_hash_leaves_out_an_added_setting_at_its_earlier_value():
    from histossl.train.pretrain import hashed

    views = config.ViewConfig()
    assert "solarize_prob" not in hashed(views) and "crop_scale_min" in hashed(views)
    assert hashed(config.ViewConfig(solarize_prob=0.2))["solarize_prob"] == 0.2


def test_each_chain_stage_may_have_its_own_epochs_and_a_single_number_keeps_the_stage_names():
    from histossl.train.pretrain import plan_stages

    base = ["datasets={t: {path: x}, pool: {path: y, labels: false}}", "target=t", "pretrain.epochs=4"]
    cfg = config.load(None, base + ["encoders={a: {method: simclr, chain: [pool, t], epochs: [1, 6]}, b: {method: simclr, chain: [pool, t]}}"])
    assert [s.epochs for s in plan_stages(cfg, cfg.encoders["a"])] == [1, 6]
    assert [s.epochs for s in plan_stages(cfg, cfg.encoders["b"])] == [4, 4]
    same = config.load(None, base + ["encoders={b: {method: simclr, chain: [pool, t], epochs: [4, 4]}}"])
    assert [s.folder for s in plan_stages(same, same.encoders["b"])] == [s.folder for s in plan_stages(cfg, cfg.encoders["b"])]
    with pytest.raises(ConfigError, match=r"encoders.a.epochs: one number per chain stage \(pool > t: 2\)"):
        config.load(None, base + ["encoders={a: {method: simclr, chain: [pool, t], epochs: [3]}}"])


def test_the_package_ships_its_data_files_and_the_demo_config_copy_matches():
    """A non-editable install (``pip install .``) must carry quickstart.yaml, or ``histossl demo`` breaks."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shipped = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["histossl"]
    package = repo / "src" / "histossl"
    data = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert data == sorted(shipped)
    assert (repo / "configs" / "quickstart.yaml").read_text() == (package / "quickstart.yaml").read_text()
