"""true_action.py: the true-action probe's classes, its labels by whole episodes, and its numbers
against a probe fitted here by hand."""
import warnings

import numpy as np
import pytest

from errors import DataError
from pairs import Pair
from true_action import labelled_draw, pair_classes, true_action_probe

pytest.importorskip("sklearn")


def test_a_pair_is_the_actions_between_its_frames():
    actions = {"episodes": {"000007": {"actions": [2, 0, 1, 2]}}}
    names = ["left", "right", "forward"]
    pairs = [Pair("", "", "000007", 1, 2, None), Pair("", "", "000007", 2, 4, None),
             Pair("", "", "000007", 3, 5, None)]
    assert pair_classes(actions, pairs, names) == ["forward", "left+right", "right+forward"]
    with pytest.raises(DataError, match="fewer than its frames need"):
        pair_classes(actions, [Pair("", "", "000007", 4, 6, None)], names)
    with pytest.raises(DataError, match="episode 000009 of the frames is not in"):
        pair_classes(actions, [Pair("", "", "000009", 1, 2, None)], names)


def test_labels_come_by_whole_episodes_and_just_enough_of_them():
    groups = np.repeat(np.arange(40), np.arange(40) % 7 + 3)            # 40 episodes, 3-9 pairs
    for fraction in (0.01, 0.025, 0.1, 0.5, 1.0):
        for seed in range(5):
            picked = labelled_draw(groups, fraction, np.random.default_rng(seed))
            episodes = np.unique(groups[picked])
            assert set(picked) == set(np.flatnonzero(np.isin(groups, episodes)))  # whole ones
            assert len(picked) >= fraction * len(groups)
            # the draw stops as soon as it is enough: without its largest episode it is not
            largest = max(np.sum(groups == e) for e in episodes)
            assert len(picked) - largest < fraction * len(groups)
    assert len(np.unique(groups[labelled_draw(groups, 0.001, np.random.default_rng(0))])) == 1


def synthetic(n_episodes, steps, rng, classes=3):
    """Features that carry the class (plus noise) and one that carries only the episode."""
    y = rng.integers(classes, size=n_episodes * steps)
    g = np.repeat(np.array([f"{e:04d}" for e in range(n_episodes)]), steps)
    signal = np.eye(classes)[y] * 2 + rng.normal(size=(len(y), classes))
    episode_only = np.repeat(rng.normal(size=(n_episodes, 4)), steps, axis=0)
    return {"codes": signal, "appearance": episode_only}, y, g


def hand_probe(x, y, x_test, c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y)
    return model.predict(scaler.transform(x_test))


def test_the_probe_matches_a_probe_fitted_by_hand():
    rng = np.random.default_rng(0)
    train, test = synthetic(30, 10, rng), synthetic(10, 10, rng)
    names = ["left", "right", "forward"]
    report = true_action_probe(train, test, names, fractions=(0.1, 1.0), draws=3, seed=4)
    (x, y, g), (x_test, y_test, _) = train, test
    assert report["num_classes"] == 3 and report["chance"]["top1"] == pytest.approx(1 / 3)
    assert report["test_pairs"] == 100 and report["test_episodes"] == 10
    for name in ("codes", "appearance"):
        full = report["feature_sets"][name]["1"]
        assert full["train_pairs"] == [300] and full["train_episodes"] == [30]
        hand = hand_probe(x[name], y, x_test[name], full["C"][0]) == y_test
        assert full["top1"]["mean"] == pytest.approx(hand.mean())
        assert full["per_action"]["forward"] == pytest.approx(hand[y_test == 2].mean())
        few = report["feature_sets"][name]["0.1"]
        draws = [labelled_draw(g, 0.1, np.random.default_rng([4, 0, r])) for r in range(3)]
        assert few["train_pairs"] == [len(p) for p in draws]
        by_hand = [np.mean(hand_probe(x[name][p], y[p], x_test[name], c) == y_test)
                   for p, c in zip(draws, few["C"])]
        assert few["top1_draws"] == pytest.approx(by_hand)
        assert few["top1"]["mean"] == pytest.approx(np.mean(by_hand))
        assert few["top1"]["clusters"] == 10                  # intervals over test episodes
    counts = np.bincount(y, minlength=3)
    assert report["majority"]["1"]["top1"]["mean"] == pytest.approx(
        np.mean(y_test == np.argmax(counts)))
    # the probe tells the latent that carries the action from one that carries the episode
    assert report["feature_sets"]["codes"]["1"]["top1"]["mean"] > 0.8
    assert report["feature_sets"]["appearance"]["1"]["top1"]["mean"] < 0.5


def test_a_draw_with_one_class_predicts_it():
    rng = np.random.default_rng(1)
    (x, _, g), (x_test, y_test, g_test) = synthetic(6, 4, rng), synthetic(3, 4, rng)
    y = np.repeat(np.arange(6) % 3, 4)                  # every train episode holds one class
    report = true_action_probe((x, y, g), (x_test, y_test, g_test), ["a", "b", "c"],
                               fractions=(0.01,), draws=1)
    few = report["feature_sets"]["codes"]["0.01"]
    picked = labelled_draw(g, 0.01, np.random.default_rng([0, 0, 0]))
    assert few["train_episodes"] == [1] and few["C"] == [None]
    assert few["top1"]["mean"] == pytest.approx(np.mean(y_test == y[picked][0]))


@pytest.mark.slow
def test_compare_with_actions_probes_every_latent_and_report_carries_it(tmp_path):
    """A tiny recording, two tiny latent action models trained on it, the comparison with
    --actions, then report.py."""
    pytest.importorskip("minigrid")
    import csv
    import json

    from conftest import run_in_process, train_tiny_latent_action_model
    from record_episodes import record
    data = str(tmp_path / "episodes")
    record({"env": "minigrid:MiniGrid-Empty-Random-5x5-v0", "episodes": 10, "max_steps": 8,
            "policy": "expert", "epsilon": 0.5, "sticky": 0.0, "image_size": 40,
            "frame_skip": None, "val_fraction": 0.3, "seed": 0}, data)
    models = [a for b in ("nsvq", "none")
              for a in ("--model", train_tiny_latent_action_model(data, tmp_path / "runs", b))]
    out = tmp_path / "cmp"
    result = run_in_process("compare_with_laq.py", *models, "--data-path", data, "--offset",
                            "1", "--pairs", "exact", "--num-pairs", "8",
                            "--actions", f"{data}/actions.json", "--action-fractions", "0.3",
                            "1", "--action-draws", "2", "--lpips-net", "none", "--fid", "none",
                            "--device", "cpu", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "true-action probe" in result.stdout and (out / "plots.png").is_file()
    probe = json.loads((out / "probe.json").read_text())
    truth = probe["true_action"]
    recorded = json.loads(open(f"{data}/actions.json").read())
    names, episodes = recorded["action_names"], recorded["episodes"].values()
    hand = {}
    for e in (e for e in episodes if e["split"] == "val"):       # every pair (t, t + 1)
        for a in e["actions"]:
            hand[names[a]] = hand.get(names[a], 0) + 1
    assert truth["test_class_counts"] == hand
    assert truth["train_pairs"] == sum(len(e["actions"]) for e in episodes
                                       if e["split"] == "train")
    assert set(truth["feature_sets"]) == {"lam_nsvq_codes_onehot", "lam_nsvq_action_continuous",
                                          "pixels_difference_16x16"}
    assert set(truth["feature_sets"]["lam_nsvq_codes_onehot"]) == {"0.3", "1"}
    assert len(truth["feature_sets"]["lam_nsvq_codes_onehot"]["0.3"]["top1_draws"]) == 2
    assert probe["manifest"]["files"]["actions"]["sha256"]
    report = run_in_process("report.py", str(out), "--output", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "## True action from few labels" in (tmp_path / "report" / "report.md").read_text()
    rows = {r["family"]: r for r in csv.DictReader(open(tmp_path / "report" / "report.csv"))}
    nsvq = rows["LatentActionModel (nsvq)"]
    assert float(nsvq["true_action_top1"]) == pytest.approx(
        truth["feature_sets"]["lam_nsvq_codes_onehot"]["1"]["top1"]["mean"])
    assert rows["LatentActionModel (none)"]["true_action_top1"] == ""


def test_actions_need_the_recorded_episodes_folder(tmp_path):
    from conftest import run_in_process
    result = run_in_process("compare_with_laq.py", "--model", "x.pt", "--image", "x.png",
                            "--actions", "actions.json", "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "--actions needs --data-path" in result.stderr
