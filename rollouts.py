"""Closed-loop rollouts of policies in a simulator (downstream.py), in parallel processes.

Every policy is scored on the same evaluation episodes: start seeds drawn from a stream of
their own (`evaluation_seeds`), none of them a recorded episode's seed, each with a seed for
the policy's own draws (the random and the recording policies). A learned policy sees each
frame as the recordings store it: the rendered frame through the same JPEG bytes, decoded and
resized as its training frames were, so that it acts on what it was trained on.
"""
import hashlib
from typing import NamedTuple, Optional

import numpy as np
import torch

from frame_files import decode_rgb, resize_frame
from parallel import ordered_map, process_pool

EVALUATION_STREAM = 0x0E7A1       # SeedSequence([EVALUATION_STREAM, seed, i]): not a recording's


class Outcome(NamedTuple):
    success: Optional[bool]            # MiniGrid: reached the goal; None where undefined
    episode_return: float
    steps: int
    start: str                         # sha1 of the first frame's stored bytes
    seen: Optional[bool] = None        # that start frame began a train episode too


def evaluation_seeds(seed, n, recorded):
    """n (environment seed, policy seed) pairs of evaluation episodes, none of whose
    environment seeds is in `recorded` (the recording's episodes, train and val); and how many
    draws were passed over for being there."""
    out, skipped, i = [], 0, 0
    while len(out) < n:
        env_seed, policy_seed = np.random.SeedSequence([EVALUATION_STREAM, seed, i]) \
            .generate_state(2)
        i += 1
        if int(env_seed >> 1) in recorded:
            skipped += 1
            continue
        out.append((int(env_seed >> 1), int(policy_seed >> 1)))
    return out, skipped


class Setting(NamedTuple):
    """What a rollout needs of the recording: the environment, its frames and episode length."""
    env: str                           # minigrid:ID or atari:GAME
    image_size: int
    frame_skip: Optional[int]
    max_steps: Optional[int]           # None: the environment's own limit


_simulators = {}


def simulator(setting):
    from simulators import Simulator
    key = (setting.env, setting.image_size, setting.frame_skip)
    if key not in _simulators:
        _simulators[key] = Simulator(*key)
    return _simulators[key]


def stored_frame(rgb, image_size):
    """The frame as a policy trained on the recording sees it: uint8 (3, S, S)."""
    from simulators import encode_frame
    return resize_frame(decode_rgb(encode_frame(rgb)), image_size, "stretch")


class Acting:
    """A choose(sim) for simulators.play: a learned policy (frames -> actions) acting on
    stored_frame, or a simulators.Policy started from the episode's policy seed."""

    def __init__(self, policy, image_size, policy_seed):
        self.policy, self.image_size = policy, image_size
        self.learned = not hasattr(policy, "start")
        if not self.learned:
            policy.start(policy_seed)

    def __call__(self, sim):
        if not self.learned:
            return self.policy(sim)
        frame = stored_frame(sim.frame(), self.image_size)
        return int(self.policy(frame[None])[0])


def run_episodes(setting, policy, seeds):
    """Outcomes of `policy` on each (environment seed, policy seed) of `seeds`."""
    from simulators import encode_frame, play
    torch.set_num_threads(1)                  # one process per core
    sim, out = simulator(setting), []
    for env_seed, policy_seed in seeds:
        episode = play(sim, env_seed, Acting(policy, setting.image_size, policy_seed),
                       setting.max_steps)
        total = float(sum(episode.rewards))
        success = bool(episode.terminated and total > 0) if sim.kind == "minigrid" else None
        out.append(Outcome(success, total, len(episode.actions),
                           hashlib.sha1(encode_frame(episode.frames[0])).hexdigest()))
    return out


def rollouts(setting, policies, seeds, workers=1, chunk=10):
    """{name: [Outcome per seed]} of every policy of {name: policy}, the episodes shared out in
    chunks of `chunk` seeds over `workers` processes."""
    tasks = [(name, k) for name in policies for k in range(0, len(seeds), chunk)]
    results = {name: [] for name in policies}
    with process_pool(workers) as pool:
        done = ordered_map(pool, run_episodes, [(setting, policies[name], seeds[k:k + chunk])
                                                for name, k in tasks], ahead=4 * max(workers, 1))
        for (name, _), outcomes in zip(tasks, done):
            results[name] += outcomes
    return results


def summary(outcomes):
    """Success rate (Wilson 95% interval) and mean return (bootstrap 95% interval)."""
    from stats import proportion, summarize
    successes = [o.success for o in outcomes]
    return {"success": proportion(successes) if None not in successes else None,
            "return": summarize([o.episode_return for o in outcomes]),
            "steps": float(np.mean([o.steps for o in outcomes]))}
