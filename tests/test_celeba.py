"""CelebA preparation on generated JPEGs: crop/resize, partitions, broken and missing files,
interruption and resume, zip input; the memory-mapped dataset equals the .npz."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_in_process, tiny_config, write_config
from errors import DataError
from image_datasets import CelebAArrays


@pytest.fixture
def celeba(tmp_path):
    """24 synthetic 178 x 218 'faces', an official-style partition file, one truncated JPEG
    and one file listed but missing."""
    src = tmp_path / "celeba" / "img_align_celeba"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(1, 25):
        name = f"{k:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(src / name)
        lines.append(f"{name} {0 if k <= 16 else 1 if k <= 20 else 2}")
    data = (src / "000003.jpg").read_bytes()
    (src / "000003.jpg").write_bytes(data[: len(data) // 2])         # corrupted
    (src / "000005.jpg").unlink()                                     # missing
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "celeba"


def prepare(*args):
    return run_in_process("prepare_celeba.py", *args, "-j", "2", "--skip-download")


def expected_image(path, crop=148, size=32):
    """Independent reference: numpy centre crop, then PIL's antialiased bilinear resize."""
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w = a.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    img = Image.fromarray(a[top:top + crop, left:left + crop]).resize((size, size), Image.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


def test_prepare_writes_arrays_and_reports_bad_files(celeba, tmp_path):
    out = tmp_path / "out"
    result = prepare("--src", str(celeba), "-o", str(out), "--image-size", "32", "--chunk-size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "train_data.npz") as z:
        images, names = z["images"], list(z["filenames"])
    assert images.dtype == np.uint8 and images.shape == (14, 3, 32, 32)
    assert "000003.jpg" not in names and "000005.jpg" not in names and len(names) == 14
    src = celeba / "img_align_celeba"
    assert np.array_equal(images[names.index("000007.jpg")], expected_image(src / "000007.jpg"))
    with np.load(out / "eval_data.npz") as z:                    # partition 1 only by default
        assert list(z["filenames"]) == [f"{k:06d}.jpg" for k in range(17, 21)]
    report = json.loads((out / "report.json").read_text())
    skipped = {p["file"]: p["problem"] for p in report["splits"]["train"]["skipped"]}
    assert skipped["000005.jpg"] == "missing" and skipped["000003.jpg"].startswith("unreadable")
    mapped = np.load(out / "train_data.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)
    dataset = CelebAArrays(str(out / "train_data.npy"), 32)
    assert len(dataset) == 14
    assert all(torch.equal(dataset[i][0], torch.from_numpy(images[i])) for i in range(14))
    with pytest.raises(DataError, match="re-run prepare_celeba.py --image-size 64"):
        CelebAArrays(str(out / "train_data.npy"), 64)


@pytest.mark.slow
def test_interrupted_run_resumes_from_finished_chunks(celeba, tmp_path):
    out, chunks = tmp_path / "out", tmp_path / "chunks"
    args = ["--src", str(celeba), "-o", str(out), "--image-size", "32", "--chunk-size", "5",
            "--checkpoint-dir", str(chunks)]
    assert prepare(*args).returncode == 0
    reference = np.load(out / "train_data.npy")
    # as if killed after the first chunks: later chunks and the outputs are gone ...
    for name in ("train_32px_crop148_00002", "train_32px_crop148_00003",
                 "eval_32px_crop148_00000"):
        (only,) = chunks.glob(f"{name}_*.npz")                 # named by their content too
        only.unlink()
    for name in os.listdir(out):
        os.remove(out / name)
    # ... and a finished chunk's source changed: a resumed run must not redo that chunk
    src = celeba / "img_align_celeba"
    Image.new("RGB", (178, 218), (255, 0, 0)).save(src / "000001.jpg")
    result = prepare(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(out / "train_data.npy"), reference)
    assert (out / "eval_data.npz").exists()
    # other settings never reuse those chunks: the changed 000001.jpg is read this time
    result = prepare(*args[:-4], "--crop", "120", *args[-4:])
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "train_data.npz") as z:
        first = z["images"][list(z["filenames"]).index("000001.jpg")]
    assert np.array_equal(first, expected_image(src / "000001.jpg", crop=120))
    # nor another eval split, chunk size or partition: the eval arrays are those of a fresh run
    for other in (["--eval-split", "test"], ["--eval-split", "test", "--chunk-size", "2"]):
        again = [*args[:-4], "--chunk-size", "5", "--checkpoint-dir", str(chunks), *other]
        assert prepare(*again).returncode == 0
        fresh = tmp_path / f"fresh_{len(other)}"
        assert prepare("--src", str(celeba), "-o", str(fresh), "--image-size", "32",
                       *other).returncode == 0
        with np.load(out / "eval_data.npz") as a, np.load(fresh / "eval_data.npz") as b:
            assert np.array_equal(a["images"], b["images"]) and len(a["images"]) > 0
        assert json.loads((out / "report.json").read_text())["eval_split"] == "test"


def test_zip_source_gives_the_same_arrays(celeba, tmp_path):
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in sorted(os.listdir(celeba / "img_align_celeba")):
            z.write(celeba / "img_align_celeba" / name, f"img_align_celeba/{name}")
    assert prepare("--src", str(celeba), "-o", str(tmp_path / "a"), "--image-size", "32").returncode == 0
    result = prepare("--src", str(archive), "-o", str(tmp_path / "b"), "--image-size", "32",
                     "--partition", str(celeba / "list_eval_partition.txt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "a" / "train_data.npy"),
                          np.load(tmp_path / "b" / "train_data.npy"))


def test_missing_source_and_download_without_gdown_are_clear(tmp_path):
    result = prepare("--src", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_in_process("prepare_celeba.py", "--src", str(tmp_path / "celeba.zip"), "-o",
                        str(tmp_path / "o"), "--gdrive-url", "https://example.invalid/x")
    assert result.returncode == 2 and "pip install gdown" in result.stderr


def test_trains_and_evaluates_on_celeba_arrays(celeba, tmp_path):
    out = tmp_path / "arrays"
    assert prepare("--src", str(celeba), "-o", str(out), "--image-size", "32").returncode == 0
    cfg = tiny_config(str(out), str(tmp_path / "logs"), **{
        "data_params.dataset": "celeba", "data_params.train_batch_size": 4,
        "data_params.val_batch_size": 4, "trainer_params.max_steps": 4,
        "data_params.num_workers": 1})
    result = run_in_process("train_single_gpu.py", "--config", write_config(tmp_path / "c.yaml", cfg),
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_in_process("evaluate.py", "--checkpoint",
                        str(tmp_path / "logs/run/checkpoints/vae_final.pt"), "--output",
                        str(tmp_path / "eval"), "--dataset", "celeba", "--lpips-net", "none", "--fid", "none",
                        "--num-samples", "4", "--device", "cpu", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["dataset"] == "celeba" and report["num_images"] == 4


def test_a_truncated_or_object_array_is_one_line_naming_the_file(tmp_path):
    from errors import DataError
    from image_datasets import CelebAArrays
    good = tmp_path / "train_data.npy"
    np.save(good, np.zeros((4, 3, 8, 8), np.uint8))
    data = good.read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[:len(data) // 2])
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert len(CelebAArrays(str(good), 8)) == 4
    for name in ("truncated.npy", "objects.npy"):
        with pytest.raises(DataError) as info:
            CelebAArrays(str(tmp_path / name), 8)
        message = str(info.value)
        assert str(tmp_path / name) in message and "re-run prepare_celeba.py" in message
        assert "\n" not in message


def test_training_a_3_channel_model_on_grey_arrays_is_one_line(tmp_path):
    from errors import DataError
    from config import config_from_dict
    from runtime import Runtime
    from training import train
    out = tmp_path / "grey"
    out.mkdir()
    for name in ("train_data.npy", "eval_data.npy"):
        np.save(out / name, np.zeros((8, 1, 32, 32), np.uint8))
    cfg = config_from_dict(tiny_config(str(out), str(tmp_path / "logs"), **{
        "data_params.dataset": "celeba", "data_params.train_batch_size": 4}))
    with pytest.raises(DataError, match="holds 1-channel images and model_params.in_channels "
                                        "is 3"):
        train(cfg, Runtime())
    assert not (tmp_path / "logs").exists()
