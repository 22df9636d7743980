"""Train with DistributedDataParallel under torchrun, on one or many nodes.

    torchrun --nproc_per_node=8 train_ddp.py --config config_vae_sthv2.yaml [--set ...]
             [--resume PATH|auto] [--device cpu|cuda]

NCCL on GPUs, gloo on CPUs. data_params.*_batch_size are global batches, split evenly over
the WORLD_SIZE processes. Run without torchrun it trains as a single process.
"""
import os
import sys
from datetime import timedelta

from config import precheck
from errors import run_main
from options import parse_training_args

if __name__ == "__main__":
    ARGS = parse_training_args(__doc__.splitlines()[0])   # --help answers before torch loads
    run_main(lambda: precheck(ARGS.config, ARGS.set))     # so does a typo in the config

# The heavy imports, once the command line is known to be good.
import torch
import torch.distributed as dist

from config import load_config
from runtime import Runtime, pick_device
from training import run


def init_process_group(device, rank, world_size):
    """Join the group described by the environment (torchrun, or srun setting RANK etc.).

    Keys go under a prefix per torchrun restart: the elastic agent keeps one store across
    restarts, and without the prefix restarted workers can read the dead workers' addresses
    and fail to connect.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store,
                          timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore(f"train_ddp/attempt_{attempt}", store),
                            rank=rank, world_size=world_size,
                            **({"device_id": device} if device.type == "cuda" else {}))


def main(args):
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))

    def runtime(cfg):
        device = pick_device(args.device, cfg.trainer_params.gpus, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "RANK" in os.environ:
            init_process_group(device, rank, world_size)
        else:
            print("train_ddp.py: not started by torchrun (no RANK in the environment): "
                  "training as one process; torchrun --nproc_per_node=N train_ddp.py ... "
                  "trains on N", file=sys.stderr)
        return Runtime(rank, local_rank, world_size, device)

    # After an elastic restart (torchrun --max-restarts) continue from the last checkpoint.
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and resume is None:
        resume = "auto"
    try:   # the config is checked before any GPU or network work
        run(lambda: load_config(args.config, args.set, world_size), runtime, resume,
            args.allow_data_change)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(ARGS)
