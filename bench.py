"""Benchmarks: training-step throughput and MFU, and frame-loading speed against LAQ's loader.

    python bench.py train --config FILE [--steps N] [--warmup W] [--batch-size B]
                          [--device cpu|cuda] [--rounds 3] [--set SECTION.KEY=VALUE ...]
    python bench.py data  --data-path DIR [--workers N] [--batches N] [--image-size 256]
                          [--batch-size 32] [--rounds 3] [--resize stretch|crop] [--quality 90]
                          [--device cpu|cuda] [--target-images-per-sec 18000]
    python bench.py index [--videos 22000] [--frames 45] [--rounds 3]
    python bench.py laq   --laq-repo DIR [--laq-config YAML] [--batch-size 4] [--batches 3]
                          [--rounds 3] [--device cpu|cuda]

Each prints one JSON line last. `train` times the training step of training.py on synthetic
batches already on the device (data loading excluded), and in the same run a plain fp32
eager loop of the same model for reference. `data` times, in one run, a loader that does what
LAQ's published one does and this project's DataLoader over the frames tree, over shards packed
from it byte for byte and over training-ready shards (pack_frames.py --image-size), and decoding
the training-ready JPEGs on --device; it prints frames/s per worker and the workers each path
needs for --target-images-per-sec. `index` times the frame index on a synthetic tree of empty
files (build, cache load) and measures what a DataLoader worker copies of it. `laq`
times LAQ's part of the comparison per pair: one inference pass (compare_with_laq's LaqRunner)
against the two passes of calling `inference` for the reconstruction and again for the codes.
Each alternates the two, `--rounds` times, and reports medians.
"""
import argparse
import json

from errors import run_main
from options import about


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=about(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="training-step throughput, FLOPs, MFU, memory")
    train.add_argument("--config", required=True)
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--warmup", type=int, default=5)
    train.add_argument("--batch-size", type=int, help="global batch (default: the config's)")
    train.add_argument("--device", choices=["cpu", "cuda"])
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--rounds", type=int, default=3,
                       help="alternating timings of each loop; medians are reported")
    data = sub.add_parser("data", help="frame loading: this project's loader vs LAQ's")
    data.add_argument("--data-path", required=True)
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--batches", type=int, default=20)
    data.add_argument("--image-size", type=int, default=256)
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--rounds", type=int, default=3,
                      help="alternating timings of each loader; medians are reported")
    data.add_argument("--index-cache-dir", default="")
    data.add_argument("--resize", choices=["crop", "stretch"], default="stretch")
    data.add_argument("--quality", type=int, default=90, help="of the training-ready shards")
    data.add_argument("--device", choices=["cpu", "cuda"],
                      help="where device_decode decodes (default: cuda when available)")
    data.add_argument("--target-images-per-sec", type=float, default=18000,
                      help="images/s to feed (default: one H100 at 35%% of its dense bf16 "
                           "peak on the 256 px VAE, 19.2 GFLOP per image)")
    data.add_argument("--pack-dir", default="", help="where the shards are written for the "
                                                     "run (default: the temp folder)")
    index = sub.add_parser("index", help="the frame index at SthV2 scale: build, cache load, "
                                         "worker memory")
    index.add_argument("--videos", type=int, default=22000)
    index.add_argument("--frames", type=int, default=45, help="empty frame files per video")
    index.add_argument("--rounds", type=int, default=3)
    index.add_argument("--root", default="", help="where the tree is made (default: temp)")
    laq = sub.add_parser("laq", help="LAQ per pair in the comparison: one pass vs two")
    laq.add_argument("--laq-repo", help="folder containing laq_model/ (LAPA's laq/)")
    laq.add_argument("--laq-config", help="YAML of LatentActionQuantization arguments "
                                          "(default: LAPA's SthV2 configuration)")
    laq.add_argument("--batch-size", type=int, default=4)
    laq.add_argument("--batches", type=int, default=3)
    laq.add_argument("--rounds", type=int, default=3)
    laq.add_argument("--device", choices=["cpu", "cuda"])
    return parser.parse_args(argv)


def main():
    args = parse_args()
    import benchmarks                    # torch and the project: after the command line is good
    result = {"train": benchmarks.bench_train, "data": benchmarks.bench_data,
              "laq": benchmarks.bench_laq, "index": benchmarks.bench_index}[args.command](args)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
