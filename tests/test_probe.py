"""The action probe: demo labels follow the motion, the probe finds motion where a feature
carries it and stays at chance where it does not, baselines, and the feature cache."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from labels import read_templates
import make_demo_data as demo
import probe
from probe import PROBE_CS, FeatureCache, baselines, folds_by_video, run_probe
from stats import summarize, summarize_clustered

OFFSET = 4


@pytest.fixture(scope="module")
def motion_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("motion"))
    demo.make_demo_data(out, videos=32, frames=12, seed=5)
    return out


def main_shape_centre(path, colour):
    """Centroid of the pixels of the main shape's colour (found in the picture itself)."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    mask = (np.abs(image - np.array(colour)).sum(-1) < 60)
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def pair_features(root, video_ids, seed):
    """Per (t, t + OFFSET) pair: the main shape's displacement measured in the frames (carries
    the motion), and the current frame's mean colour (does not), with the template."""
    templates = read_templates(root)
    order = list(demo.ACTIONS)
    motion, colour, labels, videos = [], [], [], []
    for vid in video_ids:
        k = int(vid) - 1000
        plan = demo.plan_video(demo.video_rng(seed, k), 12, demo.ACTIONS[order[k % 4]])
        for t in range(1, 12 - OFFSET + 1):
            a, b = (os.path.join(root, vid, f"img_{n:05d}.jpg") for n in (t, t + OFFSET))
            motion.append(main_shape_centre(b, plan["colours"][0]) -
                          main_shape_centre(a, plan["colours"][0]))
            colour.append(np.asarray(Image.open(a)).reshape(-1, 3).mean(0))
            labels.append(order.index(templates[vid]))
            videos.append(vid)
    return ({"motion": np.array(motion), "colour": np.array(colour)}, np.array(labels),
            np.array(videos))


@pytest.mark.slow
def test_demo_labels_follow_the_motion_and_the_probe_sees_it(motion_data):
    ids = {split: [e["id"] for e in json.load(open(os.path.join(
        motion_data, f"something-something-v2-{name}.json")))]
        for split, name in (("train", "train"), ("val", "validation"))}
    train, test = pair_features(motion_data, ids["train"], 5), pair_features(motion_data, ids["val"], 5)
    report = run_probe(train, test, num_classes=4)
    assert report["chance"]["top1"] == 0.25
    motion, colour = report["feature_sets"]["motion"], report["feature_sets"]["colour"]
    assert motion["top1"]["mean"] > 0.9 and motion["top1"]["ci95"][0] > 0.5
    assert colour["top1"]["ci95"][0] < 0.5 and colour["top1"]["mean"] < 0.6   # near chance
    # the same val pairs: McNemar's test says the motion features get different pairs right
    test_pairs = report["test_pairs"]
    duel = report["mcnemar"]["motion_vs_colour"]
    assert duel["only_a"] - duel["only_b"] == pytest.approx(
        test_pairs * (motion["top1"]["mean"] - colour["top1"]["mean"]))
    assert duel["only_a"] > duel["only_b"] and duel["p_value"] < 0.05
    assert motion["C"] in PROBE_CS and motion["cv_folds"] >= 2
    assert "top5" not in motion and "top5" not in report["chance"]   # 4 templates: top-5 is all


def test_the_probe_chooses_stronger_regularisation_for_features_of_noise():
    """C by cross-validation: 1,000 noise dimensions beside one informative one need a smaller
    C than the informative dimension alone."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    signal = (y + 0.5 * rng.standard_normal(300))[:, None]
    noisy = np.hstack([signal, rng.standard_normal((300, 1000))])
    train, test = slice(0, 200), slice(200, 300)
    report = run_probe(({"signal": signal[train], "noisy": noisy[train]}, y[train], np.arange(200)),
                       ({"signal": signal[test], "noisy": noisy[test]}, y[test], np.arange(100)),
                       num_classes=3)
    assert report["feature_sets"]["noisy"]["C"] < report["feature_sets"]["signal"]["C"]


def test_baselines_are_chance_and_the_most_frequent_train_classes():
    report = baselines(np.array([2, 2, 2, 1, 1, 0]), np.array([2, 1, 0, 2]), num_classes=10,
                       test_groups=np.arange(4))
    assert report["chance"] == {"top1": 0.1, "top5": 0.5}
    assert report["majority"]["top1"]["mean"] == 0.5        # class 2: two of four test pairs
    assert report["majority"]["top5"]["mean"] == 1.0        # classes 2, 1, 0 cover all


def test_feature_cache_reuses_finished_chunks_and_recomputes_damaged_ones(tmp_path):
    cache = FeatureCache(str(tmp_path), {"pairs": [1, 2]})
    assert cache.get("train", 0) is None
    cache.put("train", 0, {"x": np.arange(6.0).reshape(2, 3)})
    again = FeatureCache(str(tmp_path), {"pairs": [1, 2]})
    assert np.array_equal(again.get("train", 0)["x"], np.arange(6.0).reshape(2, 3))
    assert FeatureCache(str(tmp_path), {"pairs": [1, 3]}).get("train", 0) is None   # other key
    with open(cache.path("train", 0), "wb") as f:
        f.write(b"cut short")
    assert cache.get("train", 0) is None


def test_cross_validation_folds_never_split_a_video(monkeypatch):
    """Pairs of one video share its look: folds that split a video let the probe recognise the
    video instead of the action. Every fold the probe fits holds each video on one side."""
    rng = np.random.default_rng(1)
    videos = np.repeat(np.arange(30), 7)                     # 30 videos of 7 pairs
    y = videos % 3
    for splits in (folds_by_video(y, videos), folds_by_video(y[:60], videos[:60])):
        assert len(splits) >= 2
        for fit, held in splits:
            assert not set(videos[fit]) & set(videos[held])
    used = []
    monkeypatch.setattr(probe, "folds_by_video", lambda y_, g: used.append(g) or
                        folds_by_video(y_, g))
    x = {"look": np.eye(30)[videos] + 0.01 * rng.standard_normal((len(y), 30))}
    report = run_probe((x, y, videos), (x, y, videos), num_classes=3)
    assert len(used) == 1 and np.array_equal(used[0], videos)
    assert report["train_videos"] == 30 and report["feature_sets"]["look"]["cv_folds"] == 5


def test_probe_intervals_resample_videos():
    """With 20 identical pairs per video, the interval over videos is the interval of the 10
    video means (the same draws), and wider than one that takes the 200 pairs as independent."""
    per_video = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=float)
    values, videos = np.repeat(per_video, 20), np.repeat(np.arange(10), 20)
    clustered = summarize_clustered(values, videos)
    assert clustered["ci95"] == summarize(per_video)["ci95"]
    assert clustered["mean"] == pytest.approx(0.6) and clustered["clusters"] == 10
    iid = summarize(values)["ci95"]
    assert clustered["ci95"][1] - clustered["ci95"][0] > 2 * (iid[1] - iid[0])
