"""From SthV2's official download (.webm clips and label JSONs) to what training reads, in one
command.

    python prepare_sthv2.py --videos DIR --labels DIR --out DIR --frames [--fps 12] [-j N]
    python prepare_sthv2.py --videos DIR --labels DIR --out DIR [--shards] \
        [--image-size 256 --resize stretch|crop] [--fps 12] [-j N]

--frames writes the frames tree the loader and LAQ's own code read: OUT/<video id>/img_00001.jpg
... at the native 12 fps unless --fps says otherwise. --shards writes, with no intermediate
files, the packed shards pack_frames.py writes (OUT/shard_*.bin + OUT/packed_index.npz): the
frames as --frames would store them, or with --image-size training-ready (resized as training
does). Either way the label JSONs are copied into OUT, so data_params.data_path: OUT trains.

Videos are decoded by FFmpeg's own decoders, through torchcodec or PyAV (the same pixels), one
video per worker task, at most a few videos per worker in memory; the decoder is the first that
decodes a test clip (video_decoding.py). A killed run (kill -9 included, of the main process
alone too: the workers end with it) resumes where it stopped when run again with the same
arguments and ends with the same output as an uninterrupted run: a video folder appears whole
(renamed from a temporary folder), a shard whole (with a record of its videos). A video that
cannot be decoded (truncated, not a video, no frames, not a regular file) is left out and named,
with the reason, in OUT/unreadable_videos.txt; when more than --max-unreadable of them fail, the
run fails and is not marked finished. A finished OUT holds prepare_sthv2.json (its settings and
decoder): the same command again is "already complete", other settings are refused.
"""
import argparse
import collections
import functools
import io
import json
import os
import shutil
import sys
import time
import zlib

import numpy as np
from PIL import Image

from errors import DataError, RunFailed, run_main
from files import atomic_dir, atomic_write, copy_atomic, remove_stale_temps
from frame_index import FrameIndex, PACKED_INDEX, natural_key
from labels import LABEL_FILES
from options import about
from output_folder import OutputFolder
from parallel import ordered_map, process_pool, progress
from video_decoding import VideoError, choose_decoder, decode_video

STATE = ".prepare_sthv2"                 # resume records; the index skips dot-folders
RECORD = "prepare_sthv2.json"            # written last: the output is finished
FRAME_PATTERN = ("img_", 5, ".jpg")
UNREADABLE = "unreadable_videos.txt"
VIDEO_EXTENSIONS = (".webm", ".mp4")
MAX_UNREADABLE = 0.05     # SthV2: a handful of broken clips in 220,847; a bad decoder fails all


def list_videos(folder):
    """{video id: path} of the .webm (and .mp4) entries in `folder`, in natural id order (entries
    that are not regular files are kept: they are reported unreadable, never opened). Two
    files for one id are an error naming both."""
    if not os.path.isdir(folder):
        raise DataError(f"--videos {folder} is not a folder")
    found = {}
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.lower().endswith(VIDEO_EXTENSIONS) or e.name.startswith("."):
                continue
            vid = os.path.splitext(e.name)[0]
            if vid in found:
                first, second = sorted([found[vid], e.path])
                raise DataError(f"two files for video {vid}: {first} and {second}; keep one")
            found[vid] = e.path
    if not found:
        raise DataError(f"no .webm videos in {folder} (SthV2's download unpacks to "
                        f"20bn-something-something-v2/<id>.webm)")
    return {vid: found[vid] for vid in sorted(found, key=natural_key)}


def check_names(videos):
    """In the frames tree each video is a folder of OUT: none may take an output file's name."""
    taken = set(LABEL_FILES.values()) | {UNREADABLE, RECORD}
    clash = sorted(vid for vid in videos if vid in taken)
    if clash:
        raise DataError(f"video {videos[clash[0]]} would be written over the output file "
                        f"{clash[0]} in --frames mode; rename or remove it")


def encode_jpeg(rgb, quality, image_size=0, resize="crop"):
    """JPEG bytes of an (H, W, 3) uint8 frame, resized as training resizes (with
    image_size, as frame_files.resize_frame) and stored 4:4:4, as pack_frames.py does."""
    if image_size:
        import torch

        from frame_files import resize_frame
        rgb = resize_frame(torch.from_numpy(rgb).permute(2, 0, 1), image_size, resize)
        rgb = rgb.permute(1, 2, 0).numpy()
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def video_jpegs(vid, path, fps, quality, image_size, resize, decoder):
    """(vid, [JPEG bytes per frame] or None, reason or None), for a worker."""
    try:
        frames = decode_video(path, fps, decoder)
    except VideoError as e:
        return vid, None, str(e)
    return vid, [encode_jpeg(f, quality, image_size, resize) for f in frames], None


def write_frames(vid, path, out, fps, quality, decoder):
    """Decode one video into OUT/<vid>/img_00001.jpg ...: written into a temporary folder and
    renamed, so the folder appears whole. Returns (vid, frames written, reason or None)."""
    vid, jpegs, reason = video_jpegs(vid, path, fps, quality, 0, "crop", decoder)
    if jpegs is None:
        return vid, 0, reason
    prefix, width, ext = FRAME_PATTERN
    with atomic_dir(os.path.join(out, vid)) as folder:
        for k, data in enumerate(jpegs, start=1):
            with open(os.path.join(folder, f"{prefix}{k:0{width}d}{ext}"), "wb") as f:
                f.write(data)
    return vid, len(jpegs), None


class Progress:
    """The bar over videos with frames per second; totals for the summary."""

    def __init__(self, total, done):
        self.bar = progress(total=total, initial=done, unit="video", desc="videos")
        self.frames, self.videos, self.start = 0, 0, time.perf_counter()

    def update(self, frames):
        self.frames += frames
        self.videos += 1
        self.bar.update(1)
        self.bar.set_postfix(frames_per_s=f"{self.frames / self.elapsed():.0f}", refresh=False)

    def elapsed(self):
        return max(time.perf_counter() - self.start, 1e-9)

    def close(self):
        self.bar.close()


def prepare_frames(videos, out, fps, quality, pool, ahead, decoder):
    done = {vid for vid in videos if os.path.isdir(os.path.join(out, vid))}
    todo = [(vid, path) for vid, path in videos.items() if vid not in done]
    unreadable, bar = {}, Progress(len(videos), len(done))
    work = functools.partial(write_frames, out=out, fps=fps, quality=quality, decoder=decoder)
    for vid, frames, reason in ordered_map(pool, work, todo, ahead):
        if reason:
            unreadable[vid] = reason
        bar.update(frames)
    bar.close()
    return {"videos_done_before": len(done), "videos_written": len(todo) - len(unreadable),
            "frames_written": bar.frames}, unreadable, bar


def prepare_shards(videos, out, fps, quality, pool, ahead, shard_size, image_size, resize,
                   decoder):
    """Shards of whole videos in id order; each finished shard is recorded in OUT/STATE, so a
    rerun continues after the last recorded video, and decodes again the videos recorded as
    unreadable (a rerun with a working decoder gets them). The index is written last."""
    shards = shard_records(out)
    done = {vid for s in shards for vid in s["frames"]}
    todo = [(vid, path) for vid, path in videos.items() if vid not in done]
    bar = Progress(len(videos), len(done))
    work = functools.partial(video_jpegs, fps=fps, quality=quality, image_size=image_size,
                             resize=resize, decoder=decoder)
    results = ordered_map(pool, work, todo, ahead)
    pending, last_unreadable = next(results, None), {}
    while pending is not None:                        # one shard of whole videos per round
        record = {"name": f"shard_{len(shards):05d}.bin", "frames": {}, "crc32": {},
                  "unreadable": {}}
        with atomic_write(os.path.join(out, record["name"])) as f:
            written = 0
            while pending is not None and written < shard_size:
                vid, jpegs, reason = pending
                if reason:
                    record["unreadable"][vid] = reason
                else:
                    for data in jpegs:
                        f.write(data)
                    record["frames"][vid] = [len(data) for data in jpegs]
                    record["crc32"][vid] = [zlib.crc32(data) for data in jpegs]
                    written += sum(record["frames"][vid])
                bar.update(0 if reason else len(jpegs))
                pending = next(results, None)
        if not record["frames"]:          # the last videos, all unreadable: no shard, no record
            os.remove(os.path.join(out, record["name"]))
            last_unreadable = record["unreadable"]
            continue
        with atomic_write(os.path.join(out, STATE, record["name"] + ".json"), "w") as f:
            json.dump(record, f)
        shards.append(record)
    bar.close()
    write_packed_index(out, shards, videos, fps, image_size, resize, quality)
    framed = {vid for s in shards for vid in s["frames"]}
    unreadable = {vid: reason for s in shards for vid, reason in s["unreadable"].items()
                  if vid not in framed}
    unreadable.update(last_unreadable)
    frames = sum(len(lengths) for s in shards for lengths in s["frames"].values())
    return {"videos_done_before": len(done), "shards": len(shards), "frames": frames,
            "frames_written": bar.frames}, unreadable, bar


def shard_records(out):
    """The records of the shards written so far, each checked against its shard."""
    state = os.path.join(out, STATE)
    shards = []
    for name in sorted(n for n in os.listdir(state) if n.startswith("shard_")):
        with open(os.path.join(state, name)) as f:
            shards.append(json.load(f))
    for k, s in enumerate(shards):                    # a record is written after its shard
        path = os.path.join(out, f"shard_{k:05d}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if s["name"] != os.path.basename(path) or size != sum(
                sum(lengths) for lengths in s["frames"].values()):
            raise DataError(f"{path} is missing or does not match its record in {state}; "
                            f"remove {out} and start again")
    return shards


def write_packed_index(out, shards, videos, fps, image_size, resize, quality):
    """OUT/packed_index.npz in pack_frames.py's format: videos in id order, frames numbered
    from 1, each frame's shard, offset, length and CRC-32 (where every shard record has
    them: a run resumed from records written before CRCs were kept has none)."""
    order, counts, shard, start, length, crc32 = [], [], [], [], [], []
    checked = all("crc32" in s for s in shards)
    for k, s in enumerate(shards):
        offset = 0
        for vid, lengths in s["frames"].items():
            order.append(vid)
            counts.append(len(lengths))
            crc32 += s["crc32"][vid] if checked else []
            for n in lengths:
                shard.append(k)
                start.append(offset)
                length.append(n)
                offset += n
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    numbers = np.concatenate([np.arange(1, c + 1) for c in counts]) if counts else \
        np.zeros(0, np.int64)
    index = FrameIndex(os.path.abspath(out), order, [FRAME_PATTERN] * len(order),
                       numbers.astype(np.int64), offsets, {}, [])
    prepared = ({"image_size": image_size, "resize": resize, "quality": quality}
                if image_size else None)
    index.save(os.path.join(out, PACKED_INDEX),
               {"source_root": os.path.abspath(os.path.dirname(next(iter(videos.values())))),
                "shards": [s["name"] for s in shards], "prepared": prepared,
                "decoded_at_fps": fps},
               shard=np.asarray(shard, np.int32), start=np.asarray(start, np.int64),
               length=np.asarray(length, np.int64),
               **({"crc32": np.asarray(crc32, np.uint32)} if checked else {}))


def check_labels(labels):
    missing = [n for n in LABEL_FILES.values() if not os.path.isfile(os.path.join(labels, n))]
    if missing:
        raise DataError(f"--labels {labels} lacks {', '.join(missing)} (SthV2's label "
                        f"download)")


def copy_labels(labels, out):
    for name in LABEL_FILES.values():
        copy_atomic(os.path.join(labels, name), os.path.join(out, name))


def check_unreadable(out, unreadable, total, bound, decoder):
    """Fail the run, leaving it unfinished for a rerun to continue, when more than `bound` of
    the videos could not be decoded: a decoder that cannot decode these, not a few bad clips."""
    if len(unreadable) > bound * total:
        reason, count = collections.Counter(unreadable.values()).most_common(1)[0]
        raise RunFailed(f"{len(unreadable)} of {total} videos could not be decoded by {decoder}, "
                        f"more than --max-unreadable {bound:g} of them (the commonest reason, "
                        f"{count} videos: {reason}); {out} is not marked finished: see "
                        f"{os.path.join(out, UNREADABLE)}, mend the cause and run the same "
                        f"command again to continue")


def prepare(videos_dir, labels, out, mode, fps=12.0, quality=None, workers=1, image_size=0,
            resize="crop", shard_size=2 ** 31, decoder="auto", max_unreadable=MAX_UNREADABLE):
    """Decode every video of videos_dir into OUT (mode "frames" or "shards"); returns the
    summary. Resumes a killed run into the same OUT; a finished OUT with the same settings is
    left as it is."""
    videos = list_videos(videos_dir)
    check_labels(labels)
    if mode == "frames":
        check_names(videos)
    quality = quality or (90 if image_size else 95)
    settings = {"mode": mode, "videos": os.path.abspath(videos_dir), "fps": fps,
                "quality": quality}                   # what the output depends on
    if mode == "shards":
        settings.update(image_size=image_size, resize=resize, shard_size=shard_size)
    folder = OutputFolder(out, STATE, RECORD, "prepare_sthv2.py")
    finished = folder.finished_with(settings, "prepared")
    if finished is not None:
        return {**finished, "unreadable_file": os.path.join(out, UNREADABLE),
                "already_complete": True}
    if os.path.isfile(os.path.join(out, PACKED_INDEX)) and \
            not os.path.isdir(os.path.join(out, STATE)):
        raise DataError(f"{out} already holds a finished packed index; use another --out")
    with folder.lock() as held:                       # released however this ends
        remove_stale_temps(out)                       # a killed run's half-written output
        folder.keep_settings(settings)
        if mode == "shards":
            shard_records(out)                        # checked before anything is decoded
        decoder, passed_over = choose_decoder(decoder, list(videos.values()))
        print(f"decoding with {decoder}" + "".join(f"; {name} passed over: {why}"
                                                  for name, why in passed_over.items()),
              file=sys.stderr)
        with process_pool(workers, close_fds=[held.fileno()]) as pool:
            if mode == "frames":
                summary, unreadable, bar = prepare_frames(videos, out, fps, quality, pool,
                                                          4 * workers, decoder)
            else:
                summary, unreadable, bar = prepare_shards(
                    videos, out, fps, quality, pool, 4 * workers, shard_size, image_size,
                    resize, decoder)
        copy_labels(labels, out)
        with atomic_write(os.path.join(out, UNREADABLE), "w") as f:
            f.writelines(f"{vid}\t{unreadable[vid]}\n"
                         for vid in sorted(unreadable, key=natural_key))
        check_unreadable(out, unreadable, len(videos), max_unreadable, decoder)
        record = {"settings": settings, "decoder": decoder, "passed_over": passed_over,
                  "videos": len(videos), "unreadable": len(unreadable)}
        folder.finish(record)
        shutil.rmtree(os.path.join(out, STATE))       # finished: nothing left to resume
    seconds = bar.elapsed()
    return {**record, "unreadable_file": os.path.join(out, UNREADABLE), "mode": mode, **summary,
            "seconds": round(seconds, 1), "videos_per_sec": round(bar.videos / seconds, 2),
            "frames_per_sec": round(bar.frames / seconds, 1), "workers": workers,
            "fps": fps, "quality": quality,
            **({"image_size": image_size, "resize": resize} if image_size else {})}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=about(__doc__))
    parser.add_argument("--videos", required=True, help="folder of SthV2's <id>.webm files")
    parser.add_argument("--labels", required=True,
                        help="folder with something-something-v2-{train,validation}.json")
    parser.add_argument("--out", required=True)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--frames", action="store_const", const="frames", dest="mode",
                      help="write OUT/<id>/img_00001.jpg ... (the frames tree)")
    mode.add_argument("--shards", action="store_const", const="shards", dest="mode",
                      help="write packed shards (pack_frames.py's format; the default: a few "
                           "large files instead of millions of small ones)")
    parser.set_defaults(mode="shards")
    parser.add_argument("--fps", type=float, default=12.0,
                        help="frames per second kept (SthV2's native rate: 12)")
    parser.add_argument("--image-size", type=int, default=0,
                        help="with --shards: training-ready frames of this size")
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="with --image-size: as data_params.resize")
    parser.add_argument("--quality", type=int,
                        help="JPEG quality (default 95; 90 for training-ready shards)")
    parser.add_argument("--shard-size-gb", type=float, default=2.0)
    parser.add_argument("--decoder", choices=["auto", "pyav", "torchcodec"], default="auto",
                        help="auto: the first of torchcodec (needs FFmpeg's libraries; about "
                             "twice as fast) and PyAV that decodes a test clip; both give the "
                             "same frames")
    parser.add_argument("--max-unreadable", type=float, default=MAX_UNREADABLE,
                        help="fail (exit 1, nothing marked finished) when more than this share "
                             f"of the videos cannot be decoded (default {MAX_UNREADABLE})")
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count(),
                        help="decoding processes")
    args = parser.parse_args(argv)
    if args.fps <= 0 or args.workers < 1 or args.image_size < 0 or args.shard_size_gb <= 0 \
            or (args.quality is not None and not 1 <= args.quality <= 100) \
            or not 0 <= args.max_unreadable <= 1:
        parser.error("--fps, -j and --shard-size-gb must be positive, --image-size >= 0, "
                     "--quality in 1..100, --max-unreadable in 0..1")
    if args.image_size and args.mode != "shards":
        parser.error("--image-size applies to --shards (training-ready); the frames tree keeps "
                     "the frames at their size")
    return args


def main():
    args = parse_args()
    summary = prepare(args.videos, args.labels, args.out, args.mode, args.fps, args.quality,
                      args.workers, args.image_size, args.resize,
                      int(args.shard_size_gb * 2 ** 30), args.decoder, args.max_unreadable)
    if summary["unreadable"] and not summary.get("already_complete"):
        print(f"{summary['unreadable']} videos could not be decoded and were left out; "
              f"see {summary['unreadable_file']}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
