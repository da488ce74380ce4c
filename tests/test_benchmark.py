"""The throughput benchmark runs end to end at a tiny size (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
KEYS = ("model_only_img_s", "end_to_end_img_s", "reference_img_s", "data_path_img_s", "reference_data_path_img_s")


def _args(data: Path, tmp_path: Path, method: str) -> list[str]:
    return ["--method", method, "--image-size", "16", "--batch-size", "8", "--steps", "2", "--warmup", "1",
            "--reference-workers", "1", "--data", str(data), "--cache-dir", str(tmp_path / "cache")]


def _check(result: dict) -> None:
    for key in KEYS:
        assert result[key] > 0, key
    assert result["n_images"] == 16 and result["cold_decode_s"] is not None


def test_benchmark_command_line_prints_json_last(tiny_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(tiny_folder, tmp_path, "simclr"), "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _check(result)
    assert result["method"] == "simclr" and "end_to_end / model_only" in result["ratios"]


@pytest.mark.parametrize("method", ["rotnet", "supervised", "dino", "moco_v2"])
def test_benchmark_other_methods(tiny_folder, tmp_path, method):
    _check(load_benchmark("throughput").main(_args(tiny_folder, tmp_path, method)))


def test_summary_table_gives_mean_std_auroc_per_cell_and_repeats_the_baseline():
    summary = load_benchmark("summary_table")

    def rec(encoder, protocol, acc, seed, fraction=0.05, shots=None):
        return {"encoder": encoder, "method": "supervised" if encoder == "supervised" else "simclr", "protocol": protocol,
                "lr_schedule": "cosine" if protocol == "finetune" else None, "label_fraction": fraction, "shots": shots,
                "seed": seed, "test_balanced_acc": acc, "test_auroc": 0.8}

    records = [rec("simclr", "linear", a, s) for s, a in enumerate([0.40, 0.50, 0.60])]
    records += [rec("supervised", "finetune", a, s) for s, a in enumerate([0.30, 0.30, 0.36])]
    records += [rec("simclr", "knn", 0.25, 0, fraction=None, shots=5)]
    lines = summary.table(records).splitlines()
    assert lines[0] == "| labels | protocol | simclr | supervised |"
    assert "| 5% | linear | 50.0 ± 10.0 (0.800) | 32.0 ± 3.5 (0.800) *e2e* |" in lines
    assert "| 5 per class | kNN | 25.0 (0.800) (n=1) | — |" in lines
    assert not any("| fine-tuned |" in line for line in lines)  # no encoder fine-tuned: no such row
