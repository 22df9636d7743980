"""The comparison's pictures, drawn with matplotlib (compare_with_laq.py).

comparison_figure: example pairs, one per row, from distinct videos: current frame, target,
each model's reconstruction (VAE, LAQ, latent action models trained here), and their error
maps on one colour scale with a colour bar.
summary_figure: per-pair PSNR of the first two models, the first discrete model's code usage,
the VAE's KL per latent dimension, rate against distortion, the template probe's accuracy
with 95% intervals, and the true-action probe's accuracy against the share of labels.
Both return the figure (for TensorBoard) after saving it.
downstream_figure: downstream.py's success (or return) against the labelled transitions K,
and the policies' action accuracy on the held-out transitions.
"""
import textwrap

import matplotlib

matplotlib.use("Agg")                                   # files only: no display on a node

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ERROR_CMAP = "magma"


def _image(x):
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) array for imshow."""
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def comparison_figure(examples, models, header, path):
    """examples: dicts with current, target ((3, S, S) tensors in [0, 1]), models ({model:
    its prediction}), scores ({model: a line of text}) and title; models: {model: label}, in
    column order; header: lines above the grid."""
    names = list(models)
    errors = [[(e["models"][m] - e["target"]).abs().mean(0) for m in names] for e in examples]
    vmax = max(float(err.max()) for row in errors for err in row) or 1.0
    titles = [textwrap.fill(t, 20) for t in ["current frame", "target frame",
                                             *(models[m] for m in names),
                                             *(f"|{models[m]} - target|" for m in names)]]
    title_lines = max(t.count("\n") + 1 for t in titles)   # wrapped: narrow columns
    columns, rows = len(titles), len(examples)
    head = 0.2 + 0.17 * len(header) + 0.15 * title_lines
    height = 2.25 * rows + head
    fig, axes = plt.subplots(rows, columns, figsize=(2.15 * columns + 0.1, height), squeeze=False)
    fig.subplots_adjust(left=0.09, right=0.92, bottom=0.02, top=1 - head / height,
                        wspace=0.05, hspace=0.3)
    for r, (example, row_errors) in enumerate(zip(examples, errors)):
        images = [example["current"], example["target"], *(example["models"][m] for m in names)]
        for c, image in enumerate(images):
            axes[r, c].imshow(_image(image), interpolation="nearest")
        for c, err in enumerate(row_errors, start=len(images)):
            shown = axes[r, c].imshow(err.numpy(), cmap=ERROR_CMAP, vmin=0, vmax=vmax,
                                      interpolation="nearest")
        axes[r, 0].set_ylabel(example["title"], fontsize=7, rotation=0, ha="right", va="center")
        for c in range(columns):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
        for c, m in enumerate(names, start=2):
            axes[r, c].set_xlabel(example["scores"][m], fontsize=6)
    fig.text(0.01, 1 - 0.1 / height, "\n".join(header), fontsize=8, va="top")
    bar = fig.add_axes((0.935, 0.05, 0.012, 0.9 - head / height))
    fig.colorbar(shown, cax=bar).set_label("mean |error| over RGB, [0, 1] pixels", fontsize=8)
    fig.savefig(path, dpi=110)
    return fig


def _ci_bar(ax, x, summary, horizontal=False, **kwargs):
    lo, hi = summary["ci95"]
    error = [[summary["mean"] - lo], [hi - summary["mean"]]]
    if horizontal:
        ax.errorbar(summary["mean"], x, xerr=error, capsize=4, **kwargs)
    else:
        ax.errorbar(x, summary["mean"], yerr=error, capsize=4, **kwargs)


def _pair_scatter(ax, report, rows):
    """Per-pair PSNR of the first two models, or of the one model against copying."""
    models = list(report["models"])
    (a, la), (b, lb) = ((m, report["models"][m]) for m in models[:2]) if len(models) > 1 else \
        ((models[0], report["models"][models[0]]), ("copy_current", "copy current frame"))
    x, y = (np.array([r[f"{m}_psnr"] for r in rows]) for m in (a, b))
    ax.scatter(x, y, s=12, alpha=0.7)
    low, high = float(min(x.min(), y.min())) - 1, float(max(x.max(), y.max())) + 1
    ax.plot([low, high], [low, high], "k--", lw=1, label="equal PSNR")
    ax.set(xlim=(low, high), ylim=(low, high), xlabel=f"{la} PSNR (dB)", ylabel=f"{lb} PSNR (dB)",
           title=f"per-pair PSNR ({len(rows)} pairs; above the line: {lb} better)")
    ax.legend(loc="upper left", fontsize=8)


def _code_usage(ax, report):
    coded = [m for m in report["models"] if "histogram" in (report["latent"][m] or {})]
    if not coded:
        ax.text(0.5, 0.5, "no model with discrete codes", ha="center")
        ax.set_axis_off()
        return
    codes, label = report["latent"][coded[0]], report["models"][coded[0]]
    ax.bar(range(len(codes["histogram"])), codes["histogram"])
    ax.set(xlabel=f"{label} code index", ylabel="uses (over all positions and pairs)",
           title=f"{label} codebook: {codes['unique_codes']}/{codes['codebook_size']} used, "
                 f"perplexity {codes['perplexity']:.2f}")


def _rate_distortion(ax, legend_ax, report):
    """Each model's PSNR at its rate: KL for a Gaussian latent, the joint entropy of its codes
    (LAQ also with its two upper bounds), 0 for a model without an action; the baselines as
    lines. The legend goes on `legend_ax`, clear of the points."""
    rate, most = report["rate"], 1.0
    for k, (m, label) in enumerate(report["models"].items()):
        r = rate[m]
        kind = ("no action" if r.get("bound_bits") == 0 else
                "KL" if r.get("kl_bits_mean") is not None else "joint code entropy")
        bits = 0 if kind == "no action" else r.get("kl_bits_mean", r.get("code_entropy_joint_bits"))
        if bits is None:
            continue
        most = max(most, bits, r.get("bound_bits") or 0)
        _ci_bar(ax, bits, report[m]["psnr"], fmt="osD^vP*Xph"[k % 10], color=f"C{k}",
                label=f"{label}: {kind}" + ("" if kind == "no action" else " (bits)"))
        if m == "laq":
            for key, marker, what in (("code_entropy_bits", "s", "sum of per-position entropies"),
                                      ("bound_bits", "^", "code_seq_len x log2(codebook)")):
                _ci_bar(ax, r[key], report[m]["psnr"], fmt=marker, mfc="none", color=f"C{k}",
                        label=f"{label}: bound, {what}")
    for b, style in (("copy_current", "--"), ("current_mean_colour", "-."),
                     ("oracle_mean_colour", ":")):
        if b in report.get("baselines", {}):
            ax.axhline(report["baselines"][b]["psnr"]["mean"], color="grey", ls=style,
                       label=f"baseline: {b.replace('_', ' ')}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.5, most * 2)           # bits are never negative: no tick below 0
    ax.set(xlabel="bits per pair spent on the target frame, on the scored pairs (log scale)",
           ylabel="PSNR (dB), mean with 95% CI",
           title="rate against distortion (the action models also see the current frame)")
    legend_ax.set_axis_off()
    legend_ax.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper left",
                     borderaxespad=0)


def _probe(ax, probe):
    if not probe or "feature_sets" not in probe:
        ax.text(0.5, 0.5, "action template probe: run with --probe", ha="center")
        ax.set_axis_off()
        return
    names = list(probe["feature_sets"])
    for k, name in enumerate(names):
        _ci_bar(ax, k, probe["feature_sets"][name]["top1"], horizontal=True, fmt="o",
                color="C0", label="top-1" if k == 0 else None)
        if "top5" in probe["feature_sets"][name]:
            _ci_bar(ax, k + 0.25, probe["feature_sets"][name]["top5"], horizontal=True,
                    fmt="s", color="C1", label="top-5" if k == 0 else None)
    ax.axvline(probe["chance"]["top1"], color="C0", ls=":", label="chance top-1")
    ax.axvline(probe["majority"]["top1"]["mean"], color="C0", ls="--", label="majority top-1")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel="accuracy on val pairs (95% CI, videos resampled)",
           title=f"action probe ({probe['num_classes']} templates)")
    ax.legend(fontsize=8, loc="lower right")


def _true_action(ax, report):
    """Top-1 of the true action against the share of train pairs labelled, per feature set."""
    fractions = report["fractions"]
    for k, (name, by_fraction) in enumerate(report["feature_sets"].items()):
        means = [by_fraction[f"{f:g}"]["top1"]["mean"] for f in fractions]
        low, high = zip(*(by_fraction[f"{f:g}"]["top1"]["ci95"] for f in fractions))
        ax.errorbar(fractions, means, yerr=[np.subtract(means, low), np.subtract(high, means)],
                    fmt="o-", capsize=3, color=f"C{k % 10}", label=name)
    ax.plot(fractions, [report["majority"][f"{f:g}"]["top1"]["mean"] for f in fractions],
            "k--", label="majority class of the labelled pairs")
    ax.axhline(report["chance"]["top1"], color="k", ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.1%}" for f in fractions])
    ax.set(ylim=(0, 1.02), xlabel="share of the train episodes' pairs labelled (whole episodes)",
           ylabel="top-1 on held-out episodes (95% CI)",
           title=f"true action from few labels ({report['num_classes']} classes, offset "
                 f"{report['offset']}, {report['test_episodes']} held-out episodes)")
    ax.legend(fontsize=8, loc="lower right")


def summary_figure(report, rows, kl_per_dim, path):
    """The summary plots of one comparison: per-pair PSNR, code usage, the VAE's KL per
    dimension, rate against distortion, the probe (with --probe) and the settings."""
    probe = report.get("probe") or {}
    true_action = probe.get("true_action")
    tall = 0.3 * len(probe["feature_sets"]) if "feature_sets" in probe else 3
    template = "feature_sets" in probe or not true_action       # its row, or the hint to run it
    heights = [1, 1, *([max(1.0, tall / 4.5)] if template else []), *([1] if true_action else [])]
    fig = plt.figure(figsize=(16, 4.75 * (len(heights) - template) + template * max(3.0, tall)),
                     layout="constrained")
    grid = fig.add_gridspec(len(heights), 3, height_ratios=heights)
    _pair_scatter(fig.add_subplot(grid[0, 0]), report, rows)
    _code_usage(fig.add_subplot(grid[0, 1]), report)
    ax = fig.add_subplot(grid[0, 2])                         # VAE KL per dimension
    if kl_per_dim is not None:
        kl = np.sort(np.asarray(kl_per_dim))[::-1] / np.log(2)
        ax.bar(range(len(kl)), kl, width=1.0)
        ax.set(xlabel="latent dimension (sorted)", ylabel="KL (bits)",
               title=f"VAE KL per dimension (total {kl.sum():.1f} bits)")
    else:
        ax.text(0.5, 0.5, "the VAE reports no Gaussian posterior" if "vae" in report["models"]
                else "no VAE in this comparison", ha="center")
        ax.set_axis_off()
    _rate_distortion(fig.add_subplot(grid[1, :2]), fig.add_subplot(grid[1, 2]), report)
    if template:
        _probe(fig.add_subplot(grid[2, :2]), probe)
    if true_action:
        _true_action(fig.add_subplot(grid[len(heights) - 1, :2]), true_action)
    ax = fig.add_subplot(grid[2, 2])
    ax.set_axis_off()
    lines = [wrapped for line in report["summary_lines"]
             for wrapped in textwrap.wrap(line, 52, subsequent_indent="  ")]
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace")
    fig.savefig(path, dpi=100)
    return fig


def downstream_figure(report, path):
    """Success (return where success is undefined) against K, a line per model with 95%
    intervals; from_labels_only dashed; the ceiling, the recording policy and random as dashed
    levels, named at their right end. Beside it, each policy's top-1 of the true action on the
    held-out transitions. One legend below both."""
    key = "success" if report["success_defined"] else "return"
    ks = report["labels"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    baselines = report["baselines"]
    lines = [(name, [by_k[str(k)] for k in ks], "-o", by_k.get("note"))
             for name, by_k in report["models"].items()]
    lines.append(("from_labels_only", [baselines["from_labels_only"][str(k)] for k in ks], "--s",
                  None))
    for j, (name, points, style, note) in enumerate(lines):
        for ax, metric in zip(axes, (key, "val_action_top1")):
            y = [p[metric]["mean"] if metric == key else p[metric] for p in points]
            err = None
            if metric == key:
                err = [[p[key]["mean"] - p[key]["ci95"][0] for p in points],
                       [p[key]["ci95"][1] - p[key]["mean"] for p in points]]
            ax.errorbar(ks, y, yerr=err, fmt=style, capsize=3,
                        color="grey" if style == "--s" else f"C{j}",
                        label=name + (" (no latent action: = from_labels_only)" if note else ""))
    for ax, metric in zip(axes, (key, "val_action_top1")):
        levels = {}                              # one name tag per level: equal ones share it
        for j, name in enumerate(("all_true_actions", "recording_policy", "random")):
            b = baselines[name]
            value = b[key]["mean"] if metric == key else b.get(metric)
            if value is not None:
                ax.axhline(value, color="black", ls=("--", "-.", ":")[j], lw=1)
                levels.setdefault(round(value, 3), []).append(name)
        for value, names in levels.items():
            ax.annotate(f"{', '.join(names)} {value:.2f}", (1, value), fontsize=7,
                        xycoords=("axes fraction", "data"), xytext=(-3, 2),
                        textcoords="offset points", ha="right", va="bottom")
    axes[0].set(xscale="log", xlabel="labelled transitions K (log scale)",
                ylabel="success rate" if key == "success" else "return",
                title=f"{key} in {report['env'].split(':')[-1]}\n{report['rollouts']} "
                      f"episodes from unseen start seeds (95% CI)")
    axes[1].set(xscale="log", xlabel="labelled transitions K (log scale)",
                ylabel="top-1 of the true action",
                title=f"the policy's action against the true one\non "
                      f"{report['val_transitions']} transitions of held-out episodes")
    for ax in axes:
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.title.set_fontsize(10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
