"""downstream.py: rollouts against the recording and against gymnasium run directly, a latent that
is the true action against the ceiling, evaluation seeds, reproducibility, and the command."""
import csv
import json

import numpy as np
import pytest

from conftest import run_in_process

pytest.importorskip("minigrid")

ENV_ID = "MiniGrid-Empty-Random-5x5-v0"
ENV = f"minigrid:{ENV_ID}"


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """30 expert episodes of a 5x5 grid at 40 px (one 8 px patch per tile), 6 held out."""
    from record_episodes import record
    out = str(tmp_path_factory.mktemp("downstream") / "episodes")
    record({"env": ENV, "episodes": 30, "max_steps": None, "policy": "expert", "epsilon": 0.25,
            "sticky": 0.0, "image_size": 40, "frame_skip": None, "val_fraction": 0.2,
            "seed": 0}, out)
    with open(f"{out}/actions.json") as f:
        return out, json.load(f)


def setting():
    from rollouts import Setting
    return Setting(ENV, 40, None, None)


def test_the_recording_policy_replayed_has_its_recorded_outcomes(episodes):
    from rollouts import run_episodes
    from simulators import Policy
    _, actions = episodes
    recorded = list(actions["episodes"].values())
    policy = Policy("expert", len(actions["action_names"]), actions["epsilon"])
    out = run_episodes(setting(), policy, [(e["seed"], e["policy_seed"]) for e in recorded])
    assert [o.success for o in out] == [e["success"] for e in recorded]
    assert [o.episode_return for o in out] == pytest.approx([e["return"] for e in recorded])
    assert [o.steps for o in out] == [len(e["actions"]) for e in recorded]


def test_random_actions_score_as_gymnasium_run_directly():
    import gymnasium
    import minigrid  # noqa: F401  (registers the environments)

    from rollouts import evaluation_seeds, run_episodes
    from simulators import Policy
    seeds, _ = evaluation_seeds(3, 12, set())
    ours = run_episodes(setting(), Policy("random", 7), seeds)
    env = gymnasium.make(ENV_ID)
    for o, (env_seed, policy_seed) in zip(ours, seeds):
        env.reset(seed=env_seed)
        rng, total, steps, done = np.random.default_rng(policy_seed), 0.0, 0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(int(rng.integers(7)))
            total, steps, done = total + reward, steps + 1, terminated or truncated
        assert (o.success, o.episode_return, o.steps) == (terminated and total > 0, total, steps)
    assert 0 < np.mean([o.success for o in ours]) < 1          # the check has both outcomes


def test_evaluation_seeds_pass_over_recorded_ones():
    from rollouts import evaluation_seeds
    first, skipped = evaluation_seeds(0, 5, set())
    assert skipped == 0 and len({s for s, _ in first}) == 5
    again, skipped = evaluation_seeds(0, 5, {first[0][0], first[2][0]})
    assert skipped == 2 and {s for s, _ in again}.isdisjoint({first[0][0], first[2][0]})
    assert again[:3] == [first[1], first[3], first[4]]


class TrueAction:
    """A 'model' whose latent action is the recorded action itself (one code of 7)."""
    name, view, is_model = "true_action", (40, "stretch"), True

    def __init__(self, actions):
        self.actions = actions["episodes"]

    def latent_action(self, batch):
        from compare_engine import LatentAction
        codes = [[self.actions[p.video]["actions"][p.current_frame - 1]] for p in batch.pairs]
        return LatentAction(codes=np.array(codes), classes=7)


def run(episodes, out, *extra):
    import downstream
    data, actions = episodes
    args = downstream.parse_args(["--episodes", data, "--env", ENV, "--model", "unused.pt",
                                  "--labels", "12", "96", "--rollouts", "16", "--steps", "150",
                                  "-j", "2", "--device", "cpu", "--output", str(out), *extra])
    report = downstream.run(args, [TrueAction(actions)], {}, {}, "cpu")
    with open(out / "downstream_episodes.csv") as f:
        rows = list(csv.DictReader(f))
    return report, rows


@pytest.mark.slow
def test_a_true_action_latent_reaches_the_ceiling_and_a_run_repeats_itself(episodes, tmp_path):
    report, rows = run(episodes, tmp_path / "a")
    outcomes = {}
    for r in rows:
        outcomes.setdefault(r["policy"], []).append((r["env_seed"], r["success"], r["steps"]))
    ceiling = report["baselines"]["all_true_actions"]
    mine = report["models"]["true_action"]["96"]
    # the latent policy is the ceiling's network trained alike; the decoder maps its code back
    assert outcomes["true_action@96"] == outcomes["all_true_actions"]
    assert mine["success"] == ceiling["success"]
    assert mine["val_action_top1"] == pytest.approx(ceiling["val_action_top1"])
    assert ceiling["success"]["mean"] > report["baselines"]["random"]["success"]["mean"]
    # start seeds: none of the recording's, every policy on the same ones
    _, actions = episodes
    recorded = {e["seed"] for e in actions["episodes"].values()}
    assert recorded.isdisjoint(report["eval_seeds"]) and len(set(report["eval_seeds"])) == 16
    assert {tuple(s for s, _, _ in v) for v in outcomes.values()} == \
        {tuple(str(s) for s in report["eval_seeds"])}
    assert report["labelled"]["12"]["transitions"] == 12
    assert (tmp_path / "a" / "downstream.png").is_file()
    again, rows_again = run(episodes, tmp_path / "b", "-j", "1")      # and -j changes nothing
    assert rows_again == rows
    for key in ("timings", "manifest", "workers"):
        report.pop(key), again.pop(key)
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)


@pytest.mark.slow
def test_the_command_with_trained_models_and_report(episodes, tmp_path):
    """Two tiny latent action models (codes, and the no-action twin) and LAQ's stand-in,
    downstream.py as a command, then report.py over its folder."""
    import importlib.util
    import os

    from conftest import train_tiny_latent_action_model
    data, _ = episodes
    models = [a for b in ("nsvq", "none")
              for a in ("--model", train_tiny_latent_action_model(data, tmp_path / "runs", b))]
    standin = os.path.join(os.path.dirname(__file__), "laq_standin")
    spec = importlib.util.spec_from_file_location("make_demo_laq",
                                                  os.path.join(standin, "make_demo_laq.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.make_demo_laq(str(tmp_path / "laq"), {
        "dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
        "spatial_depth": 1, "temporal_depth": 1, "dim_head": 8, "heads": 2, "code_seq_len": 4})
    models += ["--laq", str(tmp_path / "laq" / "model.pt"), "--laq-repo", standin,
               "--laq-config", str(tmp_path / "laq" / "laq.yaml")]
    out = tmp_path / "down"
    result = run_in_process("downstream.py", "--episodes", data, "--env", ENV, *models,
                            "--labels", "8", "--rollouts", "4", "--steps", "20", "-j", "1",
                            "--device", "cpu", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from_labels_only" in result.stdout and "all_true_actions" in result.stdout
    report = json.loads((out / "downstream.json").read_text())
    assert set(report["models"]) == {"lam_nsvq", "lam_none", "laq"}
    assert report["latents"]["lam_nsvq"] == report["latents"]["laq"] == "codes: 4 of 8"
    assert report["models"]["lam_none"]["8"]["success"] == \
        report["baselines"]["from_labels_only"]["8"]["success"]
    assert "nothing to pretrain on" in report["models"]["lam_none"]["note"]
    assert set(report["manifest"]["files"]) == {"lam_nsvq", "lam_none", "laq", "actions"}
    done = run_in_process("report.py", str(out), "--output", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream" in md and "| lam_nsvq |" in md
    rows = list(csv.DictReader(open(tmp_path / "report" / "downstream.csv")))
    nsvq = next(r for r in rows if r["policy"] == "lam_nsvq")
    assert float(nsvq["success"]) == report["models"]["lam_nsvq"]["8"]["success"]["mean"]


def test_bad_input_is_one_line(episodes, tmp_path):
    data, _ = episodes
    (tmp_path / "m.pt").write_bytes(b"")
    common = ["--episodes", data, "--model", str(tmp_path / "m.pt"), "--output",
              str(tmp_path / "o")]
    wrong = run_in_process("downstream.py", *common, "--env", "minigrid:MiniGrid-Empty-8x8-v0",
                           "--labels", "8")
    assert wrong.returncode != 0 and "were recorded in" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    nothing = run_in_process("downstream.py", "--episodes", data, "--env", ENV, "--labels", "8",
                             "--output", str(tmp_path / "o"))
    assert nothing.returncode == 2 and "nothing to score" in nothing.stderr
    missing = run_in_process("downstream.py", "--episodes", str(tmp_path / "none"), "--env", ENV,
                             "--model", str(tmp_path / "m.pt"), "--labels", "8", "--output",
                             str(tmp_path / "o"))
    assert missing.returncode != 0 and "none" in missing.stderr
    assert not (tmp_path / "o").exists()
