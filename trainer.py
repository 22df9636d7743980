"""The step engine every model family trains with: model, optimizers, schedules, precision,
noise, and the optimizer step.

Shared by the training loop (training.py) and bench.py. A family declares its optimizer groups
and, per group, the objective and whether to apply the update (autoencoder.Autoencoder:
optimizer_groups, updates; one group on `loss` by default); the engine does the backward pass,
the average over ranks, clipping, skipping and the fp16 scaler for every family. Nothing in a
step reads a device value on the host: skipped updates are decided on the device (step_where),
so the host can queue the next steps while the device works.
"""
import logging
import math
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from autoencoder import Autoencoder
from collectives import all_reduce_mean_, convert_sync_batchnorm, distributed
from models import build_model, count_parameters

log = logging.getLogger("vae")


def to_model_input(images, device, flip=None, channels_last=False):
    """uint8 NCHW (or N x frames x CHW) on any device -> float in [-1, 1] on `device`,
    optionally h-flipped (every frame of an item alike)."""
    x = images.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.float().div_(127.5).sub_(1.0)
    if flip is not None:
        x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    return x


def make_optimizer(opt_cls, params, **kwargs):
    """The fused implementation where this torch has it for these parameters (CUDA; CPU
    from torch 2.4): faster, and it can skip a step on a device-side flag (step_where)."""
    try:
        return opt_cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return opt_cls(params, **kwargs)


def step_where(optimizer, apply):
    """optimizer.step() if the device-side bool `apply` is true, else nothing (no moments, no
    step count), without the host waiting for it.

    Private torch API, on purpose: fused Adam/AdamW read an optional `found_inf` attribute and
    skip the whole update on the device where it is non-zero; GradScaler sets it the same way
    (torch/amp/grad_scaler.py, `_maybe_opt_step`). It is set only around this one call. An
    unfused optimizer (a torch without fused kernels for these parameters) cannot do that, so
    there `apply` is read on the host."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~apply).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif apply:
        optimizer.step()


def make_lr_lambda(warmup_steps, gamma, steps_per_epoch):
    def lr_factor(step):
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * gamma ** (step // steps_per_epoch)
    return lr_factor


class Trainer:
    """Model, optimizers, schedules, the noise generator and the training step."""

    def __init__(self, cfg, rt, steps_per_epoch):
        e, t = cfg.exp_params, cfg.trainer_params
        self.rt, self.seed, self.base_lr, self.weight_decay = rt, e.seed, e.LR, e.weight_decay
        self.steps_per_epoch = steps_per_epoch
        self.kld_weight, self.max_grad_norm, self.hflip = e.kld_weight, e.max_grad_norm, e.hflip
        cuda = rt.device.type == "cuda"
        self.channels_last = cuda and t.channels_last
        torch.manual_seed(e.seed)          # same initial weights whatever the world size
        model = build_model(cfg.model_params)
        torch.manual_seed(e.seed * rt.world_size + rt.rank)
        np.random.seed((e.seed * rt.world_size + rt.rank) % 2 ** 32)
        # latent noise and flips: one stream for the whole global batch, the same on every rank
        self.noise_gen = torch.Generator(device=rt.device).manual_seed(e.seed)
        log.info("%s: %s parameters", cfg.model_params["name"], f"{count_parameters(model):,}")
        if t.sync_batchnorm and distributed():
            model = convert_sync_batchnorm(model, rt.device)
        model.to(rt.device, memory_format=torch.channels_last if self.channels_last
                 else torch.contiguous_format)
        # one optimizer, or one per part for families that declare groups (VAE-GAN)
        self.groups = {name: [p for p in params if p.requires_grad]
                       for name, params in model.optimizer_groups().items()}
        opt_cls = torch.optim.AdamW if e.optimizer == "adamw" else torch.optim.Adam
        self.optimizers = {name: make_optimizer(opt_cls, params, lr=e.LR,
                                                weight_decay=e.weight_decay,
                                                betas=tuple(e.betas), eps=e.eps)
                           for name, params in self.groups.items()}
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(
            opt, make_lr_lambda(e.warmup_steps, e.scheduler_gamma, steps_per_epoch))
            for name, opt in self.optimizers.items()}
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision) \
            if cuda else None
        # several groups take their gradients from several objectives of one forward pass,
        # which DDP's single backward cannot; the engine averages them over ranks itself.
        # config.py refuses fp16 for them: their skipped updates are not the scaler's to decide
        self.grouped = len(self.groups) > 1
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.bare = self.model = model
        # only a family that declares state updates pays for their collective each step
        self.updates_state = type(model).state_updates is not Autoencoder.state_updates
        # what the forward pass itself writes (BatchNorm statistics, EMA codebooks): put back
        # on a skipped step, so a run of non-finite steps cannot leave NaN statistics behind
        self.forward_state = list(model.buffers()) + \
            [p for p in model.parameters() if not p.requires_grad]
        if distributed() and not self.grouped:
            self.model = DDP(model, device_ids=[rt.local_rank] if cuda else None)
        if cuda and t.compile:
            self.model = torch.compile(self.model)
        self.compiled = cuda and t.compile

    @property
    def lr(self):
        return next(iter(self.schedulers.values())).get_last_lr()[0]

    @property
    def steps_done(self):
        """Optimizer steps taken so far, as the schedules count them (restored on resume)."""
        return next(iter(self.schedulers.values())).last_epoch

    def state_dict(self):
        """Model, optimizer, scheduler, scaler and noise-generator states; optimizers and
        schedulers by group ({"model": ...} for the one of most families)."""
        return {"model": self.bare.state_dict(),
                "optimizer": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scheduler": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict(), "noise_generator": self.noise_gen.get_state()}

    def load_state_dict(self, state):
        self.bare.load_state_dict(state["model"])
        optimizers, schedulers = by_group(state["optimizer"]), by_group(state["scheduler"])
        for name in self.optimizers:
            self.optimizers[name].load_state_dict(optimizers[name])
            self.schedulers[name].load_state_dict(schedulers[name])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._apply_config_rates(state.get("step", 0))
        try:
            self.noise_gen.set_state(state["noise_generator"])
        except RuntimeError:      # saved on another device type: continue, not bit-exactly
            log.warning("noise generator state comes from another device type; reseeding")
            self.noise_gen.manual_seed(self.seed + int(state.get("step", 0)))

    def _apply_config_rates(self, step):
        """The config's LR and weight decay win over the checkpoint's: a resumed run with
        `--set exp_params.LR=...` continues at the new rate (times the schedule) from here."""
        for name, scheduler in self.schedulers.items():
            optimizer, old = self.optimizers[name], scheduler.base_lrs[0]
            old_decay = optimizer.param_groups[0]["weight_decay"]
            if old == self.base_lr and old_decay == self.weight_decay:
                continue
            scheduler.base_lrs = [self.base_lr] * len(optimizer.param_groups)
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group in optimizer.param_groups:
                group.update(lr=self.base_lr * factor, initial_lr=self.base_lr,
                             weight_decay=self.weight_decay)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            if name == next(iter(self.schedulers)):
                log.info("resuming at step %d with exp_params.LR %g (checkpoint: %g) and "
                         "weight_decay %g (checkpoint: %g): the config's values apply from here",
                         step, self.base_lr, old, self.weight_decay, old_decay)

    def step(self, images):
        """One optimizer step on this rank's uint8 images; returns (losses, grad norm,
        finite), all tensors on the device: nothing here waits for the device."""
        global_batch = len(images) * self.rt.world_size      # every rank steps on equal shares
        noise = draw_noise(self.bare, global_batch, self.noise_gen, self.rt)
        flip = (torch.rand(global_batch, generator=self.noise_gen, device=self.rt.device)
                [self.rt.rank::self.rt.world_size] < 0.5) if self.hflip else None
        x = to_model_input(images, self.rt.device, flip, self.channels_last)
        self.bare.before_step(self.steps_done)
        before = [t.detach().clone() for t in self.forward_state]
        with torch.autocast(self.rt.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.model(x, noise)
        losses = self.bare.loss_function(x, out, self.kld_weight, self.steps_done)
        updates = self.bare.updates(losses)
        self._gradients(updates)
        norms = []                                # of each group's gradient, before clipping
        for name, optimizer in self.optimizers.items():
            self.scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.clip_grad_norm_(self.groups[name],
                                                        self.max_grad_norm or math.inf))
        grad_norm = norms[0] if len(norms) == 1 else \
            torch.stack(norms).float().square().sum().sqrt()
        # decided on gradients that are the same on every rank (averaged by DDP or by
        # _gradients; a non-finite loss gives a non-finite gradient): all ranks skip alike
        finite = torch.isfinite(grad_norm)
        for name, optimizer in self.optimizers.items():
            apply = updates[name][1]
            if apply is not None:
                losses[f"{name}_skipped"] = (~apply).float()
            if self.scaler.is_enabled():
                self.scaler.step(optimizer)       # the fp16 scaler itself skips non-finite steps
            else:
                step_where(optimizer, finite if apply is None else finite & apply)
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        with torch.no_grad():                     # on the device: no host sync
            for t, old in zip(self.forward_state, before):
                t.copy_(torch.where(finite, t, old))
            if self.updates_state:
                self._apply_state_updates(losses, finite)
        with warnings.catch_warnings():
            # a skipped update (non-finite, or a VAE-GAN rule) still advances the schedule,
            # so the learning rate stays a function of the step; torch warns about that
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in self.schedulers.values():
                scheduler.step()
        return losses, grad_norm, finite

    def _apply_state_updates(self, losses, finite):
        """The state the family declares it updates after a step (state_updates), from the
        rank-averaged losses in one collective, on every rank alike; kept on a skipped step."""
        names = sorted(losses)
        averaged = all_reduce_mean_([losses[k].detach().float().reshape(()) for k in names])
        for name, value in self.bare.state_updates(dict(zip(names, averaged))).items():
            buffer = self.bare.get_buffer(name)
            buffer.copy_(torch.where(finite, value.to(buffer.dtype), buffer))

    def _gradients(self, updates):
        """Each group's gradient of its own objective in .grad, averaged over ranks. One
        group: one backward, which DDP averages. Several: one autograd pass per group over
        the shared graph, then one all-reduce of them all."""
        if not self.grouped:
            (objective, _), = updates.values()
            self.scaler.scale(objective).backward()
            return
        names = list(self.groups)
        grads = []
        for k, name in enumerate(names):
            params = self.groups[name]
            g = torch.autograd.grad(self.scaler.scale(updates[name][0]), params,
                                    retain_graph=k < len(names) - 1, allow_unused=True)
            grads += [t if t is not None else torch.zeros_like(p) for t, p in zip(g, params)]
        params = [p for name in names for p in self.groups[name]]
        for p, t in zip(params, all_reduce_mean_(grads)):
            p.grad = t


def by_group(states):
    """{group: state} from a checkpoint's optimizer or scheduler entry; checkpoints written
    before every family stored them by group hold one optimizer's state as it is."""
    plain = "param_groups" in states or "last_epoch" in states
    return {"model": states} if plain else states


def draw_noise(model, global_batch, generator, rt):
    """This rank's rows of N(0, I) noise drawn for the whole global batch, or None."""
    if not model.noise_dim:
        return None
    noise = torch.randn(global_batch, model.noise_dim, generator=generator, device=rt.device)
    return noise[rt.rank::rt.world_size]
