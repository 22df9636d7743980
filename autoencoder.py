"""The interface every model family implements, as a base class with the defaults of its
optional parts.

The training loop (training.py), the step engine (trainer.py), evaluate.py and
compare_with_laq.py use a model only through these members; the Gaussian KL and the code
perplexity the families share are at the end. A family subclasses Autoencoder,
implements the five methods that raise NotImplementedError, overrides what it does differently,
and is added to models.MODELS; its constructor arguments become the keys of model_params.
Images are float tensors in [-1, 1], (B, C, S, S); a family with `takes_pairs` takes frame pairs
(B, 2, C, S, S) and reconstructs the second frame from the first and its action latent.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn


class Autoencoder(nn.Module):
    noise_dim: int = 0
    """Width of the N(0, I) noise one training step draws per item (0: none). The loop draws
    it for the whole global batch and hands each rank its rows, so that a run's samples do not
    depend on how many processes share it."""

    takes_pairs: bool = False
    """Items are (current, future) frame pairs (data_params.frame_offset)."""

    loss_settings: Tuple[str, ...] = ("kld_weight",)
    """The exp_params keys its loss reads beside the model's own (a run's settings in reports)."""

    not_applicable: Dict[str, str] = {}
    """Evaluation metrics the family does not define, each with the reason (metrics.json)."""

    cannot_sample: Optional[str] = None
    """Why the family has no prior to sample from, or None (it can)."""

    num_embeddings: Optional[int] = None
    """Codebook size of a discrete latent (code usage diagnostics), or None."""

    LEGACY_DEFAULTS: Dict[str, object] = {}
    """Keys the family gained since checkpoints were first written, at the value those were
    trained with (models.completed fills them into an old checkpoint's model_params)."""

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Tuple:
        """The training forward pass; its output goes to loss_function as `out`."""
        raise NotImplementedError

    def loss_function(self, x: torch.Tensor, out: Tuple, kld_weight: float,
                      step: int = 0) -> Dict[str, torch.Tensor]:
        """Scalar fp32 tensors: `loss` (minimised), `recon_loss`, `kld` where the family has
        a KL, and anything else worth logging (and what updates() needs). `step` is the
        optimizer step (annealing)."""
        raise NotImplementedError

    def evaluate_batch(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                       kld_weight: float = 1.0) -> Tuple:
        """(deterministic reconstruction in [-1, 1], {metric: per-image (B,) tensor},
        {name: per-image latents}): `mu`/`logvar` for Gaussian posteriors, `codes` for
        codebooks (metrics.latent_summary reads them). Eval mode, no gradients."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction in [-1, 1] (posterior mean or nearest codes)."""
        raise NotImplementedError

    def sample(self, num_samples: int, device=None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] decoded from the family's prior."""
        raise NotImplementedError

    # What the step engine (trainer.Trainer) asks; the defaults train one optimizer on `loss`.

    def optimizer_groups(self) -> Dict[str, list]:
        """{group: parameters}: one optimizer per group (VAE-GAN: encoder, decoder,
        discriminator)."""
        return {"model": list(self.parameters())}

    def updates(self, losses: Dict[str, torch.Tensor]) -> Dict[str, Tuple]:
        """{group: (objective, apply)} for each optimizer group: the scalar whose gradient
        that group's parameters follow, and a bool tensor saying whether to apply the update
        this step (None: always). Decided on the device; the engine does the rest."""
        return {"model": (losses["loss"], None)}

    def state_updates(self, averaged: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{buffer name: its new value} after a training step, from that step's losses
        averaged over ranks (detached). The engine applies them after the optimizer step, and
        not on a skipped (non-finite) one; evaluation never calls this, so scoring a model
        changes no state (the Lagrange multiplier of a rate constraint, say)."""
        return {}

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step` (0-based), on every rank alike (latent action
        models read it for their code refill schedule)."""

    def rank_state(self) -> Dict[str, torch.Tensor]:
        """State this rank holds on its own, outside the state_dict (a latent action model's
        code counts; its codebook where each process refills its own, as LAPA). Checkpoints
        keep every rank's; resume gives each rank its own."""
        return {}

    def load_rank_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Take back what rank_state returned."""

    # A family with `takes_pairs` predicts a pair's future frame from its current frame and an
    # action latent: infer_actions(pairs), prior_actions(n), predict(current, actions).


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) per item in nats, summed over every dimension after the
    first (>= 0)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)


def perplexity(counts):
    """exp(entropy) of the code distribution given by `counts` (codes never used count 0)."""
    p = counts.float() / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
