"""Download the pretrained weights evaluation needs, on a machine with internet.

    python fetch_weights.py [--lpips alex|vgg|all|none] [--fid]

LPIPS loads ImageNet AlexNet/VGG backbones (its small heads ship inside the lpips package);
rFID loads the FID Inception-v3 (pytorch-fid's port of TensorFlow's network, through piq). The
files land in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints). Copy that
folder to the same place on machines without internet (HPC compute nodes), or point
TORCH_HOME at a shared copy. Exit codes: 0 done, 1 a download failed.
"""
import argparse
import os
import sys

from errors import run_main
from options import about


def lpips_weights():
    from torchvision.models import AlexNet_Weights, VGG16_Weights
    return {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}


def fetch(name, url, folder):
    import torch
    path = os.path.join(folder, os.path.basename(url))
    if os.path.isfile(path):
        print(f"{name}: already present at {path}")
        return
    try:
        torch.hub.load_state_dict_from_url(url, model_dir=folder, progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:     # URLError is an OSError; a bad hash a RuntimeError
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        sys.exit(f"error: cannot download {name} weights from {url} ({reason}); run this on a "
                 f"machine with internet and copy {folder} here")
    print(f"{name}: saved {path}")


def main():
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--lpips", choices=["alex", "vgg", "all", "none"], default="all",
                        help="LPIPS backbones to fetch (default: all)")
    parser.add_argument("--fid", action="store_true", help="also fetch the FID Inception weights")
    args = parser.parse_args()
    import torch                         # after the command line is known to be good
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    nets = {"all": ["alex", "vgg"], "none": []}.get(args.lpips, [args.lpips])
    for net in nets:
        fetch(f"LPIPS {net}", lpips_weights()[net].url, folder)
    if args.fid:
        from piq.feature_extractors.fid_inception import FID_WEIGHTS_URL
        fetch("FID Inception", FID_WEIGHTS_URL, folder)
    print(f"copy {folder} to $TORCH_HOME/hub/checkpoints on the machines that evaluate")


if __name__ == "__main__":
    run_main(main)
