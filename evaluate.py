"""Evaluate a trained autoencoder checkpoint (or a pythae model folder) on a dataset split.

    python evaluate.py --checkpoint CKPT --output DIR [--data-path PATH] [--dataset sthv2|images|celeba]
                       [--split val] [--max-images N] [--batch-size B] [--lpips-net alex|vgg|none]
                       [--num-samples N] [--save-reconstructions] [--device cpu|cuda]

Writes DIR/metrics.json (mean, std and 95% CI of every metric over images; latent
diagnostics; generation self-consistency), DIR/per_image.csv, DIR/reconstructions.png,
DIR/samples.png and, with --save-reconstructions, DIR/reconstructions/{index:06d}_input.png
and _recon.png. Metric definitions: metrics.py.
"""
import argparse
import contextlib
import csv
import json
import os
import sys
import time

from options import (Formatter, add_fid_arguments, add_lpips_arguments, check_exist, fid_label,
                     lpips_label)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint of this project, a model folder saved by pythae, "
                             "or hf:OWNER/NAME[@REVISION] (a pythae model on the Hugging Face "
                             "Hub, from its local cache or downloaded)")
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument("--data-path", help="default: data_params.data_path of the checkpoint")
    parser.add_argument("--dataset", choices=["sthv2", "images", "celeba", "mnist", "dsprites"],
                        default="sthv2",
                        help="SthV2 frames, a folder of images (grey for a 1-channel model), "
                             "prepare_celeba.py arrays (3 or 1 channels), MNIST in "
                             "torchvision's folder layout, or dSprites' .npz")
    parser.add_argument("--split", choices=["val", "train"], default="val", help="which split")
    parser.add_argument("--max-images", type=int, default=0,
                        help="evenly spaced subset of the split (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes")
    add_lpips_arguments(parser)
    add_fid_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=64,
                        help="prior samples for generation self-consistency (0 = skip)")
    parser.add_argument("--save-reconstructions", action="store_true",
                        help="also write every input and reconstruction as PNG files")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a pythae folder's pickled encoder/decoder (trusted files only)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_images < 0 or args.num_samples < 0 or args.workers < 0:
        parser.error("--batch-size must be >= 1; --max-images, --num-samples, --workers >= 0")
    return args


if __name__ == "__main__":
    ARGS = parse_args()     # --help and usage errors answer before torch is imported

# The heavy imports, once the command line is known to be good.
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid, save_image

from checkpoint import load_checkpoint
from config import data_params_of, model_params_of
from dataset_sthv2 import build_split
from errors import CheckpointError, ConfigError, DataError, exit_bad_input, run_main
from files import atomic_write, remove_orphaned_temps
from image_datasets import DSpritesImages, ImageFiles, MNISTImages
from manifest import manifest
from metrics import SSIM_SETTINGS, ImageMetrics, build_fid, latent_summary
from models import build_model, image_channels
from parallel import progress
from pythae_adapter import is_pythae_source, load_pythae
from runtime import pick_device
from stats import CI_METHOD, summarize

GRID_IMAGES = 8


class Indexed(Dataset):
    """(position in the split, image or None, unreadable paths) for the chosen positions."""

    def __init__(self, dataset, positions):
        self.dataset, self.positions = dataset, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, k):
        image, bad = self.dataset[self.positions[k]]
        return self.positions[k], image, bad


def collate_readable(batch):
    """Keep readable images only: an unreadable one is reported, never scored as another."""
    kept = [(i, img) for i, img, _ in batch if img is not None]
    bad = [p for _, _, paths in batch for p in paths]
    if not kept:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 1, 1, dtype=torch.uint8), bad
    return torch.tensor([i for i, _ in kept]), torch.stack([img for _, img in kept]), bad


def load_model(path, device):
    """(model in eval mode on device, checkpoint dict) from a weights_only checkpoint whose
    config is checked as a run's is and whose weights must fit the model it describes."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} has no 'model'/'config': not a checkpoint of this project")
    config = ckpt["config"]
    try:
        params = model_params_of(config)
        kld_weight = (config.get("exp_params") or {}).get("kld_weight")
        if isinstance(kld_weight, bool) or not isinstance(kld_weight, (int, float)):
            raise ConfigError(f"exp_params.kld_weight: missing or not a number ({kld_weight!r})")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot use: "
                              f"{e}") from None
    model = build_model(params)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first
                      else type(e).__name__)
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the "
                              f"{params['name']} its config describes ({detail[:300]})") from None
    return model.to(device).eval(), ckpt


def build_eval_dataset(args, config, image_size, channels=3):
    """The images to score: a folder (--dataset images), MNIST or dSprites, or the split of the
    checkpoint's own data settings (its labels, val_fraction, frame_stride;
    dataset_sthv2.build_split). A data set whose images are not the model's shape is one
    line naming both."""
    if args.dataset in ("mnist", "dsprites"):
        if not args.data_path:
            raise DataError(f"--dataset {args.dataset} needs --data-path "
                            f"{'FOLDER' if args.dataset == 'mnist' else 'FILE.npz'}")
        dataset = MNISTImages(args.data_path, args.split) if args.dataset == "mnist" else \
            DSpritesImages(args.data_path)
        info = {"data_path": args.data_path, "split": dataset.split,
                "split_source": dataset.source}
    else:
        d = data_params_of(config, data_path=args.data_path, dataset=args.dataset)
        if args.dataset == "images":
            if not args.data_path:
                raise DataError("--dataset images needs --data-path FOLDER")
            return ImageFiles(args.data_path, image_size, d.resize, channels), {
                "data_path": args.data_path, "resize": d.resize}
        if not d.data_path:
            raise DataError("--data-path is needed: the checkpoint names no dataset")
        dataset = build_split(d, args.split, image_size, neighbour_tries=0, channels=channels)
        info = {"data_path": d.data_path, "split": args.split, "split_source": dataset.source}
        if d.dataset != "celeba":
            info.update(frame_stride=d.frame_stride, resize=d.resize)
    shape = getattr(dataset, "item_shape", (3, image_size, image_size))
    wanted = (channels, image_size, image_size)
    if tuple(shape) != wanted:
        raise DataError(f"the model takes {'x'.join(map(str, wanted))} images and "
                        f"{info['data_path']} holds {'x'.join(map(str, shape))}: evaluate it on "
                        f"data of its own shape")
    return dataset, info


ONE_CHANNEL = ("the grey images repeated to 3 channels for every image metric, rFID, the "
               "pictures and PNGs: MSE, BCE, PSNR, SSIM and GMSD equal their 1-channel values "
               "(GMSD's luminance of a grey RGB image is the grey image); LPIPS and rFID see "
               "grey RGB images, the usual convention for networks trained on colour")


def as_rgb(images):
    """1-channel images repeated to 3 channels (ONE_CHANNEL); others as they are."""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def to_uint8(x01):
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(tensor_uint8, path):
    Image.fromarray(tensor_uint8.permute(1, 2, 0).cpu().numpy()).save(path)


def start_outputs(folder, reports):
    """Make the output folder ready: the reports of an earlier run go first, so that a run
    interrupted part way never leaves them beside its own new files (they are written last),
    and temps of a killed run are removed."""
    os.makedirs(folder, exist_ok=True)
    remove_orphaned_temps(folder)
    for name in reports:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))


def write_report(folder, report, rows, csv_name):
    """folder/metrics.json and folder/csv_name (one row per scored item), each atomically."""
    with atomic_write(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    with atomic_write(os.path.join(folder, csv_name), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def section(per_image, names, not_applicable):
    out = {name: summarize(per_image[name]) for name in names}
    out.update({name: None for name in not_applicable})
    out["not_applicable"] = not_applicable
    return out


@torch.no_grad()
def evaluate(model, dataset, positions, metrics, args, device, fid=None):
    """Per-image metrics over `positions` of the dataset (and Inception features for rFID);
    returns (rows, latent diagnostics, [(input, reconstruction)] for the picture, unreadable
    files)."""
    loader = DataLoader(Indexed(dataset, positions), args.batch_size, num_workers=args.workers,
                        collate_fn=collate_readable)
    generator = torch.Generator(device=device).manual_seed(0)
    rows, latent_batches, unreadable, grid = [], [], [], []
    shown = {positions[int(k)] for k in np.linspace(0, len(positions) - 1, GRID_IMAGES)}
    recon_dir = os.path.join(args.output, "reconstructions")
    if args.save_reconstructions:
        os.makedirs(recon_dir, exist_ok=True)
    for index, images, bad in progress(loader, desc="reconstruction", unit="batch"):
        unreadable += bad
        if len(index) == 0:
            continue
        x01 = images.to(device).float() / 255
        recon, model_metrics, latents = model.evaluate_batch(x01 * 2 - 1, generator,
                                                             args.kld_weight)
        recon01 = (recon.float() + 1) / 2
        x01, recon01, images = (as_rgb(t) for t in (x01, recon01, images))   # see as_rgb
        if fid:
            fid.add("input", x01)
            fid.add("recon", recon01)
        flat = x01.mean((2, 3), keepdim=True).expand_as(x01)    # each image's mean colour
        baseline = {f"mean_colour_{k}": v for k, v in metrics(x01, flat, ("mse", "psnr")).items()}
        values = {**metrics(x01, recon01), **baseline,
                  **{k: v.double().cpu() for k, v in model_metrics.items()}}
        latent_batches.append({k: v.cpu() for k, v in latents.items()})
        for k, i in enumerate(index.tolist()):
            rows.append({"index": i, "path": dataset.path(i),
                         **{name: float(v[k]) for name, v in values.items()}})
            if i in shown:                                         # spread over the split
                grid.append((x01[k].cpu(), recon01[k].clamp(0, 1).cpu()))
            if args.save_reconstructions:
                save_png(images[k], os.path.join(recon_dir, f"{i:06d}_input.png"))
                save_png(to_uint8(recon01[k]), os.path.join(recon_dir, f"{i:06d}_recon.png"))
    latent = latent_summary(latent_batches, model.num_embeddings)
    return rows, latent, grid, unreadable


@torch.no_grad()
def generation_consistency(model, metrics, num_samples, batch_size, device):
    """Decode prior samples, reconstruct them through the model, score the round trip."""
    generator = torch.Generator(device=device).manual_seed(1)
    per_image, samples = {}, []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        generated01 = (model.sample(n, device=device, generator=generator).float() + 1) / 2
        generated01 = generated01.clamp(0, 1)
        again01 = as_rgb((model.reconstruct(generated01 * 2 - 1).float() + 1) / 2)
        generated01 = as_rgb(generated01)
        for name, v in metrics(generated01, again01).items():
            per_image.setdefault(name, []).append(v)
        samples.append(generated01.cpu())
    return {k: torch.cat(v) for k, v in per_image.items()}, torch.cat(samples)


def print_table(report):
    print(f"\n{report['model']} on {report['dataset']} ({report['num_images']} images)")
    print(f"{'metric':<18} {'mean':>10} {'std':>10}   95% CI")
    def row(name, s, note=""):
        print(f"{name:<18} {s['mean']:>10.4f} {s['std']:>10.4f}   "
              f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]{note}")

    base = report["baseline_mean_colour"]["psnr"]
    titles = {"reconstruction": "reconstruction (the model's output against its input)",
              "generation": "generation self-consistency (prior samples against their own "
                            "reconstruction: a sample the model can re-encode scores high; not "
                            "a measure of reconstruction)"}
    for title in ("reconstruction", "generation"):
        print(f"-- {titles[title]}")
        for name, s in report[title].items():
            if name != "not_applicable" and s is not None and s["mean"] is not None:
                row(name, s)
        if title == "reconstruction" and base["mean"] is not None:
            row("psnr of mean colour", base, "   (baseline: each image replaced by its mean "
                "colour; a model that learned scores well above it)")
        if "all" in report[title]["not_applicable"]:
            print(f"(none: {report[title]['not_applicable']['all']})")
    if report.get("model_reconstruction_loss"):
        print(f"(the model's own reconstruction likelihood: "
              f"{report['model_reconstruction_loss']}; compare models on it)")
    if report["rfid"]["value"] is not None:
        print(f"{'rfid':<18} {report['rfid']['value']:>10.4g}   (set-level, "
              f"{report['rfid']['images']} images; {report['rfid']['backbone']})")
    lat = report["latent"]
    if lat and "active_units" in lat:
        print(f"-- latent: {lat['active_units']}/{lat['latent_dim']} active units"
              + (f", KL {lat['kl_total']:.2f} nats" if lat["kl_total"] is not None else ""))
        if lat["posterior_collapse_warning"]:
            print(f"warning: {lat['posterior_collapse_warning']}")
    elif lat:
        print(f"-- codebook: {lat['unique_codes']}/{lat['codebook_size']} codes used, "
              f"perplexity {lat['perplexity']:.1f}")


def main(args):
    check_exist(args, "--checkpoint", "--data-path")      # inputs first, then weight files
    device = pick_device(args.device, gpus=-1)
    metrics = ImageMetrics(device, args.lpips_net, args.lpips_random_backbone)  # fails fast
    fid = build_fid(args, device)
    if is_pythae_source(args.checkpoint):
        model, config = load_pythae(args.checkpoint, device, args.allow_pickle)
        ckpt = {"config": config, "step": None}
    else:
        model, ckpt = load_model(args.checkpoint, device)
        if model.takes_pairs:
            raise CheckpointError(
                f"{args.checkpoint} is a {ckpt['config']['model_params']['name']}: it "
                f"predicts a future frame from a frame pair, not an image from itself; "
                f"score it with compare_with_laq.py --model {args.checkpoint}")
    image_size = ckpt["config"]["model_params"]["image_size"]
    channels = image_channels(ckpt["config"]["model_params"])
    args.kld_weight = ckpt["config"]["exp_params"]["kld_weight"]   # the run's loss weights
    dataset, data_info = build_eval_dataset(args, ckpt["config"], image_size, channels)
    positions = list(range(len(dataset)))
    if args.max_images and args.max_images < len(positions):
        positions = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, args.max_images)})
    start_outputs(args.output, ("metrics.json", "per_image.csv"))

    start = time.perf_counter()
    rows, latent, grid, unreadable = evaluate(model, dataset, positions, metrics, args, device,
                                              fid)
    seconds = time.perf_counter() - start
    if not rows:
        exit_bad_input(f"none of the {len(positions)} images could be read")
    if unreadable:
        print(f"warning: {len(unreadable)} unreadable images left out, e.g. {unreadable[0]}",
              file=sys.stderr)
    diverged = sum(not np.isfinite(r["mse"]) for r in rows)
    if diverged:
        print(f"warning: {diverged} of {len(rows)} reconstructions hold NaN or inf (do the "
              f"model's weights?); their metrics are NaN and left out of the summaries",
              file=sys.stderr)
    model_names = [k for k in rows[0] if k not in ("index", "path") and k not in metrics.names
                   and not k.startswith("mean_colour_")]
    per_image = {k: [r[k] for r in rows] for k in metrics.names + model_names}
    skipped = {} if metrics.lpips else {"lpips": "skipped with --lpips-net none"}
    source = ckpt["config"].get("source", {})
    report = {"model": ckpt["config"]["model_params"]["name"],
              "checkpoint": args.checkpoint if "repo_id" in source else
              os.path.abspath(args.checkpoint), "step": ckpt.get("step"),
              **({"hub": source} if "repo_id" in source else {}),
              "dataset": args.dataset, **data_info, "num_images": len(rows), "channels": channels,
              **({"one_channel": ONE_CHANNEL} if channels == 1 else {}),
              **({"model_reconstruction_loss": ckpt["config"]["reconstruction_loss"]}
                 if ckpt["config"].get("reconstruction_loss") else {}),
              "unreadable_images": unreadable, "lpips_net": lpips_label(args),
              "num_samples": args.num_samples, "ci_method": CI_METHOD,
              "ssim_settings": SSIM_SETTINGS,
              "reconstruction": section(per_image, metrics.names + model_names,
                                        {**skipped, **model.not_applicable}),
              "baseline_mean_colour": {k: summarize([r[f"mean_colour_{k}"] for r in rows])
                                       for k in ("mse", "psnr")},
              "rfid": {"value": fid.fid("input", "recon") if fid else None,
                       "images": len(rows), "backbone": fid_label(args)},
              "images_per_sec": len(rows) / seconds}
    if args.num_samples and model.cannot_sample:
        report["generation"] = {"not_applicable": {"all": model.cannot_sample}}
    elif args.num_samples:
        generated, samples = generation_consistency(model, metrics, args.num_samples,
                                                    args.batch_size, device)
        report["generation"] = section(generated, metrics.names, skipped)
        save_image(make_grid(samples[:64], nrow=8), os.path.join(args.output, "samples.png"))
    else:
        report["generation"] = {"not_applicable": {"all": "skipped with --num-samples 0"}}
    report["latent"] = latent
    d = data_params_of(ckpt["config"], data_path=args.data_path)
    report["manifest"] = manifest(
        files={"checkpoint": args.checkpoint} if os.path.isfile(args.checkpoint) else None,
        index=getattr(dataset, "index", None),
        labels_dir=(d.labels_path or d.data_path) if hasattr(dataset, "index") else None)

    write_report(args.output, report, rows, "per_image.csv")
    inputs, recons = zip(*grid)
    save_image(make_grid(torch.stack(inputs + recons), nrow=len(inputs)),
               os.path.join(args.output, "reconstructions.png"))
    print_table(report)
    print(f"{report['images_per_sec']:.1f} images/s on {device}")
    print(f"\nwrote {args.output}/metrics.json, per_image.csv, reconstructions.png"
          + (", samples.png" if "all" not in report["generation"]["not_applicable"] else "")
          + (", reconstructions/" if args.save_reconstructions else ""))


if __name__ == "__main__":
    run_main(lambda: main(ARGS))
