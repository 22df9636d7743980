"""pythae models: scored under their own model, agreeing with pythae's own numbers, refused
when they hold pickles, and loaded from a Hugging Face Hub cache with the network off."""
import csv
import hashlib
import json
import os
import pickle
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_in_process, run_script

pythae = pytest.importorskip("pythae.models")
from pythae.data.datasets import DatasetOutput  # noqa: E402

from errors import PythaeError  # noqa: E402
from pythae_adapter import load_pythae

CPU = torch.device("cpu")
SIZE = 32


def images(n=6, seed=0):
    """Smooth random images in [0, 1], exactly representable as 8-bit PNGs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def image_folder(path, x):
    os.makedirs(path, exist_ok=True)
    for i, img in enumerate(x):
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(
            os.path.join(path, f"{i:03d}.png"))
    return str(path)


def train_briefly(model, x, steps=8):
    """A few optimiser steps on pythae's own objective, so the weights are not the init."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(DatasetOutput(data=x)).loss.backward()
        opt.step()
    model.eval()
    return model


def evaluate_in_process(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args, "--device", "cpu", "--workers", "0",
                                      "--lpips-net", "none", "--fid", "none"])
    runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")


def per_image(folder):
    with open(os.path.join(folder, "per_image.csv")) as f:
        return sorted(csv.DictReader(f), key=lambda r: r["path"])


# --- agreement with pythae's own model code --------------------------------------------------

def test_vae_kl_and_mse_equal_pythaes_own(tmp_path, monkeypatch):
    x = images()
    torch.manual_seed(1)
    model = train_briefly(pythae.VAE(pythae.VAEConfig(input_dim=(3, SIZE, SIZE), latent_dim=8)), x)
    model.save(str(tmp_path / "vae"))
    evaluate_in_process(monkeypatch, "--checkpoint", str(tmp_path / "vae"), "--output",
                        str(tmp_path / "out"), "--dataset", "images", "--data-path",
                        image_folder(tmp_path / "imgs", x), "--num-samples", "4")
    rows = per_image(tmp_path / "out")
    with torch.no_grad():                   # pythae's loss at the posterior mean, image by image
        out = model.encoder(x)
        recon = model.decoder(out.embedding).reconstruction
        pythae_values = [model.loss_function(recon[i:i + 1], x[i:i + 1], out.embedding[i:i + 1],
                                             out.log_covariance[i:i + 1], out.embedding[i:i + 1])
                         for i in range(len(x))]
    pixels = x[0].numel()
    for row, (_, recon_loss, kld) in zip(rows, pythae_values):
        assert float(row["kl"]) == pytest.approx(float(kld), rel=1e-5)        # nats, same sum
        # pythae's mse term is 0.5 * the summed squared error over the image's [0, 1] values
        assert float(row["mse"]) == pytest.approx(2 * float(recon_loss) / pixels, rel=1e-4)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["model"] == "pythae:VAE" and report["reconstruction"]["vq_loss"] is None
    assert report["generation"]["mse"]["mean"] >= 0


def test_vq_vae_goes_through_the_quantiser_and_agrees_with_pythae(tmp_path, monkeypatch):
    x = images()
    torch.manual_seed(2)
    config = pythae.VQVAEConfig(input_dim=(3, SIZE, SIZE), latent_dim=16, num_embeddings=32)
    model = train_briefly(pythae.VQVAE(config), x)
    model.save(str(tmp_path / "vq"))
    evaluate_in_process(monkeypatch, "--checkpoint", str(tmp_path / "vq"), "--output",
                        str(tmp_path / "out"), "--dataset", "images", "--data-path",
                        image_folder(tmp_path / "imgs", x), "--num-samples", "4")
    rows = per_image(tmp_path / "out")
    with torch.no_grad():
        own = model(DatasetOutput(data=x))                 # pythae's forward: deterministic
    pixels = x[0].numel()
    ours_sum = np.mean([float(r["mse"]) * pixels for r in rows])
    assert ours_sum == pytest.approx(float(own.recon_loss), rel=1e-4)   # summed squared error
    assert np.mean([float(r["vq_loss"]) for r in rows]) == pytest.approx(float(own.vq_loss),
                                                                         rel=1e-4)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["reconstruction"]["kl"] is None
    codes = own.quantized_indices.flatten()
    assert report["latent"]["codebook_size"] == 32
    assert report["latent"]["unique_codes"] == len(codes.unique())
    # without the quantiser the reconstruction would differ: the test can tell
    with torch.no_grad():
        unquantised = model.decoder(model.encoder(x).embedding).reconstruction
    assert not torch.allclose(unquantised, own.recon_x, atol=1e-4)


# --- each model type under its own model ------------------------------------------------------

def build(name, **extra):
    config = getattr(pythae, f"{name}Config", None) or getattr(pythae, f"{name}_Config")
    cls = getattr(pythae, name)
    return cls(config(input_dim=(3, SIZE, SIZE), latent_dim=6, **extra))


@pytest.mark.parametrize("name,extra,kl,sampled", [
    ("BetaVAE", {"beta": 4.0}, True, True),
    ("WAE_MMD", {}, False, True),
    ("VAMP", {"number_components": 5}, False, True),
    ("VAE_IAF", {"n_made_blocks": 2}, False, True),
    ("SVAE", {}, False, True),
    ("AE", {}, False, False),
])
def test_each_model_type_is_scored_under_its_own_model(name, extra, kl, sampled, tmp_path):
    x = images(4)
    torch.manual_seed(3)
    model = build(name, **extra).eval()
    model.save(str(tmp_path / name))
    adapter, config = load_pythae(str(tmp_path / name), CPU)
    assert config["model_params"]["name"] == f"pythae:{name}"            # no trailing "_"
    recon, metrics, _ = adapter.evaluate_batch(x * 2 - 1)
    assert ("kl" in metrics) == kl and (("kl" in adapter.not_applicable) != kl)
    with torch.no_grad():
        out = model.encoder(x)
        if name == "SVAE":                  # the vMF posterior's mean direction, normalised
            z = out.embedding / out.embedding.norm(dim=-1, keepdim=True)
        elif name == "VAE_IAF":             # the flow applied to the Gaussian's mean
            z = model.iaf_flow.inverse(out.embedding).out
        else:
            z = out.embedding
        expected = model.decoder(z).reconstruction * 2 - 1
    assert torch.allclose(recon, expected, atol=1e-6)
    if sampled:
        samples = adapter.sample(3, CPU, torch.Generator().manual_seed(0))
        assert samples.shape == (3, 3, SIZE, SIZE) and torch.isfinite(samples).all()
    else:
        assert "no prior" in adapter.cannot_sample


def test_vamp_samples_come_from_its_vampprior_not_n01(tmp_path):
    torch.manual_seed(4)
    model = build("VAMP", number_components=3).eval()
    with torch.no_grad():                   # posterior means far from the N(0, I) mass
        model.encoder.embedding.bias.fill_(5.0)
    model.save(str(tmp_path / "vamp"))
    adapter, _ = load_pythae(str(tmp_path / "vamp"), CPU)
    z = adapter._vamp_prior(200, CPU, torch.Generator().manual_seed(0))
    pseudo = model.pseudo_inputs(model.idle_input).reshape(3, 3, SIZE, SIZE)
    with torch.no_grad():
        centres = model.encoder(pseudo).embedding
    nearest = torch.cdist(z, centres).min(1).values
    assert nearest.mean() < torch.cdist(torch.randn(200, 6), centres).min(1).values.mean()


def test_poincare_vae_reports_no_gaussian_kl(tmp_path):
    torch.manual_seed(5)
    model = build("PoincareVAE").eval()
    model.save(str(tmp_path / "pvae"))
    adapter, _ = load_pythae(str(tmp_path / "pvae"), CPU)
    _, metrics, _ = adapter.evaluate_batch(images(2) * 2 - 1)
    assert "kl" not in metrics and "Poincaré" in adapter.not_applicable["kl"]
    samples = adapter.sample(2, CPU, torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()


def test_vae_gan_reports_its_three_losses_as_pythae_computes_them(tmp_path):
    x = images(3)
    torch.manual_seed(6)
    model = build("VAEGAN").eval()
    model.save(str(tmp_path / "vaegan"))
    adapter, _ = load_pythae(str(tmp_path / "vaegan"), CPU)
    _, metrics, _ = adapter.evaluate_batch(x * 2 - 1, torch.Generator().manual_seed(0))
    assert {"encoder_loss", "decoder_loss", "discriminator_loss", "feature_recon", "kl"} <= \
        set(metrics)
    g = torch.Generator().manual_seed(0)                   # the same draws, pythae's loss
    with torch.no_grad():
        out = model.encoder(x)
        mu, log_var = out.embedding, out.log_covariance
        z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=g)
        z_prior = torch.randn(mu.shape, generator=g)
        recon = model.decoder(z).reconstruction
        first = model.loss_function(recon[:1], x[:1], z[:1], z_prior[:1], mu[:1], log_var[:1])
    assert float(metrics["encoder_loss"][0]) == pytest.approx(float(first[1]), rel=1e-5)
    assert float(metrics["discriminator_loss"][0]) == pytest.approx(float(first[3]), rel=1e-5)


def test_a_convolutional_latent_samples_in_its_own_shape(tmp_path):
    from pythae.models.nn.benchmarks.celeba import (Decoder_ResNet_VQVAE_CELEBA,
                                                     Encoder_ResNet_VQVAE_CELEBA)
    config = pythae.VQVAEConfig(input_dim=(3, 64, 64), latent_dim=16, num_embeddings=8)
    torch.manual_seed(7)
    model = pythae.VQVAE(config, encoder=Encoder_ResNet_VQVAE_CELEBA(config),
                         decoder=Decoder_ResNet_VQVAE_CELEBA(config)).eval()
    model.save(str(tmp_path / "conv"))
    adapter, _ = load_pythae(str(tmp_path / "conv"), CPU, allow_pickle=True)   # our own pickles
    samples = adapter.sample(2, CPU, torch.Generator().manual_seed(0))
    assert adapter.latent_shape[0] == 16 and len(adapter.latent_shape) == 3
    assert samples.shape == (2, 3, 64, 64)


# --- refused before anything is unpickled ----------------------------------------------------

class Payload:
    """Unpickling this creates the marker file: code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def vae_folder(tmp_path):
    torch.manual_seed(8)
    build("VAE").save(str(tmp_path / "vae"))
    return tmp_path / "vae"


@pytest.mark.parametrize("name", ["encoder.pkl", "decoder.pkl", "discriminator.pkl",
                                  "metric.pkl", "weights.bin"])
def test_every_pickled_file_is_refused_before_anything_is_unpickled(name, vae_folder, tmp_path):
    marker = tmp_path / "ran"
    (vae_folder / name).write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(PythaeError, match=f"holds {name}: pickled code"):
        load_pythae(str(vae_folder), CPU)
    assert not marker.exists()
    result = run_in_process("evaluate.py", "--checkpoint", str(vae_folder), "--output",
                        str(tmp_path / "out"), "--dataset", "images", "--data-path",
                        image_folder(tmp_path / "imgs", images(2)), "--fid", "none",
                        "--lpips-net", "none", "--device", "cpu") if name == "metric.pkl" else None
    if result is not None:                                    # and through the CLI, exit 2
        assert result.returncode == 2 and name in result.stderr and not marker.exists()


def test_malformed_config_and_truncated_weights_are_one_line_errors(vae_folder):
    weights = (vae_folder / "model.pt").read_bytes()
    (vae_folder / "model.pt").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(PythaeError, match="truncated or not a torch file"):
        load_pythae(str(vae_folder), CPU)
    (vae_folder / "model.pt").write_bytes(weights)
    (vae_folder / "model_config.json").write_text('{"name": "VAEConfig", ')
    with pytest.raises(PythaeError, match="model_config.json is not readable JSON"):
        load_pythae(str(vae_folder), CPU)


# --- the Hugging Face Hub cache, offline -------------------------------------------------------

def hub_cache(cache, repo, folder, commit="0" * 40):
    """Lay `folder` out as huggingface_hub's cache does: blobs named by hash, a snapshot of
    links per commit, refs/main naming the commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)


def test_hub_models_load_from_the_cache_offline_and_say_how_to_fetch_otherwise(vae_folder,
                                                                             tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    hub_cache(cache, "someone/pythae-vae", vae_folder)
    scanned = huggingface_hub.scan_cache_dir(cache)               # huggingface_hub reads it back
    assert [r.repo_id for r in scanned.repos] == ["someone/pythae-vae"] and not scanned.warnings
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    data = image_folder(tmp_path / "imgs", images(2))
    common = ["--dataset", "images", "--data-path", data, "--fid", "none", "--lpips-net", "none",
              "--device", "cpu", "--num-samples", "2"]
    result = run_script("evaluate.py", "--checkpoint", "hf:someone/pythae-vae", "--output",
                        str(tmp_path / "out"), *common, env=offline)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model"] == "pythae:VAE"

    missing = run_script("evaluate.py", "--checkpoint", "hf:someone/not-cached@v2", "--output",
                         str(tmp_path / "out2"), *common, env=offline)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "hf download someone/not-cached --revision v2" \
        in missing.stderr
    (vae_folder / "discriminator.pkl").write_bytes(pickle.dumps(Payload(str(tmp_path / "ran"))))
    hub_cache(cache, "someone/evil", vae_folder)
    evil = run_script("evaluate.py", "--checkpoint", "hf:someone/evil", "--output",
                      str(tmp_path / "out3"), *common, env=offline)
    assert evil.returncode == 2 and "discriminator.pkl" in evil.stderr
    assert not (tmp_path / "ran").exists()
