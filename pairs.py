"""The comparison's frame pairs and how each model sees them.

Which pairs: from the split a run defined (the VAE's, else the first latent action model's;
its label files and val_fraction: dataset_sthv2.build_split), drawn as LAQ's loader draws its
training pairs or uniformly over every (t, t + offset) pair, less the videos LAQ trained on. How each model sees them
(Geometry): every model is fed frames prepared the way it was trained (its size and resize
mode), and all are scored on one target: the shared mode, or the centre square of the future
frame when the modes differ, each stretch model's output mapped back onto it.
"""
import json
import os
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from config import data_params_of
from dataset_sthv2 import build_split
from errors import DataError
from frame_files import DECODE_ERRORS, decode_rgb, luminance, read_file, resize_frame
from labels import LABEL_FILES

FIGURE_ROWS = 8
PAIRS_NOTE = {
    "laq": "LAQ's sampling: one pair per video, the first frame uniform over the video, the "
           "second at min(first + offset, last frame) (pairs near a video's end are closer)",
    "exact": "every pair (t, t + offset) inside a video equally likely (videos of at most "
             "offset frames give none; a video weighs by its length)"}
OVERLAP_NOTE = ("LAQ's trainer reads every video folder under its data folder: unless LAQ was "
                "trained on a train-only folder, these {split} videos were in its training data "
                "(--laq-train-videos FILE excludes the videos it trained on)")


class Pair(NamedTuple):
    current: str                      # file names, for reports
    target: str
    video: str                        # video id ("" for --image / --frames)
    current_frame: int                # frame numbers in the video (-1 for --image / --frames)
    target_frame: int
    read: Callable                    # () -> [encoded current, encoded target]


# --- which pairs ----------------------------------------------------------------------------

def read_video_ids(path):
    """Video ids from a text file (one per line) or a SthV2 label JSON (entries with 'id')."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"cannot read --laq-train-videos {path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            return {str(entry["id"]) for entry in json.loads(text)}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--laq-train-videos {path}: not a SthV2 label file ({e})") from None
    return {line.strip() for line in text.splitlines() if line.strip()}


def split_pairs(args, run_config, split, exclude=(), clamp=None):
    """The pairs of the split a run's data settings define (the VAE's, else the first
    --model's, or --split-config), less the videos in `exclude`:
    with --pairs exact every (t, t + offset) pair inside a video, with --pairs laq every t with
    the second frame at min(t + offset, last) as LAQ trains (`clamp` overrides --pairs);
    returns (dataset, kept pair positions, dropped pairs, dropped videos)."""
    d = data_params_of(run_config, data_path=args.data_path,
                       index_cache_dir=args.index_cache_dir or None)
    if d.dataset != "sthv2":
        raise DataError(f"the split comes from a run on {d.dataset} data (data_params.dataset); "
                        f"frame pairs need SthV2 videos")
    pairs = build_split(d, split, image_size=None, pair_offset=args.offset,
                        clamp_pairs=args.pairs == "laq" if clamp is None else clamp)
    excluded = np.array([vid in exclude for vid in pairs.index.videos] + [False], dtype=bool)
    keep = ~excluded[pairs.video]                   # per pair, from one flag per video
    dropped_videos = len(np.unique(pairs.video[~keep]))
    if not keep.any():
        raise DataError(f"no {split} video in {d.data_path} has more than {args.offset} frames"
                        + (" that LAQ did not train on" if len(pairs) else ""))
    return pairs, np.flatnonzero(keep), int((~keep).sum()), dropped_videos


def choose(pairs, positions, n, seed, how="exact"):
    """n pair records from `positions` of a pairs dataset. exact: drawn uniformly without
    replacement (a video weighs by its length). laq: as LAQ's loader draws them, one pair per
    video: n videos drawn without replacement, then the first frame uniformly in the video
    and the second at min(first + offset, last)."""
    index, rng = pairs.index, np.random.default_rng(seed)
    if how == "laq":
        videos = np.unique(pairs.video[positions])
        videos = rng.choice(videos, size=min(n, len(videos)), replace=False)
        starts = np.searchsorted(pairs.video, videos)      # pairs are grouped by video
        ends = np.searchsorted(pairs.video, videos, side="right")
        picked = [int(rng.integers(s, e)) for s, e in zip(starts, ends)]
    else:
        picked = rng.choice(positions, size=min(n, len(positions)), replace=False)
    out = []
    for i in sorted(int(i) for i in picked):
        v, t = int(pairs.video[i]), int(pairs.pos[i])
        second = pairs.second(v, t)
        number = lambda pos: int(index.numbers[index.offsets[v] + pos])  # noqa: E731
        out.append(Pair(index.frame_path(v, t), index.frame_path(v, second), index.videos[v],
                        number(t), number(second),
                        lambda v=v, t=t, s=second: [index.read_bytes(v, t),
                                                    index.read_bytes(v, s)]))
    return out


def is_identity(pair):
    """A pair of a video whose future frame was clamped onto the current one (the current frame
    is the video's last): every model that copies scores it perfectly."""
    return bool(pair.video) and pair.current_frame == pair.target_frame


def split_identity(pairs, keep=False):
    """(pairs to score, identity pairs set apart): with `keep` every pair is scored."""
    if keep:
        return list(pairs), []
    return [p for p in pairs if not is_identity(p)], [p for p in pairs if is_identity(p)]


def frame_pairs(args, run_config):
    """(pairs, inputs, frame index or None): what is compared and a description of where it
    came from."""
    if args.image:
        return [Pair(args.image, args.image, "", -1, -1, lambda: [read_file(args.image)] * 2)], {
            "source": "image", "identity_clip": True,
            "note": "--image: the image is both the current and the target frame (identity "
                    "clip), so LAQ's action codes carry no motion"}, None
    if args.frames:
        first, second = args.frames
        return [Pair(first, second, "", -1, -1, lambda: [read_file(first), read_file(second)])], {
            "source": "frames", "identity_clip": False}, None
    exclude = read_video_ids(args.laq_train_videos) if args.laq_train_videos else set()
    pairs, positions, dropped, dropped_videos = split_pairs(args, run_config, args.split, exclude)
    chosen = choose(pairs, positions, args.num_pairs, args.seed, args.pairs)
    overlap = ({"excluded": True, "file": os.path.abspath(args.laq_train_videos),
                "dropped_pairs": dropped, "dropped_videos": dropped_videos,
                "note": f"left out {dropped} pairs from {dropped_videos} videos that LAQ "
                        f"trained on (--laq-train-videos)"} if args.laq_train_videos else
               {"excluded": False, "note": OVERLAP_NOTE.format(split=args.split)}
               if args.laq else None)
    return chosen, {"source": "data_path", "identity_clip": False, "data_path": args.data_path,
                    "split": args.split, "split_source": pairs.source, "offset": args.offset,
                    "pairs": args.pairs, "pairs_note": PAIRS_NOTE[args.pairs],
                    "seed": args.seed, "available_pairs": len(positions),
                    **({"laq_training_overlap": overlap} if overlap else {}),
                    "videos": sorted({p.video for p in chosen}, key=str)}, pairs.index


def figure_picks(pairs, n=FIGURE_ROWS):
    """Indices of up to n pairs for the picture: one per video, videos spread over the list."""
    first_of_video = {}
    for k, pair in enumerate(pairs):
        first_of_video.setdefault(pair.video or k, []).append(k)
    videos = list(first_of_video)
    spread = np.unique(np.linspace(0, len(videos) - 1, min(n, len(videos))).round().astype(int))
    return {first_of_video[videos[i]][len(first_of_video[videos[i]]) // 2] for i in spread}


def labels_of(run_config, args):
    """{video id: action template} when the run's label files are there, else {}."""
    d = data_params_of(run_config, data_path=args.data_path)
    folder = d.labels_path or d.data_path
    if not all(os.path.isfile(os.path.join(folder, n)) for n in LABEL_FILES.values()):
        return {}
    from labels import read_templates
    return read_templates(folder)


# --- what each model sees, and the one target all are scored on ----------------------------

def stretch_to_crop(x, frame_sizes):
    """Map images made from whole frames squeezed to a square ("stretch") onto the centre
    square of those frames ("crop"): for each image, the band that shows the centre square
    of its (h, w) frame is resampled to a square (bilinear, exact at pixel centres)."""
    n, _, s, _ = x.shape
    centres = (torch.arange(s, dtype=torch.float32, device=x.device) * 2 + 1) / s - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    scale = torch.tensor([[min(h, w) / w, min(h, w) / h] for h, w in frame_sizes],
                         dtype=torch.float32, device=x.device)              # (n, [x, y])
    grid = torch.stack([gx, gy], -1)[None] * scale[:, None, None, :]
    return F.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)


def at_size(x, size):
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Geometry:
    """Sizes and resize modes: each model's input (as it was trained, unless overridden) and
    the scoring target (the smallest size; the shared mode, or the centre square when the
    modes differ). `inputs`: {model: (image size, resize)}."""

    def __init__(self, inputs):
        self.inputs = dict(inputs)
        self.size = min(size for size, _ in self.inputs.values())
        modes = {resize for _, resize in self.inputs.values()}
        self.target = modes.pop() if len(modes) == 1 else "crop"

    def views(self):
        return set(self.inputs.values()) | {(self.size, self.target)}

    def describe(self):
        resize = {m: r for m, (_, r) in self.inputs.items()}
        same = len(set(resize.values())) == 1
        fed = ", ".join(f"{m} {r}" for m, r in resize.items())
        return {"resize": resize, "image_sizes": {m: s for m, (s, _) in self.inputs.items()},
                "scoring_size": self.size, "scoring_target": self.target,
                "scoring_note": (f"every model sees {self.target} frames; all are scored on the "
                                 f"{self.target} future frame at {self.size} px") if same else
                (f"the models see differently prepared frames ({fed}); all are scored on the "
                 f"centre square of the future frame at {self.size} px, each stretch model's "
                 f"output mapped back onto it (its band showing the centre square, resampled "
                 f"to a square)")}

    def load(self, pair):
        """({(size, resize): uint8 (2, 3, S, S)}, (h, w) of the target frame), or None."""
        try:
            frames = [decode_rgb(data) for data in pair.read()]
        except (*DECODE_ERRORS, OSError) as e:
            print(f"warning: skipping pair {pair.current}, {pair.target}: {type(e).__name__}: "
                  f"{e}", file=sys.stderr)
            return None
        return ({(s, r): torch.stack([resize_frame(f, s, r) for f in frames])
                 for s, r in self.views()}, tuple(frames[1].shape[-2:]))

    def to_target(self, recon01, model, frame_sizes):
        """A model's reconstructions in [0, 1] -> the scoring target's geometry and size."""
        if self.inputs[model][1] != self.target:                # stretch model, crop target
            recon01 = stretch_to_crop(recon01, frame_sizes)
        return at_size(recon01.float(), self.size).clamp(0, 1)


class PairBatch:
    """The readable pairs of one batch in every view the models need: `raw[view]` uint8
    (B, 2, 3, S, S) on the device; `current` and `target` the scoring target's frames in
    [0, 1]; `sizes` each target frame's (h, w)."""

    def __init__(self, loaded, geometry, device):
        self.positions = [k for k, _, _ in loaded]
        self.pairs = [pair for _, pair, _ in loaded]
        self.sizes = [views[1] for _, _, views in loaded]
        self.raw = {view: torch.stack([views[0][view] for _, _, views in loaded]).to(device)
                    for view in geometry.views()}
        self.geometry, self._frames = geometry, {}
        scoring = self.frames((geometry.size, geometry.target))
        self.current, self.target = scoring[:, 0], scoring[:, 1]

    def __len__(self):
        return len(self.pairs)

    def frames(self, view, channels=3):
        """The pairs in `view` as float (B, 2, C, S, S) in [0, 1]; grey (PIL's luminance) for
        a 1-channel model."""
        if (view, channels) not in self._frames:
            self._frames[view, channels] = self.pixels(view, channels).float() / 255
        return self._frames[view, channels]

    def pixels(self, view, channels=3):
        """The pairs in `view` as uint8 (B, 2, C, S, S)."""
        return self.raw[view] if channels == 3 else luminance(self.raw[view])

    def to_target(self, recon01, model):
        """A model's predictions in [0, 1] -> the scoring target (grey ones repeated to 3
        channels)."""
        if recon01.shape[1] == 1:
            recon01 = recon01.expand(-1, 3, -1, -1)
        return self.geometry.to_target(recon01, model, self.sizes)


def batch_of(pairs, positions, geometry, device):
    """PairBatch of the readable pairs at `positions` (the others named and left out); None
    when none is readable."""
    loaded = [(k, pairs[k], geometry.load(pairs[k])) for k in positions]
    loaded = [(k, p, views) for k, p, views in loaded if views is not None]
    return PairBatch(loaded, geometry, device) if loaded else None


def pair_batches(pairs, geometry, batch_size, device):
    """PairBatch of each run of batch_size pairs that has a readable pair."""
    for start in range(0, len(pairs), batch_size):
        batch = batch_of(pairs, range(start, min(start + batch_size, len(pairs))), geometry,
                         device)
        if batch is not None:
            yield batch
