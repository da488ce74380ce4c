#!/usr/bin/env bash
# The EBHI-Seg study (issue 20) from scratch, then its report copied to docs/benchmarks/ebhi/.
# Rerun to resume after an interruption.   bash benchmarks/ebhi.sh   (the venv's histossl on PATH)
set -euo pipefail
histossl study configs/ebhi-cpu.yaml --out out/ebhi-cpu
python benchmarks/publish_report.py out/ebhi-cpu docs/benchmarks/ebhi/ebhi-cpu
