"""Packed shards round-trip every frame; bench.py runs end to end and prints its JSON line."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from config import DataParams, config_from_dict
from conftest import ROOT, run_in_process, run_script, tiny_config
import dataset_sthv2 as ds
import errors
import frame_index
from packing import pack
from runtime import Runtime
from training import train


def test_shards_round_trip_every_byte_and_serve_the_same_dataset(demo_data, tmp_path):
    """Also: the half-written shard a killed packer left in the folder is removed."""
    import subprocess
    tree = frame_index.load_index(demo_data, str(tmp_path / "cache"))
    killed = subprocess.Popen(["true"])
    killed.wait()
    orphan = tmp_path / "packed" / f"shard_00000.bin.tmp.{killed.pid}"
    orphan.parent.mkdir()
    orphan.write_bytes(b"half a shard")
    os.utime(orphan, (0, 0))
    report = pack(demo_data, str(tmp_path / "packed"), shard_size=50_000,
                  index_cache_dir=str(tmp_path / "cache"))
    assert not orphan.exists()
    assert report["frames"] == len(tree) and report["shards"] > 1
    packed = frame_index.load_index(str(tmp_path / "packed"))
    assert isinstance(packed, frame_index.PackedFrameIndex) and packed.videos == tree.videos
    for v in range(len(tree.videos)):
        for pos in range(tree.num_frames(v)):
            with open(tree.frame_path(v, pos), "rb") as f:
                assert packed.read_bytes(v, pos) == f.read()
            assert packed.frame_path(v, pos) == tree.frame_path(v, pos)
    assert ds.split_videos(packed)[:2] == ds.split_videos(tree)[:2]   # label files came along
    a = ds.SthV2Frames(tree, range(len(tree.videos)), 32, frame_stride=2)
    b = ds.SthV2Frames(packed, range(len(packed.videos)), 32, frame_stride=2)
    assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    pairs = ds.SthV2FramePairs(packed, [0], 32, offset=3)
    assert torch.equal(pairs[0][0][1], a.load(0, 3)[0])


def test_a_corrupt_frame_inside_a_shard_is_reported_by_its_source_name(demo_data, tmp_path):
    pack(demo_data, str(tmp_path / "packed"), shard_size=10 ** 9,
         index_cache_dir=str(tmp_path / "cache"))
    packed = frame_index.load_index(str(tmp_path / "packed"))
    shard = tmp_path / "packed" / packed.shard_names[0]
    data = bytearray(shard.read_bytes())
    first = int(packed.start[0]), int(packed.length[0])
    data[first[0]:first[0] + first[1]] = b"\0" * first[1]            # wipe frame 0 of video 0
    shard.write_bytes(bytes(data))
    frames = ds.SthV2Frames(packed, [0], 32)
    image, bad = frames[0]
    assert image is not None and bad and bad[0].startswith(packed.frame_path(0, 0))


def test_a_bit_flipped_in_a_shard_is_an_unreadable_frame_not_other_pixels(demo_data, tmp_path):
    """One bit flipped in the middle of each frame of video 0 (where a JPEG still decodes, to
    other pixels): every one is caught by its CRC-32 and reported by its source name; the other
    videos' frames read as before."""
    import binascii
    pack(demo_data, str(tmp_path / "packed"), shard_size=10 ** 9,
         index_cache_dir=str(tmp_path / "cache"))
    packed = frame_index.load_index(str(tmp_path / "packed"))
    tree = frame_index.load_index(demo_data, str(tmp_path / "cache"))
    for i in range(len(tree)):                  # the stored CRC is the frame file's own
        v = int(np.searchsorted(tree.offsets, i, side="right")) - 1
        with open(tree.frame_path(v, i - int(tree.offsets[v])), "rb") as f:
            assert int(packed.crc32[i]) == binascii.crc32(f.read())
    shard = tmp_path / "packed" / packed.shard_names[0]
    data = bytearray(shard.read_bytes())
    for pos in range(packed.num_frames(0)):
        data[int(packed.start[pos]) + int(packed.length[pos]) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    frames = ds.SthV2Frames(frame_index.load_index(str(tmp_path / "packed")), [0, 1], 32)
    for pos in range(packed.num_frames(0)):
        _, bad = frames.load(0, pos)
        assert bad[0].startswith(packed.frame_path(0, pos)) and "checksum mismatch" in bad[0]
    assert all(not frames.load(1, pos)[1] for pos in range(packed.num_frames(1)))


def test_packing_into_a_packed_folder_is_refused_and_touches_nothing(demo_data, tmp_path):
    """A re-pack killed half way used to leave the old index over new shards (other frames'
    bytes): an index and its shards now change together."""
    out = tmp_path / "packed"
    pack(demo_data, str(out), shard_size=50_000, index_cache_dir=str(tmp_path / "cache"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(errors.DataError, match="already holds packed frames"):
        pack(demo_data, str(out), shard_size=20_000, index_cache_dir=str(tmp_path / "cache"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_packing_onto_a_full_disk_is_one_line_and_leaves_no_shards_without_an_index(
        demo_data, tmp_path, monkeypatch):
    import errno
    import packing
    real, calls = packing.atomic_write, []

    def third_write_finds_the_disk_full(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(packing, "atomic_write", third_write_finds_the_disk_full)
    with pytest.raises(errors.WriteFailed) as raised:
        pack(demo_data, str(tmp_path / "packed"), shard_size=20_000,
             index_cache_dir=str(tmp_path / "cache"))
    message = str(raised.value)
    assert raised.value.exit_code == 1 and "\n" not in message
    assert "No space left on device" in message and calls[2] in message
    assert "the 2 shards written before it were removed" in message
    assert not [n for n in os.listdir(tmp_path / "packed") if n.startswith(("shard_", "packed"))]


def test_training_ready_shards_serve_the_frames_the_tree_path_produces(demo_data, tmp_path):
    """Frames stored at the training size (JPEG quality 90, 4:4:4) equal the tree path's within
    re-encoding tolerance at 32 px, where textures are all edges: PSNR > 35 dB and mean
    |difference| < 3 of 255 levels per frame (45 dB at 256 px on SthV2-like frames);
    a config asking for another size or resize mode is refused; an undecodable frame is
    reported by its original name; a run trains on them."""
    cache = str(tmp_path / "cache")
    broken = str(tmp_path / "broken_tree")
    shutil.copytree(demo_data, broken)
    first = sorted(os.listdir(os.path.join(broken, "1000")))[0]
    with open(os.path.join(broken, "1000", first), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    report = pack(broken, str(tmp_path / "ready"), 10 ** 9, cache, image_size=32,
                  resize="stretch", quality=90, workers=2)
    assert report["prepared"] == {"image_size": 32, "resize": "stretch", "quality": 90}
    assert report["undecodable_frames"] == 1

    tree = ds.build_split(DataParams(data_path=demo_data, image_size=32, resize="stretch",
                                     index_cache_dir=cache), "train", 32)
    ready = ds.build_split(DataParams(data_path=str(tmp_path / "ready"), image_size=32,
                                      resize="stretch"), "train", 32)
    assert len(tree) == len(ready)
    for i in range(len(tree)):
        a, (b, bad) = tree[i][0].float(), ready[i]
        if bad:                                                   # the broken frame, by name
            assert bad[0].startswith(os.path.join(os.path.abspath(broken), "1000", first))
            assert "could not be decoded when the shards were packed" in bad[0]
            continue
        mse = float((a - b.float()).pow(2).mean())
        assert mse == 0 or 10 * math.log10(255 ** 2 / mse) > 35, i
        assert float((a - b.float()).abs().mean()) < 3, i
    for size, resize in ((64, "stretch"), (32, "crop")):
        with pytest.raises(errors.DataError, match="pack again with pack_frames.py"):
            ds.build_split(DataParams(data_path=str(tmp_path / "ready"), image_size=size,
                                      resize=resize), "train", size)
    with pytest.raises(errors.DataError, match="needs the original frames"):
        ds.build_split(DataParams(data_path=str(tmp_path / "ready")), "val", None, pair_offset=2)

    cfg = tiny_config(str(tmp_path / "ready"), str(tmp_path / "logs"), **{
        "data_params.resize": "stretch", "trainer_params.max_steps": 3})
    final = train(config_from_dict(cfg), Runtime())
    assert torch.load(final, weights_only=True)["step"] == 3


@pytest.mark.slow
def test_bench_train_and_data_print_their_json_line(demo_data, tmp_path):
    train = run_in_process("bench.py", "train", "--config",
                           os.path.join(ROOT, "configs", "demo.yaml"), "--steps", "2", "--warmup",
                           "1", "--batch-size", "4", "--device", "cpu")
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert {"images_per_sec", "step_ms", "gflop_per_image", "mfu", "peak_mem_mb", "device"} <= set(result)
    assert result["mfu"] is None and result["device"] == "cpu" and result["images_per_sec"] > 0
    assert 0.2 < result["gflop_per_image"] < 0.3                  # the 64 px demo model
    data = run_in_process("bench.py", "data", "--data-path", demo_data, "--workers", "2",
                      "--batches", "2", "--batch-size", "4", "--image-size", "32",
                      "--index-cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                      "--target-images-per-sec", "1000", "--pack-dir", str(tmp_path))
    assert data.returncode == 0, data.stderr[-3000:]
    result = json.loads(data.stdout.strip().splitlines()[-1])
    paths = result["paths"]
    assert set(paths) == {"laq", "tree", "shards", "ready", "device_decode"}
    for name, path in paths.items():
        per_worker = path["frames_per_sec"] / (1 if name == "device_decode" else 2)
        assert path["frames_per_sec_per_worker"] == pytest.approx(per_worker, abs=0.1)
        assert path["workers_for_target"] == math.ceil(1000 / path["frames_per_sec_per_worker"])
    assert result["ready_vs_tree"] == round(paths["ready"]["frames_per_sec"]
                                            / paths["tree"]["frames_per_sec"], 2)
    assert len(result["rounds"]) == 3 and os.listdir(tmp_path) == ["cache"]   # packs removed
    index = run_script("bench.py", "index", "--videos", "30", "--frames", "5", "--rounds", "2",
                       "--root", str(tmp_path))
    assert index.returncode == 0, index.stderr[-3000:]
    result = json.loads(index.stdout.strip().splitlines()[-1])
    assert result["frames"] == 150 and result["load_cache_s"] < result["build_index_s"] + 1
    assert result["worker_private_mb_after_every_frame"] >= 0


def test_bench_laq_times_one_pass_against_two(tmp_path):
    import yaml
    small = {"dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
             "spatial_depth": 2, "temporal_depth": 1, "dim_head": 8, "heads": 2, "code_seq_len": 4}
    (tmp_path / "laq.yaml").write_text(yaml.safe_dump(small))
    result = run_in_process("bench.py", "laq", "--laq-repo", os.path.join(ROOT, "tests", "laq_standin"),
                        "--laq-config", str(tmp_path / "laq.yaml"), "--batches", "1",
                        "--rounds", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["passes"] == 1 and len(report["rounds"]) == 2
    ratio = report["seconds_per_pair_two_passes"] / report["seconds_per_pair_one_pass"]
    assert abs(report["speedup"] - ratio) <= 0.01 * ratio + 0.005
