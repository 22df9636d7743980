"""LAQ's state-dict layout beside this repository's latent action model (architecture `laq`):
the name of every tensor in each, LAQ's constructor arguments read from a state_dict's shapes,
and the conversions both ways (convert_laq.py), strictly: every tensor placed, or named with
the reason it has none.

LAQ holds a few tensors that never enter its function: the zero `beta` buffer of each gain-only
LayerNorm, the self-attention's key/value slots of length 0 (`null_kv`). They have no place
here; converting from LAQ checks they are what they must be, converting to LAQ writes them.
"""
import re

import torch

from errors import CheckpointError
from latent_action_model import CODE_GRIDS, pooling_plan

# ours -> LAQ's, applied in order to a whole name
RULES = [(r"^patch_embed\.(\d)\.", lambda m: f"to_patch_emb_first_frame.{int(m[1]) + 1}."),
         (r"^position_bias\.mlp\.0\.", "spatial_rel_pos_bias.net.0.0."),
         (r"^position_bias\.mlp\.2\.", "spatial_rel_pos_bias.net.1.0."),
         (r"^position_bias\.mlp\.4\.", "spatial_rel_pos_bias.net.2."),
         (r"^(enc_spatial|enc_temporal|dec_spatial)\.", r"\1_transformer."),
         (r"\.layers\.(\d+)\.peg\.conv\.", r".layers.\1.0.dsconv."),
         (r"\.layers\.(\d+)\.attn\.unused_context_gain$", r".layers.\1.1.context_norm.gamma"),
         (r"\.layers\.(\d+)\.attn\.", r".layers.\1.1."),
         (r"\.layers\.(\d+)\.cross\.", r".layers.\1.2."),
         (r"\.layers\.(\d+)\.ff\.norm\.", r".layers.\1.3.0."),
         (r"\.layers\.(\d+)\.ff\.proj_in\.", r".layers.\1.3.1."),
         (r"\.layers\.(\d+)\.ff\.proj_out\.", r".layers.\1.3.4."),
         (r"\.gain$", ".gamma"),
         (r"^project_in\.", "vq.project_in."), (r"^pool\.", "vq.cnn_encoder."),
         (r"^project_out\.", "vq.project_out."), (r"^bottleneck\.codebook$", "vq.codebooks"),
         (r"^to_pixels\.", "to_pixels_first_frame.0.")]
# what only this repository holds, and why LAQ has no place for it
OURS_ONLY = {"bottleneck.to_logvar": "the Gaussian bottleneck's log-variance head",
             "bottleneck.rate_multiplier": "the Gaussian bottleneck's rate multiplier"}


def laq_name(name):
    for pattern, replacement in RULES:
        name = re.sub(pattern, replacement, name)
    return name


def laq_only(key, value):
    """Why LAQ's `key` has no place here, or None when it has one. ValueError when the tensor
    is not what LAQ's code makes it (a beta that is not zero would change the function)."""
    if key.endswith(".beta"):
        if torch.count_nonzero(value):
            raise ValueError(f"{key} is not zero: LAQ's gain-only LayerNorm keeps a zero bias "
                             f"buffer, so this checkpoint is not of LAQ's code")
        return "the zero bias buffer of a gain-only LayerNorm"
    if key.endswith(".null_kv") and value.numel() == 0:
        return "self-attention's null key/value slots, of length 0"
    return None


def from_laq_state(laq_state, model):
    """This repository's state_dict for `model` (architecture laq) from LAQ's, and a report:
    {"placed": n, "no_place": {key: reason}}. CheckpointError naming what does not fit."""
    if getattr(model, "architecture", None) != "laq":
        raise CheckpointError("LAQ's weights compute LAQ's function only in architecture laq")
    ours = model.state_dict()
    wanted = {laq_name(k): k for k in ours if not k.startswith(tuple(OURS_ONLY))}
    state, no_place, unknown, mismatched = {}, {}, [], []
    for key, value in laq_state.items():
        if key in wanted:
            target = ours[wanted[key]]
            if value.shape != target.shape:
                mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            state[wanted[key]] = value.to(target.dtype)
            continue
        try:
            reason = laq_only(key, value)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if reason:
            no_place[key] = reason
        else:
            unknown.append(key)
    missing = sorted(set(wanted) - set(laq_state))
    if missing or unknown or mismatched:
        raise CheckpointError(
            f"the LAQ checkpoint does not fit the model built from its shapes: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} with no place "
            f"(e.g. {unknown[:3]}), {len(mismatched)} of other shapes (e.g. {mismatched[:2]})")
    for key in ours:                 # this repository's own state, at its initial values
        state.setdefault(key, ours[key])
    return state, {"placed": len(laq_state) - len(no_place), "no_place": no_place}


def to_laq_state(model):
    """LAQ's state_dict from `model` (architecture laq, a bottleneck LAQ has: nsvq), every
    key LAPA's LatentActionQuantization holds, its constant buffers included."""
    if getattr(model, "architecture", None) != "laq" or model.bottleneck_name != "nsvq":
        raise CheckpointError(f"only a model of architecture laq with bottleneck nsvq is a LAQ "
                              f"(this one: architecture {model.architecture}, bottleneck "
                              f"{model.bottleneck_name})")
    ours, state = model.state_dict(), {}
    for key, value in ours.items():
        name = laq_name(key)
        state[name] = value.detach().clone()
        if name.endswith(".gamma"):
            state[name[:-len("gamma")] + "beta"] = torch.zeros_like(value)
        if key.endswith(".attn.to_q.weight"):               # a self-attention
            dim_head = ours[key[:-len("to_q.weight")] + "q_scale"].shape[0]
            slots = name[:-len("to_q.weight")] + "null_kv"
            state[slots] = value.new_zeros(value.shape[0] // dim_head, 0, dim_head)
    return state


def depth(state, stack):
    layers = {int(m[1]) for k in state for m in [re.match(rf"{stack}\.layers\.(\d+)\.", k)] if m}
    return max(layers) + 1 if layers else 0


def config_from_shapes(state):
    """LAQ's constructor arguments that its state_dict's shapes fix (image_size does not:
    the position bias is continuous; code_seq_len follows from it and the conv stack)."""
    try:
        dim, patch_dim = state["to_patch_emb_first_frame.2.weight"].shape
        quant_dim = state["vq.codebooks"].shape[1]
        dim_head = state["enc_spatial_transformer.layers.0.1.q_scale"].shape[0]
        heads = state["spatial_rel_pos_bias.net.2.weight"].shape[0]
        codebook_size = state["vq.codebooks"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a LAQ state_dict: it has no {e.args[0]}") from None
    patch = next((p for p in range(1, 257) for c in (3, 1, 4) if c * p * p == patch_dim), None)
    channels = next((c for c in (3, 1, 4) if patch and c * patch * patch == patch_dim), None)
    if patch is None:
        raise CheckpointError(f"a patch of {patch_dim} values is not channels x patch_size^2")
    return {"dim": int(dim), "quant_dim": int(quant_dim), "codebook_size": int(codebook_size),
            "patch_size": patch, "channels": channels, "dim_head": int(dim_head),
            "heads": int(heads), "spatial_depth": depth(state, "enc_spatial_transformer"),
            "temporal_depth": depth(state, "enc_temporal_transformer")}


def code_seq_len_of(state, grid):
    """code_seq_len of the conv stack in `state` on a `grid` x `grid` patch grid: the one whose
    stack (latent_action_model.pooling_plan, LAQ's own for LAQ's grids) has these kernels."""
    convs = sorted((int(m[1]), k) for k in state
                   for m in [re.match(r"vq\.cnn_encoder\.(\d+)\.weight$", k)] if m)
    kernels = [tuple(state[k].shape[2:]) for _, k in convs]
    square = lambda k: tuple(k) if isinstance(k, tuple) else (k, k)  # noqa: E731
    fits = [n for n, (ah, aw) in CODE_GRIDS.items() if grid >= max(ah, aw)
            and [square(k) for k, _, _ in pooling_plan(grid, n)] == kernels]
    if len(fits) != 1:
        raise CheckpointError(f"the action conv stack (kernels {kernels}) fits "
                              f"{'no' if not fits else 'more than one'} code_seq_len on a "
                              f"{grid}x{grid} patch grid; give code_seq_len and image_size "
                              f"with --laq-config")
    return fits[0]
