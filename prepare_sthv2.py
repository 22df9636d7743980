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

Videos are decoded by FFmpeg's own decoders through torchcodec where it loads (it needs FFmpeg
installed; about twice as fast) or PyAV (pinned; FFmpeg bundled in its wheel), which give the
same pixels, one video per worker task, at most a few videos per worker in memory. A killed run (kill -9 included)
resumes where it stopped when run again with the same arguments and ends with the same output
as an uninterrupted run: a video folder appears whole (renamed from a temporary folder), a shard
whole (with a record of its videos). A video that cannot be decoded (truncated, not a video, no
frames) is left out and named, with the reason, in OUT/unreadable_videos.txt and the summary.
"""
import argparse
import fcntl
import functools
import io
import json
import os
import re
import shutil
import sys
import time
import zlib

import numpy as np
from PIL import Image

from errors import DataError, run_main
from files import atomic_dir, atomic_write, copy_atomic, remove_stale_temps
from frame_index import FrameIndex, PACKED_INDEX, natural_key
from labels import LABEL_FILES
from parallel import ordered_map, process_pool, progress

STATE = ".prepare_sthv2"                 # resume records; the index skips dot-folders
FRAME_PATTERN = ("img_", 5, ".jpg")
UNREADABLE = "unreadable_videos.txt"
VIDEO_EXTENSIONS = (".webm", ".mp4")


class VideoError(Exception):
    """A video that cannot be decoded (the message says why)."""


def require_av():
    try:
        import av
    except ImportError:
        raise DataError("decoding .webm videos needs PyAV: pip install av==18.1.0") from None
    return av


def torchcodec_decoder():
    """torchcodec's VideoDecoder where it loads (it needs FFmpeg's shared libraries on the
    machine), else None."""
    try:
        from torchcodec.decoders import VideoDecoder
        return VideoDecoder
    except (ImportError, RuntimeError, OSError):
        return None


def pick_decoder(name="auto"):
    """"torchcodec" or "pyav": both run FFmpeg's decoders and give the same pixels (tested);
    torchcodec converts to RGB about twice as fast (BENCHMARKS.md) but needs FFmpeg installed,
    PyAV bundles it. auto: torchcodec where it loads."""
    if name in ("auto", "torchcodec") and torchcodec_decoder() is not None:
        return "torchcodec"
    if name == "torchcodec":
        raise DataError("--decoder torchcodec: torchcodec is not installed or cannot load "
                        "FFmpeg's libraries (pip install torchcodec, and FFmpeg 4-7 on the "
                        "machine); --decoder pyav needs neither")
    require_av()
    return "pyav"


def list_videos(folder):
    """{video id: path} of the .webm (and .mp4) files in `folder`, in natural id order."""
    if not os.path.isdir(folder):
        raise DataError(f"--videos {folder} is not a folder")
    with os.scandir(folder) as it:
        found = {os.path.splitext(e.name)[0]: e.path for e in it
                 if e.name.lower().endswith(VIDEO_EXTENSIONS) and not e.name.startswith(".")}
    if not found:
        raise DataError(f"no .webm videos in {folder} (SthV2's download unpacks to "
                        f"20bn-something-something-v2/<id>.webm)")
    return {vid: found[vid] for vid in sorted(found, key=natural_key)}


def pick_frames(count, native_fps, fps):
    """Indices of the decoded frames to keep: all of them at the native rate, else frame k of
    the output is the decoded frame nearest to time k / fps."""
    if not fps or not native_fps or abs(native_fps - fps) < 1e-3:
        return list(range(count))
    n_out = max(1, int(np.floor(count * fps / native_fps + 1e-9)))
    return [min(count - 1, int(round(k * native_fps / fps))) for k in range(n_out)]


def decode_video(path, fps=None, decoder="pyav"):
    """The video's frames as uint8 RGB arrays (H, W, 3), resampled to `fps` if given, decoded
    by `decoder` (pick_decoder). Raises VideoError."""
    frames, rate = (_torchcodec_frames if decoder == "torchcodec" else _pyav_frames)(path)
    if not len(frames):
        raise VideoError("no frames")
    return [frames[i] for i in pick_frames(len(frames), rate, fps)]


def _pyav_frames(path):
    av = require_av()
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1           # one process per core already
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        message = str(e).splitlines()[0].replace(f": '{path}'", "") if str(e) else ""
        reason = f"{type(e).__name__}: {message}"
        if frames:
            raise VideoError(f"truncated after {len(frames)} frames ({reason})") from None
        if isinstance(e, av.error.EOFError):
            raise VideoError("no frames") from None
        raise VideoError(reason) from None
    return frames, float(rate) if rate else None


def _torchcodec_frames(path):
    try:
        decoder = torchcodec_decoder()(path, num_ffmpeg_threads=1, dimension_order="NHWC")
        count = len(decoder)
        frames = decoder.get_frames_in_range(0, count).data.numpy() if count else []
    except (RuntimeError, ValueError, OSError) as e:   # its messages lead with source lines
        message = re.sub(r"^\w+, \S+, ", "", (str(e).strip().splitlines() or [""])[-1])
        message = message.replace(f" {path}", "").replace(path, "")
        if message.strip().endswith("End of file"):
            raise VideoError("no frames") from None
        raise VideoError(f"{type(e).__name__}: {message.strip()[:300]}") from None
    return frames, decoder.metadata.average_fps


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


def prepare_frames(videos, out, fps, quality, workers, decoder):
    done = {vid for vid in videos if os.path.isdir(os.path.join(out, vid))}
    todo = [(vid, path) for vid, path in videos.items() if vid not in done]
    unreadable, bar = {}, Progress(len(videos), len(done))
    work = functools.partial(write_frames, out=out, fps=fps, quality=quality, decoder=decoder)
    with process_pool(workers) as pool:
        for vid, frames, reason in ordered_map(pool, work, todo, 4 * workers):
            if reason:
                unreadable[vid] = reason
            bar.update(frames)
    bar.close()
    return {"videos_done_before": len(done), "videos_written": len(todo) - len(unreadable),
            "frames_written": bar.frames}, unreadable, bar


def prepare_shards(videos, out, fps, quality, workers, shard_size, image_size, resize,
                   decoder):
    """Shards of whole videos in id order; each finished shard is recorded in OUT/STATE, so a
    rerun continues after the last recorded video. The index is written last."""
    state = os.path.join(out, STATE)
    records = sorted(n for n in os.listdir(state) if n.startswith("shard_"))
    shards = []
    for name in records:
        with open(os.path.join(state, name)) as f:
            shards.append(json.load(f))
    done = {vid for s in shards for vid in list(s["frames"]) + list(s["unreadable"])}
    for k, s in enumerate(shards):                    # a record is written after its shard
        path = os.path.join(out, f"shard_{k:05d}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if s["name"] != os.path.basename(path) or size != sum(
                sum(lengths) for lengths in s["frames"].values()):
            raise DataError(f"{path} is missing or does not match its record in {state}; "
                            f"remove {out} and start again")
    todo = [(vid, path) for vid, path in videos.items() if vid not in done]
    bar = Progress(len(videos), len(done))
    work = functools.partial(video_jpegs, fps=fps, quality=quality, image_size=image_size,
                             resize=resize, decoder=decoder)
    with process_pool(workers) as pool:
        results = ordered_map(pool, work, todo, 4 * workers)
        pending = next(results, None)
        while pending is not None:                    # one shard of whole videos per round
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
            with atomic_write(os.path.join(state, record["name"] + ".json"), "w") as f:
                json.dump(record, f)
            shards.append(record)
    bar.close()
    write_packed_index(out, shards, videos, fps, image_size, resize, quality)
    unreadable = {vid: reason for s in shards for vid, reason in s["unreadable"].items()}
    frames = sum(len(lengths) for s in shards for lengths in s["frames"].values())
    return {"videos_done_before": len(done), "shards": len(shards), "frames": frames,
            "frames_written": bar.frames}, unreadable, bar


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


def check_settings(out, settings):
    """One OUT, one set of settings: a rerun with others would mix two outputs."""
    path = os.path.join(out, STATE, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise DataError(f"{out} was started with other settings ({what}): rerun with the "
                            f"same ones to resume, or use another --out")
    else:
        with atomic_write(path, "w") as f:
            json.dump(settings, f)


def lock(out):
    handle = open(os.path.join(out, STATE, "lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"another prepare_sthv2.py is writing {out}") from None
    return handle


def check_labels(labels):
    missing = [n for n in LABEL_FILES.values() if not os.path.isfile(os.path.join(labels, n))]
    if missing:
        raise DataError(f"--labels {labels} lacks {', '.join(missing)} (SthV2's label "
                        f"download)")


def copy_labels(labels, out):
    for name in LABEL_FILES.values():
        copy_atomic(os.path.join(labels, name), os.path.join(out, name))


def prepare(videos_dir, labels, out, mode, fps=12.0, quality=None, workers=1, image_size=0,
            resize="crop", shard_size=2 ** 31, decoder="auto"):
    """Decode every video of videos_dir into OUT (mode "frames" or "shards"); returns the
    summary. Resumes a killed run into the same OUT."""
    decoder = pick_decoder(decoder)
    videos = list_videos(videos_dir)
    check_labels(labels)
    quality = quality or (90 if image_size else 95)
    if os.path.isfile(os.path.join(out, PACKED_INDEX)) and \
            not os.path.isdir(os.path.join(out, STATE)):
        raise DataError(f"{out} already holds a finished packed index; use another --out")
    os.makedirs(os.path.join(out, STATE), exist_ok=True)
    held = lock(out)
    remove_stale_temps(out)                           # a killed run's half-written output
    check_settings(out, {"mode": mode, "videos": os.path.abspath(videos_dir), "fps": fps,
                         "quality": quality, "image_size": image_size, "resize": resize,
                         "shard_size": shard_size})
    if mode == "frames":
        summary, unreadable, bar = prepare_frames(videos, out, fps, quality, workers, decoder)
    else:
        summary, unreadable, bar = prepare_shards(videos, out, fps, quality, workers,
                                                  shard_size, image_size, resize, decoder)
    copy_labels(labels, out)
    with atomic_write(os.path.join(out, UNREADABLE), "w") as f:
        f.writelines(f"{vid}\t{unreadable[vid]}\n" for vid in sorted(unreadable, key=natural_key))
    held.close()
    shutil.rmtree(os.path.join(out, STATE))           # finished: nothing left to resume
    seconds = bar.elapsed()
    return {"mode": mode, "videos": len(videos), "unreadable": len(unreadable),
            "unreadable_file": os.path.join(out, UNREADABLE), **summary,
            "seconds": round(seconds, 1), "videos_per_sec": round(bar.videos / seconds, 2),
            "frames_per_sec": round(bar.frames / seconds, 1), "workers": workers,
            "decoder": decoder,
            "fps": fps, "quality": quality,
            **({"image_size": image_size, "resize": resize} if image_size else {})}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
                        help="auto: torchcodec where it loads (needs FFmpeg installed; about "
                             "twice as fast), else PyAV; both give the same frames")
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count(),
                        help="decoding processes")
    args = parser.parse_args()
    if args.fps <= 0 or args.workers < 1 or args.image_size < 0 or args.shard_size_gb <= 0 \
            or (args.quality is not None and not 1 <= args.quality <= 100):
        parser.error("--fps, -j and --shard-size-gb must be positive, --image-size >= 0, "
                     "--quality in 1..100")
    if args.image_size and args.mode != "shards":
        parser.error("--image-size applies to --shards (training-ready); the frames tree keeps "
                     "the frames at their size")
    summary = prepare(args.videos, args.labels, args.out, args.mode, args.fps, args.quality,
                      args.workers, args.image_size, args.resize,
                      int(args.shard_size_gb * 2 ** 30), args.decoder)
    if summary["unreadable"]:
        print(f"{summary['unreadable']} videos could not be decoded and were left out; "
              f"see {summary['unreadable_file']}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
