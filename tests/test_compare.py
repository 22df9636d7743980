"""compare_with_laq.py against a stand-in laq_model package with the published interface:
hard-coded 'cuda' quantizer, trainer-only imports in __init__, non-strict loading, 'module.'
prefixes. If the comparison would fail on a real LAQ checkout, these tests fail."""
import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

import compare_with_laq as cmp
from conftest import ROOT, run_script
from dataset_sthv2 import load_frame

STANDIN = os.path.join(ROOT, "tests", "laq_standin")
SMALL_LAQ = {"dim": 32, "quant_dim": 8, "codebook_size": 8, "image_size": 32, "patch_size": 8,
             "spatial_depth": 2, "temporal_depth": 1, "dim_head": 8, "heads": 2, "code_seq_len": 4}
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def build_standin(config):
    cls = cmp.import_laq_class(os.path.join(STANDIN, "laq_model"))
    with cmp.RedirectCuda("cpu"):
        return cls(**config)


@pytest.fixture(scope="module")
def laq_checkpoint(tmp_path_factory):
    """A LAPA-style checkpoint: a plain state_dict saved from a DDP-wrapped model."""
    folder = tmp_path_factory.mktemp("laq")
    torch.manual_seed(0)
    model = build_standin(SMALL_LAQ)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, folder / "model.pt")
    (folder / "laq.yaml").write_text(yaml.safe_dump(SMALL_LAQ))
    return folder


def compare_cli(*args, env=None):
    return run_script("compare_with_laq.py", *args, "--device", "cpu", env={**NO_GPU, **(env or {})})


def test_trainer_dependencies_are_really_absent():
    assert importlib.util.find_spec("wandb") is None        # so importing laq_model/__init__ fails


def test_quantizer_asks_for_cuda_and_is_redirected():
    cls = cmp.import_laq_class(os.path.join(STANDIN, "laq_model"))
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            cls(**SMALL_LAQ)                               # what a plain construction does
    model = build_standin(SMALL_LAQ)
    assert model.vq.codebooks.device.type == "cpu" and model.vq.codebooks_used.device.type == "cpu"


def test_pairs_from_the_validation_split(trained_checkpoint, laq_checkpoint, demo_data, tmp_path):
    out = tmp_path / "cmp"
    result = compare_cli("--vae", trained_checkpoint, "--laq", str(laq_checkpoint / "model.pt"),
                         "--laq-repo", STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"),
                         "--data-path", demo_data, "--num-pairs", "6", "--offset", "4",
                         "--output", str(out), "--lpips-random-backbone", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LAQ codes" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["pairs"] == 6 and report["inputs"]["identity_clip"] is False
    for model in ("vae", "laq"):
        for name in ("mse", "psnr", "ssim", "gmsd", "lpips"):
            assert {"mean", "std", "ci95"} <= set(report[model][name]), (model, name)
    assert report["checkpoints"]["laq_keys"] == {"missing_keys": [], "unexpected_keys": []}
    laq_latent = report["latent"]["laq"]
    assert sum(laq_latent["histogram"]) == 6 * SMALL_LAQ["code_seq_len"]
    assert 1 <= laq_latent["unique_codes"] <= 8 and report["latent"]["vae"]["latent_dim"] == 8
    assert (out / "comparison.png").stat().st_size > 10_000

    # every pair is `offset` frames apart in one validation video
    val_ids = {e["id"] for e in json.load(open(os.path.join(
        demo_data, "something-something-v2-validation.json")))}
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    for row in rows:
        assert os.path.dirname(row["current"]) == os.path.dirname(row["target"])
        assert os.path.basename(os.path.dirname(row["current"])) in val_ids
        number = lambda p: int(os.path.basename(p)[4:9])  # noqa: E731
        assert number(row["target"]) - number(row["current"]) == 4

    # LAQ's numbers: recompute one pair with the stand-in model directly
    model = build_standin(SMALL_LAQ)
    state = torch.load(laq_checkpoint / "model.pt", weights_only=True)
    model.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    row = rows[0]
    frames = [load_frame(row[k], 32).float() / 255 for k in ("current", "target")]
    with torch.no_grad():
        recon = model.eval().inference(torch.stack(frames, 1)[None]).clamp(0, 1)
    assert float(((recon[0] - frames[1]) ** 2).mean()) == pytest.approx(float(row["laq_mse"]), rel=1e-5)


def test_seed_one_line_form_with_an_installed_laq_model(trained_checkpoint, tmp_path):
    """`--vae V --laq L --image IMG --output DIR`, LAQ found on the path, LAPA's hyperparameters."""
    torch.manual_seed(1)
    model = build_standin(cmp.LAPA_LAQ_CONFIG)
    torch.save(model.state_dict(), tmp_path / "laq.pt")
    image = tmp_path / "frame.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(image)
    result = run_script("compare_with_laq.py", "--vae", trained_checkpoint, "--laq",
                        str(tmp_path / "laq.pt"), "--image", str(image), "--output",
                        str(tmp_path / "out"), "--lpips-net", "none",
                        env={**NO_GPU, "PYTHONPATH": STANDIN})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identity clip" in result.stdout
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["inputs"]["identity_clip"] is True and report["pairs"] == 1
    assert report["laq_config"] == cmp.LAPA_LAQ_CONFIG
    assert report["image_sizes"] == {"vae": 32, "laq": 256} and report["scoring_size"] == 32


def test_wrong_checkpoint_is_reported_with_its_missing_keys(trained_checkpoint, laq_checkpoint,
                                                            tmp_path):
    """LAQ loads non-strictly: a VAE checkpoint passed as --laq must not load silently."""
    result = compare_cli("--vae", trained_checkpoint, "--laq", trained_checkpoint, "--laq-repo",
                         STANDIN, "--laq-config", str(laq_checkpoint / "laq.yaml"), "--frames",
                         "a.jpg", "b.jpg", "--output", str(tmp_path / "o"), "--lpips-net", "none")
    expected = len(build_standin(SMALL_LAQ).state_dict())
    assert result.returncode == 1
    assert f"{expected} missing keys" in result.stderr and not (tmp_path / "o").exists()


def test_bad_laq_config_and_repo_are_one_line_errors(laq_checkpoint, tmp_path):
    (tmp_path / "bad.yaml").write_text("dim: 32\nnum_layers: 3\n")
    with pytest.raises(cmp.LaqError, match="num_layers is not an argument"):
        cmp.laq_config(str(tmp_path / "bad.yaml"), cmp.import_laq_class(
            os.path.join(STANDIN, "laq_model")))
    (tmp_path / "odd.yaml").write_text("code_seq_len: 3\n")
    with pytest.raises(cmp.LaqError, match="code_seq_len 3 is not one of"):
        cmp.laq_config(str(tmp_path / "odd.yaml"), cmp.import_laq_class(
            os.path.join(STANDIN, "laq_model")))
    with pytest.raises(cmp.LaqError, match="has no laq_model/ folder"):
        cmp.find_laq_package(str(tmp_path))


def test_missing_model_dependency_is_named_as_laqs(monkeypatch):
    monkeypatch.setitem(sys.modules, "einops", None)     # as if einops were not installed
    with pytest.raises(cmp.LaqError, match="needs the Python module 'einops', a dependency of LAQ"):
        cmp.import_laq_class(os.path.join(STANDIN, "laq_model"))


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
                         "--output", str(out), "--lpips-net", "none")
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
                        "--offset", "2", "--output", str(tmp_path / "train"), "--lpips-net", "none")
    assert train.returncode == 0, train.stderr[-3000:]
    used = json.loads((tmp_path / "train" / "metrics.json").read_text())["inputs"]["videos"]
    assert used and set(used) <= ids["train"]
