"""Checkpoint files that survive kills: atomic writes, verified loads, a run's step files, and
the RNG state for an exact resume. Where a run resumes from: run_directory.py.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(path, weights_only=True)`; nothing in it can run code when loaded.
"""
import glob
import logging
import os
import pickle
import random
import re
import zipfile


import numpy as np
import torch

from collectives import all_gather_object, barrier
from errors import CheckpointError, TrainingError
from files import atomic_write, link_atomic, open_regular

log = logging.getLogger("vae")

STEP_FILE = re.compile(r"^step_(\d{7,})\.pt$")
REQUIRED_KEYS = ("model", "config", "step", "epoch", "optimizer", "scheduler", "rng")


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
    with atomic_write(path) as f:
        torch.save(obj, f)


def _kind_of_file(path):
    """None for what torch.save writes (a zip archive of uncompressed records, or the legacy
    pickle stream); else a few words on what the file is instead. Looks at what the path is
    before reading it (a FIFO would block the read forever) and at the archive's directory
    before anything is inflated."""
    with open_regular(path) as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04"):
            return _compressed_record(f, os.fstat(f.fileno()).st_size)
    if head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "an image"
    return "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "another format"


def _compressed_record(f, size):
    """torch.save stores every record of its archive uncompressed, so a tensor takes the bytes
    it declares. A compressed record would be inflated whole in memory before torch compares
    it with the tensor's size (15 MB of deflated zeros inflate to 1.5 GiB): named here, from
    the archive's directory alone."""
    try:
        records = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None                                   # torch reports the damage itself
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
            return (f"a compressed record, {record.filename} ({record.compress_size:,} bytes "
                    f"that inflate to {record.file_size:,}), which torch.save never writes")
    return None


def load_checkpoint(path, mmap=False):
    """Load with weights_only=True; refuse pickled code, other files and incomplete files,
    each with one line that names the file. `mmap`: map the file instead of reading it (its
    keys and shapes are known at once; a tensor is read when it is used), where the file's
    format allows (torch.save's zip format; older files are read)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a PyTorch checkpoint file")
    try:
        kind = _kind_of_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror})") from None
    except ValueError as e:                           # a FIFO, a device: never opened blocking
        raise CheckpointError(f"checkpoint {path} cannot be loaded: it is {e}") from None
    if kind:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it holds {kind})")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)   # legacy format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is refused: it holds objects other than "
                              f"tensors and plain data, which could run code ({first})") from None
    except Exception as e:            # torch reports damaged archives in many ways
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_training_checkpoint(path):
    """A checkpoint of this project's training, its parts checked before anything uses them."""
    ckpt = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: "
                              f"not a training checkpoint of this project")
    config = ckpt["config"]
    wrong = [k for k, ok in (
        ("model", isinstance(ckpt["model"], dict) and all(torch.is_tensor(v)
                                                         for v in ckpt["model"].values())),
        ("config", isinstance(config, dict) and isinstance(config.get("model_params"), dict)),
        ("step", isinstance(ckpt["step"], int) and ckpt["step"] >= 0),
        ("epoch", isinstance(ckpt["epoch"], int) and ckpt["epoch"] >= 0),
        ("optimizer", isinstance(ckpt["optimizer"], dict)),
        ("scheduler", isinstance(ckpt["scheduler"], dict)),
        ("rng", isinstance(ckpt["rng"], list) and all(isinstance(r, dict) for r in ckpt["rng"])),
    ) if not ok]
    if wrong:
        raise CheckpointError(f"checkpoint {path} has unusable {', '.join(wrong)}: not a "
                              f"training checkpoint of this project, or damaged")
    return ckpt


def step_checkpoints(ckpt_dir):
    """step_*.pt files, newest first."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "step_*.pt")):
        m = STEP_FILE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def prune_step_checkpoints(ckpt_dir, keep):
    if keep <= 0:
        return
    for path in step_checkpoints(ckpt_dir)[keep:]:
        os.remove(path)


def save_step_checkpoint(ckpt_dir, state, rt, keep, also=None, alone=False, rank_state=None):
    """Write step_{step}.pt and last.pt (and `also`, e.g. vae_final.pt) from rank 0 with every
    rank's RNG states and `rank_state` (what the model holds per rank: Autoencoder.rank_state),
    prune old step files, then wait for rank 0. Collective: every rank calls it at the same
    step. Returns the step file's path.

    `alone`: this rank writes, without the others (which may be waiting in a step for it);
    between steps every rank holds the same weights and optimizer state, and only the other
    ranks' RNG states are missing (restore_rng says so on resume)."""
    own = {"rng": rng_state(), "model": rank_state or {}}
    ranks = [own] if alone else all_gather_object(own)
    path = os.path.join(ckpt_dir, f"step_{state['step']:07d}.pt")
    if rt.is_main or alone:
        try:
            save_atomic({**state, "rng": [r["rng"] for r in ranks],
                         "rank_model_state": [r["model"] for r in ranks],
                         "world_size": rt.world_size,
                         "threads": torch.get_num_threads()}, path)
            for name in ["last.pt"] + ([also] if also else []):
                link_atomic(path, os.path.join(ckpt_dir, name))
        except (OSError, RuntimeError) as err:   # torch.save reports short writes as RuntimeError
            reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
            reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)  # libtorch's
            raise TrainingError(f"step {state['step']}: cannot write checkpoint {path} "
                                f"({reason}; is the disk full?); the previous checkpoints "
                                f"are intact") from None
        prune_step_checkpoints(ckpt_dir, keep)
        log.info("step %d: saved %s", state["step"], path)
    if not alone:
        barrier()
    return path


def restore_rank_model_state(model, state, rt):
    """This rank's own model state (Autoencoder.rank_state) from a checkpoint written by as
    many ranks; rank 0's, with a warning, from one of another world size."""
    saved = state.get("rank_model_state") or []
    if not any(saved):
        return
    if len(saved) != rt.world_size:
        log.warning("the checkpoint was written by %d processes and this run has %d: every "
                    "process continues from rank 0's own model state (%s)", len(saved),
                    rt.world_size, ", ".join(sorted(saved[0])))
    model.load_rank_state(saved[rt.rank] if len(saved) == rt.world_size else saved[0])


def restore_rng(state, rt):
    """This rank's saved RNG states, when the checkpoint was written by as many ranks. A CPU
    run resumed with another number of threads continues, with a warning: float sums are
    split over threads, so the weights then drift from an uninterrupted run's."""
    threads = state.get("threads")
    if rt.device.type == "cpu" and threads and threads != torch.get_num_threads():
        log.warning("the checkpoint was written with %d CPU threads per process and this run "
                    "has %d: training continues, but not bit-exactly (set OMP_NUM_THREADS=%d "
                    "to resume exactly)", threads, torch.get_num_threads(), threads)
    if len(state["rng"]) == rt.world_size:
        set_rng_state(state["rng"][rt.rank])
    else:
        log.warning("the checkpoint was written by %d processes and this run has %d: the "
                    "processes' random states are not restored; the data order, latent noise "
                    "and flips still continue exactly (they come from the run's own generators)",
                    len(state["rng"]), rt.world_size)


def blocks_of(keys, limit=4):
    """Where keys belong, for messages: each key cut after its first numbered part
    ('temporal.layers.9.attn.to_q.weight' -> 'temporal.layers.9'), distinct, a few named."""
    blocks = []
    for key in keys:
        parts = key.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 2)
        block = ".".join(parts[:cut + 1])
        if block not in blocks:
            blocks.append(block)
    return ", ".join(blocks[:limit]) + (f" and {len(blocks) - limit} more" if len(blocks) > limit
                                        else "")


@torch.no_grad()
def init_from(model, path):
    """Start `model` from checkpoint `path`'s tensors where names and shapes match (its
    "model" entry); the rest keep their initial values. Returns (copied, new, unused) names.
    CheckpointError when nothing matches: then it is not a checkpoint of this kind of model."""
    ckpt = load_checkpoint(path)
    theirs = ckpt.get("model")
    if not isinstance(theirs, dict) or not all(torch.is_tensor(v) for v in theirs.values()):
        raise CheckpointError(f"trainer_params.init_from: {path} has no 'model' tensors: not a "
                              f"checkpoint of this project (convert a LAQ one with "
                              f"convert_laq.py)")
    own = model.state_dict()
    copied = [k for k in own if k in theirs and theirs[k].shape == own[k].shape]
    if not copied:
        raise CheckpointError(f"trainer_params.init_from: no tensor of {path} fits this model "
                              f"by name and shape")
    for key in copied:
        own[key].copy_(theirs[key])
    return copied, [k for k in own if k not in copied], [k for k in theirs if k not in copied]
