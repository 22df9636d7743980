"""Write an untrained stand-in LAQ checkpoint and its config, to try compare_with_laq.py on the
demo data without a LAQ of your own.

    python tests/laq_standin/make_demo_laq.py --out demo_laq   # demo_laq/model.pt, laq.yaml

The stand-in package beside this file has LAQ's constructor, input/output contract and loading
behaviour over a small network (the tests use it); its numbers mean nothing.
"""
import argparse
import os
import sys

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))     # the repository, for laq_loader

from laq_loader import RedirectCuda, import_laq_class  # noqa: E402

DEMO_LAQ = {"dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
            "spatial_depth": 2, "temporal_depth": 1, "dim_head": 8, "heads": 2,
            "code_seq_len": 4}


def make_demo_laq(out, config=DEMO_LAQ, seed=0):
    """(checkpoint path, config path) of a stand-in LAQ saved as LAPA's trainer saves it."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    with RedirectCuda("cpu"):
        model = import_laq_class(os.path.join(HERE, "laq_model"))(**config)
    checkpoint, config_path = os.path.join(out, "model.pt"), os.path.join(out, "laq.yaml")
    # a plain state_dict saved from the DDP-wrapped model, as LAPA's trainer writes it
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, checkpoint)
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    return checkpoint, config_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for model.pt and laq.yaml")
    args = parser.parse_args()
    paths = make_demo_laq(args.out)
    print(f"wrote {paths[0]} and {paths[1]}")
