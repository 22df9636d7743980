"""Something-Something-v2 frames: the datasets of single frames and of frame pairs, and the
one definition of a train or val split (build_split) that training, evaluate.py and
compare_with_laq.py share.

Datasets return uint8 CHW tensors: the centre square of the frame (resize "crop") or the whole
frame squeezed to a square (resize "stretch", as LAQ trains) resized to image_size; the training
loop converts them to floats on the device. An unreadable frame is replaced by a readable
neighbour from the same video and reported, never retried in a loop. Reading and decoding live
in frame_files.py, the frame index in frame_index.py, batching in loaders.py.
"""
import hashlib
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from errors import DataError
from frame_files import DECODE_ERRORS, decode_rgb, luminance, resize_frame
from frame_index import load_index, natural_key
from image_datasets import CELEBA_FILES, CelebAArrays
from labels import LABEL_FILES, read_label_ids

NEIGHBOUR_TRIES = 4          # frames tried on each side of an unreadable one


def split_videos(index, labels_path="", val_fraction=0.05, seed=0):
    """Video positions of the train and val splits, and where the split came from.

    The official label JSONs (`id` fields) decide when present; otherwise each video goes to
    val when a hash of its id falls under val_fraction, which is stable as videos are added.
    """
    folder = labels_path or index.root
    files = {split: os.path.join(folder, name) for split, name in LABEL_FILES.items()}
    if all(os.path.isfile(f) for f in files.values()):
        ids = read_label_ids(folder)
        both = ids["train"] & ids["val"]
        if both:
            named = ", ".join(sorted(both, key=natural_key)[:5])
            raise DataError(f"{len(both)} video ids are in both {LABEL_FILES['train']} and "
                            f"{LABEL_FILES['val']} in {folder} (e.g. {named}): a video may be "
                            f"in one split only")
        train = [v for v, vid in enumerate(index.videos) if vid in ids["train"]]
        val = [v for v, vid in enumerate(index.videos) if vid in ids["val"]]
        return train, val, f"label files in {folder}"
    if labels_path:
        raise DataError(f"labels_path {labels_path} lacks {' / '.join(LABEL_FILES.values())}")

    def to_val(vid):
        digest = hashlib.sha1(f"{seed}:{vid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction

    val = [v for v, vid in enumerate(index.videos) if to_val(vid)]
    val_set = set(val)
    train = [v for v in range(len(index.videos)) if v not in val_set]
    return train, val, f"hash split, val_fraction={val_fraction}"


class SthV2Frames(Dataset):
    """Single frames of the given videos, every `frame_stride`-th one.

    An item is (uint8 image, list of unreadable paths it had to skip).
    """

    def __init__(self, index, video_positions, image_size, frame_stride=1,
                 neighbour_tries=NEIGHBOUR_TRIES, resize="crop", channels=3):
        self.index, self.image_size, self.neighbour_tries = index, image_size, neighbour_tries
        self.resize, self.channels = resize, channels
        self.videos = list(video_positions)   # positions in index.videos
        vids, poss = [], []
        for v in video_positions:
            pos = np.arange(0, index.num_frames(v), frame_stride, dtype=np.int64)
            vids.append(np.full(len(pos), v, dtype=np.int64))
            poss.append(pos)
        self.video = np.concatenate(vids) if vids else np.zeros(0, np.int64)
        self.pos = np.concatenate(poss) if poss else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.video)

    def path(self, i):
        return self.index.frame_path(int(self.video[i]), int(self.pos[i]))

    def load(self, v, pos):
        """Frame `pos` of video `v`, or its nearest readable neighbour; (image, bad paths)."""
        bad = []
        n = self.index.num_frames(v)
        for delta in [0] + [d for k in range(1, self.neighbour_tries + 1) for d in (k, -k)]:
            p = pos + delta
            if not 0 <= p < n:
                continue
            try:
                data = self.index.read_bytes(v, p)
                rgb = resize_frame(decode_rgb(data), self.image_size, self.resize)
                return (luminance(rgb) if self.channels == 1 else rgb), bad
            except DECODE_ERRORS as e:
                bad.append(f"{self.index.frame_path(v, p)} ({type(e).__name__}: {e})")
        return None, bad

    def __getitem__(self, i):
        return self.load(int(self.video[i]), int(self.pos[i]))


class SthV2FramePairs(SthV2Frames):
    """(frame t, frame t + offset) pairs of the given videos, every frame_stride-th t.

    exact (the comparison's pairs): only t with t + offset inside the video. clamp (training
    latent action models, as LAQ's loader does): every t, the second frame at
    min(t + offset, last frame), so pairs near a video's end have shorter offsets.
    """

    def __init__(self, index, video_positions, image_size, offset=30, frame_stride=1,
                 resize="crop", clamp=False, channels=3):
        super().__init__(index, video_positions, image_size, frame_stride, resize=resize,
                         channels=channels)
        self.offset, self.clamp = offset, clamp
        if not clamp:
            keep = self.pos + offset < np.diff(index.offsets)[self.video]
            self.video, self.pos = self.video[keep], self.pos[keep]

    def second(self, v, pos):
        return min(pos + self.offset, self.index.num_frames(v) - 1) if self.clamp else \
            pos + self.offset

    def __getitem__(self, i):
        v, pos = int(self.video[i]), int(self.pos[i])
        first, bad = self.load(v, pos)
        second, bad2 = self.load(v, self.second(v, pos))
        return (None if first is None or second is None else torch.stack([first, second]),
                bad + bad2)


def build_split(data_params, split, image_size, index=None, pair_offset=None,
                neighbour_tries=NEIGHBOUR_TRIES, clamp_pairs=False, channels=None):
    """The `split` ("train" or "val") of the data a data_params section describes: the one
    definition of a split that training, evaluate.py and compare_with_laq.py share.

    SthV2: the split's videos (official label files, else the hash split; split_videos), every
    frame_stride-th frame resized as data_params.resize says, or with pair_offset the
    (frame t, frame t + offset) pairs of those videos (clamp_pairs: LAQ's clamped pairs,
    SthV2FramePairs), as grey frames (PIL's luminance) for a 1-channel model (`channels`, the
    model's). CelebA: prepare_celeba.py's array for the split (with `channels`, checked
    against it). `index`: the frame index of
    data_params.data_path when the caller already loaded it. The result carries `split` and
    `source` (where the split came from).
    """
    d = data_params
    if d.dataset == "celeba":
        if pair_offset:
            raise DataError("frame pairs need SthV2 videos; CelebA holds single images")
        dataset = CelebAArrays(os.path.join(d.data_path, CELEBA_FILES[split]), image_size,
                               channels)
        dataset.split, dataset.source = split, f"CelebA {CELEBA_FILES[split]}"
        return dataset
    index = index or load_index(d.data_path, d.index_cache_dir)
    check_prepared(index, image_size, d.resize)
    train, val, source = split_videos(index, d.labels_path, d.val_fraction)
    videos = {"train": train, "val": val}[split]
    if not videos:
        name = {"train": "train", "val": "validation"}[split]
        hint = "; raise data_params.val_fraction or add videos" if split == "val" else ""
        raise DataError(f"the {name} split of {index.root} has no videos ({source}){hint}")
    if pair_offset:
        dataset = SthV2FramePairs(index, videos, image_size, pair_offset, d.frame_stride,
                                  d.resize, clamp_pairs, channels or 3)
    else:
        dataset = SthV2Frames(index, videos, image_size, d.frame_stride, neighbour_tries,
                              d.resize, channels or 3)
    dataset.split, dataset.source = split, source
    return dataset


def check_prepared(index, image_size, resize):
    """Training-ready shards serve one image size and resize mode: refuse any other."""
    prepared = getattr(index, "prepared", None)
    if not prepared:
        return
    made = f"{prepared['image_size']} px, resize {prepared['resize']}"
    if image_size is None:
        raise DataError(f"{index.root} holds frames already resized ({made}); this needs the "
                        f"original frames: use the frames tree, or shards packed without "
                        f"--image-size")
    if (image_size, resize) != (prepared["image_size"], prepared["resize"]):
        raise DataError(f"{index.root} holds frames prepared at {made}, and this run asks for "
                        f"{image_size} px, resize {resize}: set data_params.image_size and "
                        f"data_params.resize to match, or pack again with pack_frames.py "
                        f"--image-size {image_size} --resize {resize}")


def data_signature(dataset):
    """What a checkpoint records of its train split, to notice a changed one on resume:
    {"frames", "videos", "hash"} (the hash covers every video id and its frame count)."""
    h = hashlib.sha1()
    if isinstance(dataset, CelebAArrays):
        h.update(f"{dataset.file}\0{dataset.shape}".encode())
        return {"frames": len(dataset), "videos": 0, "hash": h.hexdigest()}
    for v in dataset.videos:
        h.update(f"{dataset.index.videos[v]}\0{dataset.index.num_frames(v)}\0".encode())
    return {"frames": len(dataset), "videos": len(dataset.videos), "hash": h.hexdigest()}


def describe(train_set, val_set):
    """One line about the two splits, for the training log."""
    if isinstance(train_set, CelebAArrays):
        return (f"CelebA arrays in {os.path.dirname(train_set.file)}: train {len(train_set)} / "
                f"val {len(val_set)} images")
    unit = f"pairs (offset {train_set.offset})" if isinstance(train_set, SthV2FramePairs) \
        else "frames"
    return (f"{len(train_set.index.videos)} videos ({train_set.source}): train "
            f"{len(train_set.videos)} videos / {len(train_set)} {unit}, val "
            f"{len(val_set.videos)} videos / {len(val_set)} {unit}")
