"""Checkpoint helpers: copies without hard links, RNG state round trip."""
import os
import random
import time

import numpy as np
import pytest
import torch

import checkpoint as ck
import files


def test_last_pt_is_a_byte_copy_where_hard_links_fail(tmp_path, monkeypatch):
    src = tmp_path / "step_0000010.pt"
    torch.save({"model": {"w": torch.arange(6.0)}}, src)
    (tmp_path / "last.pt").write_bytes(b"previous")

    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    files.link_atomic(str(src), str(tmp_path / "last.pt"))
    assert (tmp_path / "last.pt").read_bytes() == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "step_0000010.pt"]   # no temp left


def test_rng_state_round_trip_restores_every_generator():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ck.rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "index.npz"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="disk went away"):
        with files.atomic_write(str(path)) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk went away")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["index.npz"]
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with files.atomic_write(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new" and len(synced) == 1 and os.listdir(tmp_path) == ["index.npz"]


def _write_under_size_limit(write, limit):
    """Run write() in a child process that cannot grow any file past `limit` bytes (a full
    disk or quota, hit part way): the write fails there, as it would on a cluster."""
    import multiprocessing
    import resource
    import signal

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            write()
        except (OSError, RuntimeError):     # torch.save reports short writes so
            os._exit(3)
        os._exit(0)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    return process.exitcode


def test_writers_that_fail_part_way_keep_the_previous_file(tmp_path, demo_data):
    """Reports, frame-index caches, probe features and checkpoints: a write that fails part
    way leaves the previous complete file and no partial one beside it."""
    from evaluation import write_report
    from frame_index import FrameIndex
    from probe import FeatureCache
    big_rows = [{"index": i, "path": "x" * 200} for i in range(200)]
    index = FrameIndex.build(demo_data)
    cache = FeatureCache(str(tmp_path / "features"), {"model": "a"})
    writers = {
        "metrics.json": (lambda: write_report(str(tmp_path), {"n": 1}, [{"index": 0}], "rows.csv"),
                         lambda: write_report(str(tmp_path), {"n": "y" * 50000}, big_rows,
                                              "rows.csv")),
        "index.npz": (lambda: index.save(str(tmp_path / "index.npz"), {"signature": "old"}),
                      lambda: index.save(str(tmp_path / "index.npz"), {"signature": "z" * 50000})),
        "features": (lambda: cache.put("train", 0, {"x": np.zeros(4)}),
                     lambda: cache.put("train", 0, {"x": np.ones(20000)})),
        "last.pt": (lambda: ck.save_atomic({"step": 1}, str(tmp_path / "last.pt")),
                    lambda: ck.save_atomic({"step": 2, "w": torch.ones(20000)},
                                           str(tmp_path / "last.pt"))),
    }
    for name, (first, second) in writers.items():
        first()
        before = {p: open(p, "rb").read() for p in _files_under(tmp_path)}
        assert _write_under_size_limit(second, 8192) == 3, name      # the write did fail
        after = {p: open(p, "rb").read() for p in _files_under(tmp_path)}
        assert after == before, name


def _files_under(folder):
    return sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names)


def test_a_folder_appears_whole_and_a_killed_writers_temps_are_removed(tmp_path):
    from files import atomic_dir, remove_stale_temps
    with atomic_dir(str(tmp_path / "video")) as folder:
        open(os.path.join(folder, "img_00001.jpg"), "wb").write(b"x")
        assert not (tmp_path / "video").exists()               # not there until complete
    assert os.listdir(tmp_path / "video") == ["img_00001.jpg"]
    with pytest.raises(RuntimeError):
        with atomic_dir(str(tmp_path / "broken")):
            raise RuntimeError("decoding failed")
    assert sorted(os.listdir(tmp_path)) == ["video"]           # no folder, no temp left
    (tmp_path / "shard_00001.bin.tmp.4242").write_bytes(b"half")   # what kill -9 leaves
    (tmp_path / ".other.tmp.4242").mkdir()
    (tmp_path / "keep.tmp").write_bytes(b"a user's file")
    remove_stale_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["keep.tmp", "video"]


def dead_pid():
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_orphaned_temps_go_and_live_or_fresh_ones_stay(tmp_path):
    """In folders other jobs may write to (outputs, caches): a temp whose writer is gone and
    that is older than the limit is removed; a live writer's, or a fresh one, stays."""
    old = time.time() - 3600
    gone, fresh, live = (f"shard_00000.bin.tmp.{dead_pid()}", f"metrics.json.tmp.{dead_pid()}",
                         f"index.npz.tmp.{os.getpid()}")
    for name in (gone, fresh, live, "notes.tmp"):
        (tmp_path / name).write_bytes(b"half")
    for name in (gone, live, "notes.tmp"):
        os.utime(tmp_path / name, (old, old))
    assert files.remove_orphaned_temps(str(tmp_path)) == [gone]
    assert sorted(os.listdir(tmp_path)) == sorted([fresh, live, "notes.tmp"])


def finishes(fn, within=120):
    """fn(), failed if it is still blocked after `within` seconds (SIGALRM breaks a blocking
    open; what the test is about is that there is none)."""
    import signal

    def blocked(signum, frame):
        raise TimeoutError("blocked opening the file")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(within)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_given_as_a_checkpoint_is_one_line_at_every_entry_point(demo_data, tmp_path):
    from conftest import run_in_process, tiny_config, write_config
    fifo = str(tmp_path / "model.pt")
    os.mkfifo(fifo)
    config = write_config(tmp_path / "c.yaml", tiny_config(demo_data, str(tmp_path / "logs")))
    common = ["--data-path", demo_data, "--device", "cpu", "--lpips-net", "none", "--fid", "none"]
    runs = {
        "evaluate.py": ["--checkpoint", fifo, "--output", str(tmp_path / "e"), *common],
        "compare_with_laq.py": ["--vae", fifo, "--laq", fifo, "--output", str(tmp_path / "c"),
                                *common],
        "train_single_gpu.py": ["--config", config, "--resume", fifo, "--device", "cpu"]}
    for script, args in runs.items():
        result = finishes(lambda: run_in_process(script, *args))
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1] == \
            f"error: checkpoint {fifo} cannot be loaded: it is not a regular file (a FIFO)"
    # --resume auto with last.pt a FIFO: passed over like any unusable checkpoint
    run_dir = tmp_path / "logs" / "run" / "checkpoints"
    run_dir.mkdir(parents=True)
    os.mkfifo(run_dir / "last.pt")
    result = finishes(lambda: run_in_process("train_single_gpu.py", "--config", config,
                                             "--resume", "auto", "--device", "cpu"))
    assert result.returncode == 2 and "last.pt" in result.stderr.strip().splitlines()[-1], \
        result.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_with_a_compressed_record_is_refused_before_anything_is_inflated(
        tmp_path):
    """A 4-byte tensor whose record is 300 MB of deflated zeros (300 KB on disk): torch would
    inflate it whole before comparing it with the tensor's size. Refused from the archive's
    directory: the loading process grows by far less than the 300 MB."""
    import subprocess
    import sys
    import zipfile
    from conftest import ROOT
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as dst:
        for record in src.infolist():
            if record.filename.endswith("/data/0"):
                info = zipfile.ZipInfo(record.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(info, "w") as f:
                    for _ in range(300):
                        f.write(bytes(2 ** 20))
            else:
                dst.writestr(record, src.read(record))
    assert bomb.stat().st_size < 2 * 2 ** 20
    probe = ("import resource, sys; import checkpoint; base = resource.getrusage("
             "resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    checkpoint.load_checkpoint(sys.argv[1])\n"
             "except checkpoint.CheckpointError as e:\n    print(e)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    result = subprocess.run([sys.executable, "-c", probe, str(bomb)], cwd=ROOT,
                            capture_output=True, text=True)
    message, grown_mb = result.stdout.strip().splitlines()
    assert message.startswith(f"{bomb} is not a PyTorch checkpoint (it holds a "
                              f"compressed record"), message
    assert "which torch.save never writes" in message
    assert int(grown_mb) < 50
    assert ck.load_checkpoint(str(plain))["w"].shape == (1,)    # torch.save's own: loaded
