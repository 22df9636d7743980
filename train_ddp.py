"""Train with DistributedDataParallel under torchrun, on one or many nodes.

    torchrun --nproc_per_node=8 train_ddp.py --config config_vae_sthv2.yaml [--set ...]
             [--resume PATH|auto] [--device cpu|cuda]

NCCL on GPUs, gloo on CPUs. data_params.*_batch_size are global batches, split evenly over
the WORLD_SIZE processes. Run without torchrun it trains as a single process.
"""
import os
import sys

from config import precheck
from errors import run_main
from options import parse_training_args


def main(args):
    run_main(lambda: precheck(args.config, args.set))   # a typo is one line before torch loads
    import torch                                  # after the command line is known to be good
    import torch.distributed as dist

    from config import load_config
    from runtime import Runtime, init_process_group, pick_device
    from training import run

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
    main(parse_training_args(__doc__.splitlines()[0]))
