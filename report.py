"""Many comparisons, one figure: rate against distortion and against the action probe.

    python report.py DIR [DIR ...] --output OUT

Each DIR is the output of one compare_with_laq.py run (its metrics.json, and probe.json with
--probe): a VAE at one kld_weight, latent action models at one target rate, a seed, a LAQ
checkpoint. Every model of every DIR is one run; runs whose family and training settings agree
and that were scored under the same protocol (pairs, offset, split, scoring target) are one
point, averaged over their seeds (mean and sd). Writes OUT/report.md and OUT/report.csv (one
row per point) and OUT/rate_distortion.png (PSNR, LPIPS, rFID and probe top-1 against bits
per pair, one marker per model family, error bars over seeds).
"""
import argparse
import csv
import json
import os
import statistics
import sys

from errors import DataError, run_main
from files import atomic_write
from manifest import manifest
from options import MATPLOTLIB, Formatter, require

METRICS = ("rate_bits", "psnr", "lpips", "rfid", "probe_top1")
LABELS = {"rate_bits": "bits per pair", "psnr": "PSNR (dB)", "lpips": "LPIPS",
          "rfid": "rFID", "probe_top1": "probe top-1"}
MARKERS = "osD^vP*Xph"


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None


def rate_bits(rate):
    """The rate of one model: KL in bits, or the joint entropy of its codes."""
    for key in ("kl_bits_mean", "code_entropy_joint_bits"):
        if rate.get(key) is not None:
            return rate[key]
    return None


def probe_feature(key, settings, feature_sets):
    """The probe top-1 of the feature set that stands for a model: the action latent of an
    action model, the difference of the VAE's means of the two frames; None without it."""
    gaussian = "gaussian" in settings.get("family", "")
    name = ("vae_mu_difference" if key == "vae" else "laq_codes_onehot" if key == "laq" else
            f"{key}_action_mu" if gaussian else f"{key}_codes_onehot")
    return feature_sets[name]["top1"]["mean"] if name in feature_sets else None


def runs_of(folder):
    """One record per model of a comparison's output folder; a file that lacks what a
    comparison writes is one line naming what is missing."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"{folder} holds no metrics.json: pass compare_with_laq.py --output "
                        f"folders")
    report = read_json(path)
    if not isinstance(report, dict):
        raise DataError(f"{path} holds {type(report).__name__}, not a comparison's metrics: "
                        f"run the comparison again")
    if "settings" not in report or "models" not in report:
        raise DataError(f"{path} was written by an older compare_with_laq.py (no 'settings'): "
                        f"run the comparison again")
    probe_path = os.path.join(folder, "probe.json")
    probe = read_json(probe_path) if os.path.isfile(probe_path) else {}
    probe = probe.get("feature_sets", {}) if isinstance(probe, dict) else {}
    inputs = report.get("inputs") or {}
    protocol = {"pairs": inputs.get("pairs"), "offset": inputs.get("offset"),
                "split": inputs.get("split"), "target": report.get("scoring_target"),
                "size": report.get("scoring_size")}
    rfid = report.get("rfid") or {}
    hashes = ((report.get("manifest") or {}).get("files") or {})
    runs = []
    for key, label in report["models"].items():
        for section in ("settings", "rate"):
            if not isinstance((report.get(section) or {}).get(key), dict):
                raise DataError(f"{path} lacks {section}[{key!r}] for its model {label!r}: "
                                f"not whole; run the comparison again")
        settings = report["settings"][key]
        scores = report.get(key) if isinstance(report.get(key), dict) else {}
        runs.append({
            "folder": folder, "model": label, "family": settings.get("family", label),
            "seed": settings.get("seed"), "settings": settings.get("settings", {}),
            "protocol": protocol, "checkpoint": (hashes.get(key) or {}).get("sha256"),
            "rate_bits": rate_bits(report["rate"][key]),
            "psnr": (scores.get("psnr") or {}).get("mean"),
            "lpips": (scores.get("lpips") or {}).get("mean"),
            "rfid": rfid.get(key), "probe_top1": probe_feature(key, settings, probe)})
    return runs


def distinct(folders):
    """The runs of the folders, each folder and each scored checkpoint once: the same folder
    passed twice, or two folders that scored one checkpoint (by its sha256 in the manifest)
    under one protocol, are one run, not two seeds (a warning says which)."""
    runs, seen_folders, seen = [], set(), {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen_folders:
            print(f"warning: {folder} is given twice; counted once", file=sys.stderr)
            continue
        seen_folders.add(real)
        for run in runs_of(folder):
            key = (run["checkpoint"], json.dumps(run["protocol"], sort_keys=True))
            if run["checkpoint"] and key in seen:
                print(f"warning: {run['model']} in {folder} is the checkpoint {seen[key]} "
                      f"scored already; counted once", file=sys.stderr)
                continue
            seen[key] = f"{run['model']} of {folder}"
            runs.append(run)
    return runs


def group(runs):
    """Points: runs that differ only in their seed, with mean and sd of every metric."""
    points = {}
    for run in runs:
        key = json.dumps([run["family"], run["settings"], run["protocol"]], sort_keys=True)
        points.setdefault(key, []).append(run)
    out = []
    for members in points.values():
        first = members[0]
        point = {"family": first["family"], "settings": first["settings"],
                 "protocol": first["protocol"], "seeds": sorted(str(m["seed"]) for m in members),
                 "runs": len(members), "folders": [m["folder"] for m in members]}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            point[metric] = statistics.fmean(values) if values else None
            point[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(point)
    return sorted(out, key=lambda p: (p["family"], p["rate_bits"] is None, p["rate_bits"] or 0))


def short(settings, keep=("kld_weight", "beta", "target_rate_bits", "bottleneck",
                          "codebook_size", "code_seq_len", "latent_dim")):
    """The settings a reader tells the points apart by."""
    return ", ".join(f"{k} {settings[k]}" for k in keep if k in settings) or "-"


def fmt(value, sd=None):
    if value is None:
        return "-"
    return f"{value:.4g}" + (f" ± {sd:.2g}" if sd is not None else "")


def write_table(points, folder, run_manifest):
    columns = ["family", "settings", "seeds", *METRICS]
    with atomic_write(os.path.join(folder, "report.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["family", "settings", "protocol", "seeds", "runs"]
                        + [c for m in METRICS for c in (m, f"{m}_sd")])
        for p in points:
            writer.writerow([p["family"], json.dumps(p["settings"], sort_keys=True),
                             json.dumps(p["protocol"], sort_keys=True), " ".join(p["seeds"]),
                             p["runs"]] + [p[c] for m in METRICS for c in (m, f"{m}_sd")])
    lines = ["# Rate, distortion and action probe", "",
             f"{sum(p['runs'] for p in points)} runs from {len({f for p in points for f in p['folders']})} "
             f"comparisons, {len(points)} points (mean ± sd over seeds where a point has "
             f"several). Rate: bits per pair (KL for Gaussian latents, joint code entropy for "
             f"codes). Probe top-1: the model's action feature (VAE: the difference of its two "
             f"means).", "",
             "| " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for p in points:
        lines.append("| " + " | ".join([p["family"], short(p["settings"]), " ".join(p["seeds"])]
                                       + [fmt(p[m], p[f"{m}_sd"]) for m in METRICS]) + " |")
    protocols = {json.dumps(p["protocol"], sort_keys=True) for p in points}
    lines += ["", "Protocols (pairs, offset, split, scoring target): " + "; ".join(sorted(protocols)),
              "", "## Manifest", "", "```json", json.dumps(run_manifest, indent=1), "```", ""]
    with atomic_write(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines))


def draw(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = sorted({p["family"] for p in points})
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, metric in zip(axes.flat, ("psnr", "lpips", "rfid", "probe_top1")):
        for k, family in enumerate(families):
            mine = [p for p in points if p["family"] == family and p[metric] is not None
                    and p["rate_bits"] is not None]
            if not mine:
                continue
            ax.errorbar([p["rate_bits"] for p in mine], [p[metric] for p in mine],
                        xerr=[p["rate_bits_sd"] or 0 for p in mine],
                        yerr=[p[f"{metric}_sd"] or 0 for p in mine], fmt=MARKERS[k % 10],
                        color=f"C{k}", capsize=3, label=family, linestyle="-" if len(mine) > 1
                        else "none")
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlabel="bits per pair (log scale)", ylabel=LABELS[metric],
               title=f"{LABELS[metric]} against rate")
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {LABELS[metric]} in these comparisons", ha="center",
                    transform=ax.transAxes)
    fig.suptitle("error bars: sd over seeds (points with one seed have none)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("folders", nargs="+", metavar="DIR",
                        help="output folders of compare_with_laq.py")
    parser.add_argument("--output", required=True, help="folder for the report")
    args = parser.parse_args()
    require(MATPLOTLIB)
    runs = distinct(args.folders)
    points = group(runs)
    os.makedirs(args.output, exist_ok=True)
    run_manifest = manifest(files={f"{folder}/metrics.json": os.path.join(folder, "metrics.json")
                                   for folder in args.folders})
    write_table(points, args.output, run_manifest)
    draw(points, os.path.join(args.output, "rate_distortion.png"))
    print(f"{len(runs)} runs, {len(points)} points; wrote {args.output}/report.md, report.csv, "
          f"rate_distortion.png")


if __name__ == "__main__":
    run_main(main)
