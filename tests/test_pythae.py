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


@pytest.mark.slow
def test_hub_models_load_from_the_cache_offline_and_say_how_to_fetch_otherwise(vae_folder,
                                                                             tmp_path, monkeypatch):
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

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at each call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    missing = run_in_process("evaluate.py", "--checkpoint", "hf:someone/not-cached@v2",
                             "--output", str(tmp_path / "out2"), *common)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "hf download someone/not-cached --revision v2" \
        in missing.stderr
    (vae_folder / "discriminator.pkl").write_bytes(pickle.dumps(Payload(str(tmp_path / "ran"))))
    hub_cache(cache, "someone/evil", vae_folder)
    evil = run_in_process("evaluate.py", "--checkpoint", "hf:someone/evil", "--output",
                          str(tmp_path / "out3"), *common)
    assert evil.returncode == 2 and "discriminator.pkl" in evil.stderr
    assert not (tmp_path / "ran").exists()


# --- 1-channel models on their own data ------------------------------------------------------

def mnist_folder(root, n=12, seed=0):
    """MNIST's t10k files in torchvision's layout (idx format), grey digits-like blobs."""
    import struct
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 1, 7, 7)).astype(np.float32))
    images = (torch.nn.functional.interpolate(low, size=28, mode="bilinear") * 255).round() \
        .byte().squeeze(1).numpy()
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                 + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                 + rng.integers(0, 10, n).astype(np.uint8).tobytes())
    return str(root), images


def build_one_channel(name, size=28, **extra):
    config = getattr(pythae, f"{name}Config")
    return getattr(pythae, name)(config(input_dim=(1, size, size), latent_dim=4, **extra))


def score(tmp_path, folder, *args):
    result = run_in_process("evaluate.py", "--checkpoint", folder, "--output",
                            str(tmp_path / "out"), "--lpips-net", "none", "--fid", "none",
                            "--device", "cpu", "--workers", "0", "--num-samples", "4", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.parametrize("name,extra", [("VAE", {"reconstruction_loss": "bce"}),
                                        ("VAMP", {"number_components": 3}), ("SVAE", {}),
                                        ("IWAE", {"number_samples": 2}), ("HVAE", {})])
def test_one_channel_models_score_on_mnist_read_offline(name, extra, tmp_path):
    data, raw = mnist_folder(tmp_path / "mnist")
    torch.manual_seed(9)
    model = build_one_channel(name, **extra).eval()
    model.save(str(tmp_path / name))
    report = score(tmp_path, str(tmp_path / name), "--dataset", "mnist", "--data-path", data)
    assert report["channels"] == 1 and report["num_images"] == len(raw)
    assert "repeated to 3 channels" in report["one_channel"]
    assert report["split_source"] == "MNIST test (t10k)"
    assert report["latent"]["active_units"] >= 0 and len(report["latent"]["activity_per_dim"]) == 4
    x = torch.from_numpy(raw).float()[:, None] / 255
    with torch.no_grad():                  # the model's own reconstruction, through pythae
        out = model.encoder(x)
        z = out.embedding / out.embedding.norm(dim=-1, keepdim=True) if name == "SVAE" \
            else out.embedding
        recon = model.decoder(z).reconstruction
    rows = per_image(str(tmp_path / "out"))
    expected = (recon - x).pow(2).flatten(1).mean(1)
    assert np.allclose([float(r["mse"]) for r in sorted(rows, key=lambda r: int(r["index"]))],
                       expected.numpy(), rtol=1e-5, atol=1e-7)
    if name == "VAE":                      # binarised-MNIST models: BCE is their likelihood
        assert report["model_reconstruction_loss"] == "bce"
        per_pixel = torch.nn.functional.binary_cross_entropy(
            recon.clamp(1e-6, 1 - 1e-6), x, reduction="none").flatten(1)
        _, own_recon, _ = model.loss_function(recon[:1], x[:1], out.embedding[:1],
                                              out.log_covariance[:1], out.embedding[:1])
        first = sorted(rows, key=lambda r: int(r["index"]))[0]
        assert float(first["bce"]) * 28 * 28 == pytest.approx(float(own_recon), rel=1e-4)
        assert float(first["bce"]) == pytest.approx(float(per_pixel[0].mean()), rel=1e-5)


def test_one_channel_ssim_and_gmsd_equal_their_values_on_the_repeated_image():
    """What metrics.json's `one_channel` says, checked against piq on the 1-channel images."""
    import piq
    from metrics import ImageMetrics
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 40, 40, generator=g)
    y = (x + 0.2 * torch.rand(3, 1, 40, 40, generator=g)).clamp(0, 1)
    ours = ImageMetrics(CPU, lpips_net="none")(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    assert torch.allclose(ours["ssim"].float(), piq.ssim(x, y, data_range=1.0, reduction="none"),
                          atol=1e-6)
    assert torch.allclose(ours["gmsd"].float(), piq.gmsd(x, y, data_range=1.0, reduction="none"),
                          atol=1e-6)


def test_a_64px_one_channel_model_scores_on_dsprites_grey_arrays_and_grey_images(tmp_path):
    torch.manual_seed(10)
    build_one_channel("BetaTCVAE", size=64).eval().save(str(tmp_path / "tc"))
    rng = np.random.default_rng(1)
    imgs = np.zeros((6, 64, 64), np.uint8)
    for k, img in enumerate(imgs):                       # a white square per image
        r, c = rng.integers(0, 48, 2)
        img[r:r + 16, c:c + 16] = 1
    np.savez(tmp_path / "dsprites.npz", imgs=imgs, latents_values=np.zeros((6, 6)))
    report = score(tmp_path, str(tmp_path / "tc"), "--dataset", "dsprites", "--data-path",
                   str(tmp_path / "dsprites.npz"))
    assert report["num_images"] == 6 and report["split"] == "all"
    dsprites_mse = [float(r["mse"]) for r in per_image(str(tmp_path / "out"))]
    (tmp_path / "arrays").mkdir()                        # the same images as 1-channel arrays
    np.save(tmp_path / "arrays" / "eval_data.npy", imgs[:, None] * 255)
    score(tmp_path, str(tmp_path / "tc"), "--dataset", "celeba", "--data-path",
          str(tmp_path / "arrays"))
    assert [float(r["mse"]) for r in per_image(str(tmp_path / "out"))] == \
        pytest.approx(dsprites_mse, rel=1e-6)
    folder = tmp_path / "grey"                           # and as grey PNG files (stored RGB)
    folder.mkdir()
    for k, img in enumerate(imgs):
        Image.fromarray(img * 255).convert("RGB").save(folder / f"{k}.png")
    score(tmp_path, str(tmp_path / "tc"), "--dataset", "images", "--data-path", str(folder))
    assert [float(r["mse"]) for r in per_image(str(tmp_path / "out"))] == \
        pytest.approx(dsprites_mse, rel=1e-6)


def test_data_of_another_shape_is_one_line_naming_both(tmp_path):
    data, _ = mnist_folder(tmp_path / "mnist")
    torch.manual_seed(11)
    build_one_channel("VAE", size=32).eval().save(str(tmp_path / "vae32"))
    result = run_in_process("evaluate.py", "--checkpoint", str(tmp_path / "vae32"), "--output",
                            str(tmp_path / "out"), "--dataset", "mnist", "--data-path", data,
                            "--lpips-net", "none", "--fid", "none", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "takes 1x32x32 images" in result.stderr and "holds 1x28x28" in result.stderr
    missing = run_in_process("evaluate.py", "--checkpoint", str(tmp_path / "vae32"), "--output",
                             str(tmp_path / "out"), "--dataset", "mnist", "--data-path",
                             str(tmp_path), "--lpips-net", "none", "--fid", "none")
    assert missing.returncode == 2 and "MNIST/raw/t10k-images-idx3-ubyte" in missing.stderr


def test_poincare_vae_with_riemannian_normals_keeps_its_kl_reason(tmp_path):
    torch.manual_seed(12)
    build_one_channel("PoincareVAE", prior_distribution="riemannian_normal",
                      posterior_distribution="riemannian_normal").eval().save(str(tmp_path / "p"))
    adapter, _ = load_pythae(str(tmp_path / "p"), CPU)
    _, metrics, latents = adapter.evaluate_batch(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert "kl" not in metrics and "Poincaré" in adapter.not_applicable["kl"]
    assert latents["mu"].shape == (2, 4)               # active units all the same


# --- the pickle refusal: by what pythae would load, whatever the entry --------------------------

def refused(folder, match):
    with pytest.raises(PythaeError, match=match):
        load_pythae(str(folder), CPU)


def test_a_fifo_named_like_a_pickle_is_refused_without_opening_it(vae_folder):
    os.mkfifo(vae_folder / "encoder.pkl")      # opening it for reading would block for ever
    refused(vae_folder, "holds encoder.pkl: pickled code")


@pytest.mark.parametrize("target_exists", [False, True], ids=["dangling", "to_a_pickle"])
def test_a_link_named_like_a_pickle_is_refused_dangling_or_not(target_exists, vae_folder,
                                                               tmp_path):
    target = tmp_path / "elsewhere.bin"
    if target_exists:
        target.write_bytes(pickle.dumps(Payload(str(tmp_path / "ran"))))
    os.symlink(target, vae_folder / "decoder.pkl")
    refused(vae_folder, "holds decoder.pkl: pickled code")
    assert not (tmp_path / "ran").exists()


def test_a_config_asking_for_custom_networks_is_refused_with_no_pickle_present(vae_folder):
    config = json.loads((vae_folder / "model_config.json").read_text())
    (vae_folder / "model_config.json").write_text(json.dumps({**config,
                                                              "uses_default_encoder": False}))
    refused(vae_folder, r"unpickling encoder.pkl \(uses_default_encoder: false\)")


def test_pythae_reads_a_private_copy_so_what_appears_after_the_check_is_never_loaded(
        vae_folder, tmp_path, monkeypatch):
    """A config swapped for one asking for a custom encoder, and its encoder.pkl, both put in
    the folder right after the check (as a writer racing the check would): never read."""
    import pythae_adapter
    marker, check = tmp_path / "ran", pythae_adapter.check_folder

    def check_then_swap(folder, *args):
        config = check(folder, *args)
        (vae_folder / "encoder.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
        (vae_folder / "model_config.json").write_text(json.dumps(
            {**config, "uses_default_encoder": False}))
        return config
    monkeypatch.setattr(pythae_adapter, "check_folder", check_then_swap)
    adapter, _ = load_pythae(str(vae_folder), CPU)
    assert not marker.exists() and adapter.name == "VAE"


def test_hub_errors_name_their_own_cause_in_whole(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import errors
    import pythae_adapter

    def raising(cls, message):
        def snapshot_download(*args, **kwargs):
            err = cls.__new__(cls)
            Exception.__init__(err, message)
            raise err
        return snapshot_download
    cases = [(errors.RepositoryNotFoundError, "404", "is not on the Hugging Face Hub, or it is "
              "private: check the name (e.g. hf:clementchadebec/reproduced_vae), or log in"),
             (errors.GatedRepoError, "403", "is gated: accept its terms"),
             (errors.RevisionNotFoundError, "404", "has no revision 'v9'"),
             (errors.LocalEntryNotFoundError, "offline", "is not in the Hugging Face cache")]
    for cls, message, expected in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(cls, message))
        with pytest.raises(PythaeError) as raised:
            pythae_adapter.hub_folder("hf:someone/typo@v9")
        assert expected in str(raised.value), str(raised.value)
    long = "x " * 300 + "HF_HUB_OFFLINE=1 ends here"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(OSError, long))
    with pytest.raises(PythaeError, match="HF_HUB_OFFLINE=1 ends here"):   # not cut short
        pythae_adapter.hub_folder("hf:someone/model")


@pytest.mark.slow
def test_the_docs_hub_example_scores_a_reproduced_mnist_model_and_checks_its_blobs(
        tmp_path, monkeypatch):
    """docs/evaluation.md's example as written, on a cache laid out as huggingface_hub lays it
    out: a 1x28x28 VAE with pythae's MNIST benchmark networks (pickled, as pythae saves custom
    networks), MNIST read offline; metrics.json names the repo, the revision asked for and the
    commit; a damaged blob is refused."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from pythae.models.nn.benchmarks.mnist import Decoder_ResNet_AE_MNIST, Encoder_ResNet_VAE_MNIST
    config = pythae.VAEConfig(input_dim=(1, 28, 28), latent_dim=16, reconstruction_loss="bce")
    torch.manual_seed(13)
    pythae.VAE(config, encoder=Encoder_ResNet_VAE_MNIST(config),
               decoder=Decoder_ResNet_AE_MNIST(config)).eval().save(str(tmp_path / "model"))
    cache, commit = tmp_path / "hub", "1" * 40
    hub_cache(cache, "clementchadebec/reproduced_vae", tmp_path / "model", commit)
    assert [r.repo_id for r in huggingface_hub.scan_cache_dir(cache).repos] == \
        ["clementchadebec/reproduced_vae"]
    data, _ = mnist_folder(tmp_path / "data" / "mnist")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = ["evaluate.py", "--checkpoint", "hf:clementchadebec/reproduced_vae", "--dataset",
               "mnist", "--data-path", data, "--output", str(tmp_path / "out"), "--lpips-net",
               "none", "--fid", "none", "--device", "cpu", "--num-samples", "4"]
    result = run_script(*command, "--allow-pickle", env=offline)           # as the docs say
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["checkpoint"] == "hf:clementchadebec/reproduced_vae"
    assert report["hub"] == {"repo_id": "clementchadebec/reproduced_vae",
                             "revision_requested": "main", "commit": commit}
    assert report["channels"] == 1 and report["model_reconstruction_loss"] == "bce"
    blob = os.path.realpath(cache / "models--clementchadebec--reproduced_vae" / "snapshots"
                            / commit / "model.pt")
    damaged = bytearray(open(blob, "rb").read())
    damaged[len(damaged) // 2] ^= 0xFF
    damaged[len(damaged) // 2 + 1] ^= 0xFF
    with open(blob, "wb") as f:
        f.write(bytes(damaged))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at each call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    refused = run_in_process(*command)
    assert refused.returncode == 2 and "encoder.pkl" in refused.stderr
    assert "decoder.pkl" in refused.stderr and "--allow-pickle" in refused.stderr
    result = run_in_process(*command, "--allow-pickle")
    assert result.returncode == 2 and "damaged" in result.stderr
    assert os.path.basename(blob) in result.stderr and result.stderr.count("\n") == 1
