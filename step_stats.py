"""The training loop's numbers: per-step sums kept on the device and read at log steps only
(StepStats), the pace and time left for the log line, what is not finite when a run stops on
non-finite steps, and how long a stop signal can take to act on.
"""
import logging
import time

import torch

from collectives import all_reduce_mean

log = logging.getLogger("vae")


class StepStats:
    """The loop's per-step numbers, summed on the device and read by the host only at log
    steps (flush), so that a step never waits for the device.

    A non-finite step (its update skipped by the trainer) is left out of the sums and counted.
    `streak` is the current run of non-finite steps in a row, kept on the device without a
    branch: a finite step multiplies it by zero, a non-finite one adds one. `worst` is the
    longest run seen in the window; a run still going at a flush carries into the next window.
    """

    def __init__(self, device, global_batch, step, count_skips=True):
        self.device, self.global_batch = device, global_batch
        self.count_skips = count_skips          # fp16's grad scaler skips steps by design
        self.finite, self.skipped, self.streak, self.worst = (
            torch.zeros((), dtype=torch.int64, device=device) for _ in range(4))
        self._new_window(step)

    def _new_window(self, step):
        self.sums, self.first_step, self.tick = {}, step + 1, time.perf_counter()

    def add(self, values, finite):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(finite, v.detach().float(), 0.0)
        self.finite += finite
        if self.count_skips:
            self.skipped += ~finite
            self.streak = (self.streak + 1) * ~finite
            torch.maximum(self.worst, self.streak, out=self.worst)

    def flush(self, step):
        """(stats, longest non-finite run): the window's means over its finite steps averaged
        over ranks, images/s, and the skipped-step count. Starts a new window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.tick
        n_finite, n_skipped, worst = torch.stack([self.finite, self.skipped, self.worst]).tolist()
        stats = {}
        if n_finite:     # the same count on every rank: finiteness is decided on the averaged
            keys = sorted(self.sums)                                  # gradient (trainer.py)
            means = all_reduce_mean(torch.stack([self.sums[k] for k in keys])) / n_finite
            stats = dict(zip(keys, means.tolist()))
        stats["images_per_sec"] = self.global_batch * (step - self.first_step + 1) / seconds
        if n_skipped:
            stats["nonfinite_skipped"] = n_skipped
            log.warning("steps %d-%d: %d non-finite losses or gradients, their updates skipped "
                        "(%d in a row at most)", self.first_step, step, n_skipped, worst)
        self.finite.zero_()
        self.skipped.zero_()
        self.worst.copy_(self.streak)
        self._new_window(step)
        return stats, worst


def pace(window, global_batch, steps_left):
    """", 3.1 steps/s, 0:12:40 left" for the log line, from the window's images/s."""
    per_s = window.get("images_per_sec", 0) / global_batch
    if not per_s > 0:
        return ""
    left = int(round(steps_left / per_s))
    return f", {per_s:.3g} steps/s, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"


def not_finite(losses, grad_norm, model):
    """What is not finite at a stop on non-finite steps, and what to do: the model's own
    tensors (a codebook, a running statistic) mean its state is lost from here; otherwise the
    losses or the gradient."""
    state = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and not torch.isfinite(t).all()]
    if state:
        shown = ", ".join(state[:4]) + (f" and {len(state) - 4} more" if len(state) > 4 else "")
        return (f"the model's own tensors are not finite: {shown}; resume from a checkpoint "
                f"before this and lower exp_params.LR")
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if not torch.isfinite(grad_norm):
        bad.append("the gradient norm")
    return (f"not finite: {', '.join(bad) or 'the gradient norm'}; lower exp_params.LR or "
            f"check the data")


def warn_stop_latency(window, global_batch, world_size, bound):
    """A stop signal acts after the current step alone, after at most two under DDP
    (StopSignal.agreed): say so when that exceeds trainer_params.stop_within_s; True if said."""
    steps = 2 if world_size > 1 else 1
    worst = steps * global_batch / window["images_per_sec"]
    if worst > bound:
        log.warning("a stop signal is acted on within %d step%s, %.3g s at this step time, more "
                    "than trainer_params.stop_within_s = %g s: send the signal earlier (SLURM "
                    "--signal=B:USR1@SECONDS), give the ranks longer to stop (KillWait; "
                    "torchrun waits 30 s), or make steps shorter", steps, "s" * (steps > 1),
                    worst, bound)
    return worst > bound
