#!/usr/bin/env bash
# The universal-vector study of reports/ml100k/universal.md: trains every run, then the universality suite.
# Hours on 2 CPU cores; finished runs are kept, so it can be stopped and started again.
#   scripts/universal_study.sh [OUT_DIR] [SEEDS...]      # default: runs/universal, seeds 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/universal}
[[ $# -gt 0 ]] && shift
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1 2)
# shellcheck source=scripts/study_runs.sh
source scripts/study_runs.sh  # train NAME ARGS...: skips finished runs, resumes interrupted ones
for s in "${seeds[@]}"; do
  # The universal vector: behaviour only, self-supervised next items, on the ml100k-mt split (probes, future tasks).
  train "u-mt-s$s" --config configs/ml100k_universal.yaml --train.seed="$s"
  # The same on RecBole's leave-one-out split (next-item retrieval next to RecBole's SASRec).
  train "u-loo-s$s" --config configs/ml100k_universal.yaml --data.leave_one_out=true --train.seed="$s"
  # The joint model on ml100k-mt: the seesaw study's supermoe plus the next-items loss (negatives seed 0, as there).
  train "joint-s$s" --config configs/ml100k.yaml --data.next_window=1 --train.objective=joint --train.seed="$s"
done
# Baselines of the suite: today's supervised-only behaviour model, and the dense twin with the same objective.
train sup-beh-s0 --config configs/ml100k_behaviour.yaml --train.seed=0
train dense-loo-s0 --config configs/ml100k_universal.yaml --data.leave_one_out=true --model.arch=dense_transformer
