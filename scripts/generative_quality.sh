#!/usr/bin/env bash
# Quality of generative training on ml100k, over seeds: ml100k-mt (configs/ml100k.yaml, against the seesaw study's
# supermoe) and next-item retrieval on RecBole's leave-one-out split (configs/ml100k_universal.yaml), then the
# report reports/ml100k/generative.md. One thread per run; finished runs are kept, so it can be stopped and started
# again, and the report is rewritten from whatever has finished.
#   scripts/generative_quality.sh [OUT_DIR] [SEEDS...]      # default: runs/generative, seeds 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/generative}
[[ $# -gt 0 ]] && shift
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1 2)
# shellcheck source=scripts/study_runs.sh
source scripts/study_runs.sh  # train NAME ARGS...: skips finished runs, resumes interrupted ones
report() {
  .venv/bin/python scripts/generative_report.py --runs "$out" --out reports/ml100k/generative.md
}
for s in "${seeds[@]}"; do
  train "mt-s$s" --config configs/ml100k.yaml --train.seed="$s"
  report
  train "loo-s$s" --config configs/ml100k_universal.yaml --data.leave_one_out=true --train.seed="$s"
  report
done
