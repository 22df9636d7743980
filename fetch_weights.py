"""Download the ImageNet backbone weights that LPIPS loads, on a machine with internet.

    python fetch_lpips_weights.py [--net alex|vgg|all]

The files land in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints).
Copy that folder to the same place on machines without internet (HPC compute nodes), or
point TORCH_HOME at a shared copy. The small LPIPS heads ship inside the lpips package.
"""
import argparse
import os

import torch
from torchvision.models import AlexNet_Weights, VGG16_Weights

WEIGHTS = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=["alex", "vgg", "all"], default="all")
    args = parser.parse_args()
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for net in (["alex", "vgg"] if args.net == "all" else [args.net]):
        weights = WEIGHTS[net]
        path = os.path.join(folder, os.path.basename(weights.url))
        if os.path.isfile(path):
            print(f"{net}: already present at {path}")
            continue
        weights.get_state_dict(progress=True, check_hash=True)
        print(f"{net}: saved {path}")
    print(f"copy {folder} to $TORCH_HOME/hub/checkpoints on the machines that evaluate")


if __name__ == "__main__":
    main()
