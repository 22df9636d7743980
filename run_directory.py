"""A run's directory: the lock that keeps a second start out, the stop marker a signal leaves,
and the policy for where a run continues from (--resume PATH|auto, the same model, the same
data). The files inside it are checkpoint.py's.
"""
import contextlib
import errno
import json
import logging
import os

from checkpoint import STEP_FILE, load_training_checkpoint, step_checkpoints
from collectives import barrier
from errors import CheckpointError, ConfigError
from files import atomic_write, remove_stale_temps
from models import completed

log = logging.getLogger("vae")

STOPPED_FILE = "stopped.json"     # run_dir/stopped.json: the run stopped on a signal, saved


class RunLock:
    """An exclusive lock on a run directory, held by rank 0 for the run's whole life.

    A POSIX record lock (fcntl) on run_dir/.lock: the kernel releases it when the process ends
    in any way, kill -9 included, so a crashed run never leaves a stale lock. The file names
    the holder (host, pid, start time) for the message a second start gets."""

    def __init__(self, run_dir):
        import fcntl
        import socket
        import time
        self.path = os.path.join(run_dir, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"{run_dir} is in use by {holder}: wait for that run, or "
                                  f"choose another logging_params.name") from None
            log.warning("cannot lock %s (%s); make sure no other run uses this folder",
                        self.path, err.strerror)
            self.file = None
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self):
        if self.file:
            self.file.close()                 # closing the file drops the lock
            self.file = None


def prepare_run_dir(run_dir, rt):
    """Create run_dir/checkpoints, lock the run directory, check that it is writable, and
    remove temp files a killed run left behind (rank 0; only once it holds the lock, so a
    refused start never touches a running job's files); every rank waits for it. Returns
    rank 0's lock (None on the other ranks): keep it until the run ends."""
    ckpt_dir, lock = os.path.join(run_dir, "checkpoints"), None
    if rt.is_main:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            lock = RunLock(run_dir)
            with open(os.path.join(run_dir, ".write_test"), "w"):
                pass
            os.remove(os.path.join(run_dir, ".write_test"))
            remove_stale_temps(ckpt_dir)          # what a killed writer left, as we hold the lock
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, STOPPED_FILE))
        except OSError as err:
            if lock:
                lock.release()
            raise ConfigError(f"logging_params.save_dir: cannot write to {run_dir} "
                              f"({err.strerror})") from None
    barrier()
    return lock


def stopped_before_restart(run_dir):
    """What stopped.json says when this process is an elastic restart of a run that stopped on
    a signal (torchrun --max-restarts takes exit 75 for a failure and restarts), else None:
    such a restart must stay stopped, not train on."""
    path = os.path.join(run_dir, STOPPED_FILE)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 or \
            not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"step": None, "signal": "a signal"}


def mark_stopped(run_dir, step, reason):
    """run_dir/stopped.json: the run stopped on a signal after saving step `step`.
    run_train.sh reads it to exit with PREEMPTED_EXIT_CODE when torchrun cannot pass the
    ranks' exit code on."""
    with atomic_write(os.path.join(run_dir, STOPPED_FILE), "w") as f:
        json.dump({"step": step, "signal": reason}, f)


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


def resume_point(resume, ckpt_dir, model_params):
    """The checkpoint a run continues from (None: start fresh), from --resume PATH|auto.

    A fresh start into a folder that already holds checkpoints is refused, so a finished or
    running run is never overwritten by mistake; so is a checkpoint of another model."""
    state = None
    if resume == "auto":
        path, state, rejected = find_resumable(ckpt_dir)
        if path is None and rejected:
            raise CheckpointError(f"--resume auto: none of the {len(rejected)} checkpoints in "
                                  f"{ckpt_dir} is usable ({'; '.join(rejected[:2])}); move them "
                                  f"away to start fresh, or pass --resume PATH")
        for msg in rejected:
            log.warning("skipping %s", msg)
        if path is None:
            log.info("no checkpoint to resume: starting fresh")
    elif resume:
        path, state = resume, load_training_checkpoint(resume)
    if state is not None:
        log.info("resuming from %s at step %d (epoch %d)", path, state["step"],
                 state["epoch"] + 1)
    elif step_checkpoints(ckpt_dir) or os.path.exists(os.path.join(ckpt_dir, "last.pt")):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue "
                          f"that run, or choose another logging_params.name")
    if state is not None and completed(state["config"]["model_params"]) != model_params:
        saved = completed(state["config"]["model_params"])
        diff = "; ".join(f"{k}: {saved.get(k, '(unset)')} in the checkpoint, "
                         f"{model_params.get(k, '(unset)')} now"
                         for k in sorted(set(saved) | set(model_params))
                         if saved.get(k) != model_params.get(k))
        raise ConfigError(f"model_params differ from the checkpoint's ({diff})")
    return state


def check_same_data(state, data, allow_change, global_batch=None):
    """Refuse to resume on a train split that changed since the checkpoint (frames added or
    removed change steps per epoch, the schedule and epoch numbering) unless allowed, and on
    another global batch: the position in the epoch is counted in steps of the old one."""
    saved_batch = ((state.get("config") or {}).get("data_params") or {}).get("train_batch_size")
    if global_batch is not None and saved_batch is not None and saved_batch != global_batch:
        raise ConfigError(f"data_params.train_batch_size: the run trained with global batch "
                          f"{saved_batch} and this resume asks for {global_batch}, which would "
                          f"re-feed or skip part of the epoch; resume with {saved_batch}, or "
                          f"start a new run (logging_params.name) from these weights")
    saved = state.get("data")
    if saved is None or saved == data:
        return
    change = (f"{saved['frames']} frames in {saved['videos']} videos then, {data['frames']} in "
              f"{data['videos']} now" if saved["frames"] != data["frames"] or
              saved["videos"] != data["videos"] else "the same counts, other videos or frames")
    if not allow_change:
        raise ConfigError(f"the train split changed since the checkpoint ({change}); pass "
                          f"--allow-data-change to resume on the new data anyway (steps per "
                          f"epoch, the schedule and epoch numbers then follow the new size)")
    log.warning("the train split changed since the checkpoint (%s); resuming on the new data "
                "(--allow-data-change)", change)
