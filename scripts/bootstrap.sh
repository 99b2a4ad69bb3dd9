#!/usr/bin/env bash
# Create .venv in the repo with the pinned stack, then prove it loads (torch, fbgemm_gpu, torchrec, one EBC forward).
# Idempotent: a stamp holds a hash of the requirement files; when it matches, this exits in well under a second.
#   scripts/bootstrap.sh            # CPU stack, or the CUDA stack when nvidia-smi lists a GPU
#   SUPERMOE_STACK=cpu scripts/bootstrap.sh   # force a stack
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
# The one supported Python, as setup.cfg (python_requires), mypy and ruff state it.
SUPPORTED_PYTHON=3.11

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none; }
if [[ -x "$VENV/bin/python" ]]; then
  have=$(python_version "$VENV/bin/python")
  where="$VENV/bin/python"
else
  have=$(python_version "$PY")
  where=$PY
fi
if [[ "$have" != "$SUPPORTED_PYTHON" ]]; then
  echo "bootstrap: $where is Python $have; supermoe-rec supports Python $SUPPORTED_PYTHON" \
    "(run PYTHON=python$SUPPORTED_PYTHON scripts/bootstrap.sh, after removing $VENV if it was made by another)" >&2
  exit 1
fi

if [[ -n "${SUPERMOE_STACK:-}" ]]; then
  stack=$SUPERMOE_STACK
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  stack=cuda
else
  stack=cpu
fi

want=$(cat "requirements/$stack.txt" requirements/torchrec.txt requirements/base.txt requirements/dev.txt \
       setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
stamp="$VENV/.supermoe-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stack $want" ]]; then
  exit 0
fi

start=$(date +%s)
echo "bootstrap: installing the $stack stack into $VENV (one time; later runs are a no-op)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Order matters: torch + fbgemm first, then torchrec without its metadata deps, then everything else.
"${pip[@]}" -r "requirements/$stack.txt"
"${pip[@]}" --no-deps -r requirements/torchrec.txt
"${pip[@]}" -r requirements/base.txt -r requirements/dev.txt
"${pip[@]}" --no-deps --no-build-isolation -e .

if ! "$VENV/bin/python" -m supermoe_rec.env_check; then
  cat >&2 <<MSG
bootstrap: the $stack stack installed but does not load (see the error above).
  Common cause: a CUDA 'fbgemm-gpu' overwrote 'fbgemm-gpu-cpu'. Remove $VENV and run scripts/bootstrap.sh again.
MSG
  exit 1
fi
echo "$stack $want" > "$stamp"
echo "bootstrap: done in $(( $(date +%s) - start ))s" >&2
