"""Downstream task success: LAPA's pipeline in miniature, on episodes recorded with their true
actions (record_episodes.py), scored in the environment they were recorded in.

    python downstream.py --episodes DIR --env ENV [--model CKPT ...] [--vae CKPT]
        [--laq CKPT --laq-repo DIR] --labels K [K ...] [--rollouts M] [--seed S] --output OUT

Per model (policies.py says how each network is trained):
1. latent labels of every transition (frame t, frame t + 1) of the train episodes from the
   frozen model: a latent action model's codes or Gaussian mean, LAQ's codes, the VAE's
   difference of posterior means; no true action is used;
2. a latent policy, current frame -> latent action, trained on all of them (latent pretraining);
3. an action decoder, (current frame, latent action) -> the environment's action, trained on K
   labelled transitions: whole train episodes drawn in a seeded order until K transitions
   (the same transitions for every model; a smaller K's inside a larger one's);
4. closed-loop rollouts from start seeds no recorded episode has: success rate (Wilson 95%
   interval) and return (bootstrap 95% interval), per model and K.
Baselines on the same K and start seeds: the same network trained on the K labelled
transitions alone (from_labels_only), on every train transition's true action
(all_true_actions, the ceiling), uniformly random actions, and the recording policy. Each
model at each K is tested against from_labels_only on the same episodes (McNemar's exact test
on success, a paired bootstrap on return; Holm over the family). A model without a latent
action (a no-action twin) has nothing to pretrain on: its row is from_labels_only.

Writes OUT/downstream.json (with the manifest), OUT/downstream.png (success against K, one
line per model, baselines dashed), OUT/downstream_episodes.csv (every policy's outcome on every
evaluation episode) and prints a table. docs/latent_actions.md ("Downstream") reads one run.
"""
import argparse
import os

from errors import run_main
from options import MATPLOTLIB, Formatter, check_exist, require

OUTPUTS = ("downstream.json", "downstream.png", "downstream_episodes.csv")
BASELINES = ("from_labels_only", "all_true_actions", "random", "recording_policy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--episodes", required=True, metavar="DIR",
                        help="episodes of record_episodes.py (frames, label files, actions.json)")
    parser.add_argument("--env", required=True,
                        help="the environment they were recorded in (minigrid:ID, atari:GAME)")
    parser.add_argument("--model", action="append", default=[], metavar="CKPT",
                        help="a latent action model trained here; repeatable")
    parser.add_argument("--vae", help="VAE checkpoint of this project (its latent action: the "
                                      "difference of its two posterior means)")
    parser.add_argument("--laq", help="LAQ checkpoint (any layout LAPA writes)")
    parser.add_argument("--laq-repo", help="folder containing laq_model/ (LAPA's laq/)")
    parser.add_argument("--laq-config", help="YAML of LatentActionQuantization arguments")
    parser.add_argument("--laq-weights", choices=["ema", "online"], default="ema")
    parser.add_argument("--laq-allow-unused-keys", action="store_true")
    parser.add_argument("--laq-resize", choices=["crop", "stretch"], default="stretch")
    parser.add_argument("--labels", type=int, nargs="+", required=True, metavar="K",
                        help="labelled transitions for the action decoder, one run per K")
    parser.add_argument("--rollouts", type=int, default=100,
                        help="evaluation episodes per policy")
    parser.add_argument("--max-steps", type=int,
                        help="steps per evaluation episode (default: the recording's "
                             "--max-steps, else the environment's own limit)")
    parser.add_argument("--steps", type=int, default=None,
                        help="Adam steps of each pretraining and from-labels baseline "
                             "(default: policies.STEPS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the labelled draw, every training and the evaluation "
                             "episodes")
    parser.add_argument("--workers", "-j", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="processes for the trainings and the rollouts")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="pairs per batch for the frozen models' latents")
    parser.add_argument("--index-cache-dir", default="",
                        help="where the frame index is cached (default: ~/.cache)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="for the frozen models (default: cuda when available); the "
                             "policies train on the CPU")
    parser.add_argument("--output", required=True, help="folder for the results")
    args = parser.parse_args(argv)
    if not (args.vae or args.laq or args.model):
        parser.error("nothing to score: give at least one model (--vae, --laq, --model)")
    for flag in ("laq_repo", "laq_config", "laq_allow_unused_keys"):
        if getattr(args, flag) and not args.laq:
            parser.error(f"--{flag.replace('_', '-')} needs --laq")
    if min(args.labels) < 1 or min(args.rollouts, args.workers, args.batch_size) < 1 or \
            min(args.max_steps or 1, args.steps or 1) < 1:
        parser.error("--labels, --rollouts, --workers, --batch-size, --max-steps and --steps "
                     "must be >= 1")
    args.labels = sorted(set(args.labels))
    return args


def read_recording(args):
    """(actions.json, rollouts.Setting, the recorded episodes' seeds, {train episode: sha1 of
    its first frame}) of --episodes, checked against --env."""
    import hashlib
    import json

    from errors import ConfigError, DataError
    from labels import read_label_ids
    from rollouts import Setting
    from simulators import ACTIONS, parse_env, read_actions
    actions = read_actions(os.path.join(args.episodes, ACTIONS))
    recorded = f"{actions.get('kind', 'minigrid')}:{actions['env']}"
    if parse_env(args.env) != parse_env(recorded):
        raise ConfigError(f"--env {args.env}: the episodes in {args.episodes} were recorded in "
                          f"{recorded}; policies are scored where they were recorded")
    settings = {}
    record = os.path.join(args.episodes, "record_episodes.json")
    if os.path.isfile(record):
        with open(record) as f:
            settings = json.load(f).get("settings", {})
    setting = Setting(recorded, int(actions["image_size"]), actions.get("frame_skip"),
                      args.max_steps or settings.get("max_steps"))
    starts = {}
    for vid in sorted(read_label_ids(args.episodes)["train"]):
        path = os.path.join(args.episodes, vid, "img_00001.jpg")
        try:
            with open(path, "rb") as f:
                starts[vid] = hashlib.sha1(f.read()).hexdigest()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    seeds = {int(e["seed"]) for e in actions["episodes"].values()}
    return actions, setting, seeds, starts


def load_models(args, device):
    """[Scored] of --vae, --model and --laq; {name: checkpoint path}; {name: settings}."""
    from compare_engine import AutoencoderScored
    from compare_report import run_settings
    from config import data_params_of
    from scored_models import load_laq_scored, load_latent_action_models, load_vae
    scored, files, settings = [], {}, {}
    if args.vae:
        vae, config = load_vae(args.vae, device)
        scored.append(AutoencoderScored(vae, (config["model_params"]["image_size"],
                                              data_params_of(config).resize)))
        files["vae"], settings["vae"] = os.path.abspath(args.vae), run_settings(config)
    models, model_files, model_settings, configs = load_latent_action_models(args.model, device)
    for config, s in zip(configs, models):
        if data_params_of(config).frame_offset != 1:
            print(f"note: {s.name} was trained on pairs {data_params_of(config).frame_offset} "
                  f"frames apart; its latents here are of consecutive frames")
    scored += models
    files.update(model_files)
    settings.update(model_settings)
    if args.laq:
        laq, config, _ = load_laq_scored(args, device)
        scored.append(laq)
        files["laq"] = os.path.abspath(args.laq)
        settings["laq"] = {"family": "LAQ", "seed": None, "settings": config}
    return scored, files, settings


def transitions(args, split, scored, view, device):
    """Every transition (frame t, t + 1) of the split's episodes: {"frames": uint8 (N, 3, S, S)
    current frames in the policies' `view`, "actions": (N,) true actions, "episodes": (N,),
    "latents": {model: [LatentAction per batch] or None}}."""
    import types

    import numpy as np
    import torch

    from pairs import Geometry, choose, pair_batches, split_pairs
    from parallel import progress
    from simulators import read_actions
    actions = read_actions(os.path.join(args.episodes, "actions.json"))["episodes"]
    where = types.SimpleNamespace(data_path=args.episodes, offset=1, pairs="exact",
                                  index_cache_dir=args.index_cache_dir)
    config = {"data_params": {"data_path": args.episodes}}
    dataset, positions, _, _ = split_pairs(where, config, split, clamp=False)
    pairs = choose(dataset, positions, len(positions), 0, "exact")      # all, in order
    geometry = Geometry({**{s.name: s.view for s in scored}, "policy": view})
    frames, latents = [], {s.name: [] for s in scored}
    kept = []
    with torch.no_grad():
        for batch in progress(pair_batches(pairs, geometry, args.batch_size, device),
                              total=-(-len(pairs) // args.batch_size), desc=f"latents ({split})"):
            frames.append(batch.raw[view][:, 0].cpu())
            kept += batch.pairs
            for s in scored:
                latents[s.name].append(s.latent_action(batch))
    return {"frames": torch.cat(frames),
            "actions": np.array([actions[p.video]["actions"][p.current_frame - 1] for p in kept]),
            "episodes": np.array([p.video for p in kept]),
            "latents": {name: None if any(a is None for a in v) else v
                        for name, v in latents.items()}}


def labelled_rows(episodes, ks, seed):
    """{K: rows of K labelled transitions}: whole episodes in a seeded order until K (the last
    one cut short), so a smaller K's rows are a larger one's first."""
    import numpy as np
    order = np.random.default_rng([seed, 1]).permutation(np.unique(episodes))
    rows = np.concatenate([np.flatnonzero(episodes == e) for e in order])
    return {k: rows[:k] for k in ks if k <= len(rows)}, len(rows)


def train(job):
    """One pretraining in a worker process: (name, frames uint8, policies.Latents, seed,
    steps)."""
    import torch

    from policies import pretrain
    torch.set_num_threads(1)                  # one process per core, the same in every process
    name, frames, labels, seed, steps = job
    return name, pretrain(torch.from_numpy(frames), labels, seed, steps)


def learn_policies(args, scored, data, ks):
    """{policy name: LearnedPolicy} ("{model}@{K}", "from_labels_only@{K}", "all_true_actions")
    and {model: note} for models without a latent action."""
    from policies import LearnedPolicy, Latents, features_of, fit_decoder, one_code
    from parallel import ordered_map, process_pool
    import torch

    from policies import STEPS
    torch.set_num_threads(1)    # every policy computes on one thread: -j changes speed only
    frames, actions = data["frames"].numpy(), data["actions"]
    num_actions, steps = data["num_actions"], args.steps or STEPS
    rows = data["labelled"]
    jobs = [("all_true_actions", frames, one_code(actions, num_actions), args.seed, steps)]
    jobs += [(f"from_labels_only@{k}", frames[r], one_code(actions[r], num_actions), args.seed,
              steps) for k, r in rows.items()]
    labels, notes = {}, {}
    for s in scored:
        if data["latents"][s.name] is None:
            notes[s.name] = ("no latent action: nothing to pretrain on; its row is "
                             "from_labels_only")
            continue
        labels[s.name] = Latents.of(data["latents"][s.name])
        jobs.append((s.name, frames, labels[s.name], args.seed, steps))
    with process_pool(args.workers) as pool:
        trained = dict(ordered_map(pool, train, [(j,) for j in jobs], ahead=len(jobs)))
    policies = {name: LearnedPolicy(*trained[name]) for name in trained
                if name in BASELINES or "@" in name}
    for name, latents in labels.items():
        trunk, head = trained[name]
        for k, r in rows.items():
            decoder = fit_decoder(features_of(trunk, data["frames"][r]),
                                  latents.take(r).decoder_input(), actions[r], num_actions,
                                  args.seed)
            policies[f"{name}@{k}"] = LearnedPolicy(trunk, head, decoder, latents)
    for name in notes:
        policies.update({f"{name}@{k}": policies[f"from_labels_only@{k}"] for k in rows})
    return policies, notes, {name: describe(latents) for name, latents in labels.items()}


def describe(latents):
    if latents.codes is not None:
        return f"codes: {latents.codes.shape[1]} of {latents.classes}"
    return f"vector: {latents.vector.shape[1]} dimensions, standardised"


def paired_tests(outcomes, names, ks):
    """Each model at each K against from_labels_only at that K on the same episodes."""
    import numpy as np

    from stats import add_holm, mcnemar, paired_difference
    tests = {}
    for name in names:
        for k in ks:
            mine, base = outcomes[f"{name}@{k}"], outcomes[f"from_labels_only@{k}"]
            test = {"return": paired_difference([o.episode_return for o in mine],
                                                [o.episode_return for o in base],
                                                np.arange(len(mine)))}
            if mine[0].success is not None:
                test["success"] = {**mcnemar([o.success for o in mine], [o.success for o in base]),
                                   "mean_difference": float(np.mean([o.success for o in mine])
                                                            - np.mean([o.success for o in base]))}
            tests[name, k] = test
    key = "success" if all("success" in t for t in tests.values()) else "return"
    add_holm(t[key] for t in tests.values())
    return tests, key


def write_episodes(path, outcomes, seeds):
    import csv

    from files import atomic_write
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "episode", "env_seed", "policy_seed", "success", "return",
                         "steps", "start_seen_in_train"])
        for name, out in outcomes.items():
            for i, (o, (env_seed, policy_seed)) in enumerate(zip(out, seeds)):
                writer.writerow([name, i, env_seed, policy_seed, o.success, o.episode_return,
                                 o.steps, o.seen])


def print_table(report):
    ks = [str(k) for k in report["labels"]]
    key = "success" if report["success_defined"] else "return"
    print(f"\n{key} over {report['rollouts']} evaluation episodes of {report['env']} "
          f"(start seeds no recorded episode has), [95% CI]; K: labelled transitions")

    def cell(r):
        s = r[key]
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    w = max(20, *(len(n) for n in report["models"]))
    print(f"{'policy':<{w}} " + " ".join(f"K={k}".rjust(24) for k in ks))
    for name, by_k in report["models"].items():
        print(f"{name:<{w}} " + " ".join(f"{cell(by_k[k]):>24}" for k in ks)
              + (f"   ({by_k['note']})" if by_k.get("note") else ""))
    b = report["baselines"]
    print(f"{'from_labels_only':<{w}} " + " ".join(f"{cell(b['from_labels_only'][k]):>24}"
                                                   for k in ks))
    for name in ("all_true_actions", "recording_policy", "random"):
        print(f"{name:<{w}} {cell(b[name]):>24}")
    print(f"\n{key} minus from_labels_only at the same K, same episodes (Holm-adjusted p, "
          f"{report['paired']['holm_family']})")
    for name, by_k in report["models"].items():
        if by_k.get("note"):
            continue
        cells = []
        for k in ks:
            t = by_k[k]["minus_from_labels_only"][key]
            cells.append(f"{t['mean_difference']:+.3f} (p {t['p_holm']:.3g})".rjust(24))
        print(f"{name:<{w}} " + " ".join(cells))
    starts = report["start_states"]
    print(f"evaluation start frames also a train episode's start frame: "
          f"{starts['seen_in_train']:.1%} ({starts['distinct']} distinct starts of "
          f"{report['rollouts']} episodes)")


def main(args):
    check_exist(args, "--episodes", "--vae", "--model", "--laq", "--laq-repo", "--laq-config")
    require(MATPLOTLIB)
    from runtime import pick_device
    read_recording(args)                          # a wrong folder or --env before the models
    device = pick_device(args.device, gpus=-1)
    run(args, *load_models(args, device), device)


def run(args, scored, files, settings, device):
    """The downstream loop for `scored` (compare_engine Scored objects with latent_action);
    writes the outputs and returns downstream.json's content."""
    import time

    import numpy as np

    from evaluation import start_outputs
    from errors import exit_bad_input
    from files import atomic_write
    from manifest import manifest
    from plots import downstream_figure
    from rollouts import evaluation_seeds, rollouts, summary
    from simulators import Policy, Simulator
    actions, setting, recorded, starts = read_recording(args)
    sim = Simulator(setting.env, setting.image_size, setting.frame_skip)      # fails fast
    action_names = sim.action_names
    num_actions = len(action_names)
    sim.close()
    if setting.image_size < 8:
        exit_bad_input(f"the episodes' frames are {setting.image_size} px: the policies need "
                       f"at least 8 (one patch)")
    start_outputs(args.output, OUTPUTS)
    timings, clock = {}, time.perf_counter()
    view = (setting.image_size, "stretch")
    data = transitions(args, "train", scored, view, device)
    data["num_actions"] = num_actions
    data["labelled"], available = labelled_rows(data["episodes"], args.labels, args.seed)
    too_many = [k for k in args.labels if k not in data["labelled"]]
    if too_many:
        exit_bad_input(f"--labels {' '.join(map(str, too_many))}: more than the {available} "
                       f"train transitions of {args.episodes}")
    val = transitions(args, "val", [], view, device)
    timings["latents_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    policies, notes, latent_kinds = learn_policies(args, scored, data, args.labels)
    timings["training_s"] = time.perf_counter() - clock
    seeds, skipped = evaluation_seeds(args.seed, args.rollouts, recorded)
    players = {name: p for name, p in policies.items()
               if not any(name.startswith(f"{n}@") for n in notes)}     # copies: not run twice
    players["random"] = Policy("random", num_actions)
    players["recording_policy"] = Policy(actions.get("policy", "random"), num_actions,
                                         actions.get("epsilon", 0.0), actions.get("sticky", 0.0))
    clock = time.perf_counter()
    outcomes = rollouts(setting, players, seeds, args.workers)
    timings["rollouts_s"] = time.perf_counter() - clock
    train_starts = set(starts.values())
    for out in outcomes.values():
        out[:] = [o._replace(seen=o.start in train_starts) for o in out]
    for name in notes:
        outcomes.update({f"{name}@{k}": outcomes[f"from_labels_only@{k}"] for k in args.labels})

    def scored_policy(name):
        out = {**summary(outcomes[name])}
        if name in policies:
            out["val_action_top1"] = float(np.mean(policies[name].actions(val["frames"])
                                                   == val["actions"]))
        return out
    names = [s.name for s in scored]
    tests, family = paired_tests(outcomes, [n for n in names if n not in notes], args.labels)
    success_defined = outcomes["random"][0].success is not None
    report = {
        "env": setting.env, "episodes": os.path.abspath(args.episodes),
        "eval_seeds": [s for s, _ in seeds], "eval_policy_seeds": [p for _, p in seeds],
        "eval_seeds_passed_over": skipped, "rollouts": args.rollouts,
        "max_steps": setting.max_steps, "labels": args.labels, "seed": args.seed,
        "success_defined": success_defined,
        "labelled": {str(k): {"transitions": int(len(r)),
                              "episodes": int(len(np.unique(data["episodes"][r]))),
                              "actions_seen": int(len(np.unique(data["actions"][r])))}
                     for k, r in data["labelled"].items()},
        "train_transitions": int(len(data["actions"])),
        "train_episodes": int(len(np.unique(data["episodes"]))),
        "val_transitions": int(len(val["actions"])),
        "action_names": action_names,
        "models": {}, "latents": latent_kinds,
        "baselines": {"from_labels_only": {str(k): scored_policy(f"from_labels_only@{k}")
                                           for k in args.labels},
                      **{b: scored_policy(b) for b in BASELINES[1:]}},
        "paired": {"against": "from_labels_only at the same K, on the same episodes",
                   "holm_family": f"{family}: every model with a latent action at every K", "tests": {}},
        "start_states": {
            "seen_in_train": float(np.mean([o.seen for o in outcomes["random"]])),
            "distinct": len({o.start for o in outcomes["random"]}),
            "note": "evaluation start seeds are never a recorded episode's; a start frame can "
                    "still be one a train episode began from where the environment has few "
                    "start states"},
        "settings": {"policies": policy_settings(args.steps), "files": files,
                     "models": settings},
        "timings": timings, "workers": args.workers}
    for name in names:
        report["models"][name] = {str(k): {**scored_policy(f"{name}@{k}"),
                                           **({"minus_from_labels_only": tests[name, k]}
                                              if (name, k) in tests else {})}
                                  for k in args.labels}
        if name in notes:
            report["models"][name]["note"] = notes[name]
    report["manifest"] = manifest(files={**files, "actions": os.path.join(args.episodes,
                                                                          "actions.json")},
                                  labels_dir=args.episodes)
    import json
    with atomic_write(os.path.join(args.output, "downstream.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_episodes(os.path.join(args.output, "downstream_episodes.csv"), outcomes, seeds)
    downstream_figure(report, os.path.join(args.output, "downstream.png"))
    print_table(report)
    print(f"\nwrote {args.output}/downstream.json, downstream.png, downstream_episodes.csv "
          f"({sum(timings.values()):.0f} s: latents {timings['latents_s']:.0f}, training "
          f"{timings['training_s']:.0f}, rollouts {timings['rollouts_s']:.0f})")
    return report


def policy_settings(steps):
    import policies
    out = {k.lower(): getattr(policies, k) for k in ("FEATURES", "PATCH", "STEPS", "BATCH",
                                                     "LR", "DECODER_STEPS", "DECODER_HIDDEN")}
    return {**out, "steps": steps or policies.STEPS}


if __name__ == "__main__":
    ARGS = parse_args()     # --help and usage errors answer before torch is imported
    run_main(lambda: main(ARGS))
