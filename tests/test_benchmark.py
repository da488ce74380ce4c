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
