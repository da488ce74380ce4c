#!/usr/bin/env bash
# Issue 5's tuning sweep: variants of configs/idc-cpu.yaml at 5% labels, 3 seeds, fine-tuned and
# frozen, evaluated on the VALIDATION patients only (downstream.test=false: the test split is never
# read). One study folder per variant under out/tune/; the table compares val_* fields.
# About 2 h 20 min on 2 CPU cores (after benchmarks/idc.sh, whose SimCLR stage the first four reuse);
# rerun to resume.   bash benchmarks/tune_idc.sh
set -euo pipefail
base=(configs/idc-cpu.yaml --set downstream.test=false --set "downstream.fractions=[0.05]")
simclr_only=(--set "encoders={simclr: {method: simclr}}")

# Downstream protocol (SimCLR encoder of idc-cpu, reused; the supervised baseline under the same protocol).
reuse() {  # copy idc-cpu's finished SimCLR stage (same stage key) instead of training it again
  mkdir -p "out/tune/$1/pretrain"
  for stage in out/idc-cpu/pretrain/simclr_idc_*; do
    [ -f "$stage/stage.json" ] && cp -rn "$stage" "out/tune/$1/pretrain/"
  done
  return 0
}
study() { local name=$1; shift; histossl study "${base[@]}" "${simclr_only[@]}" "$@" --out "out/tune/$name"; }
reuse base && study base
reuse steps100 && study steps100 --set downstream.steps=100
reuse enc_lr_0.1 && study enc_lr_0.1 --set downstream.encoder_lr_scale=0.1
reuse linear_head && study linear_head --set downstream.head=linear
# Pretext settings: a new SimCLR stage each, SimCLR only, the downstream protocol of base.
nobase=(--set "downstream.baselines=[]")
study temp0.1 "${nobase[@]}" --set pretrain.method.temperature=0.1
study temp0.5 "${nobase[@]}" --set pretrain.method.temperature=0.5
study crop0.2 "${nobase[@]}" --set pretrain.views.crop_scale_min=0.2
# Second round: more of item 3 (class weighting; stain-jitter strength, pretraining epochs and the
# 90-degree turns of SimCLR's views). About 60 more minutes.
reuse unweighted && study unweighted --set downstream.class_weighted=false
study hed0.1 "${nobase[@]}" --set pretrain.views.hed_jitter_sigma=0.1 --set pretrain.views.hed_jitter_bias=0.1
study epochs5 "${nobase[@]}" --set pretrain.epochs=5
study no_rot90 "${nobase[@]}" --set pretrain.views.rot90=false
python benchmarks/tune_table.py out/tune/*
