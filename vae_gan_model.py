"""VAE-GAN (Larsen et al. 2016) on the Vanilla VAE's encoder and decoder.

A discriminator with the encoder's conv widths judges images; its features at layer
`feature_layer` replace pixels in the reconstruction loss. With x~ = dec(z), z ~ q(z|x), and
x_p = dec(z_p), z_p ~ N(0, I):

    feature_recon  = MSE(D_l(x~), D_l(x))
    disc_loss      = BCE(D(x), 1) + BCE(D(x~), 0) + BCE(D(x_p), 0)
    encoder_loss   = kld_weight * KL + feature_recon
    decoder_loss   = (1 - alpha) * feature_recon - alpha * disc_loss
    discriminator  = disc_loss

Three optimizers, one per part (optimizer_groups, updates). Equilibrium rules: the discriminator is not updated while it is
too strong (its real or fake BCE below equilibrium - margin) and the decoder is not updated
while the discriminator is too weak (above equilibrium + margin); if both would be skipped,
both are updated.
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoencoder import gaussian_kl
from collectives import all_reduce_mean
from vanilla_vae_model import VanillaVAE, output_grid


class BatchStatNorm(nn.BatchNorm2d):
    """BatchNorm that normalises with the batch's own statistics in training and evaluation
    alike. The discriminator sees real, reconstructed and prior images in separate passes, so
    running statistics would average three distributions and an eval-mode discriminator would
    score images on features its training never produced (evaluate.py reported feature_recon
    17x the value logged in training for the same weights). Checkpoints written before keep
    running statistics; they are dropped on load."""

    def __init__(self, channels):
        super().__init__(channels, track_running_stats=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Discriminator(nn.Module):
    def __init__(self, in_channels, hidden_dims, image_size):
        super().__init__()
        widths = [in_channels] + list(hidden_dims)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1),
                                                  BatchStatNorm(b), nn.LeakyReLU())
                                    for a, b in zip(widths, widths[1:]))
        grid = output_grid(image_size, len(hidden_dims))
        self.head = nn.Linear(hidden_dims[-1] * grid * grid, 1)

    def forward(self, x, feature_layer):
        """(logit (B,), features after block `feature_layer`)."""
        features = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == feature_layer:
                features = x
        return self.head(x.flatten(1)).squeeze(1), features


def equilibrium_decisions(real_bce, fake_bce, equilibrium=0.68, margin=0.4):
    """(update discriminator, update decoder) as bool tensors, from the discriminator's mean
    BCE on real and on fake images (tensors, decided on their device)."""
    real_bce, fake_bce = torch.as_tensor(real_bce), torch.as_tensor(fake_bce)
    update_disc = ~((real_bce < equilibrium - margin) | (fake_bce < equilibrium - margin))
    update_dec = ~((real_bce > equilibrium + margin) | (fake_bce > equilibrium + margin))
    neither = ~update_disc & ~update_dec          # both would stop: train both
    return update_disc | neither, update_dec | neither


class VAEGAN(VanillaVAE):
    def __init__(self, in_channels: int = 3, latent_dim: int = 256,
                 hidden_dims: List[int] = (64, 128, 256, 512, 1024), image_size: int = 256,
                 feature_layer: int = 3, alpha: float = 0.1, equilibrium: float = 0.68,
                 margin: float = 0.4):
        super().__init__(in_channels, latent_dim, hidden_dims, image_size)
        if not 0 <= feature_layer < len(hidden_dims):
            raise ValueError(f"feature_layer must be in [0, {len(hidden_dims) - 1}]")
        if not 0 <= alpha <= 1 or margin < 0:
            raise ValueError("alpha must be in [0, 1] and margin >= 0")
        self.discriminator = Discriminator(in_channels, hidden_dims, image_size)
        self.feature_layer, self.alpha = feature_layer, alpha
        self.equilibrium, self.margin = equilibrium, margin

    not_applicable = {"vq_loss": "VAE-GAN has no codebook"}

    @property
    def noise_dim(self):
        return 2 * self.latent_dim          # posterior noise, then prior samples for x_p

    def optimizer_groups(self):
        encoder = [*self.encoder.parameters(), *self.fc_mu.parameters(), *self.fc_var.parameters()]
        decoder = [*self.decoder_input.parameters(), *self.decoder.parameters(),
                   *self.final_layer.parameters()]
        return {"encoder": encoder, "decoder": decoder,
                "discriminator": list(self.discriminator.parameters())}

    def forward(self, x, noise=None):
        if noise is None:
            noise = torch.randn(len(x), self.noise_dim, device=x.device)
        mu, logvar = self.encode(x)
        recon = self.decode(self.reparameterize(mu, logvar, noise[:, :self.latent_dim]))
        prior = self.decode(noise[:, self.latent_dim:].to(mu.dtype))
        return recon, mu, logvar, prior

    def losses(self, x, out, kld_weight):
        """Per-image losses of the three parts and the discriminator's BCE on real / fake."""
        recon, mu, logvar, prior = out
        d_real, f_real = self.discriminator(x, self.feature_layer)
        d_recon, f_recon = self.discriminator(recon, self.feature_layer)
        d_prior, _ = self.discriminator(prior, self.feature_layer)
        bce = lambda logit, target: F.binary_cross_entropy_with_logits(  # noqa: E731
            logit.float(), torch.full_like(logit.float(), target), reduction="none")
        real_bce, recon_bce, prior_bce = bce(d_real, 1.0), bce(d_recon, 0.0), bce(d_prior, 0.0)
        disc = real_bce + recon_bce + prior_bce
        feature_recon = (f_recon.float() - f_real.float()).pow(2).flatten(1).mean(1)
        kl = gaussian_kl(mu.float(), logvar.float())
        return {"encoder_loss": kld_weight * kl + feature_recon,
                "decoder_loss": (1 - self.alpha) * feature_recon - self.alpha * disc,
                "discriminator_loss": disc, "feature_recon": feature_recon, "kl": kl,
                "real_bce": real_bce, "fake_bce": 0.5 * (recon_bce + prior_bce),
                "pixel_mse": (recon.float() - x.float()).pow(2).flatten(1).mean(1)}

    def loss_function(self, x, out, kld_weight, step=0):
        """Batch means of losses(): the three parts' objectives and what is logged; `loss` is
        the sum of the three parts."""
        m = {k: v.mean() for k, v in self.losses(x, out, kld_weight).items()}
        return {"loss": m["encoder_loss"] + m["decoder_loss"] + m["discriminator_loss"],
                "recon_loss": m.pop("pixel_mse"), "kld": m.pop("kl"), **m}

    def updates(self, losses):
        """Each part follows its own objective; the decoder and the discriminator only while
        the equilibrium rules allow (decided on the device, the same on every rank: the
        discriminator's BCE is averaged over ranks first)."""
        real_bce, fake_bce = all_reduce_mean(torch.stack([losses["real_bce"],
                                                          losses["fake_bce"]]).detach())
        update_disc, update_dec = equilibrium_decisions(real_bce, fake_bce, self.equilibrium,
                                                        self.margin)
        return {"encoder": (losses["encoder_loss"], None),
                "decoder": (losses["decoder_loss"], update_dec),
                "discriminator": (losses["discriminator_loss"], update_disc)}

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        recon, metrics, latents = super().evaluate_batch(x, generator)
        mu, logvar = latents["mu"], latents["logvar"]
        noise = torch.randn(len(x), self.noise_dim, device=x.device, generator=generator)
        out = (self.decode(self.reparameterize(mu, logvar, noise[:, :self.latent_dim])), mu,
               logvar, self.decode(noise[:, self.latent_dim:]))
        per_image = self.losses(x, out, kld_weight)
        metrics.update({k: per_image[k].float() for k in
                        ("encoder_loss", "decoder_loss", "discriminator_loss", "feature_recon")})
        return recon, metrics, latents
