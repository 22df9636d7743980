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


SMALL = {"VanillaVAE": {"latent_dim": 4}, "BetaVAE": {"latent_dim": 4},
         "VQVAE": {"num_embeddings": 4, "embedding_dim": 4},
         "VAEGAN": {"latent_dim": 4, "feature_layer": 0},
         "LatentActionModel": {"dim": 16, "quant_dim": 4, "patch_size": 8, "spatial_depth": 1,
                               "temporal_depth": 1, "dim_head": 8, "heads": 2}}


def _small_params(name):
    base = {} if name == "LatentActionModel" else {"in_channels": 3, "hidden_dims": [8, 16]}
    return {"name": name, "image_size": 32, **base, **SMALL[name]}


def test_each_config_name_builds_its_own_class_and_every_family_is_registered():
    """model_params.name is what checkpoints record: it must build the class of that name, and
    every Autoencoder family in the model files must be reachable by one."""
    import inspect

    import latent_action_model
    import vae_gan_model
    import vanilla_vae_model
    import vq_vae_model
    from autoencoder import Autoencoder
    from models import build_model
    families = {cls for module in (vanilla_vae_model, vq_vae_model, vae_gan_model,
                                   latent_action_model)
                for _, cls in inspect.getmembers(module, inspect.isclass)
                if issubclass(cls, Autoencoder) and cls is not Autoencoder}
    assert families == set(MODELS.values())
    for name, cls in MODELS.items():
        assert cls.__name__ == name
        assert type(build_model(_small_params(name))) is cls


def test_every_registered_family_implements_the_model_interface():
    """The five members without a default are the family's own, and one training step's worth
    of calls runs: forward, loss_function, updates over exactly its optimizer groups,
    evaluate_batch, reconstruct."""
    from autoencoder import Autoencoder
    from models import build_model, item_shape, reconstruction_target
    for name, cls in MODELS.items():
        own = ("forward", "loss_function", "evaluate_batch", "reconstruct") + (
            ("infer_actions", "prior_actions", "predict") if cls.takes_pairs else ("sample",))
        for member in own:
            assert getattr(cls, member, None) is not getattr(Autoencoder, member, None), \
                (name, member)
        params = _small_params(name)
        model = build_model(params)
        x = torch.rand(2, *item_shape(params)) * 2 - 1
        noise = torch.randn(2, model.noise_dim) if model.noise_dim else None
        losses = model.loss_function(x, model(x, noise), 1e-3)
        assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"]), name
        updates = model.updates(losses)
        assert set(updates) == set(model.optimizer_groups()), name
        assert all(objective.dim() == 0 for objective, _ in updates.values()), name
        model.eval()
        recon, metrics, _ = model.evaluate_batch(x)
        assert recon.shape == reconstruction_target(model, x).shape == model.reconstruct(x).shape, name
        assert all(v.shape == (2,) for v in metrics.values()), name
        assert isinstance(model.noise_dim, int) and isinstance(model.not_applicable, dict), name
        if model.takes_pairs:        # a draw of the action latent, decoded with each pair
            draw = lambda seed: model.prior_actions(  # noqa: E731
                2, "cpu", torch.Generator().manual_seed(seed))
            generated = model.predict(x[:, 0], draw(0))
            assert torch.equal(model.predict(x[:, 0], model.infer_actions(x)), recon), name
            assert model.cannot_sample, name
        else:                        # images in [-1, 1]
            draw = lambda seed: model.sample(  # noqa: E731
                2, "cpu", torch.Generator().manual_seed(seed))
            generated = draw(0)
            assert generated.abs().max() <= 1 + 1e-6, name
        assert generated.shape == model.reconstruct(x).shape, name
        assert torch.isfinite(generated).all(), name
        assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1)), name
