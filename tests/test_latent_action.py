"""Latent action models in LAQ's shape: the architecture's size, the two bottlenecks, LAQ's code
refill, and training with the one loop (1 process == 2 processes, exact resume)."""
import math
import os
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import config_from_dict
from conftest import run_in_process, run_script, tiny_config, write_config
from errors import ConfigError
from latent_action_model import CODE_GRIDS, LatentActionModel, refill_steps
from runtime import Runtime
from training import train

TINY = {"name": "LatentActionModel", "dim": 32, "quant_dim": 4, "codebook_size": 8,
        "image_size": 32, "patch_size": 8, "spatial_depth": 1, "temporal_depth": 1,
        "dim_head": 16, "heads": 2, "code_seq_len": 4}
LAPA = {"dim": 1024, "quant_dim": 32, "codebook_size": 8, "image_size": 256, "patch_size": 32,
        "spatial_depth": 8, "temporal_depth": 8, "dim_head": 64, "heads": 16, "code_seq_len": 4}


def lam_config(demo_data, save_dir, bottleneck="nsvq", **overrides):
    """A raw config for a ~40k-parameter latent action model on (t, t + 3) pairs at 32 px."""
    cfg = tiny_config(demo_data, save_dir, **{"data_params.frame_offset": 3, **overrides})
    cfg["model_params"] = {**TINY, "bottleneck": bottleneck}
    return cfg


def small(**kw):
    torch.manual_seed(0)
    return LatentActionModel(**{k: v for k, v in TINY.items() if k != "name"}, **kw)


def laq_parameter_count(dim, quant_dim, codebook_size, image_size, patch_size, spatial_depth,
                        temporal_depth, dim_head, heads, code_seq_len, published=False):
    """LAQ's parameters counted by hand from its architecture (LAQ_INTERFACE.md), for LAPA's
    code_seq_len 4 on an 8 x 8 grid (two 3 x 3 convs between project_in and the codebook).
    `published`: as LAPA's code holds them, with a bias in each feed-forward LayerNorm and an
    unused context norm in each self-attention."""
    d, patch, inner = dim, 3 * patch_size ** 2, dim_head * heads
    ff_inner = int(4 * 2 / 3 * dim)                                    # GEGLU's width
    assert (image_size // patch_size, code_seq_len) == (8, 4)
    embed = 2 * patch + (patch * d + d) + 2 * d             # LayerNorm, Linear, LayerNorm
    position_bias = (2 * d + d) + (d * d + d) + (d * heads + heads)
    peg = 27 * d + d                                        # depthwise 3x3x3 conv
    attention = d + 3 * inner * d + inner * d + 2 * dim_head   # gain, q/kv, out, q/k scales
    cross = attention + d + 2 * heads * 2 * dim_head        # + context norm, 2 null keys/values
    feed_forward = d + d * 2 * ff_inner + ff_inner * d
    layer = peg + attention + feed_forward
    if published:
        layer += d + d          # the unused context norm's gain, the feed-forward norm's bias
    encoder = (spatial_depth + temporal_depth) * layer + 2 * d
    decoder = spatial_depth * (layer + cross) + d
    action = (d * quant_dim + quant_dim) + 2 * (9 * quant_dim ** 2 + quant_dim) \
        + codebook_size * quant_dim + (quant_dim * d + d)
    to_pixels = d * patch + patch
    return embed + position_bias + encoder + decoder + action + to_pixels


@pytest.mark.slow
def test_parameter_count_at_lapas_settings_is_laqs_hand_count():
    """Every parameter accounted for: the hand count from LAQ's architecture, which for LAPA's
    code gives the 343,796,080 measured on it; the model here has neither the LayerNorm biases
    nor the unused context norms (3 stacks x 8 layers x 2 x 1024 = 49,152 fewer), and the
    Gaussian bottleneck has a Linear(quant_dim, quant_dim) for the log-variance instead of the
    codebook."""
    assert laq_parameter_count(**LAPA, published=True) == 343_796_080
    expected = laq_parameter_count(**LAPA)
    assert expected == 343_796_080 - 49_152
    with torch.device("meta"):
        for bottleneck, extra in (("nsvq", 0), ("gaussian", 32 * 32 + 32 - 8 * 32)):
            model = LatentActionModel(**LAPA, bottleneck=bottleneck)
            assert sum(p.numel() for p in model.parameters()) == expected + extra, bottleneck


@pytest.mark.parametrize("code_seq_len", sorted(CODE_GRIDS))
def test_actions_have_one_vector_per_code_position(code_seq_len):
    grid = {1: 8, 2: 8, 4: 8, 16: 16, 64: 16, 256: 32}[code_seq_len]   # LAQ's grids
    model = LatentActionModel(dim=16, quant_dim=4, image_size=grid * 2, patch_size=2,
                              spatial_depth=1, temporal_depth=1, dim_head=8, heads=2,
                              code_seq_len=code_seq_len)
    tokens = torch.randn(3, 2, grid, grid, 16)
    assert model.action_vectors(tokens).shape == (3, code_seq_len, 4)
    frames = torch.rand(3, 2, 3, grid * 2, grid * 2)
    assert torch.equal(model.unpatch(model.patches(frames)[:, 1]), frames[:, 1])
    for other in (6, 12):                      # grids LAQ has no stack for: the general rule
        model = LatentActionModel(dim=16, quant_dim=4, image_size=other * 2, patch_size=2,
                                  spatial_depth=1, temporal_depth=1, dim_head=8, heads=2,
                                  code_seq_len=4)
        assert model.action_vectors(torch.randn(2, 2, other, other, 16)).shape == (2, 4, 4)


def test_nsvq_substitutes_the_residual_by_noise_of_its_norm_and_trains_the_codebook():
    model = small().train()
    actions = torch.randn(5, 4, 4, requires_grad=True)
    noise = torch.randn(5, 16)
    z, info = model.bottleneck_latent(actions, noise)
    hard = model.codebook[info["codes"]]
    nearest = torch.cdist(actions.detach().reshape(-1, 4), model.codebook.detach()).argmin(1)
    assert torch.equal(info["codes"].reshape(-1), nearest)
    gap, residual = (z - actions).norm(dim=-1), (actions - hard).norm(dim=-1)
    assert torch.allclose(gap, residual, rtol=1e-5)          # same norm as the residual...
    direction = noise.view(5, 4, 4) / noise.view(5, 4, 4).norm(dim=-1, keepdim=True)
    assert torch.allclose((z - actions) / gap[..., None], direction, atol=1e-5)  # ...noise's way
    z.sum().backward()
    assert model.codebook.grad is not None and model.codebook.grad.abs().sum() > 0
    z_eval, _ = model.bottleneck_latent(actions)             # no noise: the code itself
    assert torch.equal(z_eval, hard)


@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian"])
def test_the_encoder_learns_through_the_bottleneck_without_noise_given(bottleneck):
    """model(x) in training mode draws its own noise, as VanillaVAE does: the gradient reaches
    the encoder (decoding the hard code would cut it off for NSVQ)."""
    model = small(bottleneck=bottleneck).train()
    pair = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    model.loss_function(pair, model(pair))["loss"].backward()
    assert model.enc_spatial.layers[0]["attn"].to_q.weight.grad.abs().sum() > 0
    assert model.project_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian"])
def test_another_pairs_action_changes_the_prediction_and_the_own_one_does_not(bottleneck):
    """What images/samples shows: the current frames decoded with the next pair's action."""
    model = small(bottleneck=bottleneck).eval()
    pair = torch.rand(4, 2, 3, 32, 32) * 2 - 1
    own = model.reconstruct(pair)
    assert torch.allclose(model.reconstruct(pair, action_from=pair), own, atol=1e-5)
    assert not torch.allclose(model.reconstruct(pair, action_from=pair.roll(1, 0)), own,
                              atol=1e-3)
    assert torch.equal(own, model.evaluate_batch(pair)[0])


def test_refill_schedule_is_laqs():
    expected = set(range(10, 100, 10)) | set(range(100, 1000, 100)) | set(range(500, 5000, 500))
    assert {s for s in range(7000) if refill_steps(s)} == expected


@pytest.mark.parametrize("refill", ["lapa", "separated"])
def test_refilled_codes_copy_used_ones_and_separated_noise_sets_them_apart(refill):
    model = small(code_refill=refill)
    model.code_counts.copy_(torch.tensor([0, 0, 0, 0, 0, 3, 50, 70]))   # 6 and 7 used (>= 9)
    before = model.codebook.detach().clone()
    model.refill_unused_codes(step=10)
    after = model.codebook.detach()
    assert torch.equal(after[6:], before[6:]) and model.code_counts.sum() == 0
    assert int(model.codes_refilled) == 6
    to_used = torch.cdist(after[:6], after[6:]).min(dim=1).values
    among = torch.cdist(after[:6], after[:6]) + torch.eye(6) * 1e9
    if refill == "lapa":                          # LAPA's copies stay duplicates of used codes
        assert to_used.max() < 1e-6
    else:
        assert to_used.min() > 1e-3 and among.min() > 1e-3
        assert to_used.max() < before[6:].std(0).norm() * 2   # still near the code they copy


def test_gaussian_rate_is_the_kl_in_bits_held_by_the_capacity_term():
    model = small(bottleneck="gaussian", target_rate_bits=12.0, rate_weight=0.5).train()
    pair = torch.rand(6, 2, 3, 32, 32) * 2 - 1
    out = model(pair, torch.randn(6, model.noise_dim))
    losses = model.loss_function(pair, out)
    mu, logvar = out[2]["mu"], out[2]["logvar"]
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl_bits = torch.distributions.kl_divergence(q, p).flatten(1).sum(1) / math.log(2)
    assert losses["rate_bits"].item() == pytest.approx(kl_bits.mean().item(), rel=1e-5)
    assert (losses["loss"] - losses["recon_loss"]).item() == pytest.approx(
        0.5 * abs(kl_bits.mean().item() - 12.0), rel=1e-4)
    assert losses["recon_loss"].item() == pytest.approx(
        ((out[0] - (pair[:, 1] + 1) / 2) ** 2).mean().item(), rel=1e-6)   # LAQ's [0, 1] MSE


def test_lagrange_multiplier_moves_after_each_training_step_and_never_in_evaluation(
        demo_data, tmp_path):
    """Dual ascent: after each step the multiplier grows by rate_weight x (the step's rate -
    target); the step backpropagates through the penalty (an in-place update of the
    multiplier inside loss_function broke backward), and scoring changes nothing."""
    from trainer import Trainer
    cfg = lam_config(demo_data, str(tmp_path), "gaussian")
    cfg["model_params"].update(rate_control="lagrange", target_rate_bits=0.5, rate_weight=0.1)
    trainer = Trainer(config_from_dict(cfg), Runtime(), steps_per_epoch=10)
    model = trainer.bare
    with torch.no_grad():
        model.to_logvar.bias.fill_(-4.0)           # a narrow posterior: many bits
    pairs = torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8)
    expected = 0.0
    for _ in range(3):
        losses, _, finite = trainer.step(pairs)
        assert bool(finite)
        expected += 0.1 * (losses["rate_bits"].item() - 0.5)
        assert model.rate_multiplier.item() == pytest.approx(expected, rel=1e-5)
    assert model.rate_multiplier.item() > 0
    before = model.rate_multiplier.clone()
    x = pairs.float() / 127.5 - 1
    model.loss_function(x, model(x, torch.randn(4, model.noise_dim)))   # as validation does
    model.eval()
    model.evaluate_batch(x)
    assert torch.equal(model.rate_multiplier, before)


def test_config_needs_pairs_for_latent_action_models_and_checks_values(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="data_params.frame_offset: LatentActionModel trains on "
                                          "frame pairs"):
        config_from_dict(lam_config(demo_data, str(tmp_path), **{"data_params.frame_offset": 0}))
    with pytest.raises(ConfigError, match="frame_offset: VanillaVAE trains on single frames"):
        config_from_dict(tiny_config(demo_data, str(tmp_path), **{"data_params.frame_offset": 3}))
    bad = lam_config(demo_data, str(tmp_path))
    bad["model_params"]["patch_size"] = 5
    with pytest.raises(ConfigError, match="image_size 32 is not a multiple of patch_size 5"):
        config_from_dict(bad)


def test_a_bad_model_value_is_one_line_exit_2_and_nothing_written(demo_data, tmp_path):
    """Values only a model's constructor checks (here BetaVAE's beta) fail before the run
    directory exists, as every other config error does."""
    cfg = tiny_config(demo_data, str(tmp_path / "logs"))
    cfg["model_params"].update(name="BetaVAE", beta=-1.0)
    result = run_in_process("train_single_gpu.py", "--config", write_config(tmp_path / "c.yaml", cfg),
                        "--device", "cpu")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'c.yaml'}: model_params: beta, gamma and max_capacity must be >= 0, "
        f"capacity_steps >= 1 (BetaVAE)"]
    assert not (tmp_path / "logs").exists()


# Biases whose true gradient is (near) zero, so that Adam scales float noise up to +-LR steps:
# the position bias's last one adds a constant to every logit of a softmax row; the action
# pooling's biases cancel in future - current (exactly for the last conv, where the ReLU agrees
# for the first). Every other tensor must agree to float tolerance.
NEAR_GRADIENT_FREE = re.compile(r"^position_bias\.mlp\.4\.bias$|^pool\.\d+\.bias$")


def final(tmp_path, name):
    return torch.load(tmp_path / "logs" / name / "checkpoints" / "vae_final.pt",
                      weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian"])
def test_two_processes_train_exactly_like_one(demo_data, tmp_path, bottleneck):
    """12 steps over a code refill (step 10): 2 ranks x 8 pairs == 1 process x 16 pairs. The
    Gaussian holds its rate by a Lagrange multiplier (the state a family updates after the
    step): validation runs between steps and must not move it."""
    def config(name):
        cfg = lam_config(demo_data, str(tmp_path / "logs"), bottleneck, **{
            "logging_params.name": name, "data_params.train_batch_size": 16,
            "data_params.val_batch_size": 6, "trainer_params.max_steps": 12,
            "trainer_params.check_val_every_n_epoch": 3, "exp_params.hflip": True,
            "logging_params.save_every_n_steps": 6, "trainer_params.max_epochs": 10})
        if bottleneck == "gaussian":
            cfg["model_params"].update(rate_control="lagrange", target_rate_bits=1.0)
        return cfg

    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "train_ddp.py", "--config", write_config(tmp_path / "ddp.yaml",
                                                              config("ddp")),
                     "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    train(config_from_dict(config("single")), Runtime())
    one, two = final(tmp_path, "single"), final(tmp_path, "ddp")
    assert one["step"] == two["step"] == 12
    assert two["world_size"] == 2 and one["model"].keys() == two["model"].keys()
    for key, value in one["model"].items():
        if NEAR_GRADIENT_FREE.search(key):
            continue
        if value.is_floating_point():
            assert torch.allclose(value, two["model"][key], atol=1e-5, rtol=1e-4), key
        else:
            assert torch.equal(value, two["model"][key]), key
    if bottleneck == "nsvq":
        assert int(one["model"]["codes_refilled"]) > 0         # a refill happened, in both alike
    else:
        assert one["model"]["rate_multiplier"].abs() > 0       # it moved, in both alike
    events = EventAccumulator(str(tmp_path / "logs" / "single"),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    extra = {"train/perplexity"} if bottleneck == "nsvq" else {"train/rate_bits", "train/kld"}
    assert {"train/loss", "train/recon_loss", "val/loss", "val/psnr"} | extra <= \
        set(events.Tags()["scalars"])
    assert {"images/reconstructions", "images/samples"} <= set(events.Tags()["images"])


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian"])
def test_resume_is_exact(demo_data, tmp_path, bottleneck):
    def cfg(name, steps):
        return config_from_dict(lam_config(demo_data, str(tmp_path / "logs"), bottleneck, **{
            "logging_params.name": name, "trainer_params.max_steps": steps,
            "trainer_params.max_epochs": 10, "exp_params.hflip": True,
            "exp_params.warmup_steps": 3}))

    train(cfg("straight", 12), Runtime())                 # 5 batches of 8 pairs per epoch
    train(cfg("resumed", 7), Runtime())                   # stops mid-epoch, after a refill
    train(cfg("resumed", 12), Runtime(), resume="auto")
    a, b = final(tmp_path, "straight"), final(tmp_path, "resumed")
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for k, state in a["optimizer"]["model"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["model"]["state"][k][name]), (k, name)
    assert len(os.listdir(tmp_path / "logs" / "resumed" / "images")) > 0


def test_evaluate_points_latent_action_models_to_the_comparison(demo_data, tmp_path):
    path = train(config_from_dict(lam_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_steps": 2})), Runtime())
    result = run_in_process("evaluate.py", "--checkpoint", path, "--output", str(tmp_path / "ev"),
                        "--data-path", demo_data, "--lpips-net", "none", "--fid", "none",
                        "--device", "cpu")
    assert result.returncode == 2
    assert f"compare_with_laq.py --model {path}" in result.stderr
    assert not (tmp_path / "ev").exists()


def test_a_one_channel_model_trains_on_grey_frames_as_pil_makes_them(demo_data, tmp_path):
    """channels: 1 (LAQ's key): the frames come grey, PIL's luminance of the RGB frame."""
    import numpy as np
    from PIL import Image

    from dataset_sthv2 import build_split
    cfg = lam_config(demo_data, str(tmp_path / "logs"), "nsvq",
                     **{"trainer_params.max_steps": 2, "data_params.resize": "stretch"})
    cfg["model_params"]["channels"] = 1
    cfg = config_from_dict(cfg)
    pairs = build_split(cfg.data_params, "train", 32, pair_offset=3, clamp_pairs=True,
                        channels=1)
    pair, bad = pairs[0]
    assert pair.shape == (2, 1, 32, 32) and pair.dtype == torch.uint8 and not bad
    colour = build_split(cfg.data_params, "train", 32, pair_offset=3, clamp_pairs=True)[0][0]
    expected = Image.fromarray(colour[0].permute(1, 2, 0).numpy()).convert("L")
    assert np.array_equal(pair[0, 0].numpy(), np.asarray(expected))
    final = torch.load(train(cfg, Runtime()), weights_only=True)
    assert final["step"] == 2
