"""Policies learned from recorded episodes (downstream.py): LAPA's pipeline in miniature.

Every policy here is one network: a small convolutional `Trunk` (the current frame, uint8, to
FEATURES features) and a head. Trained three ways, always with the same steps, batch and
optimiser, from a seed:
- latent pretraining (`pretrain`): trunk + a latent head predict a frozen model's latent action
  of every train transition (cross-entropy per code position for codes, mean squared error on
  the standardised vector for a continuous latent); no true action is used;
- fine-tuning (`fit_decoder`): an action decoder (current frame, latent action) -> the env's
  action on K labelled transitions, the pretrained trunk frozen, fed the latent action the
  frozen model gives the labelled transition;
- from true actions (`pretrain` with the action as a one-code latent): the baselines trained on
  the K labelled transitions alone and on every train transition (the ceiling).
A `LearnedPolicy` acts greedily: the latent head's most likely codes (or its predicted vector),
then the decoder's most likely action.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

FEATURES = 128
PATCH = 8
STEPS = 1500                   # latent pretraining and the from-labels baselines: Adam steps
BATCH = 64
LR = 1e-3
DECODER_STEPS = 400            # full-batch steps of the decoder head on the frozen trunk
DECODER_HIDDEN = 128


class Trunk(nn.Module):
    """uint8 (B, 3, S, S) frames -> (B, FEATURES): a patch embedding (PATCH x PATCH patches, as a
    ViT's or LAQ's), a 3x3 convolution over the patch grid and a linear layer; positions
    matter (where the agent is), so the grid is flattened, not pooled."""

    def __init__(self, image_size, channels=3):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(channels, 32, PATCH, PATCH), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.Flatten())
        grid = image_size // PATCH
        self.out = nn.Sequential(nn.Linear(64 * grid * grid, FEATURES), nn.ReLU())

    def forward(self, frames):
        return self.out(self.convs(frames.float() / 255))


class Latents(NamedTuple):
    """Latent labels of N transitions: `codes` (N, L) ints below `classes`, or `vector` (N, D)
    standardised with `mean` and `std` (those of the train transitions)."""
    codes: Optional[np.ndarray] = None
    classes: int = 0
    vector: Optional[np.ndarray] = None
    mean: Optional[np.ndarray] = None
    std: Optional[np.ndarray] = None

    @classmethod
    def of(cls, latent_actions):
        """From compare_engine.LatentAction batches (one model's), vectors standardised."""
        if latent_actions[0].codes is not None:
            return cls(codes=np.concatenate([a.codes for a in latent_actions]).astype(np.int64),
                       classes=latent_actions[0].classes)
        v = np.concatenate([a.vector for a in latent_actions]).astype(np.float32)
        mean, std = v.mean(0), v.std(0) + 1e-6
        return cls(vector=(v - mean) / std, mean=mean, std=std)

    @property
    def width(self):
        """Outputs of the latent head, and width of the decoder's latent input (codes
        one-hot)."""
        return self.codes.shape[1] * self.classes if self.codes is not None \
            else self.vector.shape[1]

    def take(self, rows):
        return self._replace(codes=self.codes[rows] if self.codes is not None else None,
                             vector=self.vector[rows] if self.vector is not None else None)

    def decoder_input(self):
        """The labels as the decoder reads them: codes one-hot, vectors as they are."""
        if self.codes is not None:
            return F.one_hot(torch.from_numpy(self.codes), self.classes).flatten(1).float()
        return torch.from_numpy(self.vector)


def one_code(actions, num_actions):
    """True actions as a one-code latent: what the from-labels baselines learn."""
    return Latents(codes=np.asarray(actions, dtype=np.int64)[:, None], classes=num_actions)


def latent_loss(out, labels):
    if labels.codes is not None:
        codes = torch.from_numpy(labels.codes)
        return F.cross_entropy(out.view(len(codes), codes.shape[1], labels.classes).flatten(0, 1),
                               codes.flatten())
    return F.mse_loss(out, torch.from_numpy(labels.vector))


def predicted_input(out, labels):
    """The latent head's output as the decoder reads a latent: the most likely codes one-hot,
    or the predicted (standardised) vector."""
    if labels.codes is not None:
        codes = out.view(len(out), -1, labels.classes).argmax(-1)
        return F.one_hot(codes, labels.classes).flatten(1).float()
    return out


def pretrain(frames, labels, seed, steps=STEPS, image_size=None):
    """Trunk and latent head (a linear layer) fitted to predict `labels` (Latents) from
    `frames` (uint8 (N, 3, S, S) tensor): `steps` Adam steps on batches of BATCH transitions
    drawn without replacement, epoch by epoch, in an order that follows from `seed`."""
    torch.manual_seed(seed)
    trunk = Trunk(image_size or frames.shape[-1], frames.shape[1])
    head = nn.Linear(FEATURES, labels.width)
    optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=LR)
    rng, order = np.random.default_rng(seed), np.empty(0, dtype=np.int64)
    batch = min(BATCH, len(frames))
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(frames))])
        rows, order = order[:batch], order[batch:]
        loss = latent_loss(head(trunk(frames[torch.from_numpy(rows)])), labels.take(rows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return trunk.eval(), head.eval()


@torch.no_grad()
def features_of(trunk, frames, chunk=512):
    return torch.cat([trunk(frames[i:i + chunk]) for i in range(0, len(frames), chunk)])


def fit_decoder(features, latent_input, actions, num_actions, seed, steps=DECODER_STEPS):
    """The action decoder: [trunk features, latent input] -> action logits, an MLP fitted
    full-batch on the labelled transitions (the trunk's features precomputed: it is frozen)."""
    torch.manual_seed(seed)
    x = torch.cat([features, latent_input], 1)
    decoder = nn.Sequential(nn.Linear(x.shape[1], DECODER_HIDDEN), nn.ReLU(),
                            nn.Linear(DECODER_HIDDEN, num_actions))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=LR)
    y = torch.as_tensor(np.asarray(actions), dtype=torch.int64)
    for _ in range(steps):
        loss = F.cross_entropy(decoder(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval()


class LearnedPolicy:
    """Frames -> actions, greedy. With a `decoder`: the trunk, the latent head's latent
    (`labels` says its kind), then the decoder; without: the head's logits are the actions'
    (the from-labels baselines)."""

    def __init__(self, trunk, head, decoder=None, labels=None):
        self.trunk, self.head, self.decoder, self.labels = trunk, head, decoder, labels

    @torch.no_grad()
    def __call__(self, frames):
        """uint8 (B, 3, S, S) -> (B,) int64 actions."""
        h = self.trunk(frames)
        out = self.head(h)
        if self.decoder is None:
            return out.argmax(1)
        return self.decoder(torch.cat([h, predicted_input(out, self.labels)], 1)).argmax(1)

    def actions(self, frames, chunk=512):
        """Actions for many frames (N, 3, S, S) as a numpy array."""
        return torch.cat([self(frames[i:i + chunk]) for i in range(0, len(frames), chunk)]) \
            .numpy()
