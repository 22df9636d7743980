"""The comparison's statistics against hand computations on small data."""
import math

import numpy as np
import pytest

from stats import cluster_bootstrap, entropy_bits, mcnemar, paired_difference, share, summarize


def test_the_bootstrap_draws_whole_videos():
    """Two videos, [0, 0, 0] and [1]: drawing videos gives means 0 (A, A), 1/4 (A, B) or
    1 (B, B) only; drawing pairs would give 1/2 and others."""
    mean, means = cluster_bootstrap([0, 0, 0, 1], ["a", "a", "a", "b"], resamples=500)
    assert mean == 0.25 and set(np.round(means, 9)) == {0.0, 0.25, 1.0}


def test_a_paired_test_separates_models_whose_marginal_intervals_overlap():
    """B scores 0.2 dB below A on every pair, while pairs vary by several dB: the marginal
    intervals overlap, the paired difference does not include zero."""
    rng = np.random.default_rng(0)
    a = 20 + 3 * rng.standard_normal(60)
    b = a - 0.2 + 0.01 * rng.standard_normal(60)
    videos = np.repeat(np.arange(20), 3)
    ma, mb = summarize(a), summarize(b)
    assert ma["ci95"][0] < mb["ci95"][1]                              # the marginal CIs overlap
    d = paired_difference(a, b, videos)
    assert d["mean_difference"] == pytest.approx(np.mean(a - b))
    assert 0 < d["ci95"][0] < d["ci95"][1] and d["p_value"] < 0.01
    assert d["n"] == 60 and d["videos"] == 20


def test_the_p_value_of_a_constant_difference_and_of_none():
    videos = np.arange(10)
    constant = paired_difference(np.ones(10), np.zeros(10), videos, resamples=999)
    assert constant["p_value"] == pytest.approx(1 / 1000)            # no resample reaches 0
    symmetric = paired_difference([1, -1] * 5, np.zeros(10), videos, resamples=999)
    assert symmetric["mean_difference"] == 0 and symmetric["p_value"] == 1.0


def test_share_of_pairs_beating_a_baseline():
    s = share([True, False, True, True], ["a", "b", "c", "d"])
    assert s["share"] == 0.75 and 0 <= s["ci95"][0] <= 0.75 <= s["ci95"][1] <= 1


def test_joint_code_entropy_and_its_miller_madow_correction():
    plug_in, corrected = entropy_bits([2, 1, 1, 0])
    assert plug_in == pytest.approx(1.5)                             # -(1/2 log 1/2 + 2/4 log 1/4)
    assert corrected == pytest.approx(1.5 + (3 - 1) / (2 * 4 * math.log(2)))
    assert entropy_bits([5]) == (0.0, 0.0)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_items():
    a = [1] * 8 + [0] * 1 + [1] * 5 + [0] * 6            # 8 only A, 1 only B, 5 both, 6 neither
    b = [0] * 8 + [1] * 1 + [1] * 5 + [0] * 6
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (8, 1)
    assert result["p_value"] == pytest.approx(2 * (math.comb(9, 0) + math.comb(9, 1)) / 2 ** 9)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0


def test_holm_against_a_hand_computation():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03,
    0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below the one before); None stays None."""
    from stats import holm
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx(
        [0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == []
