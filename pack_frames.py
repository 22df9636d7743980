"""Pack a SthV2 frames tree into a few large shard files for parallel filesystems.

    python pack_frames.py --data-path data/sthv2/frames --out data/sthv2/packed [--shard-size-gb 2]
    python pack_frames.py --data-path data/sthv2/frames --out data/sthv2/packed_256 \
        --image-size 256 [--resize stretch|crop] [--quality 90] [-j 16]

Writes OUT/shard_00000.bin, ... (the frames' JPEG bytes back to back, in index order, so an
epoch reads each shard sequentially) and OUT/packed_index.npz (videos, frame numbers, shard,
offset, length and CRC-32 of every frame, checked on every read). The SthV2 label JSONs are
copied along. Point data_params.data_path at OUT: the dataset, splits and frame pairs work the
same way, and a job opens tens of files instead of millions.

OUT must not hold a packed index already (an index and its shards change together: pack into a
new folder and point data_params.data_path at it). On a full disk the shards written so far
are removed, so no shards are left without their index.

Without --image-size every frame is copied byte for byte. With it the shards are training-ready:
each frame is decoded, resized as training does (frame_files.resize_frame) and stored as a
JPEG of that size, so a loader worker only decodes a small JPEG and never resizes; a config
whose image_size or resize differs is refused. A frame that cannot be decoded is stored empty
and reported, by its original name, when training reads it.
"""
import argparse
import json
import os
import time

from errors import run_main
from options import about
from packing import pack


def main():
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--data-path", required=True, help="frames tree (<video_id>/img_*.jpg)")
    parser.add_argument("--out", required=True, help="folder for the shards and the index")
    parser.add_argument("--shard-size-gb", type=float, default=2.0)
    parser.add_argument("--index-cache-dir", default="")
    parser.add_argument("--image-size", type=int, default=0,
                        help="store frames resized to this size (training-ready shards); "
                             "0 = copy the original bytes")
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="with --image-size: as data_params.resize")
    parser.add_argument("--quality", type=int, default=90, help="with --image-size: JPEG quality")
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count(),
                        help="with --image-size: processes that decode, resize and encode")
    args = parser.parse_args()
    if args.shard_size_gb <= 0:
        parser.error("--shard-size-gb must be positive")
    if args.image_size < 0 or not 1 <= args.quality <= 100 or args.workers < 1:
        parser.error("--image-size must be >= 0, --quality in 1..100, -j >= 1")
    start = time.perf_counter()
    report = pack(args.data_path, args.out, int(args.shard_size_gb * 2 ** 30),
                  args.index_cache_dir, args.image_size, args.resize, args.quality, args.workers)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    run_main(main)
