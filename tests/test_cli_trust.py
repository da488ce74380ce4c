"""Issue 17, trustworthy under real use, through the ``histossl`` command in a subprocess.

Checks before anything is written, a recorded study's config kept, numbers range-checked, config
files in any encoding, YAML errors with line and column, diverged runs recorded and flagged,
Ctrl-C, and output files created with the user's umask. docs/reliability.md lists each with its test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}

# 3 classes x 4 slides x 6 images of 16 px: 36 training images; a whole study takes seconds.
TINY = {
    "name": "tiny",
    "image_size": 16,
    "datasets": {"target": {"synthetic": True}},
    "synth": {"n_groups": 4, "per_class_per_group": 6, "image_size": 16, "classes": ["tumour", "stroma", "adipose"]},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "backbone": {"name": "resnet18", "stem": "small"},
    "pretrain": {"epochs": 1, "batch_size": 8},
    "encoders": {"rotnet": {"method": "rotnet"}},
    "downstream": {
        "fractions": [1.0], "modes": ["frozen"], "lr_schedules": ["constant"], "seeds": [0], "baselines": [],
        "frozen_epochs": 2, "batch_size": 8,
    },
    "trainer": {"progress": False},
}


def histossl(*args, cwd: Path | None = None, umask: int = 0o022, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m histossl ARGS`` in a subprocess with this checkout's sources."""
    return subprocess.run(
        [sys.executable, "-m", "histossl", *map(str, args)], env=ENV, cwd=cwd, capture_output=True, text=True,
        timeout=timeout, umask=umask,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("histossl: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def tiny_config(path: Path, **changes) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(config, out) of a tiny study that finished, run under umask 027 (files 0640, folders 0750)."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(root / "tiny.yaml")
    proc = histossl("study", config, "--out", root / "out", umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, root / "out"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("trainer.precision=banana", ["trainer", "banana"]),
        ("trainer.accelerator=tpu", ["trainer", "accelerator=tpu"]),
        ("pretrain.batch_size=100", ["pretrain.batch_size=100", "36 images"]),
        ("encoders.rotnet.method=mocov9", ["encoders.rotnet.method", "mocov9"]),
        ("backbone.name=resnet9000", ["backbone.name", "resnet9000"]),
        ("encoders.rotnet.init=missing.safetensors", ["encoders.rotnet.init", "missing.safetensors"]),
    ],
)
def test_a_failed_first_run_writes_no_config_and_the_corrected_command_runs(tmp_path, override, names):
    config = tiny_config(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    bad = histossl("study", config, "--out", out, "--set", override)
    assert bad.returncode == 2
    line = one_error_line(bad)
    assert all(name in line for name in names), line
    assert not (out / "config.yaml").exists() and not (out / "results.jsonl").exists()
    if override.startswith("pretrain.batch_size"):  # one full corrected run is enough to show the folder is free
        good = histossl("study", config, "--out", out)
        assert good.returncode == 0, good.stderr[-3000:]
        assert (out / "report.md").is_file()


def test_recorded_study_config_is_never_overwritten(finished):
    config, out = finished
    before = (out / "config.yaml").read_bytes()
    # A hardware setting may differ on resume (another machine); the config that made the records stays.
    proc = histossl("study", config, "--out", out, "--set", "trainer.num_workers=1", umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 to run" in proc.stderr
    assert (out / "config.yaml").read_bytes() == before
    # Any other difference is refused, and also leaves config.yaml as it was.
    proc = histossl("study", config, "--out", out, "--set", "downstream.frozen_epochs=3", umask=0o027)
    assert proc.returncode == 2 and "downstream.frozen_epochs" in one_error_line(proc)
    assert (out / "config.yaml").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("downstream.lr=.inf", "downstream.lr: must be a finite number, got inf"),
        ("downstream.weight_decay=-5", "downstream.weight_decay: must not be negative, got -5"),
        ("downstream.encoder_lr_scale=.nan", "downstream.encoder_lr_scale: must be a finite number, got nan"),
        ("pretrain.optim.lr=.inf", "pretrain.optim.lr: must be a finite number"),
        ("pretrain.views.blur_prob=1.5", "pretrain.views.blur_prob: a probability must be in [0, 1]"),
        ("downstream.dropout=1", "downstream.dropout: must be in [0, 1)"),
        ("seed=-1", "seed: must not be negative"),
    ],
)
def test_numbers_are_range_checked(tmp_path, override, message):
    proc = histossl("study", tiny_config(tmp_path / "tiny.yaml"), "--out", tmp_path / "out", "--set", override)
    assert proc.returncode == 2
    assert message in one_error_line(proc)
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_config_files_in_other_encodings_and_bad_yaml_give_one_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: \xe9tude\n".encode("latin-1"))
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("name: study\n", encoding="utf-16")
    tab = tmp_path / "tab.yaml"
    tab.write_text("name: x\ndownstream:\n\tepochs: 3\n")
    for path in (latin1, utf16):
        proc = histossl("study", path, "--out", tmp_path / "out")
        assert proc.returncode == 2
        line = one_error_line(proc)
        assert str(path) in line and "not UTF-8" in line, line
    proc = histossl("study", tab, "--out", tmp_path / "out")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(tab) in line and "line 3, column 1" in line, line
    # A UTF-8 file with a byte-order mark (some Windows editors) is fine: the error is about the key.
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffnmae: x\n".encode("utf-8"))
    assert "unknown key 'nmae'" in one_error_line(histossl("study", bom, "--out", tmp_path / "out"))


def test_a_diverging_run_is_recorded_flagged_and_the_study_goes_on(tmp_path):
    # lr 1e30: the head's weights leave float range within two steps. The cosine run uses a sane lr
    # (constant_lr is the constant schedule's), so one run diverges and one finishes.
    config = tiny_config(
        tmp_path / "tiny.yaml", downstream__lr_schedules=["constant", "cosine"], downstream__constant_lr=1e30, downstream__frozen_epochs=3
    )
    out = tmp_path / "out"
    proc = histossl("study", config, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "diverged" in proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    diverged = [r for r in records if r.get("status") == "diverged"]
    assert len(records) == 2 and len(diverged) == 1
    assert diverged[0]["lr"] == 1e30 and diverged[0]["lr_schedule"] == "constant" and diverged[0]["test_acc"] is None
    finished = next(r for r in records if r is not diverged[0])
    assert finished["test_acc"] is not None
    report = (out / "report.md").read_text()
    assert "Diverged downstream run `downstream/rotnet__frozen__constant__f1__s0`" in report
    # A rerun does not repeat the diverged run: it is recorded.
    again = histossl("study", config, "--out", out)
    assert again.returncode == 0 and "0 to run" in again.stderr


def test_ctrl_c_prints_one_line_exits_130_and_loses_nothing(tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", pretrain__epochs=200)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "histossl", "study", str(config), "--out", str(out)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("pretrain/*/checkpoints/last.ckpt")):  # an epoch is saved
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "histossl: interrupted; rerun the same command to resume"
    assert list(out.glob("pretrain/*/checkpoints/last.ckpt")), "the saved epoch is kept"
    ends = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines() if '"end"' in line]
    assert ends[-1]["status"] == "interrupted"


def test_output_files_follow_the_umask(finished):
    _, out = finished
    files = ["config.yaml", "report.md", "report.html", "split.csv", "results.jsonl", "invocations.jsonl", "subsets.json"]
    files += [str(p.relative_to(out)) for p in out.glob("pretrain/*/*") if p.is_file()]
    assert any(f.endswith("encoder.safetensors") for f in files)
    for name in files:
        assert (out / name).stat().st_mode & 0o777 == 0o640, name  # umask 027 -> 0640, not tempfile's 0600
    for folder in [out / "data" / "target", out / "figures", *out.glob("pretrain/*")]:
        assert folder.stat().st_mode & 0o777 == 0o750, folder


# ------------------------------------------------------------------------------------------------
# The data a study used: named in the report, fingerprinted, results of changed data set aside


def folder_config(path: Path, data: Path, **changes) -> Path:
    changes = {"datasets": {"target": {"path": str(data)}}, **changes}
    config = tiny_config(path, **{k: v for k, v in changes.items() if k != "datasets"})
    loaded = yaml.safe_load(config.read_text())
    loaded["datasets"] = changes["datasets"]
    loaded.pop("synth", None)
    config.write_text(yaml.safe_dump(loaded, sort_keys=False))
    return config


@pytest.fixture
def image_folder(tmp_path) -> Path:
    proc = histossl("data", "synth", "--out", tmp_path / "data", "--classes", "tumour,stroma,adipose", "--groups", "4",
                    "--per-class", "6", "--size", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "data"


def test_synthetic_with_a_path_and_out_inside_the_data_are_refused(tmp_path, image_folder):
    both = tiny_config(tmp_path / "both.yaml")
    loaded = yaml.safe_load(both.read_text())
    loaded["datasets"]["target"]["path"] = str(image_folder)
    both.write_text(yaml.safe_dump(loaded))
    proc = histossl("study", both, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "datasets.target" in one_error_line(proc) and "synthetic" in one_error_line(proc)
    config = folder_config(tmp_path / "folder.yaml", image_folder)
    inside = image_folder / "results"
    proc = histossl("study", config, "--out", inside)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(inside) in line and str(image_folder) in line, line
    assert not inside.exists(), "nothing is written into the data folder, not even the lock"


def test_changed_data_sets_aside_stale_results_and_redoes_them(tmp_path, image_folder):
    config = folder_config(tmp_path / "folder.yaml", image_folder)
    out = tmp_path / "out"
    first = histossl("study", config, "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    old_print = json.loads((out / "data.json").read_text())["target"]
    assert json.loads((out / "split.csv.json").read_text())["data"] == old_print
    assert json.loads(next(out.glob("pretrain/*/stage.json")).read_text())["data"] == old_print
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["data_fingerprint"] == old_print
    report = (out / "report.md").read_text()
    assert f"data set `target`: `{image_folder}`, 72 images, fingerprint `{old_print['digest']}`" in report
    old_stage = next(out.glob("pretrain/*/stage.json")).parent.name

    # Every file touched (as a copy to another disk does): the same data, nothing set aside.
    for path in image_folder.rglob("*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = histossl("study", config, "--out", out)
    assert touched.returncode == 0 and "0 to run" in touched.stderr and not (out / "stale").exists(), touched.stderr[-3000:]
    assert json.loads((out / "data.json").read_text())["target"] == old_print

    # A new image in one class, another's pixels edited: the split, the pretraining on it and the runs are stale.
    tumour = sorted((image_folder / "slide00" / "tumour").iterdir())
    (image_folder / "slide00" / "tumour" / "new.png").write_bytes(tumour[0].read_bytes())
    stroma = sorted((image_folder / "slide00" / "stroma").iterdir())[0]
    with Image.open(stroma) as image:
        edited = image.convert("RGB")
    edited.putpixel((0, 0), tuple(255 - v for v in edited.getpixel((0, 0))))
    edited.save(stroma)
    again = histossl("study", config, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 images added, 0 removed, 1 modified" in again.stderr and "slide00/tumour/new.png" in again.stderr
    assert "0 already recorded, 1 to run" in again.stderr  # redone, not reused
    (stale,) = (out / "stale").iterdir()
    assert (stale / "split.csv").is_file() and (stale / "pretrain" / old_stage / "encoder.safetensors").is_file()
    assert json.loads((stale / "results.jsonl").read_text())["data_fingerprint"] == old_print
    new_print = json.loads((out / "data.json").read_text())["target"]
    assert new_print["n_images"] == 73 and new_print["digest"] != old_print["digest"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["data_fingerprint"] == new_print
    assert len((out / "split.csv").read_text().splitlines()) == 74  # header + 73 images
    assert json.loads(next(out.glob("pretrain/*/stage.json")).read_text())["data"] == new_print
    # Unchanged data: nothing more is set aside, nothing redone.
    third = histossl("study", config, "--out", out)
    assert third.returncode == 0 and "0 to run" in third.stderr and len(list((out / "stale").iterdir())) == 1


def test_a_study_without_fingerprints_is_kept_and_a_changed_split_gets_advice_that_works(tmp_path, image_folder):
    config = folder_config(tmp_path / "folder.yaml", image_folder)
    out = tmp_path / "out"
    assert histossl("study", config, "--out", out).returncode == 0
    # Make it look like a study from before fingerprints (as the committed ones under docs/).
    settings = json.loads((out / "split.csv.json").read_text())
    settings.pop("data")
    (out / "split.csv.json").write_text(json.dumps(settings))
    stage_json = next(out.glob("pretrain/*/stage.json"))
    stage_json.write_text(json.dumps({k: v for k, v in json.loads(stage_json.read_text()).items() if k != "data"}))
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "data_fingerprint"}) + "\n" for r in lines))
    resumed = histossl("study", config, "--out", out)
    assert resumed.returncode == 0 and "0 to run" in resumed.stderr and not (out / "stale").exists()
    # The data changes under it: it cannot be sorted, so the advice is a new folder, and that works.
    (image_folder / "slide00" / "tumour" / "new.png").write_bytes(next((image_folder / "slide00" / "tumour").iterdir()).read_bytes())
    proc = histossl("study", config, "--out", out)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "another --out" in line and "delete" not in line
    assert histossl("study", config, "--out", tmp_path / "new").returncode == 0


def test_init_writes_a_config_fitted_to_the_data_that_runs(tmp_path, image_folder):
    config = tmp_path / "study.yaml"
    proc = histossl("init", image_folder, "--out", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = config.read_text()
    loaded = yaml.safe_load(text)
    assert loaded["datasets"]["target"]["path"] == str(image_folder)
    assert loaded["image_size"] == 16  # the synthetic images are 16 px
    assert "72 images, 3 classes" in text and "4 groups" in text
    assert set(loaded["encoders"]) == {"rotnet", "rotnet_jitter", "simclr"}
    assert loaded["pretrain"]["batch_size"] <= 72 * 0.6 / 2  # two batches of the train split at least
    d = loaded["downstream"]  # trained to convergence, not starved at 5%: a minimum of steps, early stopping
    assert d["min_steps"] >= 200 and d["patience"] >= 3 and d["epochs"] >= 20 and "steps" not in d
    # Never over an existing file.
    again = histossl("init", image_folder, "--out", config)
    assert again.returncode == 1 and "exists" in one_error_line(again)
    # The written config runs as a study (tiny sizes for the test).
    tiny = ["--set", "encoders={rotnet: {method: rotnet, epochs: 1}}", "--set", "downstream.fractions=[1.0]",
            "--set", "downstream.modes=[frozen]", "--set", "downstream.lr_schedules=[constant]",
            "--set", "downstream.frozen_epochs=2", "--set", "trainer.progress=false"]
    proc = histossl("study", config, "--out", tmp_path / "out", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "report.md").is_file()


# ------------------------------------------------------------------------------------------------
# Multi-process runs from the command line (DDP on a CPU, gloo): rank 0 owns the folder


DDP_SETTINGS = ["--set", "trainer.accelerator=cpu", "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]


def ddp_config(path: Path) -> Path:
    # Fine-tuning runs use the user's trainer (two processes); frozen runs are single-process on rank 0.
    return tiny_config(path, downstream__modes=["finetune", "frozen"], downstream__baselines=["random"], downstream__epochs=1)


def run_keys(out: Path) -> list[str]:
    return sorted(json.loads(line)["run"] for line in (out / "results.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("single")
    proc = histossl("study", ddp_config(root / "tiny.yaml"), "--out", root / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_keys(root / "out")


@pytest.mark.slow
def test_study_with_two_ddp_devices_from_the_cli(tmp_path, one_process_runs):
    out = tmp_path / "out"
    proc = histossl("study", ddp_config(tmp_path / "tiny.yaml"), "--out", out, *DDP_SETTINGS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in use by" not in proc.stderr and "Traceback" not in proc.stderr
    assert run_keys(out) == one_process_runs  # every run once, as one process would record them
    assert proc.stdout.count("report:") == 1 and (out / "report.md").is_file()
    starts = [line for line in (out / "invocations.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1  # only rank 0 logs the command
    # Resuming with two processes redoes nothing.
    again = histossl("study", ddp_config(tmp_path / "tiny.yaml"), "--out", out, *DDP_SETTINGS, timeout=600)
    assert again.returncode == 0 and "0 to run" in again.stderr and run_keys(out) == one_process_runs


@pytest.mark.slow
def test_study_under_torchrun_from_the_cli(tmp_path, one_process_runs):
    # One retry, in a fresh folder: in 1 of 3 clean-clone CI runs of session 7, rank 1 exited with
    # code 1 (its message cut from the log) while rank 0 waited in a broadcast; not reproduced in
    # 4 reruns. A likely cause was found in session 8 and fixed (rank 1 could load a pretrained encoder
    # before rank 0 had written it; a barrier now follows each stage); the retry stays until clean-clone
    # runs show it gone. The first attempt's stderr is kept in the failure message if the retry fails too.
    first = ""
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "histossl", "study",
             str(ddp_config(tmp_path / "tiny.yaml")), "--out", str(out), *DDP_SETTINGS],
            env=ENV, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode == 0:
            break
        first = first or "\n".join(line for line in proc.stderr.splitlines() if "rank1" in line or "histossl:" in line)[-3000:]
    assert proc.returncode == 0, f"first attempt:\n{first}\nlast attempt:\n{proc.stderr[-2000:]}"
    assert "in use by" not in proc.stderr
    assert run_keys(out) == one_process_runs
    assert proc.stdout.count("report:") == 1 and (out / "report.md").is_file()
