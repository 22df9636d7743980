"""Packing a SthV2 frames tree into shard files (pack_frames.py's command line says what they
hold): the original bytes, or training-ready frames decoded, resized as training does and
re-encoded by a pool of workers. The index that reads them back: frame_index.PackedFrameIndex.
"""
import errno
import functools
import io
import os
import re
import zlib

import numpy as np
from PIL import Image

from errors import DataError, WriteFailed
from files import atomic_write, copy_atomic, remove_orphaned_temps
from frame_index import PACKED_INDEX, load_index
from labels import LABEL_FILES
from parallel import ordered_map, process_pool, progress

CHUNK = 256                                   # frames per task of a packing worker
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)   # no room to write


def prepare(data, image_size, resize, quality):
    """The frame as training reads it, re-encoded as a JPEG; b"" when it cannot be decoded."""
    from frame_files import DECODE_ERRORS, decode_rgb, resize_frame    # torch: not for --help
    try:
        img = resize_frame(decode_rgb(data), image_size, resize)
    except DECODE_ERRORS:
        return b""
    out = io.BytesIO()                        # 4:4:4: no chroma subsampling at shape edges
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(out, "JPEG", quality=quality,
                                                       subsampling=0)
    return out.getvalue()


def prepare_span(index, span, image_size, resize, quality):
    """Frames start..stop-1 (in index order), prepared."""
    start, stop = span
    videos = np.searchsorted(index.offsets, np.arange(start, stop), side="right") - 1
    return [prepare(index.read_bytes(int(v), i - int(index.offsets[v])), image_size, resize,
                    quality) for i, v in zip(range(start, stop), videos)]


_INDEX = None                                 # a packing worker's copy, loaded once


def _prepare_span_in_worker(span, root, cache_dir, **settings):
    global _INDEX
    if _INDEX is None or _INDEX.root != root:
        _INDEX = load_index(root, cache_dir)
    return prepare_span(_INDEX, span, **settings)


def frame_bytes(index, index_cache_dir, image_size, resize, quality, workers):
    """Every frame's bytes in index order: as stored, or prepared by `workers` processes,
    at most 4 chunks per worker ahead of the writer (memory stays bounded at any size)."""
    if not image_size:
        for v in range(len(index.videos)):
            for pos in range(index.num_frames(v)):
                yield index.read_bytes(v, pos)
        return
    n = len(index)
    spans = (((i, min(i + CHUNK, n)),) for i in range(0, n, CHUNK))
    settings = {"image_size": image_size, "resize": resize, "quality": quality}
    work = functools.partial(_prepare_span_in_worker, root=index.root, cache_dir=index_cache_dir,
                             **settings) if workers > 1 else \
        functools.partial(prepare_span, index, **settings)
    with process_pool(workers) as pool:
        for frames in ordered_map(pool, work, spans, 4 * workers):
            yield from frames


def pack(data_path, out, shard_size, index_cache_dir="", image_size=0, resize="crop",
         quality=90, workers=1):
    index = load_index(data_path, index_cache_dir)
    if os.path.abspath(out) == index.root:
        raise DataError("--out must differ from --data-path")
    if getattr(index, "prepared", None):
        raise DataError(f"{data_path} holds frames already resized; pack the frames tree")
    if os.path.isfile(os.path.join(out, PACKED_INDEX)):
        # new shards under the old index would read as other frames until the new index is
        # written (and for ever if the run is killed): an index and its shards change together
        raise DataError(f"{out} already holds packed frames ({PACKED_INDEX}); pack into a new "
                        f"folder and point data_params.data_path at it, or remove {out} first")
    os.makedirs(out, exist_ok=True)
    remove_orphaned_temps(out)            # shards a killed run left half-written
    try:
        return write_packed(index, out, shard_size, index_cache_dir, image_size, resize, quality,
                            workers)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        removed = [name for name in os.listdir(out) if re.fullmatch(r"shard_\d{5}\.bin", name)]
        for name in removed:                  # shards without their index are of no use
            os.remove(os.path.join(out, name))
        kept = (f"the {len(removed)} shards written before it were removed" if removed else
                "no shard was kept")
        raise WriteFailed(f"cannot write {err.filename or out} ({err.strerror or err}); {kept}: "
                          f"free space or pack elsewhere") from None


def write_packed(index, out, shard_size, index_cache_dir, image_size, resize, quality, workers):
    """pack()'s writing: the shards, then the index, then the label files."""
    n = len(index)
    shard = np.zeros(n, dtype=np.int32)
    start = np.zeros(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    crc32 = np.zeros(n, dtype=np.uint32)
    frames = frame_bytes(index, index_cache_dir, image_size, resize, quality, workers)
    shards, k = [], 0
    with progress(total=n, unit="frame") as bar:
        while k < n:                          # each shard appears whole, or not at all
            name = f"shard_{len(shards):05d}.bin"
            try:
                with atomic_write(os.path.join(out, name)) as handle:
                    written = 0
                    while k < n and written < shard_size:
                        data = next(frames)
                        shard[k], start[k], length[k] = len(shards), written, len(data)
                        crc32[k] = zlib.crc32(data)
                        handle.write(data)
                        written += len(data)
                        k += 1
                        bar.update(1)
            except OSError as err:            # a write names no file: say which shard
                err.filename = err.filename or os.path.join(out, name)
                raise
            shards.append(name)
    prepared = ({"image_size": image_size, "resize": resize, "quality": quality}
                if image_size else None)
    for name in LABEL_FILES.values():
        if os.path.isfile(os.path.join(index.root, name)):
            copy_atomic(os.path.join(index.root, name), os.path.join(out, name))
    # written last: the shards are a packed tree only once their index exists
    index.save(os.path.join(out, PACKED_INDEX),
               {"source_root": index.root, "shards": shards, "prepared": prepared},
               shard=shard, start=start, length=length, crc32=crc32)
    report = {"frames": n, "videos": len(index.videos), "shards": len(shards),
              "bytes": int(length.sum()), "empty_videos_skipped": len(index.empty_videos)}
    if prepared:
        report.update(prepared=prepared, undecodable_frames=int((length == 0).sum()))
    return report
