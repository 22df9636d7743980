"""Compare a trained VAE with a trained LAQ (LAPA's latent action model) on the same frames.

    python compare_with_laq.py --vae CKPT --laq CKPT [--laq-repo DIR] [--laq-config YAML]
        (--image IMG | --frames FIRST SECOND | --data-path DIR [--num-pairs N] [--offset K])
        --output DIR [--device cpu|cuda] [--lpips-net alex|vgg|none]

LAQ predicts the future frame from the current frame and a few discrete action codes; the
VAE reconstructs that future frame from its own latent. Both are scored against the same
target frame in [0, 1] with the metrics of metrics.py. LAQ's code is loaded from the user's
checkout (--laq-repo, the folder holding laq_model/) without running its trainer imports,
and built on any device although its quantizer asks for 'cuda'.
"""
import argparse
import csv
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont
from torch.overrides import TorchFunctionMode

from checkpoint import CheckpointError, atomic_write, load_checkpoint
from config import ConfigError, data_params_of
from dataset_sthv2 import DECODE_ERRORS, DataError, build_split, decode_rgb, resize_frame
from evaluate import load_model, section
from metrics import (CI_METHOD, ImageMetrics, LpipsWeightsMissing, add_lpips_arguments,
                     codebook_diagnostics, latent_summary, lpips_label)
from runtime import pick_device

# LAPA's SthV2 hyperparameters for LatentActionQuantization (--laq-config overrides them).
LAPA_LAQ_CONFIG = {"dim": 1024, "quant_dim": 32, "codebook_size": 8, "image_size": 256,
                   "patch_size": 32, "spatial_depth": 8, "temporal_depth": 8, "dim_head": 64,
                   "heads": 16, "code_seq_len": 4}
CODE_SEQ_LENS = (1, 2, 4, 16, 64, 256)
FIGURE_ROWS = 8


class LaqError(RuntimeError):
    """LAQ's code or checkpoint cannot be used (one line that says why and what to do)."""


# --- loading LAQ from the user's checkout ----------------------------------------------

def find_laq_package(laq_repo):
    """The laq_model folder: inside --laq-repo (or its laq/ subfolder), or installed."""
    if laq_repo:
        for candidate in (os.path.join(laq_repo, "laq_model"),
                          os.path.join(laq_repo, "laq", "laq_model")):
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
        raise LaqError(f"--laq-repo {laq_repo} has no laq_model/ folder: pass the folder that "
                       f"contains laq_model/ (LAPA's laq/)")
    spec = importlib.util.find_spec("laq_model")
    if spec is None or not spec.submodule_search_locations:
        raise LaqError("LAQ's code was not found: pass --laq-repo PATH (LAPA's laq/ folder, "
                       "which contains laq_model/) or install laq_model")
    return list(spec.submodule_search_locations)[0]


def import_laq_class(package_dir):
    """LatentActionQuantization, imported as laq_model.<module> without running
    laq_model/__init__.py (which imports the trainer and its wandb/accelerate needs)."""
    defining = [f[:-3] for f in sorted(os.listdir(package_dir)) if f.endswith(".py") and re.search(
        r"^class LatentActionQuantization\b", open(os.path.join(package_dir, f)).read(), re.M)]
    if not defining:
        raise LaqError(f"no file in {package_dir} defines class LatentActionQuantization")
    package = types.ModuleType("laq_model")
    package.__path__ = [package_dir]
    package.__file__ = os.path.join(package_dir, "__init__.py")
    for name in [m for m in sys.modules if m == "laq_model" or m.startswith("laq_model.")]:
        del sys.modules[name]
    sys.modules["laq_model"] = package
    try:
        module = importlib.import_module(f"laq_model.{defining[0]}")
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("laq_model"):
            raise LaqError(f"LAQ's model code needs the Python module '{e.name}', a dependency "
                           f"of LAQ itself, not of this project: pip install {e.name}") from None
        raise
    return module.LatentActionQuantization


def _is_cuda(value):
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    return isinstance(value, torch.device) and value.type == "cuda"


class RedirectCuda(TorchFunctionMode):
    """Inside this context, tensors asked for on 'cuda' are made on `device` instead, so code
    that hard-codes device='cuda' builds on any machine, its files untouched."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0].to(self.device)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = self.device
        if func is torch.Tensor.to:
            args = tuple(self.device if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def laq_config(path, laq_class):
    """LAPA's hyperparameters, overridden by a YAML mapping; keys must be constructor args."""
    config = dict(LAPA_LAQ_CONFIG)
    if path:
        try:
            with open(path) as f:
                override = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise LaqError(f"cannot read --laq-config {path}: {e}") from None
        if not isinstance(override, dict):
            raise LaqError(f"--laq-config {path} must be a mapping of constructor arguments")
        known = set(inspect.signature(laq_class.__init__).parameters) - {"self"}
        for key, value in override.items():
            if key not in known:
                raise LaqError(f"--laq-config {path}: {key} is not an argument of "
                               f"LatentActionQuantization (known: {', '.join(sorted(known))})")
            config[key] = value
    if config["image_size"] % config["patch_size"]:
        raise LaqError(f"LAQ image_size {config['image_size']} is not a multiple of "
                       f"patch_size {config['patch_size']}")
    if config["code_seq_len"] not in CODE_SEQ_LENS:
        raise LaqError(f"LAQ code_seq_len {config['code_seq_len']} is not one of {CODE_SEQ_LENS}")
    return config


def laq_state_dict(path):
    """A plain state_dict from LAPA's trainer (maybe wrapped, maybe 'module.'-prefixed)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise LaqError(str(e)) from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
            if torch.is_tensor(v)}


def load_laq(args, device):
    """(LAQ model in eval mode, its config, key report). Every model key must be found."""
    laq_class = import_laq_class(find_laq_package(args.laq_repo))
    config = laq_config(args.laq_config, laq_class)
    with RedirectCuda(device):
        model = laq_class(**config)
    state, own = laq_state_dict(args.laq), model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or mismatched:
        raise LaqError(f"LAQ checkpoint {args.laq} does not fit the model built with {config}: "
                       f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(mismatched)} "
                       f"shape mismatches (e.g. {mismatched[:2]}); check --laq-config")
    torch.nn.Module.load_state_dict(model, {k: state[k] for k in own}, strict=True)
    with RedirectCuda(device):
        model = model.to(device).eval()
    if unexpected:
        print(f"warning: LAQ checkpoint has {len(unexpected)} keys the model does not use, "
              f"e.g. {unexpected[:3]}", file=sys.stderr)
    return model, config, {"missing_keys": missing, "unexpected_keys": unexpected}


# --- inputs -------------------------------------------------------------------------------

def read_file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def frame_pairs(args, vae_config):
    """[((current name, target name), read)] where read() returns both frames' encoded bytes,
    and a note describing where the pairs came from. Pairs from --data-path come from the
    split (--split) of the VAE checkpoint's own data settings."""
    if args.image:
        return [((args.image, args.image), lambda: [read_file_bytes(args.image)] * 2)], {
            "source": "image", "identity_clip": True,
            "note": "--image: the image is both the current and the target frame (identity "
                    "clip), so LAQ's action codes carry no motion"}
    if args.frames:
        return [(tuple(args.frames), lambda: [read_file_bytes(p) for p in args.frames])], {
            "source": "frames", "identity_clip": False}
    # the split the VAE's own run defined (its label files, val_fraction, frame_stride)
    d = data_params_of(vae_config, data_path=args.data_path,
                       index_cache_dir=args.index_cache_dir or None)
    if d.dataset != "sthv2":
        raise DataError(f"the VAE was trained on {d.dataset}; frame pairs need SthV2 videos")
    pairs = build_split(d, args.split, image_size=None, pair_offset=args.offset)
    if len(pairs) == 0:
        raise DataError(f"no {args.split} video in {args.data_path} has more than "
                        f"{args.offset} frames")
    index = pairs.index
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(pairs), size=min(args.num_pairs, len(pairs)), replace=False))
    refs = [(int(pairs.video[i]), int(pairs.pos[i])) for i in chosen]
    out = [((index.frame_path(v, t), index.frame_path(v, t + args.offset)),
            lambda v=v, t=t: [index.read_bytes(v, t), index.read_bytes(v, t + args.offset)])
           for v, t in refs]
    return out, {"source": "data_path", "identity_clip": False, "data_path": args.data_path,
                 "split": args.split, "split_source": pairs.source, "offset": args.offset,
                 "seed": args.seed, "available_pairs": len(pairs),
                 "videos": sorted({index.videos[v] for v, _ in refs}, key=str)}


def load_pair(pair, sizes, resize):
    """{size: uint8 (2, 3, S, S)} for a (current, target) pair, or None if unreadable."""
    names, read = pair
    try:
        frames = [decode_rgb(data) for data in read()]
        return {s: torch.stack([resize_frame(f, s, resize) for f in frames]) for s in sizes}
    except DECODE_ERRORS as e:
        print(f"warning: skipping pair {names}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def at_size(x, size):
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --- the comparison -------------------------------------------------------------------

@torch.no_grad()
def compare(vae, laq, pairs, metrics, sizes, args, device):
    vae_size, laq_size, score_size = sizes
    rows, vae_latents, codes, figure = [], [], [], []
    generator = torch.Generator(device=device).manual_seed(0)
    for start in range(0, len(pairs), args.batch_size):
        batch = [(pair[0], load_pair(pair, {vae_size, laq_size, score_size}, args.resize))
                 for pair in pairs[start:start + args.batch_size]]
        batch = [(p, f) for p, f in batch if f is not None]
        if not batch:
            continue
        stack = {s: torch.stack([f[s] for _, f in batch]).to(device).float() / 255
                 for s in {vae_size, laq_size, score_size}}              # (B, 2, 3, S, S)
        target = stack[score_size][:, 1]
        vae_recon, _, latents = vae.evaluate_batch(stack[vae_size][:, 1] * 2 - 1, generator)
        vae_recon = at_size((vae_recon.float() + 1) / 2, score_size).clamp(0, 1)
        clip = stack[laq_size].permute(0, 2, 1, 3, 4)                      # (B, 3, 2, S, S)
        laq_recon = at_size(laq.inference(clip).float(), score_size).clamp(0, 1)
        codes.append(laq.inference(clip, return_only_codebook_ids=True).cpu())
        scores = {"vae": metrics(target, vae_recon), "laq": metrics(target, laq_recon)}
        for k, (paths, _) in enumerate(batch):
            rows.append({"current": paths[0], "target": paths[1],
                         **{f"{m}_{name}": float(v[k]) for m, s in scores.items()
                            for name, v in s.items()}})
        vae_latents.append({k: v.cpu() for k, v in latents.items()})
        first_row = len(rows) - len(batch)
        for k in range(min(len(batch), FIGURE_ROWS - len(figure))):
            figure.append((stack[score_size][k, 0].cpu(), target[k].cpu(),
                           vae_recon[k].cpu(), laq_recon[k].cpu(), rows[first_row + k]))
    return rows, vae_latents, codes, figure


def colormap(values, vmax):
    """Map |error| in [0, vmax] to RGB uint8 (black -> purple -> orange -> pale yellow)."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97],
                        [252, 253, 191]], dtype=np.float64)
    t = np.clip(values / max(vmax, 1e-8), 0, 1) * (len(anchors) - 1)
    lo = np.floor(t).astype(int).clip(0, len(anchors) - 2)
    frac = (t - lo)[..., None]
    return ((1 - frac) * anchors[lo] + frac * anchors[lo + 1]).round().astype(np.uint8)


def draw_figure(figure, path, metric_names):
    """Rows: current, target, VAE, LAQ, |VAE - target|, |LAQ - target| on one error scale."""
    tile, pad, text_h, head = 160, 4, 28, 22
    errors = [((r[2] - r[1]).abs().mean(0), (r[3] - r[1]).abs().mean(0)) for r in figure]
    vmax = max(float(e.max()) for pair in errors for e in pair)
    titles = ["current frame", "target frame", "VAE", "LAQ", "|VAE - target|", "|LAQ - target|"]
    width = len(titles) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, head + len(figure) * (tile + text_h) + 20), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((pad + c * (tile + pad), 5), title, fill="black", font=font)
    for r, ((current, target, vae, laq, row), (err_vae, err_laq)) in enumerate(zip(figure, errors)):
        y = head + r * (tile + text_h)
        tiles = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                 for x in (current, target, vae, laq)]
        tiles += [colormap(e.numpy(), vmax) for e in (err_vae, err_laq)]
        for c, arr in enumerate(tiles):
            img = Image.fromarray(arr).resize((tile, tile), Image.BILINEAR)
            canvas.paste(img, (pad + c * (tile + pad), y))
        text = "   ".join(f"{m.upper()} " + " ".join(
            f"{n} {row[f'{m}_{n}']:.3f}" for n in metric_names if n in ("psnr", "ssim", "lpips", "mse"))
            for m in ("vae", "laq"))
        draw.text((pad, y + tile + 6), text, fill="black", font=font)
    draw.text((pad, canvas.height - 16), f"error maps: mean |error| over RGB, one scale 0 - {vmax:.3f}",
              fill="black", font=font)
    canvas.save(path)


def print_table(report, names):
    print(f"\n{report['pairs']} frame pairs ({report['inputs']['source']})"
          + ("  [identity clip]" if report["inputs"]["identity_clip"] else ""))
    print(f"{'metric':<7} {'VAE mean':>10} {'95% CI':>22}   {'LAQ mean':>10} {'95% CI':>22}")
    for name in names:
        v, q = report["vae"][name], report["laq"][name]
        ci = lambda s: f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"  # noqa: E731
        print(f"{name:<7} {v['mean']:>10.4f} {ci(v):>22}   {q['mean']:>10.4f} {ci(q):>22}")
    laq = report["latent"]["laq"]
    print(f"LAQ codes: {laq['unique_codes']}/{laq['codebook_size']} used, "
          f"perplexity {laq['perplexity']:.2f}")
    vae = report["latent"]["vae"]
    if vae and "active_units" in vae:
        print(f"VAE latent: {vae['active_units']}/{vae['latent_dim']} active units, "
              f"KL {vae['kl_total']:.2f} nats")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="VAE checkpoint of this project")
    parser.add_argument("--laq", required=True, help="LAQ checkpoint (LAPA's state_dict)")
    parser.add_argument("--laq-repo", help="folder containing laq_model/ (LAPA's laq/)")
    parser.add_argument("--laq-config", help="YAML of LatentActionQuantization arguments")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image, used as both frames (identity clip)")
    source.add_argument("--frames", nargs=2, metavar=("FIRST", "SECOND"))
    source.add_argument("--data-path", help="SthV2 frames folder; pairs from --split of the "
                                            "VAE run's own split (its label files, val_fraction)")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--offset", type=int, default=30, help="frames between the pair (LAPA: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the pairs")
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="crop: the centre square, resized (the VAE's training); "
                             "stretch: straight to a square (LAPA's inference)")
    parser.add_argument("--index-cache-dir", default="")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    add_lpips_arguments(parser)
    args = parser.parse_args()
    if args.num_pairs < 1 or args.offset < 1 or args.batch_size < 1:
        parser.error("--num-pairs, --offset and --batch-size must be >= 1")
    return args


def main():
    args = parse_args()
    try:
        device = pick_device(args.device, gpus=-1)
        metrics = ImageMetrics(device, args.lpips_net, args.lpips_random_backbone)
        vae, vae_ckpt = load_model(args.vae, device)
        laq, config, key_report = load_laq(args, device)
        pairs, inputs = frame_pairs(args, vae_ckpt["config"])
    except (ConfigError, LaqError, LpipsWeightsMissing, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    vae_size, laq_size = vae_ckpt["config"]["model_params"]["image_size"], config["image_size"]
    score_size = min(vae_size, laq_size)
    rows, vae_latents, codes, figure = compare(vae, laq, pairs, metrics,
                                                (vae_size, laq_size, score_size), args, device)
    if not rows:
        sys.exit("error: none of the frame pairs could be read")
    os.makedirs(args.output, exist_ok=True)
    names = metrics.names
    skipped = {} if metrics.lpips else {"lpips": "skipped with --lpips-net none"}
    model_section = lambda m: section({n: [r[f"{m}_{n}"] for r in rows] for n in names},  # noqa: E731
                                      names, skipped)
    report = {"pairs": len(rows), "inputs": inputs, "scoring_size": score_size,
              "resize": args.resize, "image_sizes": {"vae": vae_size, "laq": laq_size},
              "ci_method": CI_METHOD, "lpips_net": lpips_label(args),
              "vae": model_section("vae"), "laq": model_section("laq"),
              "latent": {"vae": latent_summary(vae_latents, getattr(vae, "num_embeddings", None)),
                         "laq": codebook_diagnostics(torch.cat(codes), config["codebook_size"])},
              "checkpoints": {"vae": os.path.abspath(args.vae), "laq": os.path.abspath(args.laq),
                              "laq_keys": key_report},
              "laq_config": config}
    with atomic_write(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    with atomic_write(os.path.join(args.output, "per_pair.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    draw_figure(figure, os.path.join(args.output, "comparison.png"), names)
    if inputs.get("note"):
        print(f"note: {inputs['note']}")
    print_table(report, names)
    print(f"\nwrote {args.output}/comparison.png, metrics.json, per_pair.csv")


if __name__ == "__main__":
    main()
