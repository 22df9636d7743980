"""The comparison's report: metrics.json assembled from the engine's rows, the console table,
the settings in a few lines for the pictures, and the files (metrics.json, per_pair.csv,
probe.json, comparison.png, plots.png, TensorBoard).
"""
import itertools
import json
import math
import os

from evaluation import section, write_report
from files import atomic_write
from stats import PAIRED_METHOD, add_holm, paired_difference, share, summarize

FID_MIN_IMAGES = 1000


def build_report(rows, scored, latents, codes, metric_names, skipped, fid, fid_backbone):
    """The numbers of metrics.json from the rows: per thing scored the summaries of every
    metric, rFID, rate and latent diagnostics, then the baselines, the share of pairs each
    model beats copying the current frame on, controllability and every paired difference."""
    models = [s for s in scored if s.is_model]
    labels = {s.name: s.label for s in models}

    def by_name(m):
        return section({n: [r[f"{m}_{n}"] for r in rows] for n in metric_names}, metric_names,
                       skipped)

    report = {m: by_name(m) for m in labels}
    report["rfid"] = ({**{m: fid.fid("target", m) for m in labels}, "images": len(rows),
                       "backbone": fid_backbone} if fid else {"backbone": fid_backbone})
    if fid and len(rows) < FID_MIN_IMAGES:
        report["rfid"]["warning"] = (f"{len(rows)} images cannot estimate the 2048-d feature "
                                     f"covariance rFID compares; use {FID_MIN_IMAGES} or more "
                                     f"(--num-pairs) before reading it")
    report["rate"], report["latent"] = {}, {}
    for s in models:
        report["rate"][s.name], report["latent"][s.name] = s.rate_latent(
            latents[s.name], codes[s.name], len(rows))
    videos = [row["video"] for row in rows]
    report["baselines"] = base = {s.name: by_name(s.name) for s in scored if not s.is_model}
    if "oracle_mean_colour" in base:          # its first name, which scripts read
        base["mean_colour"] = {**base["oracle_mean_colour"], "alias_of": "oracle_mean_colour"}
    report["beats_copy_current"] = {
        m: share([r[f"{m}_psnr"] > r["copy_current_psnr"] for r in rows], videos)
        for m in labels}
    report["controllability"] = controllability_report(rows, videos, labels)
    report["paired"] = {"method": PAIRED_METHOD, "difference": "first minus second",
                        **{f"{a}_vs_{b}": {n: paired_difference([r[f"{a}_{n}"] for r in rows],
                                                                [r[f"{b}_{n}"] for r in rows],
                                                                videos) for n in metric_names}
                           for a, b in itertools.combinations(labels, 2)}}
    adjust_family(report["paired"], metric_names)
    report["action_worth"] = action_worth(rows, videos, models)
    return report


def action_worth(rows, videos, models):
    """Does the action help? Per model with an action and a no-action twin among the models
    (the same decoder: decoder_key), PSNR and SSIM of the model minus its twin's, paired by
    video, with Holm-adjusted p-values over the models so tested."""
    out = {}
    for s in models:
        twins = [t for t in models if not t.has_action and t.decoder and t.decoder == s.decoder]
        if s.has_action and twins:
            out[s.name] = {"twin": twins[0].name, **{n: paired_difference(
                [r[f"{s.name}_{n}"] for r in rows], [r[f"{twins[0].name}_{n}"] for r in rows],
                videos) for n in ("psnr", "ssim")}}
    for n in ("psnr", "ssim"):
        add_holm(t[n] for t in out.values())
    return {"method": "model minus its no-action twin (bottleneck none, the same decoder), "
                      "paired by video; > 0: the action helps. " + PAIRED_METHOD, **out}


def adjust_family(paired, metric_names):
    """Holm-adjusted p-values (`p_holm`) beside the raw ones: per metric, the tests of every two
    models are one family."""
    couples = [c for c, d in paired.items() if isinstance(d, dict)]
    for n in metric_names:
        add_holm(paired[c][n] for c in couples if n in paired[c])
    paired["adjustment"] = ("Holm, per metric over every two models (p_holm); p_value is each "
                            "test alone")


def identity_report(rows, identity_rows, scored, kept):
    """How many pairs had their future frame clamped onto the current one, and each thing's
    PSNR on them: they are left out of every other number unless `kept` (they are then among
    `rows`), since copying scores them perfectly and they would dominate the means. Marks
    every row's `identity_pair` column."""
    if kept:
        identity_rows = [r for r in rows if r["video"] and r["current_frame"] == r["target_frame"]]
    total = len(rows) + (0 if kept else len(identity_rows))
    for row in rows:                                  # per_pair.csv's column
        row["identity_pair"] = 0
    for row in identity_rows:
        row["identity_pair"] = 1
    out = {"count": len(identity_rows), "share": len(identity_rows) / total,
           "left_out": not kept and bool(identity_rows),
           "note": "pairs whose future frame is the current frame (clamped at the video's "
                   "end); " + ("scored with the rest (--keep-identity-pairs)" if kept else
                               "left out of every other number, reported here")}
    if identity_rows:
        out["psnr"] = {s.name: summarize([r[f"{s.name}_psnr"] for r in identity_rows])
                       for s in scored}
    return out


def controllability_report(rows, videos, labels):
    """Per model with an action latent: PSNR with its own action, with another pair's action
    (the previous pair's of its batch) and (latent action models) with a prior draw, and the
    paired difference own - other, over the pairs that have them (a batch of one pair has no
    other pair)."""
    out = {"method": "delta PSNR (Genie): the current frame decoded with its own inferred "
                     "action minus with the action inferred for another pair of the batch "
                     "(other_action) or drawn from the model's prior (prior_action); > 0 "
                     "means the action controls the prediction. " + PAIRED_METHOD}
    for m in labels:
        if not any(f"{m}_psnr_other_action" in r for r in rows):
            continue
        own = [r[f"{m}_psnr"] for r in rows]
        out[m] = {"psnr": summarize(own)}
        for kind in ("other_action", "prior_action"):
            if any(f"{m}_psnr_{kind}" in r for r in rows):     # a lone pair's batch has none
                other = [r.get(f"{m}_psnr_{kind}", math.nan) for r in rows]
                out[m][f"psnr_{kind}"] = summarize(other)
                out[m][f"delta_psnr_{kind}"] = paired_difference(own, other, videos)
    return out


def run_settings(config):
    """What report.py groups runs by: the model family and every training setting that
    changes the result (the family's own: its model_params, the exp_params its loss reads and
    LR), with the seed apart (runs that differ only in it are one point)."""
    from models import MODELS
    m, e = config["model_params"], config.get("exp_params", {})
    family = m["name"] + (f" ({m['bottleneck']})" if "bottleneck" in m else "")
    used = (*getattr(MODELS.get(m["name"]), "loss_settings", ("kld_weight",)), "LR")
    return {"family": family, "seed": e.get("seed"),
            "settings": {**{k: v for k, v in m.items() if k != "name"},
                         **{k: e[k] for k in used if k in e}}}


def summary_lines(report):
    """The comparison's settings in a few lines, for the pictures."""
    inputs, ck = report["inputs"], report["checkpoints"]
    files = [f"{label} {os.path.basename(ck[m] if m in ck else ck['models'][m])}"
             + (f" ({ck['laq_keys']['layout']})" if m == "laq" else "")
             for m, label in report["models"].items()]
    lines = ["  |  ".join(files),
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
    if any(rfid.get(m) is not None for m in models):
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
        if rate.get("bound_bits") == 0:
            bits.append("0 (no action)")
        elif rate.get("kl_bits_mean") is not None:
            bits.append(f"{rate['kl_bits_mean']:.2f} (KL)")      # KL / ln 2: bits
        elif "code_entropy_joint_bits" in rate:
            bits.append(f"{rate['code_entropy_joint_bits']:.2f} (joint codes; bound "
                        f"{rate['bound_bits']:g})")
        else:
            bits.append("n/a")
    print(f"{'bits':<7} " + " ".join(f"{b:>{width}}" for b in bits))
    for m, w in report["action_worth"].items():
        if m != "method":
            d = w["psnr"]
            print(f"does the action help? {models[m]} - {models[w['twin']]} (no action): "
                  f"{d['mean_difference']:+.3f} dB [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                  f"p={d['p_value']:.3g} (Holm {d['p_holm']:.3g})")
    identity = report.get("identity_pairs", {})
    if identity.get("count"):
        print(f"identity pairs (future frame = current frame, clamped at a video's end): "
              f"{identity['count']} of {report['pairs'] + identity['count'] * identity['left_out']}"
              + (", left out of every number here; scored apart in metrics.json (identity_pairs)"
                 if identity["left_out"] else ", scored with the rest (--keep-identity-pairs)"))
    base = report["baselines"]
    print("baselines: " + ", ".join(f"{b} PSNR {cell(base[b]['psnr'])}" for b in base
                                    if "alias_of" not in base[b]))
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
                  f"(Holm {d['p_holm']:.3g}; {d['videos']} videos)")
    for m, label in models.items():
        latent = report["latent"][m]
        if latent and "unique_codes" in latent:
            print(f"{label} codes: {latent['unique_codes']}/{latent['codebook_size']} used, "
                  f"perplexity {latent['perplexity']:.2f}")
        elif latent and latent.get("active_units") is not None:
            print(f"{label} latent: {latent['active_units']}/{latent['latent_dim']} active units, "
                  f"KL {latent['kl_total']:.2f} nats = {latent['kl_total'] / math.log(2):.2f} "
                  f"bits")
        elif latent and "kl_total" in latent:
            print(f"{label} latent: KL {latent['kl_total']:.2f} nats ({latent['note']})")
    passes = report.get("laq_passes")
    print(f"{report['pairs_per_sec']:.2f} pairs/s on {report['device']}"
          + (f" (LAQ: {passes} pass{'es' if passes > 1 else ''} per batch)" if passes else ""))


def write_outputs(args, report, rows, examples, kl_per_dim, identity_rows=()):
    """The files; per_pair.csv also holds the identity pairs left out of the numbers."""
    write_report(args.output, report, [*rows, *identity_rows], "per_pair.csv")   # numbers first
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
    import matplotlib.pyplot as plt
    for fig in figures.values():                  # drawn and saved: free them
        plt.close(fig)


