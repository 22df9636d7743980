#!/usr/bin/env bash
# Launch training the right way for the machine it runs on.
#   no GPU or one GPU      -> python train_single_gpu.py
#   several GPUs, one node -> torchrun --standalone --nproc_per_node=<GPUs>
#   SLURM, several nodes   -> one torchrun per node, rendezvous on the first node
# Usage: ./run_train.sh [--config FILE] [--set SECTION.KEY=VALUE ...] [--resume PATH|auto] [--device cpu|cuda]
# trainer_params.gpus caps the GPUs used per node (-1 = all visible). Set PYTHON to choose
# the interpreter (default: .venv/bin/python when present, else python3), and
# RUN_TRAIN_NPROC=N to force N processes per node (e.g. DDP on CPU cores).
# Exit codes: 0 done, 1 failed, 2 bad input, 75 stopped by a signal after saving (requeue),
# also through torchrun, which itself reports 1 when its ranks stop.
set -euo pipefail
# Paths (the config, --resume, and those inside the config) are the caller's, as with python:
# the scripts run from here, in the caller's directory.
repo="$(cd "$(dirname "$0")" && pwd)"

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
    fi
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
args=("$@")
if [[ " ${args[*]-} " != *" --config "* && " ${args[*]-} " != *" --config="* ]]; then
    args=(--config "$repo/config_vae_sthv2.yaml" "${args[@]}")
fi

# Validate the config before launching anything; prints the processes per node and, on a line
# of its own (a name may end in a space), the run directory.
plan=$(RUN_TRAIN_REPO="$repo" "$PYTHON" - "${args[@]}" <<'PY'
import argparse, os, sys
sys.path.insert(0, os.environ["RUN_TRAIN_REPO"])
import torch
from config import ConfigError, load_config
p = argparse.ArgumentParser(add_help=False)
p.add_argument("--config"); p.add_argument("--set", action="append", default=[])
p.add_argument("--device")
a, _ = p.parse_known_args()
try:
    cfg = load_config(a.config, a.set)
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
visible = torch.cuda.device_count() if a.device != "cpu" else 0
want = cfg.trainer_params.gpus
nproc = 0 if want == 0 else visible if want < 0 else min(want, visible)
print(os.environ.get("RUN_TRAIN_NPROC") or nproc)
print(cfg.run_dir)
PY
) || exit $?
{ read -r nproc; IFS= read -r run_dir; } <<< "$plan"

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if (( nnodes > 1 )) && [[ -z "${SLURM_STEP_ID:-}" ]]; then
    # In the batch script of a multi-node allocation: start one copy of this script per node.
    exec srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 "$repo/run_train.sh" "${args[@]}"
fi
if (( nnodes <= 1 && nproc <= 1 )); then
    exec "$PYTHON" "$repo/train_single_gpu.py" "${args[@]}"    # its own exit code, 75 included
fi

if (( nnodes > 1 )); then
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    launch=(--nnodes="$nnodes" --node_rank="${SLURM_NODEID}"
            --nproc_per_node="$(( nproc > 0 ? nproc : 1 ))" --rdzv_backend=c10d
            --rdzv_endpoint="${master}:${MASTER_PORT:-29500}" --rdzv_id="${SLURM_JOB_ID}")
else
    launch=(--standalone --nproc_per_node="$nproc")
fi
# torchrun runs in its own session, so a signal to this script's process group reaches it
# once, from here: SIGTERM, SIGUSR1 (SLURM's warning) and SIGINT all become one SIGTERM, which
# torchrun passes to every rank. The ranks save and exit 75, but torchrun then reports 1; the
# run's stopped.json (written by rank 0 after the save) tells this script to exit 75.
rm -f "$run_dir/stopped.json"
setsid "$PYTHON" -m torch.distributed.run "${launch[@]}" "$repo/train_ddp.py" "${args[@]}" &
child=$!
forwarded=""
forward() { if [[ -z "$forwarded" ]]; then forwarded=1; kill -TERM "$child" 2>/dev/null || true; fi; }
trap forward TERM USR1 INT
code=0
while true; do
    wait "$child" && code=0 || code=$?
    kill -0 "$child" 2>/dev/null || break             # wait returned for a trapped signal
done
if (( code != 0 )) && [[ -f "$run_dir/stopped.json" ]]; then
    exit 75
fi
exit "$code"
