"""Chained pretraining on real tissue: oral H&E first, then breast IDC; stage 2 starts from stage 1's weights."""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from histossl import config, study
from histossl.train import pretrain


def link_subset(src: Path, dst: Path, per_folder: int, depth: int) -> Path:
    """Symlink the first ``per_folder`` images of each leaf folder (class or group/class) into ``dst``."""
    leaves = sorted(p for p in src.glob("/".join(["*"] * depth)) if p.is_dir())
    for leaf in leaves:
        target = dst / leaf.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(leaf.iterdir())[:per_folder]:
            os.symlink(image, target / image.name)
    return dst


def test_two_stage_chain_oral_then_idc_starts_from_first_stage(shared_data, tmp_path, monkeypatch):
    oral = link_subset(shared_data / "oral-he", tmp_path / "oral", per_folder=12, depth=1)
    patients = sorted((shared_data / "idc-breast").iterdir())[:8]
    idc = tmp_path / "idc"
    for patient in patients:
        link_subset(patient, idc / patient.name, per_folder=3, depth=1)
    cfg = config.load(None, [
        "image_size=16", "target=idc", f"datasets.idc.path={idc}", f"datasets.oral.path={oral}",
        "split.val_fraction=0.25", "split.test_fraction=0.25",
        "pretrain.epochs=1", "pretrain.batch_size=8", "encoders.chain.method=simclr", "encoders.chain.chain=[oral, idc]",
        "trainer.progress=false",
    ])
    starts = []
    real_build = pretrain.build_encoder

    def spy(backbone, init):
        encoder = real_build(backbone, init)
        starts.append((init, {k: v.clone() for k, v in encoder.torchvision_state_dict().items()}))
        return encoder

    monkeypatch.setattr(pretrain, "build_encoder", spy)
    out = tmp_path / "out"
    paths = study.run_pretrain(cfg, out)
    stages = pretrain.plan_stages(cfg, cfg.encoders["chain"])
    assert [s.chain for s in stages] == ["oral", "oral>idc"]
    assert paths["chain"] == [out / "pretrain" / stages[1].folder / "encoder.safetensors"]
    first_final = load_file(str(out / "pretrain" / stages[0].folder / "encoder.safetensors"))
    (init1, _), (init2, second_start) = starts
    assert init1 == "random" and init2.endswith(f"{stages[0].folder}/encoder.safetensors")
    assert first_final.keys() == second_start.keys()
    assert all(torch.equal(first_final[k], second_start[k]) for k in first_final)
    second_final = load_file(str(paths["chain"][0]))
    assert any(not torch.equal(first_final[k], second_final[k]) for k in first_final if k.endswith("weight"))
