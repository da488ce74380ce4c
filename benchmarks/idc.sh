#!/usr/bin/env bash
# The two studies on real breast tissue (issue 5), then their reports copied to docs/benchmarks/idc/, then
# three runs rerun in isolation (benchmarks/rerun_in_isolation.py).
# About 6.3 hours on 2 CPU cores (idc-cpu 5.5 h, idc-chain-cpu about 45 min, trained to convergence);
# rerun to resume after an interruption, across sessions if need be.
#   bash benchmarks/idc.sh        (the virtual environment's histossl first on PATH)
set -euo pipefail
histossl study configs/idc-cpu.yaml --out out/idc-cpu
# The chain study's "SimCLR on IDC alone" encoder has the same stage key, hence the same folder name,
# as idc-cpu's SimCLR stage: the finished stage is reused rather than trained again. Skip this copy to
# retrain it (same settings, so the same encoder up to floating-point nondeterminism).
mkdir -p out/idc-chain-cpu/pretrain
for stage in out/idc-cpu/pretrain/simclr_idc_*; do
  case "$stage" in *_seed*) continue ;; esac  # idc-chain-cpu pretrains with the study seed only
  [ -f "$stage/stage.json" ] && cp -rn "$stage" out/idc-chain-cpu/pretrain/
done
histossl study configs/idc-chain-cpu.yaml --out out/idc-chain-cpu
for name in idc-cpu idc-chain-cpu; do
  python benchmarks/publish_report.py "out/$name" "docs/benchmarks/idc/$name"
done
# Three runs rerun alone on the study's own encoders and compared with their records (about 10 min).
python benchmarks/rerun_in_isolation.py out/idc-cpu --out out/idc-isolation \
  supervised__finetune__cosine__f0.05__s0 simclr__frozen__cosine__f0.05__s1__p1 rotnet__finetune__cosine__f0.25__s2__p2 \
  | tee docs/benchmarks/idc/isolation.md
echo "reports in docs/benchmarks/idc/"
