"""The comparison's engine: everything that is scored on frame pairs is one kind of object.

A `Scored` thing (an autoencoder of this repository, a latent action model trained here,
LAQ through its runner, a baseline) is given a batch of pairs (pairs.PairBatch) and returns
a `Prediction`: its prediction of the future frame on the scoring target, per-pair numbers of
its own, the latents it inferred and its discrete codes; from all its batches' latents it
reports its rate and latent diagnostics, and it gives the probe its features. `compare` is one
loop over them: adding a model, a metric or a baseline touches one place.
"""
import math
from typing import Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from errors import DataError
from metrics import codebook_diagnostics, latent_summary
from pairs import batch_of, pair_batches
from parallel import progress
from stats import entropy_bits


class Prediction(NamedTuple):
    recon: torch.Tensor                   # (B, 3, S, S) in [0, 1] on the scoring target
    codes: Optional[torch.Tensor] = None  # (B, L) discrete action codes: a column of the CSV
    per_pair: Dict[str, torch.Tensor] = {}   # {column: (B,)} the thing's own numbers
    other: Dict[str, torch.Tensor] = {}   # {column: prediction} with another action
    latents: Dict[str, torch.Tensor] = {}    # {name: per-pair latents on the CPU}


class LatentAction(NamedTuple):
    """A model's latent action of each pair, the label downstream.py's policy learns to predict:
    discrete `codes` (B, L), each one of `classes`, or a continuous `vector` (B, D)."""
    codes: Optional[np.ndarray] = None
    classes: int = 0
    vector: Optional[np.ndarray] = None


class Scored:
    """One scored thing: `name` prefixes its columns and keys, `label` heads its column in the
    table; `view` is the (image size, resize) it is fed, None for a baseline; `patch_grid` the
    side of the patch grid its decoder sees the current frame at (latent action models);
    `decoder` what it shares with its no-action twin (decoder_key), `has_action` whether it
    reads one."""
    name, label, view, is_model, patch_grid, decoder, has_action = \
        "", "", None, True, None, None, False

    def predict(self, batch, generator, controllable) -> Prediction:
        """Its prediction of each pair's future frame; with `controllable` also with other
        actions (the `other` columns: delta PSNR)."""
        raise NotImplementedError

    def rate_latent(self, latents, codes, num_pairs):
        """(rate in bits per pair, latent diagnostics) from every batch's latents and codes."""
        raise NotImplementedError

    def probe_features(self, batch) -> Dict[str, np.ndarray]:
        """{feature set: (B, D)} of frozen features for the action probe."""
        return {}

    def latent_action(self, batch) -> Optional[LatentAction]:
        """Its latent action of each pair (None: it has none)."""
        return None


def kl_bits(model_metrics):
    return {"kl_bits": model_metrics["kl"].double().cpu() / math.log(2)} \
        if "kl" in model_metrics else {}


class AutoencoderScored(Scored):
    """An autoencoder of this repository (VanillaVAE, BetaVAE, VQ-VAE, VAE-GAN): it sees the
    future frame alone and reconstructs it from its own latent."""

    def __init__(self, model, view, name="vae", label="VAE"):
        self.model, self.view, self.name, self.label = model, view, name, label

    def predict(self, batch, generator, controllable):
        x = batch.frames(self.view)[:, 1] * 2 - 1
        recon, model_metrics, latents = self.model.evaluate_batch(x, generator)
        return Prediction(batch.to_target((recon.float() + 1) / 2, self.name),
                          per_pair=kl_bits(model_metrics),
                          latents={k: v.cpu() for k, v in latents.items()})

    def rate_latent(self, latents, codes, num_pairs):
        """Bits per image: KL(q(z|x) || p(z)) / ln 2 (the bits-back rate); a VQ-VAE: its code
        grid's entropy."""
        latent = latent_summary(latents, self.model.num_embeddings)
        if num_pairs < 2 and latent and "active_units" in latent:
            latent["active_units"] = None         # a variance over one image says nothing
            latent["note"] = "active units need more than one image"
        if latent and "kl_total" in latent:
            rate = {"kl_bits_mean": latent["kl_total"] / math.log(2),
                    "active_units": latent["active_units"], "latent_dim": latent["latent_dim"]}
        elif latent and "codebook_size" in latent:
            grid = latent["num_codes"] / num_pairs                       # codes per image
            rate = {"kl_bits_mean": math.log2(latent["perplexity"]) * grid,
                    "bound_bits": grid * math.log2(latent["codebook_size"]),
                    "note": "VQ-VAE: code grid entropy, not a KL"}
        else:
            rate = {"kl_bits_mean": None}
        return rate, latent

    def probe_features(self, batch):
        """Its posterior means of the current and the future frame, both, their difference,
        and the current frame's alone (what appearance gives away)."""
        x = batch.raw[self.view]
        _, _, latents = self.model.evaluate_batch(x.flatten(0, 1).float() / 127.5 - 1)
        if "mu" not in latents:
            raise DataError("--probe needs a VAE with a Gaussian posterior (its mean is the "
                            "feature)")
        mu = latents["mu"].reshape(len(batch), 2, -1).cpu()
        return {"vae_mu_current_future": mu.flatten(1).numpy(),
                "vae_mu_difference": (mu[:, 1] - mu[:, 0]).numpy(),
                "vae_mu_current": mu[:, 0].numpy()}

    def latent_action(self, batch):
        """The difference of its posterior means, future minus current."""
        return LatentAction(vector=self.probe_features(batch)["vae_mu_difference"])


class LaqScored(Scored):
    """LAQ, through laq_loader.LaqRunner: the current frame plus a few discrete action codes
    inferred from the pair predict the future frame."""
    name, label = "laq", "LAQ"

    has_action = True

    def __init__(self, runner, codebook_size, view, patch_grid=None, decoder=None):
        self.runner, self.codebook_size, self.view = runner, codebook_size, view
        self.patch_grid, self.decoder = patch_grid, decoder

    def clip(self, batch):
        return batch.frames(self.view).permute(0, 2, 1, 3, 4)               # (B, 3, 2, S, S)

    def predict(self, batch, generator, controllable):
        clip = self.clip(batch)
        recon, codes, _, _ = self.runner(clip)
        other = {}
        if controllable:
            other["psnr_other_action"] = batch.to_target(
                self.runner(clip, actions_from=torch.roll(torch.arange(len(batch)), 1))[0],
                self.name)
        return Prediction(batch.to_target(recon, self.name), codes=codes.cpu(), other=other)

    def rate_latent(self, latents, codes, num_pairs):
        codes = torch.cat(codes)
        return code_rate(codes, self.codebook_size), \
            codebook_diagnostics(codes, self.codebook_size)

    def probe_features(self, batch):
        """Its action codes (one-hot) and continuous pre-quantisation action vectors, and the
        encoded tokens of the current frame alone: LAQ's temporal attention sees both frames,
        so they come from the identity clip (current, current), which holds no motion."""
        clip = batch.raw[self.view].float().div(255).permute(0, 2, 1, 3, 4)
        _, codes, action, _ = self.runner(clip)
        current = self.runner(clip[:, :, :1].expand_as(clip))[3]
        out = {"laq_codes_onehot": F.one_hot(codes.cpu(), self.codebook_size).flatten(1)
               .float().numpy()}
        if action is not None:
            out["laq_action_continuous"] = action.cpu().numpy()
            out["laq_current_tokens"] = current.cpu().numpy()
        return out

    def latent_action(self, batch):
        """Its action codes."""
        clip = batch.raw[self.view].float().div(255).permute(0, 2, 1, 3, 4)
        return LatentAction(codes=self.runner(clip)[1].cpu().numpy(), classes=self.codebook_size)


class LatentActionScored(Scored):
    """A latent action model trained here (latent_action_model.py), fed the pair as it was
    trained (grey frames for a 1-channel one, its prediction then repeated to 3 channels)."""

    def __init__(self, name, model, view, channels=3):
        self.name = self.label = name
        self.model, self.view, self.channels = model, view, channels
        self.patch_grid, self.decoder = model.grid, decoder_key(model, view)
        self.has_action = model.bottleneck.reads_action

    def predict(self, batch, generator, controllable):
        x = batch.frames(self.view, self.channels) * 2 - 1
        out, model_metrics, latents = self.model.evaluate_batch(x, generator)
        to_target = lambda y: batch.to_target((y.float() + 1) / 2, self.name)  # noqa: E731
        other = {}
        if controllable and self.has_action:
            shifted = torch.roll(torch.arange(len(batch)), 1)     # the previous pair's action
            current = x[:, 0]
            other["psnr_other_action"] = to_target(
                self.model.predict(current, self.model.infer_actions(x[shifted])))
            other["psnr_prior_action"] = to_target(self.model.predict(
                current, self.model.prior_actions(len(x), x.device, generator)))
        latents = {k: v.cpu() for k, v in latents.items()}
        return Prediction(to_target(out), codes=latents.get("codes"),
                          per_pair=kl_bits(model_metrics), other=other, latents=latents)

    def rate_latent(self, latents, codes, num_pairs):
        if "codes" in latents[0]:
            codes = torch.cat([b["codes"] for b in latents])
            return ({**code_rate(codes, self.model.codebook_size),
                     "note": "discrete: code entropy; bound code_seq_len x log2(codebook_size)"},
                    codebook_diagnostics(codes, self.model.codebook_size))
        if "mu" not in latents[0]:
            return ({"kl_bits_mean": 0.0, "bound_bits": 0.0,
                     "note": "no action: the future frame from the current one alone"}, {})
        latent = latent_summary(latents)
        return ({"kl_bits_mean": latent["kl_total"] / math.log(2),
                 "target_rate_bits": self.model.target_rate_bits,
                 "note": "continuous: KL(q(z|pair) || N(0, I)) in bits"}, latent)

    def probe_features(self, batch):
        """Its action latent: the Gaussian's mean; NSVQ's codes one-hot and pre-quantisation
        vectors; none without an action."""
        x = batch.pixels(self.view, self.channels)
        _, _, latents = self.model.evaluate_batch(x.float() / 127.5 - 1)
        if "mu" in latents:
            return {f"{self.name}_action_mu": latents["mu"].cpu().numpy()}
        if "codes" not in latents:                 # no action: nothing to probe
            return {}
        return {f"{self.name}_codes_onehot": F.one_hot(
                    latents["codes"].cpu(), self.model.codebook_size).flatten(1).float().numpy(),
                f"{self.name}_action_continuous": latents["action"].cpu().numpy()}

    def latent_action(self, batch):
        """The Gaussian's mean, or NSVQ's codes; None without an action."""
        x = batch.pixels(self.view, self.channels)
        _, _, latents = self.model.evaluate_batch(x.float() / 127.5 - 1)
        if "mu" in latents:
            return LatentAction(vector=latents["mu"].cpu().numpy())
        if "codes" in latents:
            return LatentAction(codes=latents["codes"].cpu().numpy(),
                                classes=self.model.codebook_size)
        return None


class PairPixels(Scored):
    """A reference for the true-action probe, no model: the pair's own pixels on the scoring
    target, the future frame minus the current one average-pooled to `side` x `side`: what a
    linear probe reads off the frames themselves."""
    is_model = False

    def __init__(self, side=16):
        self.side, self.name = side, f"pixels_difference_{side}x{side}"

    def probe_features(self, batch):                    # on the scoring target
        return {self.name: F.adaptive_avg_pool2d(batch.target - batch.current, self.side)
                .flatten(1).cpu().numpy()}


DECODER_PARTS = ("patch_embed", "position_bias", "dec_spatial", "to_pixels")


def decoder_key(model, view):
    """What a latent action model and its no-action twin share, so that their difference is
    the action's worth: the architecture, the input, and the names and shapes of the tensors
    that carry the current frame to the prediction."""
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()
                   if k.split(".")[0] in DECODER_PARTS)
    return model.architecture, model.channels, tuple(view), shapes


def laq_decoder_key(config, view):
    """decoder_key of a model of this repository that computes LAQ's function at LAQ's sizes
    (built on the meta device: no memory, no weights)."""
    import inspect

    from latent_action_model import LatentActionModel
    known = inspect.signature(LatentActionModel).parameters
    with torch.device("meta"):
        model = LatentActionModel(**{k: v for k, v in config.items() if k in known},
                                  architecture="laq", bottleneck="nsvq")
    return decoder_key(model, view)


class CopyCurrent(Scored):
    """Predicts the future frame as the current one: a model that does not beat it carries no
    action."""
    name, is_model = "copy_current", False

    def predict(self, batch, generator, controllable):
        return Prediction(batch.current)


class CurrentMeanColour(Scored):
    """Predicts the future frame as the current frame's mean colour: what a model knows of the
    target from the current frame's colours alone."""
    name, is_model = "current_mean_colour", False

    def predict(self, batch, generator, controllable):
        return Prediction(batch.current.mean((2, 3), keepdim=True).expand_as(batch.current))


class CurrentPatches(Scored):
    """Predicts the future frame as the current frame averaged over a `grid` x `grid` patch
    grid, a latent action model's: what its decoder could carry over with no action and no
    detail (the patch means; it sees each patch's pixels normalised)."""
    is_model = False

    def __init__(self, grid):
        self.grid, self.name = grid, f"current_patches_{grid}x{grid}"

    def predict(self, batch, generator, controllable):
        size = batch.current.shape[-2:]
        means = F.adaptive_avg_pool2d(batch.current, self.grid)
        return Prediction(F.interpolate(means, size=size, mode="nearest"))


class OracleMeanColour(Scored):
    """Predicts each future frame as its own mean colour: an oracle (it reads the target), a
    floor for how little a prediction may know, not a competitor."""
    name, is_model = "oracle_mean_colour", False

    def predict(self, batch, generator, controllable):
        return Prediction(batch.target.mean((2, 3), keepdim=True).expand_as(batch.target))


def baselines(scored):
    """The baselines every comparison holds: copying the current frame, its mean colour, the
    current frame at each patch resolution a model decodes at, and the oracle mean colour."""
    grids = sorted({s.patch_grid for s in scored if s.patch_grid})
    return [CopyCurrent(), CurrentMeanColour(), *(CurrentPatches(g) for g in grids),
            OracleMeanColour()]


class Agreement:
    """How far a model of this repository that should compute LAQ's function (a converted LAQ
    checkpoint: architecture laq, nsvq) is from LAQ run by LAPA's code, on the same pairs:
    the share of pairs whose whole code sequence is LAQ's, and of single codes, and the
    largest and mean |difference| of the predicted frames on the scoring target."""
    TOLERANCE = 1e-4                         # on [0, 1] pixels; float32 reorderings: ~1e-6

    def __init__(self, model, reference="laq"):
        self.model, self.reference = model, reference
        self.pairs = self.sequences = self.codes = self.total_codes = 0
        self.max_diff, self.sum_diff = 0.0, 0.0

    def add(self, predicted):
        mine, theirs = predicted[self.model], predicted[self.reference]
        diff = (mine.recon.float() - theirs.recon.float()).abs().flatten(1)
        same = mine.codes.cpu() == theirs.codes.cpu()
        self.pairs += len(diff)
        self.sequences += int(same.all(1).sum())
        self.codes, self.total_codes = self.codes + int(same.sum()), self.total_codes + same.numel()
        self.max_diff = max(self.max_diff, float(diff.max()))
        self.sum_diff += float(diff.mean(1).sum())

    def report(self):
        agree = self.sequences == self.pairs and self.max_diff <= self.TOLERANCE
        return {"pairs": self.pairs, "code_sequences_identical": self.sequences / self.pairs,
                "codes_identical": self.codes / self.total_codes,
                "prediction_max_abs_diff": self.max_diff,
                "prediction_mean_abs_diff": self.sum_diff / self.pairs,
                "tolerance": self.TOLERANCE, "agree": agree}


def compare(scored, pairs, metrics, fid, geometry, batch_size, device, picks=(),
            controllability=True, agreements=()):
    """Score every Scored thing on every readable pair; returns the rows (one per pair), each
    thing's latents and codes ({name: [per batch]}), and the picked pairs' pictures.
    Controllability (Genie's delta PSNR): a thing with an action also predicts each future
    frame with the action inferred for the previous pair of the batch, and a latent action model
    with a draw from its prior: the `{name}_psnr_other_action` / `_prior_action` columns.
    Each of `agreements` (Agreement) sees every batch's predictions."""
    rows, examples = [], []
    latents, codes = {s.name: [] for s in scored}, {s.name: [] for s in scored}
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in pair_batches(pairs, geometry, batch_size, device):
        predicted = {s.name: s.predict(batch, generator, controllability and len(batch) > 1)
                     for s in scored}
        for agreement in agreements:
            agreement.add(predicted)
        for name, p in predicted.items():
            latents[name].append(p.latents)
            if p.codes is not None:
                codes[name].append(p.codes)
        scores = {name: metrics(batch.target, p.recon) for name, p in predicted.items()}
        other = {f"{name}_{key}": metrics(batch.target, images, ["psnr"])["psnr"]
                 for name, p in predicted.items() for key, images in p.other.items()}
        models = {s.name: predicted[s.name].recon for s in scored if s.is_model}
        if fid:
            fid.add("target", batch.target)
            for name, images in models.items():
                fid.add(name, images)
        for b, (k, pair) in enumerate(zip(batch.positions, batch.pairs)):
            row = {"current": pair.current, "target": pair.target, "video": pair.video,
                   "current_frame": pair.current_frame, "target_frame": pair.target_frame}
            row.update({f"{name}_codes": " ".join(str(int(c)) for c in p.codes[b])
                        for name, p in predicted.items() if p.codes is not None})
            row.update({f"{name}_{metric}": float(v[b]) for name, s in scores.items()
                        for metric, v in s.items()})
            row.update({f"{name}_{key}": float(v[b]) for name, p in predicted.items()
                        for key, v in p.per_pair.items()})
            row.update({key: float(v[b]) for key, v in other.items()})
            rows.append(row)
            if k in picks:
                examples.append({"current": batch.current[b].cpu(),
                                 "target": batch.target[b].cpu(), "row": row,
                                 "models": {m: images[b].cpu() for m, images in models.items()}})
    return rows, latents, codes, examples


def code_rate(codes, codebook_size):
    """Bits per pair of a code sequence. The rate: the entropy of whole code sequences
    (`code_entropy_joint_bits`, plug-in, and `code_entropy_joint_mm_bits` with the Miller-Madow
    correction for its small-sample bias). Bounds: the sum of each position's entropy
    (`code_entropy_bits`, at least the joint one) and code_seq_len x log2(codebook_size)."""
    per_position = [codebook_diagnostics(codes[:, j], codebook_size) for j in range(codes.shape[1])]
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    joint, joint_mm = entropy_bits(counts.numpy())
    return {"bound_bits": codes.shape[1] * math.log2(codebook_size),
            "code_entropy_bits": sum(math.log2(q["perplexity"]) for q in per_position),
            "code_entropy_joint_bits": joint, "code_entropy_joint_mm_bits": joint_mm,
            "code_seq_len": int(codes.shape[1]), "distinct_code_sequences": len(counts),
            "note": "rate: joint code entropy; code_entropy_bits (sum over positions) and "
                    "bound_bits are upper bounds"}


@torch.no_grad()
def probe_features(scored, pairs, geometry, batch_size, device, cache, split):
    """Every model's frozen features of each pair (Scored.probe_features), computed in chunks
    of batch_size pairs and cached; (features {set: (N, D)}, positions of the pairs kept)."""
    chunks, kept = [], []
    starts = range(0, len(pairs), batch_size)
    for k, start in enumerate(progress(starts, desc=f"probe features ({split})")):
        chunk = cache.get(split, k)
        if chunk is None:
            batch = batch_of(pairs, range(start, min(start + batch_size, len(pairs))),
                             geometry, device)
            if batch is None:
                continue
            chunk = {"kept": np.array(batch.positions)}
            for s in scored:
                chunk.update(s.probe_features(batch))
            cache.put(split, k, chunk)
        chunks.append(chunk)
        kept += chunk["kept"].tolist()
    names = [n for n in chunks[0] if n != "kept"]
    return {n: np.concatenate([c[n] for c in chunks]) for n in names}, kept
