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
