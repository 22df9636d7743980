"""Linear probe of the SthV2 action template from frozen features (compare_with_laq.py --probe).

Does a latent carry the action? For each feature set, a multinomial logistic regression
(scikit-learn, on standardised features, its C chosen by cross-validation on the train pairs)
is fitted on pairs from the train split and tested on pairs from the val split. Reported per
feature set: top-1 (and, above 5 templates, top-5) accuracy with 95% bootstrap intervals over
test pairs, beside the chance level (k / number of templates) and a majority-class baseline
(the k most frequent train templates, predicted for every test pair); and McNemar's test
between every two feature sets on the same test pairs.

Features are extracted in chunks that are cached on disk (FeatureCache), so a run over the full
dataset that is stopped can be resumed, and a second run with the same checkpoints and pairs
reuses them.
"""
import hashlib
import itertools
import json
import os

import numpy as np

from errors import DataError
from files import atomic_write
from stats import add_holm, mcnemar, summarize_clustered


class FeatureCache:
    """Per-chunk .npz files of features under `folder`, named by a key of everything that
    decides them (checkpoints, pairs, preprocessing): a chunk is computed once."""

    def __init__(self, folder, key):
        self.folder = folder
        self.key = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        os.makedirs(folder, exist_ok=True)

    def path(self, split, k):
        return os.path.join(self.folder, f"{split}_{self.key}_{k:05d}.npz")

    def get(self, split, k):
        path = self.path(split, k)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError):             # a damaged chunk is recomputed
            return None

    def put(self, split, k, features):
        with atomic_write(self.path(split, k)) as f:
            np.savez(f, **features)


def top_k_correct(probabilities, classes, y, k):
    """(n,) 0/1: is y among the k most probable classes."""
    k = min(k, probabilities.shape[1])
    top = classes[np.argsort(-probabilities, axis=1)[:, :k]]
    return (top == y[:, None]).any(1).astype(np.float64)


PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 5


def folds_by_video(y_train, videos):
    """The cross-validation folds (train indices, held-out indices) of the train pairs: up to
    CV_FOLDS, stratified by template, each video's pairs all on one side; None when there are
    too few videos, or a fold would train on a single class (C is then fixed: FIXED_C)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    distinct = len(np.unique(videos))
    if distinct < 2:
        return None
    folds = max(2, int(min(CV_FOLDS, np.bincount(y_train).max(), distinct)))
    if distinct == len(videos):                      # one pair per video: nothing to keep together
        splits = list(StratifiedKFold(n_splits=folds).split(np.zeros(len(y_train)), y_train))
    else:
        splits = list(StratifiedGroupKFold(n_splits=folds).split(np.zeros(len(y_train)),
                                                                 y_train, videos))
    return splits if all(len(np.unique(y_train[fit])) > 1 for fit, _ in splits) else None


FIXED_C = 1.0


def fit_probe(x_train, y_train, x_test, y_test, num_classes, seed=0, groups=None):
    """Top-1 (and, with more than 5 classes, top-5) accuracy of a logistic-regression probe,
    with 95% CIs; its inverse regularisation C is chosen among PROBE_CS by 5-fold
    cross-validation on the train pairs (a fixed C would favour some feature sizes), or is
    FIXED_C where folds cannot be made (a few labelled videos). Also returns each test pair's
    top-1 correctness, for McNemar's test between feature sets.

    `groups` = (train videos, test videos): the folds never split a video (pairs of one video
    would otherwise sit on both sides of a fold and favour features that recognise the video),
    and the intervals resample whole videos."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if len(np.unique(y_train)) < 2:
        raise DataError("the probe's train pairs hold a single action template; add pairs "
                        "(--probe-pairs) or videos")
    train_groups, test_groups = groups if groups is not None else (
        np.arange(len(y_train)), np.arange(len(y_test)))
    with warnings.catch_warnings():       # rare templates have fewer pairs than folds
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = folds_by_video(y_train, train_groups)
        probe = LogisticRegression(C=FIXED_C, max_iter=2000, random_state=seed) \
            if splits is None else LogisticRegressionCV(
                Cs=list(PROBE_CS), cv=splits, scoring="accuracy", max_iter=2000,
                random_state=seed)
        model = make_pipeline(StandardScaler(), probe)
        # scikit-learn 1.9 announces new defaults; the ones used here are spelled out above
        warnings.filterwarnings("ignore", message="The fitted attributes of LogisticRegressionCV")
        warnings.filterwarnings("ignore", message="The default value for l1_ratios")
        model.fit(x_train, y_train)
    probabilities = model.predict_proba(x_test)
    classes = model.classes_
    top1 = top_k_correct(probabilities, classes, y_test, 1)
    out = {"top1": summarize_clustered(top1, test_groups), "feature_dim": int(x_train.shape[1]),
           "C": FIXED_C if splits is None else float(model[-1].C_[0]),
           "cv_folds": 0 if splits is None else len(splits)}
    if num_classes > 5:
        out["top5"] = summarize_clustered(top_k_correct(probabilities, classes, y_test, 5),
                                          test_groups)
    return out, top1


def baselines(y_train, y_test, num_classes, test_groups):
    """Chance (uniform guessing over all templates) and majority-class accuracy."""
    values, counts = np.unique(y_train, return_counts=True)
    ranked = values[np.argsort(-counts, kind="stable")]
    ks = (1, 5) if num_classes > 5 else (1,)
    return {"chance": {f"top{k}": min(k, num_classes) / num_classes for k in ks},
            "majority": {f"top{k}": summarize_clustered(
                np.isin(y_test, ranked[:k]).astype(np.float64), test_groups) for k in ks}}


def run_probe(train, test, num_classes, seed=0):
    """train/test: (features {set name: (n, d) array}, labels (n,) int, videos (n,)). Returns
    probe.json's body: one entry per feature set, the baselines, and McNemar's test between
    every two feature sets on the same test pairs, with Holm-adjusted p-values (one family)."""
    (x_train, y_train, g_train), (x_test, y_test, g_test) = train, test
    report = {"num_classes": num_classes, "train_pairs": int(len(y_train)),
              "test_pairs": int(len(y_test)), "train_videos": int(len(np.unique(g_train))),
              "test_videos": int(len(np.unique(g_test))),
              **baselines(y_train, y_test, num_classes, g_test),
              "feature_sets": {}, "regularisation": f"C chosen among {list(PROBE_CS)} by "
                                                    f"cross-validation on the train pairs, "
                                                    f"folds grouped by video",
              "intervals": "95% bootstrap over test videos (pairs of one video together)"}
    correct = {}
    for name in x_train:
        report["feature_sets"][name], correct[name] = fit_probe(
            x_train[name], y_train, x_test[name], y_test, num_classes, seed, (g_train, g_test))
    report["mcnemar"] = {f"{a}_vs_{b}": mcnemar(correct[a], correct[b])
                         for a, b in itertools.combinations(correct, 2)}
    add_holm(report["mcnemar"].values())
    return report


def print_probe(report):
    def cell(s):
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    print(f"\nlinear probe of the action template: {report['train_pairs']} train pairs "
          f"({report['train_videos']} videos) -> {report['test_pairs']} val pairs "
          f"({report['test_videos']} videos), {report['num_classes']} templates; intervals "
          f"over videos")
    ks = [k for k in ("top1", "top5") if k in report["chance"]]
    w = max(26, *(len(name) for name in report["feature_sets"]))
    print(f"{'features':<{w}} " + " ".join(f"{k[:3]}-{k[3:]} [95% CI]".rjust(24) for k in ks)
          + "         C")
    for name, r in report["feature_sets"].items():
        print(f"{name:<{w}} " + " ".join(f"{cell(r[k]):>24}" for k in ks) + f" {r['C']:>9g}")
    majority, chance = report["majority"], report["chance"]
    print(f"{'majority class':<{w}} " + " ".join(f"{cell(majority[k]):>24}" for k in ks))
    print(f"{'chance':<{w}} " + " ".join(f"{chance[k]:>24.3f}" for k in ks))
    tests = report.get("mcnemar", {})
    different = sorted(((m["p_value"], m["p_holm"], pair) for pair, m in tests.items()
                        if m["p_value"] < 0.05))
    held = sum(m["p_holm"] < 0.05 for m in tests.values())
    print(f"McNemar's test on the val pairs: {len(different)} of {len(tests)} couples of feature "
          f"sets differ at p < 0.05, {held} after Holm's adjustment for {len(tests)} tests"
          + (", the strongest:" if different else ""))
    for p, p_holm, pair in different[:5]:
        print(f"  {pair.replace('_vs_', ' vs ')}  p={p:.3g} (Holm {p_holm:.3g})")
    if len(different) > 5:
        print(f"  and {len(different) - 5} more (probe.json: mcnemar)")
