"""Every model family by its config name (model_params.name).

A family subclasses autoencoder.Autoencoder (the interface the training loop, the step engine,
evaluate.py and compare_with_laq.py use), is added to MODELS, and its constructor arguments
become the keys of model_params (config.py reads them from the signature).
"""
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
    return {**(family.LEGACY_DEFAULTS if family else {}), **model_params}


def reconstruction_target(model, x):
    """What model.reconstruct(x) is scored against: the image, or a pair's future frame."""
    return x[:, -1] if model.takes_pairs else x


def image_channels(model_params):
    """The channels of the images a model takes: `in_channels` for the image families,
    `channels` for latent action models (LAQ's name)."""
    return model_params.get("in_channels", model_params.get("channels", 3))


def item_shape(model_params):
    """One training item: an image (C, S, S), or a frame pair (2, C, S, S) for the families
    that take pairs (latent action models)."""
    size = model_params["image_size"]
    image = (image_channels(model_params), size, size)
    return (2, *image) if MODELS[model_params["name"]].takes_pairs else image


def build_model(model_params):
    """Instantiate the model a (validated) model_params dict names."""
    params = dict(model_params)
    return MODELS[params.pop("name")](**params)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
