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
    from evaluate import write_report
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
