"""Linear probe of the SthV2 action template from frozen features (compare_with_laq.py --probe).

Does a latent carry the action? For each feature set, a multinomial logistic regression
(scikit-learn, on standardised features) is fitted on pairs from the train split and tested on
pairs from the val split. Reported per feature set: top-1 and top-5 accuracy with 95% bootstrap
intervals over test pairs, beside the chance level (k / number of templates) and a majority-
class baseline (the k most frequent train templates, predicted for every test pair).

Features are extracted in chunks that are cached on disk (FeatureCache), so a run over the full
dataset that is stopped can be resumed, and a second run with the same checkpoints and pairs
reuses them.
"""
import hashlib
import json
import os

import numpy as np

from errors import DataError
from files import atomic_write
from labels import LABEL_FILES
from stats import summarize


def read_templates(labels_dir):
    """{video id: action template} from the SthV2 label files in `labels_dir`."""
    templates = {}
    for name in LABEL_FILES.values():
        path = os.path.join(labels_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"the probe needs the SthV2 label files ({' and '.join(LABEL_FILES.values())}) "
                            f"with a 'template' per video; {path} is missing")
        try:
            with open(path) as f:
                templates.update({str(e["id"]): str(e["template"]) for e in json.load(f)})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read video templates from {path}: {e}") from None
    return templates


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


def fit_probe(x_train, y_train, x_test, y_test, seed=0):
    """Top-1 / top-5 of a logistic-regression probe (summaries with 95% CIs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if len(np.unique(y_train)) < 2:
        raise DataError("the probe's train pairs hold a single action template; add pairs "
                        "(--probe-pairs) or videos")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(x_train, y_train)
    probabilities = model.predict_proba(x_test)
    classes = model.classes_
    return {"top1": summarize(top_k_correct(probabilities, classes, y_test, 1)),
            "top5": summarize(top_k_correct(probabilities, classes, y_test, 5)),
            "feature_dim": int(x_train.shape[1])}


def baselines(y_train, y_test, num_classes):
    """Chance (uniform guessing over all templates) and majority-class accuracy."""
    values, counts = np.unique(y_train, return_counts=True)
    ranked = values[np.argsort(-counts, kind="stable")]
    return {"chance": {"top1": 1 / num_classes, "top5": min(5, num_classes) / num_classes},
            "majority": {"top1": summarize(np.isin(y_test, ranked[:1]).astype(np.float64)),
                         "top5": summarize(np.isin(y_test, ranked[:5]).astype(np.float64))}}


def run_probe(train, test, num_classes, seed=0):
    """train/test: (features {set name: (n, d) array}, labels (n,) int). Returns probe.json's
    body: one entry per feature set plus the baselines."""
    (x_train, y_train), (x_test, y_test) = train, test
    report = {"num_classes": num_classes, "train_pairs": int(len(y_train)),
              "test_pairs": int(len(y_test)), **baselines(y_train, y_test, num_classes),
              "feature_sets": {}}
    for name in x_train:
        report["feature_sets"][name] = fit_probe(x_train[name], y_train, x_test[name], y_test,
                                                 seed)
    return report


def print_probe(report):
    def cell(s):
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    print(f"\nlinear probe of the action template: {report['train_pairs']} train pairs -> "
          f"{report['test_pairs']} val pairs, {report['num_classes']} templates")
    w = max(26, *(len(name) for name in report["feature_sets"]))
    print(f"{'features':<{w}} {'top-1 [95% CI]':>24} {'top-5 [95% CI]':>24}")
    for name, r in report["feature_sets"].items():
        print(f"{name:<{w}} {cell(r['top1']):>24} {cell(r['top5']):>24}")
    majority = report["majority"]
    print(f"{'majority class':<{w}} {cell(majority['top1']):>24} {cell(majority['top5']):>24}")
    chance = report["chance"]
    print(f"{'chance':<{w}} {chance['top1']:>24.3f} {chance['top5']:>24.3f}")
