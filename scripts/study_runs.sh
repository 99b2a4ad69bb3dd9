# Sourced by the study scripts (scripts/universal_study.sh, scripts/generative_quality.sh): one training run of a
# study, kept across restarts. Needs $out, the study's run directory.
#   train NAME ARGS...   # ARGS: the run's config and overrides
# A finished run (its metrics.json) is skipped; an interrupted one (a checkpoint, no metrics.json) resumes from its
# last checkpoint, since train refuses a fresh start on a run dir that holds a run; any other starts fresh.
train() {
  local name=$1; shift
  [[ -f $out/$name/metrics.json ]] && return 0
  local resume=()
  [[ -f $out/$name/checkpoints/LATEST ]] && resume=(--train.resume=true)
  .venv/bin/supermoe-rec train "$@" --train.num_threads=1 --train.out_dir="$out" --train.name="$name" "${resume[@]}"
}
