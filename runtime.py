"""Process plumbing shared by every training entry point: who this process is (Runtime),
collectives that do nothing in a single process, rank-0 logging, stop signals, the command line.

Distributed mode is decided once, by train_ddp.py creating the process group; everything else
calls the collectives below, which are no-ops without a group of two or more processes.
"""
import argparse
import collections
import contextlib
import logging
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from config import ConfigError

log = logging.getLogger("vae")
# Every script: 0 done, 1 the work failed, 2 bad input (arguments, config, data, checkpoint;
# nothing was done, as argparse's own exit), 75 stopped on a signal after saving, 130 aborted.
FAILED_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 75          # EX_TEMPFAIL: the job wrote last.pt and should be requeued


def exit_bad_input(message):
    """One line on stderr, and the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)


class TrainingError(RuntimeError):
    """Training cannot continue (one line that says what happened and where)."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the job can be resumed."""


def distributed():
    """True inside a process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor, op="sum"):
    """Sum (or "max") `tensor` in place over every process; returns it."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor):
    """Mean of `tensor` over every process, in place; returns it."""
    if distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(tensor, src=0):
    """Rank `src`'s tensor on every process, in place; returns it."""
    if distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean_(tensors):
    """Average a list of tensors over every process in one collective (as DDP does for
    gradients); returns the averaged list, the same list in a single process."""
    if not distributed():
        return tensors
    flat = all_reduce_mean(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def barrier():
    if distributed():
        dist.barrier()


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @contextlib.contextmanager
    def local_main_first(self):
        """Run the body on each node's local rank 0 first, then on the other ranks (which
        then find what it wrote, e.g. the frame-index cache)."""
        if self.local_rank != 0:
            barrier()
        yield
        if self.local_rank == 0:
            barrier()


class _Held(logging.Handler):
    """Keeps the records of a run's start until its train.log can be opened."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(rt):
    """Rank 0 logs to stdout (and, once log_to_file is called, to run_dir/train.log); other
    ranks print warnings only. Until then records are held, so that a start that fails on
    its inputs leaves no file behind but the log still begins at the beginning."""
    log.handlers.clear()
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if rt.is_main:
        log.setLevel(logging.INFO)
        for h in (logging.StreamHandler(sys.stdout), _Held()):
            h.setFormatter(formatter)
            log.addHandler(h)
    else:
        log.setLevel(logging.WARNING)
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"[rank {rt.rank}] %(message)s"))
        log.addHandler(h)


def log_to_file(run_dir):
    """Start run_dir/train.log with the records held so far (rank 0)."""
    held = [h for h in log.handlers if isinstance(h, _Held)]
    if not held:
        return
    file = logging.FileHandler(os.path.join(run_dir, "train.log"))
    file.setFormatter(held[0].formatter)
    for record in held[0].records:
        file.handle(record)
    log.removeHandler(held[0])
    log.addHandler(file)


def progress(iterable=None, main=True, **kwargs):
    """A tqdm bar on the main process, shown when stderr is a terminal (tqdm decides:
    disable=None); log lines printed while one runs go above it (`logged_progress`)."""
    return tqdm(iterable, disable=None if main else True, dynamic_ncols=True, **kwargs)


def logged_progress():
    """Route this project's log records through tqdm.write while bars are shown."""
    return logging_redirect_tqdm(loggers=[log])


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: the training process decides when to stop. SLURM, torchrun
    and a terminal signal a whole process group, workers included; a worker that died of the
    signal would take the run down before it could save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignal:
    """Remember SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / SIGINT (Ctrl-C)
    instead of dying: the run finishes its step, saves and exits with PREEMPTED_EXIT_CODE.
    A second SIGINT aborts at once."""

    def __init__(self, device):
        self.device, self.received = device, None
        self._pending = None                  # the previous step's exchange: (flag, wait)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt           # the second Ctrl-C: stop now, without saving
        self.received = signal.Signals(signum).name

    def agreed(self, step):
        """True on every rank once any rank got a signal, at the same step on every rank.

        A single process reads its own flag after every step. Distributed, after every step
        each rank starts an all-reduce (max) of its flag without waiting for it and reads the
        one it started after the step before, which the ranks have long finished: a stop takes
        effect at most two steps after the signal, and the host never waits for the steps it
        has queued since (on a GPU the flag comes back through a pinned copy and an event)."""
        if not distributed():
            return self.received is not None        # no device round trip
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()                       # the stream waits for it, not the host
            host = torch.empty(1, pin_memory=True).copy_(flag, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            pending = (host, copied.synchronize)
        else:
            pending = (flag, work.wait)
        previous, self._pending = self._pending, pending
        if previous is None:
            return False
        value, wait = previous
        wait()
        return bool(value.item())


@contextlib.contextmanager
def process_pool(workers):
    """A pool of `workers` processes, or None (work in this process) for one. Leaving the block
    cancels what has not started (an error, or Ctrl-C, does not wait for the queue)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def ordered_map(pool, fn, arg_tuples, ahead):
    """fn(*args) for each args, results in order, at most `ahead` tasks submitted ahead of the
    consumer, so memory stays bounded however many there are; in this process without a pool."""
    if pool is None:
        for args in arg_tuples:
            yield fn(*args)
        return
    pending = collections.deque()
    for args in arg_tuples:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set exp_params.LR=3e-4")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="checkpoint to continue from; 'auto' = newest valid one of the run")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume even though frames were added or removed since the "
                             "checkpoint (steps per epoch and the schedule follow the new data)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available and trainer_params.gpus != 0")
    return parser.parse_args()


def pick_device(requested, gpus, local_rank=0):
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    use_cuda = requested == "cuda" or (requested is None and gpus != 0
                                       and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
