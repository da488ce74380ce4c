"""Issue 7.3 and 7.4 at the command line: bad data and bad config give exit code 1 or 2, one line that
names the culprit, and no traceback; odd but valid data is accepted.

test_data.py checks the same cases at the library level; here the user's view is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from histossl.cli import main

BASE = {
    "name": "bad-input",
    "image_size": 16,
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "synth": {"n_groups": 4, "per_class_per_group": 4, "image_size": 16, "classes": ["tumour", "stroma", "adipose"]},
    "pretrain": {"epochs": 1, "batch_size": 8},
    "encoders": {"rotnet": {"method": "rotnet"}},
    "downstream": {"fractions": [0.5], "modes": ["frozen"], "lr_schedules": ["cosine"], "baselines": [], "frozen_epochs": 1},
    "trainer": {"progress": False},
}


@pytest.fixture
def run(tmp_path, capsys):
    """``run(data_path_or_None, *overrides, command="study")`` -> (exit code, stderr); a new --out each call."""
    calls: list[Path] = []

    def _run(data: Path | None, *overrides: str, command: str = "study", config: dict | None = None):
        cfg = dict(config or BASE)
        cfg["datasets"] = {"target": {"path": str(data)} if data else {"synthetic": True}}
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(cfg))
        calls.append(path)
        out = tmp_path / ("out" if len(calls) == 1 else f"out{len(calls)}")
        argv = [command, str(path), "--out", str(out)]
        for item in overrides:
            argv += ["--set", item]
        code = main(argv)
        return code, capsys.readouterr().err

    return _run


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("histossl: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def image_folder(root: Path, counts: dict[str, int], size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------
# Bad data (issue 7.3)


def test_corrupt_image_is_named(tmp_path, run):
    root = image_folder(tmp_path / "data", {"a": 6, "b": 6})
    bad = root / "b" / "broken.png"
    bad.write_bytes((root / "b" / "0.png").read_bytes()[:60])  # truncated mid-file
    code, err = run(root)
    assert code == 1
    line = one_line(err)
    assert str(bad) in line and "skip_unreadable" in line


def test_zero_byte_image_is_named(tmp_path, run):
    root = image_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "a" / "empty.png").write_bytes(b"")
    code, err = run(root)
    assert code == 1 and str(root / "a" / "empty.png") in one_line(err)


def test_class_too_small_for_the_splits_names_class_and_counts(tmp_path, run):
    root = image_folder(tmp_path / "data", {"big": 8, "tiny": 2})
    code, err = run(root)
    assert code == 1
    line = one_line(err)
    assert "'tiny'" in line and "has 2 images" in line and "needs at least 3" in line


def test_single_class_is_refused(tmp_path, run):
    root = image_folder(tmp_path / "data", {"only": 8})
    code, err = run(root)
    assert code == 1 and "at least 2 classes" in one_line(err) and "'only'" in one_line(err)


def test_empty_class_folder_and_missing_path_are_named(tmp_path, run):
    root = image_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "c").mkdir()
    code, err = run(root)
    assert code == 1 and str(root / "c") in one_line(err)
    code, err = run(tmp_path / "nowhere")
    assert code == 1 and str(tmp_path / "nowhere") in one_line(err)


def test_odd_but_valid_images_are_accepted(tmp_path, run, capsys):
    """Mixed sizes and modes (L, RGBA, P, CMYK JPEG, 16-bit TIFF), names with spaces and non-ASCII
    characters, non-image files and symlink loops in class folders: pretraining runs on all of it."""
    root = tmp_path / "data"
    for cls in ("tumour", "stroma"):
        (root / cls).mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    images = {
        "tumour/patch 1.png": Image.fromarray(rgb(16, 16)),
        "tumour/größe ü.png": Image.fromarray(rgb(300, 40)),
        "tumour/細胞.jpg": Image.fromarray(rgb(24, 24)).convert("CMYK"),
        "tumour/gray.png": Image.fromarray(rgb(20, 20)[:, :, 0], "L"),
        "tumour/alpha.png": Image.fromarray(np.dstack([rgb(16, 16), rng.integers(0, 255, (16, 16), dtype=np.uint8)]), "RGBA"),
        "tumour/deep.tif": Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)),
        "stroma/palette.gif": Image.fromarray(rgb(16, 16)).convert("P"),
        "stroma/tiny 3x5.png": Image.fromarray(rgb(3, 5)),
        "stroma/wide.bmp": Image.fromarray(rgb(10, 200)),
        "stroma/é à.webp": Image.fromarray(rgb(64, 64)),
        "stroma/big.png": Image.fromarray(rgb(512, 384)),
        "stroma/rgb16.tif": Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
    }
    for name, img in images.items():
        img.save(root / name)
    for extra in ("tumour/notes.txt", "tumour/.DS_Store", "stroma/Thumbs.db", "stroma/labels.csv"):
        (root / extra).write_text("not an image")
    os.symlink(root / "tumour", root / "tumour" / "loop")  # a folder symlink to its own parent
    os.symlink(root / "stroma" / "self.png", root / "stroma" / "self.png")  # a link to itself
    config = {**BASE, "split": {"val_fraction": 0.2, "test_fraction": 0.2}, "pretrain": {"epochs": 1, "batch_size": 2}}
    code, err = run(root, command="pretrain", config=config)
    assert code == 0, err
    assert "Traceback" not in err
    stage = next((tmp_path / "out" / "pretrain").iterdir())
    assert (stage / "encoder.safetensors").is_file()
    assert main(["data", "inspect", str(root)]) == 0
    report = capsys.readouterr().out
    assert "tumour" in report and "stroma" in report and "12" in report


# ----------------------------------------------------------------------------------------------
# Bad config (issue 7.4): exit code 2, the message names the key and what is allowed


@pytest.mark.parametrize(
    "override, expected",
    [
        ("encoders.rotnet.method=mocov9", ["unknown method 'mocov9'", "rotnet, rotnet_jitter, simclr"]),
        ("downstream.fractions=[0.5, 0]", ["downstream.fractions", "(0, 1]", "got 0"]),
        ("downstream.fractions=[1.5]", ["downstream.fractions", "(0, 1]", "got 1.5"]),
        ("downstream.fractions=[-0.1]", ["downstream.fractions", "got -0.1"]),
        ("pretrain.epochs=-1", ["pretrain.epochs", "-1"]),
        ("downstream.epochs=-3", ["downstream.epochs", "-3"]),
        ("downstream.frozen_epochs=0", ["downstream.frozen_epochs", "0"]),
        ("encoders.rotnet.epochs=-2", ["encoders.rotnet.epochs", "-2"]),
        ("encoders.rotnet.chain=[other, target]", ["encoders.rotnet.chain", "'other'", "target"]),
        ("split.test_fraction=1.2", ["split.test_fraction", "1.2"]),
        ("pretrain.optim.optimizer=adam", ["pretrain.optim.optimizer", "'adam'", "'sgd'"]),
        ("pretrain.epoch=3", ["unknown key 'pretrain.epoch'", "epochs"]),
        ("pretrain.methods.dinoo.teacher_temp=0.1", ["pretrain.methods.dinoo", "unknown method 'dinoo'", "dino, moco_v2"]),
        ("encoders.rotnet.settings.teacher_temp=0.1", ["encoders.rotnet.settings.teacher_temp", "not a setting of method 'rotnet'"]),
    ],
)
def test_bad_config_names_the_key(run, override, expected):
    code, err = run(None, override)
    assert code == 2
    line = one_line(err)
    for part in expected:
        assert part in line, line


def test_unknown_backbone_lists_the_registered_ones(run):
    code, err = run(None, "backbone.name=resnet9000")
    assert code == 2
    line = one_line(err)
    assert "resnet9000" in line and "resnet18" in line and "resnet50" in line


def test_dino_local_crops_larger_than_global_ones(run):
    code, err = run(None, "encoders.rotnet.method=dino", "pretrain.methods.dino.local_crop_size=32")
    assert code == 2
    line = one_line(err)
    assert "pretrain.methods.dino.local_crop_size" in line and "larger than the global crops" in line


def test_moco_queue_larger_than_the_data_names_the_key_and_counts(run):
    code, err = run(None, "encoders.rotnet.method=moco_v2", command="pretrain")
    assert code == 2
    line = one_line(err)
    assert "pretrain.methods.moco_v2.queue_size=512" in line and "images of data set 'target'" in line


def test_batch_larger_than_the_data_names_the_key_and_counts(run):
    code, err = run(None, "pretrain.batch_size=1000")
    assert code == 2
    line = one_line(err)
    assert "pretrain.batch_size=1000" in line and "images of data set 'target'" in line
