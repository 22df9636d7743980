"""The comparison's pictures, drawn with matplotlib (compare_with_laq.py).

comparison_figure: example pairs, one per row, from distinct videos: current frame, target,
each model's reconstruction (VAE, LAQ, latent action models trained here), and their error
maps on one colour scale with a colour bar.
summary_figure: per-pair PSNR of the VAE against LAQ, LAQ's code usage, the VAE's KL per
latent dimension, rate against distortion, and probe accuracy with 95% intervals.
Both return the figure (for TensorBoard) after saving it.
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
    titles = ["current frame", "target frame", *(models[m] for m in names),
              *(f"|{models[m]} - target|" for m in names)]
    columns, rows, head = len(titles), len(examples), 0.2 + 0.17 * len(header)
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
                axes[r, c].set_title(titles[c], fontsize=9)
        for c, m in enumerate(names, start=2):
            axes[r, c].set_xlabel(example["scores"][m], fontsize=6)
    fig.text(0.01, 1 - 0.1 / height, "\n".join(header), fontsize=8, va="top")
    bar = fig.add_axes((0.935, 0.05, 0.012, 0.9 - head / height))
    fig.colorbar(shown, cax=bar).set_label("mean |error| over RGB, [0, 1] pixels", fontsize=8)
    fig.savefig(path, dpi=110)
    return fig


def _ci_bar(ax, x, summary, **kwargs):
    lo, hi = summary["ci95"]
    ax.errorbar(x, summary["mean"], yerr=[[summary["mean"] - lo], [hi - summary["mean"]]],
                capsize=4, **kwargs)


def summary_figure(report, rows, kl_per_dim, path):
    """The five summary plots of one comparison (probe panel only with --probe)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    ax = axes[0, 0]                                          # per-pair PSNR
    vae, laq = np.array([r["vae_psnr"] for r in rows]), np.array([r["laq_psnr"] for r in rows])
    ax.scatter(vae, laq, s=12, alpha=0.7)
    low, high = float(min(vae.min(), laq.min())) - 1, float(max(vae.max(), laq.max())) + 1
    ax.plot([low, high], [low, high], "k--", lw=1, label="equal PSNR")
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="VAE PSNR (dB)", ylabel="LAQ PSNR (dB)",
           title=f"per-pair PSNR ({len(rows)} pairs; above the line: LAQ better)")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0, 1]                                          # LAQ code usage
    codes = report["latent"]["laq"]
    ax.bar(range(len(codes["histogram"])), codes["histogram"])
    ax.set(xlabel="LAQ code index", ylabel="uses (over all positions and pairs)",
           title=f"LAQ codebook: {codes['unique_codes']}/{codes['codebook_size']} used, "
                 f"perplexity {codes['perplexity']:.2f}")

    ax = axes[0, 2]                                          # VAE KL per dimension
    if kl_per_dim is not None:
        kl = np.sort(np.asarray(kl_per_dim))[::-1] / np.log(2)
        ax.bar(range(len(kl)), kl, width=1.0)
        ax.set(xlabel="latent dimension (sorted)", ylabel="KL (bits)",
               title=f"VAE KL per dimension (total {kl.sum():.1f} bits)")
    else:
        ax.text(0.5, 0.5, "the VAE reports no Gaussian posterior", ha="center")
        ax.set_axis_off()

    ax = axes[1, 0]                                          # rate vs distortion
    rate, psnr = report["rate"], {m: report[m]["psnr"] for m in ("vae", "laq")}
    _ci_bar(ax, rate["vae"]["kl_bits_mean"], psnr["vae"], fmt="o", label="VAE: KL (bits)")
    _ci_bar(ax, rate["laq"]["code_entropy_joint_bits"], psnr["laq"], fmt="s",
            label="LAQ: joint code entropy (bits)")
    _ci_bar(ax, rate["laq"]["code_entropy_bits"], psnr["laq"], fmt="s", mfc="none",
            label="LAQ: bound, sum of per-position entropies")
    _ci_bar(ax, rate["laq"]["bound_bits"], psnr["laq"], fmt="^", mfc="none",
            label="LAQ: bound, code_seq_len x log2(codebook)")
    for b, style in (("copy_current", "--"), ("current_mean_colour", "-."),
                     ("oracle_mean_colour", ":")):
        if b in report.get("baselines", {}):
            ax.axhline(report["baselines"][b]["psnr"]["mean"], color="grey", ls=style,
                       label=f"baseline: {b.replace('_', ' ')}")
    for k, (m, label) in enumerate((m, label) for m, label in report["models"].items()
                                   if m not in ("vae", "laq")):
        bits = rate[m].get("kl_bits_mean", rate[m].get("code_entropy_joint_bits"))
        kind = ("no action" if rate[m].get("bound_bits") == 0 else
                "KL" if "kl_bits_mean" in rate[m] else "joint code entropy")
        _ci_bar(ax, bits, report[m]["psnr"], fmt="D", color=f"C{k + 3}",
                label=f"{label}: {kind}" + ("" if kind == "no action" else " (bits)"))
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="bits per pair spent on the target frame (log scale)",
           ylabel="PSNR (dB), mean with 95% CI",
           title="rate against distortion (LAQ also sees the current frame)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]                                          # probe
    probe = report.get("probe")
    if probe:
        names = list(probe["feature_sets"])
        for k, name in enumerate(names):
            _ci_bar(ax, k, probe["feature_sets"][name]["top1"], fmt="o", color="C0",
                    label="top-1" if k == 0 else None)
            if "top5" in probe["feature_sets"][name]:
                _ci_bar(ax, k + 0.15, probe["feature_sets"][name]["top5"], fmt="s", color="C1",
                        label="top-5" if k == 0 else None)
        ax.axhline(probe["chance"]["top1"], color="C0", ls=":", label="chance top-1")
        ax.axhline(probe["majority"]["top1"]["mean"], color="C0", ls="--", label="majority top-1")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set(ylim=(0, 1.02), ylabel="accuracy on val pairs (95% CI)",
               title=f"action probe ({probe['num_classes']} templates)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "action probe: run with --probe", ha="center")
        ax.set_axis_off()
    axes[1, 2].set_axis_off()
    lines = [wrapped for line in report["summary_lines"]
             for wrapped in textwrap.wrap(line, 60, subsequent_indent="  ")]
    axes[1, 2].text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig
