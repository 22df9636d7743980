#!/usr/bin/env bash
# Launch training the right way for the machine it runs on.
#   no GPU or one GPU      -> python train_single_gpu.py
#   several GPUs, one node -> torchrun --standalone --nproc_per_node=<GPUs>
#   SLURM, several nodes   -> one torchrun per node, rendezvous on the first node
# Usage: ./run_train.sh [--config FILE] [--set SECTION.KEY=VALUE ...] [--resume PATH|auto] [--device cpu|cuda]
# trainer_params.gpus caps the GPUs used per node (-1 = all visible). Set PYTHON to choose
# the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
args=("$@")
if [[ " ${args[*]-} " != *" --config "* && " ${args[*]-} " != *" --config="* ]]; then
    args=(--config config_vae_sthv2.yaml "${args[@]}")
fi

# Validate the config before launching anything; prints the GPUs to use per node.
nproc=$("$PYTHON" - "${args[@]}" <<'PY'
import argparse, sys
import torch
from config import ConfigError, load_config
p = argparse.ArgumentParser()
p.add_argument("--config"); p.add_argument("--set", action="append", default=[])
p.add_argument("--device")
a, _ = p.parse_known_args()
try:
    cfg = load_config(a.config, a.set)
except ConfigError as e:
    sys.exit(f"error: {e}")
visible = torch.cuda.device_count() if a.device != "cpu" else 0
want = cfg.trainer_params.gpus
print(0 if want == 0 else visible if want < 0 else min(want, visible))
PY
)

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if (( nnodes > 1 )) && [[ -z "${SLURM_STEP_ID:-}" ]]; then
    # In the batch script of a multi-node allocation: start one copy of this script per node.
    exec srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 "$0" "${args[@]}"
fi

if (( nnodes > 1 )); then
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    exec "$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --node_rank="${SLURM_NODEID}" \
        --nproc_per_node="$(( nproc > 0 ? nproc : 1 ))" --rdzv_backend=c10d \
        --rdzv_endpoint="${master}:${MASTER_PORT:-29500}" --rdzv_id="${SLURM_JOB_ID}" \
        train_ddp.py "${args[@]}"
elif (( nproc > 1 )); then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
        train_ddp.py "${args[@]}"
else
    exec "$PYTHON" train_single_gpu.py "${args[@]}"
fi
