"""The frame index: every frame of every video folder, ordered numerically, in flat numpy
arrays; cached on disk and rebuilt when a video folder changes; or read from packed shards.

Layout: `<data_path>/<video_id>/img_00001.jpg` (LAQ's and mmaction2's naming). Any numbered
name works (`000001.jpg`, `12.png`, 0- or 1-based); frames are ordered by number. The index is
built with one listing per video and kept in compact arrays, cheap to share with DataLoader
workers.
"""
import hashlib
import json
import logging
import os
import re
import zipfile
import zlib

import numpy as np

from errors import DataError
from files import atomic_write, read_file, remove_orphaned_temps
from parallel import progress

log = logging.getLogger("vae")

FRAME_NAME = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)(?P<ext>\.(?:jpe?g|png))$", re.I)
INDEX_VERSION = 1
INDEX_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


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
                             key=natural_key)
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
    a job opens tens of files instead of millions. Each frame's CRC-32 is checked as it is
    read: a damaged frame is an unreadable frame, not other pixels. Training-ready shards
    (`prepared`: image size, resize mode and JPEG quality) hold every frame already resized for
    training; a frame that could not be decoded when packing is stored empty and reported when
    read.
    """

    def __init__(self, tree, source_root, shard_names, shard, start, length, prepared=None,
                 crc32=None):
        super().__init__(tree.root, tree.videos, tree.patterns, tree.numbers, tree.offsets,
                         tree.fallback, [])
        self.source_root, self.shard_names = source_root, shard_names
        self.shard, self.start, self.length = shard, start, length
        self.prepared = prepared
        self.crc32 = crc32                    # per frame (uint32); None in shards packed before
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
        if self.crc32 is not None and zlib.crc32(data) != self.crc32[i]:
            raise ValueError(f"checksum mismatch: {self.shard_names[key[1]]} is damaged at bytes "
                             f"{self.start[i]}..{self.start[i] + self.length[i] - 1} (restore "
                             f"it or pack again)")
        return data

    @classmethod
    def load(cls, root):
        path = os.path.join(root, PACKED_INDEX)
        try:
            meta, arrays = FrameIndex.read(path)
            return cls(FrameIndex.from_meta(root, meta, arrays), meta["source_root"],
                       meta["shards"], arrays["shard"], arrays["start"], arrays["length"],
                       meta.get("prepared"), arrays.get("crc32"))
        except INDEX_ERRORS as e:
            raise DataError(f"packed index {path} is unreadable ({_first_line(e)}); re-run "
                            f"pack_frames.py") from None


def natural_key(name):
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
            remove_orphaned_temps(cache_dir)
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
