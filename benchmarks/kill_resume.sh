#!/usr/bin/env bash
# By-hand reliability check (issue 7): a study killed with SIGKILL three times, then run to the end,
# must finish with the same set of records as an uninterrupted run (no duplicates, none missing).
#   bash benchmarks/kill_resume.sh [WORKDIR]      (about 2 x the study's time)
set -euo pipefail
work=${1:-/tmp/histossl-kill-resume}
rm -rf "$work" && mkdir -p "$work"
cp configs/quickstart.yaml "$work/study.yaml"   # a copy: the config cannot change under the runs
sets=(--set 'downstream.fractions=[0.05, 0.25]' --set 'downstream.lr_schedules=[cosine]' --set downstream.epochs=2
      --set pretrain.epochs=2 --set 'encoders={rotnet: {method: rotnet, epochs: 2}, simclr: {method: simclr, epochs: 2}}')
histossl=(python -m histossl)  # an array, not a function: "$!" below must be python's own pid

echo "A: uninterrupted"
"${histossl[@]}" study "$work/study.yaml" --out "$work/A" "${sets[@]}" > "$work/A.log" 2>&1

wait_then_kill() {  # $1: a shell test that becomes true when it is time to kill
  "${histossl[@]}" study "$work/study.yaml" --out "$work/B" "${sets[@]}" >> "$work/B.log" 2>&1 &
  local pid=$!
  until eval "$1" || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  if kill -9 "$pid" 2>/dev/null; then echo "B: killed ($1)"; else echo "B: finished before the kill ($1)"; fi
  wait "$pid" 2>/dev/null || true
}
records() { [ -f "$work/B/results.jsonl" ] && wc -l < "$work/B/results.jsonl" || echo 0; }
wait_then_kill '[ -n "$(ls "$work"/B/pretrain/*/checkpoints/last.ckpt 2>/dev/null)" ]'   # in pretraining
wait_then_kill '[ "$(records)" -ge 3 ]'                                                  # between downstream runs
wait_then_kill '[ "$(records)" -ge 6 ] && sleep 1.$((RANDOM % 9))'                       # inside a downstream run
echo "B: run to the end"
"${histossl[@]}" study "$work/study.yaml" --out "$work/B" "${sets[@]}" >> "$work/B.log" 2>&1

python - "$work" <<'PY'
import json, sys
from pathlib import Path
def keys(folder):
    rows = [json.loads(l) for l in (Path(sys.argv[1]) / folder / "results.jsonl").read_text().splitlines() if l.strip()]
    return [(r["method"], r["pretrain_chain"], r["mode"], r["lr_schedule"], r["label_fraction"], r["seed"]) for r in rows]
a, b = keys("A"), keys("B")
print(f"A: {len(a)} records, B: {len(b)} records, B duplicates: {len(b) - len(set(b))}")
assert sorted(a) == sorted(b) and len(set(b)) == len(b), "the records differ"
print("same set of records, no duplicates")
log = (Path(sys.argv[1]) / "B.log").read_text()
assert "is in use" not in log, "a kill missed its process: a later run found the folder locked"
print(f"B.log: {log.count('resuming from')} resumed checkpoint(s), {log.count('already recorded')} restart(s) of the downstream runs")
PY
