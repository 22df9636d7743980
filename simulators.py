"""Environments whose true actions are known, as record_episodes.py records them and a policy is
scored in them: MiniGrid (gymnasium + minigrid) and the Atari games that ship in ale-py's wheel.

A Simulator is reset from a seed and stepped with an action index; every step returns the
frame as the recordings store it (S x S RGB uint8: MiniGrid's whole grid seen from above, an
Atari screen stretched to the square), the reward, and whether the episode ended. One recorded
step holds its action for `frame_skip` steps of the environment (ALE's own frameskip for Atari),
so a replay of the recorded actions from the recorded seed gives the recorded frames again.

Policies: `random` (uniform, optionally sticky: the previous action again with probability
`sticky`) and, for MiniGrid, `expert`: a shortest path on the grid to the goal square, replanned
at every step, taking a uniformly random action with probability `epsilon` so that every action
appears in the recordings.
"""
import collections
import importlib
import io
import importlib.metadata
import json

import numpy as np
from PIL import Image

from errors import ConfigError, DataError
from options import require

GYMNASIUM = ("gymnasium", "gymnasium==1.4.0", "record_episodes.py")
MINIGRID = ("minigrid", "minigrid==3.2.0", "a MiniGrid environment")
ALE = ("ale_py", "ale-py==0.12.1", "an Atari environment (its ROMs ship in ale-py's wheel)")
KINDS = {"minigrid": (GYMNASIUM, MINIGRID), "atari": (GYMNASIUM, ALE)}
DEFAULT_FRAME_SKIP = {"minigrid": 1, "atari": 4}
ACTIONS = "actions.json"                  # a recording's true actions (record_episodes.py)
JPEG_QUALITY = 95


def encode_frame(rgb):
    """A frame's JPEG bytes as the recordings store it (4:4:4, so the grid's colours keep
    their edges); a policy scored in the environment sees its frames through the same bytes."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def parse_env(spec):
    """'minigrid:ENV_ID' or 'atari:GAME' -> (kind, gymnasium id)."""
    kind, _, name = spec.partition(":")
    if kind not in KINDS or not name:
        raise ConfigError(f"--env {spec!r}: expected minigrid:ENV_ID (MiniGrid-Empty-8x8-v0, "
                          f"...) or atari:GAME (Breakout, Pong, ...)")
    if kind == "atari" and "/" not in name:
        name = f"ALE/{name}-v5"
    return kind, name


def versions(kind):
    """The packages a recording depends on, with their versions (recorded beside it)."""
    return {pip.split("==")[0]: importlib.metadata.version(pip.split("==")[0])
            for _, pip, _ in KINDS[kind]}


def _registered(spec, kind, name):
    import gymnasium as gym
    if kind == "minigrid":
        importlib.import_module("minigrid")          # registers the MiniGrid environments
    else:
        import ale_py
        gym.register_envs(ale_py)
    if name not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("MiniGrid")) \
            if kind == "minigrid" else \
            sorted(k[4:-3] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5"))
        raise ConfigError(f"--env {spec}: no such environment (some there are: "
                          f"{', '.join(known[:6])}, ... {len(known)} in all)")
    return gym


class Simulator:
    """One environment as the recordings see it (see the module's docstring)."""

    def __init__(self, spec, image_size=64, frame_skip=None):
        self.spec = spec
        self.kind, self.env_id = parse_env(spec)
        require(*KINDS[self.kind], listed_in="requirements-sim.txt")
        gym = _registered(spec, self.kind, self.env_id)
        self.image_size = image_size
        self.frame_skip = frame_skip or DEFAULT_FRAME_SKIP[self.kind]
        if self.kind == "atari":       # every recorded action is the one taken: no sticky env
            self.env = gym.make(self.env_id, frameskip=self.frame_skip,
                                repeat_action_probability=0.0)
            self.action_names = list(self.env.unwrapped.get_action_meanings())
        else:
            self.env = gym.make(self.env_id)
            self.action_names = [a.name for a in self.env.unwrapped.actions]
        self._observation = None

    @property
    def task(self):
        """What the episode asks: MiniGrid's mission, or the Atari game."""
        if self.kind == "minigrid":
            return str(self.env.unwrapped.mission)
        return f"play {self.env_id.split('/')[-1].rsplit('-', 1)[0]}"

    def frame(self):
        """The current frame, image_size x image_size RGB uint8."""
        s = self.image_size
        if self.kind == "minigrid":
            grid = self.env.unwrapped
            tile = max(1, -(-s // max(grid.width, grid.height)))          # at least s pixels
            rgb = grid.get_frame(highlight=False, tile_size=tile)
        else:
            rgb = self._observation
        if rgb.shape[:2] != (s, s):
            rgb = np.asarray(Image.fromarray(rgb).resize((s, s), Image.BILINEAR))
        return np.ascontiguousarray(rgb)

    def reset(self, seed):
        self._observation, _ = self.env.reset(seed=int(seed))
        return self.frame()

    def step(self, action):
        """(frame, reward, terminated, truncated) after holding `action` for frame_skip steps."""
        if not 0 <= action < len(self.action_names):
            raise ValueError(f"action {action} is not one of {self.spec}'s "
                             f"{len(self.action_names)} actions")
        total, repeats = 0.0, 1 if self.kind == "atari" else self.frame_skip
        for _ in range(repeats):
            self._observation, reward, terminated, truncated, _ = self.env.step(int(action))
            total += float(reward)
            if terminated or truncated:
                break
        return self.frame(), total, bool(terminated), bool(truncated)

    def close(self):
        self.env.close()


# --- policies -------------------------------------------------------------------------------

def shortest_path_action(grid):
    """The first action of a shortest path (left / right turns and forward steps) from the
    MiniGrid agent's state to a goal square, over open floor and doors that are not locked (a
    closed one is opened: toggle); None when no goal square can be reached."""
    dirs = ((1, 0), (0, 1), (-1, 0), (0, -1))                  # MiniGrid's 0..3: right, down, ...
    actions = grid.actions

    def cell(x, y):
        return grid.grid.get(x, y) if 0 <= x < grid.width and 0 <= y < grid.height else "wall"

    def passable(obj):
        return obj is None or (obj != "wall" and (
            obj.type in ("goal", "floor") or (obj.type == "door" and not obj.is_locked)))

    def is_goal(x, y):
        obj = cell(x, y)
        return obj not in (None, "wall") and obj.type == "goal"

    start = (*map(int, grid.agent_pos), int(grid.agent_dir))
    first = {start: None}
    queue = collections.deque([start])
    while queue:
        x, y, d = state = queue.popleft()
        if is_goal(x, y):
            action = first[state]
            break
        dx, dy = dirs[d]
        moves = [(actions.left, (x, y, (d - 1) % 4)), (actions.right, (x, y, (d + 1) % 4))]
        if passable(cell(x + dx, y + dy)):
            moves.append((actions.forward, (x + dx, y + dy, d)))
        for a, nxt in moves:
            if nxt not in first:
                first[nxt] = a if first[state] is None else first[state]
                queue.append(nxt)
    else:
        return None
    if action == actions.forward:
        ahead = cell(*np.add(grid.agent_pos, dirs[grid.agent_dir]))
        if ahead is not None and ahead != "wall" and ahead.type == "door" and not ahead.is_open:
            return int(actions.toggle)
    return int(action)


class Policy:
    """The recording policy: `random` (sticky with probability `sticky`) or `expert` (MiniGrid:
    shortest_path_action, a uniformly random action with probability `epsilon`). Its draws come
    from its own generator, seeded per episode."""

    def __init__(self, name, num_actions, epsilon=0.0, sticky=0.0):
        self.name, self.num_actions = name, num_actions
        self.epsilon, self.sticky = epsilon, sticky

    def start(self, seed):
        self.rng, self.previous = np.random.default_rng(seed), None

    def check(self, sim):
        """Refuse an expert in an environment where it finds no way to the goal."""
        if self.name == "expert" and shortest_path_action(sim.env.unwrapped) is None:
            raise ConfigError(f"--policy expert: no path to a goal square in {sim.spec} (the "
                              f"expert walks over floor and unlocked doors to the goal: "
                              f"MiniGrid-Empty-*, FourRooms, SimpleCrossing, ...); use "
                              f"--policy random")

    def __call__(self, sim):
        if self.name == "expert":
            self.check(sim)
            planned = shortest_path_action(sim.env.unwrapped)
            action = int(self.rng.integers(self.num_actions)) \
                if self.rng.random() < self.epsilon else planned
        elif self.sticky and self.previous is not None and self.rng.random() < self.sticky:
            action = self.previous
        else:
            action = int(self.rng.integers(self.num_actions))
        self.previous = action
        return action


Episode = collections.namedtuple("Episode", "frames actions rewards terminated truncated")


def play(sim, seed, choose, max_steps=None):
    """One episode from `seed`: `choose(sim)` gives each action (a Policy, or the recorded
    actions in turn). Ends when the environment ends it or after max_steps recorded steps.
    frames[t] and frames[t + 1] are the frames around actions[t]."""
    frames, actions, rewards = [sim.reset(seed)], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        if max_steps is not None and len(actions) >= max_steps:
            truncated = True
            break
        action = choose(sim)
        frame, reward, terminated, truncated = sim.step(action)
        frames.append(frame)
        actions.append(int(action))
        rewards.append(reward)
    return Episode(frames, actions, rewards, terminated, truncated)


def replay(sim, seed, actions):
    """The frames of the recorded `actions` played again from `seed`."""
    recorded = iter(actions)
    return play(sim, seed, lambda _: next(recorded), max_steps=len(actions)).frames


def episode_seeds(seed, index):
    """(environment seed, policy seed) of episode `index` of a recording made with `seed`:
    distinct across indices and recordings' seeds, and below 2**31 (what every simulator
    takes)."""
    env_seed, policy_seed = np.random.SeedSequence([seed, index]).generate_state(2)
    return int(env_seed >> 1), int(policy_seed >> 1)


def read_actions(path):
    """actions.json as record_episodes.py writes it; a one-line error naming what is wrong."""
    try:
        with open(path) as f:
            actions = json.load(f)
        for key in ("env", "action_names", "episodes"):
            actions[key]
        for vid, e in actions["episodes"].items():
            if not all(0 <= a < len(actions["action_names"]) for a in e["actions"]):
                raise ValueError(f"episode {vid} has an action outside action_names")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not an actions.json of record_episodes.py ({e})") from None
    return actions
