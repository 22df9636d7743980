"""record_episodes.py and simulators.py: episodes with their true actions, replayable, resumable."""
import copy
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_in_process

pytest.importorskip("minigrid")
pytest.importorskip("gymnasium")

import record_episodes  # noqa: E402
from errors import ConfigError  # noqa: E402
from simulators import Policy, Simulator, episode_seeds, play, replay, \
    shortest_path_action  # noqa: E402

SETTINGS = {"env": "minigrid:MiniGrid-Empty-Random-5x5-v0", "episodes": 5, "max_steps": 12,
            "policy": "expert", "epsilon": 0.5, "sticky": 0.0, "image_size": 40,
            "frame_skip": None, "val_fraction": 0.4, "seed": 3}


def tree(folder):
    """{relative path: bytes} of every file in a folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec") / "minigrid")
    return out, record_episodes.record(SETTINGS, out)


def test_episodes_hold_their_frames_actions_and_labels(recording):
    out, summary = recording
    actions = json.loads(open(os.path.join(out, "actions.json")).read())
    assert actions["action_names"] == ["left", "right", "forward", "pickup", "drop", "toggle",
                                       "done"]
    assert list(actions["episodes"]) == [f"{i:06d}" for i in range(5)]
    for vid, e in actions["episodes"].items():
        frames = sorted(os.listdir(os.path.join(out, vid)))
        assert frames == [f"img_{t:05d}.jpg" for t in range(1, len(e["actions"]) + 2)]
        assert Image.open(os.path.join(out, vid, frames[0])).size == (40, 40)
        assert len(e["rewards"]) == len(e["actions"]) <= 12
        assert e["seed"] == episode_seeds(3, int(vid))[0]
        assert e["success"] == (e["terminated"] and sum(e["rewards"]) > 0)
        assert e["terminated"] or e["truncated"]
    labels = {split: json.loads(open(os.path.join(out, f"something-something-v2-{name}.json"))
                                .read())
              for split, name in (("train", "train"), ("val", "validation"))}
    assert {e["id"] for e in labels["val"]} == {v for v, e in actions["episodes"].items()
                                                if e["split"] == "val"}
    assert len(labels["val"]) == 2 and len(labels["train"]) == 3         # 40% of 5
    assert labels["train"][0]["template"] == "get to the green goal square"
    assert summary["transitions"] == sum(len(e["actions"]) for e in actions["episodes"].values())


def test_replaying_the_recorded_actions_from_the_seed_gives_the_frames(recording, tmp_path):
    out, _ = recording
    assert record_episodes.verify(out) == ([], 5)
    actions = json.loads(open(os.path.join(out, "actions.json")).read())
    e = actions["episodes"]["000001"]
    sim = Simulator(SETTINGS["env"], 40)
    frames = replay(sim, e["seed"], e["actions"])
    stored = [np.asarray(Image.open(os.path.join(out, "000001", f"img_{t:05d}.jpg")))
              for t in range(1, len(frames) + 1)]
    # JPEG is lossy: the stored frames are the replayed ones up to its error
    assert all(np.abs(a.astype(int) - b).mean() < 3 for a, b in zip(frames, stored))
    assert any((a != b).any() for a, b in zip(frames[:-1], frames[1:]))   # the agent moved
    copy_ = tmp_path / "copy"
    os.system(f"cp -r {out} {copy_}")
    frame = copy_ / "000001" / "img_00002.jpg"
    Image.fromarray(255 - stored[1]).save(frame, quality=95)              # another frame
    assert record_episodes.verify(str(copy_)) == (["000001"], 5)


def test_the_same_command_gives_the_same_files_with_workers(recording, tmp_path):
    out, _ = recording
    again = str(tmp_path / "again")
    record_episodes.record(SETTINGS, again, workers=2)
    mine, theirs = tree(out), tree(again)
    assert mine.keys() == theirs.keys()
    assert all(mine[k] == theirs[k] for k in mine if k != "record_episodes.json")


def test_a_killed_recording_resumes_to_the_same_files(recording, tmp_path, monkeypatch):
    out, _ = recording
    killed = str(tmp_path / "killed")
    real, calls = record_episodes.record_episode, []

    def dies_on_the_third(*args):
        calls.append(args[0])
        if len(calls) == 3:
            os.makedirs(os.path.join(killed, ".000002.tmp.99999"))        # a half-written one
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(record_episodes, "record_episode", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        record_episodes.record(SETTINGS, killed)
    assert sorted(os.listdir(killed)) == [".000002.tmp.99999", ".record_episodes", "000000",
                                          "000001"]
    monkeypatch.setattr(record_episodes, "record_episode", real)
    with pytest.raises(Exception, match="other settings"):
        record_episodes.record({**SETTINGS, "epsilon": 0.1}, killed)
    record_episodes.record(SETTINGS, killed)
    mine, theirs = tree(out), tree(killed)
    assert mine.keys() == theirs.keys()
    assert all(mine[k] == theirs[k] for k in mine if k != "record_episodes.json")
    assert filecmp.cmp(os.path.join(out, "actions.json"), os.path.join(killed, "actions.json"),
                       shallow=False)


def fewest_steps_to_goal(env, limit=30):
    """The fewest left / right / forward steps to the goal, by searching the environment's own
    dynamics (copies of it stepped), independent of shortest_path_action's grid reading."""
    u = env.unwrapped
    frontier, seen = [copy.deepcopy(u)], {(tuple(u.agent_pos), u.agent_dir)}
    for depth in range(1, limit):
        nxt = []
        for state in frontier:
            for a in (u.actions.left, u.actions.right, u.actions.forward):
                child = copy.deepcopy(state)
                _, reward, terminated, _, _ = child.step(a)
                if terminated and reward > 0:
                    return depth
                key = (tuple(child.agent_pos), child.agent_dir)
                if key not in seen:
                    seen.add(key)
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("no way to the goal")


@pytest.mark.parametrize("env", ["MiniGrid-SimpleCrossingS9N1-v0", "MiniGrid-Empty-Random-6x6-v0"])
def test_the_expert_takes_a_shortest_path_to_the_goal(env):
    sim = Simulator(f"minigrid:{env}", 36)
    policy = Policy("expert", len(sim.action_names), epsilon=0.0)
    for seed in range(3):
        sim.reset(seed)
        fewest = fewest_steps_to_goal(sim.env)
        policy.start(seed)
        episode = play(sim, seed, policy)
        assert episode.terminated and episode.rewards[-1] > 0
        assert len(episode.actions) == fewest


def test_epsilon_random_actions_show_every_action():
    sim = Simulator("minigrid:MiniGrid-Empty-Random-6x6-v0", 24)
    policy = Policy("expert", len(sim.action_names), epsilon=0.5)
    taken = []
    for seed in range(6):
        policy.start(seed)
        taken += play(sim, seed, policy).actions
    assert set(taken) == set(range(7))


def test_an_expert_that_cannot_reach_the_goal_is_refused_before_any_file(tmp_path):
    result = run_in_process("record_episodes.py", "--env", "minigrid:MiniGrid-DoorKey-5x5-v0",
                            "--episodes", "2", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no path to a goal square" in result.stderr
    assert not (tmp_path / "o").exists()
    sim = Simulator("minigrid:MiniGrid-Empty-5x5-v0")
    sim.reset(0)
    assert shortest_path_action(sim.env.unwrapped) == 2          # forward, towards the goal


def test_the_command_line_records_once_and_refuses_other_settings(tmp_path):
    args = ["record_episodes.py", "--env", "minigrid:MiniGrid-Empty-5x5-v0", "--episodes", "2",
            "--image-size", "40", "--max-steps", "4", "--out", str(tmp_path / "o")]
    first = run_in_process(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["episodes"] == 2
    again = run_in_process(*args)
    assert again.returncode == 0 and "already complete" in again.stderr
    other = run_in_process(*args[:-2], "--seed", "5", "--out", str(tmp_path / "o"))
    assert other.returncode == 2 and "seed 0 then, 5 now" in other.stderr
    verified = run_in_process("record_episodes.py", "--verify", str(tmp_path / "o"))
    assert verified.returncode == 0 and "replay to their recorded frames" in verified.stdout


@pytest.mark.parametrize("argv, message", [
    (["--env", "minigrid:MiniGrid-Nope-v0"], "no such environment"),
    (["--env", "nope"], "expected minigrid:ENV_ID"),
    (["--env", "atari:Breakout", "--policy", "expert"], "--policy expert is MiniGrid's"),
    (["--env", "minigrid:MiniGrid-Empty-5x5-v0", "--epsilon", "2"], "--epsilon must be"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    result = run_in_process("record_episodes.py", *argv, "--episodes", "2", "--out",
                            str(tmp_path / "o"))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_simulator_package_names_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "minigrid" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install minigrid==3\.2\.0 \(or pip install -r "
                                          r"requirements-sim\.txt\)"):
        Simulator("minigrid:MiniGrid-Empty-5x5-v0")


def test_atari_episodes_replay_with_sticky_random_actions(tmp_path):
    pytest.importorskip("ale_py")
    settings = {**SETTINGS, "env": "atari:Breakout", "episodes": 2, "max_steps": 6,
                "policy": "random", "epsilon": 0.0, "sticky": 0.5, "image_size": 32}
    summary = record_episodes.record(settings, str(tmp_path / "atari"))
    actions = json.loads((tmp_path / "atari" / "actions.json").read_text())
    assert actions["action_names"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert actions["frame_skip"] == 4 and summary["transitions"] == 12
    assert record_episodes.verify(str(tmp_path / "atari")) == ([], 2)
