"""Metric values against independent computations, CIs on known distributions, diagnostics."""
import os
import time

import lpips
import numpy as np
import pytest
import torch
from skimage import data
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from metrics import (ImageMetrics, LpipsWeightsMissing, build_lpips, codebook_diagnostics,
                     latent_diagnostics)
from stats import summarize
from vanilla_vae_model import VanillaVAE


def as_tensor(img):
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def photo_pairs():
    """Real photographs (scikit-image ships them) and blurred + noisy versions, in [0, 1]."""
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)().astype(np.float64) / 255
        distorted = gaussian(img, sigma=1.2, channel_axis=-1) + rng.normal(0, 0.03, img.shape)
        pairs.append((img, np.clip(distorted, 0, 1)))
    return pairs


def test_ssim_and_psnr_agree_with_scikit_image_on_photographs(photo_pairs):
    metrics = ImageMetrics("cpu", "none")
    for img, distorted in photo_pairs:                          # 300-512 px: no down-sampling
        got = metrics(as_tensor(img), as_tensor(distorted))
        ssim = structural_similarity(img, distorted, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert got["ssim"].item() == pytest.approx(ssim, abs=1e-4)
        assert got["psnr"].item() == pytest.approx(
            peak_signal_noise_ratio(img, distorted, data_range=1), abs=1e-3)


def test_mse_and_bce_closed_forms():
    rng = np.random.default_rng(1)
    target, recon = rng.uniform(0, 1, (2, 3, 16, 16)), rng.uniform(0, 1, (2, 3, 16, 16))
    got = ImageMetrics("cpu", "none")(torch.tensor(target), torch.tensor(recon))
    assert np.allclose(got["mse"].numpy(), ((recon - target) ** 2).reshape(2, -1).mean(1), atol=1e-6)
    p = np.clip(recon, 1e-6, 1 - 1e-6)
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p)).reshape(2, -1).mean(1)
    assert np.allclose(got["bce"].numpy(), bce, rtol=1e-5)


def test_out_of_range_outputs_are_clamped_not_rejected():
    target = torch.rand(2, 3, 32, 32)
    overshoot = target * 1.4 - 0.2                              # like an unclamped decoder
    metrics = ImageMetrics("cpu", "none")
    assert torch.allclose(metrics(target, overshoot)["ssim"],
                          metrics(target, overshoot.clamp(0, 1))["ssim"])


def test_gmsd_is_zero_for_identical_images_and_grows_with_distortion():
    x = torch.rand(1, 3, 64, 64)
    metrics = ImageMetrics("cpu", "none")
    small = metrics(x, (x + 0.02 * torch.randn_like(x)).clamp(0, 1))["gmsd"]
    large = metrics(x, (x + 0.2 * torch.randn_like(x)).clamp(0, 1))["gmsd"]
    assert metrics(x, x)["gmsd"].item() == pytest.approx(0, abs=1e-6)
    assert 0 < small.item() < large.item()


def test_lpips_plumbing_with_random_backbone():
    torch.manual_seed(0)
    metrics = ImageMetrics("cpu", "alex", lpips_random_backbone=True)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    got = metrics(x, y)["lpips"]
    # the package's own convention: [-1, 1] inputs without normalize
    direct = metrics.lpips(x * 2 - 1, y * 2 - 1).flatten().double()
    assert got.shape == (2,) and torch.allclose(got, direct, atol=1e-6)
    assert metrics(x, x)["lpips"].abs().max() < 1e-6 and (got > 0).all()
    assert isinstance(metrics.lpips, lpips.LPIPS)


@pytest.mark.slow
def test_an_untrained_backbone_is_the_same_each_run_and_leaves_the_random_state_alone():
    """--lpips-random-backbone / --fid-random-backbone: the untrained network is drawn from
    its own seed, so two runs print the same (meaningless) numbers, and the caller's random
    stream goes on as if nothing had been drawn."""
    from metrics import build_inception
    torch.manual_seed(1)
    first = [build_lpips("alex", "cpu", True), build_inception("cpu", True)]
    after = torch.rand(3)
    torch.manual_seed(2)
    second = [build_lpips("alex", "cpu", True), build_inception("cpu", True)]
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)                # nothing drawn from the caller's
    for a, b in zip(first, second):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                      b.state_dict().values()))


def test_missing_lpips_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(LpipsWeightsMissing) as info:
        build_lpips("vgg", "cpu")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert "python fetch_weights.py --lpips vgg" in message and "--lpips-net none" in message


def test_confidence_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        sample = rng.normal(3.0, 2.0, size=80)
        s = summarize(sample, seed=trial)
        hits += s["ci95"][0] <= 3.0 <= s["ci95"][1]
        assert s["mean"] == pytest.approx(sample.mean()) and s["std"] == pytest.approx(sample.std(ddof=1))
    assert 0.90 <= hits / 200 <= 0.99
    wide, narrow = summarize(rng.normal(0, 1, 20)), summarize(rng.normal(0, 1, 2000))
    assert narrow["ci95"][1] - narrow["ci95"][0] < (wide["ci95"][1] - wide["ci95"][0]) / 4


def test_latent_diagnostics_closed_forms():
    n, dim = 500, 6
    mu, logvar = torch.zeros(n, dim), torch.zeros(n, dim)       # exactly the prior
    out = latent_diagnostics(mu, logvar)
    assert out["kl_total"] == 0 and out["active_units"] == 0 and out["posterior_collapse_warning"]
    mu[:, 0] = torch.randn(n) * 2
    logvar[:, 1] = np.log(4.0)
    out = latent_diagnostics(mu, logvar)
    assert out["kl_per_dim"][0] == pytest.approx(0.5 * float((mu[:, 0].double() ** 2).mean()), rel=1e-9)
    assert out["kl_per_dim"][1] == pytest.approx(0.5 * (4 - 1 - np.log(4)), rel=1e-6)   # logvar is float32
    assert out["active_units"] == 1


def test_active_units_of_a_model_built_to_use_three_units():
    torch.manual_seed(0)
    model = VanillaVAE(hidden_dims=[8, 16], latent_dim=10, image_size=32).eval()
    with torch.no_grad():
        keep = torch.zeros(10, 1)
        keep[[1, 4, 7]] = 1
        model.fc_mu.weight.mul_(keep * 50)                        # units 1, 4, 7 vary with x
        model.fc_mu.bias.zero_()
        _, _, latents = model.evaluate_batch(torch.rand(64, 3, 32, 32) * 2 - 1)
    out = latent_diagnostics(latents["mu"], latents["logvar"])
    assert out["active_units"] == 3
    assert [i for i, a in enumerate(out["activity_per_dim"]) if a > 0.01] == [1, 4, 7]


def test_codebook_usage():
    uniform = codebook_diagnostics(torch.arange(8).repeat(10), 8)
    assert uniform["perplexity"] == pytest.approx(8) and uniform["unique_codes"] == 8
    single = codebook_diagnostics(torch.full((5, 4), 3), 8)
    assert single["perplexity"] == pytest.approx(1) and single["histogram"][3] == 20


def test_rfid_is_the_frechet_distance_of_scipy():
    from scipy import linalg

    from metrics import FidFeatures
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(150, 16))
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = (((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y)
                - 2 * np.trace(linalg.sqrtm(cov_x @ cov_y).real))
    scorer = FidFeatures.__new__(FidFeatures)            # no network needed for the distance
    scorer.sets = {"a": [torch.from_numpy(x)], "b": [torch.from_numpy(y)]}
    assert scorer.fid("a", "b") == pytest.approx(expected, rel=1e-4)
    assert scorer.fid("a", "a") == pytest.approx(0, abs=1e-6)


def test_rfid_of_sets_smaller_than_the_feature_width_equals_piqs():
    """Fewer images than features (every comparison below thousands of pairs): the low-rank
    path, against piq's FID (Newton-Schulz square root)."""
    import piq

    from metrics import frechet_distance
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 256, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 256, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    expected = float(piq.FID().compute_metric(x, y))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-3)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)


def test_missing_inception_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
    from metrics import InceptionWeightsMissing, build_inception
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InceptionWeightsMissing) as info:
        build_inception("cpu")
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and str(tmp_path) in message
    assert "python fetch_weights.py --fid" in message and "--fid none" in message
