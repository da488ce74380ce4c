#!/usr/bin/env bash
# The EBHI-Seg study (issue 20) from scratch, then its report copied to docs/benchmarks/ebhi/, then
# three of its runs rerun alone (benchmarks/rerun_in_isolation.py: the study's config narrowed to one
# run, on the study's own encoders) and compared with their records: a fine-tuned supervised run, a
# linear probe on a SimCLR encoder of pretraining seed 1 and a fine-tuned chained encoder of seed 2.
# Rerun to resume after an interruption.   bash benchmarks/ebhi.sh   (the venv's histossl on PATH)
set -euo pipefail
histossl study configs/ebhi-cpu.yaml --out out/ebhi-cpu
python benchmarks/publish_report.py out/ebhi-cpu docs/benchmarks/ebhi/ebhi-cpu
python benchmarks/rerun_in_isolation.py out/ebhi-cpu --out out/ebhi-isolation \
  supervised__finetune__cosine__f0.05__s0 simclr__linear__f0.05__s1__p1 simclr_pool_ebhi__finetune__cosine__f0.05__s2__p2 \
  | tee docs/benchmarks/ebhi/isolation.md
