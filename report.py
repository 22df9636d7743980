"""Many comparisons, one figure: rate against distortion and against the action probe.

    python report.py DIR [DIR ...] --output OUT

Each DIR is the output of one compare_with_laq.py run (its metrics.json, and probe.json with
--probe) or of one downstream.py run (its downstream.json: report.md's "Downstream" section and
OUT/downstream.csv, a row per policy and K): a VAE at one kld_weight, latent action models at one target rate, a seed, a LAQ
checkpoint. Every model of every DIR is one run; runs whose family and training settings agree
and that were scored under the same protocol (pairs, offset, split, scoring target) are one
point, averaged over their seeds (mean and sd). A family swept over its rate (target_rate_bits,
kld_weight, ...) is also read at LAQ's rate, seed by seed, between the swept points. Rates are
the comparison's: measured on the pairs it scored, not on training batches. Writes
OUT/report.md and OUT/report.csv (one row per point), OUT/rate_matched.csv (each family at
LAQ's rate) and OUT/rate_distortion.png (PSNR, LPIPS, rFID and probe top-1 against bits per
pair, one marker per model family, error bars over seeds; a panel per metric that has data).
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

METRICS = ("rate_bits", "psnr", "lpips", "rfid", "probe_top1", "true_action_top1")
LABELS = {"rate_bits": "bits per pair", "psnr": "PSNR (dB)", "lpips": "LPIPS",
          "rfid": "rFID", "probe_top1": "probe top-1",
          "true_action_top1": "true-action top-1 (all labels)"}
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


def probe_feature(key, settings):
    """The probe's feature set that stands for a model: the action latent of an action model,
    the difference of the VAE's means of the two frames."""
    gaussian = "gaussian" in settings.get("family", "")
    return ("vae_mu_difference" if key == "vae" else "laq_codes_onehot" if key == "laq" else
            f"{key}_action_mu" if gaussian else f"{key}_codes_onehot")


def true_action_of(name, true_action):
    """{label fraction: top-1} of the true-action probe for one feature set ({} without)."""
    return {fraction: r["top1"]["mean"] for fraction, r in
            (true_action.get("feature_sets") or {}).get(name, {}).items()}


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
    probe = probe if isinstance(probe, dict) else {}
    feature_sets, true_action = probe.get("feature_sets", {}), probe.get("true_action") or {}
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
        name = probe_feature(key, settings)
        few_labels = true_action_of(name, true_action)
        runs.append({
            "folder": folder, "model": label, "family": settings.get("family", label),
            "seed": settings.get("seed"), "settings": settings.get("settings", {}),
            "protocol": protocol, "checkpoint": (hashes.get(key) or {}).get("sha256"),
            "rate_bits": rate_bits(report["rate"][key]),
            "psnr": (scores.get("psnr") or {}).get("mean"),
            "lpips": (scores.get("lpips") or {}).get("mean"),
            "rfid": rfid.get(key),
            "probe_top1": feature_sets[name]["top1"]["mean"] if name in feature_sets else None,
            "true_action": few_labels, "true_action_top1": few_labels.get("1")})
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
                 "runs": len(members), "folders": [m["folder"] for m in members],
                 "true_action": {f: statistics.fmean(m["true_action"][f] for m in members)
                                 for f in members[0]["true_action"]
                                 if all(f in m["true_action"] for m in members)}}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            point[metric] = statistics.fmean(values) if values else None
            point[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(point)
    return sorted(out, key=lambda p: (p["family"], p["rate_bits"] is None, p["rate_bits"] or 0))


SWEPT = ("target_rate_bits", "kld_weight", "beta", "codebook_size", "code_seq_len")
MATCHED = ("psnr", "lpips", "probe_top1", "true_action_top1")


def curves(runs):
    """A family's rate-distortion curves: its runs under one protocol whose settings differ
    only in what a sweep varies (SWEPT) and the seed."""
    out = {}
    for run in runs:
        if run["family"] != "LAQ" and run["rate_bits"] is not None:
            fixed = {k: v for k, v in run["settings"].items() if k not in SWEPT}
            key = json.dumps([run["family"], fixed, run["protocol"]], sort_keys=True)
            out.setdefault(key, []).append(run)
    return out


def at_rate(members, rate, metric):
    """One value per seed: the metric of that seed's runs at `rate`, linear between the two
    swept rates around it; a seed whose runs do not span it gives none (no extrapolation)."""
    import numpy as np
    values = []
    for seed in sorted({str(m["seed"]) for m in members}):
        known = sorted((m["rate_bits"], m[metric]) for m in members
                       if str(m["seed"]) == seed and m[metric] is not None)
        rates = [r for r, _ in known]
        if len(set(rates)) > 1 and rates[0] <= rate <= rates[-1]:
            values.append(float(np.interp(rate, rates, [v for _, v in known])))
    return values


def rate_matched(runs, points):
    """Each family's distortion and probe at each LAQ point's rate (measured on the pairs the
    comparison scored), read off the family's curve seed by seed (at_rate), then over seeds
    (mean and 95% t interval): rows of rate_matched.csv."""
    from stats import over_seeds
    out = []
    for members in curves(runs).values():
        first = members[0]
        if len({m["rate_bits"] for m in members}) < 2:
            continue                                           # a point, not a curve
        span = [min(m["rate_bits"] for m in members), max(m["rate_bits"] for m in members)]
        for laq in (p for p in points if p["family"] == "LAQ" and p["rate_bits"] is not None
                    and p["protocol"] == first["protocol"]):
            swept = sorted(k for k in SWEPT if len({json.dumps(m["settings"].get(k))
                                                    for m in members}) > 1)
            row = {"family": first["family"], "swept": swept, "swept_rates": span,
                   "settings": {k: v for k, v in first["settings"].items() if k not in SWEPT},
                   "protocol": first["protocol"], "laq_rate_bits": laq["rate_bits"],
                   "laq_folders": laq["folders"]}
            for metric in MATCHED:
                row[metric] = over_seeds(at_rate(members, laq["rate_bits"], metric))
                row[f"laq_{metric}"] = laq[metric]
            out.append(row)
    return out


def short(settings, keep=("kld_weight", "beta", "target_rate_bits", "bottleneck",
                          "codebook_size", "code_seq_len", "latent_dim")):
    """The settings a reader tells the points apart by."""
    return ", ".join(f"{k} {settings[k]}" for k in keep if k in settings) or "-"


def fmt(value, sd=None):
    if value is None:
        return "-"
    return f"{value:.4g}" + (f" ± {sd:.2g}" if sd is not None else "")


def interval(summary):
    if summary["mean"] is None:
        return "- (no seed spans it)"
    if summary["ci95"] is None:
        return f"{summary['mean']:.4g} (1 seed)"
    return f"{summary['mean']:.4g} [{summary['ci95'][0]:.4g}, {summary['ci95'][1]:.4g}]"


def write_matched(matched, folder):
    with atomic_write(os.path.join(folder, "rate_matched.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["family", "swept", "settings", "protocol", "laq_rate_bits",
                         "swept_min_bits", "swept_max_bits"]
                        + [c for m in MATCHED for c in (m, f"{m}_ci_low", f"{m}_ci_high",
                                                        f"{m}_seeds", f"laq_{m}")])
        for r in matched:
            writer.writerow([r["family"], " ".join(r["swept"]),
                             json.dumps(r["settings"], sort_keys=True),
                             json.dumps(r["protocol"], sort_keys=True), r["laq_rate_bits"],
                             *r["swept_rates"]]
                            + [c for m in MATCHED for c in (
                                r[m]["mean"], *(r[m]["ci95"] or (None, None)), r[m]["n"],
                                r[f"laq_{m}"])])


def write_table(points, folder, run_manifest, matched=(), extra=()):
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
    if not points:                                   # downstream.py runs only
        lines = ["# Downstream task success"]
    if matched:
        lines += ["", "## At LAQ's rate", "",
                  "Each family's curve (its runs that differ only in the swept settings and the "
                  "seed) read at LAQ's rate, measured on the pairs the comparison scored: seed "
                  "by seed, linear between the two swept points around it (none outside them), "
                  "then mean [95% t interval] over the seeds that span it.", "",
                  "| family | swept | settings | LAQ bits | swept bits | seeds | "
                  + " | ".join(f"{LABELS[m]} | LAQ {LABELS[m]}" for m in MATCHED) + " |",
                  "|" + "---|" * (6 + 2 * len(MATCHED))]
        for r in matched:
            lines.append("| " + " | ".join(
                [r["family"], ", ".join(r["swept"]), short(r["settings"]),
                 f"{r['laq_rate_bits']:.4g}", "{:.4g}–{:.4g}".format(*r["swept_rates"]),
                 str(r["psnr"]["n"])]
                + [c for m in MATCHED for c in (interval(r[m]), fmt(r[f"laq_{m}"]))]) + " |")
    lines += true_action_lines(points)
    lines += list(extra)
    protocols = {json.dumps(p["protocol"], sort_keys=True) for p in points}
    if protocols:
        lines += ["", "Protocols (pairs, offset, split, scoring target): "
                  + "; ".join(sorted(protocols))]
    lines += ["", "## Manifest", "", "```json", json.dumps(run_manifest, indent=1), "```", ""]
    with atomic_write(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines))


def true_action_lines(points):
    """report.md's table of the true-action probe at each share of labels."""
    fractions = sorted({f for p in points for f in p["true_action"]}, key=float)
    if not fractions:
        return []
    lines = ["", "## True action from few labels", "",
             "Top-1 of the true action (compare_with_laq.py --actions) on held-out episodes, "
             "from the model's action feature, by the share of the train episodes' pairs "
             "labelled (mean over seeds).", "",
             "| family | settings | seeds | " + " | ".join(f"{float(f):.1%}" for f in fractions)
             + " |", "|" + "---|" * (3 + len(fractions))]
    for p in (p for p in points if p["true_action"]):
        lines.append("| " + " | ".join([p["family"], short(p["settings"]), " ".join(p["seeds"])]
                                       + [fmt(p["true_action"].get(f)) for f in fractions])
                     + " |")
    return lines


DOWNSTREAM_KEYS = ("env", "labels", "models", "baselines", "rollouts", "success_defined")


def read_downstream(folder):
    path = os.path.join(folder, "downstream.json")
    report = read_json(path)
    if not isinstance(report, dict) or not all(k in report for k in DOWNSTREAM_KEYS):
        raise DataError(f"{path} is not a downstream.py result (it needs "
                        f"{', '.join(DOWNSTREAM_KEYS)}): run downstream.py again")
    return report


def downstream_rows(folder, report):
    """(policy, K or "all", its scores) of one downstream.py run, models first."""
    b = report["baselines"]
    for name, by_k in [*report["models"].items(), ("from_labels_only", b["from_labels_only"])]:
        for k in report["labels"]:
            yield name, str(k), by_k[str(k)]
    for name in ("all_true_actions", "recording_policy", "random"):
        yield name, "all", b[name]


def write_downstream(runs, out):
    """OUT/downstream.csv and report.md's lines for downstream.py's runs {folder: report}."""
    with atomic_write(os.path.join(out, "downstream.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["folder", "env", "seed", "rollouts", "policy", "labels", "success",
                         "success_ci_low", "success_ci_high", "return", "return_ci_low",
                         "return_ci_high", "val_action_top1"])
        for folder, r in runs.items():
            for name, k, s in downstream_rows(folder, r):
                success = s.get("success") or {}
                writer.writerow([folder, r["env"], r.get("seed"), r["rollouts"], name, k,
                                 success.get("mean"), *(success.get("ci95") or [None, None]),
                                 s["return"]["mean"], *s["return"]["ci95"],
                                 s.get("val_action_top1")])
    lines = ["", "## Downstream", "",
             "downstream.py: a latent policy pretrained on each model's latent actions, an "
             "action decoder fitted on K labelled transitions, then closed-loop episodes from "
             "start seeds no recorded episode has; mean [95% CI]. Baselines: the same network "
             "on the K labels alone (from_labels_only), on every true action (all_true_actions, "
             "the ceiling), the recording policy and random actions."]
    for folder, r in runs.items():
        key = "success" if r["success_defined"] else "return"
        ks = [str(k) for k in r["labels"]]
        lines += ["", f"{key} in {r['env']}, {r['rollouts']} episodes, seed {r.get('seed')} "
                      f"({folder}):", "",
                  "| policy | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|" + "---|" * (1 + len(ks))]
        cells = {}
        for name, k, s in downstream_rows(folder, r):
            cells.setdefault(name, {})[k] = interval(s[key])
        for name, by_k in cells.items():
            row = [by_k.get(k, by_k.get("all", "")) for k in ks]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def draw(points, matched, path):
    """One panel per metric that some point has (rate against it), LAQ's rate as a dotted line
    and each family's value read there (rate_matched) as a star with its interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = sorted({p["family"] for p in points})
    shown = [m for m in ("psnr", "lpips", "rfid", "probe_top1", "true_action_top1")
             if any(p[m] is not None and p["rate_bits"] is not None for p in points)]
    if not shown:
        print("warning: no point has both a rate and a score: rate_distortion.png is not drawn",
              file=sys.stderr)
        return False
    columns = min(2, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.remove()
    for ax, metric in zip(axes.flat, shown):
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
            for r in (r for r in matched if r["family"] == family and metric in r
                      and r[metric]["mean"] is not None):
                ci = r[metric]["ci95"] or [r[metric]["mean"]] * 2
                ax.errorbar([r["laq_rate_bits"]], [r[metric]["mean"]], capsize=3, fmt="*",
                            markersize=12, color=f"C{k}", yerr=[[r[metric]["mean"] - ci[0]],
                                                                [ci[1] - r[metric]["mean"]]])
        for rate in sorted({r["laq_rate_bits"] for r in matched if metric in r}):
            ax.axvline(rate, color="grey", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=-0.5)                  # points at 0 bits whole; no tick below 0
        ax.set(xlabel="bits per pair on the scored pairs (log scale)", ylabel=LABELS[metric],
               title=f"{LABELS[metric]} against rate")
        ax.legend(fontsize=8)
    fig.suptitle("error bars: sd over seeds (points with one seed have none); stars: a family "
                 "read at LAQ's rate (dotted), 95% t interval over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("folders", nargs="+", metavar="DIR",
                        help="output folders of compare_with_laq.py or downstream.py")
    parser.add_argument("--output", required=True, help="folder for the report")
    args = parser.parse_args()
    require(MATPLOTLIB)
    downstream = {folder: read_downstream(folder) for folder in args.folders
                  if os.path.isfile(os.path.join(folder, "downstream.json"))
                  and not os.path.isfile(os.path.join(folder, "metrics.json"))}
    comparisons = [folder for folder in args.folders if folder not in downstream]
    runs = distinct(comparisons)
    points = group(runs)
    os.makedirs(args.output, exist_ok=True)
    run_manifest = manifest(files={
        **{f"{folder}/metrics.json": os.path.join(folder, "metrics.json")
           for folder in comparisons},
        **{f"{folder}/downstream.json": os.path.join(folder, "downstream.json")
           for folder in downstream}})
    matched = rate_matched(runs, points)
    extra = write_downstream(downstream, args.output) if downstream else []
    write_table(points, args.output, run_manifest, matched, extra)
    write_matched(matched, args.output)
    drawn = draw(points, matched, os.path.join(args.output, "rate_distortion.png")) \
        if points else False
    print(f"{len(runs)} runs, {len(points)} points, {len(matched)} read at LAQ's rate"
          + (f", {len(downstream)} downstream runs" if downstream else "")
          + f"; wrote {args.output}/report.md, report.csv, rate_matched.csv"
          + (", downstream.csv" if downstream else "") + (", rate_distortion.png" if drawn else ""))


if __name__ == "__main__":
    run_main(main)
