"""Pack a SthV2 frames tree into a few large shard files for parallel filesystems.

    python pack_frames.py --data-path data/sthv2/frames --out data/sthv2/packed [--shard-size-gb 2]

Writes OUT/shard_00000.bin, ... (the frames' JPEG bytes back to back, in index order, so an
epoch reads each shard sequentially) and OUT/packed_index.npz (videos, frame numbers, shard,
offset and length of every frame). The SthV2 label JSONs are copied along. Point
data_params.data_path at OUT: the dataset, splits and frame pairs work the same way, and a job
opens tens of files instead of millions. Every frame is copied byte for byte.
"""
import argparse
import json
import os
import time

import numpy as np
from tqdm import tqdm

from checkpoint import atomic_write, copy_atomic
from dataset_sthv2 import LABEL_FILES, PACKED_INDEX, DataError, load_index
from runtime import exit_bad_input


def pack(data_path, out, shard_size, index_cache_dir=""):
    index = load_index(data_path, index_cache_dir)
    if os.path.abspath(out) == index.root:
        raise DataError("--out must differ from --data-path")
    os.makedirs(out, exist_ok=True)
    n = len(index)
    shard = np.zeros(n, dtype=np.int32)
    start = np.zeros(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    frames = ((v, pos) for v in range(len(index.videos)) for pos in range(index.num_frames(v)))
    shards, k = [], 0
    with tqdm(total=n, unit="frame", disable=None) as progress:
        while k < n:                          # each shard appears whole, or not at all
            name = f"shard_{len(shards):05d}.bin"
            with atomic_write(os.path.join(out, name)) as handle:
                written = 0
                while k < n and written < shard_size:
                    v, pos = next(frames)
                    data = index.read_bytes(v, pos)
                    shard[k], start[k], length[k] = len(shards), written, len(data)
                    handle.write(data)
                    written += len(data)
                    k += 1
                    progress.update(1)
            shards.append(name)
    # written last: the shards are a packed tree only once their index exists
    index.save(os.path.join(out, PACKED_INDEX), {"source_root": index.root, "shards": shards},
               shard=shard, start=start, length=length)
    labels_dir = index.root
    for name in LABEL_FILES.values():
        if os.path.isfile(os.path.join(labels_dir, name)):
            copy_atomic(os.path.join(labels_dir, name), os.path.join(out, name))
    return {"frames": n, "videos": len(index.videos), "shards": len(shards),
            "bytes": int(length.sum()), "empty_videos_skipped": len(index.empty_videos)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="frames tree (<video_id>/img_*.jpg)")
    parser.add_argument("--out", required=True, help="folder for the shards and the index")
    parser.add_argument("--shard-size-gb", type=float, default=2.0)
    parser.add_argument("--index-cache-dir", default="")
    args = parser.parse_args()
    if args.shard_size_gb <= 0:
        parser.error("--shard-size-gb must be positive")
    start = time.perf_counter()
    try:
        report = pack(args.data_path, args.out, int(args.shard_size_gb * 2 ** 30),
                      args.index_cache_dir)
    except DataError as e:
        exit_bad_input(e)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
