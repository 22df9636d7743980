"""Train on one GPU, or on the CPU, in a single process: the debugging twin of train_ddp.py.

    python train_single_gpu.py --config config_vae_sthv2.yaml [--set SECTION.KEY=VALUE ...]
                               [--resume PATH|auto] [--device cpu|cuda]
"""
from config import precheck
from errors import run_main
from options import parse_training_args


def main(args):
    run_main(lambda: precheck(args.config, args.set))   # a typo is one line before torch loads
    import torch                                  # after the command line is known to be good

    from config import load_config
    from runtime import Runtime, pick_device
    from training import run

    def runtime(cfg):
        device = pick_device(args.device, cfg.trainer_params.gpus)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Runtime(device=device)

    run(lambda: load_config(args.config, args.set), runtime, args.resume, args.allow_data_change)


if __name__ == "__main__":
    main(parse_training_args(__doc__.splitlines()[0]))
