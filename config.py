"""Strict, typed YAML configuration shared by every script.

A config has five sections (model_params, data_params, exp_params, trainer_params,
logging_params). Each key has a declared type; unknown keys, wrong types, missing sections
and out-of-range values raise ConfigError with one line naming the key and the file.
model_params is checked against the constructor of the model class it names, so every model
family declares its own keys in one place.
"""
import dataclasses
import importlib.util
import inspect
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from typing import List, Literal

import yaml

from errors import ConfigError
from files import open_regular


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataParams:
    dataset: Literal["sthv2", "celeba"] = "sthv2"
    """`sthv2` (frames tree or packed shards) or `celeba` (arrays of `prepare_celeba.py`)"""
    data_path: str = ""
    """SthV2: the frames tree (`<video_id>/img_00001.jpg`) or a folder of packed shards;
    CelebA: the folder of `prepare_celeba.py`'s arrays. Must exist"""
    image_size: int = 256
    """each frame is resized to this square"""
    resize: Literal["crop", "stretch"] = "crop"
    """`crop`: the centre square of each frame; `stretch`: the whole frame squeezed to a
    square, as LAQ is trained (`config_vae_sthv2.yaml` uses it). Recorded in the checkpoint;
    `evaluate.py` and `compare_with_laq.py` feed the model the same way. SthV2 only"""
    train_batch_size: int = 64
    """**global** training batch; must divide by the number of processes"""
    val_batch_size: int = 64
    """global validation batch"""
    num_workers: int = 4
    """DataLoader workers per process"""
    pin_memory: bool = True
    """pinned host memory (GPU only)"""
    labels_path: str = ""
    """folder with the SthV2 label JSONs; "" = `data_path`"""
    val_fraction: float = 0.05
    """validation share when no label files are found"""
    frame_stride: int = 1
    """use every n-th frame of each video (SthV2 neighbours are near duplicates)"""
    frame_offset: int = 0
    """0: single frames. > 0 (latent action models, required there): items are (frame t, frame
    min(t + offset, last)) pairs, the second clamped to the video's last frame as LAQ's loader
    does (LAPA: 30 at 12 fps)"""
    index_cache_dir: str = ""
    """where the frame index is cached; "" = `$XDG_CACHE_HOME/sthv2_frame_index`"""
    prefetch_factor: int = 4
    """batches prefetched per worker"""
    worker_timeout: int = 600
    """seconds a DataLoader worker may take for one batch before the run stops with a one-line
    error (a hung file read); 0 = wait forever"""


@dataclass
class ExpParams:
    LR: float = 1e-4
    """learning rate"""
    weight_decay: float = 0.0
    """weight decay (decoupled with `adamw`)"""
    scheduler_gamma: float = 0.95
    """ExponentialLR factor, applied once per epoch"""
    kld_weight: float = 1e-4
    """weight of the KL term (see The model)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm, 0 = off; must equal `trainer_params.gradient_clip_val`"""
    optimizer: Literal["adam", "adamw"] = "adam"
    """`adam` or `adamw` (fused on GPU)"""
    warmup_steps: int = 0
    """linear learning-rate warm-up steps"""
    hflip: bool = False
    """random horizontal flips of training frames"""
    seed: int = 42
    """initial weights, data order, noise"""


@dataclass
class TrainerParams:
    """A step whose gradient is not finite (a non-finite loss makes it so) is skipped (no
    update, decided on the device from the rank-averaged gradient, so every rank skips the
    same steps), counted and logged at the next log step (`train/nonfinite_skipped`); once
    `max_nonfinite_steps` in a row have been seen, the run writes a checkpoint and stops with an
    error naming the step. Steps are never waited for in between: losses, gradient norms and
    these counts are read at log steps only."""

    gpus: int = -1
    """GPUs per node for `run_train.sh`: -1 all visible, 0 CPU, N at most N"""
    max_epochs: int = 200
    """epochs"""
    max_steps: int = 0
    """stop after this many optimizer steps; 0 = no limit"""
    gradient_clip_val: float = 1.0
    """same as `exp_params.max_grad_norm` (both kept for compatibility with the original
    config)"""
    check_val_every_n_epoch: int = 1
    """validation frequency (and always at the end)"""
    limit_val_batches: int = 0
    """validate on this many evenly spread global batches; 0 = the whole split"""
    log_every_n_steps: int = 50
    """scalar logging frequency"""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """`bf16`, `fp16` (with a grad scaler) or `fp32` autocast on GPU; CPU runs fp32. VAE-GAN
    refuses `fp16`: its three updates follow its equilibrium rules, which a grad scaler's own
    step skipping would break"""
    sync_batchnorm: bool = False
    """BatchNorm statistics over all processes (torch's SyncBatchNorm on GPU)"""
    compile: bool = True
    """`torch.compile` the model on GPU; a model that fails to compile stops the run with
    torch's error (set `false` to train eagerly). Ignored on CPU"""
    channels_last: bool = True
    """channels-last memory format on GPU; ignored on CPU"""
    deterministic: bool = False
    """`torch.use_deterministic_algorithms(True)`, no cuDNN autotuning"""
    max_nonfinite_steps: int = 20
    """stop after this many non-finite steps in a row"""
    stop_within_s: float = 20.0
    """warn when a stop signal could take longer than this to act on (two steps under DDP, one
    alone, at the measured step time)"""


@dataclass
class LoggingParams:
    """`wandb: true` mirrors every TensorBoard scalar and image to a Weights & Biases run
    (rank 0 only; `pip install wandb==0.31.0`), with `trainer/step` as every chart's x axis.
    The run's W&B id is kept in `RUN_DIR/wandb_run_id`, so `--resume` continues the same W&B
    run. Compute nodes without internet: `wandb_mode: offline` (or `WANDB_MODE=offline`); the
    run is written under `RUN_DIR/wandb/` and uploaded later from a login node with
    `wandb sync RUN_DIR/wandb/offline-run-*`."""

    save_dir: str = "logs_vae"
    """root of run directories"""
    name: str = "VanillaVAE_sthv2"
    """run directory name"""
    save_every_n_steps: int = 5000
    """checkpoint frequency"""
    log_images_every_n_steps: int = 5000
    """image grid frequency (and at the end)"""
    keep_last_checkpoints: int = 3
    """`step_*.pt` files kept; 0 = all"""
    num_image_samples: int = 8
    """images per grid"""
    wandb: bool = False
    """also log to Weights & Biases (see below)"""
    wandb_project: str = "vae-sthv2"
    """W&B project"""
    wandb_entity: str = ""
    """W&B entity (team or user); "" = your default"""
    wandb_run_name: str = ""
    """W&B run name; "" = `name`"""
    wandb_mode: Literal["", "online", "offline", "disabled"] = ""
    """online, offline or disabled; "" = `$WANDB_MODE`, else online"""


@dataclass
class Config:
    model_params: dict
    data_params: DataParams = field(default_factory=DataParams)
    exp_params: ExpParams = field(default_factory=ExpParams)
    trainer_params: TrainerParams = field(default_factory=TrainerParams)
    logging_params: LoggingParams = field(default_factory=LoggingParams)

    @property
    def run_dir(self):
        return os.path.join(self.logging_params.save_dir, self.logging_params.name)

    def to_dict(self):
        return {"model_params": dict(self.model_params),
                **{f.name: dataclasses.asdict(getattr(self, f.name))
                   for f in dataclasses.fields(self) if f.name != "model_params"}}


def data_params_of(config, **overrides):
    """The data section of a checkpoint's config (a plain dict) as DataParams, with the
    overrides that are not None (e.g. --data-path). Keys this version does not know (from
    older checkpoints) are dropped; the values were validated when the run started."""
    known = {f.name for f in dataclasses.fields(DataParams)}
    raw = {k: v for k, v in (config.get("data_params") or {}).items() if k in known}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return DataParams(**raw)


SECTIONS = {"data_params": DataParams, "exp_params": ExpParams,
            "trainer_params": TrainerParams, "logging_params": LoggingParams}


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


def _short(value):
    """A bounded repr for messages: a YAML alias bomb must not be expanded to print it."""
    return _REPR.repr(value)


def _check_type(value, annotation, key):
    """Return value converted to `annotation` (int -> float only), or raise ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:                          # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {_short(value)}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {_short(value)}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {_short(value)}")
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got "
                          f"{type(value).__name__} {_short(value)}")
    return value


def _model_class(name):
    from models import MODELS
    return MODELS.get(name)


def _model_schema(name):
    from models import MODELS
    if name not in MODELS:
        raise ConfigError(f"model_params.name: unknown model {_short(name)}; "
                          f"choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    hints = typing.get_type_hints(cls.__init__)
    return {p.name: (hints[p.name], p.default)
            for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def _build_section(cls, raw, section):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return cls(**{k: _check_type(v, hints[k], f"{section}.{k}") for k, v in raw.items()})


def _build_model_params(raw):
    if "name" not in raw:
        raise ConfigError("model_params.name: missing (the model to train)")
    name = _check_type(raw["name"], str, "model_params.name")
    schema = _model_schema(name)
    params = {"name": name}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in schema:
            raise ConfigError(f"model_params.{key}: unknown key for {name} "
                              f"(known: {', '.join(sorted(schema))})")
        params[key] = _check_type(value, schema[key][0], f"model_params.{key}")
    for key, (_, default) in schema.items():
        if key not in params:
            if default is inspect.Parameter.empty:
                raise ConfigError(f"model_params.{key}: missing (required by {name})")
            params[key] = list(default) if isinstance(default, tuple) else default
    return params


def model_params_of(config):
    """The model_params of a checkpoint's config (a plain dict), checked as a run's are: the
    family's keys and types, and built on the meta device. Raises ConfigError naming the key."""
    from models import completed
    raw = config.get("model_params") if isinstance(config, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError("model_params: missing, or not a mapping of keys")
    params = _build_model_params(completed(raw))
    _try_build(params)
    return params


def _try_build(params):
    """Build the model on the meta device (no memory, no time), as the run will build it, so
    that a value only the model's constructor checks is a ConfigError before anything is
    written."""
    import torch
    from models import build_model
    try:
        with torch.device("meta"):
            return build_model(params)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"model_params: {str(e).splitlines()[0]} ({params['name']})") from None


def _validate(cfg, world_size, check_paths=True):
    """Range and consistency checks that a type alone cannot express."""
    def need(ok, key, message):
        if not ok:
            raise ConfigError(f"{key}: {message}")

    m, d, e, t, lg = (cfg.model_params, cfg.data_params, cfg.exp_params,
                      cfg.trainer_params, cfg.logging_params)
    if check_paths:
        need(d.data_path != "", "data_params.data_path",
             "missing (the folder of video frame folders)")
        need(os.path.isdir(d.data_path), "data_params.data_path",
             f"folder {d.data_path!r} does not exist")
    if "image_size" in m:
        need(m["image_size"] == d.image_size, "data_params.image_size",
             f"{d.image_size} differs from model_params.image_size {m['image_size']}")
        depth = len(m.get("hidden_dims", []))
        need(m["image_size"] % 2 ** depth == 0 and m["image_size"] >= 2 ** depth,
             "model_params.image_size",
             f"{m['image_size']} is not divisible by 2^len(hidden_dims) = {2 ** depth}")
    for key in ("in_channels", "latent_dim"):
        if key in m:
            need(m[key] > 0, f"model_params.{key}", f"must be positive, got {m[key]}")
    if "hidden_dims" in m:
        need(len(m["hidden_dims"]) > 0 and all(h > 0 for h in m["hidden_dims"]),
             "model_params.hidden_dims", "must be a non-empty list of positive ints")
    pairs = getattr(_model_class(m.get("name")), "takes_pairs", False)
    need(d.frame_offset >= 0, "data_params.frame_offset", f"must be >= 0, got {d.frame_offset}")
    need(d.frame_offset > 0 or not pairs, "data_params.frame_offset",
         f"{m.get('name')} trains on frame pairs: set the offset between them (LAPA: 30)")
    need(d.frame_offset == 0 or pairs, "data_params.frame_offset",
         f"{m.get('name')} trains on single frames: leave it at 0")
    need(not (pairs and d.dataset == "celeba"), "data_params.dataset",
         f"{m.get('name')} trains on frame pairs of videos; CelebA holds single images")
    for key in ("image_size", "train_batch_size", "val_batch_size", "frame_stride",
                "prefetch_factor"):
        need(getattr(d, key) > 0, f"data_params.{key}", f"must be positive, got {getattr(d, key)}")
    need(d.num_workers >= 0, "data_params.num_workers", f"must be >= 0, got {d.num_workers}")
    need(d.worker_timeout >= 0, "data_params.worker_timeout",
         f"must be >= 0 seconds, got {d.worker_timeout}")
    need(not (d.resize == "stretch" and d.dataset == "celeba"), "data_params.resize",
         "applies to SthV2 frames; CelebA arrays were cropped by prepare_celeba.py (--crop)")
    need(0.0 < d.val_fraction < 1.0, "data_params.val_fraction",
         f"must be in (0, 1), got {d.val_fraction}")
    for key in ("train_batch_size", "val_batch_size"):
        batch = getattr(d, key)
        need(batch % world_size == 0, f"data_params.{key}",
             f"global batch {batch} is not divisible by the {world_size} processes")
    need(e.LR > 0, "exp_params.LR", f"must be positive, got {e.LR}")
    need(e.weight_decay >= 0, "exp_params.weight_decay", f"must be >= 0, got {e.weight_decay}")
    need(0 < e.scheduler_gamma <= 1, "exp_params.scheduler_gamma",
         f"must be in (0, 1], got {e.scheduler_gamma}")
    need(e.kld_weight >= 0, "exp_params.kld_weight", f"must be >= 0, got {e.kld_weight}")
    need(e.max_grad_norm >= 0, "exp_params.max_grad_norm", f"must be >= 0, got {e.max_grad_norm}")
    need(e.warmup_steps >= 0, "exp_params.warmup_steps", f"must be >= 0, got {e.warmup_steps}")
    need(t.gradient_clip_val >= 0, "trainer_params.gradient_clip_val",
         f"must be >= 0, got {t.gradient_clip_val}")
    need(e.max_grad_norm == t.gradient_clip_val, "exp_params.max_grad_norm",
         f"{e.max_grad_norm} disagrees with trainer_params.gradient_clip_val "
         f"{t.gradient_clip_val}; both set the gradient clipping norm (0 = off)")
    need(t.gpus >= -1, "trainer_params.gpus", f"must be -1 (all), 0 (CPU) or a count, got {t.gpus}")
    for key in ("max_epochs", "check_val_every_n_epoch", "log_every_n_steps",
                "max_nonfinite_steps"):
        need(getattr(t, key) > 0, f"trainer_params.{key}", f"must be positive, got {getattr(t, key)}")
    need(t.stop_within_s > 0, "trainer_params.stop_within_s",
         f"must be positive seconds, got {t.stop_within_s}")
    for key in ("max_steps", "limit_val_batches"):
        need(getattr(t, key) >= 0, f"trainer_params.{key}", f"must be >= 0, got {getattr(t, key)}")
    for key in ("save_every_n_steps", "log_images_every_n_steps", "num_image_samples"):
        need(getattr(lg, key) > 0, f"logging_params.{key}", f"must be positive, got {getattr(lg, key)}")
    need(lg.keep_last_checkpoints >= 0, "logging_params.keep_last_checkpoints",
         f"must be >= 0, got {lg.keep_last_checkpoints}")
    need(lg.name != "" and "/" not in lg.name, "logging_params.name",
         f"must be a non-empty folder name, got {_short(lg.name)}")
    need(not lg.wandb or importlib.util.find_spec("wandb") is not None, "logging_params.wandb",
         "true needs the wandb package, which is not installed (pip install wandb==0.31.0), "
         "or set it to false")


def apply_override(raw, assignment):
    """Apply one `SECTION.KEY=VALUE` to the raw dict; VALUE is read as YAML."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ConfigError(f"--set {_short(assignment)}: expected SECTION.KEY=VALUE")
    path, value = assignment.split("=", 1)
    section, key = path.split(".", 1)
    if section not in raw and section not in SECTIONS and section != "model_params":
        raise ConfigError(f"--set {path}: unknown section {_short(section)}")
    raw.setdefault(section, {})[key] = parse_yaml(value) if value != "" else ""


def config_from_dict(raw, world_size=1, check_paths=True):
    # a run's config.yaml records what produced it (manifest): reading it back ignores that
    raw, sections = check_sections(raw)
    cfg = Config(model_params=_build_model_params(raw["model_params"]), **sections)
    _validate(cfg, world_size, check_paths)
    model = _try_build(cfg.model_params)         # what only the model's constructor checks
    groups = model.optimizer_groups()
    if len(groups) > 1 and cfg.trainer_params.precision == "fp16":
        raise ConfigError(
            f"trainer_params.precision: fp16 is not available for {cfg.model_params['name']}: "
            f"its {len(groups)} updates ({', '.join(groups)}) follow its own rules, which a "
            f"grad scaler's own skipping would break; use bf16 or fp32")
    return cfg


def check_sections(raw):
    """The sections and every key and type outside model_params: what a config can be checked
    for without the model families, so without torch (precheck)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections")
    raw = {k: v for k, v in raw.items() if k != "manifest"}
    for section in raw:
        if section != "model_params" and section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: model_params, "
                              f"{', '.join(SECTIONS)})")
    for section in ("model_params", *SECTIONS):
        if section not in raw:
            raise ConfigError(f"{section}: missing section")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {_short(raw[section])}")
    return raw, {s: _build_section(cls, raw[s], s) for s, cls in SECTIONS.items()}


def load_config(path, overrides=(), world_size=1, check_paths=True):
    """Read, override, type-check and validate; every failure is one ConfigError line."""
    return _from_file(path, overrides, lambda raw: config_from_dict(raw, world_size, check_paths))


def precheck(path, overrides=()):
    """What load_config checks before the model families are imported (sections, keys and
    types outside model_params), so a typo is reported at once, before torch loads; the
    training scripts call it first."""
    _from_file(path, overrides, check_sections)


def _from_file(path, overrides, build):
    try:
        with open_regular(path, "r") as f:
            raw = parse_yaml(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is expected)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValueError as e:                           # a FIFO: never opened blocking
        raise ConfigError(f"cannot read config {path}: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, not a "
                          f"{type(raw).__name__}")
    set_keys = {a.split("=", 1)[0] for a in overrides}
    try:
        for assignment in overrides:
            apply_override(raw, assignment)
        return build(raw)
    except ConfigError as e:
        key = str(e).split(":", 1)[0]                  # the blamed key, e.g. data_params.LR
        raise ConfigError(f"--set {e}" if key in set_keys else f"{path}: {e}") from None
