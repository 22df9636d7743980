"""Something-Something-v2 frames on disk: index, video-level splits, datasets.

Layout: `<data_path>/<video_id>/img_00001.jpg` (LAQ's and mmaction2's naming). Any
numbered name works (`000001.jpg`, `12.png`, 0- or 1-based); frames are ordered by number.
The index is built once with one listing per video, kept in compact numpy arrays (cheap to
share with DataLoader workers), cached on disk, and rebuilt when a video folder changes.

Datasets return uint8 CHW tensors: the centre square of the frame (resize "crop") or the whole
frame squeezed to a square (resize "stretch", as LAQ trains) resized to image_size,
decoded with libjpeg-turbo and resized on uint8 (about 2x PIL per core); the training loop
converts them to floats on the device. Unreadable frames are replaced by
a readable neighbour from the same video and reported, never retried in a loop.

build_split() is the one definition of a train or val split; make_loaders() and
device_batches() are what the training loop iterates.
"""
import atexit
import hashlib
import io
import json
import logging
import os
import re
import stat
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, default_collate,
                              get_worker_info)

from checkpoint import atomic_write
from runtime import ignore_stop_signals, progress



def _pick_jpeg_decoder():
    """(name, bytes tensor -> uint8 RGB CHW) of the JPEG decoder frames go through.

    torchvision's and torchcodec's decode_jpeg give the same pixels at the same speed
    (libjpeg-turbo; BENCHMARKS.md), PIL's takes twice as long. torchvision's is a dependency
    already and comes first; torchvision 0.29 deprecates it in favour of torchcodec's, which
    takes over when a torchvision without it is installed; PIL is the announced last resort
    (describe_jpeg_decoder)."""
    with warnings.catch_warnings():     # torchvision >= 0.29 marks its decoders as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
            return "torchvision", lambda t: decode_jpeg(t, mode=ImageReadMode.RGB)
        except ImportError:
            pass
    try:                        # a torchcodec that cannot load its libraries raises on import
        from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
        return "torchcodec", torchcodec_decode_jpeg
    except (ImportError, RuntimeError, OSError):
        return "pil", None


JPEG_DECODER, _jpeg_decode = _pick_jpeg_decoder()


def describe_jpeg_decoder():
    """One line for the logs: which decoder reads the frames, and what to do about PIL."""
    if JPEG_DECODER == "pil":
        return ("JPEG frames are decoded by PIL, about half the speed of libjpeg-turbo: this "
                "torchvision has no decode_jpeg; pip install torchcodec for the fast decoder")
    return f"JPEG frames are decoded by {JPEG_DECODER}'s decode_jpeg (libjpeg-turbo)"


log = logging.getLogger("vae")

FRAME_NAME = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)(?P<ext>\.(?:jpe?g|png))$", re.I)
LABEL_FILES = {"train": "something-something-v2-train.json",
               "val": "something-something-v2-validation.json"}
INDEX_VERSION = 1
NEIGHBOUR_TRIES = 4          # frames tried on each side of an unreadable one
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
INDEX_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
MAX_FILE_BYTES = 64 * 2 ** 20     # a frame file larger than this is treated as unreadable


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def read_file(path, limit=MAX_FILE_BYTES):
    """The bytes of a regular file of at most `limit` bytes. Anything else (a FIFO, which would
    block forever; a device such as /dev/zero behind a symlink, which never ends; a huge file)
    raises ValueError, which the datasets treat like any unreadable frame."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # a FIFO must not block the open
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than the {limit} a frame may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than the {limit} bytes a frame may have")
    return data


class DataError(RuntimeError):
    """The data on disk cannot serve what was asked (one line, names the path)."""


def _name_pattern(parsed):
    """(prefix, width, ext) that formats every name of a video (given as FRAME_NAME matches),
    or None if they differ."""
    prefixes = {m["prefix"] for m in parsed}
    exts = {m["ext"] for m in parsed}
    widths = {len(m["number"]) for m in parsed}
    if len(prefixes) != 1 or len(exts) != 1:
        return None
    numbers = [m["number"] for m in parsed]
    if len(widths) == 1 and any(n.startswith("0") for n in numbers):
        width = widths.pop()                                  # zero-padded
    elif not any(n.startswith("0") and len(n) > 1 for n in numbers):
        width = 0                                             # plain integers
    else:
        return None
    return prefixes.pop(), width, exts.pop()


class FrameIndex:
    """Every frame of every video folder, ordered numerically, in flat numpy arrays.

    DataLoader workers share the index with the process that forked them, and a Python object
    a worker touches is copied into it (its reference count is written). frame_path therefore
    reads numpy arrays only: at SthV2 scale (220k videos) the lists would cost each worker
    about 100 MB (bench.py index)."""

    def __init__(self, root, videos, patterns, numbers, offsets, fallback, empty_videos):
        self.root = root
        self.videos = videos                  # list of video ids (folder names)
        self.patterns = patterns              # per video (prefix, width, ext) or None
        self.numbers = numbers                # int64, frame numbers of all videos
        self.offsets = offsets                # int64, len(videos) + 1
        self.fallback = fallback              # video position -> list of file names
        self.empty_videos = empty_videos      # folders without a single frame
        regular = [p or ("", 0, "") for p in patterns]      # what frame_path reads, as arrays
        self._names = np.array(videos if videos else [""], dtype=str)
        self._prefix = np.array([p[0] for p in regular] or [""], dtype=str)
        self._width = np.array([p[1] for p in regular] or [0], dtype=np.int64)
        self._ext = np.array([p[2] for p in regular] or [""], dtype=str)
        self._irregular = np.array([p is None for p in patterns] or [False], dtype=bool)

    def __len__(self):
        return int(self.offsets[-1])

    def num_frames(self, v):
        return int(self.offsets[v + 1] - self.offsets[v])

    def frame_path(self, v, pos):
        video = str(self._names[v])
        if self._irregular[v]:
            return os.path.join(self.root, video, self.fallback[v][pos])
        number = int(self.numbers[self.offsets[v] + pos])
        return os.path.join(self.root, video,
                            f"{self._prefix[v]}{number:0{int(self._width[v])}d}{self._ext[v]}")

    def read_bytes(self, v, pos):
        return read_file(self.frame_path(v, pos))

    @classmethod
    def build(cls, root):
        videos, patterns, numbers, counts, fallback, empty = [], [], [], [], {}, []
        with os.scandir(root) as it:
            folders = sorted((e.name for e in it if e.is_dir() and not e.name.startswith(".")),
                             key=_natural_key)
        for video in progress(folders, desc="indexing", unit="video", leave=False):
            with os.scandir(os.path.join(root, video)) as it:
                parsed = [m for m in (FRAME_NAME.match(e.name) for e in it if e.is_file()) if m]
            if not parsed:
                empty.append(video)
                continue
            parsed.sort(key=lambda m: (int(m["number"]), m.string))
            pattern = _name_pattern(parsed)
            if pattern is None:
                fallback[len(videos)] = [m.string for m in parsed]
            videos.append(video)
            patterns.append(pattern)
            numbers.extend(int(m["number"]) for m in parsed)
            counts.append(len(parsed))
        offsets = np.zeros(len(videos) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(root, videos, patterns, np.asarray(numbers, dtype=np.int64), offsets,
                   fallback, empty)

    def save(self, path, extra_meta=None, **extra_arrays):
        """Write the index (and any extra arrays) atomically: numpy arrays plus JSON meta."""
        meta = {"version": INDEX_VERSION, "videos": self.videos, "patterns": self.patterns,
                "empty": self.empty_videos,
                "fallback": {str(k): v for k, v in self.fallback.items()}, **(extra_meta or {})}
        with atomic_write(path) as f:
            np.savez(f, numbers=self.numbers, offsets=self.offsets, **extra_arrays,
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    @staticmethod
    def read(path):
        """(meta, arrays) of a file written by save(). Raises OSError, ValueError, KeyError."""
        with np.load(path, allow_pickle=False) as z:
            return (json.loads(z["meta"].tobytes().decode()),
                    {k: z[k] for k in z.files if k != "meta"})

    @classmethod
    def from_meta(cls, root, meta, arrays):
        return cls(root, meta["videos"], [tuple(p) if p else None for p in meta["patterns"]],
                   arrays["numbers"], arrays["offsets"],
                   {int(k): v for k, v in meta["fallback"].items()}, meta["empty"])

    @classmethod
    def load(cls, path, root, signature):
        """The cached index if it matches `signature`, else None (a damaged cache is named in
        a warning and rebuilt)."""
        if not os.path.exists(path):
            return None
        try:
            meta, arrays = cls.read(path)
        except INDEX_ERRORS as e:
            log.warning("frame index cache %s is unreadable (%s); rebuilding it", path,
                        _first_line(e))
            return None
        if meta.get("version") != INDEX_VERSION or meta.get("signature") != signature:
            return None
        return cls.from_meta(root, meta, arrays)


PACKED_INDEX = "packed_index.npz"


class PackedFrameIndex(FrameIndex):
    """The frames of a tree packed by pack_frames.py into a few large shard files.

    Same videos, order and names as the tree it was packed from (frame_path still names the
    original file, for reports); read_bytes reads the JPEG bytes at an offset in a shard, so
    a job opens tens of files instead of millions. Training-ready shards (`prepared`: image
    size, resize mode and JPEG quality) hold every frame already resized for training; a frame
    that could not be decoded when packing is stored empty and reported when read.
    """

    def __init__(self, tree, source_root, shard_names, shard, start, length, prepared=None):
        super().__init__(tree.root, tree.videos, tree.patterns, tree.numbers, tree.offsets,
                         tree.fallback, [])
        self.source_root, self.shard_names = source_root, shard_names
        self.shard, self.start, self.length = shard, start, length
        self.prepared = prepared
        self._files = {}                      # per process: opened on first use (fork-safe)

    def frame_path(self, v, pos):
        return os.path.join(self.source_root, os.path.relpath(super().frame_path(v, pos), self.root))

    def read_bytes(self, v, pos):
        i = int(self.offsets[v]) + pos
        if self.length[i] == 0 and self.prepared:
            raise ValueError("could not be decoded when the shards were packed")
        key = (os.getpid(), int(self.shard[i]))
        if key not in self._files:
            self._files[key] = open(os.path.join(self.root, self.shard_names[key[1]]), "rb")
        data = os.pread(self._files[key].fileno(), int(self.length[i]), int(self.start[i]))
        if len(data) != self.length[i]:
            raise OSError(f"{self.shard_names[key[1]]} is shorter than its index says")
        return data

    @classmethod
    def load(cls, root):
        path = os.path.join(root, PACKED_INDEX)
        try:
            meta, arrays = FrameIndex.read(path)
            return cls(FrameIndex.from_meta(root, meta, arrays), meta["source_root"],
                       meta["shards"], arrays["shard"], arrays["start"], arrays["length"],
                       meta.get("prepared"))
        except INDEX_ERRORS as e:
            raise DataError(f"packed index {path} is unreadable ({_first_line(e)}); re-run "
                            f"pack_frames.py") from None


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def tree_signature(root):
    """Hash of every video folder's name and mtime: adding or removing a frame changes it."""
    h = hashlib.sha1()
    with os.scandir(root) as it:
        entries = sorted((e.name, e.stat().st_mtime_ns) for e in it
                         if e.is_dir() and not e.name.startswith("."))
    for name, mtime in entries:
        h.update(f"{name}\0{mtime}\0".encode())
    return h.hexdigest()


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sthv2_frame_index")


def load_index(root, cache_dir=""):
    """The frame index of `root`, from the cache when the tree is unchanged."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is not a folder")
    if os.path.isfile(os.path.join(root, PACKED_INDEX)):
        return PackedFrameIndex.load(root)
    cache_dir = cache_dir or default_cache_dir()
    cache = os.path.join(cache_dir, hashlib.sha1(root.encode()).hexdigest()[:16] + ".npz")
    signature = tree_signature(root)
    index = FrameIndex.load(cache, root, signature)
    if index is None:
        log.info("indexing frames under %s", root)
        index = FrameIndex.build(root)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            index.save(cache, {"signature": signature})
        except OSError as e:
            log.warning("could not cache the frame index in %s (%s); it is rebuilt next time",
                        cache_dir, e.strerror)
    if index.empty_videos:
        log.warning("%d video folders hold no frames and are skipped (e.g. %s)",
                    len(index.empty_videos), index.empty_videos[0])
    if len(index) == 0:
        raise DataError(f"no frames found under {root}: expected "
                        f"<video_id>/img_00001.jpg (numbered .jpg/.jpeg/.png files)")
    return index


def split_videos(index, labels_path="", val_fraction=0.05, seed=0):
    """Video positions of the train and val splits, and where the split came from.

    The official label JSONs (`id` fields) decide when present; otherwise each video goes to
    val when a hash of its id falls under val_fraction, which is stable as videos are added.
    """
    folder = labels_path or index.root
    files = {split: os.path.join(folder, name) for split, name in LABEL_FILES.items()}
    if all(os.path.isfile(f) for f in files.values()):
        ids = {}
        for split, path in files.items():
            try:
                with open(path) as f:
                    ids[split] = {str(entry["id"]) for entry in json.load(f)}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"cannot read video ids from {path}: {e}") from None
        both = ids["train"] & ids["val"]
        if both:
            named = ", ".join(sorted(both, key=_natural_key)[:5])
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


def is_complete_jpeg(data):
    """Start and end markers in place, and a JPEG decoder to hand."""
    return _jpeg_decode is not None and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def decode_rgb(data):
    """uint8 (3, H, W) from encoded bytes. Complete JPEGs go through libjpeg-turbo
    (JPEG_DECODER); anything else (PNG, a JPEG without its end marker) through PIL, which
    rejects truncated files. Every image's size is read from its header first (a JPEG's frame
    header directly, anything else by PIL): one of more than PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) pixels is refused before it is decoded. 16-bit images are scaled to 8 bits, not clipped."""
    if not data:
        raise ValueError("empty file")
    size = jpeg_size(data) if is_complete_jpeg(data) else None
    if size:                                  # the common case, without PIL's header parse
        _check_pixels(*size)
        return _decode_jpeg(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))     # reads the header only
    except Image.DecompressionBombWarning as e:
        raise Image.DecompressionBombError(str(e)) from None
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL can read") from None
    with image:
        _check_pixels(*image.size)
        if is_complete_jpeg(data):
            return _decode_jpeg(data)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):     # 16-bit grey: keep the range
            grey = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return torch.from_numpy(grey)[None].expand(3, -1, -1).contiguous()
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # frame headers (not DHT/JPG/DAC)


def jpeg_size(data):
    """(width, height) from a JPEG's frame header, or None if none is found before the
    image data (then PIL reads the header)."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                    # fill byte
            i += 1
            continue
        if marker in SOF_MARKERS:
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"))
        if marker == 0xDA:                    # image data before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:     # markers without a length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_pixels(width, height):
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"{width}x{height} pixels, more than the "
                                           f"{limit} PIL accepts (decompression bomb?)")


def _decode_jpeg(data):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _jpeg_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as e:
        raise ValueError(f"JPEG decode failed: {str(e).splitlines()[-1][:200]}") from None


def resize_frame(img, image_size, resize="crop"):
    """The centre square of the frame ("crop") or the whole frame ("stretch") to S x S;
    bilinear with antialiasing, on uint8. Cropping before resizing resamples only the pixels
    that are kept (about 2x faster than resizing the short side to S and cropping after)."""
    h, w = img.shape[-2:]
    if resize != "stretch":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[:, top:top + side, left:left + side]
    if img.shape[-2:] != (image_size, image_size):
        img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return img                  # possibly a view: batching copies it once, into the batch


def load_frame(path, image_size, resize="crop"):
    """uint8 (3, S, S) frame from a file, resized as resize_frame says. Raises DECODE_ERRORS."""
    return resize_frame(decode_rgb(read_file(path)), image_size, resize)


class SthV2Frames(Dataset):
    """Single frames of the given videos, every `frame_stride`-th one.

    An item is (uint8 image, list of unreadable paths it had to skip).
    """

    def __init__(self, index, video_positions, image_size, frame_stride=1,
                 neighbour_tries=NEIGHBOUR_TRIES, resize="crop"):
        self.index, self.image_size, self.neighbour_tries = index, image_size, neighbour_tries
        self.resize = resize
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
                return resize_frame(decode_rgb(data), self.image_size, self.resize), bad
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
                 resize="crop", clamp=False):
        super().__init__(index, video_positions, image_size, frame_stride, resize=resize)
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


IMAGE_FILE = re.compile(r"\.(?:jpe?g|png|bmp|webp)$", re.I)


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, natural order), for evaluation."""

    def __init__(self, root, image_size, resize="crop"):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        self.image_size, self.resize = image_size, resize
        self.paths = sorted((os.path.join(d, f) for d, _, files in os.walk(root)
                             for f in files if IMAGE_FILE.search(f)), key=_natural_key)
        if not self.paths:
            raise DataError(f"no .jpg/.png/.bmp/.webp images under {root}")

    def __len__(self):
        return len(self.paths)

    def path(self, i):
        return self.paths[i]

    def __getitem__(self, i):
        try:
            return load_frame(self.paths[i], self.image_size, self.resize), []
        except DECODE_ERRORS as e:
            return None, [f"{self.paths[i]} ({type(e).__name__}: {e})"]


def _split(batch):
    """The items' images (None where unreadable) and all their unreadable paths."""
    return [img for img, _ in batch], [path for _, paths in batch for path in paths]


def _fill_unreadable(images, bad):
    """Images with each None replaced by a readable image of the same batch, so that every
    rank keeps the same batch size."""
    good = [img for img in images if img is not None]
    if not good:
        raise DataError(f"every frame of a batch failed to decode, e.g. {bad[0]}")
    return [img if img is not None else good[k % len(good)] for k, img in enumerate(images)]


def collate_frames(batch):
    """Stack the images; an item no neighbour could replace is filled with a readable one of
    the same batch so that every rank keeps the same batch size."""
    images, bad = _split(batch)
    # default_collate stacks straight into shared memory inside a DataLoader worker, which
    # saves copying every batch once more on its way to the main process
    return default_collate(_fill_unreadable(images, bad)), bad


class BatchLease:
    """Hands a pooled batch buffer back to the DataLoader worker that filled it."""

    def __init__(self, busy, slot):
        self.busy, self.slot = busy, slot

    def release(self):
        self.busy[self.slot] = 0


class PooledCollate:
    """collate_frames into shared-memory buffers that each DataLoader worker reuses.

    Every fresh shared-memory batch costs its worker a page fault per 4 KiB written (about a
    sixth of the loading time at 256 px). Batches come as (images, bad paths, lease); once
    the consumer is done with the images it calls lease.release() and the worker may fill
    that buffer again. A buffer is never refilled before its release: when none is free,
    or outside a worker, the batch goes into fresh memory and the lease is None, so keeping
    a batch, or never releasing it, only costs speed.
    """

    def __init__(self, slots):
        self.slots = slots
        self._pool = None                     # (pid, busy flags, buffers), made in the worker

    def __call__(self, batch):
        if get_worker_info() is None:
            return (*collate_frames(batch), None)
        images, bad = _split(batch)
        images = _fill_unreadable(images, bad)
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), torch.zeros(self.slots, dtype=torch.uint8).share_memory_(), [])
        _, busy, buffers = self._pool
        shape = (len(images), *images[0].shape)
        free = [k for k, buf in enumerate(buffers) if buf.shape == shape and busy[k].item() == 0]
        if free:
            slot = free[0]
        elif len(buffers) < self.slots:
            buffers.append(torch.empty(shape, dtype=images[0].dtype).share_memory_())
            slot = len(buffers) - 1
        else:
            return default_collate(images), bad, None
        busy[slot] = 1
        torch.stack(images, out=buffers[slot])
        return buffers[slot], bad, BatchLease(busy, slot)


CELEBA_FILES = {"train": "train_data.npy", "val": "eval_data.npy"}


class CelebAArrays(Dataset):
    """uint8 N x 3 x H x W images of prepare_celeba.py, read by memory map: each DataLoader
    worker maps the file on first use instead of holding a copy of the 12-17 GB array."""

    def __init__(self, path, image_size=None):
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist: run prepare_celeba.py -o {os.path.dirname(path)}")
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4 or array.shape[1] != 3 or array.dtype != np.uint8:
            raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 N x 3 x H x W")
        if image_size and array.shape[2:] != (image_size, image_size):
            raise DataError(f"{path} holds {array.shape[2]}x{array.shape[3]} images, the model "
                            f"wants {image_size}x{image_size}: re-run prepare_celeba.py "
                            f"--image-size {image_size}")
        self.file, self.shape, self._array = path, array.shape, None

    def __len__(self):
        return self.shape[0]

    def path(self, i):
        return f"{self.file}[{i}]"

    def __getitem__(self, i):
        if self._array is None:                 # opened lazily, once per process
            self._array = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])), []


def build_split(data_params, split, image_size, index=None, pair_offset=None,
                neighbour_tries=NEIGHBOUR_TRIES, clamp_pairs=False):
    """The `split` ("train" or "val") of the data a data_params section describes: the one
    definition of a split that training, evaluate.py and compare_with_laq.py share.

    SthV2: the split's videos (official label files, else the hash split; split_videos), every
    frame_stride-th frame resized as data_params.resize says, or with pair_offset the
    (frame t, frame t + offset) pairs of those videos (clamp_pairs: LAQ's clamped pairs,
    SthV2FramePairs). CelebA: prepare_celeba.py's array for the split. `index`: the frame index of
    data_params.data_path when the caller already loaded it. The result carries `split` and
    `source` (where the split came from).
    """
    d = data_params
    if d.dataset == "celeba":
        if pair_offset:
            raise DataError("frame pairs need SthV2 videos; CelebA holds single images")
        dataset = CelebAArrays(os.path.join(d.data_path, CELEBA_FILES[split]), image_size)
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
                                  d.resize, clamp_pairs)
    else:
        dataset = SthV2Frames(index, videos, image_size, d.frame_stride, neighbour_tries,
                              d.resize)
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


# --- loaders: what the training loop iterates -----------------------------------------------

def _reported(loader):
    """Iterate a DataLoader, turning its worker failures into one-line DataErrors."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out" in str(e):
                raise DataError(f"a data loader worker gave no batch for {loader.timeout:g} s "
                                f"(a file read that hangs? a FIFO or a network filesystem "
                                f"stall); raise data_params.worker_timeout if the files are "
                                f"just slow") from None
            raise
        except DataError as e:        # raised in a worker: keep the message, not its traceback
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        yield batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, for exact mid-epoch resume."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        """Shuffle for `epoch` and leave out this rank's first `skip` samples of it."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


class BlockBatchSampler:
    """Validation batches: each global batch of consecutive indices is split r::W over ranks,
    so the per-image noise, and so the metric, do not depend on the number of ranks."""

    def __init__(self, indices, global_batch, rank, world_size):
        self.items = len(indices)                 # over all ranks
        self.blocks = [indices[s:s + global_batch][rank::world_size]
                       for s in range(0, len(indices), global_batch)]
        self.blocks = [b for b in self.blocks if len(b)]

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


def _kill_workers_at_exit():
    """Workers ignore SIGTERM, which is how multiprocessing ends daemonic children at exit:
    kill any still running (e.g. one stuck in a read) so that the process can end."""
    import multiprocessing
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def make_loaders(train_set, val_set, data_params, rt, seed, val_batches=0):
    """(train loader, val loader) of this rank's share of the global batches. The train
    loader's sampler is a ResumableSampler; validation takes `val_batches` evenly spaced global
    batches' worth of frames (0: all)."""
    d = data_params
    atexit.unregister(_kill_workers_at_exit)
    atexit.register(_kill_workers_at_exit)          # runs before multiprocessing's own hook
    common = dict(num_workers=d.num_workers, collate_fn=PooledCollate(d.prefetch_factor + 2),
                  pin_memory=d.pin_memory and rt.device.type == "cuda",
                  persistent_workers=d.num_workers > 0,
                  **({"prefetch_factor": d.prefetch_factor, "worker_init_fn": ignore_stop_signals,
                      "timeout": d.worker_timeout} if d.num_workers else {}))
    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=seed,
                               drop_last=True)
    train = DataLoader(train_set, d.train_batch_size // rt.world_size, sampler=sampler,
                       drop_last=True, generator=torch.Generator(), **common)
    indices = list(range(len(val_set)))
    if val_batches and val_batches * d.val_batch_size < len(val_set):
        indices = [int(i) for i in np.linspace(0, len(val_set) - 1,
                                                val_batches * d.val_batch_size).round()]
    val = DataLoader(val_set, batch_sampler=BlockBatchSampler(
        indices, d.val_batch_size, rt.rank, rt.world_size), **common)
    return train, val


def device_batches(loader, device):
    """(uint8 images on `device`, unreadable paths) for each batch of `loader`. A pooled
    buffer (PooledCollate) goes back to its worker when the next batch is asked for: by then
    the step that read it is done. A worker that gives no batch for data_params.worker_timeout
    seconds (a file read that hangs) is reported as a DataError, not waited for forever."""
    lease = None
    for images, bad, next_lease in _reported(loader):
        if lease:
            lease.release()
        yield images.to(device, non_blocking=True), bad
        lease = next_lease
    if lease:
        lease.release()
