"""The one training loop behind train_single_gpu.py and train_ddp.py.

The scripts only decide the Runtime (rank, world size, device) and tear down; the loop is
here, the optimizer step in trainer.py, the process plumbing in runtime.py. The run is independent of how many processes share it: the global batch is
fixed by the config, and the latent noise and flips are drawn for the whole global batch
from one generator and sliced per rank, so 1 process and N processes see the same samples
with the same noise. Checkpoints carry everything needed to continue bit-exactly.
"""
import glob
import logging
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import checkpoint as ck
from config import ConfigError
from dataset_sthv2 import (DataError, EncodedBatch, PooledCollate, build_datasets,
                           collate_encoded, collate_frames)
from metrics import ImageMetrics
from runtime import PREEMPTED_EXIT_CODE, Preempted, StopSignal, TrainingError, setup_logging
from trainer import Trainer, draw_noise, to_model_input

log = logging.getLogger("vae")
VAL_IMAGE_METRICS = ("psnr", "ssim")
image_metrics = ImageMetrics("cpu", lpips_net="none")   # piq only: no network, any device


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


class BlockBatchSampler:
    """Validation batches: each global batch of consecutive indices is split r::W over ranks,
    so the per-image noise, and so the metric, do not depend on the number of ranks."""

    def __init__(self, indices, global_batch, rank, world_size):
        self.blocks = [indices[s:s + global_batch][rank::world_size]
                       for s in range(0, len(indices), global_batch)]
        self.blocks = [b for b in self.blocks if len(b)]

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


def all_reduce_mean(t, rt):
    if rt.distributed:
        dist.all_reduce(t)
        t /= rt.world_size
    return t


@torch.no_grad()
def validate(model, loader, rt, cfg, limit):
    """Mean of the training objective over the validation split, reduced over ranks, and the
    image quality of model.reconstruct (as evaluate.py reports it)."""
    model.eval()
    gen = torch.Generator(device=rt.device).manual_seed(cfg.exp_params.seed + 1)
    keys, sums, unreadable = None, None, []
    for i, (images, bad) in enumerate(loader):
        if limit and i >= limit:
            break
        unreadable += bad
        noise = draw_noise(model, cfg.data_params.val_batch_size, gen, rt)
        x = to_model_input(images, rt.device)
        out = model(x, None if noise is None else noise[:len(x)])
        losses = model.loss_function(x, out, cfg.exp_params.kld_weight)
        scores = image_metrics((x + 1) / 2, (model.reconstruct(x).float() + 1) / 2,
                               VAL_IMAGE_METRICS)
        values = {**{k: v.double() * len(x) for k, v in losses.items()},
                  **{k: scores[k].sum().to(rt.device) for k in VAL_IMAGE_METRICS}}
        if keys is None:
            keys = sorted(values)
            sums = torch.zeros(len(keys) + 1, device=rt.device, dtype=torch.float64)
        sums += torch.stack([values[k] for k in keys]
                            + [torch.tensor(float(len(x)), device=rt.device, dtype=torch.float64)])
    if rt.distributed:
        dist.all_reduce(sums)
    model.train()
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}, unreadable


@torch.no_grad()
def log_images(model, images, writer, run_dir, step, seed):
    """Fixed validation frames above their reconstructions; samples from fixed noise."""
    model.eval()
    device = next(model.parameters()).device
    x = to_model_input(images, device)
    recon = model.reconstruct(x)
    generated = model.sample(len(x), device, torch.Generator(device=device).manual_seed(seed))
    model.train()
    pairs = make_grid(torch.cat([x, recon]).float().add(1).div(2).clamp(0, 1), nrow=len(x))
    samples = make_grid(generated.float().add(1).div(2).clamp(0, 1), nrow=len(x))
    writer.add_image("images/reconstructions", pairs, step)
    writer.add_image("images/samples", samples, step)
    os.makedirs(os.path.join(run_dir, "images"), exist_ok=True)
    save_image(pairs, os.path.join(run_dir, "images", f"reconstructions_{step:07d}.png"))
    save_image(samples, os.path.join(run_dir, "images", f"samples_{step:07d}.png"))


def train(cfg, rt, resume=None):
    """Train `cfg` on this process's share of the run; returns the final checkpoint path."""
    e, t, lg, d = cfg.exp_params, cfg.trainer_params, cfg.logging_params, cfg.data_params
    run_dir, ckpt_dir = cfg.run_dir, os.path.join(cfg.run_dir, "checkpoints")
    if rt.is_main:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            with open(os.path.join(run_dir, ".write_test"), "w"):
                pass
            os.remove(os.path.join(run_dir, ".write_test"))
            for stale in glob.glob(os.path.join(ckpt_dir, "*.tmp.*")):   # left by a kill
                os.remove(stale)
        except OSError as err:
            raise ConfigError(f"logging_params.save_dir: cannot write to {run_dir} "
                              f"({err.strerror})") from None
    if rt.distributed:
        dist.barrier()
    setup_logging(rt, run_dir)
    stop = StopSignal()

    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # --- resume point ------------------------------------------------------------------
    state = None
    if resume == "auto":
        path, state, rejected = ck.find_resumable(ckpt_dir)
        for msg in rejected:
            log.warning("skipping %s", msg)
        log.info("resuming from %s" % path if path else "no checkpoint to resume: starting fresh")
    elif resume:
        state = ck.load_training_checkpoint(resume)
        log.info("resuming from %s", resume)
    elif ck.step_checkpoints(ckpt_dir) or os.path.exists(os.path.join(ckpt_dir, "last.pt")):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue "
                          f"that run, or choose another logging_params.name")
    if state is not None and state["config"]["model_params"] != cfg.model_params:
        raise ConfigError(f"model_params differ from the checkpoint's "
                          f"({state['config']['model_params']})")
    if rt.is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    # --- data: one process per node indexes, the others read its cache ---------------
    if rt.local_rank != 0 and rt.distributed:
        dist.barrier()
    train_set, val_set = build_datasets(d, cfg.model_params["image_size"])
    if rt.local_rank == 0 and rt.distributed:
        dist.barrier()
    batch = d.train_batch_size // rt.world_size
    steps_per_epoch = len(train_set) // d.train_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"the train split has {len(train_set)} frames, fewer than one "
                            f"global batch (data_params.train_batch_size={d.train_batch_size})")
    max_steps = t.max_epochs * steps_per_epoch            # max_steps (if set) can only shorten it
    max_steps = min(max_steps, t.max_steps) if t.max_steps else max_steps

    # --- model, optimiser, schedule --------------------------------------------------
    trainer = Trainer(cfg, rt, steps_per_epoch)
    bare = trainer.bare
    cuda = rt.device.type == "cuda"
    noise_gen = torch.Generator(device=rt.device).manual_seed(e.seed)
    step, epoch = 0, 0
    if state is not None:
        bare.load_state_dict(state["model"])
        step, epoch = state["step"], state["epoch"]
        trainer.load_state_dict(state)
        try:
            noise_gen.set_state(state["noise_generator"])
        except RuntimeError:      # saved on another device type: continue, not bit-exactly
            log.warning("noise generator state comes from another device type; reseeding")
            noise_gen.manual_seed(e.seed + step)
        if len(state["rng"]) == rt.world_size:
            ck.set_rng_state(state["rng"][rt.rank])

    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, shuffle=True,
                               seed=e.seed, drop_last=True)
    loader_args = dict(num_workers=d.num_workers, pin_memory=d.pin_memory and cuda,
                       collate_fn=collate_frames, persistent_workers=d.num_workers > 0,
                       **({"prefetch_factor": d.prefetch_factor} if d.num_workers else {}))
    train_loader = DataLoader(train_set, batch, sampler=sampler, drop_last=True,
                              generator=torch.Generator(),
                              **{**loader_args, "collate_fn": collate_encoded if d.decode_on_device
                                 else PooledCollate(d.prefetch_factor + 2)})
    val_indices = list(range(len(val_set)))
    if t.limit_val_batches and t.limit_val_batches * d.val_batch_size < len(val_set):
        val_indices = np.linspace(0, len(val_set) - 1, t.limit_val_batches * d.val_batch_size)
        val_indices = [int(i) for i in val_indices.round()]
    val_loader = DataLoader(val_set, batch_sampler=BlockBatchSampler(
        val_indices, d.val_batch_size, rt.rank, rt.world_size), **loader_args)

    writer = None
    if rt.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir, purge_step=step + 1 if step else None)
        writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```", step)
        n = lg.num_image_samples
        fixed_images = collate_frames([val_set[int(i)] for i in
                                       np.linspace(0, len(val_set) - 1, n).round()])[0]

    def save(name=None):
        """Step checkpoint + last.pt (and `name`, e.g. vae_final.pt) from rank 0, then barrier."""
        rngs = [None] * rt.world_size
        if rt.distributed:
            dist.all_gather_object(rngs, ck.rng_state())
        else:
            rngs = [ck.rng_state()]
        path = os.path.join(ckpt_dir, f"step_{step:07d}.pt")
        if rt.is_main:
            try:
                ck.save_atomic({"model": ck.bare_model(bare).state_dict(), "config": cfg.to_dict(),
                                "step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch,
                                **trainer.state_dict(),
                                "noise_generator": noise_gen.get_state(), "rng": rngs,
                                "world_size": rt.world_size}, path)
                ck.link_atomic(path, os.path.join(ckpt_dir, "last.pt"))
                if name:
                    ck.link_atomic(path, os.path.join(ckpt_dir, name))
            except (OSError, RuntimeError) as err:   # torch.save reports short writes as RuntimeError
                reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
                raise TrainingError(f"step {step}: cannot write checkpoint {path} ({reason}; is the "
                                    f"disk full?); the previous checkpoints are intact") from None
            ck.prune_step_checkpoints(ckpt_dir, lg.keep_last_checkpoints)
            log.info("step %d: saved %s", step, path)
        if rt.distributed:
            dist.barrier()
        return path

    # --- the loop --------------------------------------------------------------------
    log.info("training %d steps (%d per epoch) at global batch %d = %d x %d processes on %s%s",
             max_steps, steps_per_epoch, d.train_batch_size, batch, rt.world_size,
             rt.device.type, f" with {t.precision} autocast" if trainer.amp_dtype else " in fp32")
    # per-step numbers stay on the device and are read at log steps only
    sums, seen_bad = {}, set()
    finite_steps, skipped_steps, in_row, worst_in_row = (
        torch.zeros((), dtype=torch.int64, device=rt.device) for _ in range(4))
    count_nonfinite = not trainer.scaler.is_enabled()   # fp16's scaler skips steps by design
    bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True,
               disable=not (rt.is_main and sys.stderr.isatty()))
    tick, tick_step = time.perf_counter(), step
    while step < max_steps:
        sampler.set_epoch(epoch)
        sampler.start = (step - epoch * steps_per_epoch) * batch
        epoch_bad = []
        for images, bad, lease in train_loader:
            if isinstance(images, EncodedBatch):          # decode_on_device
                images, failed = images.decode(rt.device)
                bad += failed
            epoch_bad += bad
            noise = draw_noise(bare, d.train_batch_size, noise_gen, rt)
            flip = (torch.rand(d.train_batch_size, generator=noise_gen, device=rt.device)
                    [rt.rank::rt.world_size] < 0.5) if e.hflip else None
            losses, grad_norm, finite = trainer.step(images, noise, flip)
            if lease:                     # the step has copied the images: the worker may refill
                lease.release()
            step += 1
            bar.update(1)

            for k, v in {**losses, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0) + torch.where(finite, v.detach().float(), 0.0)
            finite_steps += finite
            if count_nonfinite:
                skipped_steps += ~finite
                in_row = (in_row + 1) * ~finite
                worst_in_row = torch.maximum(worst_in_row, in_row)

            if step % t.log_every_n_steps == 0 or step == max_steps:
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                keys = sorted(sums)
                n_finite, n_skipped, worst = (int(v) for v in torch.stack(
                    [finite_steps, skipped_steps, worst_in_row]).tolist())
                stats = {}
                if n_finite:
                    mean = all_reduce_mean(torch.stack([sums[k] for k in keys]), rt) / n_finite
                    stats = dict(zip(keys, mean.tolist()))
                stats["lr"] = trainer.lr
                stats["images_per_sec"] = d.train_batch_size * (step - tick_step) / (now - tick)
                if n_skipped:
                    stats["nonfinite_skipped"] = n_skipped
                    log.warning("steps %d-%d: %d non-finite losses or gradients, their updates "
                                "skipped (%d in a row at most)", tick_step + 1, step, n_skipped,
                                worst)
                if writer:
                    for k, v in stats.items():
                        writer.add_scalar(f"train/{k}", v, step)
                log.info("step %d (epoch %d): %s", step, epoch + 1,
                         " ".join(f"{k} {v:.4g}" for k, v in stats.items()))
                bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4g}")
                if worst >= t.max_nonfinite_steps:
                    path = save()
                    raise TrainingError(
                        f"{worst} non-finite steps in a row by step {step} (last loss "
                        f"{losses['loss'].item()}, grad norm {grad_norm.item()}); state saved to "
                        f"{path}; lower exp_params.LR or check the data")
                sums = {}
                finite_steps.zero_()
                skipped_steps.zero_()
                worst_in_row.copy_(in_row)
                tick, tick_step = time.perf_counter(), step
            if writer and (step % lg.log_images_every_n_steps == 0 or step == max_steps):
                log_images(bare, fixed_images, writer, run_dir, step, e.seed + 2)
            if step % lg.save_every_n_steps == 0 and step < max_steps:
                save()
            if (step % 10 == 0 or not rt.distributed) and stop.agreed(rt):
                save()
                log.info("stopping on %s at step %d; resume with --resume auto",
                         stop.received or "a peer's signal", step)
                raise Preempted(step)
            if step >= max_steps:
                break
        epoch_done = step == (epoch + 1) * steps_per_epoch
        epoch += epoch_done
        if (epoch_done and epoch % t.check_val_every_n_epoch == 0) or step >= max_steps:
            val, val_bad = validate(bare, val_loader, rt, cfg, t.limit_val_batches)
            epoch_bad += val_bad
            if writer:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
            log.info("validation after epoch %d (step %d): %s", epoch, step,
                     " ".join(f"{k} {v:.4g}" for k, v in val.items()))
        report_bad_frames(epoch_bad, seen_bad, writer, rt, step)
    bar.close()
    path = save("vae_final.pt")
    if writer:
        writer.close()
    return os.path.join(ckpt_dir, "vae_final.pt")


def report_bad_frames(bad, seen, writer, rt, step):
    """Count unreadable frames of the epoch over all ranks; name each new one once."""
    if rt.distributed:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, bad)
        bad = [p for part in gathered for p in part]
    if writer:
        writer.add_scalar("data/unreadable_frames", len(bad), step)
    by_path = {message.split(" (", 1)[0]: message for message in bad}
    new = sorted(by_path[p] for p in set(by_path) - seen)
    seen.update(by_path)
    if bad:
        listed = "; ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        log.warning("%d unreadable frames were replaced by readable neighbours this epoch%s",
                    len(bad), f"; first seen now: {listed}" if new else "")


def run(cfg_loader, rt_factory, resume):
    """Load the config, build the runtime and train; every known failure exits with one line.

    Exit codes: 0 done, 1 training failed, 2 bad config / data / checkpoint,
    75 stopped by a signal after writing a checkpoint (requeue and --resume auto).
    """
    try:
        cfg = cfg_loader()
        rt = rt_factory(cfg)
        return train(cfg, rt, resume)
    except (ConfigError, DataError, ck.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
