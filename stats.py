"""Summaries with confidence intervals: numpy only, so every report can use them cheaply."""
import numpy as np

CI_METHOD = "bootstrap percentile, 2000 resamples of images, seed 0"


def summarize(values, resamples=2000, seed=0):
    """mean, std (ddof 1) and a 95% bootstrap percentile interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "std": 0.0, "ci95": [float(v[0])] * 2, "n": 1}
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 200):       # bounded memory for large n
        idx = rng.integers(0, len(v), size=(min(200, resamples - start), len(v)))
        means[start:start + len(idx)] = v[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)),
            "ci95": [float(lo), float(hi)], "n": int(len(v))}


PAIRED_METHOD = ("paired bootstrap of the per-pair difference, 2000 resamples of videos (pairs "
                 "of one video together), seed 0; two-sided p-value from the bootstrap "
                 "distribution shifted to a zero mean")


def cluster_bootstrap(values, clusters, resamples=2000, seed=0):
    """Means of `values` over `resamples` bootstrap samples that draw whole clusters (videos)
    with replacement, so that pairs of one video, which are not independent, move together.
    Returns (mean over all values, bootstrap means), non-finite values left out."""
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(clusters)
    keep = np.isfinite(v)
    v, c = v[keep], c[keep]
    _, cluster_of = np.unique(c, return_inverse=True)
    sums = np.bincount(cluster_of, weights=v)
    sizes = np.bincount(cluster_of).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 200):           # bounded memory for many videos
        draw = rng.integers(0, len(sums), size=(min(200, resamples - start), len(sums)))
        means[start:start + len(draw)] = sums[draw].sum(1) / sizes[draw].sum(1)
    return float(v.mean()), means


def paired_difference(a, b, clusters, resamples=2000, seed=0):
    """Is A better than B on the same pairs? The mean per-pair difference a - b, its 95%
    cluster-bootstrap interval and a two-sided p-value for "no difference" (the share of
    bootstrap means, shifted to mean zero, at least as far from zero as the observed one)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not np.isfinite(d).any():
        return {"mean_difference": None, "ci95": None, "p_value": None, "n": 0, "videos": 0}
    clusters = np.asarray(clusters)
    observed, means = cluster_bootstrap(d, clusters, resamples, seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    extreme = np.abs(means - observed) >= abs(observed)
    return {"mean_difference": observed, "ci95": [float(lo), float(hi)],
            "p_value": float((1 + extreme.sum()) / (1 + resamples)),
            "n": int(np.isfinite(d).sum()), "videos": int(len(np.unique(clusters[np.isfinite(d)])))}


def share(successes, clusters, resamples=2000, seed=0):
    """The share of pairs where `successes` is true, with its 95% cluster-bootstrap interval."""
    observed, means = cluster_bootstrap(np.asarray(successes, dtype=np.float64), clusters,
                                        resamples, seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"share": observed, "ci95": [float(lo), float(hi)], "n": int(len(successes))}


def proportion(successes):
    """The share of successes among independent trials, with its 95% Wilson score interval
    (sound at 0 and at 1, where a bootstrap interval collapses to a point)."""
    from scipy.stats import binomtest
    k, n = int(np.sum(successes)), len(successes)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"mean": k / n, "ci95": [float(ci.low), float(ci.high)], "n": n,
            "method": "Wilson score interval"}


def entropy_bits(counts):
    """Plug-in entropy (bits) of the empirical distribution `counts`, and its Miller-Madow
    correction for the small-sample bias: + (K - 1) / (2 N ln 2), K the observed outcomes."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    n = counts.sum()
    p = counts / n
    plug_in = float(-(p * np.log2(p)).sum()) + 0.0                # not -0.0
    return plug_in, plug_in + (len(counts) - 1) / (2 * n * np.log(2))


def mcnemar(correct_a, correct_b):
    """McNemar's exact test on the same items: do A and B get different items right? Counts of
    items only A / only B got right, and the two-sided binomial p-value on those."""
    from scipy.stats import binomtest
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p)}


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (it controls the chance of any false
    rejection in the family at the nominal level): the i-th smallest of m is multiplied by
    m - i (i from 0), made non-decreasing in that order and capped at 1. None stays None."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted, running = [None] * len(p_values), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def add_holm(tests):
    """Holm-adjusted p-values (holm) of one family of tests (dicts with `p_value`), written into
    each as `p_holm`."""
    tests = list(tests)
    for test, p in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = p


def over_seeds(values):
    """mean, sd and a 95% Student-t interval of the mean over independent seeds (None below
    two seeds: one run gives no spread)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "sd": None, "ci95": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "sd": None, "ci95": None, "n": 1}
    from scipy.stats import t
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
            "ci95": [float(v.mean()) - half, float(v.mean()) + half], "n": int(len(v))}


def summarize_clustered(values, clusters, resamples=2000, seed=0):
    """summarize() with the interval from resampling whole clusters (videos): pairs of one video
    are not independent, and resampling them one by one gives too narrow an interval."""
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    out = summarize(v, resamples, seed)
    if out["n"] > 1 and len(np.unique(np.asarray(clusters)[keep])) > 1:
        _, means = cluster_bootstrap(v, clusters, resamples, seed)
        out["ci95"] = [float(x) for x in np.percentile(means, [2.5, 97.5])]
    out["clusters"] = int(len(np.unique(np.asarray(clusters)[keep])))
    return out
