"""Process plumbing shared by every training entry point: who this process is (Runtime),
rank-0 logging, stop signals, and the command line."""
import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import ConfigError

log = logging.getLogger("vae")
PREEMPTED_EXIT_CODE = 75          # EX_TEMPFAIL: the job wrote last.pt and should be requeued


class TrainingError(RuntimeError):
    """Training cannot continue (one line that says what happened and where)."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the job can be resumed."""


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(rt, run_dir=None):
    """Rank 0 logs to stdout and run_dir/train.log; other ranks print warnings only."""
    log.handlers.clear()
    log.propagate = False
    if rt.is_main:
        log.setLevel(logging.INFO)
        handlers = [_TqdmHandler()]
        if run_dir:
            handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
        for h in handlers:
            h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(h)
    else:
        log.setLevel(logging.WARNING)
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"[rank {rt.rank}] %(message)s"))
        log.addHandler(h)


class StopSignal:
    """Remember SIGTERM / SIGUSR1 (SLURM's warning before the time limit) instead of dying."""

    def __init__(self):
        self.received = None
        self._pending = None                  # the previous check's all-reduced flag
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, rt):
        """True on every rank once any rank got a signal (collective when distributed, so
        every rank must call it at the same steps). Distributed, each call answers for the
        previous call's flag, copied to the host behind it, so that the host never waits for
        the steps queued since: a stop comes one check later, the same on every rank."""
        if not rt.distributed:
            return self.received is not None        # no device round trip
        flag = torch.tensor([1.0 if self.received else 0.0], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rt.device.type == "cuda":
            host = torch.empty(1, pin_memory=True).copy_(flag, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = flag, None
        previous, self._pending = self._pending, (host, copied)
        if previous is None:
            return False
        host, copied = previous
        if copied is not None:
            copied.synchronize()              # long done: it was queued a check ago
        return bool(host.item())


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set exp_params.LR=3e-4")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="checkpoint to continue from; 'auto' = newest valid one of the run")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available and trainer_params.gpus != 0")
    return parser.parse_args()


def pick_device(requested, gpus, local_rank=0):
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    use_cuda = requested == "cuda" or (requested is None and gpus != 0
                                       and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
