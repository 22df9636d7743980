"""Frame indexing, ordering, splits, stride, caching and bad-file handling on generated frames."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import dataset_sthv2 as ds
import errors
import frame_files
import frame_index
import image_datasets
import labels
import loaders


def write_frame(path, value, size=(40, 30)):
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def make_video(root, video, names, values=None):
    os.makedirs(os.path.join(root, video), exist_ok=True)
    for k, name in enumerate(names):
        write_frame(os.path.join(root, video, name), values[k] if values else 10 * k)


def red_of(t):
    return int(t[0, 0, 0])


def test_numeric_order_for_every_naming(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "unpadded", [f"img_{n}.jpg" for n in (10, 2, 1, 11)], [100, 20, 10, 110])
    make_video(root, "zero_based", [f"{n:06d}.png" for n in (3, 0, 1, 2)], [30, 0, 10, 20])
    make_video(root, "mixed_ext", ["5.png", "4.jpeg", "12.JPG"], [50, 40, 120])
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    assert len(index) == 11
    frames = ds.SthV2Frames(index, range(len(index.videos)), image_size=16)
    names = [os.path.basename(frames.path(i)) for i in range(len(frames))]
    by_video = {}
    for i, name in enumerate(names):
        by_video.setdefault(index.videos[int(frames.video[i])], []).append(name)
    assert by_video["unpadded"] == ["img_1.jpg", "img_2.jpg", "img_10.jpg", "img_11.jpg"]
    assert by_video["zero_based"] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert by_video["mixed_ext"] == ["4.jpeg", "5.png", "12.JPG"]
    reds = [red_of(frames[i][0]) for i in range(len(frames)) if "zero_based" in frames.path(i)]
    assert reds == [0, 10, 20, 30]              # the pixels really come from the right files


def test_len_counts_frames_and_stride(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "a", [f"img_{k:05d}.jpg" for k in range(1, 11)])
    make_video(root, "b", [f"img_{k:05d}.jpg" for k in range(1, 6)])
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    assert len(ds.SthV2Frames(index, [0, 1], 16)) == 15
    strided = ds.SthV2Frames(index, [0, 1], 16, frame_stride=3)
    assert len(strided) == 4 + 2                 # positions 0,3,6,9 and 0,3
    assert [os.path.basename(strided.path(i)) for i in range(4)] == \
        ["img_00001.jpg", "img_00004.jpg", "img_00007.jpg", "img_00010.jpg"]


def test_index_cache_is_reused_and_rebuilt_when_tree_changes(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "frames"), str(tmp_path / "cache")
    make_video(root, "a", [f"img_{k:05d}.jpg" for k in range(1, 4)])
    assert len(frame_index.load_index(root, cache)) == 3
    assert len(os.listdir(cache)) == 1
    real_build = frame_index.FrameIndex.build
    monkeypatch.setattr(frame_index.FrameIndex, "build", classmethod(lambda cls, r: pytest.fail("rebuilt")))
    assert len(frame_index.load_index(root, cache)) == 3  # unchanged tree: served from the cache
    monkeypatch.setattr(frame_index.FrameIndex, "build", real_build)
    write_frame(os.path.join(root, "a", "img_00004.jpg"), 40)
    os.utime(os.path.join(root, "a"), ns=(1, 1))  # make the change visible even on coarse clocks
    assert len(frame_index.load_index(root, cache)) == 4
    make_video(root, "b", ["img_00001.jpg"])
    assert len(frame_index.load_index(root, cache)) == 5


def test_official_label_files_decide_the_split(demo_data):
    index = frame_index.load_index(demo_data, os.path.join(demo_data, "..", "cache_split"))
    train, val, source = ds.split_videos(index)
    with open(os.path.join(demo_data, labels.LABEL_FILES["val"])) as f:
        val_ids = {e["id"] for e in json.load(f)}
    assert "label files" in source
    assert {index.videos[v] for v in val} == val_ids
    assert not set(train) & set(val) and len(train) + len(val) == len(index.videos)


def test_hash_split_is_deterministic_disjoint_and_complete(tmp_path):
    root = str(tmp_path / "frames")
    for v in range(200):
        make_video(root, str(v), ["img_00001.jpg"])
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    train, val, source = ds.split_videos(index, val_fraction=0.2)
    assert "hash split" in source
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert 20 <= len(val) <= 60
    assert ds.split_videos(index, val_fraction=0.2)[1] == val
    with pytest.raises(errors.DataError, match="lacks"):
        ds.split_videos(index, labels_path=str(tmp_path))


def test_frames_are_centre_square_cropped_and_resized(tmp_path):
    root = str(tmp_path / "frames")
    os.makedirs(os.path.join(root, "v"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    img.save(os.path.join(root, "v", "img_00001.png"))
    got = frame_files.load_frame(os.path.join(root, "v", "img_00001.png"), 32)
    reference = transforms.Compose([transforms.CenterCrop(40), transforms.Resize(32),
                                    transforms.PILToTensor()])(img)
    assert got.dtype == torch.uint8 and got.shape == (3, 32, 32)
    diff = (got.int() - reference.int()).abs()          # uint8 tensor resize vs PIL's: rounding
    assert diff.max() <= 1 and diff.float().mean() < 0.15     # never more than one level


def test_stretch_matches_laqs_loader_and_reaches_the_split(tmp_path):
    root = str(tmp_path / "frames")
    os.makedirs(os.path.join(root, "v"))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 72, 3), dtype=np.uint8))
    img.save(os.path.join(root, "v", "img_00001.png"))
    got = frame_files.load_frame(os.path.join(root, "v", "img_00001.png"), 32, resize="stretch")
    laq = transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()])(img)
    diff = (got.int() - laq.int()).abs()                 # LAQ: PIL -> Resize((S, S)) -> tensor
    assert diff.max() <= 1 and diff.float().mean() < 0.15
    from config import DataParams
    split = ds.build_split(DataParams(data_path=root, resize="stretch", val_fraction=0.5,
                                      index_cache_dir=str(tmp_path / "cache")), "train", 32)
    assert split.resize == "stretch" and torch.equal(split[0][0], got)
    assert not torch.equal(ds.SthV2Frames(split.index, [0], 32)[0][0], got)   # crop differs


def test_bad_files_are_replaced_by_neighbours_and_reported(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "v", [f"img_{k:05d}.jpg" for k in range(1, 7)], [10, 20, 30, 40, 50, 60])
    v = os.path.join(root, "v")
    open(os.path.join(v, "img_00002.jpg"), "wb").close()                        # zero bytes
    data = open(os.path.join(v, "img_00003.jpg"), "rb").read()
    open(os.path.join(v, "img_00003.jpg"), "wb").write(data[: len(data) // 2])  # truncated
    open(os.path.join(v, "img_00004.jpg"), "w").write("not an image")           # wrong content
    os.makedirs(os.path.join(root, "empty_video"))
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    assert index.empty_videos == ["empty_video"]
    frames = ds.SthV2Frames(index, [0], 16)
    images, bad = loaders.collate_frames([frames[i] for i in range(len(frames))])
    assert images.shape == (6, 3, 16, 16)
    assert sorted({p.split(" ")[0] for p in bad}) == [os.path.join(v, f"img_0000{k}.jpg")
                                                      for k in (2, 3, 4)]
    reds = [round(red_of(img) / 10) * 10 for img in images]   # JPEG moves colours by a unit
    assert reds[0] == 10 and reds[4] == 50 and reds[5] == 60
    assert all(r in (10, 50) for r in reds[1:4])  # nearest readable neighbour, never garbage


def test_batch_of_only_unreadable_frames_fails_with_a_clear_error(tmp_path):
    root = str(tmp_path / "frames")
    os.makedirs(os.path.join(root, "v"))
    for k in range(1, 4):
        open(os.path.join(root, "v", f"img_{k:05d}.jpg"), "wb").close()
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    frames = ds.SthV2Frames(index, [0], 16)
    assert frames[0][0] is None and len(frames[0][1]) == 3
    with pytest.raises(errors.DataError, match="failed to decode"):
        loaders.collate_frames([frames[0], frames[1]])


def test_empty_tree_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(errors.DataError, match="not a folder"):
        frame_index.load_index(str(tmp_path / "nope"), str(tmp_path / "cache"))
    os.makedirs(tmp_path / "empty" / "v")
    with pytest.raises(errors.DataError, match="no frames found"):
        frame_index.load_index(str(tmp_path / "empty"), str(tmp_path / "cache"))


def test_frame_pairs_use_the_same_index(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "a", [f"img_{k:05d}.png" for k in range(1, 9)], [10 * k for k in range(8)])
    make_video(root, "b", [f"img_{k:05d}.png" for k in range(1, 3)])
    index = frame_index.load_index(root, str(tmp_path / "cache"))
    pairs = ds.SthV2FramePairs(index, [0, 1], 16, offset=3)
    assert len(pairs) == 5                       # video b is shorter than the offset
    clip, bad = pairs[2]
    assert clip.shape == (2, 3, 16, 16) and not bad
    assert (red_of(clip[0]), red_of(clip[1])) == (20, 50)


def pooled_loader(frames, slots, epochs):
    loader = torch.utils.data.DataLoader(frames, 4, num_workers=2, prefetch_factor=2,
                                         persistent_workers=True,
                                         collate_fn=loaders.PooledCollate(slots))
    for _ in range(epochs):
        yield from loader


def test_pooled_batches_reuse_released_buffers_and_match_plain_ones(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "v", [f"img_{k:05d}.jpg" for k in range(1, 25)], [10 * k for k in range(24)])
    frames = ds.SthV2Frames(frame_index.load_index(root, str(tmp_path / "cache")), [0], 16)
    expected = [loaders.collate_frames([frames[i] for i in range(b, b + 4)])[0] for b in range(0, 24, 4)]
    slots, leases = 4, []
    for k, (images, bad, lease) in enumerate(pooled_loader(frames, slots, epochs=3)):
        assert torch.equal(images, expected[k % 6]) and not bad
        leases.append(lease)
        lease.release()
    # 18 batches from 2 workers of at most 4 buffers each: every buffer was filled again
    assert len(leases) == 18 and all(lease is not None for lease in leases)


def test_pooled_buffers_are_never_refilled_before_release(tmp_path):
    root = str(tmp_path / "frames")
    make_video(root, "v", [f"img_{k:05d}.jpg" for k in range(1, 25)], [10 * k for k in range(24)])
    frames = ds.SthV2Frames(frame_index.load_index(root, str(tmp_path / "cache")), [0], 16)
    expected = [loaders.collate_frames([frames[i] for i in range(b, b + 4)])[0] for b in range(0, 24, 4)]
    kept = list(pooled_loader(frames, slots=2, epochs=2))      # held, never released
    for k, (images, _, _) in enumerate(kept):
        assert torch.equal(images, expected[k % 6])
    leases = [lease for _, _, lease in kept]
    assert sum(lease is not None for lease in leases) == 4     # 2 per worker, then fresh memory


# --- hostile files ---------------------------------------------------------------------------

def test_fifos_devices_and_huge_files_are_unreadable_frames_not_hangs(tmp_path, monkeypatch):
    import signal
    root = tmp_path / "images"
    root.mkdir()
    write_frame(str(root / "a.png"), 90)
    os.mkfifo(root / "b.png")                                  # would block a plain open()
    os.symlink("/dev/zero", root / "c.png")                    # would never end
    (root / "d.png").write_bytes(b"\x89PNG" + b"\0" * 2000)
    monkeypatch.setattr(frame_files.read_file, "__defaults__", (1000,))
    signal.alarm(20)                                           # a hang fails instead of waiting
    try:
        images = image_datasets.ImageFiles(str(root), 16)
        results = [images[i] for i in range(len(images))]
    finally:
        signal.alarm(0)
    assert results[0][0] is not None and not results[0][1]
    reasons = [bad[0] for _, bad in results[1:]]
    assert all(img is None for img, _ in results[1:])
    assert "not a regular file" in reasons[0] and "not a regular file" in reasons[1]
    assert "more than the 1000" in reasons[2]


def test_images_over_pils_pixel_limit_are_refused_from_the_header(tmp_path, monkeypatch):
    from PIL import Image as PILImage
    path = str(tmp_path / "big.jpg")
    PILImage.new("RGB", (60, 50), (10, 200, 30)).save(path)
    assert frame_files.load_frame(path, 16).shape == (3, 16, 16)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 2000)    # 3000 pixels > the limit
    decoded = []
    monkeypatch.setattr(frame_files, "_jpeg_decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(PILImage.DecompressionBombError, match="60x50 pixels, more than the 2000"):
        frame_files.load_frame(path, 16)
    assert not decoded                                         # refused before decoding


def test_sixteen_bit_grey_pngs_keep_their_brightness(tmp_path):
    grey = np.full((20, 30), 32768, dtype=np.uint16)
    grey[:, :10] = 65535
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = frame_files.load_frame(str(tmp_path / "deep.png"), 20, resize="stretch")
    assert img.shape == (3, 20, 20) and int(img[0, 10, 0]) == 255
    assert abs(int(img[1, 10, 15]) - 128) <= 1                 # mid grey, not clipped to white


def test_a_video_in_both_label_files_is_an_error_naming_it(tmp_path):
    root = str(tmp_path / "frames")
    for video in ("1", "2", "3"):
        make_video(root, video, ["img_00001.jpg"])
    for split, ids in (("train", ["1", "2"]), ("validation", ["2", "3"])):
        with open(os.path.join(root, f"something-something-v2-{split}.json"), "w") as f:
            json.dump([{"id": i} for i in ids], f)
    with pytest.raises(errors.DataError, match=r"1 video ids are in both .* \(e\.g\. 2\)"):
        ds.split_videos(frame_index.load_index(root, str(tmp_path / "cache")))


def test_a_damaged_index_cache_is_rebuilt_and_a_damaged_packed_index_named(tmp_path, caplog):
    root, cache = str(tmp_path / "frames"), str(tmp_path / "cache")
    make_video(root, "a", [f"img_{k:05d}.jpg" for k in range(1, 4)])
    assert len(frame_index.load_index(root, cache)) == 3
    (cached,) = os.listdir(cache)
    for damage in (b"", b"PK\x03\x04 cut short", open(os.path.join(cache, cached), "rb").read()[:100]):
        with open(os.path.join(cache, cached), "wb") as f:
            f.write(damage)
        with caplog.at_level("WARNING", logger="vae"):
            assert len(frame_index.load_index(root, cache)) == 3
        assert "is unreadable" in caplog.text and "rebuilding" in caplog.text
        caplog.clear()
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / frame_index.PACKED_INDEX).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(errors.DataError) as info:
        frame_index.load_index(str(packed), cache)
    assert str(packed / frame_index.PACKED_INDEX) in str(info.value) and "\n" not in str(info.value)


def test_frame_lookups_read_arrays_not_python_lists(demo_data, tmp_path):
    """A forked DataLoader worker copies every Python object it reads (its reference count is
    written); frame paths must come from numpy arrays alone (bench.py index measures it)."""
    index = frame_index.load_index(demo_data, str(tmp_path / "cache"))
    videos = range(len(index.videos))
    expected = [index.frame_path(v, p) for v in videos for p in range(index.num_frames(v))]
    assert all(os.path.isfile(path) for path in expected)
    index.videos, index.patterns = None, None               # what a worker must not touch
    assert [index.frame_path(v, p) for v in videos
            for p in range(index.num_frames(v))] == expected


def test_the_jpeg_decoder_is_chosen_in_order_and_a_pil_fallback_is_announced(
        demo_data, tmp_path, monkeypatch, capsys):
    assert frame_files.JPEG_DECODER == "torchvision"          # what requirements.txt installs
    monkeypatch.setitem(sys.modules, "torchvision.io", None)     # a torchvision without it
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert frame_files._pick_jpeg_decoder() == ("pil", None)
    unloadable = types.ModuleType("torchcodec.decoders")     # imports, cannot load FFmpeg

    def decode_jpeg(data):
        raise RuntimeError("Could not load libtorchcodec. Likely causes: ...")
    unloadable.decode_jpeg = decode_jpeg
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", unloadable)
    assert frame_files._pick_jpeg_decoder() == ("pil", None)
    frame = os.path.join(demo_data, sorted(os.listdir(demo_data))[0], "img_00001.jpg")
    data = open(frame, "rb").read()
    fast = frame_files.decode_rgb(data)
    monkeypatch.setattr(frame_files, "JPEG_DECODER", "pil")
    monkeypatch.setattr(frame_files, "_jpeg_decode", None)
    slow = frame_files.decode_rgb(data)                        # PIL decodes the same JPEG
    assert slow.shape == fast.shape and (slow.int() - fast.int()).abs().float().mean() < 1.0
    import training
    monkeypatch.setattr(training, "JPEG_DECODER", "pil")
    monkeypatch.setattr(training, "describe_jpeg_decoder", frame_files.describe_jpeg_decoder)
    from config import config_from_dict
    from conftest import tiny_config
    from runtime import Runtime
    training.train(config_from_dict(tiny_config(demo_data, str(tmp_path), **{
        "trainer_params.max_steps": 1})), Runtime())
    captured = capsys.readouterr()
    assert "JPEG frames are decoded by PIL, about half the speed" in captured.out + captured.err


def test_validation_batches_every_rank_shares_are_counted():
    """13 items in global batches of 6 over 2 ranks: the last block (1 item) exists on rank 0
    only, so the ranks can exchange a stop flag over 2 batches, not 3."""
    from loaders import BlockBatchSampler
    ranks = [BlockBatchSampler(list(range(13)), 6, r, 2) for r in (0, 1)]
    assert [len(s) for s in ranks] == [3, 2] and [s.common for s in ranks] == [2, 2]
    assert sorted(i for s in ranks for b in s for i in b) == list(range(13))
