"""compare_with_laq.py against a stand-in laq_model package with the published interface:
hard-coded 'cuda' quantizer, trainer-only imports in __init__, non-strict loading, 'module.'
prefixes. If the comparison would fail on a real LAQ checkout, these tests fail."""
import csv
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_in_process, run_script
import laq_loader

STANDIN = os.path.join(ROOT, "tests", "laq_standin")
SMALL_LAQ = {"dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
             "spatial_depth": 2, "temporal_depth": 1, "dim_head": 8, "heads": 2, "code_seq_len": 4}
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def decoded(path, size):
    """A frame as PIL decodes it, stretched to size x size by torch's antialiased bilinear
    resize on uint8 (the documented preparation), without the project's frame code."""
    from PIL import Image
    rgb = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    return torch.nn.functional.interpolate(rgb[None], size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def build_standin(config):
    cls = laq_loader.import_laq_class(os.path.join(STANDIN, "laq_model"))
    with laq_loader.RedirectCuda("cpu"):
        return cls(**config)


@pytest.fixture(scope="module")
def laq_checkpoint(tmp_path_factory):
    """A LAPA-style checkpoint: a plain state_dict saved from a DDP-wrapped model (the script
    the README offers for trying the comparison without a LAQ)."""
    folder = tmp_path_factory.mktemp("laq")
    spec = importlib.util.spec_from_file_location("make_demo_laq",
                                                  os.path.join(STANDIN, "make_demo_laq.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.make_demo_laq(str(folder), SMALL_LAQ)
    return folder


def compare_cli(*args, env=None):
    if env:
        return run_script("compare_with_laq.py", *args, "--device", "cpu", env={**NO_GPU, **env})
    return run_in_process("compare_with_laq.py", *args, "--device", "cpu")


def test_trainer_dependencies_are_really_absent():
    assert importlib.util.find_spec("accelerate") is None   # so importing laq_model/__init__ fails


def test_quantizer_asks_for_cuda_and_is_redirected():
    cls = laq_loader.import_laq_class(os.path.join(STANDIN, "laq_model"))
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            cls(**SMALL_LAQ)                               # what a plain construction does
    model = build_standin(SMALL_LAQ)
    assert model.vq.codebooks.device.type == "cpu" and model.vq.codebooks_used.device.type == "cpu"


@pytest.mark.slow
def test_pairs_from_the_validation_split(trained_checkpoint, laq_checkpoint, demo_data, tmp_path):
    out = tmp_path / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--data-path", demo_data, "--num-pairs", "6", "--offset", "4", "--pairs", "exact",
                         "--output", str(out), "--lpips-random-backbone", "--batch-size", "4",
                         "--fid-random-backbone", "--vae-resize", "stretch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LAQ codes" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["pairs"] == 6 and report["inputs"]["identity_clip"] is False
    for model in ("vae", "laq"):
        for name in ("mse", "psnr", "ssim", "gmsd", "lpips"):
            assert {"mean", "std", "ci95"} <= set(report[model][name]), (model, name)
    assert report["checkpoints"]["laq_keys"] == {"layout": "state_dict", "missing_keys": [],
                                                 "unexpected_keys": [],
                                                 "package": os.path.join(STANDIN, "laq_model")}
    laq_latent = report["latent"]["laq"]
    assert sum(laq_latent["histogram"]) == 6 * SMALL_LAQ["code_seq_len"]
    assert 1 <= laq_latent["unique_codes"] <= 8 and report["latent"]["vae"]["latent_dim"] == 8
    assert (out / "comparison.png").stat().st_size > 10_000
    assert report["rfid"]["vae"] is not None and report["rfid"]["laq"] is not None
    assert "random backbone" in report["rfid"]["backbone"] and report["rfid"]["images"] == 6

    # every pair is `offset` frames apart in one validation video
    val_ids = {e["id"] for e in json.load(open(os.path.join(
        demo_data, "something-something-v2-validation.json")))}
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    for row in rows:
        assert os.path.dirname(row["current"]) == os.path.dirname(row["target"])
        assert os.path.basename(os.path.dirname(row["current"])) in val_ids
        number = lambda p: int(os.path.basename(p)[4:9])  # noqa: E731
        assert number(row["target"]) - number(row["current"]) == 4

    # LAQ's numbers: recompute one pair with the stand-in model's own inference, fed as
    # LAPA feeds it (whole frames stretched to a square); both models saw stretch frames here
    assert report["resize"] == {"vae": "stretch", "laq": "stretch"}
    assert report["scoring_target"] == "stretch"
    model = build_standin(SMALL_LAQ)
    state = torch.load(laq_checkpoint / "model.pt", weights_only=True)
    model.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    row = rows[0]
    frames = [decoded(row[k], 32).float() / 255 for k in ("current", "target")]
    with torch.no_grad():
        recon = model.eval().inference(torch.stack(frames, 1)[None]).clamp(0, 1)
    assert float(((recon[0] - frames[1]) ** 2).mean()) == pytest.approx(float(row["laq_mse"]), rel=1e-5)


@pytest.mark.slow
def test_seed_one_line_form_with_an_installed_laq_model(trained_checkpoint, tmp_path):
    """`--vae V --laq L --image IMG --output DIR`, LAQ found on the path, LAPA's hyperparameters."""
    torch.manual_seed(1)
    model = build_standin(laq_loader.LAPA_LAQ_CONFIG)
    torch.save(model.state_dict(), tmp_path / "laq.pt")
    image = tmp_path / "frame.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(image)
    result = run_script("compare_with_laq.py", "--vae", trained_checkpoint, "--laq",
                        str(tmp_path / "laq.pt"), "--image", str(image), "--output",
                        str(tmp_path / "out"), "--lpips-net", "none", "--fid", "none",
                        env={**NO_GPU, "PYTHONPATH": STANDIN})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identity clip" in result.stdout
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["inputs"]["identity_clip"] is True and report["pairs"] == 1
    assert report["laq_config"] == laq_loader.LAPA_LAQ_CONFIG
    assert report["image_sizes"] == {"vae": 32, "laq": 256} and report["scoring_size"] == 32
    # one image: no claim about active units (a variance over one image), no rFID
    assert report["latent"]["vae"]["active_units"] is None
    assert not re.search(r"\d+/\d+ active units", result.stdout)
    assert "active units need more than one image" in result.stdout
    assert report["rfid"] == {"backbone": "skipped with --fid none"}


@pytest.mark.slow
def test_laqs_own_pairs_are_one_per_video_with_the_second_frame_clamped(
        trained_checkpoint, laq_checkpoint, demo_data, tmp_path):
    """--pairs laq (the default): one pair per video, the first frame anywhere in it, the second
    at min(first + offset, last frame), as LAQ's loader draws its training pairs."""
    def run(name, *extra):
        result = compare_cli("--vae", trained_checkpoint, "--laq",
                             str(laq_checkpoint / "model.pt"), "--laq-repo", STANDIN, "--laq-config",
                             str(laq_checkpoint / "laq.yaml"), "--data-path", demo_data,
                             "--split", "train", "--offset", "6", "--output", str(tmp_path / name),
                             "--lpips-net", "none", "--fid", "none", "--controllability", "none",
                             *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return (json.loads((tmp_path / name / "metrics.json").read_text()),
                list(csv.DictReader(open(tmp_path / name / "per_pair.csv"))))

    report, rows = run("a")
    train_ids = {str(e["id"]) for e in json.load(open(os.path.join(
        demo_data, "something-something-v2-train.json")))}
    assert report["inputs"]["pairs"] == "laq" and "min(first + offset" in \
        report["inputs"]["pairs_note"]
    assert sorted(r["video"] for r in rows) == sorted(train_ids)          # one per video
    for r in rows:                                       # 10 frames a video, numbered from 1
        assert int(r["target_frame"]) == min(int(r["current_frame"]) + 6, 10)
    assert [r["current"] for r in run("b")[1]] == [r["current"] for r in rows]   # seeded
    exact, exact_rows = run("c", "--pairs", "exact", "--num-pairs", "12")
    assert exact["inputs"]["pairs"] == "exact"
    assert all(int(r["target_frame"]) - int(r["current_frame"]) == 6 for r in exact_rows)


@pytest.mark.slow
def test_identity_pairs_are_counted_and_left_out_of_the_means(
        trained_checkpoint, laq_checkpoint, demo_data, tmp_path):
    """Videos cut to one frame give pairs whose future frame is the current one (LAQ's clamp):
    counted, marked in per_pair.csv, scored apart, and out of every other number unless
    --keep-identity-pairs."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    train_ids = [str(e["id"]) for e in json.load(open(data / "something-something-v2-train.json"))]
    for vid in train_ids[:3]:
        for frame in sorted((data / vid).iterdir())[1:]:
            frame.unlink()

    def run(name, *extra, data=data):
        result = compare_cli("--vae", trained_checkpoint, "--laq",
                             str(laq_checkpoint / "model.pt"), "--laq-repo", STANDIN, "--laq-config",
                             str(laq_checkpoint / "laq.yaml"), "--data-path", str(data),
                             "--split", "train", "--offset", "6", "--output", str(tmp_path / name),
                             "--lpips-net", "none", "--fid", "none", "--controllability", "none",
                             *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return (json.loads((tmp_path / name / "metrics.json").read_text()),
                list(csv.DictReader(open(tmp_path / name / "per_pair.csv"))), result.stdout)

    report, rows, printed = run("apart")
    same = [r for r in rows if r["current_frame"] == r["target_frame"]]
    rest = [r for r in rows if r["current_frame"] != r["target_frame"]]
    assert len(same) >= 3 and {r["video"] for r in same} >= set(train_ids[:3])
    assert [r["identity_pair"] for r in same] == ["1"] * len(same)
    assert {r["identity_pair"] for r in rest} == {"0"}
    identity = report["identity_pairs"]
    assert identity["count"] == len(same) and identity["left_out"]
    assert report["pairs"] == len(rest) and "identity pairs" in printed
    assert report["baselines"]["copy_current"]["psnr"]["mean"] == pytest.approx(
        np.mean([float(r["copy_current_psnr"]) for r in rest]))
    assert identity["psnr"]["copy_current"]["mean"] == pytest.approx(
        np.mean([float(r["copy_current_psnr"]) for r in same]))
    # the probe is tested on one pair per val video: a one-frame val video gives only an
    # identity pair, which the probe leaves out as well
    cut_val = tmp_path / "cut_val"
    shutil.copytree(demo_data, cut_val)
    val_ids = [str(e["id"]) for e in json.load(open(cut_val / "something-something-v2-validation.json"))]
    for frame in sorted((cut_val / val_ids[0]).iterdir())[1:]:
        frame.unlink()
    probed, _, _ = run("probe", "--probe", data=cut_val)
    assert probed["probe"]["test_videos"] == probed["probe"]["test_pairs"] == len(val_ids) - 1
    kept, kept_rows, _ = run("kept", "--keep-identity-pairs")
    assert kept["pairs"] == len(kept_rows) == len(rows) and not kept["identity_pairs"]["left_out"]
    assert kept["identity_pairs"]["count"] == len(same)
    assert kept["baselines"]["copy_current"]["psnr"]["mean"] == pytest.approx(
        np.mean([float(r["copy_current_psnr"]) for r in kept_rows]))


def test_wrong_checkpoint_is_reported_with_its_missing_keys(trained_checkpoint, laq_checkpoint,
                                                            demo_data, tmp_path):
    """LAQ loads non-strictly: a VAE checkpoint passed as --laq must not load silently. Inputs
    are looked at before anything is loaded: a missing frame is named first."""
    video = os.path.join(demo_data, sorted(os.listdir(demo_data))[0])
    frames = [os.path.join(video, "img_00001.jpg"), os.path.join(video, "img_00003.jpg")]
    common = ["--vae", trained_checkpoint, "--laq", trained_checkpoint, "--laq-repo", STANDIN,
              "--laq-config", str(laq_checkpoint / "laq.yaml"), "--output", str(tmp_path / "o"),
              "--lpips-net", "none", "--fid", "none"]
    result = compare_cli(*common, "--frames", *frames)
    expected = len(build_standin(SMALL_LAQ).state_dict())
    assert result.returncode == 2
    assert f"{expected} missing keys" in result.stderr and not (tmp_path / "o").exists()
    missing = compare_cli(*common, "--frames", frames[0], str(tmp_path / "b.jpg"))
    assert missing.returncode == 2 and not (tmp_path / "o").exists()
    assert missing.stderr == f"error: --frames {tmp_path / 'b.jpg'} does not exist\n"


def test_bad_laq_config_and_repo_are_one_line_errors(laq_checkpoint, tmp_path):
    (tmp_path / "bad.yaml").write_text("dim: 32\nnum_layers: 3\n")
    with pytest.raises(laq_loader.LaqError, match="num_layers is not an argument"):
        laq_loader.laq_config(str(tmp_path / "bad.yaml"), laq_loader.import_laq_class(
            os.path.join(STANDIN, "laq_model")))
    (tmp_path / "odd.yaml").write_text("code_seq_len: 3\n")
    with pytest.raises(laq_loader.LaqError, match="code_seq_len 3 is not one of"):
        laq_loader.laq_config(str(tmp_path / "odd.yaml"), laq_loader.import_laq_class(
            os.path.join(STANDIN, "laq_model")))
    with pytest.raises(laq_loader.LaqError, match="has no laq_model/ folder"):
        laq_loader.find_laq_package(str(tmp_path))


def test_missing_model_dependency_is_named_as_laqs(monkeypatch):
    monkeypatch.setitem(sys.modules, "einops", None)     # as if einops were not installed
    with pytest.raises(laq_loader.LaqError, match="needs the Python module 'einops', a dependency of LAQ"):
        laq_loader.import_laq_class(os.path.join(STANDIN, "laq_model"))


@pytest.mark.slow
def test_pairs_come_from_the_vae_runs_own_split(trained_checkpoint, laq_checkpoint, demo_data,
                                                tmp_path):
    """Label files in their own folder (the usual SthV2 layout): the comparison must use the
    split the VAE trained with, not a hash split of the frames folder."""
    import shutil
    frames, labels = tmp_path / "frames", tmp_path / "labels"
    shutil.copytree(demo_data, frames, ignore=shutil.ignore_patterns("*.json"))
    labels.mkdir()
    for name in ("something-something-v2-train.json", "something-something-v2-validation.json"):
        shutil.copy(os.path.join(demo_data, name), labels / name)
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    ckpt["config"]["data_params"].update(data_path=str(frames), labels_path=str(labels))
    torch.save(ckpt, tmp_path / "vae.pt")
    out = tmp_path / "cmp"
    result = compare_cli("--vae", str(tmp_path / "vae.pt"), "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--data-path", str(frames), "--num-pairs", "8", "--offset", "2",
                         "--output", str(out), "--lpips-net", "none", "--fid", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = {split: {e["id"] for e in json.load(open(labels / f"something-something-v2-{name}.json"))}
           for split, name in (("train", "train"), ("val", "validation"))}
    inputs = json.loads((out / "metrics.json").read_text())["inputs"]
    assert inputs["split"] == "val" and str(labels) in inputs["split_source"]
    assert inputs["videos"] and set(inputs["videos"]) <= ids["val"]
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    assert {os.path.basename(os.path.dirname(r["target"])) for r in rows} <= ids["val"]
    train = compare_cli("--vae", str(tmp_path / "vae.pt"), "--laq", str(laq_checkpoint / "model.pt"),
                        "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                        "--data-path", str(frames), "--split", "train", "--num-pairs", "4",
                        "--offset", "2", "--output", str(tmp_path / "train"), "--lpips-net", "none",
                        "--fid", "none")
    assert train.returncode == 0, train.stderr[-3000:]
    used = json.loads((tmp_path / "train" / "metrics.json").read_text())["inputs"]["videos"]
    assert used and set(used) <= ids["train"]


# --- fairness: geometry, LAQ's checkpoint layouts, one pass, LAQ's training videos -----------

def test_stretch_output_maps_back_onto_the_centre_square():
    from frame_files import resize_frame
    from pairs import stretch_to_crop
    y, x = np.mgrid[0:120, 0:200].astype(np.float32)                   # a smooth 200x120 frame
    frame = torch.from_numpy(np.stack([127 + 100 * np.sin(x / 17), 127 + 100 * np.cos(y / 13),
                                       x / 200 * 255]).round().astype(np.uint8))
    stretched = resize_frame(frame, 96, "stretch")[None].float() / 255
    crop = resize_frame(frame, 96, "crop")[None].float() / 255
    mapped = stretch_to_crop(stretched, [(120, 200)])
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    assert mse(mapped, crop) < 1e-4 < mse(stretched, crop) / 100       # PSNR > 40 dB
    square = resize_frame(frame[:, :, :120], 96, "stretch")[None].float() / 255
    assert torch.allclose(stretch_to_crop(square, [(120, 120)]), square, atol=1e-6)


def test_one_inference_pass_gives_laqs_own_codes_and_reconstruction():
    torch.manual_seed(0)
    model = build_standin(SMALL_LAQ).eval()
    clip = torch.rand(3, 3, 2, 32, 32)
    runner = laq_loader.LaqRunner(model)
    calls = []
    original = type(model).inference
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "inference", lambda self, *a, **k: calls.append(k) or
                   original(self, *a, **k))
        recon, codes, features, current = runner(clip)
    assert len(calls) == 1 and runner.passes == 1
    assert torch.equal(recon, model.inference(clip))
    assert torch.equal(codes, model.inference(clip, return_only_codebook_ids=True))
    first, last = model._encode(clip)[1:]                     # the action LAQ quantizes
    action = model.vq.encode(last, 3) - model.vq.encode(first, 3)
    assert torch.allclose(features, action.reshape(3, -1))
    assert torch.allclose(current, model.vq.encode(first, 3).reshape(3, -1))
    assert features.shape == (3, SMALL_LAQ["code_seq_len"] * SMALL_LAQ["quant_dim"])
    # another pair's action: each current frame decoded with the quantised action of pair
    # (i + 2) % 3, computed here from the stand-in's own parts; the codes stay each pair's own
    with torch.no_grad():                 # three codes, each the action of one pair
        model.vq.codebooks[:3] = action.reshape(3, SMALL_LAQ["code_seq_len"], -1)[:, 0]
    recon, codes, _, _ = runner(clip)
    assert len(set(codes[:, 0].tolist())) == 3
    swap = torch.tensor([2, 0, 1])
    swapped, swapped_codes, _, _ = runner(clip, actions_from=swap)
    quantized, _ = model.vq.inference(first, last)
    assert torch.allclose(swapped, model._decode(model._encode(clip)[0], quantized[swap]))
    assert torch.equal(swapped_codes, codes) and not torch.allclose(swapped, recon)
    assert not {"inference", "encode"} & set(vars(model.vq))  # the wrappers are gone afterwards


def laq_args(path, config_path, **extra):
    import argparse
    return argparse.Namespace(laq=str(path), laq_repo=STANDIN, laq_config=str(config_path),
                              laq_weights=extra.get("weights", "ema"),
                              laq_allow_unused_keys=extra.get("allow_unused", False))


def test_ema_files_and_trainer_packages_load_the_weights_asked_for(laq_checkpoint, tmp_path):
    torch.manual_seed(1)
    ema, online = build_standin(SMALL_LAQ).state_dict(), build_standin(SMALL_LAQ).state_dict()
    torch.save({**{f"ema_model.{k}": v for k, v in ema.items()},
                **{f"online_model.{k}": v for k, v in online.items()},
                "initted": torch.tensor(True), "step": torch.tensor(1200)}, tmp_path / "vae.1200.ema.pt")
    config = laq_checkpoint / "laq.yaml"
    for weights, expected in (("ema", ema), ("online", online)):
        model, _, report = laq_loader.load_laq(laq_args(tmp_path / "vae.1200.ema.pt", config,
                                                        weights=weights), "cpu")
        assert report["layout"] == f"ema-pytorch EMA file, {weights} weights"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    torch.save({"model": {f"module.{k}": v for k, v in ema.items()}, "optim": {}, "steps": 5},
               tmp_path / "package.pt")
    model, _, report = laq_loader.load_laq(laq_args(tmp_path / "package.pt", config), "cpu")
    assert report["layout"] == "package ['model']"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    with pytest.raises(laq_loader.LaqError, match="not an EMA file"):
        laq_loader.load_laq(laq_args(tmp_path / "package.pt", config, weights="online"), "cpu")


def test_a_deeper_checkpoint_is_refused_naming_its_extra_blocks(laq_checkpoint, tmp_path):
    deeper = build_standin({**SMALL_LAQ, "spatial_depth": 4}).state_dict()
    torch.save(deeper, tmp_path / "deep.pt")
    config = laq_checkpoint / "laq.yaml"                         # spatial_depth 2
    with pytest.raises(laq_loader.LaqError) as info:
        laq_loader.load_laq(laq_args(tmp_path / "deep.pt", config), "cpu")
    message = str(info.value)
    assert f"4 keys the model built with --laq-config {config} does not use, in enc.2, enc.3" \
        in message
    assert "--laq-allow-unused-keys" in message and "\n" not in message
    # the keys are checked before any weight is read: the file is memory-mapped
    loads = []
    real_load = torch.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
        with pytest.raises(laq_loader.LaqError):
            laq_loader.load_laq(laq_args(tmp_path / "deep.pt", config), "cpu")
    assert [k.get("mmap") for k in loads] == [True]
    # without --laq-config the message says which settings the model was built with
    small = build_standin({**SMALL_LAQ, "spatial_depth": 1}).state_dict()
    torch.save(small, tmp_path / "small.pt")
    args = laq_args(tmp_path / "small.pt", config)
    args.laq_config = None
    with pytest.raises(laq_loader.LaqError) as info:
        laq_loader.load_laq(args, "cpu")
    assert "LAPA's SthV2 settings (no --laq-config given)" in str(info.value)
    assert "pass the checkpoint's settings with --laq-config YAML" in str(info.value)
    model, _, report = laq_loader.load_laq(laq_args(tmp_path / "deep.pt", config,
                                                    allow_unused=True), "cpu")
    assert len(report["unexpected_keys"]) == 4
    assert torch.equal(model.state_dict()["enc.1.0.weight"], deeper["enc.1.0.weight"])


@pytest.mark.slow
def test_full_comparison_outputs_on_demo_data(trained_checkpoint, laq_checkpoint, demo_data,
                                              tmp_path):
    """Defaults (each model fed as trained), LAQ's training videos left out, the probe, the
    pictures and TensorBoard."""
    val_ids = sorted(e["id"] for e in json.load(open(os.path.join(
        demo_data, "something-something-v2-validation.json"))))
    (tmp_path / "laq_train.txt").write_text(f"{val_ids[0]}\n")
    out = tmp_path / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--data-path", demo_data, "--num-pairs", "50", "--offset", "3", "--pairs", "exact",
                         "--laq-train-videos", str(tmp_path / "laq_train.txt"), "--probe",
                         "--probe-pairs", "40", "--output", str(out), "--lpips-net", "none",
                         "--fid", "none", "--tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["resize"] == {"vae": "crop", "laq": "stretch"}          # as each was trained
    assert report["scoring_target"] == "crop" and "centre square" in report["scoring_note"]
    assert "note: the models see differently prepared frames" in result.stdout
    overlap = report["inputs"]["laq_training_overlap"]
    assert overlap["excluded"] and overlap["dropped_videos"] == 1 and overlap["dropped_pairs"] == 7
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    assert len(rows) == report["pairs"] == 7 and {r["video"] for r in rows} == {val_ids[1]}
    templates = {e["id"]: e["template"] for e in json.load(open(os.path.join(
        demo_data, "something-something-v2-validation.json")))}
    for row in rows:
        assert row["label"] == templates[row["video"]]
        assert int(row["target_frame"]) - int(row["current_frame"]) == 3
        assert len(row["laq_codes"].split()) == SMALL_LAQ["code_seq_len"]
    assert report["rate"]["laq"]["bound_bits"] == SMALL_LAQ["code_seq_len"] * 3   # 4 x log2(8)
    assert 0 <= report["rate"]["laq"]["code_entropy_bits"] <= 12
    kl_bits = np.mean([float(r["vae_kl_bits"]) for r in rows])
    assert report["rate"]["vae"]["kl_bits_mean"] == pytest.approx(kl_bits, rel=1e-6)
    nats = report["latent"]["vae"]["kl_total"]          # from the posteriors' mu and logvar
    assert kl_bits == pytest.approx(nats / math.log(2), rel=1e-5)           # bits, not nats
    assert f"KL {nats:.2f} nats = {nats / math.log(2):.2f} bits" in result.stdout
    assert report["rfid"] == {"backbone": "skipped with --fid none"}
    probe = json.loads((out / "probe.json").read_text())
    import hashlib
    manifest = report["manifest"]
    assert probe["manifest"] == manifest
    assert manifest["files"]["vae"]["sha256"] == \
        hashlib.sha256(open(trained_checkpoint, "rb").read()).hexdigest()
    assert manifest["files"]["laq"]["sha256"] == \
        hashlib.sha256(open(laq_checkpoint / "model.pt", "rb").read()).hexdigest()
    assert manifest["labels"]["something-something-v2-validation.json"] == hashlib.sha256(
        open(os.path.join(demo_data, "something-something-v2-validation.json"), "rb").read()
    ).hexdigest()
    assert manifest["laq_checkout"]["path"] == STANDIN and "commit" in manifest["laq_checkout"]
    assert manifest["frame_index"]["videos"] == 6
    assert set(probe["feature_sets"]) == {"vae_mu_current_future", "vae_mu_difference",
                                          "laq_codes_onehot", "laq_action_continuous",
                                          "vae_mu_current", "laq_current_tokens"}
    assert probe["chance"]["top1"] == 0.25 and probe["test_pairs"] == 7
    assert (out / "plots.png").stat().st_size > 20_000 and (out / "comparison.png").exists()
    assert os.listdir(tmp_path / "tb") and os.listdir(out / "probe_cache")
    assert report["laq_passes"] == 1 and report["pairs_per_sec"] > 0
    # the same comparison in chunks of another size, into the same folder: the cached chunks
    # of the first run are not reused under another chunking, and the probe agrees
    rechunked = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                            "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                            "--data-path", demo_data, "--num-pairs", "50", "--offset", "3",
                            "--pairs", "exact", "--laq-train-videos", str(tmp_path / "laq_train.txt"),
                            "--probe", "--probe-pairs", "40", "--output", str(out), "--lpips-net",
                            "none", "--fid", "none", "--batch-size", "3",
                            "--controllability", "none")
    assert rechunked.returncode == 0, rechunked.stderr[-3000:]
    again = json.loads((out / "probe.json").read_text())
    assert {n: s["top1"] for n, s in again["feature_sets"].items()} == \
        {n: s["top1"] for n, s in probe["feature_sets"].items()}
    assert len({name.split("_")[1] for name in os.listdir(out / "probe_cache")}) == 4  # 2 x 2 splits

    again = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                        "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                        "--data-path", demo_data, "--num-pairs", "4", "--offset", "3",
                        "--output", str(tmp_path / "plain"), "--lpips-net", "none", "--fid",
                        "none")
    assert again.returncode == 0, again.stderr[-3000:]
    overlap = json.loads((tmp_path / "plain" / "metrics.json").read_text())["inputs"][
        "laq_training_overlap"]
    assert not overlap["excluded"] and "were in its training data" in overlap["note"]
    assert "were in its training data" in again.stdout


@pytest.fixture(scope="module")
def action_models(demo_data, tmp_path_factory):
    """{bottleneck: vae_final.pt} of two tiny latent action models trained here (stretch,
    32 px, offset 3), named lam_<bottleneck>."""
    from config import config_from_dict
    from conftest import tiny_config
    from runtime import Runtime
    from training import train
    save_dir = str(tmp_path_factory.mktemp("lam"))
    paths = {}
    for bottleneck in ("nsvq", "gaussian", "none"):
        cfg = tiny_config(demo_data, save_dir, **{
            "data_params.frame_offset": 3, "data_params.resize": "stretch",
            "trainer_params.max_steps": 4, "logging_params.name": f"lam_{bottleneck}"})
        cfg["model_params"] = {**SMALL_LAQ, "name": "LatentActionModel", "bottleneck": bottleneck}
        paths[bottleneck] = train(config_from_dict(cfg), Runtime())
    return paths


@pytest.fixture(scope="module")
def lam_comparison(trained_checkpoint, laq_checkpoint, action_models, demo_data,
                   tmp_path_factory):
    """(output folder, CompletedProcess) of a comparison of the VAE, LAQ and both latent
    action models on 8 pairs, with the probe."""
    out = tmp_path_factory.mktemp("lam_comparison") / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--model", action_models["nsvq"], "--model", action_models["gaussian"],
                         "--model", action_models["none"],
                         "--data-path", demo_data, "--num-pairs", "8", "--offset", "3", "--pairs", "exact",
                         "--vae-resize", "stretch", "--probe", "--probe-pairs", "20",
                         "--output", str(out), "--lpips-net", "none",
                         "--fid-random-backbone")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_latent_action_models_are_extra_rows_of_the_same_comparison(
        trained_checkpoint, laq_checkpoint, action_models, lam_comparison, tmp_path):
    out, result = lam_comparison
    report = json.loads((out / "metrics.json").read_text())
    assert report["models"] == {"vae": "VAE", "laq": "LAQ", "lam_nsvq": "lam_nsvq",
                                "lam_gaussian": "lam_gaussian", "lam_none": "lam_none"}
    # the action's worth: each model with an action against its no-action twin, by hand
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    worth = report["action_worth"]
    assert {m: w["twin"] for m, w in worth.items() if m != "method"} == {   # the stand-in
        "laq": "lam_none", "lam_nsvq": "lam_none", "lam_gaussian": "lam_none"}  # LAQ's sizes
    for m in ("lam_nsvq", "lam_gaussian"):
        assert worth[m]["psnr"]["mean_difference"] == pytest.approx(np.mean(
            [float(r[f"{m}_psnr"]) - float(r["lam_none_psnr"]) for r in rows]))
    assert "does the action help? lam_nsvq - lam_none (no action)" in result.stdout
    assert report["rate"]["lam_none"]["kl_bits_mean"] == 0 and "0 (no action)" in result.stdout
    assert "lam_none_psnr_other_action" not in rows[0]
    settings = report["settings"]           # each family lists the settings it uses
    assert {"kld_weight", "LR"} <= set(settings["vae"]["settings"])
    assert "LR" in settings["lam_nsvq"]["settings"]
    assert not {"kld_weight"} & {k for m in ("lam_nsvq", "lam_gaussian", "lam_none")
                                 for k in settings[m]["settings"]}
    assert report["resize"] == dict.fromkeys(report["models"], "stretch")
    for name in ("lam_nsvq", "lam_gaussian"):
        assert {"mean", "std", "ci95"} <= set(report[name]["psnr"]), name
        assert report["rfid"][name] is not None and name in result.stdout
    assert "8 images cannot estimate" in report["rfid"]["warning"]      # 8 pairs, not 1,000
    assert f"warning: {report['rfid']['warning']}" in result.stdout
    nsvq_rate, gaussian_rate = report["rate"]["lam_nsvq"], report["rate"]["lam_gaussian"]
    assert nsvq_rate["bound_bits"] == 12 and \
        0 <= nsvq_rate["code_entropy_joint_bits"] <= nsvq_rate["code_entropy_bits"] + 1e-9 <= 12
    assert sum(report["latent"]["lam_nsvq"]["histogram"]) == 8 * SMALL_LAQ["code_seq_len"]
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    kl_bits = [float(r["lam_gaussian_kl_bits"]) for r in rows]
    assert gaussian_rate["kl_bits_mean"] == pytest.approx(np.mean(kl_bits), rel=1e-5)
    assert all(len(r["lam_nsvq_codes"].split()) == 4 for r in rows)

    # one pair recomputed with the model itself, fed the stretched frames it was trained on
    from evaluation import load_model
    model, _ = load_model(action_models["nsvq"], "cpu")
    row = rows[0]
    frames = [decoded(row[k], 32).float() / 127.5 - 1 for k in ("current", "target")]
    predicted = (model.reconstruct(torch.stack(frames)[None]) + 1).div(2).clamp(0, 1)[0]
    mse = float(((predicted - (frames[1] + 1) / 2) ** 2).mean())
    assert mse == pytest.approx(float(row["lam_nsvq_mse"]), rel=1e-4)
    assert row["lam_nsvq_codes"] == " ".join(
        str(int(c)) for c in model.evaluate_batch(torch.stack(frames)[None])[2]["codes"][0])
    # controllability: the 8 pairs are one batch, and pair 0 is decoded with the action of
    # the batch's last pair
    last = [decoded(rows[-1][k], 32).float() / 127.5 - 1
            for k in ("current", "target")]
    other = (model.predict(frames[0][None], model.infer_actions(torch.stack(last)[None]))
             + 1).div(2).clamp(0, 1)[0]
    psnr = 10 * math.log10(1 / float(((other - (frames[1] + 1) / 2) ** 2).mean()))
    assert psnr == pytest.approx(float(row["lam_nsvq_psnr_other_action"]), rel=1e-4)
    control = report["controllability"]
    assert {"laq", "lam_nsvq", "lam_gaussian"} <= set(control) and "vae" not in control
    own = [float(r["lam_nsvq_psnr"]) for r in rows]
    assert control["lam_nsvq"]["delta_psnr_other_action"]["mean_difference"] == pytest.approx(
        np.mean(own) - np.mean([float(r["lam_nsvq_psnr_other_action"]) for r in rows]))
    assert "delta_psnr_prior_action" in control["lam_gaussian"]
    # baselines by hand: the current frame as the prediction, and the target's mean colour
    current, target = ((f + 1) / 2 for f in frames)
    assert float(row["copy_current_mse"]) == pytest.approx(float(((current - target) ** 2).mean()),
                                                           rel=1e-5)
    mean_colour = target.mean((1, 2), keepdim=True)
    assert float(row["oracle_mean_colour_mse"]) == pytest.approx(
        float(((mean_colour - target) ** 2).mean()), rel=1e-5)
    assert float(row["current_mean_colour_mse"]) == pytest.approx(
        float(((current.mean((1, 2), keepdim=True) - target) ** 2).mean()), rel=1e-5)
    # the current frame's patch means at the models' patch grids (4x4 here), by reshaping
    patched = [b for b in report["baselines"] if b.startswith("current_patches_")]
    assert "current_patches_4x4" in patched
    for name in patched:
        g = int(name.rsplit("x", 1)[1])
        blocks = current.numpy().reshape(3, g, 32 // g, g, 32 // g).mean((2, 4))
        guess = np.repeat(np.repeat(blocks, 32 // g, 1), 32 // g, 2)
        assert float(row[f"{name}_mse"]) == pytest.approx(
            float(((guess - target.numpy()) ** 2).mean()), rel=1e-5)
    # Holm over every two models' PSNR tests, beside each raw p-value
    from stats import holm
    tests = [d["psnr"] for d in report["paired"].values() if isinstance(d, dict)]
    assert [t["p_holm"] for t in tests] == holm([t["p_value"] for t in tests])
    assert all(t["p_holm"] >= t["p_value"] for t in tests) and "Holm" in result.stdout
    beats = [float(r["lam_nsvq_psnr"]) > float(r["copy_current_psnr"]) for r in rows]
    assert report["beats_copy_current"]["lam_nsvq"]["share"] == pytest.approx(np.mean(beats))
    assert report["baselines"]["copy_current"]["psnr"]["mean"] == pytest.approx(
        np.mean([float(r["copy_current_psnr"]) for r in rows]))
    assert report["baselines"]["mean_colour"]["psnr"]["mean"] == pytest.approx(   # its old name
        np.mean([float(r["oracle_mean_colour_psnr"]) for r in rows]))
    assert report["paired"]["vae_vs_laq"]["psnr"]["mean_difference"] == pytest.approx(
        np.mean([float(r["vae_psnr"]) - float(r["laq_psnr"]) for r in rows]))

    probe = json.loads((out / "probe.json").read_text())
    assert {"lam_nsvq_codes_onehot", "lam_nsvq_action_continuous", "lam_gaussian_action_mu"} <= \
        set(probe["feature_sets"])
    assert (out / "comparison.png").stat().st_size > 10_000

    wrong = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                        "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                        "--model", trained_checkpoint, "--image", rows[0]["current"],
                        "--output", str(tmp_path / "wrong"), "--lpips-net", "none", "--fid", "none")
    assert wrong.returncode == 2 and "a VAE goes to --vae" in wrong.stderr
    assert not (tmp_path / "wrong").exists()
    swapped = compare_cli("--vae", action_models["nsvq"], "--laq", str(laq_checkpoint / "model.pt"),
                          "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                          "--image", rows[0]["current"], "--output", str(tmp_path / "swapped"),
                          "--lpips-net", "none", "--fid", "none")
    assert swapped.returncode == 2 and "a LatentActionModel checkpoint" in swapped.stderr \
        and "it goes to --model" in swapped.stderr
    assert not (tmp_path / "swapped").exists()


@pytest.mark.slow
def test_a_comparison_of_latent_action_models_alone(action_models, demo_data, tmp_path):
    """Neither --vae nor --laq: the split comes from the first --model's run, and the action's
    worth is measured against the no-action twin."""
    out = tmp_path / "cmp"
    result = compare_cli("--model", action_models["nsvq"], "--model", action_models["none"],
                         "--data-path", demo_data, "--num-pairs", "8", "--offset", "3",
                         "--pairs", "exact", "--output", str(out), "--lpips-net", "none",
                         "--fid", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["models"] == {"lam_nsvq": "lam_nsvq", "lam_none": "lam_none"}
    assert set(report["checkpoints"]) == {"models"} and "laq_config" not in report
    assert set(report["manifest"]["files"]) == {"lam_nsvq", "lam_none"}
    assert report["inputs"]["split"] == "val" and "laq_training_overlap" not in report["inputs"]
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    assert report["action_worth"]["lam_nsvq"]["psnr"]["mean_difference"] == pytest.approx(
        np.mean([float(r["lam_nsvq_psnr"]) - float(r["lam_none_psnr"]) for r in rows]))
    assert "does the action help? lam_nsvq - lam_none (no action)" in result.stdout
    speed = next(line for line in result.stdout.splitlines() if "pairs/s on" in line)
    assert "LAQ" not in speed                                      # no LAQ passes to count
    assert (out / "plots.png").stat().st_size > 20_000


@pytest.mark.parametrize("args, says", [
    ([], "nothing to compare: give at least one model (--vae, --laq, --model)"),
    (["--model", "m.pt", "--laq-config", "c.yaml"], "--laq-config needs --laq"),
    (["--model", "m.pt", "--vae-resize", "crop"], "--vae-resize needs --vae"),
    (["--laq", "l.pt"], "--data-path with only --laq: name the split with --split-config"),
])
def test_which_models_are_compared_is_checked_first(args, says, tmp_path):
    result = run_script("compare_with_laq.py", *args, "--data-path", str(tmp_path),
                        "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_controllability_is_over_the_pairs_that_have_another_pairs_action():
    """A batch of one pair has no other pair to take an action from: its row has no
    other-action column, and the difference is over the rows that do."""
    from compare_report import controllability_report
    rows = [{"video": "a", "m_psnr": 20.0, "m_psnr_other_action": 18.0},
            {"video": "b", "m_psnr": 22.0, "m_psnr_other_action": 21.0},
            {"video": "c", "m_psnr": 30.0}]                          # the lone last pair
    out = controllability_report(rows, [r["video"] for r in rows], {"m": "M"})
    delta = out["m"]["delta_psnr_other_action"]
    assert delta["mean_difference"] == pytest.approx(1.5) and delta["n"] == 2
    assert out["m"]["psnr"]["mean"] == pytest.approx(24.0)


@pytest.mark.slow
def test_a_grey_latent_action_model_is_fed_grey_frames_and_scored_on_the_colour_target(
        trained_checkpoint, laq_checkpoint, demo_data, tmp_path):
    """channels: 1 (LAQ's key): the comparison feeds the model PIL's luminance of the frames
    it prepares, as training does, and scores its prediction, repeated to 3 channels, on the
    same colour target as every other model."""
    from PIL import Image

    from config import config_from_dict
    from conftest import tiny_config
    from evaluation import load_model
    from runtime import Runtime
    from training import train
    cfg = tiny_config(demo_data, str(tmp_path), **{
        "data_params.frame_offset": 3, "data_params.resize": "stretch",
        "trainer_params.max_steps": 2, "logging_params.name": "lam_grey"})
    cfg["model_params"] = {**SMALL_LAQ, "name": "LatentActionModel", "channels": 1}
    path = train(config_from_dict(cfg), Runtime())
    frame = sorted(glob.glob(os.path.join(demo_data, "*", "*.jpg")))[5]
    out = tmp_path / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--model", path, "--image", frame, "--vae-resize", "stretch",
                         "--output", str(out), "--lpips-net", "none", "--fid", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["channels"] == {"lam_grey": 1} and "luminance" in report["one_channel"]
    row = next(csv.DictReader(open(out / "per_pair.csv")))
    rgb = decoded(frame, 32)
    grey = torch.from_numpy(np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"))
                            .copy())[None]
    model, _ = load_model(path, "cpu")
    x = torch.stack([grey, grey]).float()[None] / 127.5 - 1                  # (1, 2, 1, S, S)
    predicted = (model.reconstruct(x) + 1).div(2).clamp(0, 1)[0].expand(3, -1, -1)
    mse = float(((predicted - rgb.float() / 255) ** 2).mean())
    assert mse == pytest.approx(float(row["lam_grey_mse"]), rel=1e-4)


@pytest.mark.slow
def test_report_groups_runs_that_differ_only_in_their_seed_and_draws_the_figure(
        lam_comparison, tmp_path):
    """Four comparisons made from one real output: the same settings at seeds 1 and 2 (PSNR
    moved by -1 / +1 dB), another kld_weight, and a second LAQ checkpoint."""
    import shutil
    out, _ = lam_comparison
    base = json.loads((out / "metrics.json").read_text())

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        report = json.loads((folder / "metrics.json").read_text())
        change(report)
        (folder / "metrics.json").write_text(json.dumps(report))
        return str(folder)

    def retrained(report, model, tag):           # another checkpoint: another hash
        report["manifest"]["files"][model]["sha256"] = f"{tag}-{model}"

    def seed(k, shift):
        def change(report):
            for m in report["settings"]:
                if report["settings"][m]["seed"] is not None:
                    report["settings"][m]["seed"] = k
                    retrained(report, m, f"seed{k}")
            for m in report["models"]:
                report[m]["psnr"]["mean"] += shift
        return change

    def kld(report):
        report["settings"]["vae"]["settings"]["kld_weight"] = 0.5
        report["rate"]["vae"]["kl_bits_mean"] = 1.0
        retrained(report, "vae", "kld")

    folders = [variant("s1", seed(1, -1.0)), variant("s2", seed(2, 1.0)), variant("kld", kld)]
    result = run_in_process("report.py", *folders, "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    vae = sorted((r for r in rows if r["family"] == "VanillaVAE"), key=lambda r: r["runs"])
    assert [r["runs"] for r in vae] == ["1", "2"]       # kld 0.5 alone; seeds 1 and 2 together
    pair = vae[1]
    assert pair["seeds"] == "1 2"
    assert float(pair["psnr"]) == pytest.approx(base["vae"]["psnr"]["mean"])       # -1 and +1
    assert float(pair["psnr_sd"]) == pytest.approx(math.sqrt(2))                    # sd of +-1
    assert float(pair["rate_bits"]) == pytest.approx(base["rate"]["vae"]["kl_bits_mean"])
    assert float(vae[0]["rate_bits"]) == 1.0
    laq = [r for r in rows if r["family"] == "LAQ"]
    assert len(laq) == 1 and laq[0]["runs"] == "1"        # one LAQ checkpoint, scored thrice
    assert result.stderr.count("scored already; counted once") == 2       # LAQ in s2 and kld
    assert float(laq[0]["rate_bits"]) == pytest.approx(
        base["rate"]["laq"]["code_entropy_joint_bits"])
    families = {r["family"] for r in rows}
    assert {"LatentActionModel (nsvq)", "LatentActionModel (gaussian)"} <= families
    probe = json.loads((out / "probe.json").read_text())["feature_sets"]
    gaussian = next(r for r in rows if r["family"] == "LatentActionModel (gaussian)")
    assert float(gaussian["probe_top1"]) == pytest.approx(
        probe["lam_gaussian_action_mu"]["top1"]["mean"])
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| VanillaVAE |" in table and "## Manifest" in table
    assert (tmp_path / "report" / "rate_distortion.png").stat().st_size > 20_000
    stale = run_in_process("report.py", str(tmp_path), "--output", str(tmp_path / "r2"))
    assert stale.returncode == 2 and "holds no metrics.json" in stale.stderr

    twice = run_in_process("report.py", folders[0], folders[0] + "/", "--output",
                           str(tmp_path / "r3"))
    assert twice.returncode == 0 and "is given twice; counted once" in twice.stderr
    rows = list(csv.DictReader(open(tmp_path / "r3" / "report.csv")))
    assert {r["runs"] for r in rows} == {"1"}

    def broken(name, change):
        folder = variant(name, lambda report: None)
        report = json.loads((tmp_path / name / "metrics.json").read_text())
        (tmp_path / name / "metrics.json").write_text(json.dumps(change(report)))
        result = run_in_process("report.py", folder, "--output", str(tmp_path / f"r_{name}"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]
    path = tmp_path / "null" / "metrics.json"
    assert broken("null", lambda r: None) == \
        f"error: {path} holds NoneType, not a comparison's metrics: run the comparison again"
    assert "lacks rate['vae']" in broken("no_rate", lambda r: {**r, "rate": {}})
    assert "lacks settings['laq']" in broken(
        "no_settings", lambda r: {**r, "settings": {k: v for k, v in r["settings"].items()
                                                    if k != "laq"}})


@pytest.mark.slow
def test_report_reads_a_swept_family_at_laqs_rate_seed_by_seed(lam_comparison, tmp_path,
                                                               monkeypatch):
    """A Gaussian swept over target_rate_bits at two seeds, LAQ at 6 bits: each seed's curve
    read at 6 bits by hand (linear between the swept points), then a t interval over seeds; a
    seed whose rates do not span 6 bits gives nothing; panels without data are not drawn."""
    from scipy.stats import t
    out, _ = lam_comparison
    sweep = [(1, 4.0, 4.0, 10.0), (1, 8.0, 8.0, 14.0), (2, 4.0, 4.5, 11.0), (2, 8.0, 9.0, 13.0),
             (3, 8.0, 7.0, 15.0), (3, 12.0, 11.0, 16.0)]     # (seed, target, measured, PSNR)
    folders = []
    for k, (seed, target, bits, psnr) in enumerate(sweep):
        folder = tmp_path / f"g{k}"
        shutil.copytree(out, folder)
        (folder / "probe.json").unlink()
        report = json.loads((folder / "metrics.json").read_text())
        g = report["settings"]["lam_gaussian"]
        g["seed"], g["settings"]["target_rate_bits"] = seed, target
        report["rate"]["lam_gaussian"]["kl_bits_mean"] = bits
        report["lam_gaussian"]["psnr"]["mean"] = psnr
        report["rate"]["laq"]["code_entropy_joint_bits"] = 6.0
        report["manifest"]["files"]["lam_gaussian"]["sha256"] = f"gaussian-{k}"
        report["rfid"] = {"backbone": "skipped with --fid none"}
        (folder / "metrics.json").write_text(json.dumps(report))
        folders.append(str(folder))
    result = run_in_process("report.py", *folders, "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    matched = list(csv.DictReader(open(tmp_path / "report" / "rate_matched.csv")))
    gaussian = [r for r in matched if r["family"] == "LatentActionModel (gaussian)"]
    assert len(gaussian) == 1 and len(matched) == 1        # the other families: one point each
    row = gaussian[0]
    assert row["swept"] == "target_rate_bits" and float(row["laq_rate_bits"]) == 6.0
    by_seed = [10 + (14 - 10) * (6 - 4) / (8 - 4), 11 + (13 - 11) * (6 - 4.5) / (9 - 4.5)]
    assert float(row["psnr"]) == pytest.approx(np.mean(by_seed)) and row["psnr_seeds"] == "2"
    half = t.ppf(0.975, 1) * np.std(by_seed, ddof=1) / math.sqrt(2)
    assert float(row["psnr_ci_low"]) == pytest.approx(np.mean(by_seed) - half)
    assert float(row["psnr_ci_high"]) == pytest.approx(np.mean(by_seed) + half)
    assert row["probe_top1"] == "" and row["probe_top1_seeds"] == "0"       # no probe.json
    assert "## At LAQ's rate" in (tmp_path / "report" / "report.md").read_text()

    import matplotlib.figure

    import report as report_module
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: drawn.append([ax.get_title() for ax in fig.axes]))
    runs = report_module.distinct(folders)
    points = report_module.group(runs)
    report_module.draw(points, report_module.rate_matched(runs, points), str(tmp_path / "x.png"))
    assert len(drawn) == 1
    assert not any("rFID" in title or "probe" in title or "LPIPS" in title
                   for title in drawn[0])                    # no data: not drawn
    assert any("PSNR" in title for title in drawn[0])


BOMB = "dim: [" + ", ".join(["&l0 [x, x, x, x, x, x, x, x, x]"] + [
    f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 10)]) + "]\n"   # 9^10 if expanded


@pytest.mark.parametrize("text, expected", [
    ("dim: big\n", "dim must be an int, got 'big'"),
    ("dim: [1, 2]\n", "dim must be an int, got list"),
    ("patch_size: 0\n", "patch_size 0 is outside 1..4096"),
    ("dim: 1e7\n", "dim must be an int, got '1e7'"),
    ("dim: 10000000.0\n", "dim must be an int, got 10000000.0"),
    ("spatial_depth: 1000000\n", "spatial_depth 1000000 is outside 1..128"),
    ("attn_dropout: 2\n", "attn_dropout 2 is outside 0.0..1.0"),
    (BOMB, "dim must be an int, got list"),
    ("# " + "x" * 70000 + "\n", "a LAQ config is a few lines"),
], ids=["string", "list", "zero_patch", "exponent", "float_dim", "deep", "dropout", "alias_bomb",
        "huge"])
def test_laq_config_values_are_checked_before_anything_is_built(text, expected, tmp_path):
    (tmp_path / "laq.yaml").write_text(text)
    cls = laq_loader.import_laq_class(os.path.join(STANDIN, "laq_model"))
    with pytest.raises(laq_loader.LaqError) as info:
        laq_loader.laq_config(str(tmp_path / "laq.yaml"), cls)
    assert expected in str(info.value) and "\n" not in str(info.value)


TWIN_LAQ = '''"""LAQ's interface around this repository's model of LAQ's function: a --laq for checking
the agreement of a converted checkpoint with the LAQ it came from."""
import torch.nn as nn

from latent_action_model import LatentActionModel


class Quantizer(nn.Module):
    def inference(self, *args, **kwargs):   # never reached: the codes come from a second pass
        raise NotImplementedError


class LatentActionQuantization(nn.Module):
    def __init__(self, *, dim, quant_dim, codebook_size, image_size, patch_size, spatial_depth,
                 temporal_depth, dim_head=64, heads=8, channels=3, attn_dropout=0.,
                 ff_dropout=0., code_seq_len=1):
        super().__init__()
        self.twin = LatentActionModel(dim, quant_dim, codebook_size, image_size, patch_size,
                                      spatial_depth, temporal_depth, dim_head, heads,
                                      code_seq_len, channels, architecture="laq")
        self.vq = Quantizer()

    def inference(self, video, step=0, return_only_codebook_ids=False):
        out, _, latents = self.twin.evaluate_batch(video.permute(0, 2, 1, 3, 4) * 2 - 1)
        return latents["codes"] if return_only_codebook_ids else (out + 1) / 2
'''


@pytest.mark.slow
def test_a_converted_laq_is_checked_against_laq_itself(trained_checkpoint, demo_data, tmp_path):
    """--model checkpoints that compute LAQ's function at --laq's sizes are compared with LAQ
    pair by pair: the same weights agree; other weights are reported as differing, with the
    share of identical codes the per-pair table shows."""
    from convert_laq import study_config
    from latent_action_model import LatentActionModel
    (tmp_path / "laq_model").mkdir()
    (tmp_path / "laq_model" / "latent_action_quantization.py").write_text(TWIN_LAQ)
    laq_model = laq_loader.import_laq_class(str(tmp_path / "laq_model"))
    torch.manual_seed(0)
    laq = laq_model(**SMALL_LAQ)
    torch.save(laq.state_dict(), tmp_path / "laq.pt")
    (tmp_path / "laq.yaml").write_text(yaml.safe_dump(SMALL_LAQ))
    config = study_config({**SMALL_LAQ, "channels": 3})
    torch.save({"model": laq.twin.state_dict(), "config": config}, tmp_path / "converted.pt")
    torch.manual_seed(1)
    other = LatentActionModel(**SMALL_LAQ, architecture="laq")
    config["logging_params"]["name"] = "other"
    torch.save({"model": other.state_dict(), "config": config}, tmp_path / "other.pt")
    out = tmp_path / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(tmp_path / "laq.pt"),
                         "--laq-repo", str(tmp_path), "--laq-config", str(tmp_path / "laq.yaml"),
                         "--model", str(tmp_path / "converted.pt"), "--model",
                         str(tmp_path / "other.pt"), "--data-path", demo_data, "--num-pairs",
                         "12", "--offset", "3", "--pairs", "exact", "--vae-resize", "stretch",
                         "--controllability", "none", "--output", str(out), "--lpips-net",
                         "none", "--fid", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    agreement = json.loads((out / "metrics.json").read_text())["laq_agreement"]
    same, differs = agreement["laq_converted"], agreement["other"]
    assert same["agree"] and same["pairs"] == 12 and same["code_sequences_identical"] == 1.0
    assert same["prediction_max_abs_diff"] <= 1e-6
    assert not differs["agree"] and differs["prediction_max_abs_diff"] > 1e-3
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    assert differs["code_sequences_identical"] == pytest.approx(
        np.mean([r["other_codes"] == r["laq_codes"] for r in rows]))
    assert "laq_converted against LAQ run by LAPA's code: code sequences identical on 100.0% " \
           "of 12 pairs" in result.stdout and "they DIFFER" in result.stdout
