"""Checkpoints that survive kills: atomic writes, verified loads, RNG state for exact resume.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(path, weights_only=True)`; nothing in it can run code when loaded.
"""
import glob
import logging
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

log = logging.getLogger("vae")

STEP_FILE = re.compile(r"^step_(\d{7,})\.pt$")
REQUIRED_KEYS = ("model", "config", "step", "epoch", "optimizer", "scheduler", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (one line, names the file)."""


def bare_model(model):
    """The module under DDP and torch.compile wrappers, whose state_dict has clean keys."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state():
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": [list(py_state[1]), py_state[2], py_state[0]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    internal, gauss, version = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_atomic(obj, path):
    """Write to a temp file in the same folder, fsync, then rename over `path`: a kill at any
    moment leaves either the old file or the complete new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def link_atomic(src, dst):
    """Make `dst` a copy of `src` atomically; a hard link when the filesystem has them."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:                     # no hard links here: copy the bytes, then rename
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    os.replace(tmp, dst)


def load_checkpoint(path):
    """Load with weights_only=True; refuse pickled code and incomplete files with one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is refused: it holds objects other than "
                              f"tensors and plain data, which could run code ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_training_checkpoint(path):
    ckpt = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: "
                              f"not a training checkpoint of this project")
    return ckpt


def step_checkpoints(ckpt_dir):
    """step_*.pt files, newest first."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "step_*.pt")):
        m = STEP_FILE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(ckpt_dir):
    """The newest checkpoint of a run that loads completely, and the ones that did not.

    Candidates are last.pt and the step files, newest first; each is loaded (weights_only)
    before it is chosen, so a file cut short by a kill falls back to the one before it.
    Returns (path, checkpoint, rejected messages); path is None when nothing is usable.
    """
    rejected = []

    def attempt(path):
        try:
            return load_training_checkpoint(path)
        except CheckpointError as e:
            rejected.append(str(e))
            return None

    last_path = os.path.join(ckpt_dir, "last.pt")
    last = attempt(last_path) if os.path.exists(last_path) else None
    for path in step_checkpoints(ckpt_dir):
        step = int(STEP_FILE.match(os.path.basename(path)).group(1))
        if last is not None and last["step"] >= step:
            break
        ckpt = attempt(path)
        if ckpt is not None:
            return path, ckpt, rejected
    return (last_path, last, rejected) if last is not None else (None, None, rejected)


def prune_step_checkpoints(ckpt_dir, keep):
    if keep <= 0:
        return
    for path in step_checkpoints(ckpt_dir)[keep:]:
        os.remove(path)
