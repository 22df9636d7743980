"""Long work on the command line: a bounded, ordered map over a process pool, and progress
bars that log lines go above. Standard library and tqdm only.
"""
import collections
import contextlib
import logging
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("vae")


def progress(iterable=None, main=True, **kwargs):
    """A tqdm bar on the main process, shown when stderr is a terminal (tqdm decides:
    disable=None); log lines printed while one runs go above it (`logged_progress`)."""
    return tqdm(iterable, disable=None if main else True, dynamic_ncols=True, **kwargs)


def logged_progress():
    """Route this project's log records through tqdm.write while bars are shown."""
    return logging_redirect_tqdm(loggers=[log])


@contextlib.contextmanager
def process_pool(workers, close_fds=()):
    """A pool of `workers` processes, or None (work in this process) for one. Leaving the block
    cancels what has not started (an error, or Ctrl-C, does not wait for the queue). The
    workers end with this process, kill -9 included (Linux), and close `close_fds` (a lock
    this process holds must not outlive it in an orphaned worker)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, initializer=_worker_start,
                               initargs=(os.getpid(), tuple(close_fds)))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _worker_start(parent, close_fds):
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:         # the parent died before the line above took effect
        os._exit(1)


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
