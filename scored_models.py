"""The models a comparison scores, from their checkpoints: --vae, --model and --laq as
compare_engine's Scored objects (compare_with_laq.py and downstream.py load them alike).
"""
import os

from compare_engine import LaqScored, LatentActionScored, laq_decoder_key
from compare_report import run_settings
from config import data_params_of
from errors import CheckpointError
from evaluation import load_model
from models import image_channels

RESERVED_NAMES = {"vae", "laq", "pairs", "inputs", "rate", "latent", "rfid", "models", "probe",
                  "checkpoints", "laq_config", "device", "resize", "image_sizes", "baselines",
                  "paired", "controllability", "beats_copy_current", "manifest", "settings",
                  "copy_current", "current_mean_colour", "oracle_mean_colour", "laq_agreement",
                  "action_worth", "identity_pairs", "random",
                  "from_labels_only", "all_true_actions", "recording_policy"}


def load_vae(path, device):
    """The --vae checkpoint: an autoencoder of this project that reconstructs single images."""
    vae, ckpt = load_model(path, device)
    if vae.takes_pairs:
        raise CheckpointError(f"--vae {path}: a {ckpt['config']['model_params']['name']} "
                              f"checkpoint, which predicts a future frame from a pair; it goes "
                              f"to --model")
    return vae, ckpt["config"]


def load_latent_action_models(paths, device):
    """A LatentActionScored per --model checkpoint, each a latent action model trained here,
    named by its run (logging_params.name), made unique; {name: path}; {name: run_settings};
    their configs."""
    scored, files, settings, configs = [], {}, {}, []
    for path in paths:
        model, ckpt = load_model(path, device)
        if not model.takes_pairs:
            raise CheckpointError(f"--model {path}: a {ckpt['config']['model_params']['name']} "
                                  f"checkpoint; --model takes latent action models trained here "
                                  f"(LatentActionModel); a VAE goes to --vae")
        base = str(ckpt["config"].get("logging_params", {}).get("name") or "model")
        if base.startswith("current_patches_"):           # a baseline's name
            base = f"model_{base}"
        name, k = base, 2
        while name in files or name in RESERVED_NAMES:
            name, k = f"{base}_{k}", k + 1
        view = (model.image_size, data_params_of(ckpt["config"]).resize)
        scored.append(LatentActionScored(name, model, view,
                                         image_channels(ckpt["config"]["model_params"])))
        files[name], settings[name] = os.path.abspath(path), run_settings(ckpt["config"])
        configs.append(ckpt["config"])
    return scored, files, settings, configs


def load_laq_scored(args, device):
    """(LaqScored, LAQ's config, key report) of --laq (laq_loader.load_laq reads it)."""
    from laq_loader import LaqRunner, load_laq
    laq, config, key_report = load_laq(args, device)
    view = (config["image_size"], args.laq_resize)
    return (LaqScored(LaqRunner(laq), config["codebook_size"], view,
                      config["image_size"] // config["patch_size"],
                      laq_decoder_key(config, view)), config, key_report)
