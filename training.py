"""The one training loop behind train_single_gpu.py and train_ddp.py.

The scripts only decide the Runtime (rank, world size, device) and tear down. Here: the run
directory, the resume point, data, the Trainer (trainer.py: model, optimizers and the step),
then the loop. The run is independent of how many processes share it: the global batch is
fixed by the config, and the latent noise and flips are drawn for the whole global batch from
one generator and sliced per rank, so 1 process and N processes see the same samples with the
same noise. Checkpoints (checkpoint.py) carry everything needed to continue bit-exactly.
"""
import contextlib
import dataclasses
import logging
import os
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torchvision.utils import make_grid

import checkpoint as ck
import run_directory
from collectives import all_gather_object, all_reduce, peer_lost
from dataset_sthv2 import build_split, data_signature, describe
from errors import CheckpointError, Preempted, ReportedError, TrainingError, run_main
from files import atomic_write
from frame_files import JPEG_DECODER, describe_jpeg_decoder
from frame_index import load_index
from loaders import WorkerDied, collate_frames, device_batches, make_loaders
from manifest import manifest
from metrics import ImageMetrics
from models import image_channels, reconstruction_target
from parallel import logged_progress, progress
from runtime import StopSignal, StopWhileWaiting, log_to_file, setup_logging
from step_stats import StepStats, not_finite, pace, warn_stop_latency
from tracking import Tracker
from trainer import Trainer, draw_noise, to_model_input

log = logging.getLogger("vae")
VAL_IMAGE_METRICS = ("psnr", "ssim")
image_metrics = ImageMetrics("cpu", lpips_net="none")   # piq only: no network, any device


@dataclasses.dataclass
class RunState:
    """Where the run is and what it has said: the one thing the loop changes."""
    step: int = 0
    epoch: int = 0
    saved_at: Optional[int] = None       # the step whose checkpoint is written
    validating: Optional[str] = None     # the validation under way (its title), or pending
    stop_warned: bool = False            # the stop-latency warning is given once
    seen_bad: set = dataclasses.field(default_factory=set)   # unreadable files named so far


@dataclasses.dataclass
class Run:
    """What a run is made of: set up once (set_up), never changed by the loop."""
    cfg: Any
    rt: Any
    trainer: Trainer
    stop: StopSignal
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    max_steps: int
    data: dict                      # the train split's signature, in every checkpoint
    manifest: dict                  # what produced the run, in every checkpoint
    stats: StepStats
    bar: Any
    tracker: Optional[Tracker] = None              # rank 0's
    fixed_images: Optional[torch.Tensor] = None    # rank 0's
    lock: Any = None                               # rank 0's lock on the run directory

    def save(self, state, also=None, pending_validation=None, alone=False):
        """Checkpoint the run at state.step (collective unless `alone`; see
        checkpoint.save_step_checkpoint). Returns the step file's path."""
        saved = {"config": self.cfg.to_dict(), "step": state.step, "epoch": state.epoch,
                 "data": self.data, "steps_per_epoch": self.steps_per_epoch,
                 "manifest": self.manifest, "pending_validation": pending_validation,
                 **self.trainer.state_dict()}
        return ck.save_step_checkpoint(os.path.join(self.cfg.run_dir, "checkpoints"), saved,
                                       self.rt, self.cfg.logging_params.keep_last_checkpoints,
                                       also, alone, self.trainer.bare.rank_state())


def train(cfg, rt, resume=None, allow_data_change=False):
    """Train `cfg` on this process's share of the run; returns the final checkpoint's path."""
    final = os.path.join(cfg.run_dir, "checkpoints", "vae_final.pt")
    run, state = set_up(cfg, rt, resume, allow_data_change)
    if run is None:                                  # the run had finished
        return final
    try:
        try:
            if state.validating:                     # the checkpoint's pending validation
                report_bad_frames(validate_and_log(run, state, state.validating),
                                  state.seen_bad, run.tracker, state.step)
            while state.step < run.max_steps:
                train_one_epoch(run, state)
        except StopWhileWaiting:       # a single process waiting for data: the last step's state
            stop_now(run, state, saved=state.saved_at == state.step,
                     pending_validation=state.validating)
        except WorkerDied as err:       # save what the steps since the last checkpoint made
            path = run.save(state, pending_validation=state.validating, alone=True)
            raise TrainingError(f"{err}; the state at step {state.step} is saved in {path} "
                                f"(resume with --resume auto)") from None
        run.bar.close()
        run.save(state, also="vae_final.pt")
        if run.tracker:
            run.tracker.close(state.step)
    finally:
        if run.lock:
            run.lock.release()
    return final


def set_up(cfg, rt, resume, allow_data_change):
    """The run's parts and the state it continues from; (None, None) when it had finished.
    The checkpoint and the data are checked before anything is written."""
    tp, dp = cfg.trainer_params, cfg.data_params
    setup_logging(rt)
    if tp.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    saved = run_directory.resume_point(resume, ckpt_dir, cfg.model_params)
    with rt.local_main_first():          # one process per node indexes, the others read it
        index = load_index(dp.data_path, dp.index_cache_dir) if dp.dataset == "sthv2" else None
        train_set, val_set = (build_split(dp, split, cfg.model_params["image_size"], index,
                                          pair_offset=dp.frame_offset, clamp_pairs=True,
                                          channels=image_channels(cfg.model_params))
                              for split in ("train", "val"))
    log.info("data: %s (frame_stride %d)", describe(train_set, val_set), dp.frame_stride)
    # what produced the run (commit, versions, data hashes): in config.yaml and every checkpoint
    run_manifest = manifest(labels_dir=(dp.labels_path or dp.data_path) if index else None,
                            index=index)
    (log.warning if JPEG_DECODER == "pil" else log.info)(describe_jpeg_decoder())
    steps_per_epoch = len(train_set) // dp.train_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"the train split has {len(train_set)} frames, fewer than one "
                            f"global batch (data_params.train_batch_size={dp.train_batch_size})")
    max_steps = tp.max_epochs * steps_per_epoch          # max_steps (if set) can only shorten it
    max_steps = min(max_steps, tp.max_steps) if tp.max_steps else max_steps
    final = os.path.join(ckpt_dir, "vae_final.pt")
    if saved is not None and saved["step"] >= max_steps and os.path.isfile(final):
        log.info("the run finished at step %d (%s): nothing to do", saved["step"], final)
        return None, None

    # the run directory: locked, then the config and the log
    stopped = run_directory.stopped_before_restart(cfg.run_dir)
    if stopped:
        log.info("the run stopped on %s at step %s before this restart: it stays stopped "
                 "(resume with --resume auto)", stopped.get("signal"), stopped.get("step"))
        raise Preempted()
    lock = run_directory.prepare_run_dir(cfg.run_dir, rt)
    if rt.is_main:
        log_to_file(cfg.run_dir)
        with atomic_write(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump({**cfg.to_dict(), "manifest": run_manifest}, f, sort_keys=False)
    train_loader, val_loader = make_loaders(train_set, val_set, dp, rt, cfg.exp_params.seed,
                                            tp.limit_val_batches)

    # the model, its optimizers and schedule, and the state to continue from
    trainer = Trainer(cfg, rt, steps_per_epoch)
    data, state = data_signature(train_set), RunState()
    if saved is not None:
        restore(trainer, saved, state, data, allow_data_change, dp.train_batch_size,
                steps_per_epoch, rt)
    elif tp.init_from:
        start_from(trainer.bare, tp.init_from)
    tracker = fixed_images = None
    if rt.is_main:
        tracker = Tracker(cfg, state.step)
        picks = np.linspace(0, len(val_set) - 1, cfg.logging_params.num_image_samples).round()
        fixed_images = collate_frames([val_set[int(i)] for i in picks])[0]
    log.info("training %d steps (%d per epoch) at global batch %d = %d x %d processes on %s%s",
             max_steps, steps_per_epoch, dp.train_batch_size, train_loader.batch_size,
             rt.world_size, rt.device.type,
             f" with {tp.precision} autocast" if trainer.amp_dtype else " in fp32")
    stats = StepStats(rt.device, dp.train_batch_size, state.step,
                      not trainer.scaler.is_enabled())
    bar = progress(total=max_steps, initial=state.step, main=rt.is_main, desc="training",
                   unit="step")
    return Run(cfg, rt, trainer, StopSignal(rt.device), train_loader, val_loader,
               steps_per_epoch, max_steps, data, run_manifest, stats, bar, tracker,
               fixed_images, lock), state


def restore(trainer, saved, state, data, allow_data_change, global_batch, steps_per_epoch, rt):
    """Continue from checkpoint `saved`: the trainer's weights, optimizers and schedule, the
    step and epoch (into `state`), the RNG states."""
    run_directory.check_same_data(saved, data, allow_data_change, global_batch)
    try:
        trainer.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's model or optimizer state does not fit this "
                              f"model ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    state.step, state.epoch = saved["step"], saved["epoch"]
    state.validating = saved.get("pending_validation")
    if saved.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        # the split changed (--allow-data-change): continue at this step's place in an epoch
        # of the new length, never past an epoch's end (which would never come)
        state.epoch = state.step // steps_per_epoch
        log.info("%d steps per epoch now (%d in the checkpoint): step %d is in epoch %d",
                 steps_per_epoch, saved["steps_per_epoch"], state.step, state.epoch + 1)
    ck.restore_rank_model_state(trainer.bare, saved, rt)
    ck.restore_rng(saved, rt)


def start_from(model, path):
    """trainer_params.init_from: a fresh run's weights from another checkpoint, where names and
    shapes match (every rank reads the same file, so they start alike)."""
    copied, new, unused = ck.init_from(model, path)
    log.info("init_from %s: %d tensors copied, %d new%s%s", path, len(copied), len(new),
             f" ({ck.blocks_of(new)})" if new else "",
             f"; {len(unused)} of its tensors unused ({ck.blocks_of(unused)})" if unused else "")
    return copied, new, unused


def train_one_epoch(run, state):
    """The rest of the epoch from state.step, then its validation when due."""
    tp, lp = run.cfg.trainer_params, run.cfg.logging_params
    check_stop(run, state)                  # also before the epoch's first batch is waited for
    batch = run.train_loader.batch_size
    run.train_loader.sampler.set_epoch(
        state.epoch, skip=(state.step - state.epoch * run.steps_per_epoch) * batch)
    epoch_bad, first = [], state.step
    for images, bad in interruptible_batches(run.train_loader, run.rt.device, run.stop):
        losses, grad_norm, finite = run.trainer.step(images)
        run.stats.add({**losses, "grad_norm": grad_norm}, finite)
        epoch_bad += bad
        state.step += 1
        run.bar.update(1)
        if state.step % tp.log_every_n_steps == 0 or state.step == run.max_steps:
            log_training(run, state, losses, grad_norm)
        if run.tracker and (state.step % lp.log_images_every_n_steps == 0
                            or state.step == run.max_steps):
            log_images(run.trainer.bare, run.fixed_images, run.tracker, run.cfg.run_dir,
                       state.step, run.cfg.exp_params.seed + 2)
        if state.step % lp.save_every_n_steps == 0 and state.step < run.max_steps:
            run.save(state)
            state.saved_at = state.step
        check_stop(run, state)
        if state.step >= run.max_steps:
            break
    epoch_done = state.step == (state.epoch + 1) * run.steps_per_epoch  # also resumed at its end
    if state.step == first and not epoch_done:   # never spin on an epoch that gives no batch
        raise TrainingError(f"epoch {state.epoch + 1} gave no batch at step {state.step} (the "
                            f"resume position is past the end of the epoch's data)")
    if epoch_done:
        state.epoch += 1
    if (epoch_done and state.epoch % tp.check_val_every_n_epoch == 0) \
            or state.step >= run.max_steps:
        epoch_bad += validate_and_log(run, state, f"end of epoch {state.epoch}" if epoch_done
                                      else f"in epoch {state.epoch + 1}")
    report_bad_frames(epoch_bad, state.seen_bad, run.tracker, state.step)


def log_training(run, state, losses, grad_norm):
    """The training log line (the window's means, pace and time left) and its scalars; stops
    the run on too many non-finite steps in a row."""
    dp, tp = run.cfg.data_params, run.cfg.trainer_params
    window, worst = run.stats.flush(state.step)
    state.stop_warned = state.stop_warned or warn_stop_latency(
        window, dp.train_batch_size, run.rt.world_size, tp.stop_within_s)
    log_scalars(run.tracker, "train", {**window, "lr": run.trainer.lr}, state.step,
                f"step {state.step}/{run.max_steps} (epoch {state.epoch + 1}"
                f"{pace(window, dp.train_batch_size, run.max_steps - state.step)})")
    run.bar.set_postfix(loss=f"{window.get('loss', float('nan')):.4g}")
    if worst >= tp.max_nonfinite_steps:
        path = run.save(state)
        raise TrainingError(f"{worst} non-finite steps in a row by step {state.step} "
                            f"({not_finite(losses, grad_norm, run.trainer.bare)}); "
                            f"state saved to {path}")


def validate_and_log(run, state, title):
    """Validate and log; returns the unreadable files met. A stop signal during validation
    stops within a batch or two, and the validation runs after the resume (the checkpoint
    says it is pending)."""
    state.validating = title
    val, unreadable = validate(run.trainer.bare, run.val_loader, run.rt, run.cfg, run.stop,
                               state.step)
    if val is None:
        stop_now(run, state, pending_validation=title)
    state.validating = None
    log_scalars(run.tracker, "val", val, state.step, f"validation at step {state.step} ({title})")
    return unreadable


def check_stop(run, state):
    """Stop here when the ranks agree on a stop signal (not saving twice at a save's step)."""
    if run.stop.agreed(state.step):
        stop_now(run, state, saved=state.saved_at == state.step)


def stop_now(run, state, saved=False, pending_validation=None):
    """Save (unless this step's checkpoint is written), leave stopped.json, exit 75."""
    if not saved:
        run.save(state, pending_validation=pending_validation)
    run.stop.saved()
    reason = run.stop.received or "a peer's signal"
    if run.rt.is_main:
        run_directory.mark_stopped(run.cfg.run_dir, state.step, reason)
    log.info("stopping on %s at step %d; resume with --resume auto%s", reason, state.step,
             " (the validation under way runs again then)" if pending_validation else "")
    raise Preempted()


def interruptible_batches(loader, device, stop=None):
    """device_batches(loader, device), where a stop signal during a wait for a batch stops the
    run before the next step (StopSignal.waiting): at once without workers, when the batch
    arrives with them."""
    batches = device_batches(loader, device)
    while True:
        with stop.waiting(loader.num_workers == 0) if stop else contextlib.nullcontext():
            item = next(batches, None)
        if item is None:
            return
        yield item


def log_scalars(tracker, prefix, values, step, title):
    """One log line, and `prefix/name` scalars in TensorBoard / W&B (rank 0 has the tracker)."""
    if tracker:
        tracker.scalars({f"{prefix}/{k}": v for k, v in values.items()}, step)
    log.info("%s: %s", title, " ".join(f"{k} {v:.4g}" for k, v in values.items()))


@torch.no_grad()
def validate(model, loader, rt, cfg, stop=None, step=0):
    """Mean of the training objective over the validation split, reduced over ranks, and the
    image quality of model.reconstruct (as evaluate.py reports it); (None, unreadable) when
    the ranks agree on a stop signal (`stop`) part way."""
    model.eval()
    gen = torch.Generator(device=rt.device).manual_seed(cfg.exp_params.seed + 1)
    keys, sums, unreadable = None, None, []
    log.info("validating on %d %s", loader.batch_sampler.items,
             "pairs" if getattr(loader.dataset, "offset", None) else "frames")
    bar = progress(total=len(loader), main=rt.is_main, desc="validation", unit="batch",
                   leave=False)
    for batch, (images, bad) in enumerate(interruptible_batches(loader, rt.device, stop)):
        bar.update(1)
        unreadable += bad
        noise = draw_noise(model, cfg.data_params.val_batch_size, gen, rt)
        x = to_model_input(images, rt.device)
        out = model(x, None if noise is None else noise[:len(x)])
        losses = model.loss_function(x, out, cfg.exp_params.kld_weight)
        scores = image_metrics((reconstruction_target(model, x) + 1) / 2,
                               (model.reconstruct(x).float() + 1) / 2, VAL_IMAGE_METRICS)
        values = {**{k: v.double() * len(x) for k, v in losses.items()},
                  **{k: scores[k].sum().to(rt.device) for k in VAL_IMAGE_METRICS}}
        if keys is None:
            keys = sorted(values)
            sums = torch.zeros(len(keys) + 1, device=rt.device, dtype=torch.float64)
        sums += torch.stack([values[k] for k in keys]                    # last: image count
                            + [torch.tensor(float(len(x)), device=rt.device, dtype=torch.float64)])
        if stop is not None and batch < loader.batch_sampler.common and stop.agreed(step):
            bar.close()
            model.train()
            return None, unreadable
    bar.close()
    all_reduce(sums)
    model.train()
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}, unreadable


@torch.no_grad()
def log_images(model, images, tracker, run_dir, step, seed):
    """Fixed validation frames above their reconstructions; samples from fixed noise. Frame
    pairs (latent action models): current, future and predicted frames, and below them the
    current frames decoded with the action of the previous pair."""
    model.eval()
    device = next(model.parameters()).device
    x = to_model_input(images, device)
    recon = model.reconstruct(x)
    if model.takes_pairs:
        rows = [x[:, 0], x[:, 1], recon]
        generated = torch.cat([x[:, 0], model.predict(x[:, 0], model.infer_actions(x.roll(1, 0)))])
    else:
        rows = [x, recon]
        generated = model.sample(len(x), device, torch.Generator(device=device).manual_seed(seed))
    model.train()
    grid = lambda t: make_grid(t.float().add(1).div(2).clamp(0, 1), nrow=len(x))  # noqa: E731
    pairs, samples = grid(torch.cat(rows)), grid(generated)
    tracker.images({"images/reconstructions": pairs, "images/samples": samples}, step)
    tracker.png(pairs, os.path.join(run_dir, "images", f"reconstructions_{step:07d}.png"), step)
    tracker.png(samples, os.path.join(run_dir, "images", f"samples_{step:07d}.png"), step)


def report_bad_frames(bad, seen, tracker, step):
    """Count the distinct unreadable files of the epoch over all ranks; name each new one once."""
    by_path = {message.split(" (", 1)[0]: message
               for part in all_gather_object(bad) for message in part}
    if tracker:
        tracker.scalars({"data/unreadable_frames": len(by_path)}, step)
    new = sorted(by_path[p] for p in set(by_path) - seen)
    seen.update(by_path)
    if by_path:
        listed = "; ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        log.warning("%d unreadable files this epoch, each replaced by a readable neighbour in "
                    "its video or, where none was readable, by another frame of its batch%s",
                    len(by_path), f"; first seen now: {listed}" if new else "")


def run(cfg_loader, rt_factory, resume, allow_data_change=False):
    """Load the config, build the runtime and train; every known failure exits with one line.

    Exit codes: 0 done, 1 training failed, 2 bad config / data / checkpoint,
    75 stopped by a signal after writing a checkpoint (requeue and --resume auto).
    """
    def main():
        cfg = cfg_loader()
        rt = rt_factory(cfg)
        try:
            with logged_progress():
                return train(cfg, rt, resume, allow_data_change)
        except RuntimeError as err:
            reason = None if isinstance(err, ReportedError) else peer_lost(err)
            if reason is None:
                raise
            # the process that ended first says why (its own line, torchrun's summary)
            raise TrainingError(
                f"rank {rt.rank}: another process of the run ended or stopped answering "
                f"({reason}); its own error above, or torchrun's summary, says why; the "
                f"checkpoints in {os.path.join(cfg.run_dir, 'checkpoints')} are intact "
                f"(resume with --resume auto)") from None
    # a second Ctrl-C (the first one asks to save) ends the run at once
    return run_main(main, interrupted="interrupted twice; stopped without saving (resume from "
                                      "the last checkpoint with --resume auto)")
