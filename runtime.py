"""Process plumbing shared by the training entry points: who this process is (Runtime), joining
the process group, rank-0 logging and train.log, stop signals, the device.
"""

import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


from collectives import barrier, distributed
from errors import ConfigError

log = logging.getLogger("vae")


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: the training process decides when to stop. SLURM, torchrun
    and a terminal signal a whole process group, workers included; a worker that died of the
    signal would take the run down before it could save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopWhileWaiting(Exception):
    """Raised by the stop signal's handler inside StopSignal.waiting()."""


class StopSignal:
    """Remember SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / SIGINT (Ctrl-C)
    instead of dying: the run finishes its step, saves and exits with PREEMPTED_EXIT_CODE.
    A second SIGINT aborts at once."""

    def __init__(self, device):
        self.device, self.received = device, None
        self._pending = None                  # the previous step's exchange: (flag, wait)
        self._saved = False                   # the stop checkpoint is written: signals ignored
        self._waiting = False                 # in an interruptible wait (see waiting())
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._saved:
            return                            # saved and on the way out: nothing to abort
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt           # the second Ctrl-C: stop now, without saving
        self.received = signal.Signals(signum).name
        if self._waiting:
            self._waiting = False
            raise StopWhileWaiting()

    def saved(self):
        """The stop checkpoint is on disk: later signals (a second Ctrl-C, torchrun's repeated
        SIGTERM) no longer interrupt the exit, which would print a traceback or end without
        the stop's exit code."""
        self._saved = True

    @contextlib.contextmanager
    def waiting(self, interruptible=True):
        """A wait between steps for data. A stop signal during it stops the run at the state
        of the last step (StopWhileWaiting), never after another step: at once when
        `interruptible` (a process that reads its own data), else when the wait ends (a batch
        from DataLoader workers arrives through file descriptors their processes hand over;
        breaking off in the middle would break the workers' side). A single process only:
        under DDP the ranks must agree on the step (agreed()), so a distributed run acts on
        the signal after the next step."""
        if distributed():
            yield
            return
        if self.received:
            raise StopWhileWaiting()
        self._waiting = interruptible
        try:
            yield
        finally:
            self._waiting = False
        if self.received:
            raise StopWhileWaiting()

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


def init_process_group(device, rank, world_size):
    """Join the group described by the environment (torchrun, or srun setting RANK etc.).

    Keys go under a prefix per torchrun restart: the elastic agent keeps one store across
    restarts, and without the prefix restarted workers can read the dead workers' addresses
    and fail to connect.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store,
                          timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            store=dist.PrefixStore(f"train_ddp/attempt_{attempt}", store),
                            rank=rank, world_size=world_size,
                            **({"device_id": device} if device.type == "cuda" else {}))


def pick_device(requested, gpus, local_rank=0):
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    use_cuda = requested == "cuda" or (requested is None and gpus != 0
                                       and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
