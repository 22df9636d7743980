"""The action bottlenecks of a latent action model (latent_action_model.py), each a module behind
one interface, so the model holds one and never asks which:

- `nsvq`: LAQ's noise-substitution vector quantiser (Vali & Backstrom 2022): the nearest of
  `codebook_size` codes; in training the residual is replaced by noise of its norm, so the
  codebook learns through the reconstruction loss alone. Unused codes are refilled on LAQ's
  schedule by LAQ's rule (`code_refill`, `refill_threshold`, `refill_scope`).
- `gaussian`: a diagonal Gaussian N(mu, sigma^2) at the same positions and width and a
  reparameterised sample; its KL to N(0, I) in bits is the rate, held at `target_rate_bits`.
- `none`: no action at all (rate 0): the model predicts the future frame from the current
  one alone, the control that says what the action is worth.

A bottleneck turns pre-bottleneck action vectors (B, L, quant_dim) into the latent the decoder
reads (`forward`), adds its loss terms (`loss_terms`), declares the state the engine updates
after a step (`state_updates`), draws from its prior (`prior`), and names its latents.
"""
import inspect
import math
from typing import Dict, Literal, Optional, Tuple

import torch
import torch.nn as nn

from autoencoder import gaussian_kl, perplexity
from collectives import all_reduce, rank, world_size

LAPA_REFILL_NOISE = 1e-12          # NSVQ's eps: a refilled code is a copy of a used one
REFILL_UNTIL = 5000                # LAQ refills below this step only


def refill_steps(step):
    """LAQ's schedule for refilling unused codes: every 10 steps below 100, every 100 below
    1,000, every 500 below 5,000, never after (step 0 excluded)."""
    return step > 0 and ((step < 100 and step % 10 == 0) or (step < 1000 and step % 100 == 0)
                         or (step < REFILL_UNTIL and step % 500 == 0))


def gaussian_kl_bits(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) per pair in bits, summed over positions and dimensions."""
    return gaussian_kl(mu, logvar) / math.log(2)


class Bottleneck(nn.Module):
    reads_action = True
    """False: the model encodes no action for it (`none`)."""

    noisy = False
    """Training draws N(0, I) noise of the action's shape for it (the trainer's noise)."""

    def forward(self, actions: torch.Tensor, noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(latent for the decoder (B, L, quant_dim), {name: per-pair tensors}); with noise
        (training) the noisy latent, without it the deterministic one (code, mean)."""
        raise NotImplementedError

    def loss_terms(self, info) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(what it adds to the loss, what it logs)."""
        return torch.zeros(()), {}

    def state_updates(self, averaged) -> Dict[str, torch.Tensor]:
        """{buffer name (within the bottleneck): new value}, from rank-averaged losses."""
        return {}

    def observe(self, info, step: int) -> None:
        """After a training forward pass of optimizer step `step` (NSVQ counts and refills)."""

    def prior(self, num, length, device, generator=None) -> torch.Tensor:
        """`num` latents (num, length, quant_dim) from the prior."""
        raise NotImplementedError

    def latents(self, info) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """({name: per-pair latents} for diagnostics, {metric: per-pair values})."""
        return {}, {}

    def rank_state(self) -> Dict[str, torch.Tensor]:
        """State this rank holds on its own (saved per rank in checkpoints)."""
        return {}

    def load_rank_state(self, state: Dict[str, torch.Tensor]) -> None:
        pass


class NSVQ(Bottleneck):
    """LAQ's quantiser and its refill of unused codes.

    A code's use is counted as LAPA counts it: the training batches it appears in. On the
    schedule (refill_steps), codes with count / batch < `refill_threshold` (LAPA: 0.1, with the
    batch of pairs per process) are replaced, every count reset. `code_refill: lapa` copies a
    used code as LAPA does (the first used codes in order, or a shuffled repeat of them when
    fewer are used than unused, plus 1e-12 noise: the copies stay duplicates); `separated`
    adds noise of 0.1 x the used codes' spread per dimension. `refill_scope: process` counts
    and refills on each process alone, as LAPA (ranks' codebooks drift apart; each rank's is
    saved); `global` counts a code in the global batch, so every rank and any world size hold
    the same codebook. Counts are not buffers: DDP would overwrite them with rank 0's."""

    noisy = True

    def __init__(self, codebook_size, quant_dim,
                 code_refill: Literal["lapa", "separated"] = "lapa",
                 refill_threshold: float = 0.1,
                 refill_scope: Literal["process", "global"] = "process"):
        super().__init__()
        self.codebook_size, self.quant_dim = codebook_size, quant_dim
        self.code_refill, self.refill_threshold, self.refill_scope = \
            code_refill, refill_threshold, refill_scope
        self.codebook = nn.Parameter(torch.randn(codebook_size, quant_dim))
        self.counts = torch.zeros(codebook_size, dtype=torch.long)
        self.refilled = torch.zeros((), dtype=torch.long)

    def nearest(self, actions):
        """Code of each action vector, by LAQ's squared distance |a|^2 - 2 a.c + |c|^2 (ties
        and duplicate codes resolve as in LAQ: the lowest index)."""
        a, book = actions.float().reshape(-1, self.quant_dim), self.codebook.float()
        distances = a.pow(2).sum(1, keepdim=True) - 2 * a @ book.t() + book.pow(2).sum(1)
        return distances.argmin(dim=1).view(actions.shape[:2])

    def forward(self, actions, noise=None):
        codes = self.nearest(actions)
        hard = self.codebook[codes].to(actions.dtype)
        if noise is None:
            return hard, {"codes": codes, "action": actions}
        noise = noise.view_as(actions).to(actions.dtype)
        residual = (actions - hard).norm(dim=-1, keepdim=True)
        return actions + (residual / noise.norm(dim=-1, keepdim=True) + 1e-12) * noise, \
            {"codes": codes}

    def loss_terms(self, info):
        usage = torch.bincount(info["codes"].reshape(-1), minlength=self.codebook_size)
        return torch.zeros((), device=usage.device), {
            "perplexity": perplexity(usage), "codes_in_batch": (usage > 0).sum().float(),
            "codes_refilled": self.refilled.to(usage.device).float()}

    @torch.no_grad()
    def observe(self, info, step):
        if step >= REFILL_UNTIL:
            return
        codes = info["codes"]
        if self.counts.device != codes.device:
            self.counts, self.refilled = self.counts.to(codes.device), self.refilled.to(codes.device)
        present = (torch.bincount(codes.reshape(-1), minlength=self.codebook_size) > 0).long()
        batch = len(codes)
        if self.refill_scope == "global":
            present, batch = all_reduce(present, op="max"), batch * world_size()
        self.counts += present
        if refill_steps(step):
            self.refill(batch, step)

    @torch.no_grad()
    def refill(self, batch, step):
        """Replace the codes used in fewer than refill_threshold x `batch` batches; reset."""
        use = self.counts.cpu().double() / batch
        unused = torch.nonzero(use < self.refill_threshold).flatten()
        used = torch.nonzero(use >= self.refill_threshold).flatten()
        self.counts.zero_()
        if len(unused) == 0:
            return
        seed = step if self.refill_scope == "global" else step * world_size() + rank()
        gen = torch.Generator().manual_seed(seed)      # the same on resume (and, global, on
        book = self.codebook.detach().cpu().float()    # every rank)
        if len(used) == 0:                             # nothing used: jitter every code
            unused, source, scale = torch.arange(self.codebook_size), book, LAPA_REFILL_NOISE
        else:
            source = book[used]
            if len(used) < len(unused):                # LAPA: a shuffled repeat of the used
                source = source.repeat(int(len(unused) / len(used)) + 1, 1)
                source = source[torch.randperm(len(source), generator=gen)]
            source = source[:len(unused)]
            scale = LAPA_REFILL_NOISE if self.code_refill == "lapa" else 0.1 * (
                book[used].std(0) if len(used) > 1 else book[used].abs().mean().expand(
                    self.quant_dim))
        fresh = source + scale * torch.randn(len(unused), self.quant_dim, generator=gen)
        self.codebook[unused.to(self.codebook.device)] = fresh.to(self.codebook)
        self.refilled += len(unused)

    def prior(self, num, length, device, generator=None):
        codes = torch.randint(self.codebook_size, (num, length), device=device,
                              generator=generator)
        return self.codebook[codes]

    def latents(self, info):
        return {"codes": info["codes"], "action": info["action"].flatten(1).float()}, {}

    def rank_state(self):
        state = {"counts": self.counts.cpu(), "refilled": self.refilled.cpu()}
        if self.refill_scope == "process":
            state["codebook"] = self.codebook.detach().cpu()
        return state

    @torch.no_grad()
    def load_rank_state(self, state):
        device = self.codebook.device
        self.counts, self.refilled = state["counts"].to(device), state["refilled"].to(device)
        if "codebook" in state:
            self.codebook.copy_(state["codebook"])


class Gaussian(Bottleneck):
    """N(mu, sigma^2) with mu the action vector and log sigma^2 a linear head on it; decoded
    from mu in evaluation. The rate, KL(q || N(0, I)) in bits per pair, is held at
    `target_rate_bits` by a capacity term (rate_weight * |KL - C|) or a Lagrange multiplier
    that moves after each step by rate_weight * (KL - C) on the rank-averaged KL."""

    noisy = True

    def __init__(self, quant_dim, target_rate_bits: float = 12.0,
                 rate_control: Literal["capacity", "lagrange"] = "capacity",
                 rate_weight: float = 0.01):
        super().__init__()
        self.target_rate_bits, self.rate_control, self.rate_weight = \
            target_rate_bits, rate_control, rate_weight
        self.to_logvar = nn.Linear(quant_dim, quant_dim)
        self.register_buffer("rate_multiplier", torch.zeros(()))

    def forward(self, actions, noise=None):
        mu, logvar = actions, self.to_logvar(actions)
        z = mu if noise is None else mu + noise.view_as(mu).to(mu.dtype) * torch.exp(0.5 * logvar)
        return z, {"mu": mu, "logvar": logvar}

    def loss_terms(self, info):
        rate = gaussian_kl_bits(info["mu"].float(), info["logvar"].float()).mean()
        if self.rate_control == "capacity":
            penalty = self.rate_weight * (rate - self.target_rate_bits).abs()
        else:               # the multiplier moves after the step (state_updates), never here
            penalty = self.rate_multiplier * (rate - self.target_rate_bits)
        return penalty, {"kld": rate * math.log(2), "rate_bits": rate,
                         "rate_multiplier": self.rate_multiplier.clone()}

    def state_updates(self, averaged):
        if self.rate_control != "lagrange":
            return {}
        gap = averaged["rate_bits"] - self.target_rate_bits
        return {"rate_multiplier": self.rate_multiplier + self.rate_weight * gap}

    def prior(self, num, length, device, generator=None):
        return torch.randn(num, length, self.to_logvar.in_features, device=device,
                           generator=generator)

    def latents(self, info):
        mu, logvar = info["mu"].float(), info["logvar"].float()
        return ({"mu": mu.flatten(1), "logvar": logvar.flatten(1)},
                {"kl": gaussian_kl_bits(mu, logvar) * math.log(2)})


class NoAction(Bottleneck):
    """No action: the decoder's cross-attention sees its learned null keys and values only."""

    reads_action = False

    def __init__(self, quant_dim):
        super().__init__()
        self.quant_dim = quant_dim

    def forward(self, actions, noise=None):
        return actions, {}

    def prior(self, num, length, device, generator=None):
        return torch.zeros(num, 0, self.quant_dim, device=device)


BOTTLENECKS = {"nsvq": NSVQ, "gaussian": Gaussian, "none": NoAction}


def build_bottleneck(kind, **options):
    """The bottleneck `kind`, given the options its constructor takes (the model passes all of
    its bottleneck keys; each bottleneck reads its own)."""
    cls = BOTTLENECKS[kind]
    takes = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in takes})
