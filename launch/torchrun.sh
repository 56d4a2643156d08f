#!/usr/bin/env bash
# Single-node launch of pretrain.py under torchrun (elastic: restarts from the latest checkpoint).
#   bash launch/torchrun.sh [pretrain.py flags...]
# Variables (all optional):
#   NPROC_PER_NODE  processes on this node (default: number of visible GPUs, else 2)
#   MAX_RESTARTS    how often torchrun restarts all ranks after one fails (default 0)
#   CKPT_DIR        adds --save/--load CKPT_DIR and --exit-signal-handler, so a restart or a
#                   re-run resumes from the latest complete checkpoint (the dir is created)
#   PYTHON          interpreter with megalite installed (default: python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$py" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
ckpt=()
if [ -n "${CKPT_DIR:-}" ]; then
  mkdir -p "$CKPT_DIR"
  ckpt=(--save "$CKPT_DIR" --load "$CKPT_DIR" --exit-signal-handler)
fi
# torchrun >= 2.5 shares its rendezvous TCPStore with the workers and keeps it across restarts,
# so restarted workers read the previous attempt's gloo/NCCL addresses and fail to connect
# (pytorch/pytorch#135712, #167288). A store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
  --max-restarts "${MAX_RESTARTS:-0}" "$root/pretrain.py" "${ckpt[@]}" "$@"
