"""Compare a trained VAE with a trained LAQ (LAPA's latent action model) on the same frames.

    python compare_with_laq.py --vae CKPT --laq CKPT [--laq-repo DIR] [--laq-config YAML]
        (--image IMG | --frames FIRST SECOND | --data-path DIR [--num-pairs N] [--offset K])
        --output DIR [--split val|train] [--device cpu|cuda] [--lpips-net alex|vgg|none]
        [--fid inception|none] [--probe [--probe-pairs N]] [--tensorboard DIR]
        [--model CKPT ...]

LAQ predicts the future frame from the current frame plus a few discrete action codes; the
VAE reconstructs that future frame from its own latent. The comparison is fair by
construction: the pairs come from the split the VAE's own run defined (its label files and
val_fraction; dataset_sthv2.build_split), each model is fed frames prepared the way it was
trained (the VAE checkpoint's data_params.resize; LAQ: stretch, as LAPA trains it), and both
are scored on one target (when the two preparations differ: the centre square of the future
frame, with the stretch model's output mapped back onto it). Beside distortion it reports
rate (bits per pair), rFID, and with --probe how well each model's latent predicts the action.
Latent action models trained here (latent_action_model.py, --model, repeatable) are scored as
extra rows on the same pairs and target: LAQ's shape with a discrete or a continuous action.
docs/comparison.md says how to read every output.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple

from options import (MATPLOTLIB, SKLEARN, Formatter, add_fid_arguments, add_lpips_arguments,
                     check_exist, fid_label, lpips_label, require)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--vae", required=True, help="VAE checkpoint of this project")
    parser.add_argument("--laq", required=True, help="LAQ checkpoint (any layout LAPA writes)")
    parser.add_argument("--laq-repo", help="folder containing laq_model/ (LAPA's laq/)")
    parser.add_argument("--laq-config", help="YAML of LatentActionQuantization arguments")
    parser.add_argument("--laq-weights", choices=["ema", "online"], default="ema",
                        help="which weights of an ema-pytorch file (vae.{step}.ema.pt) to load")
    parser.add_argument("--laq-allow-unused-keys", action="store_true",
                        help="load a LAQ checkpoint that has keys the model does not use")
    parser.add_argument("--model", action="append", default=[], metavar="CKPT",
                        help="a latent action model trained here (LatentActionModel): an extra "
                             "row on the same pairs; repeatable")
    parser.add_argument("--laq-train-videos", metavar="FILE",
                        help="video ids LAQ trained on (one per line, or a SthV2 label JSON): "
                             "their pairs are left out")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image, used as both frames (identity clip)")
    source.add_argument("--frames", nargs=2, metavar=("FIRST", "SECOND"))
    source.add_argument("--data-path", help="SthV2 frames folder; pairs from --split of the "
                                            "VAE run's own split (its label files, val_fraction)")
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="the split of the VAE run the pairs come from")
    parser.add_argument("--num-pairs", type=int, default=64, help="pairs scored (--data-path)")
    parser.add_argument("--offset", type=int, default=30, help="frames between the pair (LAPA: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the pairs")
    parser.add_argument("--pairs", choices=["laq", "exact"], default="laq",
                        help="laq: one pair per video drawn as LAQ's loader draws its training "
                             "pairs (LAQ's operating point); exact: every (t, t + offset) pair "
                             "inside a video equally likely")
    parser.add_argument("--vae-resize", choices=["crop", "stretch"],
                        help="how the VAE's frames are prepared (default: as it was trained, "
                             "the checkpoint's data_params.resize)")
    parser.add_argument("--laq-resize", choices=["crop", "stretch"], default="stretch",
                        help="how LAQ's frames are prepared (default: stretch, as LAPA trains)")
    parser.add_argument("--controllability", choices=["pairs", "none"], default="pairs",
                        help="pairs: also decode each current frame with another pair's action "
                             "(and, for latent action models, a prior draw): delta PSNR")
    parser.add_argument("--probe", action="store_true",
                        help="linear probe of the action template (DIR/probe.json)")
    parser.add_argument("--probe-pairs", type=int, default=500,
                        help="pairs per split for the probe (train split -> val split)")
    parser.add_argument("--tensorboard", metavar="DIR", help="also log the figures and means here")
    parser.add_argument("--index-cache-dir", default="",
                        help="where the frame index is cached (default: ~/.cache)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per batch")
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available")
    add_lpips_arguments(parser)
    add_fid_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.num_pairs, args.offset, args.batch_size, args.probe_pairs) < 1:
        parser.error("--num-pairs, --offset, --batch-size and --probe-pairs must be >= 1")
    if args.probe and not args.data_path:
        parser.error("--probe needs --data-path (pairs from the train and val splits)")
    return args


if __name__ == "__main__":
    ARGS = parse_args()     # --help and usage errors answer before torch is imported

# The heavy imports, once the command line is known to be good.
import numpy as np
import torch
import torch.nn.functional as F

from config import data_params_of
from dataset_sthv2 import build_split
from errors import CheckpointError, DataError, exit_bad_input, run_main
from evaluate import load_model, section, start_outputs, write_report
from files import atomic_write
from frame_files import DECODE_ERRORS, decode_rgb, read_file, resize_frame
from labels import LABEL_FILES
from laq_loader import LaqRunner, load_laq
from manifest import manifest
from metrics import ImageMetrics, build_fid, codebook_diagnostics, latent_summary
from parallel import progress
from runtime import pick_device
from stats import CI_METHOD, PAIRED_METHOD, entropy_bits, paired_difference, share, summarize
from vanilla_vae_model import VanillaVAE

FIGURE_ROWS = 8
FID_MIN_IMAGES = 1000
OUTPUTS = ("metrics.json", "per_pair.csv", "probe.json", "comparison.png", "plots.png")
PAIRS_NOTE = {
    "laq": "LAQ's sampling: one pair per video, the first frame uniform over the video, the "
           "second at min(first + offset, last frame) (pairs near a video's end are closer)",
    "exact": "every pair (t, t + offset) inside a video equally likely (videos of at most "
             "offset frames give none; a video weighs by its length)"}
BASELINES = ("copy_current", "mean_colour")
OVERLAP_NOTE = ("LAQ's trainer reads every video folder under its data folder: unless LAQ was "
                "trained on a train-only folder, these {split} videos were in its training data "
                "(--laq-train-videos FILE excludes the videos it trained on)")


class Pair(NamedTuple):
    current: str                      # file names, for reports
    target: str
    video: str                        # video id ("" for --image / --frames)
    current_frame: int                # frame numbers in the video (-1 for --image / --frames)
    target_frame: int
    read: Callable                    # () -> [encoded current, encoded target]


# --- which pairs ----------------------------------------------------------------------------

def read_video_ids(path):
    """Video ids from a text file (one per line) or a SthV2 label JSON (entries with 'id')."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"cannot read --laq-train-videos {path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            return {str(entry["id"]) for entry in json.loads(text)}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--laq-train-videos {path}: not a SthV2 label file ({e})") from None
    return {line.strip() for line in text.splitlines() if line.strip()}


def split_pairs(args, vae_config, split, exclude=()):
    """The pairs of the split of the VAE run's own data settings, less the videos in `exclude`:
    with --pairs exact every (t, t + offset) pair inside a video, with --pairs laq every t with
    the second frame at min(t + offset, last) as LAQ trains; returns (dataset, kept pair
    positions, dropped pairs, dropped videos)."""
    d = data_params_of(vae_config, data_path=args.data_path,
                       index_cache_dir=args.index_cache_dir or None)
    if d.dataset != "sthv2":
        raise DataError(f"the VAE was trained on {d.dataset}; frame pairs need SthV2 videos")
    pairs = build_split(d, split, image_size=None, pair_offset=args.offset,
                        clamp_pairs=args.pairs == "laq")
    excluded = np.array([vid in exclude for vid in pairs.index.videos] + [False], dtype=bool)
    keep = ~excluded[pairs.video]                   # per pair, from one flag per video
    dropped_videos = len(np.unique(pairs.video[~keep]))
    if not keep.any():
        raise DataError(f"no {split} video in {d.data_path} has more than {args.offset} frames"
                        + (" that LAQ did not train on" if len(pairs) else ""))
    return pairs, np.flatnonzero(keep), int((~keep).sum()), dropped_videos


def choose(pairs, positions, n, seed, how="exact"):
    """n pair records from `positions` of a pairs dataset. exact: drawn uniformly without
    replacement (a video weighs by its length). laq: as LAQ's loader draws them, one pair per
    video: n videos drawn without replacement, then the first frame uniformly in the video
    and the second at min(first + offset, last)."""
    index, rng = pairs.index, np.random.default_rng(seed)
    if how == "laq":
        videos = np.unique(pairs.video[positions])
        videos = rng.choice(videos, size=min(n, len(videos)), replace=False)
        starts = np.searchsorted(pairs.video, videos)      # pairs are grouped by video
        ends = np.searchsorted(pairs.video, videos, side="right")
        picked = [int(rng.integers(s, e)) for s, e in zip(starts, ends)]
    else:
        picked = rng.choice(positions, size=min(n, len(positions)), replace=False)
    out = []
    for i in sorted(int(i) for i in picked):
        v, t = int(pairs.video[i]), int(pairs.pos[i])
        second = pairs.second(v, t)
        number = lambda pos: int(index.numbers[index.offsets[v] + pos])  # noqa: E731
        out.append(Pair(index.frame_path(v, t), index.frame_path(v, second), index.videos[v],
                        number(t), number(second),
                        lambda v=v, t=t, s=second: [index.read_bytes(v, t),
                                                    index.read_bytes(v, s)]))
    return out


def frame_pairs(args, vae_config):
    """(pairs, inputs, frame index or None): what is compared and a description of where it
    came from."""
    if args.image:
        return [Pair(args.image, args.image, "", -1, -1, lambda: [read_file(args.image)] * 2)], {
            "source": "image", "identity_clip": True,
            "note": "--image: the image is both the current and the target frame (identity "
                    "clip), so LAQ's action codes carry no motion"}, None
    if args.frames:
        first, second = args.frames
        return [Pair(first, second, "", -1, -1, lambda: [read_file(first), read_file(second)])], {
            "source": "frames", "identity_clip": False}, None
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    pairs, positions, dropped, dropped_videos = split_pairs(args, vae_config, args.split, exclude)
    chosen = choose(pairs, positions, args.num_pairs, args.seed, args.pairs)
    overlap = ({"excluded": True, "file": os.path.abspath(args.laq_train_videos),
                "dropped_pairs": dropped, "dropped_videos": dropped_videos,
                "note": f"left out {dropped} pairs from {dropped_videos} videos that LAQ "
                        f"trained on (--laq-train-videos)"} if args.laq_train_videos else
               {"excluded": False, "note": OVERLAP_NOTE.format(split=args.split)})
    return chosen, {"source": "data_path", "identity_clip": False, "data_path": args.data_path,
                    "split": args.split, "split_source": pairs.source, "offset": args.offset,
                    "pairs": args.pairs, "pairs_note": PAIRS_NOTE[args.pairs],
                    "seed": args.seed, "available_pairs": len(positions),
                    "laq_training_overlap": overlap,
                    "videos": sorted({p.video for p in chosen}, key=str)}, pairs.index


def figure_picks(pairs, n=FIGURE_ROWS):
    """Indices of up to n pairs for the picture: one per video, videos spread over the list."""
    first_of_video = {}
    for k, pair in enumerate(pairs):
        first_of_video.setdefault(pair.video or k, []).append(k)
    videos = list(first_of_video)
    spread = np.unique(np.linspace(0, len(videos) - 1, min(n, len(videos))).round().astype(int))
    return {first_of_video[videos[i]][len(first_of_video[videos[i]]) // 2] for i in spread}


# --- what each model sees, and the one target both are scored on ---------------------------

def stretch_to_crop(x, frame_sizes):
    """Map images made from whole frames squeezed to a square ("stretch") onto the centre
    square of those frames ("crop"): for each image, the band that shows the centre square
    of its (h, w) frame is resampled to a square (bilinear, exact at pixel centres)."""
    n, _, s, _ = x.shape
    centres = (torch.arange(s, dtype=torch.float32, device=x.device) * 2 + 1) / s - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    scale = torch.tensor([[min(h, w) / w, min(h, w) / h] for h, w in frame_sizes],
                         dtype=torch.float32, device=x.device)              # (n, [x, y])
    grid = torch.stack([gx, gy], -1)[None] * scale[:, None, None, :]
    return F.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)


def at_size(x, size):
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Geometry:
    """Sizes and resize modes: each model's input (as it was trained, unless overridden) and
    the scoring target (the smallest size; the shared mode, or the centre square when the
    modes differ). `inputs`: {model: (image size, resize)}, "vae" and "laq" first."""

    def __init__(self, inputs):
        self.inputs = dict(inputs)
        self.size = min(size for size, _ in self.inputs.values())
        modes = {resize for _, resize in self.inputs.values()}
        self.target = modes.pop() if len(modes) == 1 else "crop"

    def views(self):
        return set(self.inputs.values()) | {(self.size, self.target)}

    def describe(self):
        resize = {m: r for m, (_, r) in self.inputs.items()}
        same = len(set(resize.values())) == 1
        fed = ", ".join(f"{m} {r}" for m, r in resize.items())
        return {"resize": resize, "image_sizes": {m: s for m, (s, _) in self.inputs.items()},
                "scoring_size": self.size, "scoring_target": self.target,
                "scoring_note": (f"every model sees {self.target} frames; all are scored on the "
                                 f"{self.target} future frame at {self.size} px") if same else
                (f"the models see differently prepared frames ({fed}); all are scored on the "
                 f"centre square of the future frame at {self.size} px, each stretch model's "
                 f"output mapped back onto it (its band showing the centre square, resampled "
                 f"to a square)")}

    def load(self, pair):
        """({(size, resize): uint8 (2, 3, S, S)}, (h, w) of the target frame), or None."""
        try:
            frames = [decode_rgb(data) for data in pair.read()]
        except (*DECODE_ERRORS, OSError) as e:
            print(f"warning: skipping pair {pair.current}, {pair.target}: {type(e).__name__}: "
                  f"{e}", file=sys.stderr)
            return None
        return ({(s, r): torch.stack([resize_frame(f, s, r) for f in frames])
                 for s, r in self.views()}, tuple(frames[1].shape[-2:]))

    def to_target(self, recon01, model, frame_sizes):
        """A model's reconstructions in [0, 1] -> the scoring target's geometry and size."""
        if self.inputs[model][1] != self.target:                # stretch model, crop target
            recon01 = stretch_to_crop(recon01, frame_sizes)
        return at_size(recon01.float(), self.size).clamp(0, 1)


# --- the comparison -------------------------------------------------------------------------

@torch.no_grad()
def compare(vae, runner, extras, pairs, metrics, fid, geometry, batch_size, device, picks=(),
            controllability=True):
    """Score every model and the two baselines on every readable pair; returns rows, per-model
    latents ({model: [batch dicts]}: the VAE's and each extra model's) and LAQ codes, and the
    picked pairs' pictures. `extras`: {name: latent action model trained here}, fed the pair as
    it was trained.

    Baselines: `copy_current` predicts the target as the current frame (a model that does not
    beat it carries no action); `mean_colour` predicts each target's mean colour.
    Controllability (Genie's delta PSNR): each model with an action latent (LAQ and `extras`)
    also decodes every current frame with the action inferred for the next pair of the batch
    (`{m}_psnr_other_action`); the latent action models also with a draw from their prior
    (`{m}_psnr_prior_action`)."""
    rows, examples, codes = [], [], []
    latents = {m: [] for m in ["vae", *extras]}
    generator = torch.Generator(device=device).manual_seed(0)
    vae_view, laq_view = geometry.inputs["vae"], geometry.inputs["laq"]
    for start in range(0, len(pairs), batch_size):
        loaded = [(k, pairs[k], geometry.load(pairs[k]))
                  for k in range(start, min(start + batch_size, len(pairs)))]
        loaded = [(k, p, views) for k, p, views in loaded if views is not None]
        if not loaded:
            continue
        stack = {view: torch.stack([views[0][view] for _, _, views in loaded]).to(device).float()
                 / 255 for view in geometry.views()}                        # (B, 2, 3, S, S)
        sizes = [views[1] for _, _, views in loaded]
        target = stack[(geometry.size, geometry.target)][:, 1]
        current = stack[(geometry.size, geometry.target)][:, 0]
        recon, per_pair, other = {}, {}, {}
        baselines = {"copy_current": current,
                     "mean_colour": target.mean((2, 3), keepdim=True).expand_as(target)}
        shifted = torch.roll(torch.arange(len(loaded)), 1)        # the next pair's action
        vae_recon, vae_metrics, batch_latents = vae.evaluate_batch(stack[vae_view][:, 1] * 2 - 1,
                                                                   generator)
        recon["vae"] = geometry.to_target((vae_recon.float() + 1) / 2, "vae", sizes)
        latents["vae"].append({k: v.cpu() for k, v in batch_latents.items()})
        if "kl" in vae_metrics:
            per_pair["vae_kl_bits"] = vae_metrics["kl"].double().cpu() / math.log(2)
        clip = stack[laq_view].permute(0, 2, 1, 3, 4)                         # (B, 3, 2, S, S)
        laq_recon, laq_codes, _, _ = runner(clip)
        recon["laq"] = geometry.to_target(laq_recon, "laq", sizes)
        codes.append(laq_codes.cpu())
        if controllability and len(loaded) > 1:
            other["laq_psnr_other_action"] = geometry.to_target(
                runner(clip, actions_from=shifted)[0], "laq", sizes)
        for name, model in extras.items():
            x = stack[geometry.inputs[name]] * 2 - 1
            out, model_metrics, batch_latents = model.evaluate_batch(x, generator)
            recon[name] = geometry.to_target((out.float() + 1) / 2, name, sizes)
            if controllability and len(loaded) > 1:
                for key, action_recon in (
                        ("other_action", model.reconstruct(x, action_from=x[shifted])),
                        ("prior_action", model.decode_latent(
                            x, model.sample(len(x), device, generator)))):
                    other[f"{name}_psnr_{key}"] = geometry.to_target(
                        (action_recon.float() + 1) / 2, name, sizes)
            latents[name].append({k: v.cpu() for k, v in batch_latents.items()})
            if "kl" in model_metrics:
                per_pair[f"{name}_kl_bits"] = model_metrics["kl"].double().cpu() / math.log(2)
        scores = {m: metrics(target, images) for m, images in {**recon, **baselines}.items()}
        other_psnr = {key: metrics(target, images, ["psnr"])["psnr"]
                      for key, images in other.items()}
        if fid:
            fid.add("target", target)
            for m, images in recon.items():
                fid.add(m, images)
        for b, (k, pair, _) in enumerate(loaded):
            row = {"current": pair.current, "target": pair.target, "video": pair.video,
                   "current_frame": pair.current_frame, "target_frame": pair.target_frame,
                   "laq_codes": " ".join(str(int(c)) for c in laq_codes[b])}
            for name in extras:
                if "codes" in latents[name][-1]:
                    row[f"{name}_codes"] = " ".join(str(int(c))
                                                    for c in latents[name][-1]["codes"][b])
            row.update({f"{m}_{metric}": float(v[b]) for m, s in scores.items()
                        for metric, v in s.items()})
            row.update({key: float(v[b]) for key, v in per_pair.items()})
            row.update({key: float(v[b]) for key, v in other_psnr.items()})
            rows.append(row)
            if k in picks:
                examples.append({"current": stack[(geometry.size, geometry.target)][b, 0].cpu(),
                                 "target": target[b].cpu(), "row": row,
                                 "models": {m: images[b].cpu() for m, images in recon.items()}})
    return rows, latents, codes, examples


def code_rate(codes, codebook_size):
    """Bits per pair of a code sequence. The rate: the entropy of whole code sequences
    (`code_entropy_joint_bits`, plug-in, and `code_entropy_joint_mm_bits` with the Miller-Madow
    correction for its small-sample bias). Bounds: the sum of each position's entropy
    (`code_entropy_bits`, at least the joint one) and code_seq_len x log2(codebook_size)."""
    per_position = [codebook_diagnostics(codes[:, j], codebook_size) for j in range(codes.shape[1])]
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    joint, joint_mm = entropy_bits(counts.numpy())
    return {"bound_bits": codes.shape[1] * math.log2(codebook_size),
            "code_entropy_bits": sum(math.log2(q["perplexity"]) for q in per_position),
            "code_entropy_joint_bits": joint, "code_entropy_joint_mm_bits": joint_mm,
            "code_seq_len": int(codes.shape[1]), "distinct_code_sequences": len(counts),
            "note": "rate: joint code entropy; code_entropy_bits (sum over positions) and "
                    "bound_bits are upper bounds"}


def model_rate_latent(model, batches):
    """(rate, latent diagnostics) of a latent action model trained here from its latents."""
    if model.bottleneck == "nsvq":
        codes = torch.cat([b["codes"] for b in batches])
        return ({**code_rate(codes, model.codebook_size),
                 "note": "discrete: code entropy; bound code_seq_len x log2(codebook_size)"},
                codebook_diagnostics(codes, model.codebook_size))
    latent = latent_summary(batches)
    return ({"kl_bits_mean": latent["kl_total"] / math.log(2),
             "target_rate_bits": model.target_rate_bits,
             "note": "continuous: KL(q(z|pair) || N(0, I)) in bits"}, latent)


def rate_report(vae_latent, codes, laq_config, num_pairs):
    """Bits per pair each model spends on the target frame (LAQ also gets the current frame
    uncompressed). VAE: KL(q(z|x) || p(z)) / ln 2 (the bits-back rate); a VQ-VAE: its code grid.
    LAQ: the bound code_seq_len x log2(codebook_size) and the entropies of its codes
    (code_rate)."""
    laq = code_rate(torch.cat(codes), laq_config["codebook_size"])
    if vae_latent and "kl_total" in vae_latent:
        out = {"kl_bits_mean": vae_latent["kl_total"] / math.log(2),
               "active_units": vae_latent["active_units"], "latent_dim": vae_latent["latent_dim"]}
    elif vae_latent and "codebook_size" in vae_latent:
        grid = vae_latent["num_codes"] / num_pairs                    # codes per image
        out = {"kl_bits_mean": math.log2(vae_latent["perplexity"]) * grid,
               "bound_bits": grid * math.log2(vae_latent["codebook_size"]),
               "note": "VQ-VAE: code grid entropy, not a KL"}
    else:
        out = {"kl_bits_mean": None}
    return {"vae": out, "laq": laq}


# --- the action probe -----------------------------------------------------------------------

@torch.no_grad()
def probe_features(vae, runner, num_codes, extras, pairs, geometry, batch_size, device, cache,
                   split):
    """Frozen features of each pair: the VAE's posterior means of the current and future
    frame (both, and their difference), LAQ's action codes (one-hot) and continuous
    pre-quantisation action vectors, and for each latent action model trained here its action
    latent (Gaussian: the mean; NSVQ: codes one-hot and pre-quantisation vectors). Two
    appearance-only sets show what the current frame alone gives away (SthV2's templates name
    objects): the VAE's mean of the current frame and LAQ's encoded tokens of it. Computed in
    chunks of batch_size pairs, cached."""
    chunks, labels_kept = [], []
    starts = range(0, len(pairs), batch_size)
    for k, start in enumerate(progress(starts, desc=f"probe features ({split})")):
        chunk = cache.get(split, k)
        if chunk is None:
            batch = [(i, geometry.load(pairs[i])) for i in range(start, min(start + batch_size,
                                                                            len(pairs)))]
            batch = [(i, views) for i, views in batch if views is not None]
            if not batch:
                continue
            vae_in = torch.stack([v[0][geometry.inputs["vae"]] for _, v in batch]).to(device)
            laq_in = torch.stack([v[0][geometry.inputs["laq"]] for _, v in batch]).to(device)
            _, _, latents = vae.evaluate_batch(vae_in.flatten(0, 1).float() / 127.5 - 1)
            mu = latents["mu"].reshape(len(batch), 2, -1).cpu()
            clip = laq_in.float().div(255).permute(0, 2, 1, 3, 4)             # (B, 3, 2, S, S)
            _, codes, action, _ = runner(clip)
            # LAQ's temporal attention sees both frames: its current-frame tokens are taken
            # from the identity clip (current, current), which holds no motion
            current = runner(clip[:, :, :1].expand_as(clip))[3]
            onehot = F.one_hot(codes.cpu(), num_codes).flatten(1)
            chunk = {"kept": np.array([i for i, _ in batch]),
                     "vae_mu_current_future": mu.flatten(1).numpy(),
                     "vae_mu_difference": (mu[:, 1] - mu[:, 0]).numpy(),
                     "vae_mu_current": mu[:, 0].numpy(),
                     "laq_codes_onehot": onehot.float().numpy()}
            if action is not None:
                chunk["laq_action_continuous"] = action.cpu().numpy()
                chunk["laq_current_tokens"] = current.cpu().numpy()
            for name, model in extras.items():
                pair_in = torch.stack([v[0][geometry.inputs[name]] for _, v in batch]).to(device)
                _, _, latents = model.evaluate_batch(pair_in.float() / 127.5 - 1)
                if "mu" in latents:
                    chunk[f"{name}_action_mu"] = latents["mu"].cpu().numpy()
                else:
                    chunk[f"{name}_codes_onehot"] = F.one_hot(
                        latents["codes"].cpu(), model.codebook_size).flatten(1).float().numpy()
                    chunk[f"{name}_action_continuous"] = latents["action"].cpu().numpy()
            cache.put(split, k, chunk)
        chunks.append(chunk)
        labels_kept += chunk["kept"].tolist()
    names = [n for n in chunks[0] if n != "kept"]
    return {n: np.concatenate([c[n] for c in chunks]) for n in names}, labels_kept


def probe(args, vae, runner, num_codes, extras, vae_config, geometry, device, templates):
    """Train-split pairs -> val-split pairs linear probe of the action template (probe.py);
    `templates`: {video id: template} as labels_of read them ({} when the files are missing)."""
    from labels import read_templates
    from probe import FeatureCache, run_probe
    if not isinstance(vae, VanillaVAE):           # VanillaVAE, BetaVAE, VAE-GAN
        raise DataError("--probe needs a VAE with a Gaussian posterior (its mean is the feature)")
    d = data_params_of(vae_config, data_path=args.data_path)
    templates = templates or read_templates(d.labels_path or d.data_path)   # names what is missing
    classes = {t: c for c, t in enumerate(sorted(set(templates.values())))}
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    sets = {}
    for split, seed, skip in (("train", args.seed + 1, set()), ("val", args.seed + 2, exclude)):
        pairs_ds, positions, _, _ = split_pairs(args, vae_config, split, skip)
        pairs = choose(pairs_ds, positions, args.probe_pairs, seed, args.pairs)
        cache = FeatureCache(os.path.join(args.output, "probe_cache"), {
            "vae": os.path.abspath(args.vae), "laq": os.path.abspath(args.laq),
            "vae_mtime": os.path.getmtime(args.vae), "laq_mtime": os.path.getmtime(args.laq),
            "pairs": [(p.current, p.target) for p in pairs], "geometry": geometry.describe(),
            "laq_weights": args.laq_weights, "features": 2, "batch_size": args.batch_size,
            "models": [(os.path.abspath(p), os.path.getmtime(p)) for p in args.model]})
        features, kept = probe_features(vae, runner, num_codes, extras, pairs, geometry,
                                        args.batch_size, device, cache, split)
        labels = np.array([classes.get(templates.get(pairs[i].video), -1) for i in kept])
        known = labels >= 0
        sets[split] = ({n: x[known] for n, x in features.items()}, labels[known])
    report = run_probe(sets["train"], sets["val"], len(classes), seed=args.seed)
    report["offset"], report["labels"] = args.offset, d.labels_path or d.data_path
    return report


# --- outputs --------------------------------------------------------------------------------

def print_table(report, names):
    inputs, models = report["inputs"], report["models"]
    print(f"\n{report['pairs']} frame pairs ({inputs['source']}"
          + (f", {inputs['split']} split, offset {inputs['offset']}" if "split" in inputs else "")
          + ")" + ("  [identity clip]" if inputs["identity_clip"] else ""))
    print("inputs: " + ", ".join(f"{models[m]} {report['resize'][m]} {report['image_sizes'][m]} px"
                                 for m in models)
          + f"; scored on the {report['scoring_target']} target at {report['scoring_size']} px")
    if len(set(report["resize"].values())) > 1:
        print(f"note: {report['scoring_note']}")
    overlap = inputs.get("laq_training_overlap")
    if overlap:
        print(f"note: {overlap['note']}")
    width = max(24, *(len(label) for label in models.values()))
    print(f"{'metric':<7} " + " ".join(f"{label:>{width}}" for label in models.values()))
    cell = lambda s: f"{s['mean']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"  # noqa: E731
    for name in names:
        print(f"{name:<7} " + " ".join(f"{cell(report[m][name]):>{width}}" for m in models))
    rfid = report["rfid"]
    if rfid.get("vae") is not None:
        print(f"{'rFID':<7} " + " ".join(f"{rfid[m]:>{width}.4g}" for m in models)
              + f"   ({rfid['images']} images"
              + f"{', random backbone' if 'random' in rfid['backbone'] else ''})")
        if rfid.get("warning"):
            print(f"warning: {rfid['warning']}")
    beats = report["beats_copy_current"]
    print(f"{'>copy':<7} " + " ".join(
        f"{beats[m]['share']:.3f} [{beats[m]['ci95'][0]:.3f}, {beats[m]['ci95'][1]:.3f}]"
        .rjust(width) for m in models) + "   (share of pairs with a higher PSNR than copying "
                                         "the current frame)")
    bits = []
    for m in models:
        rate = report["rate"][m]
        if rate.get("kl_bits_mean") is not None:
            bits.append(f"{rate['kl_bits_mean']:.2f} (KL)")
        elif "code_entropy_joint_bits" in rate:
            bits.append(f"{rate['code_entropy_joint_bits']:.2f} (joint codes; bound "
                        f"{rate['bound_bits']:g})")
        else:
            bits.append("n/a")
    print(f"{'bits':<7} " + " ".join(f"{b:>{width}}" for b in bits))
    base = report["baselines"]
    print("baselines: " + ", ".join(f"{b} PSNR {cell(base[b]['psnr'])}" for b in base))
    for m, c in report["controllability"].items():
        if m == "method":
            continue
        print(f"{models[m]} controllability: " + "; ".join(
            f"{kind.replace('_', ' ')} delta PSNR {c['delta_psnr_' + kind]['mean_difference']:.3f} "
            f"[{c['delta_psnr_' + kind]['ci95'][0]:.3f}, {c['delta_psnr_' + kind]['ci95'][1]:.3f}]"
            f" p={c['delta_psnr_' + kind]['p_value']:.3g}"
            for kind in ("other_action", "prior_action") if "delta_psnr_" + kind in c))
    for couple, diffs in report["paired"].items():
        if isinstance(diffs, dict) and diffs.get("psnr", {}).get("mean_difference") is not None:
            a, b = couple.split("_vs_")
            d = diffs["psnr"]
            print(f"paired PSNR {models[a]} - {models[b]}: {d['mean_difference']:+.3f} dB "
                  f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p={d['p_value']:.3g} "
                  f"({d['videos']} videos)")
    for m, label in models.items():
        latent = report["latent"][m]
        if latent and "unique_codes" in latent:
            print(f"{label} codes: {latent['unique_codes']}/{latent['codebook_size']} used, "
                  f"perplexity {latent['perplexity']:.2f}")
        elif latent and latent.get("active_units") is not None:
            print(f"{label} latent: {latent['active_units']}/{latent['latent_dim']} active units, "
                  f"KL {latent['kl_total']:.2f} nats")
        elif latent and "kl_total" in latent:
            print(f"{label} latent: KL {latent['kl_total']:.2f} nats ({latent['note']})")
    print(f"{report['pairs_per_sec']:.2f} pairs/s on {report['device']} "
          f"(LAQ: {report['laq_passes']} pass{'es' if report['laq_passes'] > 1 else ''} per batch)")


def summary_lines(report):
    """The comparison's settings in a few lines, for the pictures."""
    inputs, ck = report["inputs"], report["checkpoints"]
    lines = [f"VAE {os.path.basename(ck['vae'])}  |  LAQ {os.path.basename(ck['laq'])} "
             f"({ck['laq_keys']['layout']})"
             + "".join(f"  |  {name} {os.path.basename(path)}"
                       for name, path in ck.get("models", {}).items()),
             f"{report['pairs']} pairs from {inputs['source']}"
             + (f", {inputs['split']} split ({inputs['split_source']}), offset {inputs['offset']}"
                if "split" in inputs else "")
             + ("  [IDENTITY CLIP: current = target]" if inputs["identity_clip"] else ""),
             "fed: " + ", ".join(f"{label} {report['resize'][m]} {report['image_sizes'][m]} px"
                                 for m, label in report["models"].items())
             + f"; scored on the {report['scoring_target']} target at {report['scoring_size']} px"]
    overlap = inputs.get("laq_training_overlap")
    if overlap:
        lines.append(("LAQ's training videos excluded" if overlap["excluded"] else
                      "LAQ may have trained on these videos (no --laq-train-videos)"))
    return lines


def write_outputs(args, report, rows, examples, kl_per_dim):
    write_report(args.output, report, rows, "per_pair.csv")        # the numbers first
    from plots import comparison_figure, summary_figure
    shown = ("psnr", "ssim", "lpips")
    for e in examples:
        row = e["row"]
        e["title"] = (f"video {row['video']}\nframes {row['current_frame']} -> "
                      f"{row['target_frame']}" if row["video"] else os.path.basename(row["target"]))
        e["scores"] = {m: "  ".join(f"{n.upper()} {row[f'{m}_{n}']:.3f}" for n in shown
                                    if f"{m}_{n}" in row) for m in report["models"]}
    figures = {"comparison": comparison_figure(examples, report["models"],
                                               report["summary_lines"],
                                               os.path.join(args.output, "comparison.png")),
        "summary": summary_figure(report, rows, kl_per_dim, os.path.join(args.output,
                                                                          "plots.png"))}
    if report.get("probe"):
        with atomic_write(os.path.join(args.output, "probe.json"), "w") as f:
            json.dump(report["probe"], f, indent=1)
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(args.tensorboard) as tb:
            for name, fig in figures.items():
                tb.add_figure(f"compare/{name}", fig, close=False)
            for m in report["models"]:
                for name, s in report[m].items():
                    if isinstance(s, dict) and s.get("mean") is not None:
                        tb.add_scalar(f"compare/{m}_{name}", s["mean"])


RESERVED_NAMES = {"vae", "laq", "pairs", "inputs", "rate", "latent", "rfid", "models", "probe",
                  "checkpoints", "laq_config", "device", "resize", "image_sizes", "baselines",
                  "paired", "controllability", "beats_copy_current", "manifest", "settings",
                  *BASELINES}


def load_extra_models(paths, device):
    """{name: model} for --model checkpoints, each a latent action model trained here, named by
    its run (logging_params.name), made unique; {name: path}; {name: (image size, resize)} as
    each was trained; {name: settings (run_settings)}."""
    extras, files, views, settings = {}, {}, {}, {}
    for path in paths:
        model, ckpt = load_model(path, device)
        if not model.takes_pairs:
            raise CheckpointError(f"--model {path}: a {ckpt['config']['model_params']['name']} "
                                  f"checkpoint; --model takes latent action models trained here "
                                  f"(LatentActionModel); a VAE goes to --vae")
        base = str(ckpt["config"].get("logging_params", {}).get("name") or "model")
        name, k = base, 2
        while name in extras or name in RESERVED_NAMES:
            name, k = f"{base}_{k}", k + 1
        extras[name], files[name] = model, os.path.abspath(path)
        views[name] = (model.image_size, data_params_of(ckpt["config"]).resize)
        settings[name] = run_settings(ckpt["config"])
    return extras, files, views, settings


def run_settings(config):
    """What report.py groups runs by: the model family and every training setting that
    changes the result, with the seed apart (runs that differ only in it are one point)."""
    m, e = config["model_params"], config.get("exp_params", {})
    family = m["name"] + (f" ({m['bottleneck']})" if "bottleneck" in m else "")
    return {"family": family, "seed": e.get("seed"),
            "settings": {**{k: v for k, v in m.items() if k != "name"},
                         **{k: e[k] for k in ("kld_weight", "LR") if k in e}}}


def main(args):
    check_exist(args, "--vae", "--laq", "--laq-repo", "--laq-config", "--model", "--image",
                "--frames", "--data-path", "--laq-train-videos")   # inputs, then weight files
    require(MATPLOTLIB, *([SKLEARN] if args.probe else []))           # before the hour of work
    if (args.image or args.frames) and args.fid != "none":
        args.fid = "none"           # a Frechet distance needs many images, not one pair
        print("note: rFID is skipped for a single pair (--image / --frames)")
    device = pick_device(args.device, gpus=-1)
    metrics = ImageMetrics(device, args.lpips_net, args.lpips_random_backbone)  # fail fast
    fid = build_fid(args, device)
    vae, vae_ckpt = load_model(args.vae, device)
    extras, extra_files, extra_views, extra_settings = load_extra_models(args.model, device)
    laq, config, key_report = load_laq(args, device)
    pairs, inputs, index = frame_pairs(args, vae_ckpt["config"])
    vae_config = vae_ckpt["config"]
    geometry = Geometry({
        "vae": (vae_config["model_params"]["image_size"],
                args.vae_resize or data_params_of(vae_config).resize),
        "laq": (config["image_size"], args.laq_resize), **extra_views})
    runner = LaqRunner(laq)
    start_outputs(args.output, OUTPUTS)       # an interrupted run leaves no mix of two runs
    start = time.perf_counter()
    rows, latents, codes, examples = compare(vae, runner, extras, pairs, metrics, fid, geometry,
                                             args.batch_size, device, figure_picks(pairs),
                                             args.controllability != "none")
    seconds = time.perf_counter() - start
    if not rows:
        exit_bad_input("none of the frame pairs could be read")
    names = metrics.names
    skipped = {} if metrics.lpips else {"lpips": "skipped with --lpips-net none"}
    model_section = lambda m: section({n: [r[f"{m}_{n}"] for r in rows] for n in names},  # noqa: E731
                                      names, skipped)
    vae_latent = latent_summary(latents["vae"], vae.num_embeddings)
    if len(rows) < 2 and vae_latent and "active_units" in vae_latent:
        vae_latent["active_units"] = None         # a variance over one image says nothing
        vae_latent["note"] = "active units need more than one image"
    templates = labels_of(vae_config, args) if args.data_path else {}
    for row in rows:
        row["label"] = templates.get(row["video"], "")
    labels = {"vae": "VAE", "laq": "LAQ", **{name: name for name in extras}}
    report = {"pairs": len(rows), "inputs": inputs, "models": labels, **geometry.describe(),
              "ci_method": CI_METHOD, "lpips_net": lpips_label(args),
              **{m: model_section(m) for m in labels},
              "rfid": {**{m: fid.fid("target", m) for m in labels},
                       "images": len(rows), "backbone": fid_label(args)} if fid else
              {"backbone": fid_label(args)},
              "rate": rate_report(vae_latent, codes, config, len(rows)),
              "latent": {"vae": vae_latent,
                         "laq": codebook_diagnostics(torch.cat(codes), config["codebook_size"])},
              "checkpoints": {"vae": os.path.abspath(args.vae), "laq": os.path.abspath(args.laq),
                              "laq_keys": key_report, "laq_weights": args.laq_weights,
                              "models": extra_files},
              "laq_config": config, "device": str(device), "laq_passes": runner.passes,
              "settings": {"vae": run_settings(vae_config),
                           "laq": {"family": "LAQ", "seed": None, "settings": config},
                           **extra_settings},
              "pairs_per_sec": len(rows) / seconds}
    for name, model in extras.items():
        report["rate"][name], report["latent"][name] = model_rate_latent(model, latents[name])
    if fid and len(rows) < FID_MIN_IMAGES:
        report["rfid"]["warning"] = (f"{len(rows)} images cannot estimate the 2048-d feature "
                                     f"covariance rFID compares; use {FID_MIN_IMAGES} or more "
                                     f"(--num-pairs) before reading it")
    videos = [row["video"] for row in rows]
    report["baselines"] = {b: model_section(b) for b in BASELINES}
    report["beats_copy_current"] = {
        m: share([r[f"{m}_psnr"] > r["copy_current_psnr"] for r in rows], videos)
        for m in labels}
    report["controllability"] = controllability_report(rows, videos, labels)
    report["paired"] = {"method": PAIRED_METHOD, "difference": "first minus second",
                        **{f"{a}_vs_{b}": {n: paired_difference([r[f"{a}_{n}"] for r in rows],
                                                                [r[f"{b}_{n}"] for r in rows],
                                                                videos) for n in names}
                           for a, b in itertools.combinations(labels, 2)}}
    if args.probe:
        report["probe"] = probe(args, vae, runner, config["codebook_size"], extras, vae_config,
                                geometry, device, templates)
    d = data_params_of(vae_config, data_path=args.data_path)
    report["manifest"] = manifest(
        files={"vae": args.vae, "laq": args.laq, **extra_files}, index=index,
        labels_dir=(d.labels_path or d.data_path) if args.data_path else None,
        laq_repo=os.path.dirname(key_report["package"]))
    if report.get("probe"):
        report["probe"]["manifest"] = report["manifest"]
    report["summary_lines"] = summary_lines(report)
    write_outputs(args, report, rows, examples, (vae_latent or {}).get("kl_per_dim"))
    if inputs.get("note"):
        print(f"note: {inputs['note']}")
    print_table(report, names)
    if report.get("probe"):
        from probe import print_probe
        print_probe(report["probe"])
    print(f"\nwrote {args.output}/comparison.png, plots.png, metrics.json, per_pair.csv"
          + (", probe.json" if report.get("probe") else ""))


def controllability_report(rows, videos, labels):
    """Per model with an action latent: PSNR with its own action, with the next pair's action
    and (latent action models) with a prior draw, and the paired difference own - other."""
    out = {"method": "delta PSNR (Genie): the current frame decoded with its own inferred "
                     "action minus with the action inferred for another pair of the batch "
                     "(other_action) or drawn from the model's prior (prior_action); > 0 "
                     "means the action controls the prediction. " + PAIRED_METHOD}
    for m in labels:
        if f"{m}_psnr_other_action" not in rows[0]:
            continue
        own = [r[f"{m}_psnr"] for r in rows]
        out[m] = {"psnr": summarize(own)}
        for kind in ("other_action", "prior_action"):
            if f"{m}_psnr_{kind}" in rows[0]:
                other = [r[f"{m}_psnr_{kind}"] for r in rows]
                out[m][f"psnr_{kind}"] = summarize(other)
                out[m][f"delta_psnr_{kind}"] = paired_difference(own, other, videos)
    return out


def labels_of(vae_config, args):
    """{video id: action template} when the run's label files are there, else {}."""
    d = data_params_of(vae_config, data_path=args.data_path)
    folder = d.labels_path or d.data_path
    if not all(os.path.isfile(os.path.join(folder, n)) for n in LABEL_FILES.values()):
        return {}
    from labels import read_templates
    return read_templates(folder)


if __name__ == "__main__":
    run_main(lambda: main(ARGS))
