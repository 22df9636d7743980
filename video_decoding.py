"""Decoding a video file into RGB frames, and choosing the decoder by decoding.

torchcodec and PyAV both run FFmpeg's decoders and give the same pixels (tested). torchcodec
converts to RGB about twice as fast (BENCHMARKS.md) but needs FFmpeg's shared libraries on the
machine, and it loads them only when a decoder is built: that it imports says nothing. PyAV
bundles FFmpeg in its wheel. So a decoder counts as usable only once it has decoded a clip;
`choose_decoder` tries each candidate on one and says why a candidate was passed over.

Light to import (numpy and the standard library; the decoders are imported when used), so the
scripts that use it answer --help at once.
"""
import os
import re
import stat
import tempfile

import numpy as np

from errors import DataError
from files import what_it_is

CANDIDATES = ("torchcodec", "pyav")       # the order `auto` tries them in: fastest first
INSTALL = {"torchcodec": "pip install torchcodec==0.17.0 and FFmpeg 4-9's shared libraries "
                         "on the machine (the ffmpeg package)",
           "pyav": "pip install av==18.1.0 (FFmpeg is bundled in its wheel)"}


class VideoError(Exception):
    """A video that cannot be decoded (the message says why)."""


def error_reason(err):
    """The first meaningful line of an exception, for a one-line report: torchcodec's loading
    error is 60 lines, whose first names the problem and whose tracebacks name the libraries
    that were not found."""
    text = str(err).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.endswith(":") and ". " in first:          # "... libtorchcodec. Likely causes:"
        first = first[:first.rindex(". ") + 1]
    missing = sorted(set(re.findall(r"(lib[\w.+-]+?\.so[\w.]*): cannot open shared object",
                                    text)), key=_natural)
    if missing:
        first += f" (not found: {', '.join(missing)})"
    return f"{type(err).__name__}: {first}"[:300] if first else type(err).__name__


def _natural(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def require_av():
    try:
        import av
    except ImportError:
        raise DataError(f"decoding .webm videos needs PyAV: {INSTALL['pyav']}") from None
    return av


def regular_file(path):
    """Raise VideoError unless `path` is a regular file (after links): a FIFO named like a
    video would block the decoder's open forever, a device would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise VideoError(f"cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise VideoError(f"not a regular file ({what_it_is(mode)})")


def pick_frames(count, native_fps, fps):
    """Indices of the decoded frames to keep: all of them at the native rate, else frame k of
    the output is the decoded frame nearest to time k / fps."""
    if not fps or not native_fps or abs(native_fps - fps) < 1e-3:
        return list(range(count))
    n_out = max(1, int(np.floor(count * fps / native_fps + 1e-9)))
    return [min(count - 1, int(round(k * native_fps / fps))) for k in range(n_out)]


def decode_video(path, fps=None, decoder="pyav"):
    """The video's frames as uint8 RGB arrays (H, W, 3), resampled to `fps` if given, decoded
    by `decoder` ("pyav" or "torchcodec"). Raises VideoError."""
    regular_file(path)
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
        from torchcodec.decoders import VideoDecoder
    except ImportError:
        raise VideoError("torchcodec is not installed") from None
    try:
        decoder = VideoDecoder(path, num_ffmpeg_threads=1, dimension_order="NHWC")
        count = len(decoder)
        frames = decoder.get_frames_in_range(0, count).data.numpy() if count else []
    except (RuntimeError, ValueError, OSError) as e:
        text = str(e)
        if "libtorchcodec" in text:                      # FFmpeg's libraries did not load
            raise VideoError(error_reason(e)) from None
        # its decoding messages lead with source lines: the last line says what happened
        message = re.sub(r"^\w+, \S+, ", "", (text.strip().splitlines() or [""])[-1])
        message = message.replace(f" {path}", "").replace(path, "")
        if message.strip().endswith("End of file"):
            raise VideoError("no frames") from None
        raise VideoError(f"{type(e).__name__}: {message.strip()[:300]}") from None
    return frames, decoder.metadata.average_fps


def write_test_clip(path, frames=4, size=32):
    """A short VP9 .webm of moving colour, encoded by PyAV's bundled libvpx: a clip every
    decoder is tried on before it is trusted with a dataset."""
    av = require_av()
    y, x = np.mgrid[0:size, 0:size] / 6.0
    with av.open(path, "w", format="webm") as c:
        stream = c.add_stream("libvpx-vp9", rate=12)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            rgb = np.stack([128 + 90 * np.sin(x + t), 128 + 90 * np.cos(y - t),
                            np.full_like(x, 40 * t)], -1).astype(np.uint8)
            c.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        c.mux(stream.encode())


def decoder_status(samples=()):
    """{candidate: None if it decoded a clip, else why not}: each is tried on a clip made here
    (PyAV can encode one) or, without PyAV, on the first of `samples` it decodes."""
    status = {}
    with tempfile.TemporaryDirectory(prefix="decoder_check_") as tmp:
        clips = list(samples)[:3]
        try:
            clip = os.path.join(tmp, "check.webm")
            write_test_clip(clip)
            clips = [clip]
        except Exception:                       # no PyAV, or no encoder in it: the videos
            pass
        for name in CANDIDATES:
            status[name] = _try_decoder(name, clips)
    return status


def _try_decoder(name, clips):
    if name == "pyav":
        try:
            require_av()
        except DataError:
            return "PyAV is not installed"
    else:
        try:
            import torchcodec.decoders  # noqa: F401
        except ImportError:
            return "torchcodec is not installed"
        except (RuntimeError, OSError) as e:            # older torchcodec loads on import
            return error_reason(e)
    if not clips:
        return "no clip to try it on"
    reason = None
    for clip in clips:
        try:
            decode_video(clip, decoder=name)
            return None
        except VideoError as e:
            reason = str(e)
    return reason


def choose_decoder(name="auto", samples=()):
    """(decoder, {candidate passed over: why}): `auto` takes the first candidate that decodes
    a clip; a named one must decode it. Raises DataError when none can."""
    status = decoder_status(samples)
    wanted = CANDIDATES if name == "auto" else (name,)
    for candidate in wanted:
        if status[candidate] is None:
            return candidate, {c: status[c] for c in CANDIDATES[:CANDIDATES.index(candidate)]
                               if c in wanted}
    why = "; ".join(f"{c}: {status[c]} ({INSTALL[c]})" for c in wanted)
    raise DataError(f"no video decoder works on this machine: {why}" if name == "auto" else
                    f"--decoder {name} cannot decode a video here: {why}")
