"""The Vanilla VAE: the architecture of the study, its sizes, and its objective."""
import numpy as np
import pytest
import torch

from models import MODELS, build_model, count_parameters
from vanilla_vae_model import VanillaVAE


def expected_parameter_count(in_ch=3, dims=(64, 128, 256, 512, 1024), latent=256, size=256):
    """Count from the written specification, layer by layer (conv k3 + BN per block)."""
    conv = lambda a, b: a * b * 9 + b          # noqa: E731 weight + bias
    bn = lambda c: 2 * c                        # noqa: E731 affine weight + bias
    grid = size // 2 ** len(dims)
    flat = dims[-1] * grid * grid
    widths = [in_ch, *dims]
    encoder = sum(conv(a, b) + bn(b) for a, b in zip(widths, widths[1:]))
    heads = 2 * (flat * latent + latent)
    rev = dims[::-1]
    decoder = (latent * flat + flat) + sum(conv(a, b) + bn(b) for a, b in zip(rev, rev[1:]))
    final = conv(rev[-1], rev[-1]) + bn(rev[-1]) + conv(rev[-1], in_ch)
    return encoder + heads + decoder + final


def test_study_architecture_shapes_and_parameter_count():
    model = VanillaVAE()                        # the defaults are the study's architecture
    assert count_parameters(model) == expected_parameter_count() == 62_980_803
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        assert model.encoder(x).shape == (2, 1024, 8, 8)
        recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 256)
    assert recon.abs().max() <= 1.0             # Tanh output matches the [-1, 1] input range
    assert isinstance(model.final_layer[-1], torch.nn.Tanh)
    assert [m.out_channels for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)] \
        == [64, 128, 256, 512, 1024]


@pytest.mark.parametrize("size,dims", [(128, [32, 64, 128]), (64, [16, 32, 64, 128]),
                                       (96, [8, 16, 32, 64, 128])])
def test_sizes_follow_image_size(size, dims):
    model = build_model({"name": "VanillaVAE", "in_channels": 3, "hidden_dims": dims,
                         "latent_dim": 16, "image_size": size})
    assert count_parameters(model) == expected_parameter_count(3, tuple(dims), 16, size)
    with torch.no_grad():
        recon, mu, _ = model(torch.zeros(3, 3, size, size))
    assert recon.shape == (3, 3, size, size) and mu.shape == (3, 16)
    assert model.sample(5).shape == (5, 3, size, size)


def test_image_size_must_halve_evenly():
    with pytest.raises(ValueError, match="not divisible"):
        VanillaVAE(hidden_dims=[8, 16, 32], image_size=36)


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    x, recon = rng.uniform(-1, 1, (4, 3, 8, 8)), rng.uniform(-1, 1, (4, 3, 8, 8))
    mu, logvar = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)) * 0.5
    kld_weight = 0.3
    mse = np.mean((recon - x) ** 2)
    kl_per_image = np.array([-0.5 * sum(1 + logvar[i, j] - mu[i, j] ** 2 - np.exp(logvar[i, j])
                                        for j in range(5)) for i in range(4)])
    sse_per_image = ((recon - x) ** 2).reshape(4, -1).sum(1)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    out = VanillaVAE.loss_function(None, t(x), (t(recon), t(mu), t(logvar)), kld_weight)
    assert out["recon_loss"].item() == pytest.approx(mse, rel=1e-6)
    assert out["kld"].item() == pytest.approx(kl_per_image.mean(), rel=1e-6)
    assert out["kld"].item() > 0                                   # logged as a positive number
    assert out["loss"].item() == pytest.approx(mse + kld_weight * kl_per_image.mean(), rel=1e-6)
    assert out["neg_elbo"].item() == pytest.approx(
        np.mean(0.5 * sse_per_image + kl_per_image), rel=1e-6)


def test_kl_vanishes_only_at_the_prior():
    zero = torch.zeros(2, 4)
    out = VanillaVAE.loss_function(None, zero, (zero, zero, zero), 1.0)
    assert out["kld"].item() == 0.0
    assert VanillaVAE.loss_function(None, zero, (zero, zero + 0.1, zero), 1.0)["kld"].item() > 0


def test_reparameterize_uses_given_noise():
    mu, logvar, noise = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    z = VanillaVAE.reparameterize(mu, logvar, noise)
    assert torch.allclose(z, mu + noise * torch.exp(0.5 * logvar))


def test_registry_names_classes():
    assert MODELS["VanillaVAE"] is VanillaVAE


def test_every_registered_family_implements_the_model_interface():
    from models import AutoencoderModel
    small = {"in_channels": 3, "hidden_dims": [8, 16], "image_size": 32}
    pairs = {"dim": 16, "quant_dim": 4, "image_size": 32, "patch_size": 8, "spatial_depth": 1,
             "temporal_depth": 1, "dim_head": 8, "heads": 2}
    for name, cls in MODELS.items():
        extra = ({"num_embeddings": 4, "embedding_dim": 4} if name == "VQVAE" else
                 {"latent_dim": 4, **({"feature_layer": 0} if name == "VAEGAN" else {})})
        model = cls(**pairs) if getattr(cls, "takes_pairs", False) else cls(**small, **extra)
        assert isinstance(model, AutoencoderModel), name
        assert isinstance(model.noise_dim, int) and isinstance(model.not_applicable, dict), name
