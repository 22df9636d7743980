"""BetaVAE, VQ-VAE and VAE-GAN: objectives, the straight-through estimator, equilibrium rules,
training through the shared loop, exact resume with three optimizers."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import config_from_dict
from conftest import run_in_process, tiny_config, write_config
from dataset_sthv2 import build_split
from loaders import collate_frames
from models import MODELS, build_model
from runtime import Runtime
from trainer import Trainer
from vae_gan_model import equilibrium_decisions
from vanilla_vae_model import BetaVAE
from vq_vae_model import VQVAE, VectorQuantizer

SMALL = {"in_channels": 3, "hidden_dims": [8, 16], "image_size": 32}
FAMILY = {"BetaVAE": {**SMALL, "latent_dim": 8, "beta": 2.0},
          "VQVAE": {**SMALL, "num_embeddings": 16, "embedding_dim": 4},
          "VAEGAN": {**SMALL, "latent_dim": 8, "feature_layer": 0},
          "VanillaVAE": {**SMALL, "latent_dim": 8}}


def family_config(demo_data, save_dir, name, **overrides):
    cfg = tiny_config(demo_data, save_dir, **overrides)
    cfg["model_params"] = {"name": name, **FAMILY[name]}
    return cfg


@pytest.fixture(scope="module")
def batch(demo_data):
    cfg = config_from_dict(tiny_config(demo_data, os.path.join(demo_data, "..", "family")))
    frames = build_split(cfg.data_params, "train", 32)
    return collate_frames([frames[i] for i in range(16)])[0]


@pytest.mark.parametrize("name,key", [("BetaVAE", "loss"), ("VQVAE", "loss"),
                                      ("VAEGAN", "feature_recon"), ("VanillaVAE", "loss")])
def test_each_model_learns_through_the_shared_step(name, key, demo_data, tmp_path, batch):
    cfg = config_from_dict(family_config(demo_data, str(tmp_path), name,
                                         **{"exp_params.LR": 3e-3}))
    trainer = Trainer(cfg, Runtime(), steps_per_epoch=100)
    values = []
    for _ in range(25):
        losses, _, finite = trainer.step(batch)
        assert finite
        values.append(losses[key].item())
    assert np.mean(values[-5:]) < 0.8 * np.mean(values[:5]), values


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = VQVAE(**FAMILY["VQVAE"])
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = model(x)
    model.loss_function(x, out)["loss"].backward()
    assert model.encoder[0][0].weight.grad.abs().sum() > 0
    z = model.encode(x)
    quantized, codes, _ = model.vq(z)
    assert torch.allclose(quantized, model.vq.codebook[codes], atol=1e-6)   # forward value


def test_commitment_weight_applies_to_the_commitment_term_only():
    vq = VectorQuantizer(num_embeddings=2, embedding_dim=1, beta=0.25)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([[[[0.2]], [[0.9]]]], requires_grad=True)          # (1, 2, 1, 1)
    _, codes, loss = vq(z)
    assert codes.flatten().tolist() == [0, 1]
    # codebook term and commitment term are both mean((z - e)^2) = (0.04 + 0.01) / 2
    assert loss.item() == pytest.approx(1.25 * 0.025)
    loss.sum().backward()
    e = torch.tensor([0.0, 1.0])
    assert torch.allclose(z.grad.flatten(), 0.25 * 2 * (z.detach().flatten() - e) / 2)
    assert torch.allclose(vq.codebook.grad.flatten(), 2 * (e - z.detach().flatten()) / 2)


def test_ema_codebook_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_embeddings=3, embedding_dim=2, ema=True, decay=0.5,
                         dead_code_steps=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.tensor([[[0.1, 0.1], [0.9, 0.9]]]).view(1, 2, 1, 2)
    for _ in range(2):
        vq(z)
    assert not torch.allclose(vq.codebook[2], torch.tensor([50.0, 50.0]))   # restarted
    assert any(torch.allclose(vq.codebook[2], v) for v in z.view(-1, 2))
    assert vq.codebook[0, 0] < 0.1 and vq.codebook[0, 0] > 0.0              # moved toward 0.1


def test_beta_vae_objectives():
    torch.manual_seed(0)
    model = BetaVAE(**FAMILY["BetaVAE"], recon_loss="bce", capacity_annealing=True, gamma=10.0,
                    max_capacity=20.0, capacity_steps=100)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(x)
    recon, mu, logvar, logits = out
    losses = model.loss_function(x, out, kld_weight=0.5, step=25)
    p = torch.sigmoid(2 * logits)
    assert torch.allclose((recon + 1) / 2, p, atol=1e-5)                      # same output
    bce = -((x + 1) / 2 * torch.log(p) + (1 - x) / 2 * torch.log(1 - p)).mean()
    assert losses["recon_loss"].item() == pytest.approx(bce.item(), rel=1e-4)
    kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).mean()
    assert losses["capacity"].item() == 5.0
    assert losses["loss"].item() == pytest.approx((bce + 10 * 0.5 * (kl - 5).abs()).item(), rel=1e-4)
    plain = BetaVAE(**FAMILY["BetaVAE"])
    out = plain(x)
    l2 = plain.loss_function(x, out, kld_weight=0.5)
    assert l2["loss"].item() == pytest.approx(
        (F.mse_loss(out[0], x) + 2.0 * 0.5 * l2["kld"]).item(), rel=1e-5)


def test_equilibrium_rules():
    def decide(real, fake):
        return tuple(bool(d) for d in equilibrium_decisions(torch.tensor(real), torch.tensor(fake)))

    assert decide(0.7, 0.7) == (True, True)
    assert decide(0.1, 0.7) == (False, True)     # discriminator too strong
    assert decide(0.7, 1.3) == (True, False)     # discriminator too weak
    assert decide(0.1, 1.3) == (True, True)      # both would stop: train both


@pytest.mark.parametrize("real_logit,fake_logit,skipped", [
    (0.8, 0.8, "decoder"),           # real BCE 0.37, fake BCE 1.17 > 0.68 + 0.4: too weak
    (3.0, -3.0, "discriminator"),    # real BCE 0.05 < 0.68 - 0.4: too strong
])
def test_vae_gan_skips_the_update_its_rules_name(real_logit, fake_logit, skipped, monkeypatch,
                                                 demo_data, tmp_path):
    from vae_gan_model import Discriminator
    trainer = Trainer(config_from_dict(family_config(demo_data, str(tmp_path), "VAEGAN")),
                      Runtime(), steps_per_epoch=10)
    model = trainer.bare
    original, calls = Discriminator.forward, []

    def judged(self, image, feature_layer):      # losses() asks about real, recon, prior
        logit, features = original(self, image, feature_layer)
        value = real_logit if len(calls) % 3 == 0 else fake_logit
        calls.append(value)
        return value + (logit - logit.detach()), features      # forced value, real gradient

    monkeypatch.setattr(Discriminator, "forward", judged)
    before = {k: [p.detach().clone() for p in v] for k, v in model.optimizer_groups().items()}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    losses, _, finite = trainer.step(images)
    assert finite
    assert losses["decoder_skipped"].item() == float(skipped == "decoder")
    assert losses["discriminator_skipped"].item() == float(skipped == "discriminator")
    after = model.optimizer_groups()
    changed = {k: any(not torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in before}
    assert changed == {part: part != skipped for part in ("encoder", "decoder", "discriminator")}


def test_vq_vae_config_rejects_gaussian_keys(demo_data, tmp_path):
    raw = family_config(demo_data, str(tmp_path), "VQVAE")
    raw["model_params"]["latent_dim"] = 8
    with pytest.raises(Exception, match="model_params.latent_dim: unknown key for VQVAE"):
        config_from_dict(raw)
    assert set(MODELS) == {"VanillaVAE", "BetaVAE", "VQVAE", "VAEGAN", "LatentActionModel"}
    assert isinstance(build_model({"name": "VQVAE", **FAMILY["VQVAE"]}), VQVAE)


@pytest.mark.slow
def test_three_optimizer_resume_is_exact(demo_data, tmp_path):
    def config(name, steps):
        return write_config(tmp_path / f"{name}.yaml", family_config(
            demo_data, str(tmp_path / "logs"), "VAEGAN", **{
                "logging_params.name": name, "trainer_params.max_steps": steps,
                "exp_params.hflip": True}))

    for args in ([config("straight", 12)], [config("resumed", 7)],
                 [config("resumed", 12), "--resume", "auto"]):
        result = run_in_process("train_single_gpu.py", "--config", *args, "--device", "cpu")
        assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(tmp_path / "logs/straight/checkpoints/vae_final.pt", weights_only=True)
    b = torch.load(tmp_path / "logs/resumed/checkpoints/vae_final.pt", weights_only=True)
    assert set(a["optimizer"]) == {"encoder", "decoder", "discriminator"}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for part in a["optimizer"]:
        for i, state in a["optimizer"][part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"][part]["state"][i][key]), (part, key)


def test_capacity_follows_the_trainer_step_count_across_a_resume(demo_data, tmp_path, batch):
    raw = family_config(demo_data, str(tmp_path), "BetaVAE")
    raw["model_params"].update(capacity_annealing=True, max_capacity=10.0, capacity_steps=100)
    cfg = config_from_dict(raw)
    trainer = Trainer(cfg, Runtime(), steps_per_epoch=100)
    capacities = [trainer.step(batch)[0]["capacity"].item()
                  for _ in range(3)]
    assert capacities == pytest.approx([0.0, 0.1, 0.2])
    resumed = Trainer(cfg, Runtime(), steps_per_epoch=100)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.step(batch)[0]["capacity"].item() == pytest.approx(0.3)


def test_beta_vae_bce_elbo_is_the_bernoulli_bound():
    torch.manual_seed(0)
    model = BetaVAE(**FAMILY["BetaVAE"], recon_loss="bce").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, metrics, latents = model.evaluate_batch(x, torch.Generator().manual_seed(5))
    mu, logvar = latents["mu"], latents["logvar"]
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        p = (model.decode(mu + eps * torch.exp(0.5 * logvar)) + 1) / 2
    t = (x + 1) / 2
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
    assert torch.allclose(metrics["elbo"], -(bce + kl), rtol=1e-4)


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that copies a tensor's value to Python (a device sync on a GPU)."""
    READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_training_step_never_reads_device_values(name, batch, demo_data, tmp_path):
    trainer = Trainer(config_from_dict(family_config(demo_data, str(tmp_path), name, **{
        "exp_params.hflip": True})), Runtime(), steps_per_epoch=10)     # noise and flips drawn
    trainer.step(batch)                                         # optimizer state created
    with HostReads() as reads:
        for _ in range(2):
            trainer.step(batch)
    assert reads.calls == []


def test_vae_gan_discriminator_judges_alike_in_training_and_evaluation(demo_data, tmp_path,
                                                                       batch):
    """Its features do not depend on train/eval mode (batch statistics in both), so evaluate.py
    scores feature_recon as training computes it; checkpoints with running statistics load."""
    trainer = Trainer(config_from_dict(family_config(demo_data, str(tmp_path), "VAEGAN")),
                      Runtime(), steps_per_epoch=100)
    for _ in range(3):
        trainer.step(batch)
    model = trainer.bare
    x = batch.float() / 127.5 - 1
    with torch.no_grad():
        judged = []
        for train_mode in (True, False):
            model.discriminator.train(train_mode)
            judged.append(model.discriminator(x, model.feature_layer))
    assert torch.equal(judged[0][0], judged[1][0]) and torch.equal(judged[0][1], judged[1][1])
    state = model.state_dict()
    for k in (0, 1):                                    # as written before: running statistics
        width = FAMILY["VAEGAN"]["hidden_dims"][k]
        state[f"discriminator.blocks.{k}.1.running_mean"] = torch.zeros(width)
        state[f"discriminator.blocks.{k}.1.running_var"] = torch.ones(width)
        state[f"discriminator.blocks.{k}.1.num_batches_tracked"] = torch.tensor(3)
    build_model({"name": "VAEGAN", **FAMILY["VAEGAN"]}).load_state_dict(state)   # strict


def test_vq_vae_reconstruction_term_is_the_designs_sum_by_default():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = (torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, 2, 2, dtype=torch.long),
           torch.full((2,), 0.5))
    summed = VQVAE(**FAMILY["VQVAE"]).loss_function(x, out)
    mean = VQVAE(**FAMILY["VQVAE"], recon_reduction="mean").loss_function(x, out)
    x01, recon01 = (x + 1) / 2, (out[0] + 1) / 2                # pythae's scale and reduction
    design = F.mse_loss(recon01, x01, reduction="none").flatten(1).sum(1).mean()
    assert summed["recon_loss"].item() == pytest.approx(design.item(), rel=1e-6)
    assert mean["recon_loss"].item() == pytest.approx(F.mse_loss(out[0], x).item(), rel=1e-6)
    assert summed["loss"].item() == pytest.approx(design.item() + 0.5, rel=1e-6)


def test_a_vq_vae_checkpoint_from_before_recon_reduction_resumes_with_mean(demo_data, tmp_path):
    from run_directory import resume_point
    from errors import ConfigError
    from training import train
    cfg = config_from_dict(family_config(demo_data, str(tmp_path), "VQVAE", **{
        "trainer_params.max_steps": 2}))
    state = torch.load(train(cfg, Runtime()), weights_only=True)
    del state["config"]["model_params"]["recon_reduction"]      # as written before the key
    torch.save(state, tmp_path / "old.pt")
    params = cfg.model_params
    with pytest.raises(ConfigError, match="recon_reduction: mean in the checkpoint, sum now"):
        resume_point(str(tmp_path / "old.pt"), str(tmp_path), params)
    assert resume_point(str(tmp_path / "old.pt"), str(tmp_path),
                        {**params, "recon_reduction": "mean"})["step"] == 2


LAM = {"name": "LatentActionModel", "dim": 32, "quant_dim": 4, "codebook_size": 8,
       "image_size": 32, "patch_size": 8, "spatial_depth": 1, "temporal_depth": 1,
       "dim_head": 16, "heads": 2, "code_seq_len": 4}
EVERY_FAMILY = {**{name: {"name": name, **FAMILY[name]} for name in FAMILY},
                "LatentActionModel-nsvq": {**LAM, "bottleneck": "nsvq"},
                "LatentActionModel-gaussian-lagrange": {**LAM, "bottleneck": "gaussian",
                                                        "rate_control": "lagrange"},
                "LatentActionModel-gaussian": {**LAM, "bottleneck": "gaussian"}}


def test_every_registered_family_is_covered_here():
    assert {p["name"] for p in EVERY_FAMILY.values()} == set(MODELS)


@pytest.mark.parametrize("family", sorted(EVERY_FAMILY))
def test_validation_changes_no_parameter_or_buffer(family, demo_data, tmp_path):
    """Evaluation is a pure forward pass: after a few training steps (so every state has
    moved), training's validation leaves every tensor of the model as it was."""
    from loaders import make_loaders
    from training import validate
    cfg = tiny_config(demo_data, str(tmp_path), **{"data_params.val_batch_size": 4})
    cfg["model_params"] = dict(EVERY_FAMILY[family])
    pairs = cfg["model_params"]["name"] == "LatentActionModel"
    if pairs:
        cfg["data_params"]["frame_offset"] = 2
    cfg = config_from_dict(cfg)
    rt = Runtime()
    trainer = Trainer(cfg, rt, steps_per_epoch=100)
    offset = dict(pair_offset=2, clamp_pairs=True) if pairs else {}
    train_set, val_set = (build_split(cfg.data_params, split, 32, **offset)
                          for split in ("train", "val"))
    train_loader, val_loader = make_loaders(train_set, val_set, cfg.data_params, rt, 0)
    for _, batch in zip(range(3), train_loader):
        trainer.step(batch[0])
    before = {k: v.clone() for k, v in trainer.bare.state_dict().items()}
    scores, _ = validate(trainer.bare, val_loader, rt, cfg)
    assert scores and all(np.isfinite(v) for v in scores.values())
    after = trainer.bare.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
