"""Latent action models in the shape of LAQ (LAPA's latent action quantization), with a discrete
or a continuous bottleneck, so that "continuous vs discrete" is the only difference.

A pair (current frame, future frame) is cut into patches, embedded, and encoded by a spatial
and a temporal transformer. The action is the difference of the two frames' encodings after a
projection to `quant_dim` and a small conv stack that pools the patch grid to `code_seq_len`
positions. A decoder transformer over the current frame's patch embeddings, cross-attending to
the action tokens, predicts the future frame (MSE on [0, 1] pixels, as LAQ). The bottleneck:

- `nsvq`: LAQ's noise-substitution vector quantiser (Vali & Backstrom 2022): the nearest of
  `codebook_size` codes; in training the residual is replaced by noise of the same norm, so
  the codebook learns through the reconstruction loss alone. Codes chosen fewer than
  `min_code_uses` times since the last check are refilled on LAQ's schedule, either as LAPA
  does (a copy of a used code plus 1e-12 noise: the copies stay duplicates) or with noise that
  separates the copies (`code_refill`).
- `gaussian`: the same positions and width, a diagonal Gaussian posterior N(mu, sigma^2) and a
  reparameterised sample. Its KL to N(0, I) in bits is the rate, held at `target_rate_bits`
  (default 12 = 4 codes x log2(8), LAQ's bound at LAPA's settings) by a capacity term
  rate_weight * |KL - C| or by a Lagrange multiplier updated every step (`rate_control`).

Everything is written for this project from the architecture LAQ publishes; docs/latent_actions.md says
where the two differ. Inside the model pixels are in [0, 1] as LAQ's; the training loop's
[-1, 1] images are mapped on the way in and out.
"""
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoencoder import Autoencoder, gaussian_kl, perplexity
from collectives import all_reduce

CODE_GRIDS = {1: (1, 1), 2: (2, 1), 4: (2, 2), 16: (4, 4), 64: (8, 8), 256: (16, 16)}
# LAQ's own conv stacks (kernel, stride, padding) for the patch grids it was written for
LAQ_POOLING = {(8, 1): [(3, 2, 1), (4, 1, 0)], (8, 2): [(3, 2, 1), ((3, 4), 1, 0)],
               (8, 4): [(3, 2, 1), (3, 1, 0)], (16, 16): [(3, 2, 1), (3, 2, 1)],
               (16, 64): [(3, 2, 1)], (32, 256): [(3, 2, 1)]}
LAPA_REFILL_NOISE = 1e-12


def refill_steps(step):
    """LAQ's schedule for refilling unused codes: every 10 steps below 100, every 100 below
    1,000, every 500 below 5,000, never after (step 0 excluded)."""
    return step > 0 and ((step < 100 and step % 10 == 0) or (step < 1000 and step % 100 == 0)
                         or (step < 5000 and step % 500 == 0))


def pooling_plan(grid, code_seq_len):
    """(kernel, stride, padding) of each conv from the square patch grid to the action grid:
    LAQ's stack where it has one for this grid, else stride-2 halvings while the grid is at
    least twice the action grid and one conv to the exact size."""
    if (grid, code_seq_len) in LAQ_POOLING:
        return LAQ_POOLING[(grid, code_seq_len)]
    target, plan, size = CODE_GRIDS[code_seq_len], [], [grid, grid]
    while size[0] >= 2 * target[0] and size[1] >= 2 * target[1]:
        plan.append((3, 2, 1))
        size = [(s + 1) // 2 for s in size]
    if size != list(target):
        plan.append(((size[0] - target[0] + 1, size[1] - target[1] + 1), 1, 0))
    return plan


def check_shape(image_size, patch_size, code_seq_len, dim, heads, dim_head):
    """ValueError naming the key when the shape cannot be built."""
    if min(image_size, patch_size, dim, heads, dim_head) < 1:
        raise ValueError("image_size, patch_size, dim, heads and dim_head must be positive")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if code_seq_len not in CODE_GRIDS:
        raise ValueError(f"code_seq_len {code_seq_len} is not one of {sorted(CODE_GRIDS)}")
    grid, (ah, aw) = image_size // patch_size, CODE_GRIDS[code_seq_len]
    if grid < max(ah, aw):
        raise ValueError(f"the {grid}x{grid} patch grid (image_size / patch_size) is smaller "
                         f"than the {ah}x{aw} action grid of code_seq_len {code_seq_len}")


# --- transformer parts ------------------------------------------------------------------------

class GainNorm(nn.Module):
    """LayerNorm with a learned gain and no bias."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gain)


class PEG(nn.Module):
    """Position-generating depthwise 3x3x3 conv over (t, h, w), zero-padded, causal in time."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, grid):                       # (B, t, h, w, d)
        x = F.pad(grid.permute(0, 4, 1, 2, 3), (1, 1, 1, 1, 2, 0))
        return self.conv(x).permute(0, 2, 3, 4, 1)


class Attention(nn.Module):
    """Cosine-similarity attention (q and k L2-normalised, learned per-dim scales, fixed scale
    8); cross-attention normalises its context and prepends learned null key/value pairs."""

    def __init__(self, dim, dim_head, heads, cross=False, num_null_kv=2):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm = GainNorm(dim)
        self.context_norm = GainNorm(dim) if cross else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.null_kv = nn.Parameter(torch.randn(2, heads, num_null_kv, dim_head)) if cross else None
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, context=None, bias=None):
        b = x.shape[0]
        x = self.norm(x)
        context = x if self.context_norm is None else self.context_norm(context)
        split = lambda t: t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(x))
        k, v = (split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        if self.null_kv is not None:
            null_k, null_v = (t.expand(b, -1, -1, -1).to(k.dtype) for t in self.null_kv)
            k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else
                                             bias.to(q.dtype), scale=8.0)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """GainNorm -> Linear -> GEGLU -> Linear, inner width 4 * 2/3 * dim, no biases."""

    def __init__(self, dim):
        super().__init__()
        inner = int(4 * 2 / 3 * dim)
        self.norm = GainNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)
        self.proj_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        h, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class Transformer(nn.Module):
    """`depth` layers of x + PEG(x), x + SelfAttn(x), [x + CrossAttn(x, context)], x + FF(x),
    then a GainNorm. `axis` says how tokens are laid out: "space" (B*t, h*w, d) or "time"
    (B*h*w, t, d); the PEG sees them on the (t, h, w) grid either way."""

    def __init__(self, dim, depth, dim_head, heads, axis, cross=False):
        super().__init__()
        self.axis = axis
        self.layers = nn.ModuleList(nn.ModuleDict({
            "peg": PEG(dim), "attn": Attention(dim, dim_head, heads),
            **({"cross": Attention(dim, dim_head, heads, cross=True)} if cross else {}),
            "ff": FeedForward(dim)}) for _ in range(depth))
        self.norm_out = GainNorm(dim)

    def to_grid(self, x, shape):
        b, t, h, w = shape
        if self.axis == "space":
            return x.reshape(b, t, h, w, -1)
        return x.reshape(b, h, w, t, -1).permute(0, 3, 1, 2, 4)

    def from_grid(self, grid):
        b, t, h, w, d = grid.shape
        if self.axis == "space":
            return grid.reshape(b * t, h * w, d)
        return grid.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)

    def forward(self, x, shape, bias=None, context=None):
        for layer in self.layers:
            x = x + self.from_grid(layer["peg"](self.to_grid(x, shape)))
            x = x + layer["attn"](x, bias=bias)
            if "cross" in layer:
                x = x + layer["cross"](x, context=context)
            x = x + layer["ff"](x)
        return self.norm_out(x)


class PositionBias(nn.Module):
    """Continuous relative position bias: an MLP on log-scaled (dy, dx), one value per head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim),
                                 nn.LeakyReLU(0.1), nn.Linear(dim, heads))

    def forward(self, h, w, device):
        dy, dx = torch.meshgrid(torch.arange(-h + 1, h, device=device),
                                torch.arange(-w + 1, w, device=device), indexing="ij")
        rel = torch.stack([dy, dx], dim=-1).float()
        table = self.mlp(torch.sign(rel) * torch.log1p(rel.abs()))        # (2h-1, 2w-1, heads)
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        bias = table[ys[:, None] - ys[None] + h - 1, xs[:, None] - xs[None] + w - 1]
        return bias.permute(2, 0, 1)                                       # (heads, n, n)


# --- the model --------------------------------------------------------------------------------

class LatentActionModel(Autoencoder):
    """LAQ's shape with a `nsvq` (discrete) or `gaussian` (continuous) action bottleneck."""

    takes_pairs = True                  # items are (current, future) frame pairs
    not_applicable = {"vq_loss": "NSVQ trains its codebook through the reconstruction loss",
                      "elbo": "the model predicts the future frame; it has no image likelihood"}

    def __init__(self, dim: int = 1024, quant_dim: int = 32, codebook_size: int = 8,
                 image_size: int = 256, patch_size: int = 32, spatial_depth: int = 8,
                 temporal_depth: int = 8, dim_head: int = 64, heads: int = 16,
                 code_seq_len: int = 4, channels: int = 3,
                 bottleneck: Literal["nsvq", "gaussian"] = "nsvq",
                 code_refill: Literal["lapa", "separated"] = "separated",
                 min_code_uses: int = 9, target_rate_bits: float = 12.0,
                 rate_control: Literal["capacity", "lagrange"] = "capacity",
                 rate_weight: float = 0.01):
        super().__init__()
        check_shape(image_size, patch_size, code_seq_len, dim, heads, dim_head)
        if min(quant_dim, codebook_size, channels, spatial_depth, temporal_depth) < 1:
            raise ValueError("quant_dim, codebook_size, channels, spatial_depth and "
                             "temporal_depth must be positive")
        if target_rate_bits <= 0 or rate_weight < 0 or min_code_uses < 0:
            raise ValueError("target_rate_bits must be positive, rate_weight and "
                             "min_code_uses >= 0")
        self.bottleneck, self.code_refill, self.min_code_uses = bottleneck, code_refill, min_code_uses
        self.target_rate_bits, self.rate_control = target_rate_bits, rate_control
        self.rate_weight = rate_weight
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid, self.code_seq_len, self.quant_dim = image_size // patch_size, code_seq_len, quant_dim
        self.codebook_size = codebook_size
        patch_dim = channels * patch_size ** 2
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim),
                                         nn.LayerNorm(dim))
        self.position_bias = PositionBias(dim, heads)          # shared by both spatial stacks
        self.enc_spatial = Transformer(dim, spatial_depth, dim_head, heads, "space")
        self.enc_temporal = Transformer(dim, temporal_depth, dim_head, heads, "time")
        self.dec_spatial = Transformer(dim, spatial_depth, dim_head, heads, "space", cross=True)
        self.to_pixels = nn.Linear(dim, patch_dim)
        # the action: project, pool the patch grid to the action grid, future - current
        self.project_in = nn.Linear(dim, quant_dim)
        convs = []
        for kernel, stride, padding in pooling_plan(self.grid, code_seq_len):
            convs += [nn.Conv2d(quant_dim, quant_dim, kernel, stride, padding), nn.ReLU()]
        self.pool = nn.Sequential(*convs[:-1])
        self.project_out = nn.Linear(quant_dim, dim)
        if bottleneck == "nsvq":
            self.codebook = nn.Parameter(torch.randn(codebook_size, quant_dim))
            # assignments per code since the last refill (summed over ranks)
            self.register_buffer("code_counts", torch.zeros(codebook_size, dtype=torch.long))
            self.register_buffer("codes_refilled", torch.zeros((), dtype=torch.long))
        else:
            self.to_logvar = nn.Linear(quant_dim, quant_dim)
            # the Lagrange multiplier of the rate constraint (rate_control: lagrange)
            self.register_buffer("rate_multiplier", torch.zeros(()))
        self._counting = True

    @property
    def noise_dim(self):
        """N(0, I) noise per pair: NSVQ's substitution noise or the Gaussian's sample."""
        return self.code_seq_len * self.quant_dim

    # --- pieces ---

    def patches(self, frames):
        """(B, [t,] C, S, S) -> (B, [t,] g, g, C*p*p), features ordered (channel, row, column)
        within a patch as LAQ orders them."""
        *lead, c, _, _ = frames.shape
        n, g, p = len(lead), self.grid, self.patch_size
        x = frames.reshape(*lead, c, g, p, g, p)
        x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
        return x.reshape(*lead, g, g, c * p * p)

    def unpatch(self, x):
        """(B, g, g, C*p*p) -> (B, C, S, S)."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.channels
        x = x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    def encode(self, pair01):
        """Frame pair (B, 2, C, S, S) in [0, 1] -> (patch embeddings (B, 2, g, g, d), encoded
        tokens (B, 2, g, g, d))."""
        b, g = pair01.shape[0], self.grid
        emb = self.patch_embed(self.patches(pair01))
        shape = (b, 2, g, g)
        bias = self.position_bias(g, g, pair01.device)
        x = self.enc_spatial(emb.reshape(b * 2, g * g, -1), shape, bias=bias)
        x = self.enc_temporal(self.enc_temporal.from_grid(x.reshape(*shape, -1)), shape)
        return emb, self.enc_temporal.to_grid(x, shape)

    def action_vectors(self, tokens):
        """Encoded tokens (B, 2, g, g, d) -> pre-bottleneck actions (B, code_seq_len, quant_dim):
        the pooled projection of the future frame's tokens minus the current frame's."""
        b = tokens.shape[0]
        x = self.project_in(tokens).permute(0, 1, 4, 2, 3).reshape(b * 2, self.quant_dim,
                                                                   self.grid, self.grid)
        x = self.pool(x).reshape(b, 2, self.quant_dim, -1).transpose(2, 3)
        return x[:, 1] - x[:, 0]

    def nearest_codes(self, actions):
        distances = torch.cdist(actions.float().reshape(-1, self.quant_dim), self.codebook.float())
        return distances.argmin(dim=1).view(actions.shape[:2])

    def decode(self, current_emb, action_latent):
        """Current frame's patch embeddings (B, g, g, d) + action latents (B, L, quant_dim) ->
        the future frame (B, C, S, S), [0, 1] scale, not clamped."""
        b, g = current_emb.shape[0], self.grid
        context = self.project_out(action_latent)
        x = self.dec_spatial(current_emb.reshape(b, g * g, -1), (b, 1, g, g),
                             bias=self.position_bias(g, g, current_emb.device), context=context)
        return self.unpatch(self.to_pixels(x).reshape(b, g, g, -1))

    def bottleneck_latent(self, actions, noise=None):
        """(latent fed to the decoder, {name: per-pair tensors}). With noise (training): NSVQ's
        noise substitution or the reparameterised sample; without: the code / the mean."""
        if self.bottleneck == "nsvq":
            codes = self.nearest_codes(actions)
            hard = self.codebook[codes]
            if noise is None:
                return hard, {"codes": codes, "action": actions}
            noise = noise.view_as(actions).to(actions.dtype)
            residual = (actions - hard).norm(dim=-1, keepdim=True)
            z = actions + (residual / noise.norm(dim=-1, keepdim=True) + 1e-12) * noise
            return z, {"codes": codes}
        mu, logvar = actions, self.to_logvar(actions)
        z = mu if noise is None else mu + noise.view_as(mu).to(mu.dtype) * torch.exp(0.5 * logvar)
        return z, {"mu": mu, "logvar": logvar}

    # --- the training interface (autoencoder.Autoencoder) ---

    def forward(self, x, noise=None):
        """Pairs (B, 2, C, S, S) in [-1, 1] -> (prediction, target) in [0, 1] and the
        bottleneck's per-pair tensors. In training, `noise` (B, noise_dim) ~ N(0, I) drives
        NSVQ's substitution or the Gaussian's sample (drawn here when not given); in eval
        mode the code itself or the mean is decoded."""
        pair01 = (x + 1) / 2
        emb, tokens = self.encode(pair01)
        actions = self.action_vectors(tokens)
        if noise is None and self.training:            # as VanillaVAE draws its own
            noise = torch.randn(len(x), self.noise_dim, device=x.device)
        z, info = self.bottleneck_latent(actions, noise)
        if self.bottleneck == "nsvq" and self.training and self._counting:
            self._count(info["codes"])
        return self.decode(emb[:, 0].detach(), z), pair01[:, 1], info

    @torch.no_grad()
    def _count(self, codes):
        self.code_counts += all_reduce(torch.bincount(codes.reshape(-1),
                                                      minlength=self.codebook_size))

    def loss_function(self, x, out, kld_weight=0.0, step=0):
        """MSE of the predicted future frame on [0, 1] pixels (LAQ's loss); the Gaussian adds
        its rate constraint. `kld_weight` is not used: the rate is held at target_rate_bits."""
        recon, target, info = out
        recon_loss = F.mse_loss(recon.float(), target.float())
        if self.bottleneck == "nsvq":
            usage = torch.bincount(info["codes"].reshape(-1), minlength=self.codebook_size)
            return {"loss": recon_loss, "recon_loss": recon_loss, "perplexity": perplexity(usage),
                    "codes_in_batch": (usage > 0).sum().float(),
                    "codes_refilled": self.codes_refilled.float()}
        kl = gaussian_kl_bits(info["mu"].float(), info["logvar"].float())
        rate = kl.mean()
        if self.rate_control == "capacity":
            penalty = self.rate_weight * (rate - self.target_rate_bits).abs()
        else:               # the multiplier moves after the step (state_updates), never here
            penalty = self.rate_multiplier * (rate - self.target_rate_bits)
        return {"loss": recon_loss + penalty, "recon_loss": recon_loss,
                "kld": rate * math.log(2), "rate_bits": rate,
                "rate_multiplier": self.rate_multiplier.clone()}

    def state_updates(self, averaged):
        """Dual ascent of the rate constraint's multiplier on the rank-averaged rate."""
        if self.bottleneck != "gaussian" or self.rate_control != "lagrange":
            return {}
        gap = averaged["rate_bits"] - self.target_rate_bits
        return {"rate_multiplier": self.rate_multiplier + self.rate_weight * gap}

    def before_step(self, step):
        """Called by the trainer before optimizer step `step` (0-based): refill unused codes
        on LAQ's schedule. Every rank holds the same counts and draws the same refill."""
        if self.bottleneck != "nsvq":
            return
        self._counting = step < 5000
        if refill_steps(step):
            self.refill_unused_codes(step)

    @torch.no_grad()
    def refill_unused_codes(self, step):
        counts = self.code_counts.cpu()
        unused = torch.nonzero(counts < self.min_code_uses).flatten()
        used = torch.nonzero(counts >= self.min_code_uses).flatten()
        self.code_counts.zero_()
        if len(unused) == 0:
            return
        gen = torch.Generator().manual_seed(step)      # the same on every rank and on resume
        book = self.codebook.detach().cpu().float()
        if len(used) == 0:                             # nothing used: jitter every code
            source, scale = book, LAPA_REFILL_NOISE
            unused = torch.arange(self.codebook_size)
        else:
            source = book[used[torch.randint(len(used), (len(unused),), generator=gen)]]
            scale = LAPA_REFILL_NOISE if self.code_refill == "lapa" else \
                0.1 * (book[used].std(0) if len(used) > 1 else book[used].abs().mean().expand(
                    self.quant_dim))
        fresh = source + scale * torch.randn(len(unused), self.quant_dim, generator=gen)
        self.codebook[unused.to(self.codebook.device)] = fresh.to(self.codebook)
        self.codes_refilled += len(unused)

    # --- evaluation ---

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        """(predicted future frame in [-1, 1], {metric: per-pair}, {name: per-pair latents}):
        nsvq: `codes` and the pre-quantisation `action`; gaussian: `mu`, `logvar` (flattened)
        and `kl` in nats per pair."""
        pair01 = (x + 1) / 2
        emb, tokens = self.encode(pair01)
        z, info = self.bottleneck_latent(self.action_vectors(tokens))
        recon = self.decode(emb[:, 0], z) * 2 - 1
        if self.bottleneck == "nsvq":
            return recon, {}, {"codes": info["codes"], "action": info["action"].flatten(1).float()}
        mu, logvar = info["mu"].flatten(1).float(), info["logvar"].flatten(1).float()
        kl = gaussian_kl_bits(info["mu"].float(), info["logvar"].float()) * math.log(2)
        return recon, {"kl": kl}, {"mu": mu, "logvar": logvar}

    @torch.no_grad()
    def reconstruct(self, x, action_from=None):
        """The predicted future frame in [-1, 1]; with `action_from` (other pairs) the
        current frames are decoded with those pairs' actions instead of their own."""
        if action_from is None:
            return self.evaluate_batch(x)[0]
        z, _ = self.bottleneck_latent(self.action_vectors(self.encode((action_from + 1) / 2)[1]))
        return self.decode_latent(x, z)

    @torch.no_grad()
    def decode_latent(self, x, latent):
        """The current frames of `x` decoded with the given action latents (B, L, quant_dim)."""
        emb = self.patch_embed(self.patches((x[:, 0] + 1) / 2))
        return self.decode(emb, latent) * 2 - 1

    @torch.no_grad()
    def sample(self, num_samples, device=None, generator=None):
        """Action latents from the prior (nsvq: uniform codes; gaussian: N(0, I)),
        (num_samples, code_seq_len, quant_dim); decode them with decode_latent."""
        device = device or self.project_out.weight.device
        shape = (num_samples, self.code_seq_len)
        if self.bottleneck == "nsvq":
            codes = torch.randint(self.codebook_size, shape, device=device, generator=generator)
            return self.codebook[codes]
        return torch.randn(*shape, self.quant_dim, device=device, generator=generator)


def gaussian_kl_bits(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) per pair in bits, summed over positions and dimensions."""
    return gaussian_kl(mu, logvar) / math.log(2)
