"""Convolutional VAE models: the study's VanillaVAE and BetaVAE on the same backbone.

VanillaVAE is the architecture of the SthV2 study: five stride-2 conv blocks
(64 -> 1024 channels) down to an (image_size / 32)^2 grid, two linear heads to a 256-d
Gaussian posterior, and a mirrored transposed-conv decoder ending in Tanh. Images are in
[-1, 1] everywhere inside the model, matching the Tanh output.
"""
from typing import List, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoencoder import Autoencoder, gaussian_kl


def conv_block(in_ch, out_ch):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1),
                         nn.BatchNorm2d(out_ch), nn.LeakyReLU())


def deconv_block(in_ch, out_ch):
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1,
                                            output_padding=1),
                         nn.BatchNorm2d(out_ch), nn.LeakyReLU())


def output_grid(image_size, depth):
    """Side of the feature grid after `depth` stride-2 blocks; the size must halve evenly."""
    grid = image_size // 2 ** depth
    if grid < 1 or grid * 2 ** depth != image_size:
        raise ValueError(f"image_size {image_size} is not divisible by 2^{depth} "
                         f"(one halving per hidden dim)")
    return grid


class VanillaVAE(Autoencoder):
    """The study's VAE: stride-2 conv blocks of `hidden_dims` widths to a Gaussian posterior of
    `latent_dim` dimensions, a mirrored decoder ending in Tanh; MSE + kld_weight * KL.
    Every size follows `image_size` and `hidden_dims` (62,980,803 parameters at 256 px)."""

    def __init__(self, in_channels: int = 3, latent_dim: int = 256,
                 hidden_dims: List[int] = (64, 128, 256, 512, 1024), image_size: int = 256):
        super().__init__()
        hidden_dims = list(hidden_dims)
        self.latent_dim, self.image_size = latent_dim, image_size
        self.grid = output_grid(image_size, len(hidden_dims))   # 8 for 256 px, five blocks
        widths = [in_channels] + hidden_dims
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(widths, widths[1:])])
        flat = hidden_dims[-1] * self.grid ** 2
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_var = nn.Linear(flat, latent_dim)

        rev = hidden_dims[::-1]
        self.decoder_input = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(*[deconv_block(a, b) for a, b in zip(rev, rev[1:])])
        self.final_layer = nn.Sequential(deconv_block(rev[-1], rev[-1]),
                                         nn.Conv2d(rev[-1], in_channels, 3, padding=1),
                                         nn.Tanh())           # decode() applies it itself
        self._top = rev[0]

    @property
    def noise_dim(self):
        """Width of the N(0, I) noise one training step draws per image."""
        return self.latent_dim

    def encode(self, x):
        h = torch.flatten(self.encoder(x), start_dim=1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z, logits=False):
        """Image in [-1, 1]; with logits=True the pre-Tanh activation a (image = tanh(a))."""
        h = self.decoder_input(z).view(-1, self._top, self.grid, self.grid)
        a = self.final_layer[:-1](self.decoder(h))
        return a if logits else torch.tanh(a)

    @staticmethod
    def reparameterize(mu, logvar, noise=None):
        if noise is None:
            noise = torch.randn_like(mu)
        return mu + noise.to(mu.dtype) * torch.exp(0.5 * logvar)

    def forward(self, x, noise=None):
        """Return (reconstruction, mu, logvar). `noise` ~ N(0, I) may be passed in so that
        the sampled latents do not depend on how a batch is split across processes."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, noise)), mu, logvar

    def loss_function(self, x, out, kld_weight, step=0):
        """Training objective and its parts, all in fp32.

        loss = mean-over-pixels MSE + kld_weight * KL (KL summed over latents, batch-mean).
        neg_elbo is the unweighted negative ELBO per image in nats for a unit-variance
        Gaussian decoder on [-1, 1] pixels (constant dropped): 0.5 * SSE + KL. It compares
        across runs with different kld_weight.
        """
        recon, mu, logvar = (t.float() for t in out)
        x = x.float()
        recon_loss = F.mse_loss(recon, x)
        kld = gaussian_kl(mu, logvar).mean()
        sse = (recon - x).pow(2).flatten(1).sum(1).mean()
        return {"loss": recon_loss + kld_weight * kld, "recon_loss": recon_loss,
                "kld": kld, "neg_elbo": 0.5 * sse + kld}

    # Evaluation metrics this model does not define, with the reason (metrics.json lists them).
    not_applicable = {"vq_loss": "a Gaussian VAE has no codebook"}

    def per_image_neg_log_likelihood(self, x, logits):
        """-log p(x | z) per image from the decoder's pre-Tanh output, constant dropped:
        unit-variance Gaussian on [-1, 1] pixels."""
        return 0.5 * (torch.tanh(logits.float()) - x.float()).pow(2).flatten(1).sum(1)

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        """Reconstruction through the posterior mean, per-image model metrics and latents.

        kl: KL(q(z|x) || p(z)) in nats. elbo: -(-log p(x|z) + KL) with one latent sample from
        `generator` (the decoder likelihood of per_image_neg_log_likelihood).
        """
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device)
        logits = self.decode(self.reparameterize(mu, logvar, noise), logits=True)
        kl = gaussian_kl(mu.float(), logvar.float())
        nll = self.per_image_neg_log_likelihood(x, logits)
        return self.decode(mu), {"kl": kl, "elbo": -(nll + kl)}, \
            {"mu": mu.float(), "logvar": logvar.float()}

    @torch.no_grad()
    def reconstruct(self, x):
        """Deterministic reconstruction through the posterior mean."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, num_samples, device=None, generator=None):
        device = device or next(self.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, device=device, generator=generator)
        return self.decode(z)


class BetaVAE(VanillaVAE):
    """beta-VAE on the Vanilla VAE backbone (Higgins et al. 2017), optionally with the
    capacity-annealed objective of Burgess et al. 2018: gamma * |KL - C|, C ramped linearly
    from 0 to max_capacity over capacity_steps training steps.

    recon_loss "bce" treats the decoder output as Bernoulli means of [0, 1] pixels: with
    a the pre-Tanh activation, (tanh(a) + 1) / 2 = sigmoid(2a), so the loss is
    BCE-with-logits(2a, (x + 1) / 2), exact and stable. Both losses are means over pixels,
    and kld_weight scales the KL term as for the Vanilla VAE.
    """

    def __init__(self, in_channels: int = 3, latent_dim: int = 256,
                 hidden_dims: List[int] = (64, 128, 256, 512, 1024), image_size: int = 256,
                 beta: float = 4.0, recon_loss: Literal["mse", "bce"] = "mse",
                 capacity_annealing: bool = False, gamma: float = 1000.0,
                 max_capacity: float = 25.0, capacity_steps: int = 100000):
        super().__init__(in_channels, latent_dim, hidden_dims, image_size)
        if beta < 0 or gamma < 0 or max_capacity < 0 or capacity_steps < 1:
            raise ValueError("beta, gamma and max_capacity must be >= 0, capacity_steps >= 1")
        self.beta, self.recon_kind, self.annealed = beta, recon_loss, capacity_annealing
        self.gamma, self.max_capacity, self.capacity_steps = gamma, max_capacity, capacity_steps

    def forward(self, x, noise=None):
        mu, logvar = self.encode(x)
        logits = self.decode(self.reparameterize(mu, logvar, noise), logits=True)
        return torch.tanh(logits), mu, logvar, logits

    def capacity(self, step):
        return min(self.max_capacity, self.max_capacity * step / self.capacity_steps)

    def loss_function(self, x, out, kld_weight, step=0):
        recon, mu, logvar, logits = (t.float() for t in out)
        x = x.float()
        if self.recon_kind == "bce":
            recon_loss = F.binary_cross_entropy_with_logits(2 * logits, (x + 1) / 2)
        else:
            recon_loss = F.mse_loss(recon, x)
        kld = gaussian_kl(mu, logvar).mean()
        if self.annealed:
            capacity = self.capacity(step)
            loss = recon_loss + self.gamma * kld_weight * (kld - capacity).abs()
        else:
            capacity, loss = 0.0, recon_loss + self.beta * kld_weight * kld
        nll = self.per_image_neg_log_likelihood(x, logits).mean()
        return {"loss": loss, "recon_loss": recon_loss, "kld": kld, "neg_elbo": nll + kld,
                "capacity": torch.tensor(float(capacity), device=x.device)}

    def per_image_neg_log_likelihood(self, x, logits):
        if self.recon_kind != "bce":
            return super().per_image_neg_log_likelihood(x, logits)
        return F.binary_cross_entropy_with_logits(2 * logits.float(), (x.float() + 1) / 2,
                                                  reduction="none").flatten(1).sum(1)
