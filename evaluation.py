"""Scoring an autoencoder on a dataset split, evaluate.py's engine; and what evaluate.py and
compare_with_laq.py share: a model from a checkpoint of this project, the output folder, the
reports (metrics.json and a CSV of one row per scored item).
"""
import contextlib
import csv
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from checkpoint import load_checkpoint
from config import data_params_of, model_params_of
from dataset_sthv2 import build_split
from errors import CheckpointError, ConfigError, DataError
from files import atomic_write, remove_orphaned_temps
from image_datasets import DSpritesImages, ImageFiles, MNISTImages
from metrics import latent_summary
from models import build_model
from parallel import progress
from stats import summarize


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
