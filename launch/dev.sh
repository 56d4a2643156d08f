#!/usr/bin/env bash
# One command for set-up plus the main job or the tests, on a fresh machine.
#   bash launch/dev.sh train [pretrain.py flags...]   short 2-rank CPU pretraining on the embedded corpus
#   bash launch/dev.sh test  [pytest args...]         the test suite
#   bash launch/dev.sh lint                           ruff lint + format check (config in pyproject.toml)
# Set-up: a .venv with the CPU torch wheel (torch==2.13.0) and megalite[dev,triton].
# GPU users keep their own CUDA torch: MEGALITE_SYSTEM_PYTHON=1 uses the current python and
# installs torch only when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}; shift || true

if [ "${MEGALITE_SYSTEM_PYTHON:-0}" = 1 ]; then
  py=$(command -v python3 || command -v python)
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".[dev,triton]"

case "$what" in
  test)
    export WANDB_MODE=disabled
    exec "$py" -m pytest -q "$@" ;;
  lint)
    "$py" -m ruff check . && exec "$py" -m ruff format --check . ;;
  train)
    nproc=${NPROC:-2}
    exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$nproc" pretrain.py \
      --train-iters 30 --log-interval 5 --eval-interval 15 --eval-iters 2 --save runs/default "$@" ;;
  *) echo "usage: bash launch/dev.sh train|test|lint [args]" >&2; exit 2 ;;
esac
