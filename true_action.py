"""The true-action probe (compare_with_laq.py --actions DIR/actions.json): how well each model's
frozen latent predicts the action the simulator was given, from few labels.

The class of a pair (frame t, frame t + k) is the k recorded actions between its frames, as one
class ("forward", or "left+forward" for k = 2). For each feature set (probe.py's, the
appearance-only ones included) and each label fraction f, a logistic-regression probe
(probe.fit_probe) is fitted on the pairs of whole train episodes drawn at random until they
hold at least f of the train pairs (labels come by the episode, as a few labelled demonstrations
do), then tested on every pair of the held-out (val) episodes. Below f = 1 the draw is repeated
`draws` times: the top-1 reported is the mean over draws, its interval from resampling test
episodes (an episode's pairs together), each draw's own value beside it. Baselines on the same
draws: the majority class of the labelled pairs, and chance (one over the classes of the train
pairs). Per action: the share of its test pairs predicted right.
"""
import numpy as np

from errors import DataError
from probe import fit_probe
from stats import summarize_clustered

FRACTIONS = (0.01, 0.025, 0.1, 1.0)
DRAWS = 5


def pair_classes(actions, pairs, action_names):
    """Each pair's class name: its recorded actions joined by '+'."""
    episodes = actions["episodes"]
    names = []
    for p in pairs:
        if p.video not in episodes:
            raise DataError(f"episode {p.video} of the frames is not in the actions file: the "
                            f"recording and the frames differ")
        taken = episodes[p.video]["actions"][p.current_frame - 1:p.target_frame - 1]
        if len(taken) != p.target_frame - p.current_frame:
            raise DataError(f"episode {p.video} has {len(episodes[p.video]['actions'])} "
                            f"recorded actions, fewer than its frames need "
                            f"(frame {p.target_frame})")
        names.append("+".join(action_names[a] for a in taken))
    return names


def labelled_draw(groups, fraction, rng):
    """Indices of the train pairs of whole episodes, drawn in a random order until they hold at
    least `fraction` of the pairs (one episode at least)."""
    episodes, counts = np.unique(groups, return_counts=True)
    need = int(np.ceil(fraction * len(groups)))
    order = rng.permutation(len(episodes))
    taken = order[:int(np.searchsorted(np.cumsum(counts[order]), need)) + 1]
    return np.flatnonzero(np.isin(groups, episodes[taken]))


def majority_correct(y_labelled, y_test):
    values, counts = np.unique(y_labelled, return_counts=True)
    return (y_test == values[np.argmax(counts)]).astype(np.float64)


def fit_or_constant(x, y, x_test, y_test, seed, groups):
    """probe.fit_probe's top-1 correctness and C; a draw whose labels hold one class predicts
    that class (C None)."""
    if len(np.unique(y)) < 2:
        return majority_correct(y, y_test), None
    out, top1 = fit_probe(x, y, x_test, y_test, num_classes=0, seed=seed, groups=groups)
    return top1, out["C"]


def true_action_probe(train, test, class_names, fractions=FRACTIONS, draws=DRAWS, seed=0):
    """train/test: (features {set: (n, d)}, classes (n,) int, episodes (n,)). Returns
    probe.json's `true_action` body (without the file's own description)."""
    (x_train, y_train, g_train), (x_test, y_test, g_test) = train, test
    seen = np.unique(y_train)
    report = {"classes": class_names, "num_classes": int(len(seen)),
              "chance": {"top1": 1 / len(seen)}, "train_pairs": int(len(y_train)),
              "train_episodes": int(len(np.unique(g_train))), "test_pairs": int(len(y_test)),
              "test_episodes": int(len(np.unique(g_test))), "fractions": list(fractions),
              "draws": draws, "test_class_counts": {
                  class_names[c]: int(n) for c, n in zip(*np.unique(y_test, return_counts=True))},
              "intervals": "95% bootstrap over test episodes (pairs of one episode together), "
                           "of the mean over draws",
              "majority": {}, "feature_sets": {name: {} for name in x_train}}
    for j, fraction in enumerate(fractions):
        key = f"{fraction:g}"
        picks = [labelled_draw(g_train, fraction, np.random.default_rng([seed, j, r]))
                 for r in range(draws if fraction < 1 else 1)]
        sizes = {"fraction": fraction, "train_pairs": [int(len(p)) for p in picks],
                 "train_episodes": [int(len(np.unique(g_train[p]))) for p in picks]}
        majority = np.mean([majority_correct(y_train[p], y_test) for p in picks], axis=0)
        report["majority"][key] = {**sizes, "top1": summarize_clustered(majority, g_test)}
        for name, x in x_train.items():
            fits = [fit_or_constant(x[p], y_train[p], x_test[name], y_test, seed,
                                    (g_train[p], g_test)) for p in picks]
            correct = np.mean([top1 for top1, _ in fits], axis=0)
            report["feature_sets"][name][key] = {
                **sizes, "top1": summarize_clustered(correct, g_test),
                "top1_draws": [float(top1.mean()) for top1, _ in fits],
                "C": [c for _, c in fits],
                "chance": report["chance"]["top1"],
                "majority": report["majority"][key]["top1"]["mean"],
                "per_action": {class_names[c]: float(correct[y_test == c].mean())
                               for c in np.unique(y_test)}}
    return report


def print_true_action(report):
    fractions = [f"{f:g}" for f in report["fractions"]]
    print(f"\ntrue-action probe ({report['num_classes']} classes, offset {report['offset']}): "
          f"trained on whole train episodes holding each fraction of their "
          f"{report['train_pairs']} pairs, tested on {report['test_pairs']} pairs of "
          f"{report['test_episodes']} held-out episodes; top-1, mean of {report['draws']} draws "
          f"below 100%, [95% CI over episodes]")
    w = max(26, *(len(name) for name in report["feature_sets"]))
    print(f"{'features':<{w}} " + " ".join(f"{float(f):.1%} labels".rjust(22) for f in fractions))

    def cell(s):
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    for name, by_fraction in report["feature_sets"].items():
        print(f"{name:<{w}} " + " ".join(f"{cell(by_fraction[f]['top1']):>22}"
                                         for f in fractions))
    print(f"{'majority class':<{w}} " + " ".join(f"{cell(report['majority'][f]['top1']):>22}"
                                                for f in fractions))
    print(f"{'chance':<{w}} {report['chance']['top1']:>22.3f}")
    references = [n for n in report["feature_sets"] if n.startswith("pixels_difference")]
    if references:
        print(f"{', '.join(references)}: the pair's own pixels (future minus current frame, "
              f"pooled), no model: a reference")
