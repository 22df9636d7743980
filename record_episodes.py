"""Episodes recorded from a simulator with their true actions, in the frames layout everything
here reads, for the true-action probe (compare_with_laq.py --actions) and downstream.py.

    python record_episodes.py --env minigrid:MiniGrid-Empty-Random-6x6-v0 --episodes 600 \
        --policy expert --epsilon 0.25 --image-size 48 --out data/minigrid
    python record_episodes.py --env atari:Breakout --episodes 100 --max-steps 200 --out data/breakout
    python record_episodes.py --verify data/minigrid        # replay every episode, compare frames

OUT/<episode id>/img_00001.jpg ... (one frame per recorded step, the first from reset), the two
SthV2 label files (each episode in one split; its template and label: the task, MiniGrid's
mission or the game), and OUT/actions.json: the environment, its action names and, per episode,
the seeds, the action taken between frame t and frame t + 1, the rewards and how it ended. The
same command gives the same files: each episode's seeds follow from --seed and its index, and
replaying its actions from its seed gives its frames again (--verify checks it).

A killed run (kill -9 included) resumes where it stopped when run again with the same
arguments: an episode's folder appears whole (renamed from a temporary folder) and its record
beside the other resume state; actions.json, the label files and record_episodes.json are
written last, once every episode is there.
"""
import argparse
import json
import os
import shutil

import numpy as np

from errors import DataError, RunFailed, run_main
from files import atomic_dir, atomic_write, remove_stale_temps
from labels import LABEL_FILES
from options import about
from output_folder import OutputFolder
from parallel import ordered_map, process_pool, progress
from simulators import ACTIONS, read_actions

STATE = ".record_episodes"
RECORD = "record_episodes.json"
FRAME_NAME = "img_{:05d}.jpg"

_simulators = {}                          # per process: one simulator per setting


def simulator(settings):
    from simulators import Simulator
    key = (settings["env"], settings["image_size"], settings["frame_skip"])
    if key not in _simulators:
        _simulators[key] = Simulator(*key)
    return _simulators[key]


def episode_id(index):
    return f"{index:06d}"


def record_episode(index, settings, out):
    """Play and write episode `index`; returns (id, its actions.json entry)."""
    from simulators import Policy, encode_frame, episode_seeds, play
    sim = simulator(settings)
    env_seed, policy_seed = episode_seeds(settings["seed"], index)
    policy = Policy(settings["policy"], len(sim.action_names), settings["epsilon"],
                    settings["sticky"])
    policy.start(policy_seed)
    episode = play(sim, env_seed, policy, settings["max_steps"])
    vid = episode_id(index)
    with atomic_dir(os.path.join(out, vid)) as folder:
        for t, frame in enumerate(episode.frames, start=1):
            with open(os.path.join(folder, FRAME_NAME.format(t)), "wb") as f:
                f.write(encode_frame(frame))
    entry = {"seed": env_seed, "policy_seed": policy_seed, "task": sim.task,
             "actions": episode.actions, "rewards": episode.rewards,
             "terminated": episode.terminated, "truncated": episode.truncated,
             "frames": len(episode.frames), "return": float(sum(episode.rewards))}
    if sim.kind == "minigrid":            # MiniGrid rewards only reaching the goal
        entry["success"] = bool(episode.terminated and entry["return"] > 0)
    with atomic_write(os.path.join(out, STATE, "episodes", f"{vid}.json"), "w") as f:
        json.dump(entry, f)
    return vid, entry


def recorded(out, vid):
    """An episode's entry if both its folder and its record are there (a kill between the two
    leaves one: the episode is recorded again, the same)."""
    path = os.path.join(out, STATE, "episodes", f"{vid}.json")
    if not (os.path.isdir(os.path.join(out, vid)) and os.path.isfile(path)):
        return None
    with open(path) as f:
        return json.load(f)


def val_episodes(n, val_fraction, seed):
    """Which episodes go to the validation split: a seeded draw of round(n * val_fraction)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    return set(order[:max(1, round(n * val_fraction))].tolist()) if n > 1 else set()


def write_labels(out, entries, val):
    for split, name in LABEL_FILES.items():
        rows = [{"id": vid, "label": e["task"], "template": e["task"], "placeholders": []}
                for i, (vid, e) in enumerate(entries.items()) if (i in val) == (split == "val")]
        with atomic_write(os.path.join(out, name), "w") as f:
            json.dump(rows, f, indent=1)


def record(settings, out, workers=1):
    """Record settings["episodes"] episodes into OUT (resuming a killed run); returns the
    summary."""
    from simulators import Policy, Simulator, episode_seeds, versions
    folder = OutputFolder(out, STATE, RECORD, "record_episodes.py")
    finished = folder.finished_with(settings, "recorded")
    if finished is not None:
        return {**finished, "already_complete": True}
    if os.path.isfile(os.path.join(out, ACTIONS)):
        raise DataError(f"{out} already holds an {ACTIONS} that is not this program's "
                        f"finished recording; use another --out")
    sim = Simulator(settings["env"], settings["image_size"], settings["frame_skip"])  # checks
    sim.reset(episode_seeds(settings["seed"], 0)[0])
    Policy(settings["policy"], len(sim.action_names)).check(sim)          # before any file
    os.makedirs(os.path.join(out, STATE, "episodes"), exist_ok=True)
    with folder.lock() as held:
        remove_stale_temps(out)
        folder.keep_settings(settings)
        n = settings["episodes"]
        entries = {episode_id(i): recorded(out, episode_id(i)) for i in range(n)}
        todo = [i for i in range(n) if entries[episode_id(i)] is None]
        for i in todo:                     # a folder without its record: recorded again
            shutil.rmtree(os.path.join(out, episode_id(i)), ignore_errors=True)
        bar = progress(total=n, initial=n - len(todo), unit="episode", desc="episodes")
        with process_pool(workers, close_fds=[held.fileno()]) as pool:
            for vid, entry in ordered_map(pool, record_episode,
                                          [(i, settings, out) for i in todo], 4 * workers):
                entries[vid] = entry
                bar.update(1)
                bar.set_postfix(steps=len(entry["actions"]), refresh=False)
        bar.close()
        val = val_episodes(n, settings["val_fraction"], settings["seed"])
        write_labels(out, entries, val)
        actions = {"env": sim.env_id, "kind": sim.kind, "action_names": sim.action_names,
                   "frame_skip": sim.frame_skip, "image_size": settings["image_size"],
                   "policy": settings["policy"], "epsilon": settings["epsilon"],
                   "sticky": settings["sticky"], "versions": versions(sim.kind),
                   "episodes": {vid: {**e, "split": "val" if i in val else "train"}
                                for i, (vid, e) in enumerate(entries.items())}}
        with atomic_write(os.path.join(out, ACTIONS), "w") as f:
            json.dump(actions, f)
        summary = summarize(settings, actions)
        folder.finish(summary)
        shutil.rmtree(os.path.join(out, STATE))
    sim.close()
    return summary


def summarize(settings, actions):
    episodes = actions["episodes"].values()
    steps = [len(e["actions"]) for e in episodes]
    counts = np.bincount([a for e in episodes for a in e["actions"]],
                         minlength=len(actions["action_names"]))
    out = {"settings": settings, "episodes": len(steps), "transitions": int(sum(steps)),
           "steps_per_episode": {"mean": float(np.mean(steps)), "min": int(min(steps)),
                                 "max": int(max(steps))},
           "val_episodes": sum(e["split"] == "val" for e in episodes),
           "mean_return": float(np.mean([e["return"] for e in episodes])),
           "action_counts": dict(zip(actions["action_names"], counts.tolist())),
           "versions": actions["versions"]}
    if all("success" in e for e in episodes):
        out["success_rate"] = float(np.mean([e["success"] for e in episodes]))
    return out


def verify(out):
    """Replay every episode's actions from its seed; returns the ids whose frames differ."""
    from simulators import encode_frame, replay
    actions = read_actions(os.path.join(out, ACTIONS))
    with open(os.path.join(out, RECORD)) as f:
        settings = json.load(f)["settings"]
    differ = []
    for vid, e in progress(actions["episodes"].items(), desc="replaying", unit="episode"):
        frames = replay(simulator(settings), e["seed"], e["actions"])
        for t, frame in enumerate(frames, start=1):
            with open(os.path.join(out, vid, FRAME_NAME.format(t)), "rb") as f:
                if f.read() != encode_frame(frame):
                    differ.append(vid)
                    break
    return differ, len(actions["episodes"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--env", help="minigrid:ENV_ID (e.g. MiniGrid-Empty-Random-6x6-v0) or "
                                      "atari:GAME (e.g. Breakout)")
    parser.add_argument("--episodes", type=int)
    parser.add_argument("--out")
    parser.add_argument("--verify", metavar="DIR",
                        help="replay a finished recording and compare every frame")
    parser.add_argument("--max-steps", type=int,
                        help="recorded steps per episode at most (default: the env's own limit)")
    parser.add_argument("--policy", choices=["random", "expert"],
                        help="expert (MiniGrid: a shortest path to the goal) or random "
                             "(default: expert for MiniGrid, random for Atari)")
    parser.add_argument("--epsilon", type=float, default=0.2,
                        help="expert: a uniformly random action with this probability")
    parser.add_argument("--sticky", type=float, default=0.0,
                        help="random: the previous action again with this probability")
    parser.add_argument("--image-size", type=int, default=64, help="frames are S x S")
    parser.add_argument("--frame-skip", type=int,
                        help="environment steps per recorded step (default: 1 for MiniGrid, "
                             "4 for Atari)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the episodes in the validation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-j", "--workers", type=int, default=1, help="recording processes")
    args = parser.parse_args(argv)
    if args.verify:
        if args.env or args.out:
            parser.error("--verify DIR replays a recording; it takes no --env or --out")
        return args
    if not (args.env and args.episodes and args.out):
        parser.error("--env, --episodes and --out are required (or --verify DIR)")
    if args.episodes < 1 or args.image_size < 8 or args.workers < 1 \
            or (args.max_steps is not None and args.max_steps < 1) \
            or (args.frame_skip is not None and args.frame_skip < 1):
        parser.error("--episodes, -j, --max-steps and --frame-skip must be >= 1, "
                     "--image-size >= 8")
    if not (0 <= args.epsilon <= 1 and 0 <= args.sticky < 1 and 0 <= args.val_fraction < 1):
        parser.error("--epsilon must be in 0..1, --sticky and --val-fraction in [0, 1)")
    kind = args.env.partition(":")[0]
    args.policy = args.policy or ("expert" if kind == "minigrid" else "random")
    if args.policy == "expert" and kind == "atari":
        parser.error("--policy expert is MiniGrid's (a shortest path on the grid); Atari "
                     "episodes are recorded with --policy random [--sticky P]")
    return args


def main():
    args = parse_args()
    if args.verify:
        differ, total = verify(args.verify)
        if differ:
            raise RunFailed(f"{len(differ)} of {total} episodes replay to other frames "
                            f"(first: {differ[0]}): another simulator version or a changed "
                            f"file")
        print(f"all {total} episodes of {args.verify} replay to their recorded frames")
        return
    settings = {"env": args.env, "episodes": args.episodes, "max_steps": args.max_steps,
                "policy": args.policy,
                "epsilon": args.epsilon if args.policy == "expert" else 0.0,
                "sticky": args.sticky if args.policy == "random" else 0.0,
                "image_size": args.image_size, "frame_skip": args.frame_skip,
                "val_fraction": args.val_fraction, "seed": args.seed}
    summary = record(settings, args.out, args.workers)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
