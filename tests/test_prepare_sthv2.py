"""prepare_sthv2.py: SthV2's download (.webm clips) to a frames tree or shards, decoded as
FFmpeg decodes them, resumable after kill -9 with identical output, unreadable videos named."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HANG_GUARD, ROOT, run_in_process, tiny_config

av = pytest.importorskip("av", reason="PyAV (requirements.txt) decodes the .webm videos")

from errors import run_main  # noqa: E402
from frame_index import PACKED_INDEX, FrameIndex, load_index  # noqa: E402
from make_demo_data import WEBM_VIDEOS, make_demo_data  # noqa: E402
import prepare_sthv2 as prep  # noqa: E402
import video_decoding  # noqa: E402
from video_decoding import VideoError, decode_video, pick_frames  # noqa: E402

# Whether each decoder decodes a clip on this machine (importing proves nothing: torchcodec
# loads FFmpeg's libraries only when it decodes); a test that needs one skips with the reason.
DECODER_STATUS = video_decoding.decoder_status()
BROKEN_OK = 0.2     # the download below has 3 broken videos of 27, as a test set may


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """24 demo videos of 24 frames as SthV2's download holds them, plus three broken ones."""
    root = str(tmp_path_factory.mktemp("download"))
    make_demo_data(root, videos=24, frames=24, seed=5, video_format="webm")
    videos = os.path.join(root, WEBM_VIDEOS)
    good = open(os.path.join(videos, "1003.webm"), "rb").read()
    with open(os.path.join(videos, "9001.webm"), "wb") as f:        # cut off half way
        f.write(good[:len(good) // 2])
    with open(os.path.join(videos, "9002.webm"), "w") as f:         # not a video at all
        f.write("<html>404 not found</html>")
    with open(os.path.join(videos, "9003.webm"), "wb") as f:        # headers, no frames:
        f.write(good[:good.index(b"\x1f\x43\xb6\x75")])           # cut at the first Cluster
    return {"videos": videos, "labels": os.path.join(root, "labels")}


def encode_clip(path, frames, fps=12):
    with av.open(path, "w", format="webm") as c:
        stream = c.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"crf": "4", "b:v": "0", "deadline": "good"}
        for f in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(stream.encode())


def smooth_frames(n, h=96, w=128):
    """Moving colour waves: smooth enough that VP9 at crf 4 keeps them above 30 dB."""
    y, x = np.mgrid[0:h, 0:w] / 16.0
    return [np.stack([128 + 90 * np.sin(x + 0.3 * t), 128 + 90 * np.cos(y - 0.2 * t),
                      128 + 90 * np.sin(x + y + 0.1 * t)], -1).astype(np.uint8)
            for t in range(n)]


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


NO_TORCHCODEC = pytest.mark.skipif(
    DECODER_STATUS["torchcodec"] is not None,
    reason=f"torchcodec cannot decode: {DECODER_STATUS['torchcodec']}")
DECODERS = ["pyav", pytest.param("torchcodec", marks=NO_TORCHCODEC)]


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoding_gives_every_frame_the_encoder_wrote(tmp_path, decoder):
    source = smooth_frames(17)
    encode_clip(str(tmp_path / "clip.webm"), source)
    frames = decode_video(str(tmp_path / "clip.webm"), decoder=decoder)
    assert len(frames) == 17 and frames[0].shape == (96, 128, 3)
    assert min(psnr(a, b) for a, b in zip(frames, source)) > 30          # VP9 at crf 4
    halved = decode_video(str(tmp_path / "clip.webm"), fps=6, decoder=decoder)
    assert len(halved) == 8 and all(np.array_equal(a, b) for a, b in zip(halved, frames[::2]))
    assert pick_frames(24, 12.0, 12.0) == list(range(24))
    with pytest.raises(VideoError):
        (tmp_path / "bad.webm").write_text("not a video")
        decode_video(str(tmp_path / "bad.webm"), decoder=decoder)


@NO_TORCHCODEC
def test_both_decoders_give_the_same_pixels(download):
    for vid in ("1000", "1007"):
        path = os.path.join(download["videos"], f"{vid}.webm")
        a, b = decode_video(path, decoder="pyav"), decode_video(path, decoder="torchcodec")
        assert len(a) == len(b) == 24 and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(shutil.which("ffmpeg") is None,
                    reason="no ffmpeg binary on this machine to compare with")
def test_frames_match_ffmpegs_own_extraction(tmp_path):
    encode_clip(str(tmp_path / "clip.webm"), smooth_frames(15))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "clip.webm"),
                    "-q:v", "2", str(tmp_path / "img_%05d.jpg")], check=True)
    ours = decode_video(str(tmp_path / "clip.webm"))
    theirs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".jpg"))
    assert len(theirs) == len(ours)
    for frame, name in zip(ours, theirs):
        assert psnr(frame, read_rgb(tmp_path / name)) > 30              # JPEG tolerance


def run_prepare(download, out, *args):
    return run_in_process("prepare_sthv2.py", "--videos", download["videos"], "--labels",
                          download["labels"], "--out", str(out), "--max-unreadable",
                          str(BROKEN_OK), *args)


@pytest.mark.slow
def test_frames_tree_names_unreadable_videos_and_trains_like_extracted_frames(download, tmp_path):
    result = run_prepare(download, tmp_path / "tree", "--frames", "-j", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["videos"] == 27 and summary["unreadable"] == 3
    assert summary["frames_written"] == 24 * 24 and summary["frames_per_sec"] > 0
    assert "3 videos could not be decoded" in result.stderr
    lines = (tmp_path / "tree" / "unreadable_videos.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["9001", "9002", "9003"]
    assert lines[2].endswith("no frames")
    index = load_index(str(tmp_path / "tree"), str(tmp_path / "cache"))
    assert len(index.videos) == 24 and len(index) == 24 * 24
    assert sorted(os.listdir(tmp_path / "tree" / "1000"))[:2] == ["img_00001.jpg", "img_00002.jpg"]
    decoded = decode_video(os.path.join(download["videos"], "1000.webm"))
    stored = read_rgb(tmp_path / "tree" / "1000" / "img_00005.jpg")
    assert psnr(stored, decoded[4]) > 38                                 # JPEG q95
    for name in ("something-something-v2-train.json", "something-something-v2-validation.json"):
        assert filecmp.cmp(tmp_path / "tree" / name, os.path.join(download["labels"], name))

    # the same frames, packed: --shards without --image-size == --frames + pack_frames.py
    from packing import pack
    prep.prepare(download["videos"], download["labels"], str(tmp_path / "shards"), "shards",
                 workers=1, max_unreadable=BROKEN_OK)
    pack(str(tmp_path / "tree"), str(tmp_path / "packed"), 2 ** 31, str(tmp_path / "cache"))
    assert filecmp.cmp(tmp_path / "shards" / "shard_00000.bin",
                       tmp_path / "packed" / "shard_00000.bin", shallow=False)
    _, a = FrameIndex.read(str(tmp_path / "shards" / PACKED_INDEX))
    _, b = FrameIndex.read(str(tmp_path / "packed" / PACKED_INDEX))
    assert all(np.array_equal(a[k], b[k])
               for k in ("numbers", "offsets", "start", "length", "crc32"))


@pytest.mark.slow
def test_webm_to_training_ready_shards_to_training(download, tmp_path):
    from config import config_from_dict
    from runtime import Runtime
    from training import train
    summary = prep.prepare(download["videos"], download["labels"], str(tmp_path / "ready"),
                           "shards", workers=1, image_size=32, resize="stretch",
                           max_unreadable=BROKEN_OK)
    assert summary["unreadable"] == 3 and summary["frames"] == 24 * 24
    cfg = tiny_config(str(tmp_path / "ready"), str(tmp_path / "logs"), **{
        "data_params.resize": "stretch", "trainer_params.max_steps": 3})
    final = torch.load(train(config_from_dict(cfg), Runtime()), weights_only=True)
    assert final["step"] == 3 and final["data"]["videos"] == 18       # the train label file's


def children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def same_output(straight, out):
    """Assert two prepared folders hold the same files, byte for byte (the index by value)."""
    compare = filecmp.dircmp(straight, out)
    names = sorted(os.listdir(straight))
    assert names == sorted(os.listdir(out))
    for name in names:
        a, b = straight / name, out / name
        if a.is_dir():
            assert sorted(os.listdir(a)) == sorted(os.listdir(b))
            assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in os.listdir(a)), name
        elif name == PACKED_INDEX:
            meta_a, arrays_a = FrameIndex.read(str(a))
            meta_b, arrays_b = FrameIndex.read(str(b))
            assert meta_a["videos"] == meta_b["videos"] and meta_a["shards"] == meta_b["shards"]
            assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)
        else:
            assert filecmp.cmp(a, b, shallow=False), name
    assert compare.left_only == compare.right_only == []
    return names


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
@pytest.mark.parametrize("mode", ["--frames", "--shards"])
def test_kill_9_of_the_main_process_alone_resumes_to_the_output_of_an_uninterrupted_run(
        download, tmp_path, mode):
    """Its decoding workers end with it and let go of the lock, so the same command resumes."""
    extra = ["--shard-size-gb", "0.0002"] if mode == "--shards" else []   # ~210 KB shards
    prep.prepare(download["videos"], download["labels"], str(tmp_path / "straight"), mode[2:],
                 workers=1, shard_size=int(0.0002 * 2 ** 30), max_unreadable=BROKEN_OK)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "prepare_sthv2.py", "--videos", download["videos"],
                             "--labels", download["labels"], "--out", str(out), mode, "-j", "2",
                             "--max-unreadable", str(BROKEN_OK), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / prep.STATE

    def progress_made():
        if mode == "--frames":
            return out.is_dir() and len([n for n in os.listdir(out) if n.isdigit()]) >= 3
        return state.is_dir() and len([n for n in os.listdir(state) if n.endswith(".json")
                                       and n.startswith("shard_")]) >= 2
    deadline = time.monotonic() + HANG_GUARD
    while not progress_made() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)                  # the main process alone
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    assert len(workers) >= 2
    while any(running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(running(w) for w in workers), "a worker outlived the main process"
    assert not (out / PACKED_INDEX).exists() and state.is_dir()

    resumed = run_prepare(download, out, mode, "-j", "2", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["videos_done_before"] >= 2
    assert not state.exists()
    names = same_output(tmp_path / "straight", out)
    if mode == "--shards":
        assert len([n for n in names if n.startswith("shard_")]) >= 3


def prepare_main(monkeypatch, capsys, *args):
    """prepare_sthv2.py's main() in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prepare_sthv2.py", *args])
    try:
        run_main(prep.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(download, tmp_path, monkeypatch, capsys):
    common = ["--videos", download["videos"], "--labels", download["labels"]]
    code, err = prepare_main(monkeypatch, capsys, *common, "--out", str(tmp_path / "x"),
                             "--frames", "--image-size", "64")
    assert code == 2 and "--image-size applies to --shards" in err
    empty = tmp_path / "no_labels"
    empty.mkdir()
    code, err = prepare_main(monkeypatch, capsys, "--videos", download["videos"], "--labels",
                             str(empty), "--out", str(tmp_path / "y"), "--frames", "-j", "1")
    assert code == 2 and err.strip().splitlines() == [
        f"error: --labels {empty} lacks something-something-v2-train.json, "
        f"something-something-v2-validation.json (SthV2's label download)"]
    assert not (tmp_path / "y").exists()                          # checked before any work
    code, err = prepare_main(monkeypatch, capsys, "--videos", str(empty), "--labels",
                             download["labels"], "--out", str(tmp_path / "z"), "--frames")
    assert code == 2 and "no .webm videos in" in err
    state = tmp_path / "w" / prep.STATE                          # a recorded shard gone missing
    state.mkdir(parents=True)
    (state / "shard_00000.bin.json").write_text(json.dumps(
        {"name": "shard_00000.bin", "frames": {"1000": [10, 20]}, "unreadable": {}}))
    code, err = prepare_main(monkeypatch, capsys, *common, "--out", str(tmp_path / "w"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'w' / 'shard_00000.bin'} is missing or does not match its record "
        f"in {state}; remove {tmp_path / 'w'} and start again"]


def small_download(download, root, ids=("1000", "1001", "1002")):
    """A videos folder holding copies of a few good clips of the download."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    for vid in ids:
        shutil.copy(os.path.join(download["videos"], f"{vid}.webm"), videos / f"{vid}.webm")
    return {"videos": str(videos), "labels": download["labels"]}


UNLOADABLE_TORCHCODEC = '''
import ctypes
_CDLL = ctypes.CDLL
class CDLL(_CDLL):                      # torchcodec's libraries load as on a machine without FFmpeg
    def __init__(self, name, *args, **kwargs):
        if name and "libtorchcodec_core" in str(name):   # FFmpeg's, not its image library
            raise OSError("libavutil.so.58: cannot open shared object file: No such file or "
                          "directory")
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = CDLL
'''


@pytest.mark.slow
def test_auto_takes_the_decoder_that_decodes_when_torchcodec_imports_but_cannot_load_ffmpeg(
        download, tmp_path):
    """On any machine: torchcodec's FFmpeg libraries made unloadable, as on a machine without
    FFmpeg. auto decodes with PyAV and says why torchcodec was passed over; --decoder torchcodec
    is one line, exit 2, before anything is written."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(UNLOADABLE_TORCHCODEC)
    env = {**os.environ, "PYTHONPATH": str(site)}
    small = small_download(download, tmp_path)
    command = [sys.executable, "prepare_sthv2.py", "--videos", small["videos"], "--labels",
               small["labels"], "--frames", "-j", "1", "--out"]
    result = subprocess.run([*command, str(tmp_path / "auto")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["decoder"] == "pyav" and summary["unreadable"] == 0
    assert summary["frames_written"] == 3 * 24
    record = json.loads((tmp_path / "auto" / prep.RECORD).read_text())
    assert record["decoder"] == "pyav"
    assert "libavutil.so.58" in record["passed_over"]["torchcodec"]
    assert "torchcodec passed over" in result.stderr and "libavutil.so.58" in result.stderr

    forced = subprocess.run([*command, str(tmp_path / "forced"), "--decoder", "torchcodec"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert forced.returncode == 2
    lines = forced.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --decoder torchcodec cannot decode")
    assert "libavutil.so.58" in lines[0] and not (tmp_path / "forced" / "1000").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frames", "shards"])
def test_a_decoder_that_fails_on_most_videos_fails_the_run_and_a_rerun_continues(
        download, tmp_path, monkeypatch, capsys, mode):
    """Every video unreadable (a decoder that decodes the test clip but not these): exit 1
    naming the decoder and the commonest reason, nothing marked finished; the same command
    with a working decoder then ends with the output of a run that never failed."""
    small = small_download(download, tmp_path, ids=[str(1000 + k) for k in range(6)])
    args = ["--videos", small["videos"], "--labels", small["labels"], f"--{mode}", "-j", "1"]
    prep.prepare(small["videos"], small["labels"], str(tmp_path / "straight"), mode)

    def broken(path, fps=None, decoder="pyav"):
        raise VideoError("RuntimeError: no decoder for codec vp9")
    with monkeypatch.context() as patch:
        patch.setattr(prep, "decode_video", broken)
        code, err = prepare_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 1
    lines = err.strip().splitlines()
    auto = next(name for name in video_decoding.CANDIDATES if DECODER_STATUS[name] is None)
    assert lines[-1].startswith(f"error: 6 of 6 videos could not be decoded by {auto}"), lines
    assert "(the commonest reason, 6 videos: RuntimeError: no decoder for codec vp9)" in lines[-1]
    assert len((tmp_path / "out" / prep.UNREADABLE).read_text().splitlines()) == 6
    assert not (tmp_path / "out" / prep.RECORD).exists()
    assert (tmp_path / "out" / prep.STATE).is_dir()

    code, err = prepare_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 0, err
    same_output(tmp_path / "straight", tmp_path / "out")
    assert (tmp_path / "out" / prep.UNREADABLE).read_text() == ""

    # a few broken clips among many stay what they were: reported, skipped, exit 0
    (tmp_path / "videos" / "9002.webm").write_text("<html>404 not found</html>")
    code, err = prepare_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "few"),
                             "--max-unreadable", "0.2")
    assert code == 0 and "1 videos could not be decoded" in err


@pytest.mark.parametrize("mode", ["frames", "shards"])
def test_a_finished_output_is_already_complete_for_the_same_command_and_refused_for_others(
        download, tmp_path, monkeypatch, capsys, mode):
    small = small_download(download, tmp_path)
    out = tmp_path / "out"
    args = ["--videos", small["videos"], "--labels", small["labels"], f"--{mode}", "-j", "1",
            "--out", str(out)]
    assert prepare_main(monkeypatch, capsys, *args)[0] == 0

    def snapshot():
        return {os.path.relpath(os.path.join(d, n), out): os.stat(os.path.join(d, n)).st_mtime_ns
                for d, dirs, files in os.walk(out) for n in files + dirs}
    before = snapshot()
    code, err = prepare_main(monkeypatch, capsys, *args)
    assert code == 0 and f"{out} is already complete" in err
    assert snapshot() == before
    code, err = prepare_main(monkeypatch, capsys, *args, "--fps", "4")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {out} was made with other settings (fps 12.0 then, 4.0 now): rerun with the "
        f"same ones, or use another --out"]
    assert snapshot() == before


@pytest.mark.parametrize("mode", ["frames", "shards"])
def test_a_fifo_named_like_a_video_is_unreadable_and_never_opened(download, tmp_path, mode):
    small = small_download(download, tmp_path)
    os.mkfifo(os.path.join(small["videos"], "3000.webm"))     # opening it would block forever
    summary = prep.prepare(small["videos"], small["labels"], str(tmp_path / "out"), mode,
                           max_unreadable=0.5)
    assert summary["unreadable"] == 1
    assert (tmp_path / "out" / prep.UNREADABLE).read_text() == \
        "3000\tnot a regular file (a FIFO)\n"


def test_inputs_that_would_mix_or_overwrite_outputs_are_one_line_before_any_decoding(
        download, tmp_path, monkeypatch, capsys):
    small = small_download(download, tmp_path)
    videos = tmp_path / "videos"
    shutil.copy(videos / "1001.webm", videos / "1000.mp4")     # another clip, the same id
    common = ["--videos", small["videos"], "--labels", small["labels"], "-j", "1"]
    code, err = prepare_main(monkeypatch, capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: two files for video 1000: {videos / '1000.mp4'} and {videos / '1000.webm'}; "
        f"keep one"]
    os.remove(videos / "1000.mp4")
    clash = videos / "something-something-v2-train.json.webm"
    shutil.copy(videos / "1001.webm", clash)
    code, err = prepare_main(monkeypatch, capsys, *common, "--frames", "--out",
                             str(tmp_path / "b"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: video {clash} would be written over the output file "
        f"something-something-v2-train.json in --frames mode; rename or remove it"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
