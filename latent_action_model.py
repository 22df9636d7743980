"""Latent action models in the shape of LAQ (LAPA's latent action quantization), with a discrete,
a continuous or no action bottleneck (action_bottlenecks.py), so that "continuous vs discrete"
and "what is the action worth" are each one key.

A pair (current frame, future frame) is cut into patches, embedded, and encoded by a spatial
and a temporal transformer (laq_transformer.py). The action is the difference of the two
frames' encodings after a projection to `quant_dim` and a small conv stack that pools the
patch grid to `code_seq_len` positions. A decoder transformer over the current frame's patch
embeddings, cross-attending to the action tokens, predicts the future frame (MSE on [0, 1]
pixels, as LAQ).

`architecture: laq` computes LAQ's function as LAPA's code does, its three departures from its
own description included (self-attention keys and values from the un-normalised input, the
temporal PEG's memory layout, action tokens read across positions), so LAQ's checkpoints load
and reproduce it (convert_laq.py); `corrected` computes the description. Written for this project;
docs/latent_actions.md measures both. Inside the model pixels are in [0, 1] as LAQ's; the
training loop's [-1, 1] images are mapped on the way in and out.
"""
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from action_bottlenecks import build_bottleneck
from autoencoder import Autoencoder
from laq_transformer import PositionBias, Transformer

CODE_GRIDS = {1: (1, 1), 2: (2, 1), 4: (2, 2), 16: (4, 4), 64: (8, 8), 256: (16, 16)}
# LAQ's own conv stacks (kernel, stride, padding) for the patch grids it was written for
LAQ_POOLING = {(8, 1): [(3, 2, 1), (4, 1, 0)], (8, 2): [(3, 2, 1), ((3, 4), 1, 0)],
               (8, 4): [(3, 2, 1), (3, 1, 0)], (16, 16): [(3, 2, 1), (3, 2, 1)],
               (16, 64): [(3, 2, 1)], (32, 256): [(3, 2, 1)]}
# what `architecture` switches (docs/latent_actions.md): LAPA's code, or its description
ARCHITECTURES = {"laq": {"keys_from": "input", "peg_layout": "memory", "mix_actions": True},
                 "corrected": {"keys_from": "norm", "peg_layout": "grid", "mix_actions": False}}


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
        raise ValueError(f"code_seq_len {code_seq_len} is not one of {sorted(CODE_GRIDS)} "
                         f"(squares, and 2 as a 2x1 grid, as LAQ)")
    grid, (ah, aw) = image_size // patch_size, CODE_GRIDS[code_seq_len]
    if grid < max(ah, aw):
        raise ValueError(f"the {grid}x{grid} patch grid (image_size / patch_size) is smaller "
                         f"than the {ah}x{aw} action grid of code_seq_len {code_seq_len}")


class LatentActionModel(Autoencoder):
    """LAQ's shape with a `nsvq` (discrete), `gaussian` (continuous) or `none` action."""

    takes_pairs = True                  # items are (current, future) frame pairs
    loss_settings = ()                  # kld_weight is not in its loss
    not_applicable = {"vq_loss": "NSVQ trains its codebook through the reconstruction loss",
                      "elbo": "the model predicts the future frame; it has no image likelihood"}
    cannot_sample = ("a latent action model predicts a future frame from a current one: draw "
                     "actions with prior_actions and decode them with predict")

    def __init__(self, dim: int = 1024, quant_dim: int = 32, codebook_size: int = 8,
                 image_size: int = 256, patch_size: int = 32, spatial_depth: int = 8,
                 temporal_depth: int = 8, dim_head: int = 64, heads: int = 16,
                 code_seq_len: int = 4, channels: int = 3,
                 architecture: Literal["laq", "corrected"] = "laq",
                 bottleneck: Literal["nsvq", "gaussian", "none"] = "nsvq",
                 code_refill: Literal["lapa", "separated"] = "lapa",
                 refill_threshold: float = 0.1,
                 refill_scope: Literal["process", "global"] = "process",
                 target_rate_bits: float = 12.0,
                 rate_control: Literal["capacity", "lagrange"] = "capacity",
                 rate_weight: float = 0.01):
        super().__init__()
        check_shape(image_size, patch_size, code_seq_len, dim, heads, dim_head)
        if min(quant_dim, codebook_size, channels, spatial_depth, temporal_depth) < 1:
            raise ValueError("quant_dim, codebook_size, channels, spatial_depth and "
                             "temporal_depth must be positive")
        if target_rate_bits <= 0 or rate_weight < 0 or not 0 <= refill_threshold <= 1:
            raise ValueError("target_rate_bits must be positive, rate_weight >= 0 and "
                             "refill_threshold within 0..1")
        self.architecture, self.mix_actions = architecture, ARCHITECTURES[architecture]["mix_actions"]
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid, self.code_seq_len, self.quant_dim = image_size // patch_size, code_seq_len, quant_dim
        self.codebook_size, self.target_rate_bits = codebook_size, target_rate_bits
        self.bottleneck = build_bottleneck(
            bottleneck, codebook_size=codebook_size, quant_dim=quant_dim,
            code_refill=code_refill, refill_threshold=refill_threshold,
            refill_scope=refill_scope, target_rate_bits=target_rate_bits,
            rate_control=rate_control, rate_weight=rate_weight)
        self.bottleneck_name = bottleneck
        stack = {"keys_from": ARCHITECTURES[architecture]["keys_from"],
                 "unused_context_gain": architecture == "laq"}
        patch_dim = channels * patch_size ** 2
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim),
                                         nn.LayerNorm(dim))
        # LAQ's decoder reads the current frame's embedding detached, so the embedding learns
        # only through the action encoder: with no action it is never trained (frozen, so that
        # DDP does not wait for its gradients; `init_from` a trained model to give it one)
        self.patch_embed.requires_grad_(self.bottleneck.reads_action)
        self.position_bias = PositionBias(dim, heads)          # shared by both spatial stacks
        if self.bottleneck.reads_action:
            self.enc_spatial = Transformer(dim, spatial_depth, dim_head, heads, "space", **stack)
            self.enc_temporal = Transformer(dim, temporal_depth, dim_head, heads, "time",
                                            peg_layout=ARCHITECTURES[architecture]["peg_layout"],
                                            **stack)
            # the action: project, pool the patch grid to the action grid, future - current
            self.project_in = nn.Linear(dim, quant_dim)
            convs = []
            for kernel, stride, padding in pooling_plan(self.grid, code_seq_len):
                convs += [nn.Conv2d(quant_dim, quant_dim, kernel, stride, padding), nn.ReLU()]
            self.pool = nn.Sequential(*convs[:-1])
        self.project_out = nn.Linear(quant_dim, dim)
        self.dec_spatial = Transformer(dim, spatial_depth, dim_head, heads, "space", cross=True,
                                       **stack)
        self.to_pixels = nn.Linear(dim, patch_dim)
        self.step = 0                                  # the optimizer step (before_step)

    @property
    def noise_dim(self):
        """N(0, I) noise per pair: NSVQ's substitution noise or the Gaussian's sample."""
        return self.code_seq_len * self.quant_dim if self.bottleneck.noisy else 0

    @property
    def action_length(self):
        return self.code_seq_len if self.bottleneck.reads_action else 0

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

    def encode(self, emb):
        """Patch embeddings of a pair (B, 2, g, g, d) -> encoded tokens (B, 2, g, g, d)."""
        b, g = emb.shape[0], self.grid
        shape = (b, 2, g, g)
        x = self.enc_spatial(emb.reshape(b * 2, g * g, -1), shape,
                             bias=self.position_bias(g, g, emb.device))
        x = self.enc_temporal(self.enc_temporal.tokens_of(x.reshape(*shape, -1)), shape)
        return self.enc_temporal.grid_of(x, shape)

    def action_vectors(self, emb):
        """Patch embeddings of a pair (B, 2, g, g, d) -> pre-bottleneck actions (B, L,
        quant_dim): the pooled projection of the future frame's encoding minus the current
        frame's; L = 0 for a bottleneck that reads no action."""
        b = emb.shape[0]
        if not self.bottleneck.reads_action:
            return emb.new_zeros(b, 0, self.quant_dim)
        x = self.project_in(self.encode(emb)).permute(0, 1, 4, 2, 3)
        x = self.pool(x.reshape(b * 2, self.quant_dim, self.grid, self.grid))
        x = x.reshape(b, 2, self.quant_dim, -1).transpose(2, 3)
        return x[:, 1] - x[:, 0]

    def action_tokens(self, latent):
        """Action latents (B, L, quant_dim) -> the decoder's context (B, L, dim). `laq`: as
        LAPA's NSVQ decodes, the (pair, position)-ordered rows read as (quant_dim, L), so token j
        holds element j, L + j, 2L + j, ... of the flattened latents (the identity for L = 1)."""
        if self.mix_actions:
            b, length, q = latent.shape
            latent = latent.reshape(b, q, length).transpose(1, 2)
        return self.project_out(latent)

    def decode(self, current_emb, latent):
        """Current frame's patch embeddings (B, g, g, d) + action latents (B, L, quant_dim) ->
        the future frame (B, C, S, S), [0, 1] scale, not clamped."""
        b, g = current_emb.shape[0], self.grid
        x = self.dec_spatial(current_emb.reshape(b, g * g, -1), (b, 1, g, g),
                             bias=self.position_bias(g, g, current_emb.device),
                             context=self.action_tokens(latent))
        return self.unpatch(self.to_pixels(x).reshape(b, g, g, -1))

    # --- the training interface (autoencoder.Autoencoder) ---

    def forward(self, x, noise=None):
        """Pairs (B, 2, C, S, S) in [-1, 1] -> (prediction, target) in [0, 1] and the
        bottleneck's per-pair tensors. In training, `noise` (B, noise_dim) ~ N(0, I) drives
        NSVQ's substitution or the Gaussian's sample (drawn here when not given), and NSVQ
        counts its codes and refills on LAQ's schedule; in eval mode the code itself or the
        mean is decoded."""
        pair01 = (x + 1) / 2
        emb = self.patch_embed(self.patches(pair01))
        actions = self.action_vectors(emb)
        if noise is None and self.training and self.noise_dim:     # as VanillaVAE draws its own
            noise = torch.randn(len(x), self.noise_dim, device=x.device)
        z, info = self.bottleneck(actions, noise if self.training else None)
        if self.training:
            self.bottleneck.observe(info, self.step)
        return self.decode(emb[:, 0].detach(), z), pair01[:, 1], info

    def loss_function(self, x, out, kld_weight=0.0, step=0):
        """MSE of the predicted future frame on [0, 1] pixels (LAQ's loss) plus what the
        bottleneck adds (the Gaussian's rate constraint). `kld_weight` is not used."""
        recon, target, info = out
        recon_loss = F.mse_loss(recon.float(), target.float())
        penalty, logged = self.bottleneck.loss_terms(info)
        return {"loss": recon_loss + penalty.to(recon_loss.device), "recon_loss": recon_loss,
                **logged}

    def state_updates(self, averaged):
        return {f"bottleneck.{k}": v for k, v in self.bottleneck.state_updates(averaged).items()}

    def before_step(self, step):
        """Called by the trainer before optimizer step `step` (0-based)."""
        self.step = step

    def rank_state(self):
        return self.bottleneck.rank_state()

    def load_rank_state(self, state):
        self.bottleneck.load_rank_state(state)

    # --- evaluation ---

    @torch.no_grad()
    def infer_actions(self, x):
        """Pairs (B, 2, C, S, S) in [-1, 1] -> their action latents (B, L, quant_dim): the
        nearest codes or the means."""
        emb = self.patch_embed(self.patches((x + 1) / 2))
        return self.bottleneck(self.action_vectors(emb))[0]

    @torch.no_grad()
    def prior_actions(self, num, device=None, generator=None):
        """`num` action latents (num, L, quant_dim) from the prior (nsvq: uniform codes;
        gaussian: N(0, I); none: empty)."""
        device = device or self.project_out.weight.device
        return self.bottleneck.prior(num, self.action_length, device, generator)

    @torch.no_grad()
    def predict(self, current, actions):
        """Current frames (B, C, S, S) in [-1, 1] with action latents (B, L, quant_dim) -> the
        predicted future frames in [-1, 1]."""
        emb = self.patch_embed(self.patches((current + 1) / 2))
        return self.decode(emb, actions) * 2 - 1

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        """(predicted future frame in [-1, 1], {metric: per-pair}, {name: per-pair latents}):
        nsvq: `codes` and the pre-quantisation `action`; gaussian: `mu`, `logvar` (flattened)
        and `kl` in nats per pair; none: nothing."""
        emb = self.patch_embed(self.patches((x + 1) / 2))
        z, info = self.bottleneck(self.action_vectors(emb))
        latents, metrics = self.bottleneck.latents(info)
        return self.decode(emb[:, 0], z) * 2 - 1, metrics, latents

    @torch.no_grad()
    def reconstruct(self, x):
        """The predicted future frame of each pair in [-1, 1], from its own action."""
        return self.evaluate_batch(x)[0]
