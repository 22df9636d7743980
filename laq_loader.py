"""LAQ (LAPA's latent action model) from the user's own checkout and checkpoint.

The model code is imported from --laq-repo (the folder holding laq_model/) without running
laq_model/__init__.py, whose trainer imports need wandb/accelerate; it is built on any device
although its quantizer asks for 'cuda'. Checkpoints are read in every layout LAPA's trainer
writes (plain, 'module.'-prefixed, the trainer's package, ema-pytorch EMA files), and every
model key must be found: LAQ's own load is non-strict and would hide a wrong file.
"""
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types

import torch
import yaml
from torch.overrides import TorchFunctionMode

from checkpoint import blocks_of, load_checkpoint
from errors import CheckpointError, LaqError

# LAPA's SthV2 hyperparameters for LatentActionQuantization (--laq-config overrides them).
LAPA_LAQ_CONFIG = {"dim": 1024, "quant_dim": 32, "codebook_size": 8, "image_size": 256,
                   "patch_size": 32, "spatial_depth": 8, "temporal_depth": 8, "dim_head": 64,
                   "heads": 16, "code_seq_len": 4}
CODE_SEQ_LENS = (1, 2, 4, 16, 64, 256)


# --- loading LAQ from the user's checkout ----------------------------------------------

def find_laq_package(laq_repo):
    """The laq_model folder: inside --laq-repo (or its laq/ subfolder), or installed."""
    if laq_repo:
        for candidate in (os.path.join(laq_repo, "laq_model"),
                          os.path.join(laq_repo, "laq", "laq_model")):
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
        raise LaqError(f"--laq-repo {laq_repo} has no laq_model/ folder: pass the folder that "
                       f"contains laq_model/ (LAPA's laq/)")
    spec = importlib.util.find_spec("laq_model")
    if spec is None or not spec.submodule_search_locations:
        raise LaqError("LAQ's code was not found: pass --laq-repo PATH (LAPA's laq/ folder, "
                       "which contains laq_model/) or install laq_model")
    return list(spec.submodule_search_locations)[0]


def import_laq_class(package_dir):
    """LatentActionQuantization, imported as laq_model.<module> without running
    laq_model/__init__.py (which imports the trainer and its wandb/accelerate needs)."""
    defining = [f[:-3] for f in sorted(os.listdir(package_dir)) if f.endswith(".py") and re.search(
        r"^class LatentActionQuantization\b", open(os.path.join(package_dir, f)).read(), re.M)]
    if not defining:
        raise LaqError(f"no file in {package_dir} defines class LatentActionQuantization")
    package = types.ModuleType("laq_model")
    package.__path__ = [package_dir]
    package.__file__ = os.path.join(package_dir, "__init__.py")
    for name in [m for m in sys.modules if m == "laq_model" or m.startswith("laq_model.")]:
        del sys.modules[name]
    sys.modules["laq_model"] = package
    try:
        module = importlib.import_module(f"laq_model.{defining[0]}")
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("laq_model"):
            raise LaqError(f"LAQ's model code needs the Python module '{e.name}', a dependency "
                           f"of LAQ itself, not of this project: pip install {e.name}") from None
        raise
    return module.LatentActionQuantization


def _is_cuda(value):
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    return isinstance(value, torch.device) and value.type == "cuda"


class RedirectCuda(TorchFunctionMode):
    """Inside this context, tensors asked for on 'cuda' are made on `device` instead, so code
    that hard-codes device='cuda' builds on any machine, its files untouched."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0].to(self.device)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = self.device
        if func is torch.Tensor.to:
            args = tuple(self.device if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


# What a LAQ config may hold: the type of each argument and a range that builds a model in
# reasonable memory (LAPA's: dim 1024, depth 8, heads 16; the bounds leave room for larger).
LAQ_ARGUMENTS = {"dim": (int, 1, 16384), "quant_dim": (int, 1, 4096),
                 "codebook_size": (int, 1, 1 << 20), "image_size": (int, 1, 4096),
                 "patch_size": (int, 1, 4096), "spatial_depth": (int, 1, 128),
                 "temporal_depth": (int, 1, 128), "dim_head": (int, 1, 1024),
                 "heads": (int, 1, 256), "channels": (int, 1, 16),
                 "code_seq_len": (int, 1, 256), "attn_dropout": (float, 0.0, 1.0),
                 "ff_dropout": (float, 0.0, 1.0)}
MAX_CONFIG_BYTES = 1 << 16


def laq_overrides(path, known):
    """The constructor arguments a --laq-config YAML sets (a mapping; each key in `known`)."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise LaqError(f"--laq-config {path} is {os.path.getsize(path)} bytes: a LAQ "
                           f"config is a few lines of constructor arguments")
        with open(path) as f:
            override = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LaqError(f"cannot read --laq-config {path}: {e}") from None
    if not isinstance(override, dict):
        raise LaqError(f"--laq-config {path} must be a mapping of constructor arguments")
    for key in override:
        if key not in known:
            raise LaqError(f"--laq-config {path}: {key} is not an argument of "
                           f"LatentActionQuantization (known: {', '.join(sorted(known))})")
    return override


def laq_config(path, laq_class=None, base=None):
    """LAPA's hyperparameters (or `base`), overridden by a YAML mapping; keys must be
    constructor args (of `laq_class`, else the ones listed here), each of its type and in a
    range that builds (checked before anything is built)."""
    config = dict(base or LAPA_LAQ_CONFIG)
    if path:
        known = (set(inspect.signature(laq_class.__init__).parameters) - {"self"}
                 if laq_class else set(LAQ_ARGUMENTS))
        config.update(laq_overrides(path, known))
    where = f"--laq-config {path}" if path else "LAQ config"
    for key, value in config.items():
        if key not in LAQ_ARGUMENTS:
            continue
        kind, low, high = LAQ_ARGUMENTS[key]
        ok_type = (isinstance(value, (int, float)) if kind is float else isinstance(value, int)) \
            and not isinstance(value, bool)
        if not ok_type:
            shown = repr(value) if isinstance(value, (int, float, str)) else type(value).__name__
            raise LaqError(f"{where}: {key} must be {'a number' if kind is float else 'an int'}, "
                           f"got {shown[:40]}")
        if not low <= value <= high:
            raise LaqError(f"{where}: {key} {value} is outside {low}..{high}")
    if config["image_size"] % config["patch_size"]:
        raise LaqError(f"LAQ image_size {config['image_size']} is not a multiple of "
                       f"patch_size {config['patch_size']}")
    if config["code_seq_len"] not in CODE_SEQ_LENS:
        raise LaqError(f"LAQ code_seq_len {config['code_seq_len']} is not one of {CODE_SEQ_LENS}")
    return config


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def laq_state_dict(path, weights="ema"):
    """(plain state_dict, layout) from any file LAPA's trainer writes: a state_dict (maybe
    'module.'-prefixed), the trainer's package {'model': ..., 'optim': ..., 'steps': ...}, or an
    ema-pytorch EMA wrapper's state_dict (vae.{step}.ema.pt: every key as ema_model.<key> and
    online_model.<key>, plus initted and step), from which `weights` ("ema" or "online") picks."""
    try:
        state = load_checkpoint(path, mmap=True)       # read as the weights are used
    except CheckpointError as e:
        raise LaqError(str(e)) from None
    layout = "state_dict"
    for key in ("model", "state_dict", "module"):
        if isinstance(state.get(key), dict):
            state, layout = state[key], f"package ['{key}']"
            break
    if any(k.startswith(("ema_model.", "online_model.")) for k in state):
        prefix = "ema_model." if weights == "ema" else "online_model."
        chosen = _strip(state, prefix)
        if not chosen:
            raise LaqError(f"LAQ checkpoint {path} is an EMA file without {prefix}* weights; "
                           f"try --laq-weights {'online' if weights == 'ema' else 'ema'}")
        state, layout = chosen, f"ema-pytorch EMA file, {weights} weights"
    elif weights == "online":
        raise LaqError(f"--laq-weights online: LAQ checkpoint {path} is not an EMA file (it has "
                       f"one set of weights); drop the flag")
    state = {(k[len("module."):] if k.startswith("module.") else k): v
             for k, v in state.items() if torch.is_tensor(v)}
    return state, layout


def load_laq(args, device):
    """(LAQ model in eval mode, its config, key report). Every model key must be found, and a
    checkpoint key the model does not use is an error unless --laq-allow-unused-keys: LAQ's own
    load is non-strict, so a deeper checkpoint would otherwise lose its extra layers silently."""
    package = find_laq_package(args.laq_repo)
    laq_class = import_laq_class(package)
    config = laq_config(args.laq_config, laq_class)
    built = (f"the model built with --laq-config {args.laq_config}" if args.laq_config else
             "the model built with LAPA's SthV2 settings (no --laq-config given)")
    fix = ("check --laq-config" if args.laq_config else
           "pass the checkpoint's settings with --laq-config YAML")
    # the keys first, at no cost: the checkpoint memory-mapped, the model on the meta device
    state, layout = laq_state_dict(args.laq, args.laq_weights)
    with RedirectCuda("meta"), torch.device("meta"):
        own = {k: v.shape for k, v in laq_class(**config).state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k])}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k]]
    if missing or mismatched:
        raise LaqError(f"LAQ checkpoint {args.laq} does not fit {built} ({config}): "
                       f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(mismatched)} "
                       f"shape mismatches (e.g. {mismatched[:2]}); {fix}")
    if unexpected and not args.laq_allow_unused_keys:
        raise LaqError(f"LAQ checkpoint {args.laq} has {len(unexpected)} keys {built} does not "
                       f"use, in {blocks_of(unexpected)}: a checkpoint of a deeper model (more "
                       f"spatial_depth / temporal_depth layers?) would lose them; {fix}, or pass "
                       f"--laq-allow-unused-keys to load it anyway")
    with RedirectCuda(device):
        model = laq_class(**config)
    torch.nn.Module.load_state_dict(model, {k: state[k] for k in own}, strict=True)
    with RedirectCuda(device):
        model = model.to(device).eval()
    if unexpected:
        print(f"warning: --laq-allow-unused-keys: ignoring {len(unexpected)} LAQ checkpoint keys "
              f"in {blocks_of(unexpected)}", file=sys.stderr)
    return model, config, {"layout": layout, "missing_keys": missing,
                           "unexpected_keys": unexpected, "package": package}


class LaqRunner:
    """LAQ's reconstruction, action codes and continuous action vectors from one `inference`
    pass.

    The published `inference` returns either the reconstruction or (with
    return_only_codebook_ids) the codes, each a full pass through both transformers. Here two
    methods of the quantizer are wrapped, on this model instance only and only during the call:
    `inference(first_tokens, last_tokens)`, to keep the code indices it returns, and
    `encode`, which it calls on the first and then the last tokens, to keep the continuous
    action vector it quantizes (encode(last) - encode(first), code_seq_len x quant_dim). A
    checkout whose quantizer differs falls back to a second pass for the codes (`passes` says
    so) and gives no continuous vectors.
    """

    def __init__(self, model):
        self.model, self.passes = model, 1

    def __call__(self, clip, actions_from=None):
        """clip (B, 3, 2, S, S) in [0, 1] -> (reconstruction (B, 3, S, S) as returned, codes
        (B, code_seq_len) int64, continuous action vectors (B, code_seq_len * quant_dim) or
        None, the current frames' encoded tokens (B, code_seq_len * quant_dim) or None).

        `actions_from` (B,) indices: each current frame is decoded with the quantised action
        the quantizer returned for pair actions_from[i] of the same clip (controllability: a
        wrong action should predict worse); codes are still each pair's own."""
        vq, seen, encoded = self.model.vq, {}, []
        inference, encode = vq.inference, getattr(vq, "encode", None)

        def keep_codes(*args, **kwargs):
            out = inference(*args, **kwargs)
            if isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[1]):
                seen["codes"] = out[1]
                if actions_from is not None and torch.is_tensor(out[0]) \
                        and out[0].shape[0] == len(clip):
                    seen["swapped"] = True
                    return out[0][actions_from], out[1]
            return out

        def keep_encoded(*args, **kwargs):
            encoded.append(encode(*args, **kwargs))
            return encoded[-1]

        vq.inference = keep_codes
        if encode is not None:
            vq.encode = keep_encoded
        try:
            recon = self.model.inference(clip)
        finally:                                  # the class's methods again
            vars(vq).pop("inference", None)
            vars(vq).pop("encode", None)
        if actions_from is not None and not seen.get("swapped"):
            raise LaqError("this LAQ checkout's quantizer returns no (actions, codes) pair from "
                           "vq.inference, so its actions cannot be exchanged between pairs; run "
                           "without the controllability check (--controllability none)")
        codes = seen.get("codes")
        if codes is None or codes.shape[0] != len(clip):
            self.passes = 2
            codes = self.model.inference(clip, return_only_codebook_ids=True)
        action = current = None
        if len(encoded) == 2 and encoded[0].shape == encoded[1].shape:
            action = (encoded[1] - encoded[0]).float().reshape(len(clip), -1)
            current = encoded[0].float().reshape(len(clip), -1)
        return recon, codes.reshape(len(clip), -1).long(), action, current
