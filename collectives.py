"""Collectives that do nothing in a single process, so that model and training code calls
them unconditionally. Part of the bottom layer: torch.distributed and nothing of this project.

Distributed mode is decided once, by train_ddp.py creating the process group; these are no-ops
without a group of two or more processes.
"""
import torch
import torch.distributed as dist


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
