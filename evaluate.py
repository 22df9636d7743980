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
import os
import sys
import time

from errors import run_main
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
    import numpy as np                   # after the command line is known to be good
    import torch
    from torchvision.utils import make_grid, save_image

    from config import data_params_of
    from errors import CheckpointError, exit_bad_input
    from evaluation import (ONE_CHANNEL, build_eval_dataset, evaluate, generation_consistency,
                            load_model, section, start_outputs, write_report)
    from manifest import manifest
    from metrics import SSIM_SETTINGS, ImageMetrics, build_fid
    from models import image_channels
    from pythae_adapter import is_pythae_source, load_pythae
    from runtime import pick_device
    from stats import CI_METHOD, summarize
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
    ARGS = parse_args()     # --help and usage errors answer before torch is imported
    run_main(lambda: main(ARGS))
