"""Checkpoint helpers: copies without hard links, RNG state round trip."""
import os
import random

import numpy as np
import pytest
import torch

import checkpoint as ck


def test_last_pt_is_a_byte_copy_where_hard_links_fail(tmp_path, monkeypatch):
    src = tmp_path / "step_0000010.pt"
    torch.save({"model": {"w": torch.arange(6.0)}}, src)
    (tmp_path / "last.pt").write_bytes(b"previous")

    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    ck.link_atomic(str(src), str(tmp_path / "last.pt"))
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
        with ck.atomic_write(str(path)) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk went away")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["index.npz"]
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with ck.atomic_write(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new" and len(synced) == 1 and os.listdir(tmp_path) == ["index.npz"]


def test_every_file_writer_goes_through_atomic_write():
    """No writer renames temp files by hand (each one used to, and only one fsynced)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and name != "checkpoint.py":
            source = open(os.path.join(root, name)).read()
            assert "os.replace(" not in source and ".tmp" not in source, name


def test_a_folder_appears_whole_and_a_killed_writers_temps_are_removed(tmp_path):
    from checkpoint import atomic_dir, remove_stale_temps
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
