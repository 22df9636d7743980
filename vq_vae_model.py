"""VQ-VAE (van den Oord et al. 2017) on the Vanilla VAE's convolutional backbone.

The encoder is the Vanilla VAE's stride-2 conv stack (same widths, same input size) ending in a
1x1 conv to embedding_dim, so a 256 px image becomes an 8 x 8 grid of codes with the default
widths. Each grid vector is replaced by its nearest codebook entry; gradients pass the
quantizer straight through. Loss = reconstruction + VQ loss, with VQ loss = codebook term +
beta * commitment term (beta = 0.25 on the commitment term only), each a mean over the latent's
values. The reconstruction term is, by default (recon_reduction: sum), the squared error summed
over the image's values on the [0, 1] scale and averaged over images: the design's objective,
and pythae's. recon_reduction: mean takes the mean over values on the model's [-1, 1] scale
instead, which weighs the VQ term P/4 times more (P = C*H*W values: 3,072x at 64 px). With ema=True the codebook follows
an exponential moving average of its assigned encoder outputs instead (decay 0.99) and the VQ
loss is the commitment term alone. Codes unused for dead_code_steps training steps are restarted
at random encoder outputs of the current batch.
"""
from typing import List, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoencoder import Autoencoder, perplexity
from collectives import all_reduce, broadcast
from vanilla_vae_model import conv_block, deconv_block, output_grid


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, beta=0.25, ema=False, decay=0.99,
                 dead_code_steps=0, eps=1e-5):
        super().__init__()
        self.num_embeddings, self.beta, self.ema, self.decay, self.eps = \
            num_embeddings, beta, ema, decay, eps
        self.dead_code_steps = dead_code_steps
        self.codebook = nn.Parameter(torch.empty(num_embeddings, embedding_dim)
                                     .uniform_(-1 / num_embeddings, 1 / num_embeddings),
                                     requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(num_embeddings))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))

    def codes(self, z):
        """Nearest codebook index of each vector of z (..., D)."""
        flat = z.reshape(-1, z.shape[-1]).float()
        book = self.codebook.float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)
        return dist2.argmin(1).view(z.shape[:-1])

    def forward(self, z):
        """z (B, H, W, D) -> (straight-through quantized z, codes (B, H, W), vq_loss per image)."""
        idx = self.codes(z)
        quantized = self.codebook[idx].to(z.dtype)
        commitment = (z.float() - quantized.detach().float()).pow(2).flatten(1).mean(1)
        if self.ema:
            vq_loss = self.beta * commitment
        else:
            codebook_term = (z.detach().float() - quantized.float()).pow(2).flatten(1).mean(1)
            vq_loss = codebook_term + self.beta * commitment
        if self.training:
            self._update(z.detach(), idx)
        return z + (quantized - z).detach(), idx, vq_loss

    @torch.no_grad()
    def _update(self, z, idx):
        """EMA codebook and dead-code restarts, identical on every rank."""
        flat = z.reshape(-1, z.shape[-1]).float()
        onehot = F.one_hot(idx.flatten(), self.num_embeddings).float()
        counts, sums = onehot.sum(0), onehot.t() @ flat
        all_reduce(counts)
        all_reduce(sums)
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + self.num_embeddings * self.eps) * n
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps:
            dead = (self.steps_unused >= self.dead_code_steps).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
                fresh = flat[pick]
                broadcast(fresh, src=0)       # rank 0's encoder outputs for every rank
                self.codebook.data[dead] = fresh.to(self.codebook.dtype)
                self.ema_sum[dead] = fresh
                self.ema_count[dead] = 1.0
                self.steps_unused[dead] = 0


class VQVAE(Autoencoder):
    loss_settings = ()                  # kld_weight is not in its loss

    def __init__(self, in_channels: int = 3, hidden_dims: List[int] = (64, 128, 256, 512, 1024),
                 image_size: int = 256, num_embeddings: int = 512, embedding_dim: int = 64,
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99,
                 dead_code_steps: int = 0, recon_reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        hidden_dims = list(hidden_dims)
        self.grid = output_grid(image_size, len(hidden_dims))
        if not 0 < ema_decay < 1 or beta < 0 or dead_code_steps < 0 or num_embeddings < 1:
            raise ValueError("need 0 < ema_decay < 1, beta >= 0, dead_code_steps >= 0")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.recon_reduction = recon_reduction
        widths = [in_channels] + hidden_dims
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(widths, widths[1:])],
                                     nn.Conv2d(hidden_dims[-1], embedding_dim, 1))
        self.vq = VectorQuantizer(num_embeddings, embedding_dim, beta, ema, ema_decay,
                                  dead_code_steps)
        rev = hidden_dims[::-1]
        self.decoder = nn.Sequential(nn.Conv2d(embedding_dim, rev[0], 1), nn.LeakyReLU(),
                                     *[deconv_block(a, b) for a, b in zip(rev, rev[1:])],
                                     deconv_block(rev[-1], rev[-1]),
                                     nn.Conv2d(rev[-1], in_channels, 3, padding=1), nn.Tanh())

    noise_dim = 0                                   # deterministic encoder: no sampling noise
    LEGACY_DEFAULTS = {"recon_reduction": "mean"}   # what checkpoints before the key trained
    not_applicable = {"kl": "VQ-VAE has a deterministic encoder, no posterior to compare "
                            "with a prior", "elbo": "VQ-VAE defines no likelihood bound"}

    def encode(self, x):
        return self.encoder(x).permute(0, 2, 3, 1)     # (B, H, W, D)

    def decode_latent(self, zq):
        return self.decoder(zq.permute(0, 3, 1, 2))

    def decode_codes(self, codes):
        return self.decode_latent(self.vq.codebook[codes])

    def forward(self, x, noise=None):
        quantized, codes, vq_loss = self.vq(self.encode(x))
        return self.decode_latent(quantized), codes, vq_loss

    def loss_function(self, x, out, kld_weight=0.0, step=0):
        recon, codes, vq_loss = out
        if self.recon_reduction == "sum":      # [-1, 1] -> [0, 1] scales squared errors by 1/4
            recon_loss = (recon.float() - x.float()).pow(2).flatten(1).sum(1).mean() / 4
        else:
            recon_loss = F.mse_loss(recon.float(), x.float())
        vq = vq_loss.mean()
        usage = torch.bincount(codes.flatten(), minlength=self.num_embeddings).float()
        return {"loss": recon_loss + vq, "recon_loss": recon_loss, "vq_loss": vq,
                "perplexity": perplexity(usage),
                "codebook_usage": (usage > 0).float().mean()}

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=0.0):
        recon, codes, vq_loss = self(x)
        return recon, {"vq_loss": vq_loss.float()}, {"codes": codes}

    @torch.no_grad()
    def reconstruct(self, x):
        return self(x)[0]

    @torch.no_grad()
    def sample(self, num_samples, device=None, generator=None):
        """Decode codes drawn uniformly from the codebook at every grid position (no learned
        prior over codes is part of this model)."""
        device = device or self.vq.codebook.device
        codes = torch.randint(0, self.num_embeddings, (num_samples, self.grid, self.grid),
                              device=device, generator=generator)
        return self.decode_codes(codes)
