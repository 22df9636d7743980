"""Compare a trained VAE with a trained LAQ (LAPA's latent action model) on the same frames.

    python compare_with_laq.py --vae CKPT --laq CKPT [--laq-repo DIR] [--laq-config YAML]
        (--image IMG | --frames FIRST SECOND | --data-path DIR [--num-pairs N] [--offset K])
        --output DIR [--split val|train] [--device cpu|cuda] [--lpips-net alex|vgg|none]
        [--fid inception|none] [--probe [--probe-pairs N]] [--tensorboard DIR]

LAQ predicts the future frame from the current frame plus a few discrete action codes; the
VAE reconstructs that future frame from its own latent. The comparison is fair by
construction: the pairs come from the split the VAE's own run defined (its label files and
val_fraction; dataset_sthv2.build_split), each model is fed frames prepared the way it was
trained (the VAE checkpoint's data_params.resize; LAQ: stretch, as LAPA trains it), and both
are scored on one target (when the two preparations differ: the centre square of the future
frame, with the stretch model's output mapped back onto it). Beside distortion it reports
rate (bits per pair), rFID, and with --probe how well each model's latent predicts the action.
README.md ("Comparing with LAQ") says how to read every output.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, atomic_write
from config import ConfigError, data_params_of
from dataset_sthv2 import (DECODE_ERRORS, LABEL_FILES, DataError, build_split, decode_rgb,
                           read_file, resize_frame)
from evaluate import load_model, section, write_report
from laq_loader import LaqError, LaqRunner, load_laq
from metrics import (CI_METHOD, ImageMetrics, WeightsMissing, add_fid_arguments,
                     add_lpips_arguments, build_fid, codebook_diagnostics, fid_label,
                     latent_summary, lpips_label)
from runtime import exit_bad_input, pick_device, progress

FIGURE_ROWS = 8
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
    """Every (t, t + offset) pair of the split of the VAE run's own data settings, less the
    videos in `exclude`; returns (dataset, kept pair positions, dropped pairs, dropped videos)."""
    d = data_params_of(vae_config, data_path=args.data_path,
                       index_cache_dir=args.index_cache_dir or None)
    if d.dataset != "sthv2":
        raise DataError(f"the VAE was trained on {d.dataset}; frame pairs need SthV2 videos")
    pairs = build_split(d, split, image_size=None, pair_offset=args.offset)
    excluded = np.array([vid in exclude for vid in pairs.index.videos] + [False], dtype=bool)
    keep = ~excluded[pairs.video]                   # per pair, from one flag per video
    dropped_videos = len(np.unique(pairs.video[~keep]))
    if not keep.any():
        raise DataError(f"no {split} video in {d.data_path} has more than {args.offset} frames"
                        + (" that LAQ did not train on" if len(pairs) else ""))
    return pairs, np.flatnonzero(keep), int((~keep).sum()), dropped_videos


def choose(pairs, positions, n, seed):
    """n pair records drawn without replacement from `positions` of a pairs dataset."""
    index, offset = pairs.index, pairs.offset
    picked = np.random.default_rng(seed).choice(positions, size=min(n, len(positions)),
                                                replace=False)
    out = []
    for i in sorted(int(i) for i in picked):
        v, t = int(pairs.video[i]), int(pairs.pos[i])
        number = lambda pos: int(index.numbers[index.offsets[v] + pos])  # noqa: E731
        out.append(Pair(index.frame_path(v, t), index.frame_path(v, t + offset), index.videos[v],
                        number(t), number(t + offset),
                        lambda v=v, t=t: [index.read_bytes(v, t), index.read_bytes(v, t + offset)]))
    return out


def frame_pairs(args, vae_config):
    """(pairs, inputs): what is compared and a description of where it came from."""
    if args.image:
        return [Pair(args.image, args.image, "", -1, -1, lambda: [read_file(args.image)] * 2)], {
            "source": "image", "identity_clip": True,
            "note": "--image: the image is both the current and the target frame (identity "
                    "clip), so LAQ's action codes carry no motion"}
    if args.frames:
        first, second = args.frames
        return [Pair(first, second, "", -1, -1, lambda: [read_file(first), read_file(second)])], {
            "source": "frames", "identity_clip": False}
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    pairs, positions, dropped, dropped_videos = split_pairs(args, vae_config, args.split, exclude)
    chosen = choose(pairs, positions, args.num_pairs, args.seed)
    overlap = ({"excluded": True, "file": os.path.abspath(args.laq_train_videos),
                "dropped_pairs": dropped, "dropped_videos": dropped_videos,
                "note": f"left out {dropped} pairs from {dropped_videos} videos that LAQ "
                        f"trained on (--laq-train-videos)"} if args.laq_train_videos else
               {"excluded": False, "note": OVERLAP_NOTE.format(split=args.split)})
    return chosen, {"source": "data_path", "identity_clip": False, "data_path": args.data_path,
                    "split": args.split, "split_source": pairs.source, "offset": args.offset,
                    "seed": args.seed, "available_pairs": len(positions),
                    "laq_training_overlap": overlap,
                    "videos": sorted({p.video for p in chosen}, key=str)}


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
    """Sizes and resize modes: the VAE's and LAQ's inputs (as each was trained, unless
    overridden) and the scoring target (the smaller size; the shared mode, or the centre square
    when the modes differ)."""

    def __init__(self, vae_size, vae_resize, laq_size, laq_resize):
        self.inputs = {"vae": (vae_size, vae_resize), "laq": (laq_size, laq_resize)}
        self.size = min(vae_size, laq_size)
        self.target = vae_resize if vae_resize == laq_resize else "crop"

    def views(self):
        return set(self.inputs.values()) | {(self.size, self.target)}

    def describe(self):
        (vs, vr), (ls, lr) = self.inputs["vae"], self.inputs["laq"]
        same = vr == lr
        return {"resize": {"vae": vr, "laq": lr}, "image_sizes": {"vae": vs, "laq": ls},
                "scoring_size": self.size, "scoring_target": self.target,
                "scoring_note": (f"both models see {vr} frames; both are scored on the {vr} "
                                 f"future frame at {self.size} px") if same else
                (f"the models see differently prepared frames (VAE {vr}, LAQ {lr}); both are "
                 f"scored on the centre square of the future frame at {self.size} px, the "
                 f"stretch model's output mapped back onto it (its band showing the centre "
                 f"square, resampled to a square)")}

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
def compare(vae, runner, pairs, metrics, fid, geometry, batch_size, device, picks=()):
    """Score both models on every readable pair; returns rows, VAE latents, LAQ codes, and
    the picked pairs' pictures."""
    rows, vae_latents, codes, examples = [], [], [], []
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
        vae_recon, vae_metrics, latents = vae.evaluate_batch(stack[vae_view][:, 1] * 2 - 1,
                                                             generator)
        vae_recon = geometry.to_target((vae_recon.float() + 1) / 2, "vae", sizes)
        laq_recon, laq_codes, _ = runner(stack[laq_view].permute(0, 2, 1, 3, 4))  # (B,3,2,S,S)
        laq_recon = geometry.to_target(laq_recon, "laq", sizes)
        scores = {"vae": metrics(target, vae_recon), "laq": metrics(target, laq_recon)}
        if fid:
            for name, images in (("target", target), ("vae", vae_recon), ("laq", laq_recon)):
                fid.add(name, images)
        kl_bits = (vae_metrics["kl"].double().cpu() / math.log(2) if "kl" in vae_metrics
                   else None)
        for b, (k, pair, _) in enumerate(loaded):
            rows.append({"current": pair.current, "target": pair.target, "video": pair.video,
                         "current_frame": pair.current_frame, "target_frame": pair.target_frame,
                         "laq_codes": " ".join(str(int(c)) for c in laq_codes[b]),
                         **{f"{m}_{name}": float(v[b]) for m, s in scores.items()
                            for name, v in s.items()},
                         **({"vae_kl_bits": float(kl_bits[b])} if kl_bits is not None else {})})
            if k in picks:
                examples.append({"current": stack[(geometry.size, geometry.target)][b, 0].cpu(),
                                 "target": target[b].cpu(), "vae": vae_recon[b].cpu(),
                                 "laq": laq_recon[b].cpu(), "row": rows[-1]})
        vae_latents.append({k: v.cpu() for k, v in latents.items()})
        codes.append(laq_codes.cpu())
    return rows, vae_latents, codes, examples


def rate_report(vae_latent, codes, laq_config, num_pairs):
    """Bits per pair each model spends on the target frame (LAQ also gets the current frame
    uncompressed). VAE: KL(q(z|x) || p(z)) / ln 2 (the bits-back rate); a VQ-VAE: its code grid.
    LAQ: the bound code_seq_len x log2(codebook_size), and the empirical entropy of its codes
    (the sum of each position's plug-in entropy: an upper bound on the joint entropy)."""
    codes = torch.cat(codes)
    per_position = [codebook_diagnostics(codes[:, j], laq_config["codebook_size"])
                    for j in range(codes.shape[1])]
    entropy = sum(math.log2(p["perplexity"]) for p in per_position)
    laq = {"bound_bits": codes.shape[1] * math.log2(laq_config["codebook_size"]),
           "code_entropy_bits": entropy, "code_seq_len": int(codes.shape[1]),
           "distinct_code_sequences": len({tuple(c) for c in codes.tolist()})}
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
def probe_features(vae, runner, num_codes, pairs, geometry, batch_size, device, cache, split):
    """Frozen features of each pair: the VAE's posterior means of the current and future
    frame (both, and their difference) and LAQ's action codes (one-hot) and continuous
    pre-quantisation action vectors. Computed in chunks of batch_size pairs, cached."""
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
            _, codes, action = runner(laq_in.float().div(255).permute(0, 2, 1, 3, 4))
            onehot = F.one_hot(codes.cpu(), num_codes).flatten(1)
            chunk = {"kept": np.array([i for i, _ in batch]),
                     "vae_mu_current_future": mu.flatten(1).numpy(),
                     "vae_mu_difference": (mu[:, 1] - mu[:, 0]).numpy(),
                     "laq_codes_onehot": onehot.float().numpy()}
            if action is not None:
                chunk["laq_action_continuous"] = action.cpu().numpy()
            cache.put(split, k, chunk)
        chunks.append(chunk)
        labels_kept += chunk["kept"].tolist()
    names = [n for n in chunks[0] if n != "kept"]
    return {n: np.concatenate([c[n] for c in chunks]) for n in names}, labels_kept


def probe(args, vae, runner, num_codes, vae_config, geometry, device, templates):
    """Train-split pairs -> val-split pairs linear probe of the action template (probe.py);
    `templates`: {video id: template} as labels_of read them ({} when the files are missing)."""
    from probe import FeatureCache, read_templates, run_probe
    if getattr(vae, "noise_dim", 0) == 0 or not hasattr(vae, "encode"):
        raise DataError("--probe needs a VAE with a Gaussian posterior (its mean is the feature)")
    d = data_params_of(vae_config, data_path=args.data_path)
    templates = templates or read_templates(d.labels_path or d.data_path)   # names what is missing
    classes = {t: c for c, t in enumerate(sorted(set(templates.values())))}
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    sets = {}
    for split, seed, skip in (("train", args.seed + 1, set()), ("val", args.seed + 2, exclude)):
        pairs_ds, positions, _, _ = split_pairs(args, vae_config, split, skip)
        pairs = choose(pairs_ds, positions, args.probe_pairs, seed)
        cache = FeatureCache(os.path.join(args.output, "probe_cache"), {
            "vae": os.path.abspath(args.vae), "laq": os.path.abspath(args.laq),
            "vae_mtime": os.path.getmtime(args.vae), "laq_mtime": os.path.getmtime(args.laq),
            "pairs": [(p.current, p.target) for p in pairs], "geometry": geometry.describe(),
            "laq_weights": args.laq_weights})
        features, kept = probe_features(vae, runner, num_codes, pairs, geometry,
                                        args.batch_size, device, cache, split)
        labels = np.array([classes.get(templates.get(pairs[i].video), -1) for i in kept])
        known = labels >= 0
        sets[split] = ({n: x[known] for n, x in features.items()}, labels[known])
    report = run_probe(sets["train"], sets["val"], len(classes), seed=args.seed)
    report["offset"], report["labels"] = args.offset, d.labels_path or d.data_path
    return report


# --- outputs --------------------------------------------------------------------------------

def print_table(report, names):
    inputs = report["inputs"]
    print(f"\n{report['pairs']} frame pairs ({inputs['source']}"
          + (f", {inputs['split']} split, offset {inputs['offset']}" if "split" in inputs else "")
          + ")" + ("  [identity clip]" if inputs["identity_clip"] else ""))
    print(f"inputs: VAE {report['resize']['vae']} {report['image_sizes']['vae']} px, LAQ "
          f"{report['resize']['laq']} {report['image_sizes']['laq']} px; scored on the "
          f"{report['scoring_target']} target at {report['scoring_size']} px")
    if report["resize"]["vae"] != report["resize"]["laq"]:
        print(f"note: {report['scoring_note']}")
    overlap = inputs.get("laq_training_overlap")
    if overlap:
        print(f"note: {overlap['note']}")
    print(f"{'metric':<7} {'VAE mean':>10} {'95% CI':>22}   {'LAQ mean':>10} {'95% CI':>22}")
    ci = lambda s: f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"  # noqa: E731
    for name in names:
        v, q = report["vae"][name], report["laq"][name]
        print(f"{name:<7} {v['mean']:>10.4f} {ci(v):>22}   {q['mean']:>10.4f} {ci(q):>22}")
    rfid = report["rfid"]
    if rfid.get("vae") is not None:
        print(f"{'rFID':<7} {rfid['vae']:>10.4g} {'':>22}   {rfid['laq']:>10.4g}   "
              f"({rfid['images']} images{', random backbone' if 'random' in rfid['backbone'] else ''})")
    rate = report["rate"]
    vae_bits = rate["vae"]["kl_bits_mean"]
    print(f"{'bits':<7} {vae_bits if vae_bits is None else round(vae_bits, 2):>10} "
          f"{'(VAE KL)':>22}   {rate['laq']['code_entropy_bits']:>10.2f} "
          f"(code entropy; bound {rate['laq']['bound_bits']:g})")
    laq = report["latent"]["laq"]
    print(f"LAQ codes: {laq['unique_codes']}/{laq['codebook_size']} used, "
          f"perplexity {laq['perplexity']:.2f}")
    vae = report["latent"]["vae"]
    if vae and "active_units" in vae:
        print(f"VAE latent: {vae['active_units']}/{vae['latent_dim']} active units, "
              f"KL {vae['kl_total']:.2f} nats")
    print(f"{report['pairs_per_sec']:.2f} pairs/s on {report['device']} "
          f"(LAQ: {report['laq_passes']} pass{'es' if report['laq_passes'] > 1 else ''} per batch)")


def summary_lines(report):
    """The comparison's settings in a few lines, for the pictures."""
    inputs, ck = report["inputs"], report["checkpoints"]
    lines = [f"VAE {os.path.basename(ck['vae'])}  |  LAQ {os.path.basename(ck['laq'])} "
             f"({ck['laq_keys']['layout']})",
             f"{report['pairs']} pairs from {inputs['source']}"
             + (f", {inputs['split']} split ({inputs['split_source']}), offset {inputs['offset']}"
                if "split" in inputs else "")
             + ("  [IDENTITY CLIP: current = target]" if inputs["identity_clip"] else ""),
             f"VAE fed {report['resize']['vae']} {report['image_sizes']['vae']} px, LAQ fed "
             f"{report['resize']['laq']} {report['image_sizes']['laq']} px; scored on the "
             f"{report['scoring_target']} target at {report['scoring_size']} px"]
    overlap = inputs.get("laq_training_overlap")
    if overlap:
        lines.append(("LAQ's training videos excluded" if overlap["excluded"] else
                      "LAQ may have trained on these videos (no --laq-train-videos)"))
    return lines


def write_outputs(args, report, rows, examples, kl_per_dim):
    from plots import comparison_figure, summary_figure
    os.makedirs(args.output, exist_ok=True)
    write_report(args.output, report, rows, "per_pair.csv")
    shown = ("psnr", "ssim", "lpips")
    for e in examples:
        row = e["row"]
        e["title"] = (f"video {row['video']}\nframes {row['current_frame']} -> "
                      f"{row['target_frame']}" if row["video"] else os.path.basename(row["target"]))
        for m in ("vae", "laq"):
            e[f"{m}_scores"] = "  ".join(f"{n.upper()} {row[f'{m}_{n}']:.3f}" for n in shown
                                         if f"{m}_{n}" in row)
    figures = {"comparison": comparison_figure(examples, report["summary_lines"], os.path.join(
        args.output, "comparison.png")),
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
            for m in ("vae", "laq"):
                for name, s in report[m].items():
                    if isinstance(s, dict) and s.get("mean") is not None:
                        tb.add_scalar(f"compare/{m}_{name}", s["mean"])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="VAE checkpoint of this project")
    parser.add_argument("--laq", required=True, help="LAQ checkpoint (any layout LAPA writes)")
    parser.add_argument("--laq-repo", help="folder containing laq_model/ (LAPA's laq/)")
    parser.add_argument("--laq-config", help="YAML of LatentActionQuantization arguments")
    parser.add_argument("--laq-weights", choices=["ema", "online"], default="ema",
                        help="which weights of an ema-pytorch file (vae.{step}.ema.pt) to load")
    parser.add_argument("--laq-allow-unused-keys", action="store_true",
                        help="load a LAQ checkpoint that has keys the model does not use")
    parser.add_argument("--laq-train-videos", metavar="FILE",
                        help="video ids LAQ trained on (one per line, or a SthV2 label JSON): "
                             "their pairs are left out")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image, used as both frames (identity clip)")
    source.add_argument("--frames", nargs=2, metavar=("FIRST", "SECOND"))
    source.add_argument("--data-path", help="SthV2 frames folder; pairs from --split of the "
                                            "VAE run's own split (its label files, val_fraction)")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--offset", type=int, default=30, help="frames between the pair (LAPA: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the pairs")
    parser.add_argument("--vae-resize", choices=["crop", "stretch"],
                        help="how the VAE's frames are prepared (default: as it was trained, "
                             "the checkpoint's data_params.resize)")
    parser.add_argument("--laq-resize", choices=["crop", "stretch"], default="stretch",
                        help="how LAQ's frames are prepared (default: stretch, as LAPA trains)")
    parser.add_argument("--probe", action="store_true",
                        help="linear probe of the action template (DIR/probe.json)")
    parser.add_argument("--probe-pairs", type=int, default=500,
                        help="pairs per split for the probe (train split -> val split)")
    parser.add_argument("--tensorboard", metavar="DIR", help="also log the figures and means here")
    parser.add_argument("--index-cache-dir", default="")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    add_lpips_arguments(parser)
    add_fid_arguments(parser)
    args = parser.parse_args()
    if min(args.num_pairs, args.offset, args.batch_size, args.probe_pairs) < 1:
        parser.error("--num-pairs, --offset, --batch-size and --probe-pairs must be >= 1")
    if args.probe and not args.data_path:
        parser.error("--probe needs --data-path (pairs from the train and val splits)")
    return args


def main():
    args = parse_args()
    try:
        device = pick_device(args.device, gpus=-1)
        metrics = ImageMetrics(device, args.lpips_net, args.lpips_random_backbone)  # fail fast
        fid = build_fid(args, device)
        vae, vae_ckpt = load_model(args.vae, device)
        laq, config, key_report = load_laq(args, device)
        pairs, inputs = frame_pairs(args, vae_ckpt["config"])
    except (ConfigError, LaqError, WeightsMissing, CheckpointError, DataError) as e:
        exit_bad_input(e)
    vae_config = vae_ckpt["config"]
    geometry = Geometry(vae_config["model_params"]["image_size"],
                        args.vae_resize or data_params_of(vae_config).resize,
                        config["image_size"], args.laq_resize)
    runner = LaqRunner(laq)
    start = time.perf_counter()
    rows, vae_latents, codes, examples = compare(vae, runner, pairs, metrics, fid, geometry,
                                                 args.batch_size, device, figure_picks(pairs))
    seconds = time.perf_counter() - start
    if not rows:
        exit_bad_input("none of the frame pairs could be read")
    names = metrics.names
    skipped = {} if metrics.lpips else {"lpips": "skipped with --lpips-net none"}
    model_section = lambda m: section({n: [r[f"{m}_{n}"] for r in rows] for n in names},  # noqa: E731
                                      names, skipped)
    vae_latent = latent_summary(vae_latents, getattr(vae, "num_embeddings", None))
    templates = labels_of(vae_config, args) if args.data_path else {}
    for row in rows:
        row["label"] = templates.get(row["video"], "")
    report = {"pairs": len(rows), "inputs": inputs, **geometry.describe(),
              "ci_method": CI_METHOD, "lpips_net": lpips_label(args),
              "vae": model_section("vae"), "laq": model_section("laq"),
              "rfid": {"vae": fid.fid("target", "vae"), "laq": fid.fid("target", "laq"),
                       "images": len(rows), "backbone": fid_label(args)} if fid else
              {"backbone": fid_label(args)},
              "rate": rate_report(vae_latent, codes, config, len(rows)),
              "latent": {"vae": vae_latent,
                         "laq": codebook_diagnostics(torch.cat(codes), config["codebook_size"])},
              "checkpoints": {"vae": os.path.abspath(args.vae), "laq": os.path.abspath(args.laq),
                              "laq_keys": key_report, "laq_weights": args.laq_weights},
              "laq_config": config, "device": str(device), "laq_passes": runner.passes,
              "pairs_per_sec": len(rows) / seconds}
    if args.probe:
        try:
            report["probe"] = probe(args, vae, runner, config["codebook_size"], vae_config,
                                    geometry, device, templates)
        except DataError as e:
            exit_bad_input(e)
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


def labels_of(vae_config, args):
    """{video id: action template} when the run's label files are there, else {}."""
    d = data_params_of(vae_config, data_path=args.data_path)
    folder = d.labels_path or d.data_path
    if not all(os.path.isfile(os.path.join(folder, n)) for n in LABEL_FILES.values()):
        return {}
    from probe import read_templates
    return read_templates(folder)


if __name__ == "__main__":
    main()
