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
import os
import typing
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import yaml

from config_types import check_type, parse_yaml, short
from errors import ConfigError
from files import open_regular


def _rule(test, says, show_value=True):
    """A field's own rule, written beside it (`field(metadata=...)`): `test(value)` must hold,
    `says` what it asks; checked when the section is built (Section.__post_init__)."""
    return {"rule": (test, says, show_value)}


POSITIVE = _rule(lambda v: v > 0, "must be positive")
POSITIVE_SECONDS = _rule(lambda v: v > 0, "must be positive seconds")
NON_NEGATIVE = _rule(lambda v: v >= 0, "must be >= 0")
NON_NEGATIVE_SECONDS = _rule(lambda v: v >= 0, "must be >= 0 seconds")
FRACTION = _rule(lambda v: 0 < v < 1, "must be in (0, 1)")
FACTOR = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
FOLDER_NAME = _rule(lambda v: v != "" and "/" not in v, "must be a non-empty folder name")
OPTIONAL_POSITIVE = _rule(lambda v: v is None or v > 0, "must be positive")
OPTIONAL_NON_NEGATIVE = _rule(lambda v: v is None or v >= 0, "must be >= 0")


class Section:
    """A config section: its fields' rules are checked as it is built (pythae's style), the
    rules across sections in config_from_dict."""
    NAME = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            test, says, show_value = f.metadata.get("rule", (None, None, None))
            value = getattr(self, f.name)
            if test is not None and not test(value):
                raise ConfigError(f"{self.NAME}.{f.name}: {says}"
                                  + (f", got {short(value)}" if show_value else ""))


@dataclass
class DataParams(Section):
    NAME = "data_params"

    dataset: Literal["sthv2", "celeba"] = "sthv2"
    """`sthv2` (frames tree or packed shards) or `celeba` (arrays of `prepare_celeba.py`)"""
    data_path: str = ""
    """SthV2: the frames tree (`<video_id>/img_00001.jpg`) or a folder of packed shards;
    CelebA: the folder of `prepare_celeba.py`'s arrays. Must exist"""
    image_size: Optional[int] = field(default=None, metadata=OPTIONAL_POSITIVE)
    """the seed config's name for `model_params.image_size` (each frame is resized to that
    square): unset, it is that value; set, it must agree with it"""
    resize: Literal["crop", "stretch"] = "crop"
    """`crop`: the centre square of each frame; `stretch`: the whole frame squeezed to a
    square, as LAQ is trained (`config_vae_sthv2.yaml` uses it). Recorded in the checkpoint;
    `evaluate.py` and `compare_with_laq.py` feed the model the same way. SthV2 only"""
    train_batch_size: int = field(default=64, metadata=POSITIVE)
    """**global** training batch; must divide by the number of processes"""
    val_batch_size: int = field(default=64, metadata=POSITIVE)
    """global validation batch"""
    num_workers: int = field(default=4, metadata=NON_NEGATIVE)
    """DataLoader workers per process"""
    pin_memory: bool = True
    """pinned host memory (GPU only)"""
    labels_path: str = ""
    """folder with the SthV2 label JSONs; "" = `data_path`"""
    val_fraction: float = field(default=0.05, metadata=FRACTION)
    """validation share when no label files are found"""
    frame_stride: int = field(default=1, metadata=POSITIVE)
    """use every n-th frame of each video (SthV2 neighbours are near duplicates)"""
    frame_offset: int = field(default=0, metadata=NON_NEGATIVE)
    """0: single frames. > 0 (latent action models, required there): items are (frame t, frame
    min(t + offset, last)) pairs, the second clamped to the video's last frame as LAQ's loader
    does (LAPA: 30 at 12 fps)"""
    index_cache_dir: str = ""
    """where the frame index is cached; "" = `$XDG_CACHE_HOME/sthv2_frame_index`"""
    prefetch_factor: int = field(default=4, metadata=POSITIVE)
    """batches prefetched per worker"""
    worker_timeout: int = field(default=600, metadata=NON_NEGATIVE_SECONDS)
    """seconds a DataLoader worker may take for one batch before the run stops with a one-line
    error (a hung file read); 0 = wait forever"""


@dataclass
class ExpParams(Section):
    NAME = "exp_params"

    LR: float = field(default=1e-4, metadata=POSITIVE)
    """learning rate"""
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    """weight decay (decoupled with `adamw`)"""
    scheduler_gamma: float = field(default=0.95, metadata=FACTOR)
    """ExponentialLR factor, applied once per epoch"""
    kld_weight: float = field(default=1e-4, metadata=NON_NEGATIVE)
    """weight of the KL term (see The model)"""
    max_grad_norm: float = field(default=1.0, metadata=NON_NEGATIVE)
    """gradient clipping norm, 0 = off (`trainer_params.gradient_clip_val`, if set, must agree)"""
    optimizer: Literal["adam", "adamw"] = "adam"
    """`adam` or `adamw` (fused on GPU)"""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_rule(
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"))
    """Adam's moment decay rates (LAPA's LAQ trainer: [0.9, 0.99])"""
    eps: float = field(default=1e-8, metadata=POSITIVE)
    """Adam's denominator epsilon"""
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    """linear learning-rate warm-up steps"""
    hflip: bool = False
    """random horizontal flips of training frames"""
    seed: int = 42
    """initial weights, data order, noise"""


@dataclass
class TrainerParams(Section):
    """A step whose gradient is not finite (a non-finite loss makes it so) is skipped (no
    update, decided on the device from the rank-averaged gradient, so every rank skips the
    same steps), counted and logged at the next log step (`train/nonfinite_skipped`); once
    `max_nonfinite_steps` in a row have been seen, the run writes a checkpoint and stops with an
    error naming the step. Steps are never waited for in between: losses, gradient norms and
    these counts are read at log steps only."""
    NAME = "trainer_params"

    gpus: int = field(default=-1, metadata=_rule(lambda v: v >= -1,
                                                 "must be -1 (all), 0 (CPU) or a count"))
    """GPUs per node for `run_train.sh`: -1 all visible, 0 CPU, N at most N"""
    max_epochs: int = field(default=200, metadata=POSITIVE)
    """epochs"""
    max_steps: int = field(default=0, metadata=NON_NEGATIVE)
    """stop after this many optimizer steps; 0 = no limit"""
    gradient_clip_val: Optional[float] = field(default=None, metadata=OPTIONAL_NON_NEGATIVE)
    """the seed config's name for `exp_params.max_grad_norm`: unset, it is that value; set, it
    must agree with it"""
    check_val_every_n_epoch: int = field(default=1, metadata=POSITIVE)
    """validation frequency (and always at the end)"""
    limit_val_batches: int = field(default=0, metadata=NON_NEGATIVE)
    """validate on this many evenly spread global batches; 0 = the whole split"""
    log_every_n_steps: int = field(default=50, metadata=POSITIVE)
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
    max_nonfinite_steps: int = field(default=20, metadata=POSITIVE)
    """stop after this many non-finite steps in a row"""
    init_from: str = ""
    """a checkpoint whose tensors start this run where names and shapes match (a converted LAQ
    for a Gaussian or no-action twin: everything but the bottleneck); the log lists what was
    copied and what is new. Only a fresh run: `--resume` restores its own checkpoint"""
    stop_within_s: float = field(default=20.0, metadata=POSITIVE_SECONDS)
    """warn when a stop signal could take longer than this to act on (two steps under DDP, one
    alone, at the measured step time)"""


@dataclass
class LoggingParams(Section):
    """`wandb: true` mirrors every TensorBoard scalar and image to a Weights & Biases run
    (rank 0 only; `pip install wandb==0.31.0`), with `trainer/step` as every chart's x axis.
    The run's W&B id is kept in `RUN_DIR/wandb_run_id`, so `--resume` continues the same W&B
    run. Compute nodes without internet: `wandb_mode: offline` (or `WANDB_MODE=offline`); the
    run is written under `RUN_DIR/wandb/` and uploaded later from a login node with
    `wandb sync RUN_DIR/wandb/offline-run-*`."""
    NAME = "logging_params"

    save_dir: str = "logs_vae"
    """root of run directories"""
    name: str = field(default="VanillaVAE_sthv2", metadata=FOLDER_NAME)
    """run directory name"""
    save_every_n_steps: int = field(default=5000, metadata=POSITIVE)
    """checkpoint frequency"""
    log_images_every_n_steps: int = field(default=5000, metadata=POSITIVE)
    """image grid frequency (and at the end)"""
    keep_last_checkpoints: int = field(default=3, metadata=NON_NEGATIVE)
    """`step_*.pt` files kept; 0 = all"""
    num_image_samples: int = field(default=8, metadata=POSITIVE)
    """images per grid"""
    wandb: bool = field(default=False, metadata=_rule(
        lambda v: not v or importlib.util.find_spec("wandb") is not None,
        "true needs the wandb package, which is not installed (pip install wandb==0.31.0), or "
        "set it to false", show_value=False))
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


def _model_class(name):
    from models import MODELS
    return MODELS.get(name)


def _model_schema(name):
    from models import MODELS
    if name not in MODELS:
        raise ConfigError(f"model_params.name: unknown model {short(name)}; "
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
    return cls(**{k: check_type(v, hints[k], f"{section}.{k}") for k, v in raw.items()})


def _build_model_params(raw):
    if "name" not in raw:
        raise ConfigError("model_params.name: missing (the model to train)")
    name = check_type(raw["name"], str, "model_params.name")
    schema = _model_schema(name)
    params = {"name": name}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in schema:
            raise ConfigError(f"model_params.{key}: unknown key for {name} "
                              f"(known: {', '.join(sorted(schema))})")
        params[key] = check_type(value, schema[key][0], f"model_params.{key}")
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
    """The rules across sections (each section's own rules are beside its fields)."""
    def need(ok, key, message):
        if not ok:
            raise ConfigError(f"{key}: {message}")

    model, data, exp, trainer = (cfg.model_params, cfg.data_params, cfg.exp_params,
                                 cfg.trainer_params)
    if check_paths:
        need(data.data_path != "", "data_params.data_path",
             "missing (the folder of video frame folders)")
        need(os.path.isdir(data.data_path), "data_params.data_path",
             f"folder {data.data_path!r} does not exist")
    if "image_size" in model:
        need(data.image_size in (None, model["image_size"]), "data_params.image_size",
             f"{data.image_size} differs from model_params.image_size {model['image_size']}")
        data.image_size = model["image_size"]                # an alias of the model's
        depth = len(model.get("hidden_dims", []))
        need(model["image_size"] % 2 ** depth == 0 and model["image_size"] >= 2 ** depth,
             "model_params.image_size",
             f"{model['image_size']} is not divisible by 2^len(hidden_dims) = {2 ** depth}")
    for key in ("in_channels", "latent_dim"):
        if key in model:
            need(model[key] > 0, f"model_params.{key}", f"must be positive, got {model[key]}")
    if "hidden_dims" in model:
        need(len(model["hidden_dims"]) > 0 and all(h > 0 for h in model["hidden_dims"]),
             "model_params.hidden_dims", "must be a non-empty list of positive ints")
    name = model.get("name")
    pairs = getattr(_model_class(name), "takes_pairs", False)
    need(data.frame_offset > 0 or not pairs, "data_params.frame_offset",
         f"{name} trains on frame pairs: set the offset between them (LAPA: 30)")
    need(data.frame_offset == 0 or pairs, "data_params.frame_offset",
         f"{name} trains on single frames: leave it at 0")
    need(not (pairs and data.dataset == "celeba"), "data_params.dataset",
         f"{name} trains on frame pairs of videos; CelebA holds single images")
    need(not (data.resize == "stretch" and data.dataset == "celeba"), "data_params.resize",
         "applies to SthV2 frames; CelebA arrays were cropped by prepare_celeba.py (--crop)")
    for key in ("train_batch_size", "val_batch_size"):
        batch = getattr(data, key)
        need(batch % world_size == 0, f"data_params.{key}",
             f"global batch {batch} is not divisible by the {world_size} processes")
    if check_paths and trainer.init_from:
        need(os.path.isfile(trainer.init_from), "trainer_params.init_from",
             f"{trainer.init_from!r} is not a file (a checkpoint to start from)")
    need(trainer.gradient_clip_val in (None, exp.max_grad_norm), "trainer_params.gradient_clip_val",
         f"{trainer.gradient_clip_val} disagrees with exp_params.max_grad_norm "
         f"{exp.max_grad_norm}; both name the gradient clipping norm (0 = off): set one")
    trainer.gradient_clip_val = exp.max_grad_norm            # an alias of the norm


def apply_override(raw, assignment):
    """Apply one `SECTION.KEY=VALUE` to the raw dict; VALUE is read as YAML."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ConfigError(f"--set {short(assignment)}: expected SECTION.KEY=VALUE")
    path, value = assignment.split("=", 1)
    section, key = path.split(".", 1)
    if section not in raw and section not in SECTIONS and section != "model_params":
        raise ConfigError(f"--set {path}: unknown section {short(section)}")
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
            raise ConfigError(f"{section}: expected a mapping of keys, got {short(raw[section])}")
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
