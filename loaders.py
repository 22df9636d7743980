"""Batching for the device: collation into reused shared-memory buffers, the resumable train
sampler and the rank-independent validation batches, the DataLoaders, and the worker lifecycle
(workers ignore stop signals, are killed at exit, and a stalled one is a one-line DataError).
"""
import atexit
import os
import re
import signal
import threading
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate, get_worker_info

from errors import DataError, TrainingError
from runtime import ignore_stop_signals


class WorkerDied(TrainingError):
    """A DataLoader worker process ended while the run needed it (one line: which, and why);
    `pids`: the dead workers."""
    pids = ()


def worker_died(message, exit_codes=()):
    """The WorkerDied for DataLoader's own error text about a dead worker, else None;
    `exit_codes` of the dead workers name the signal where the text does not."""
    found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: "
                      r"([^.]*)|exited unexpectedly)", message)
    if not found:
        return None
    pids, killed_by = found.group(1).strip(), found.group(3)
    signals = [signal.Signals(-code) for code in exit_codes if code and code < 0]
    if not killed_by and signals:
        killed_by = "Killed" if signal.SIGKILL in signals else signal.strsignal(signals[0])
    if killed_by == "Killed":
        how = ("was killed (SIGKILL), most likely by the kernel's out-of-memory killer: use "
               "fewer data_params.num_workers or a smaller batch, or ask the job for more memory")
    elif killed_by:
        how = (f"died of signal {killed_by!r} (a crash in a decoder, or /dev/shm too small for "
               f"the batches: see docs/faults.md)")
    else:
        how = "exited unexpectedly (killed, or out of memory)"
    died = WorkerDied(f"data loader worker (pid {pids}) {how}")
    died.pids = tuple(int(pid) for pid in pids.split(","))
    return died


def exited_worker(it, wait_s=1.0):
    """WorkerDied for the workers of DataLoader iterator `it` that have exited, waiting up to
    `wait_s` for one (a worker's sockets close just before it can be reaped); else None."""
    workers, deadline = getattr(it, "_workers", ()), time.monotonic() + wait_s
    while not (dead := [w for w in workers if w.exitcode is not None]):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return worker_died(f"DataLoader worker (pid(s) {', '.join(str(w.pid) for w in dead)}) "
                       f"exited unexpectedly", [w.exitcode for w in dead])


# A worker's death is noticed by DataLoader's SIGCHLD handler, which raises at whatever line
# the main process is running: inside a step or a checkpoint write, whose state would then be
# half-made. Here it is noticed the same way but raised only where the run waits for a batch
# of that worker's loader.
_dead = {}                            # pid -> its WorkerDied, not yet raised
_fetching = ()                        # pids of the workers of the loader being waited on


def _on_child_exit(signum, frame):
    global _fetching
    try:
        torch._C._error_if_any_worker_fails()
    except RuntimeError as err:
        died = worker_died(str(err)) or WorkerDied(str(err).strip())
        for pid in died.pids:
            _dead.setdefault(pid, died)
        if set(died.pids) & set(_fetching):
            _fetching = ()
            raise _recorded_death(died.pids)


def _recorded_death(pids):
    """The recorded WorkerDied of one of `pids`, taken off the record; None if none died."""
    died = next((_dead[pid] for pid in pids if pid in _dead), None)
    for pid in died.pids if died else ():
        _dead.pop(pid, None)
    return died


def _watch_workers():
    """Put _on_child_exit in place of DataLoader's SIGCHLD handler (installed with the first
    iterator that has workers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, _on_child_exit)


def _split(batch):
    """The items' images (None where unreadable) and all their unreadable paths."""
    return [img for img, _ in batch], [path for _, paths in batch for path in paths]


def _fill_unreadable(images, bad):
    """Images with each None replaced by a readable image of the same batch, so that every
    rank keeps the same batch size."""
    good = [img for img in images if img is not None]
    if not good:
        raise DataError(f"every frame of a batch failed to decode, e.g. {bad[0]}")
    return [img if img is not None else good[k % len(good)] for k, img in enumerate(images)]


def collate_frames(batch):
    """Stack the images; an item no neighbour could replace is filled with a readable one of
    the same batch so that every rank keeps the same batch size."""
    images, bad = _split(batch)
    # default_collate stacks straight into shared memory inside a DataLoader worker, which
    # saves copying every batch once more on its way to the main process
    return default_collate(_fill_unreadable(images, bad)), bad


class BatchLease:
    """Hands a pooled batch buffer back to the DataLoader worker that filled it."""

    def __init__(self, busy, slot):
        self.busy, self.slot = busy, slot

    def release(self):
        self.busy[self.slot] = 0


class PooledCollate:
    """collate_frames into shared-memory buffers that each DataLoader worker reuses.

    Every fresh shared-memory batch costs its worker a page fault per 4 KiB written (about a
    sixth of the loading time at 256 px). Batches come as (images, bad paths, lease); once
    the consumer is done with the images it calls lease.release() and the worker may fill
    that buffer again. A buffer is never refilled before its release: when none is free,
    or outside a worker, the batch goes into fresh memory and the lease is None, so keeping
    a batch, or never releasing it, only costs speed.
    """

    def __init__(self, slots):
        self.slots = slots
        self._pool = None                     # (pid, busy flags, buffers), made in the worker

    def __call__(self, batch):
        if get_worker_info() is None:
            return (*collate_frames(batch), None)
        images, bad = _split(batch)
        images = _fill_unreadable(images, bad)
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), torch.zeros(self.slots, dtype=torch.uint8).share_memory_(), [])
        _, busy, buffers = self._pool
        shape = (len(images), *images[0].shape)
        free = [k for k, buf in enumerate(buffers) if buf.shape == shape and busy[k].item() == 0]
        if free:
            slot = free[0]
        elif len(buffers) < self.slots:
            buffers.append(torch.empty(shape, dtype=images[0].dtype).share_memory_())
            slot = len(buffers) - 1
        else:
            return default_collate(images), bad, None
        busy[slot] = 1
        torch.stack(images, out=buffers[slot])
        return buffers[slot], bad, BatchLease(busy, slot)


def _reported(loader):
    """Iterate a DataLoader, turning its worker failures into one-line errors (a stalled worker
    a DataError, a dead one WorkerDied)."""
    global _fetching
    it = iter(loader)
    _watch_workers()
    pids = tuple(w.pid for w in getattr(it, "_workers", ()))
    while True:
        died = _recorded_death(pids)
        if died:
            raise died
        _fetching = pids
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ConnectionError, EOFError):   # a batch whose worker died handing it over
            died = exited_worker(it)
            if died:
                raise died from None
            raise
        except RuntimeError as e:
            died = e.__cause__ if isinstance(e.__cause__, WorkerDied) else worker_died(
                str(e), [w.exitcode for w in getattr(it, "_workers", ())])
            if died:
                raise died from None
            if "timed out" in str(e):
                raise DataError(f"a data loader worker gave no batch for {loader.timeout:g} s "
                                f"(a file read that hangs? a FIFO or a network filesystem "
                                f"stall); raise data_params.worker_timeout if the files are "
                                f"just slow") from None
            raise
        except DataError as e:        # raised in a worker: keep the message, not its traceback
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        finally:
            _fetching = ()
        yield batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        """Shuffle for `epoch` and leave out this rank's first `skip` samples of it."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


class BlockBatchSampler:
    """Validation batches: each global batch of consecutive indices is split r::W over ranks,
    so the per-image noise, and so the metric, do not depend on the number of ranks."""

    def __init__(self, indices, global_batch, rank, world_size):
        self.items = len(indices)                 # over all ranks
        starts = range(0, len(indices), global_batch)
        self.blocks = [indices[s:s + global_batch][rank::world_size] for s in starts]
        self.blocks = [b for b in self.blocks if len(b)]
        # batches every rank has (a last block smaller than the world leaves some ranks
        # without it): how often the ranks can exchange anything batch by batch
        self.common = sum(len(indices[s:s + global_batch]) >= world_size for s in starts)

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


def _kill_workers_at_exit():
    """Workers ignore SIGTERM, which is how multiprocessing ends daemonic children at exit:
    kill any still running (e.g. one stuck in a read) so that the process can end."""
    import multiprocessing
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def make_loaders(train_set, val_set, data_params, rt, seed, val_batches=0):
    """(train loader, val loader) of this rank's share of the global batches. The train
    loader's sampler is a ResumableSampler; validation takes `val_batches` evenly spaced global
    batches' worth of frames (0: all)."""
    d = data_params
    atexit.unregister(_kill_workers_at_exit)
    atexit.register(_kill_workers_at_exit)          # runs before multiprocessing's own hook
    common = dict(num_workers=d.num_workers, collate_fn=PooledCollate(d.prefetch_factor + 2),
                  pin_memory=d.pin_memory and rt.device.type == "cuda",
                  persistent_workers=d.num_workers > 0,
                  **({"prefetch_factor": d.prefetch_factor, "worker_init_fn": ignore_stop_signals,
                      "timeout": d.worker_timeout} if d.num_workers else {}))
    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=seed,
                               drop_last=True)
    train = DataLoader(train_set, d.train_batch_size // rt.world_size, sampler=sampler,
                       drop_last=True, generator=torch.Generator(), **common)
    indices = list(range(len(val_set)))
    if val_batches and val_batches * d.val_batch_size < len(val_set):
        indices = [int(i) for i in np.linspace(0, len(val_set) - 1,
                                                val_batches * d.val_batch_size).round()]
    val = DataLoader(val_set, batch_sampler=BlockBatchSampler(
        indices, d.val_batch_size, rt.rank, rt.world_size), **common)
    return train, val


def device_batches(loader, device):
    """(uint8 images on `device`, unreadable paths) for each batch of `loader`. A pooled
    buffer (PooledCollate) goes back to its worker when the next batch is asked for: by then
    the step that read it is done. A worker that gives no batch for data_params.worker_timeout
    seconds (a file read that hangs) is reported as a DataError, not waited for forever."""
    lease = None
    for images, bad, next_lease in _reported(loader):
        if lease:
            lease.release()
        yield images.to(device, non_blocking=True), bad
        lease = next_lease
    if lease:
        lease.release()
