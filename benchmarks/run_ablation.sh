#!/usr/bin/env bash
# The one-step ablation of docs/benchmarks.md (issue 13): one `cmdistill distill recipes/digits.yaml` run per line of
# the list (NAME SEED [--set KEY=VALUE ...]), one after the other, each appending its row to
# benchmarks/results/onestep_ablation.jsonl as it finishes; runs with a report already there are skipped.
#   OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 bash benchmarks/run_ablation.sh benchmarks/configs/onestep_ablation.txt
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/abl/logs
while read -r name seed rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  out="runs/abl/$name-s$seed"
  [[ -f "$out/report.json" ]] && continue
  start=$(date +%s)
  # shellcheck disable=SC2086
  /usr/bin/time -v cmdistill distill recipes/digits.yaml --set train.seed="$seed" --set train.output_dir="$out" \
    --set eval.curve=false $rest > "runs/abl/logs/$name-s$seed.log" 2>&1 || { echo "$name-s$seed failed" >&2; continue; }
  python benchmarks/collect_ablation.py "$out" "$name" "$seed" $(( $(date +%s) - start )) "$rest" \
    >> benchmarks/results/onestep_ablation.jsonl
done < "$1"
