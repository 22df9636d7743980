"""Convert LAQ (LAPA's latent action model) checkpoints to this repository's and back.

    python convert_laq.py --laq CKPT [--laq-config YAML] [--laq-weights ema|online] --out OUT.pt
    python convert_laq.py --to-laq CKPT --out LAQ.pt

--laq reads any layout LAPA's trainer writes (a state_dict, 'module.'-prefixed, the trainer's
{'model': ...} package, an ema-pytorch file with online and EMA weights) and writes a
checkpoint of this repository: a LatentActionModel of architecture `laq` with bottleneck
`nsvq`, which computes LAQ's function, so evaluate.py, compare_with_laq.py --model,
label_actions.py and trainer_params.init_from take it. The model's sizes are read from the
tensors' shapes; image_size (256) and, where the action convs leave it open, code_seq_len come
from --laq-config, a YAML of LatentActionQuantization's arguments (what it sets must agree
with the shapes). Strict: every LAQ tensor is placed, or named with the reason it has no place
here (the zero bias buffers of gain-only LayerNorms, empty null key/value slots). The
checkpoint's config is the study config (configs/latent_action_sthv2.yaml, LAPA's recipe)
with these sizes.

--to-laq writes a model trained here (architecture laq, bottleneck nsvq) as the state_dict
LAPA's LatentActionQuantization loads with every key matched, and LAQ.yaml beside it: the
constructor arguments to build it with (also a --laq-config for compare_with_laq.py).
"""
import argparse
import os

from errors import ConfigError, run_main
from options import Formatter, check_exist

STUDY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                            "latent_action_sthv2.yaml")
# LAQ's arguments with no counterpart here; they must keep LAQ's defaults
NOT_HERE = {"attn_dropout": 0.0, "ff_dropout": 0.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--laq", metavar="CKPT", help="a LAQ checkpoint to convert")
    source.add_argument("--to-laq", metavar="CKPT",
                        help="a checkpoint of this repository to write as LAQ's state_dict")
    parser.add_argument("--laq-config", metavar="YAML",
                        help="LatentActionQuantization arguments the shapes leave open "
                             "(image_size; code_seq_len)")
    parser.add_argument("--laq-weights", choices=["ema", "online"], default="ema",
                        help="which weights of an ema-pytorch file to convert")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.to_laq and (args.laq_config or args.laq_weights != "ema"):
        parser.error("--laq-config and --laq-weights describe a LAQ checkpoint: use them with "
                     "--laq")
    return args


def laq_arguments(state, config_path):
    """LatentActionQuantization's arguments for `state`: its shapes, then --laq-config, then
    LAPA's values. LaqError when the YAML contradicts the shapes."""
    from errors import LaqError
    from laq_layout import code_seq_len_of, config_from_shapes
    from laq_loader import LAPA_LAQ_CONFIG, LAQ_ARGUMENTS, laq_config, laq_overrides
    shapes = config_from_shapes(state)
    given = laq_overrides(config_path, set(LAQ_ARGUMENTS)) if config_path else {}
    for key, value in given.items():
        if key in shapes and value != shapes[key]:
            raise LaqError(f"--laq-config {config_path}: {key} {value!r}, but the checkpoint's "
                           f"tensors are of {key} {shapes[key]}")
        if key in NOT_HERE and value != NOT_HERE[key]:
            raise LaqError(f"--laq-config {config_path}: {key} {value!r}: this repository's "
                           f"LAQ has no dropout (LAPA trains with {NOT_HERE[key]})")
    config = laq_config(config_path, base={**LAPA_LAQ_CONFIG, **shapes})
    if "code_seq_len" not in given:
        config["code_seq_len"] = code_seq_len_of(state,
                                                 config["image_size"] // config["patch_size"])
    return {k: v for k, v in config.items() if k not in NOT_HERE}


def study_config(arguments):
    """The study config with the model's sizes: a full config of this repository."""
    from config import config_from_dict
    from config_types import parse_yaml
    with open(STUDY_CONFIG) as f:
        raw = parse_yaml(f)
    raw["model_params"].update(arguments, architecture="laq", bottleneck="nsvq")
    raw["data_params"]["image_size"] = arguments["image_size"]
    raw["logging_params"]["name"] = "laq_converted"        # its row in compare_with_laq.py
    return config_from_dict(raw, check_paths=False).to_dict()


def from_laq(args):
    import torch
    from checkpoint import save_atomic
    from laq_layout import from_laq_state
    from laq_loader import laq_state_dict
    from models import build_model
    state, layout = laq_state_dict(args.laq, args.laq_weights)
    arguments = laq_arguments(state, args.laq_config)
    config = study_config(arguments)
    with torch.device("meta"):                       # names and shapes only
        model = build_model(config["model_params"])
    ours, report = from_laq_state(state, model)
    size = sum(v.numel() for v in ours.values())
    save_atomic({"model": {k: v.contiguous() for k, v in ours.items()}, "config": config,
                 "step": 0, "epoch": 0,
                 "source": {"laq": os.path.abspath(args.laq), "layout": layout,
                            "laq_arguments": arguments, **report}}, args.out)
    reasons = {}
    for reason in report["no_place"].values():
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"LAQ {args.laq} ({layout}): {report['placed']} tensors placed, "
          f"{len(report['no_place'])} with no place here ("
          + "; ".join(f"{n} x {reason}" for reason, n in reasons.items()) + ")")
    print(f"wrote {args.out}: LatentActionModel, architecture laq, bottleneck nsvq, "
          f"{size:,} parameters, " + ", ".join(f"{k} {v}" for k, v in arguments.items()))


def to_laq(args):
    import yaml
    from checkpoint import save_atomic
    from evaluation import load_model
    from files import atomic_write
    from laq_layout import to_laq_state
    model, ckpt = load_model(args.to_laq, "cpu")
    state = to_laq_state(model)
    params = ckpt["config"]["model_params"]
    arguments = {k: params[k] for k in ("dim", "quant_dim", "codebook_size", "image_size",
                                        "patch_size", "spatial_depth", "temporal_depth",
                                        "dim_head", "heads", "channels", "code_seq_len")}
    yaml_path = os.path.splitext(args.out)[0] + ".yaml"
    save_atomic(state, args.out)
    with atomic_write(yaml_path, "w") as f:
        yaml.safe_dump(arguments, f, sort_keys=False)
    print(f"wrote {args.out}: LAQ's state_dict, {len(state)} tensors "
          f"(every key of LatentActionQuantization's, none other)")
    print(f"wrote {yaml_path}: LatentActionQuantization({', '.join(f'{k}={v}' for k, v in arguments.items())})")


def main(args):
    check_exist(args, "--laq", "--to-laq", "--laq-config")
    outputs = [args.out] + ([os.path.splitext(args.out)[0] + ".yaml"] if args.to_laq else [])
    for path in outputs:
        if os.path.exists(path) and not args.overwrite:
            raise ConfigError(f"--out: {path} exists; pass --overwrite to replace it")
    (to_laq if args.to_laq else from_laq)(args)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
