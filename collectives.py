"""The distributed helpers: collectives that do nothing in a single process (so that model and
training code calls them unconditionally), BatchNorm statistics synchronised over ranks, and
telling a lost peer from other errors. Part of the bottom layer: torch.distributed and
nothing of this project.

Distributed mode is decided once, by train_ddp.py creating the process group; these are no-ops
without a group of two or more processes.
"""
import torch
import torch.distributed as dist
import torch.nn as nn


def distributed():
    """True inside a process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if distributed() else 1


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


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



# What a collective raises when another process of the group has gone: gloo a RuntimeError
# with one of these in its text, NCCL and torch >= 2.2 a DistError (a RuntimeError too).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "Connection refused", "Socket Timeout", "NCCL communicator was aborted")


def peer_lost(err):
    """A few words on what the failed collective reported when `err` says that another process
    of the group ended or stopped answering; None for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    found = next((phrase for phrase in _PEER_GONE if phrase in text), None)
    if found is None and not isinstance(err, getattr(dist, "DistError", ())):
        return None
    backend = "NCCL" if "NCCL" in text else "gloo" if "gloo" in text else "torch.distributed"
    return f"{backend}: {found or (text.splitlines() or [type(err).__name__])[0][:120]}"


class _AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are reduced over every process.

    torch.nn.SyncBatchNorm only runs on GPUs; this version works with any backend
    (gloo on CPU included) through the differentiable all_reduce, so the gradient of the
    global batch statistics reaches every rank exactly as in a single large batch.
    """

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum((0, 2, 3)), xf.pow(2).sum((0, 2, 3)), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.pow(2)).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model, device):
    """Synchronise BatchNorm statistics across ranks: torch's kernel on GPU, ours elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module):
        if type(module) is nn.BatchNorm2d:
            new = _AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum,
                                        module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            return new
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)
