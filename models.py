"""Every model family by its config name (model_params.name), and the interface they share.

The training loop (training.py), the optimizer step (trainer.py), evaluation (evaluate.py) and
the comparison (compare_with_laq.py) use a model only through `AutoencoderModel` below. A new
family implements it, is added to MODELS, and its constructor arguments become the keys of
model_params (config.py reads them from the signature).
"""
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

from latent_action_model import LatentActionModel
from vae_gan_model import VAEGAN
from vanilla_vae_model import BetaVAE, VanillaVAE
from vq_vae_model import VQVAE

MODELS = {"VanillaVAE": VanillaVAE, "BetaVAE": BetaVAE, "VQVAE": VQVAE, "VAEGAN": VAEGAN,
          "LatentActionModel": LatentActionModel}


def completed(model_params):
    """A checkpoint's model_params with the keys its family gained since it was written, at
    the value it was trained with (the family's LEGACY_DEFAULTS)."""
    family = MODELS.get(model_params.get("name"))
    return {**getattr(family, "LEGACY_DEFAULTS", {}), **model_params}


@runtime_checkable
class AutoencoderModel(Protocol):
    """What every model family provides. Images are float tensors in [-1, 1], (B, C, S, S);
    a family with `takes_pairs = True` (latent action models) takes frame pairs
    (B, 2, C, S, S) and reconstructs the second frame from the first and its action latent."""

    noise_dim: int
    """Width of the N(0, I) noise one training step draws per image (0: none). The loop draws
    it for the whole global batch and hands each rank its rows, so that a run's samples do not
    depend on how many processes share it."""

    not_applicable: Dict[str, str]
    """Evaluation metrics the family does not define, each with the reason (metrics.json)."""

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Tuple:
        """The training forward pass; its output goes to loss_function as `out`."""

    def loss_function(self, x: torch.Tensor, out: Tuple, kld_weight: float,
                      step: int = 0) -> Dict[str, torch.Tensor]:
        """Scalar fp32 tensors: `loss` (minimised), `recon_loss`, `kld` where the family has
        a KL, and anything else worth logging. `step` is the optimizer step (annealing)."""

    def evaluate_batch(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                       kld_weight: float = 1.0) -> Tuple:
        """(deterministic reconstruction in [-1, 1], {metric: per-image (B,) tensor},
        {name: per-image latents}): `mu`/`logvar` for Gaussian posteriors, `codes` for
        codebooks (metrics.latent_summary reads them). Eval mode, no gradients."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction in [-1, 1] (posterior mean or nearest codes)."""

    def sample(self, num_samples: int, device=None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] decoded from the family's prior."""

    # Optional (looked up with hasattr by trainer.py):
    #   optimizer_groups() -> {name: [parameters]}: one optimizer per group (VAE-GAN).
    #   takes_pairs = True: items are (current, future) frame pairs (data_params.frame_offset).
    #   before_step(step): called before optimizer step `step` (0-based), on every rank alike.
    #   train_step(x, noise, kld_weight, max_grad_norm) -> (losses, grad_norm, finite,
    #       {group: bool tensor, apply its update}): the family computes, averages over ranks
    #       (runtime.all_reduce_mean_) and clips its own gradients; the trainer applies the
    #       updates. Such a family is not wrapped in DDP or torch.compile.


def reconstruction_target(x):
    """What model.reconstruct(x) is scored against: the image, or a pair's second frame."""
    return x[:, -1] if x.dim() == 5 else x


def item_shape(model_params):
    """One training item: an image (C, S, S), or a frame pair (2, C, S, S) for the families
    that take pairs (latent action models)."""
    size = model_params["image_size"]
    image = (model_params.get("in_channels", model_params.get("channels", 3)), size, size)
    return (2, *image) if getattr(MODELS[model_params["name"]], "takes_pairs", False) else image


def build_model(model_params):
    """Instantiate the model a (validated) model_params dict names."""
    params = dict(model_params)
    return MODELS[params.pop("name")](**params)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
