"""Latent action models in LAQ's shape: the architecture's size, the two bottlenecks, LAQ's code
refill, and training with the one loop (1 process == 2 processes, exact resume)."""
import itertools
import math
import os
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import config_from_dict
from conftest import run_in_process, run_script, tiny_config, write_config
from errors import ConfigError
from action_bottlenecks import refill_steps
from latent_action_model import CODE_GRIDS, LatentActionModel
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
                        temporal_depth, dim_head, heads, code_seq_len, unused_context=True,
                        action=True):
    """LAQ's parameters counted by hand from its architecture (LAQ_INTERFACE.md), for LAPA's
    code_seq_len 4 on an 8 x 8 grid (two 3 x 3 convs between project_in and the codebook).
    `unused_context`: with the context norm each self-attention holds and never uses;
    `action=False`: the model without an action (no encoder, no action convs or codebook)."""
    d, patch, inner = dim, 3 * patch_size ** 2, dim_head * heads
    ff_inner = int(4 * 2 / 3 * dim)                                    # GEGLU's width
    assert (image_size // patch_size, code_seq_len) == (8, 4)
    embed = 2 * patch + (patch * d + d) + 2 * d             # LayerNorm, Linear, LayerNorm
    position_bias = (2 * d + d) + (d * d + d) + (d * heads + heads)
    peg = 27 * d + d                                        # depthwise 3x3x3 conv
    attention = d + 3 * inner * d + inner * d + 2 * dim_head   # gain, q/kv, out, q/k scales
    cross = attention + d + 2 * heads * 2 * dim_head        # + context norm, 2 null keys/values
    feed_forward = 2 * d + d * 2 * ff_inner + ff_inner * d  # LayerNorm with a bias, GEGLU
    layer = peg + attention + feed_forward + (d if unused_context else 0)
    encoder = (spatial_depth + temporal_depth) * layer + 2 * d
    decoder = spatial_depth * (layer + cross) + d
    actions = (d * quant_dim + quant_dim) + 2 * (9 * quant_dim ** 2 + quant_dim) \
        + codebook_size * quant_dim
    to_pixels = d * patch + patch
    return embed + position_bias + decoder + (quant_dim * d + d) + to_pixels + \
        (encoder + actions if action else 0)


@pytest.mark.slow
def test_parameter_count_at_lapas_settings_is_laqs_exactly():
    """`laq` holds LAQ's 343,796,080 parameters (measured on LAPA's code), the hand count;
    `corrected` lacks the unused context norms (24 self-attentions x 1024); the Gaussian has a
    Linear(quant_dim, quant_dim) for the log-variance instead of the codebook; `none` has no
    encoder, action convs or codebook."""
    assert laq_parameter_count(**LAPA) == 343_796_080
    gaussian = 32 * 32 + 32 - 8 * 32
    expected = {("laq", "nsvq"): laq_parameter_count(**LAPA),
                ("laq", "gaussian"): laq_parameter_count(**LAPA) + gaussian,
                ("laq", "none"): laq_parameter_count(**LAPA, action=False),
                ("corrected", "nsvq"): laq_parameter_count(**LAPA, unused_context=False)}
    assert expected[("corrected", "nsvq")] == 343_796_080 - 24 * 1024
    with torch.device("meta"):
        for (architecture, bottleneck), count in expected.items():
            model = LatentActionModel(**LAPA, architecture=architecture, bottleneck=bottleneck)
            assert sum(p.numel() for p in model.parameters()) == count, (architecture,
                                                                          bottleneck)


@pytest.mark.parametrize("code_seq_len", sorted(CODE_GRIDS))
def test_actions_have_one_vector_per_code_position(code_seq_len):
    grid = {1: 8, 2: 8, 4: 8, 16: 16, 64: 16, 256: 32}[code_seq_len]   # LAQ's grids
    model = LatentActionModel(dim=16, quant_dim=4, image_size=grid * 2, patch_size=2,
                              spatial_depth=1, temporal_depth=1, dim_head=8, heads=2,
                              code_seq_len=code_seq_len)
    emb = torch.randn(3, 2, grid, grid, 16)
    assert model.action_vectors(emb).shape == (3, code_seq_len, 4)
    frames = torch.rand(3, 2, 3, grid * 2, grid * 2)
    assert torch.equal(model.unpatch(model.patches(frames)[:, 1]), frames[:, 1])
    for other in (6, 12):                      # grids LAQ has no stack for: the general rule
        model = LatentActionModel(dim=16, quant_dim=4, image_size=other * 2, patch_size=2,
                                  spatial_depth=1, temporal_depth=1, dim_head=8, heads=2,
                                  code_seq_len=4)
        assert model.action_vectors(torch.randn(2, 2, other, other, 16)).shape == (2, 4, 4)


# --- the four places where LAPA's code computes something else than its description --------

def cosine_attention(q, k, v, q_scale, k_scale, heads, bias=None):
    """Multi-head attention written out: q, k L2-normalised, scaled per dim, times 8."""
    b, n, _ = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    q = q / q.norm(dim=-1, keepdim=True) * q_scale
    k = k / k.norm(dim=-1, keepdim=True) * k_scale
    logits = q @ k.transpose(-1, -2) * 8 + (0 if bias is None else bias)
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("keys_from", ["input", "norm"])
def test_self_attention_reads_keys_and_values_from_the_input_in_laq(keys_from):
    """1. laq: queries from LayerNorm(x) (gain only), keys and values from x itself."""
    from laq_transformer import Attention
    torch.manual_seed(0)
    attn = Attention(12, 4, 3, keys_from=keys_from)
    with torch.no_grad():
        attn.norm.gain.uniform_(0.5, 1.5)
        attn.q_scale.uniform_(0.5, 2)
        attn.k_scale.uniform_(0.5, 2)
    x, bias = torch.randn(2, 5, 12) * 3 + 1, torch.randn(3, 5, 5)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False,
                                                              keepdim=True) + 1e-5)
    normed = normed * attn.norm.gain
    source = x if keys_from == "input" else normed
    k, v = (source @ attn.to_kv.weight.t()).chunk(2, dim=-1)
    expected = cosine_attention(normed @ attn.to_q.weight.t(), k, v, attn.q_scale,
                                attn.k_scale, 3, bias) @ attn.to_out.weight.t()
    assert torch.allclose(attn(x, bias=bias), expected, atol=1e-5)


def test_cross_attention_reads_its_null_slots_interleaved_and_a_normalised_context():
    """LAQ's null_kv (heads, 2n, dim_head): row 2i is null key i, row 2i + 1 null value i."""
    from laq_transformer import Attention
    torch.manual_seed(0)
    attn = Attention(12, 4, 3, cross=True)
    x, context = torch.randn(2, 5, 12), torch.randn(2, 4, 12) * 2
    ln = lambda t, g: torch.nn.functional.layer_norm(t, t.shape[-1:], g)  # noqa: E731
    k, v = (ln(context, attn.context_norm.gain) @ attn.to_kv.weight.t()).chunk(2, dim=-1)
    null = attn.null_kv                                               # (3, 4, 4)
    merge = lambda t: t.transpose(0, 1).reshape(1, -1, 12).expand(2, -1, -1)  # noqa: E731
    k = torch.cat([merge(null[:, [0, 2]]), k], dim=1)
    v = torch.cat([merge(null[:, [1, 3]]), v], dim=1)
    expected = cosine_attention(ln(x, attn.norm.gain) @ attn.to_q.weight.t(), k, v,
                                attn.q_scale, attn.k_scale, 3) @ attn.to_out.weight.t()
    assert torch.allclose(attn(x, context=context), expected, atol=1e-5)


def test_the_temporal_peg_reads_tokens_in_laqs_memory_layout():
    """2. The temporal stack holds tokens as ((b h w), t, d); LAQ's PEG reads that memory as
    (b, t, h, w, d): token n = ((b*H + h)*W + w)*T + t sits where grid position (b', t', h', w')
    has flat index ((b'*T + t')*H + h')*W + w'. `grid` puts each token at its own (t, h, w)."""
    from laq_transformer import Transformer
    b, t, h, w = 2, 2, 3, 4
    index = torch.arange(b * h * w * t).float().reshape(b * h * w, t, 1)
    for layout in ("memory", "grid"):
        stack = Transformer(1, 0, 1, 1, "time", peg_layout=layout)
        grid = stack.to_grid(index, (b, t, h, w))
        assert torch.equal(stack.from_grid(grid), index), layout
        for pb, pt, ph, pw in itertools.product(range(b), range(t), range(h), range(w)):
            own = ((pb * h + ph) * w + pw) * t + pt                 # the token of (pb, pt, ph, pw)
            memory = ((pb * t + pt) * h + ph) * w + pw
            assert grid[pb, pt, ph, pw, 0] == (memory if layout == "memory" else own), layout
    space = Transformer(1, 0, 1, 1, "space", peg_layout="memory")   # ((b t), (h w), d): right
    tokens = torch.arange(b * t * h * w).float().reshape(b * t, h * w, 1)
    assert torch.equal(space.to_grid(tokens, (b, t, h, w)).flatten(), tokens.flatten())


@pytest.mark.parametrize("architecture", ["laq", "corrected"])
def test_action_tokens_are_read_across_positions_in_laq(architecture):
    """3. laq: with flat = z.reshape(B, L * quant_dim), the decoder's token j is project_out
    of [flat[c * L + j] for c in range(quant_dim)]; corrected: position j's own vector."""
    model = small(architecture=architecture)
    z = torch.randn(3, 4, 4)                                          # (B, L, quant_dim)
    flat = z.reshape(3, 16)
    for j in range(4):
        vector = torch.stack([flat[:, c * 4 + j] for c in range(4)], dim=1) \
            if architecture == "laq" else z[:, j]
        assert torch.allclose(model.action_tokens(z)[:, j], model.project_out(vector),
                              atol=1e-6), j


def test_the_feed_forward_norm_has_a_bias_that_enters_the_function():
    """4. LAQ's feed-forward LayerNorm is torch's, with a learnable bias (...layers.{i}.3.0)."""
    from laq_layout import laq_name
    model = small().eval()
    names = dict(model.named_parameters())
    assert laq_name("dec_spatial.layers.0.ff.norm.bias") == \
        "dec_spatial_transformer.layers.0.3.0.bias"
    pair = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    before = model.reconstruct(pair)
    with torch.no_grad():
        names["dec_spatial.layers.0.ff.norm.bias"].fill_(0.5)
    assert not torch.allclose(model.reconstruct(pair), before, atol=1e-4)


# LAQ's state-dict names for spatial_depth = temporal_depth = 1, code_seq_len 4 on an 8 x 8
# grid, from LAQ_INTERFACE.md (with each LayerNorm's weight / bias or gamma / beta)
def laq_names():
    layer = ["0.dsconv.weight", "0.dsconv.bias"] + [
        f"1.{n}" for n in ("null_kv", "q_scale", "k_scale", "norm.gamma", "norm.beta",
                           "context_norm.gamma", "context_norm.beta", "to_q.weight",
                           "to_kv.weight", "to_out.weight")] + [
        "3.0.weight", "3.0.bias", "3.1.weight", "3.4.weight"]
    cross = [f"2.{n}" for n in ("null_kv", "q_scale", "k_scale", "norm.gamma", "norm.beta",
                                "context_norm.gamma", "context_norm.beta", "to_q.weight",
                                "to_kv.weight", "to_out.weight")]
    names = [f"spatial_rel_pos_bias.net.{m}.{p}" for m in ("0.0", "1.0", "2")
             for p in ("weight", "bias")]
    names += [f"to_patch_emb_first_frame.{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    for stack in ("enc_spatial", "enc_temporal", "dec_spatial"):
        extra = cross if stack == "dec_spatial" else []
        names += [f"{stack}_transformer.layers.0.{n}" for n in layer + extra]
        names += [f"{stack}_transformer.norm_out.gamma", f"{stack}_transformer.norm_out.beta"]
    names += ["vq.codebooks"] + [f"vq.{m}.{p}" for m in ("project_in", "project_out",
                                                        "cnn_encoder.0", "cnn_encoder.2")
                                 for p in ("weight", "bias")]
    return set(names + ["to_pixels_first_frame.0.weight", "to_pixels_first_frame.0.bias"])


def test_a_laq_model_converts_to_laqs_state_dict_and_back_exactly():
    from laq_layout import from_laq_state, to_laq_state
    torch.manual_seed(0)
    model = LatentActionModel(dim=32, quant_dim=4, image_size=64, patch_size=8,
                              spatial_depth=1, temporal_depth=1, dim_head=8, heads=2)
    laq = to_laq_state(model)
    assert set(laq) == laq_names()
    assert laq["enc_spatial_transformer.layers.0.1.null_kv"].shape == (2, 0, 8)
    assert laq["dec_spatial_transformer.layers.0.2.null_kv"].shape == (2, 4, 8)
    torch.manual_seed(1)
    other = LatentActionModel(dim=32, quant_dim=4, image_size=64, patch_size=8,
                              spatial_depth=1, temporal_depth=1, dim_head=8, heads=2)
    state, report = from_laq_state(laq, other)
    other.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert report["placed"] == len([k for k in laq if not k.endswith(".beta")]) - 3
    assert set(report["no_place"]) == {k for k in laq if k.endswith(".beta")} | {
        f"{s}_transformer.layers.0.1.null_kv" for s in ("enc_spatial", "enc_temporal",
                                                        "dec_spatial")}


def test_a_laq_state_that_is_not_laqs_is_refused_naming_what():
    from errors import CheckpointError
    from laq_layout import from_laq_state, to_laq_state
    model = LatentActionModel(dim=32, quant_dim=4, image_size=64, patch_size=8,
                              spatial_depth=1, temporal_depth=1, dim_head=8, heads=2)
    laq = to_laq_state(model)
    laq["enc_spatial_transformer.norm_out.beta"] += 0.1
    with pytest.raises(CheckpointError, match="norm_out.beta is not zero"):
        from_laq_state(laq, model)
    laq = to_laq_state(model)
    del laq["vq.codebooks"]
    laq["enc_spatial_transformer.layers.1.0.dsconv.weight"] = torch.zeros(32, 1, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. \['vq.codebooks'\]\), 1 with "
                                              r"no place \(e.g. \['enc_spatial_transformer"):
        from_laq_state(laq, model)
    with pytest.raises(CheckpointError, match="architecture laq with bottleneck nsvq"):
        to_laq_state(small(bottleneck="gaussian"))


# --- the bottlenecks ---------------------------------------------------------------------

def test_nsvq_substitutes_the_residual_by_noise_of_its_norm_and_trains_the_codebook():
    model = small().train()
    nsvq = model.bottleneck
    actions = torch.randn(5, 4, 4, requires_grad=True)
    noise = torch.randn(5, 16)
    z, info = nsvq(actions, noise)
    hard = nsvq.codebook[info["codes"]]
    nearest = torch.cdist(actions.detach().reshape(-1, 4), nsvq.codebook.detach()).argmin(1)
    assert torch.equal(info["codes"].reshape(-1), nearest)
    gap, residual = (z - actions).norm(dim=-1), (actions - hard).norm(dim=-1)
    assert torch.allclose(gap, residual, rtol=1e-5)          # same norm as the residual...
    direction = noise.view(5, 4, 4) / noise.view(5, 4, 4).norm(dim=-1, keepdim=True)
    assert torch.allclose((z - actions) / gap[..., None], direction, atol=1e-5)  # ...noise's way
    z.sum().backward()
    assert nsvq.codebook.grad is not None and nsvq.codebook.grad.abs().sum() > 0
    z_eval, _ = nsvq(actions)                                 # no noise: the code itself
    assert torch.equal(z_eval, hard)


@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian", "none"])
def test_the_model_learns_through_its_bottleneck_without_noise_given(bottleneck):
    """model(x) in training mode draws its own noise, as VanillaVAE does: the gradient reaches
    the encoder (decoding the hard code would cut it off for NSVQ); without an action there is
    no encoder and the decoder learns alone."""
    model = small(bottleneck=bottleneck).train()
    pair = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    model.loss_function(pair, model(pair))["loss"].backward()
    assert model.dec_spatial.layers[0]["attn"].to_q.weight.grad.abs().sum() > 0
    if bottleneck == "none":
        assert not hasattr(model, "enc_spatial") and model.noise_dim == 0
    else:
        assert model.enc_spatial.layers[0]["attn"].to_q.weight.grad.abs().sum() > 0
        assert model.project_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian", "none"])
def test_another_pairs_action_changes_the_prediction_and_the_own_one_does_not(bottleneck):
    """What images/samples shows: the current frames decoded with the next pair's action.
    Without an action the prediction is the current frame's alone."""
    model = small(bottleneck=bottleneck).eval()
    pair = torch.rand(4, 2, 3, 32, 32) * 2 - 1
    own = model.reconstruct(pair)
    assert torch.allclose(model.predict(pair[:, 0], model.infer_actions(pair)), own, atol=1e-5)
    other = model.predict(pair[:, 0], model.infer_actions(pair.roll(1, 0)))
    assert torch.allclose(other, own, atol=1e-5) == (bottleneck == "none")
    assert torch.equal(own, model.evaluate_batch(pair)[0])
    future_swapped = torch.stack([pair[:, 0], pair[:, 1].roll(1, 0)], dim=1)
    assert torch.allclose(model.reconstruct(future_swapped), own, atol=1e-5) == \
        (bottleneck == "none")


def test_refill_schedule_is_laqs():
    expected = set(range(10, 100, 10)) | set(range(100, 1000, 100)) | set(range(500, 5000, 500))
    assert {s for s in range(7000) if refill_steps(s)} == expected


def test_a_code_counts_once_per_batch_it_appears_in_and_refills_as_lapas_rule():
    """LAPA counts the batches a code appears in (its indexed += 1) and, at a refill step,
    replaces codes with count / batch < 0.1 (batch = pairs per process) by the used codes in
    order when there are enough of them, then resets every count; the refill runs in the
    training forward pass after that batch is counted."""
    model = small().train()
    nsvq = model.bottleneck
    nsvq.counts = torch.tensor([0, 0, 0, 0, 0, 2, 3, 3])
    with torch.no_grad():                  # away from 0, where 1e-12 of noise is not lost
        nsvq.codebook.copy_(torch.randn(8, 4) + 10)
    codes = torch.full((20, 4), 5)                     # every pair's four actions: code 5
    nsvq.observe({"codes": codes}, step=3)             # not a refill step: counted once
    assert nsvq.counts.tolist() == [0, 0, 0, 0, 0, 3, 3, 3]
    before = nsvq.codebook.detach().clone()
    nsvq.observe({"codes": codes}, step=10)            # 4, 3, 3 of 20 pairs >= 0.1 * 20 = 2
    after = nsvq.codebook.detach()
    assert torch.equal(after[5:], before[5:])         # fewer used than unused: copies at random
    assert all(any(torch.equal(row, used) for used in before[5:]) for row in after[:5])
    assert nsvq.counts.sum() == 0 and int(nsvq.refilled) == 5
    nsvq.counts = torch.tensor([2, 2, 2, 2, 2, 0, 0, 0])   # 5 used, 3 unused: the first 3 used
    before = nsvq.codebook.detach().clone()
    nsvq.refill(batch=20, step=20)
    assert torch.equal(nsvq.codebook.detach()[5:], before[:3])


def test_separated_refill_noise_sets_the_copies_apart():
    model = small(code_refill="separated")
    nsvq = model.bottleneck
    nsvq.counts = torch.tensor([0, 0, 0, 0, 0, 3, 50, 70])
    before = nsvq.codebook.detach().clone()
    nsvq.refill(batch=20, step=10)
    after = nsvq.codebook.detach()
    assert torch.equal(after[5:], before[5:])
    to_used = torch.cdist(after[:5], after[5:]).min(dim=1).values
    among = torch.cdist(after[:5], after[:5]) + torch.eye(5) * 1e9
    assert to_used.min() > 1e-3 and among.min() > 1e-3
    assert to_used.max() < before[5:].std(0).norm() * 2   # still near the code they copy


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
    multiplier = model.bottleneck.rate_multiplier
    with torch.no_grad():
        model.bottleneck.to_logvar.bias.fill_(-4.0)     # a narrow posterior: many bits
    pairs = torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8)
    expected = 0.0
    for _ in range(3):
        losses, _, finite = trainer.step(pairs)
        assert bool(finite)
        expected += 0.1 * (losses["rate_bits"].item() - 0.5)
        assert multiplier.item() == pytest.approx(expected, rel=1e-5)
    assert multiplier.item() > 0
    before = multiplier.clone()
    x = pairs.float() / 127.5 - 1
    model.loss_function(x, model(x, torch.randn(4, model.noise_dim)))   # as validation does
    model.eval()
    model.evaluate_batch(x)
    assert torch.equal(model.bottleneck.rate_multiplier, before)


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


def torchrun(tmp_path, cfg, *args):
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_ddp.py", "--config", write_config(tmp_path / "ddp.yaml", cfg),
                        "--device", "cpu", *args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian", "none"])
def test_two_processes_train_exactly_like_one(demo_data, tmp_path, bottleneck):
    """12 steps over a code refill (step 10): 2 ranks x 8 pairs == 1 process x 16 pairs. NSVQ
    counts codes in the global batch (refill_scope: global); the Gaussian holds its rate by a
    Lagrange multiplier (the state a family updates after the step): validation runs between
    steps and must not move it."""
    def config(name):
        cfg = lam_config(demo_data, str(tmp_path / "logs"), bottleneck, **{
            "logging_params.name": name, "data_params.train_batch_size": 16,
            "data_params.val_batch_size": 6, "trainer_params.max_steps": 12,
            "trainer_params.check_val_every_n_epoch": 3, "exp_params.hflip": True,
            "logging_params.save_every_n_steps": 6, "trainer_params.max_epochs": 10})
        cfg["model_params"].update({"nsvq": {"refill_scope": "global"}, "none": {},
                                    "gaussian": {"rate_control": "lagrange",
                                                 "target_rate_bits": 1.0}}[bottleneck])
        return cfg

    torchrun(tmp_path, config("ddp"))
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
    if bottleneck == "nsvq":                          # a refill happened, in both alike
        assert int(one["rank_model_state"][0]["refilled"]) > 0
        assert [int(r["refilled"]) for r in two["rank_model_state"]] == \
            [int(one["rank_model_state"][0]["refilled"])] * 2
    if bottleneck == "gaussian":
        assert one["model"]["bottleneck.rate_multiplier"].abs() > 0   # it moved, in both alike
    events = EventAccumulator(str(tmp_path / "logs" / "single"),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    extra = {"nsvq": {"train/perplexity", "train/codes_refilled"}, "none": set(),
             "gaussian": {"train/rate_bits", "train/kld"}}[bottleneck]
    assert {"train/loss", "train/recon_loss", "val/loss", "val/psnr"} | extra <= \
        set(events.Tags()["scalars"])
    assert {"images/reconstructions", "images/samples"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_each_process_refills_its_own_codes_as_lapa_and_resumes_with_them(demo_data, tmp_path):
    """refill_scope: process (LAPA's): ranks count their own batches, so their codebooks part
    at a refill; the checkpoint keeps each rank's, and a resumed run continues each exactly."""
    def config(name, steps):
        cfg = lam_config(demo_data, str(tmp_path / "logs"), "nsvq", **{
            "logging_params.name": name, "data_params.train_batch_size": 16,
            "trainer_params.max_steps": steps, "trainer_params.check_val_every_n_epoch": 9,
            "trainer_params.max_epochs": 10, "logging_params.save_every_n_steps": 100})
        # a high threshold leaves fewer codes used than unused: LAPA's shuffled repeat, drawn
        # on each rank from its own seed
        cfg["model_params"]["refill_threshold"] = 0.9
        return cfg

    torchrun(tmp_path, config("straight", 12))
    torchrun(tmp_path, config("resumed", 11))
    torchrun(tmp_path, config("resumed", 12), "--resume", "auto")
    a, b = final(tmp_path, "straight"), final(tmp_path, "resumed")
    books = [r["codebook"] for r in a["rank_model_state"]]
    assert not torch.equal(books[0], books[1])          # each rank refilled on its own
    assert torch.equal(a["model"]["bottleneck.codebook"], books[0])
    for mine, theirs in zip(a["rank_model_state"], b["rank_model_state"]):
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", ["nsvq", "gaussian", "none"])
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
    for mine, theirs in zip(a["rank_model_state"], b["rank_model_state"]):
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
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
