"""Packed shards round-trip every frame; bench.py runs end to end and prints its JSON line."""
import json
import os

import torch

import dataset_sthv2 as ds
from conftest import ROOT, run_script
from pack_frames import pack


def test_shards_round_trip_every_byte_and_serve_the_same_dataset(demo_data, tmp_path):
    tree = ds.load_index(demo_data, str(tmp_path / "cache"))
    report = pack(demo_data, str(tmp_path / "packed"), shard_size=50_000,
                  index_cache_dir=str(tmp_path / "cache"))
    assert report["frames"] == len(tree) and report["shards"] > 1
    packed = ds.load_index(str(tmp_path / "packed"))
    assert isinstance(packed, ds.PackedFrameIndex) and packed.videos == tree.videos
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
    packed = ds.load_index(str(tmp_path / "packed"))
    shard = tmp_path / "packed" / packed.shard_names[0]
    data = bytearray(shard.read_bytes())
    first = int(packed.start[0]), int(packed.length[0])
    data[first[0]:first[0] + first[1]] = b"\0" * first[1]            # wipe frame 0 of video 0
    shard.write_bytes(bytes(data))
    frames = ds.SthV2Frames(packed, [0], 32)
    image, bad = frames[0]
    assert image is not None and bad and bad[0].startswith(packed.frame_path(0, 0))


def test_bench_train_and_data_print_their_json_line(demo_data, tmp_path):
    train = run_script("bench.py", "train", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
                       "--steps", "2", "--warmup", "1", "--batch-size", "4", "--device", "cpu")
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert {"images_per_sec", "step_ms", "gflop_per_image", "mfu", "peak_mem_mb", "device"} <= set(result)
    assert result["mfu"] is None and result["device"] == "cpu" and result["images_per_sec"] > 0
    assert 0.2 < result["gflop_per_image"] < 0.3                  # the 64 px demo model
    data = run_script("bench.py", "data", "--data-path", demo_data, "--workers", "1",
                      "--batches", "2", "--batch-size", "4", "--image-size", "32",
                      "--index-cache-dir", str(tmp_path / "cache"))
    assert data.returncode == 0, data.stderr[-3000:]
    result = json.loads(data.stdout.strip().splitlines()[-1])
    assert {"frames_per_sec", "baseline_frames_per_sec", "ratio", "workers"} <= set(result)
    assert result["ratio"] == round(result["frames_per_sec"] / result["baseline_frames_per_sec"], 2)
    assert len(result["rounds"]) == 3


def test_bench_laq_times_one_pass_against_two(tmp_path):
    import yaml
    small = {"dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
             "spatial_depth": 2, "temporal_depth": 1, "dim_head": 8, "heads": 2, "code_seq_len": 4}
    (tmp_path / "laq.yaml").write_text(yaml.safe_dump(small))
    result = run_script("bench.py", "laq", "--laq-repo", os.path.join(ROOT, "tests", "laq_standin"),
                        "--laq-config", str(tmp_path / "laq.yaml"), "--batches", "1",
                        "--rounds", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["passes"] == 1 and len(report["rounds"]) == 2
    ratio = report["seconds_per_pair_two_passes"] / report["seconds_per_pair_one_pass"]
    assert abs(report["speedup"] - ratio) <= 0.01 * ratio + 0.005
