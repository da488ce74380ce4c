"""The folder names of committed pretraining stages never change.

docs/benchmarks/idc/*/results.jsonl name these folders (``pretrain_dir``), and a study rerun with
newer code must find and reuse the encoders already trained there. Any change to what is hashed into
a stage key (a new config field, a method's settings) must keep these names.
"""

from pathlib import Path

import pytest

from histossl import config
from histossl.train import pretrain

REPO = Path(__file__).resolve().parents[1]

PINNED = {
    "idc-cpu": [
        "rotnet_idc_02073f59_seed1", "rotnet_idc_244d941f", "rotnet_idc_89c3d0ce_seed2",
        "rotnet_jitter_idc_17719060_seed2", "rotnet_jitter_idc_ce841194_seed1", "rotnet_jitter_idc_db121ce8",
        "simclr_idc_36d335b6", "simclr_idc_cdd6d2e3_seed2", "simclr_idc_e72c0c53_seed1",
    ],
    "idc-chain-cpu": ["simclr_idc_36d335b6", "simclr_oral-idc_9c5a840b", "simclr_oral_c21e96bd"],
    "quickstart": ["rotnet_jitter_target_92a348f1", "rotnet_target_e3a8640f", "simclr_target_18461c0e"],  # the demo of session 7
}


def planned_folders(cfg) -> list[str]:
    folders = {
        stage.folder
        for entry in cfg.encoders.values()
        for seed in config.pretrain_seeds(cfg)
        for stage in pretrain.plan_stages(cfg, entry, seed)
    }
    return sorted(folders)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_committed_stage_folders_keep_their_names(name):
    cfg = config.load(REPO / "configs" / f"{name}.yaml")
    assert planned_folders(cfg) == PINNED[name]


def test_settings_of_other_methods_and_unset_new_view_fields_leave_names_alone():
    base = config.load(REPO / "configs" / "idc-chain-cpu.yaml")
    other = config.load(
        REPO / "configs" / "idc-chain-cpu.yaml",
        ["pretrain.methods.dino.teacher_temp=0.05", "pretrain.views.solarize_prob=0.0", "pretrain.views.crop_scale_max=1.0"],
    )
    assert planned_folders(other) == planned_folders(base)
    changed = config.load(REPO / "configs" / "idc-chain-cpu.yaml", ["pretrain.views.solarize_prob=0.1"])
    assert set(planned_folders(changed)).isdisjoint(planned_folders(base))
    own = config.load(REPO / "configs" / "idc-chain-cpu.yaml", ["pretrain.methods.simclr.temperature=0.3"])
    assert set(planned_folders(own)).isdisjoint(planned_folders(base))
