"""Every model family by its config name (model_params.name): one registry, one builder."""
from vae_gan_model import VAEGAN
from vanilla_vae_model import VAE_MODELS, count_parameters
from vq_vae_model import VQVAE

__all__ = ["MODELS", "build_model", "count_parameters"]
MODELS = {**VAE_MODELS, "VQVAE": VQVAE, "VAEGAN": VAEGAN}


def build_model(model_params):
    """Instantiate the model a (validated) model_params dict names."""
    params = dict(model_params)
    return MODELS[params.pop("name")](**params)
