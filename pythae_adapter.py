"""Evaluate models saved by the pythae library with this project's metrics.

pythae (optional: `pip install pythae`) saves a model folder with model_config.json and
model.pt, plus encoder.pkl / decoder.pkl when the model has custom networks. Those .pkl files
are pickled Python code that runs when loaded, so folders holding them are refused unless
--allow-pickle says they are trusted. pythae models take images in [0, 1]; the adapter
presents them with the interface evaluate.py uses for this project's models ([-1, 1] images).
"""
import json
import os

import torch
import torch.nn as nn

from vanilla_vae_model import gaussian_kl


class PythaeError(RuntimeError):
    """A pythae folder cannot be evaluated (one line that says why)."""


def is_pythae_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_config.json"))


def load_pythae(path, device, allow_pickle=False):
    """(adapter in eval mode, a config-like dict for evaluate.py)."""
    pickles = [f for f in ("encoder.pkl", "decoder.pkl") if os.path.exists(os.path.join(path, f))]
    if pickles and not allow_pickle:
        raise PythaeError(f"{path} holds {', '.join(pickles)}: pickled code that runs when "
                          f"loaded; pass --allow-pickle only if you trust its origin")
    try:
        from pythae.models import AutoModel
    except ImportError:
        raise PythaeError("evaluating a pythae model folder needs the pythae package: "
                          "pip install pythae") from None
    with open(os.path.join(path, "model_config.json")) as f:
        name = json.load(f).get("name", "pythae model").replace("Config", "")
    try:
        model = AutoModel.load_from_folder(path)
    except (OSError, ValueError, KeyError, RuntimeError, NameError) as e:
        raise PythaeError(f"pythae could not load {path}: {type(e).__name__}: {e}") from None
    adapter = PythaeAdapter(model, name).to(device).eval()
    channels, height, width = model.model_config.input_dim
    if height != width:
        raise PythaeError(f"{path}: input_dim {model.model_config.input_dim} is not square")
    config = {"model_params": {"name": f"pythae:{name}", "image_size": height,
                               "in_channels": channels},
              "exp_params": {"kld_weight": 1.0}, "data_params": {}}
    return adapter, config


class PythaeAdapter(nn.Module):
    """A pythae model behind evaluate.py's interface: [-1, 1] images in and out."""

    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name
        self.latent_dim = model.model_config.latent_dim
        self.not_applicable = {
            "elbo": "pythae models define their own likelihoods; not comparable",
            "vq_loss": "not computed for pythae models"}

    def _encode(self, x01):
        out = self.model.encoder(x01)
        return out.embedding, out.get("log_covariance")

    def _decode(self, z):
        return self.model.decoder(z).reconstruction.float() * 2 - 1

    @torch.no_grad()
    def evaluate_batch(self, x, generator=None, kld_weight=1.0):
        """Reconstruction through the encoder mean; KL when the encoder is Gaussian."""
        mu, logvar = self._encode((x + 1) / 2)
        metrics, latents = {}, {}
        if logvar is not None:
            metrics["kl"] = gaussian_kl(mu.float(), logvar.float())
            latents = {"mu": mu.float(), "logvar": logvar.float()}
        else:
            self.not_applicable["kl"] = f"{self.name} has a deterministic encoder"
        return self._decode(mu), metrics, latents

    @torch.no_grad()
    def reconstruct(self, x):
        return self._decode(self._encode((x + 1) / 2)[0])

    @torch.no_grad()
    def sample(self, num_samples, device=None, generator=None):
        device = device or next(self.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, device=device, generator=generator)
        return self._decode(z)
