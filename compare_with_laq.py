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
import os
import time

from errors import run_main
from true_action import DRAWS, FRACTIONS
from options import (MATPLOTLIB, SKLEARN, Formatter, add_fid_arguments, add_lpips_arguments,
                     check_exist, fid_label, lpips_label, require)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--vae", help="VAE checkpoint of this project")
    parser.add_argument("--laq", help="LAQ checkpoint (any layout LAPA writes)")
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
    parser.add_argument("--split-config", metavar="YAML",
                        help="a config of this project whose data_params define the split "
                             "(default: the VAE run's, else the first --model's)")
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="the split of the VAE run the pairs come from")
    parser.add_argument("--num-pairs", type=int, default=64, help="pairs scored (--data-path)")
    parser.add_argument("--offset", type=int, default=30, help="frames between the pair (LAPA: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the pairs")
    parser.add_argument("--pairs", choices=["laq", "exact"], default="laq",
                        help="laq: one pair per video drawn as LAQ's loader draws its training "
                             "pairs (LAQ's operating point); exact: every (t, t + offset) pair "
                             "inside a video equally likely")
    parser.add_argument("--keep-identity-pairs", action="store_true",
                        help="score pairs whose future frame is clamped onto the current one "
                             "(offset past a video's end) with the rest; by default they are "
                             "counted and reported apart (identity_pairs)")
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
    parser.add_argument("--probe-pairs", type=int,
                        help="pairs per split for the probes (train split -> val split; "
                             "default: 500 for --probe, every pair for --actions)")
    parser.add_argument("--actions", metavar="FILE",
                        help="actions.json of record_episodes.py: probe every latent for the "
                             "true action of each pair, from few labels (probe.json: "
                             "true_action)")
    parser.add_argument("--action-fractions", type=float, nargs="+", default=list(FRACTIONS),
                        metavar="F", help="shares of the train episodes' pairs labelled")
    parser.add_argument("--action-draws", type=int, default=DRAWS,
                        help="draws of the labelled episodes per fraction below 1")
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
    if not (args.vae or args.laq or args.model):
        parser.error("nothing to compare: give at least one model (--vae, --laq, --model)")
    for flag in ("laq_repo", "laq_config", "laq_allow_unused_keys"):
        if getattr(args, flag) and not args.laq:
            parser.error(f"--{flag.replace('_', '-')} needs --laq")
    if args.vae_resize and not args.vae:
        parser.error("--vae-resize needs --vae")
    if args.data_path and not (args.vae or args.model or args.split_config):
        parser.error("--data-path with only --laq: name the split with --split-config YAML "
                     "(a config of this project, e.g. config_vae_sthv2.yaml)")
    if min(args.num_pairs, args.offset, args.batch_size, args.probe_pairs or 1,
           args.action_draws) < 1:
        parser.error("--num-pairs, --offset, --batch-size, --probe-pairs and --action-draws "
                     "must be >= 1")
    if not all(0 < f <= 1 for f in args.action_fractions):
        parser.error("--action-fractions must be in (0, 1]")
    for flag in ("probe", "actions"):
        if getattr(args, flag) and not args.data_path:
            parser.error(f"--{flag} needs --data-path (pairs from the train and val splits"
                         + (": the recorded episodes' folder)" if flag == "actions" else ")"))
    return args


OUTPUTS = ("metrics.json", "per_pair.csv", "probe.json", "comparison.png", "plots.png")


def split_config(args, vae_config, model_configs):
    """The config whose data_params define the split the pairs come from: --split-config, else
    the VAE run's, else the first --model's (None for --image / --frames)."""
    if args.split_config:
        from config import load_config
        return load_config(args.split_config, check_paths=False).to_dict()
    return vae_config or (model_configs[0] if model_configs else None)


def laq_twins(extras, laq_config, laq_view):
    """An Agreement for each --model that computes LAQ's function at --laq's sizes and is fed
    as LAQ is (a converted LAQ checkpoint is one): it is checked against LAQ itself."""
    from compare_engine import Agreement
    return [Agreement(s.name) for s in extras
            if getattr(s.model, "architecture", None) == "laq"
            and s.model.bottleneck_name == "nsvq" and s.view == laq_view
            and all(getattr(s.model, k) == laq_config[k]
                    for k in ("code_seq_len", "codebook_size", "quant_dim"))]


def probe_sets(args, scored, run_config, geometry, device, pairs_how, n, references=()):
    """{split: (pairs kept, features {set: (n, d)})} of the train and val splits for a probe:
    `n` pairs per split (None: every pair), drawn as `pairs_how`, less identity pairs and the
    videos LAQ trained on (val); the models' features, then the `references`'."""
    from compare_engine import probe_features
    from pairs import choose, read_video_ids, split_identity, split_pairs
    from probe import FeatureCache
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    sets = {}
    for split, seed, skip in (("train", args.seed + 1, set()), ("val", args.seed + 2, exclude)):
        pairs_ds, positions, _, _ = split_pairs(args, run_config, split, skip,
                                                clamp=pairs_how == "laq")
        pairs = choose(pairs_ds, positions, n or len(positions), seed, pairs_how)
        pairs = split_identity(pairs, args.keep_identity_pairs)[0]
        cache = FeatureCache(os.path.join(args.output, "probe_cache"), {
            **{k: (os.path.abspath(f), os.path.getmtime(f)) for k, f in
               (("vae", args.vae), ("laq", args.laq)) if f},
            "pairs": [(p.current, p.target) for p in pairs], "geometry": geometry.describe(),
            "laq_weights": args.laq_weights, "features": 2, "batch_size": args.batch_size,
            "references": [r.name for r in references],
            "models": [(os.path.abspath(p), os.path.getmtime(p)) for p in args.model]})
        features, kept = probe_features([*(s for s in scored if s.is_model), *references],
                                        pairs, geometry, args.batch_size, device, cache, split)
        sets[split] = [pairs[i] for i in kept], features
    return sets


def action_probe(args, scored, run_config, geometry, device, templates):
    """Train-split pairs -> val-split pairs linear probe of the action template (probe.py) on
    every model's frozen features; `templates`: {video id: template} as labels_of read them
    ({} when the files are missing)."""
    import numpy as np

    from config import data_params_of
    from labels import read_templates
    from probe import run_probe
    d = data_params_of(run_config, data_path=args.data_path)
    templates = templates or read_templates(d.labels_path or d.data_path)   # names what is missing
    classes = {t: c for c, t in enumerate(sorted(set(templates.values())))}
    sets = {}
    for split, (pairs, features) in probe_sets(args, scored, run_config, geometry, device,
                                               args.pairs, args.probe_pairs or 500).items():
        labels = np.array([classes.get(templates.get(p.video), -1) for p in pairs])
        videos = np.array([str(p.video) for p in pairs])
        known = labels >= 0
        sets[split] = ({n: x[known] for n, x in features.items()}, labels[known], videos[known])
    report = run_probe(sets["train"], sets["val"], len(classes), seed=args.seed)
    report["offset"], report["labels"] = args.offset, d.labels_path or d.data_path
    return report


def true_action_probe(args, scored, run_config, geometry, device):
    """The probe of the recorded true action (true_action.py) on every pair (t, t + offset)
    inside the train and the held-out episodes."""
    import numpy as np

    from compare_engine import PairPixels
    from simulators import read_actions
    from true_action import pair_classes, true_action_probe
    actions = read_actions(args.actions)
    sets, names = {}, {}
    for split, (pairs, features) in probe_sets(args, scored, run_config, geometry, device,
                                               "exact", args.probe_pairs,
                                               [PairPixels()]).items():
        sets[split] = pair_classes(actions, pairs, actions["action_names"]), pairs, features
    for split in ("train", "val"):              # class numbers in order of first appearance
        names.update((c, len(names)) for c in sets[split][0] if c not in names)
    train, test = ((features, np.array([names[c] for c in classes]),
                    np.array([p.video for p in pairs]))
                   for classes, pairs, features in (sets["train"], sets["val"]))
    report = true_action_probe(train, test, list(names), args.action_fractions,
                               args.action_draws, args.seed)
    return {"actions": os.path.abspath(args.actions), "env": actions["env"],
            "offset": args.offset, "pairs": "exact", **report}


def main(args):
    check_exist(args, "--vae", "--laq", "--laq-repo", "--laq-config", "--model", "--image",
                "--frames", "--data-path", "--laq-train-videos", "--split-config",
                "--actions")   # inputs, then weight files
    require(MATPLOTLIB, *([SKLEARN] if args.probe or args.actions else []))  # before the work
    if (args.image or args.frames) and args.fid != "none":
        args.fid = "none"           # a Frechet distance needs many images, not one pair
        print("note: rFID is skipped for a single pair (--image / --frames)")
    from compare_engine import AutoencoderScored, baselines, compare
    from compare_report import build_report, identity_report, print_table, run_settings, \
        summary_lines, write_outputs
    from config import data_params_of
    from errors import exit_bad_input
    from evaluation import start_outputs
    from manifest import manifest
    from metrics import ImageMetrics, build_fid
    from pairs import Geometry, figure_picks, frame_pairs, labels_of, split_identity
    from runtime import pick_device
    from scored_models import load_laq_scored, load_latent_action_models, load_vae
    from stats import CI_METHOD

    device = pick_device(args.device, gpus=-1)
    metrics = ImageMetrics(device, args.lpips_net, args.lpips_random_backbone)  # fail fast
    fid = build_fid(args, device)
    vae, vae_config = load_vae(args.vae, device) if args.vae else (None, None)
    extras, extra_files, extra_settings, extra_configs = load_latent_action_models(args.model,
                                                                                   device)
    laq, config, key_report = load_laq_scored(args, device) if args.laq else (None, None, None)
    run_config = split_config(args, vae_config, extra_configs)
    pairs, inputs, index = frame_pairs(args, run_config)
    pairs, identity = split_identity(pairs, args.keep_identity_pairs)
    if not pairs:
        exit_bad_input(f"every one of the {len(identity)} pairs has its future frame clamped "
                       f"onto the current one (offset past the videos' ends): lower --offset, "
                       f"or score them with --keep-identity-pairs")
    models, agreements = [], []
    if vae:
        models.append(AutoencoderScored(vae, (vae_config["model_params"]["image_size"],
                                              args.vae_resize
                                              or data_params_of(vae_config).resize)))
    if laq:
        models.append(laq)
        agreements = laq_twins(extras, config, laq.view)
    models += extras
    geometry = Geometry({s.name: s.view for s in models})
    scored = [*models, *baselines(models)]
    start_outputs(args.output, OUTPUTS)       # an interrupted run leaves no mix of two runs
    start = time.perf_counter()
    rows, latents, codes, examples = compare(scored, pairs, metrics, fid, geometry,
                                             args.batch_size, device, figure_picks(pairs),
                                             args.controllability != "none", agreements)
    seconds = time.perf_counter() - start
    if not rows:
        exit_bad_input("none of the frame pairs could be read")
    identity_rows = compare(scored, identity, metrics, None, geometry, args.batch_size, device,
                            controllability=False)[0] if identity else []
    templates = labels_of(run_config, args) if args.data_path else {}
    for row in rows + identity_rows:
        row["label"] = templates.get(row["video"], "")
    grey = {s.name: s.channels for s in extras if s.channels != 3}
    report = {
        "pairs": len(rows), "inputs": inputs, "models": {s.name: s.label for s in scored
                                                         if s.is_model},
        **geometry.describe(), "ci_method": CI_METHOD, "lpips_net": lpips_label(args),
        **({"channels": grey, "one_channel": "grey models are fed PIL's luminance of the "
            "frames; their predictions, repeated to 3 channels, are scored on the colour "
            "target"} if grey else {}),
        **build_report(rows, scored, latents, codes, metrics.names,
                       {} if metrics.lpips else {"lpips": "skipped with --lpips-net none"},
                       fid, fid_label(args)),
        "checkpoints": {**({"vae": os.path.abspath(args.vae)} if vae else {}),
                        **({"laq": os.path.abspath(args.laq), "laq_keys": key_report,
                            "laq_weights": args.laq_weights} if laq else {}),
                        "models": extra_files},
        "device": str(device),
        "settings": {**({"vae": run_settings(vae_config)} if vae else {}),
                     **({"laq": {"family": "LAQ", "seed": None, "settings": config}}
                        if laq else {}),
                     **extra_settings},
        "pairs_per_sec": len(rows) / seconds}
    if laq:
        report["laq_config"], report["laq_passes"] = config, laq.runner.passes
    report["identity_pairs"] = identity_report(rows, identity_rows, scored,
                                               args.keep_identity_pairs)
    if agreements:
        report["laq_agreement"] = {a.model: a.report() for a in agreements}
    if args.probe:
        report["probe"] = action_probe(args, scored, run_config, geometry, device, templates)
    if args.actions:
        report.setdefault("probe", {})["true_action"] = true_action_probe(
            args, scored, run_config, geometry, device)
    d = data_params_of(run_config or {}, data_path=args.data_path)
    report["manifest"] = manifest(
        files={**{k: f for k, f in (("vae", args.vae), ("laq", args.laq),
                                    ("actions", args.actions)) if f},
               **extra_files}, index=index,
        labels_dir=(d.labels_path or d.data_path) if args.data_path else None,
        laq_repo=os.path.dirname(key_report["package"]) if laq else None)
    if report.get("probe"):
        report["probe"]["manifest"] = report["manifest"]
    report["summary_lines"] = summary_lines(report)
    write_outputs(args, report, rows, examples,
                  (report["latent"].get("vae") or {}).get("kl_per_dim"), identity_rows)
    if inputs.get("note"):
        print(f"note: {inputs['note']}")
    print_table(report, metrics.names)
    if args.probe:
        from probe import print_probe
        print_probe(report["probe"])
    if args.actions:
        from true_action import print_true_action
        print_true_action(report["probe"]["true_action"])
    for name, a in report.get("laq_agreement", {}).items():
        print(f"\n{name} against LAQ run by LAPA's code: code sequences identical on "
              f"{a['code_sequences_identical']:.1%} of {a['pairs']} pairs, predictions within "
              f"{a['prediction_max_abs_diff']:.2g} (max |difference|): "
              + ("they agree" if a["agree"] else "they DIFFER (is it a conversion of this "
                 "--laq checkpoint?)"))
    print(f"\nwrote {args.output}/comparison.png, plots.png, metrics.json, per_pair.csv"
          + (", probe.json" if report.get("probe") else ""))


if __name__ == "__main__":
    ARGS = parse_args()     # --help and usage errors answer before torch is imported
    run_main(lambda: main(ARGS))
