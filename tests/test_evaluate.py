"""evaluate.py end to end on demo data: the contract's files, and numbers that add up."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_in_process
from frame_files import load_frame

SUMMARY_KEYS = {"mean", "std", "ci95"}


def evaluate_cli(*args, env=None):
    fid = [] if any(a.startswith("--fid") for a in args) else ["--fid", "none"]
    return run_in_process("evaluate.py", *args, *fid, "--device", "cpu", "--workers", "0", env=env)


@pytest.mark.slow
def test_evaluate_writes_metrics_csv_and_reconstructions(trained_checkpoint, demo_data, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(out),
                          "--data-path", demo_data, "--max-images", "12", "--batch-size", "5",
                          "--lpips-random-backbone", "--num-samples", "10",
                          "--save-reconstructions", "--fid-random-backbone")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s on cpu" in result.stdout and "rfid" in result.stdout
    assert "psnr" in result.stdout and "active units" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == "VanillaVAE" and report["num_images"] == 12
    assert report["checkpoint"] == os.path.abspath(trained_checkpoint)
    rec = report["reconstruction"]
    for name in ("mse", "bce", "psnr", "ssim", "gmsd", "lpips", "kl", "elbo"):
        assert SUMMARY_KEYS <= set(rec[name]), name
        assert rec[name]["ci95"][0] <= rec[name]["mean"] <= rec[name]["ci95"][1]
    assert rec["vq_loss"] is None and "codebook" in rec["not_applicable"]["vq_loss"]
    assert rec["kl"]["mean"] > 0 and rec["elbo"]["mean"] < 0
    assert {"mse", "psnr", "ssim", "lpips"} <= set(report["generation"])
    assert report["latent"]["latent_dim"] == 8 and len(report["latent"]["kl_per_dim"]) == 8
    assert report["rfid"]["value"] is not None and report["rfid"]["images"] == 12
    assert "random backbone" in report["rfid"]["backbone"] and report["images_per_sec"] > 0

    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 12 and all(os.path.isfile(r["path"]) for r in rows)
    # the mean-colour baseline, recomputed from the inputs as the model saw them
    for row in rows[:3]:
        seen = load_frame(row["path"], 32).float().numpy() / 255
        flat = seen.mean((1, 2), keepdims=True)
        expected = 10 * np.log10(1 / ((seen - flat) ** 2).mean())
        assert float(row["mean_colour_psnr"]) == pytest.approx(expected, abs=1e-3)
    base = report["baseline_mean_colour"]["psnr"]
    assert base["mean"] == pytest.approx(np.mean([float(r["mean_colour_psnr"]) for r in rows]))
    assert "psnr of mean colour" in result.stdout
    assert np.mean([float(r["mse"]) for r in rows]) == pytest.approx(rec["mse"]["mean"], rel=1e-9)

    # saved pairs: the input exactly as the model saw it, and its reconstruction
    for row in rows[:3]:
        index = int(row["index"])
        seen = np.asarray(Image.open(out / "reconstructions" / f"{index:06d}_input.png"))
        assert np.array_equal(seen, load_frame(row["path"], 32).permute(1, 2, 0).numpy())
        recon = np.asarray(Image.open(out / "reconstructions" / f"{index:06d}_recon.png"))
        mse = np.mean((recon / 255.0 - seen / 255.0) ** 2)
        assert mse == pytest.approx(float(row["mse"]), abs=2e-4)   # PNG rounding only
    assert (out / "reconstructions.png").exists() and (out / "samples.png").exists()


def test_lpips_none_is_recorded_as_skipped(trained_checkpoint, demo_data, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(out),
                          "--data-path", demo_data, "--max-images", "4", "--lpips-net", "none",
                          "--num-samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["reconstruction"]["lpips"] is None
    assert report["reconstruction"]["not_applicable"]["lpips"] == "skipped with --lpips-net none"


def test_missing_lpips_weights_stop_before_any_work(trained_checkpoint, demo_data, tmp_path):
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(tmp_path / "e"),
                          "--data-path", demo_data, env={"TORCH_HOME": str(tmp_path / "th")})
    assert result.returncode == 2
    assert "alexnet-owt-7be5be79.pth" in result.stderr and "fetch_weights.py" in result.stderr
    assert not (tmp_path / "e").exists()
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(tmp_path / "e"),
                          "--data-path", demo_data, "--lpips-net", "none", "--fid", "inception",
                          env={"TORCH_HOME": str(tmp_path / "th")})
    assert result.returncode == 2 and "pt_inception-2015-12-05-6726825d.pth" in result.stderr
    assert "--fid none" in result.stderr and not (tmp_path / "e").exists()


def test_plain_image_folder(trained_checkpoint, tmp_path):
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((50, 70, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(out), "--dataset",
                          "images", "--data-path", str(tmp_path / "imgs"), "--lpips-net", "none",
                          "--num-samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 unreadable" in result.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_images"] == 3 and len(report["unreadable_images"]) == 1


def test_refuses_a_checkpoint_that_would_run_code(tmp_path, demo_data):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    result = evaluate_cli("--checkpoint", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "e"),
                          "--data-path", demo_data, "--lpips-net", "none")
    assert result.returncode == 2 and "refused" in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_pythae_model_folder_is_scored_like_our_models(demo_data, tmp_path):
    pythae = pytest.importorskip("pythae.models")
    torch.manual_seed(0)
    model = pythae.VAE(pythae.VAEConfig(input_dim=(3, 32, 32), latent_dim=6))
    model.save(str(tmp_path / "pythae_vae"))
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", str(tmp_path / "pythae_vae"), "--output", str(out),
                          "--data-path", demo_data, "--max-images", "6", "--lpips-net", "none",
                          "--num-samples", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == "pythae:VAE" and report["num_images"] == 6
    assert report["reconstruction"]["elbo"] is None and report["latent"]["latent_dim"] == 6
    row = next(csv.DictReader(open(out / "per_image.csv")))
    x = load_frame(row["path"], 32).float()[None] / 255        # pythae's own [0, 1] convention
    with torch.no_grad():
        recon = model.decoder(model.encoder(x).embedding).reconstruction.clamp(0, 1)
    assert float(((recon - x) ** 2).mean()) == pytest.approx(float(row["mse"]), rel=1e-4)

    (tmp_path / "pythae_vae" / "encoder.pkl").write_bytes(b"not to be unpickled")
    result = evaluate_cli("--checkpoint", str(tmp_path / "pythae_vae"), "--output", str(out),
                          "--data-path", demo_data, "--lpips-net", "none")
    assert result.returncode == 2 and "--allow-pickle" in result.stderr


def test_vq_vae_reports_codebook_latents_and_its_own_metrics(demo_data, tmp_path):
    from config import config_from_dict
    from runtime import Runtime
    from test_model_family import family_config
    from training import train
    checkpoint = train(config_from_dict(family_config(
        demo_data, str(tmp_path / "logs"), "VQVAE", **{"trainer_params.max_steps": 2})), Runtime())
    out = tmp_path / "eval"
    result = evaluate_cli("--checkpoint", checkpoint, "--output", str(out), "--data-path",
                          demo_data, "--max-images", "6", "--lpips-net", "none",
                          "--num-samples", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    rec = report["reconstruction"]
    assert rec["kl"] is None and rec["elbo"] is None and "deterministic" in rec["not_applicable"]["kl"]
    assert rec["vq_loss"]["mean"] > 0
    latent = report["latent"]
    assert latent["codebook_size"] == 16 and sum(latent["histogram"]) == 6 * 8 * 8


def test_a_model_with_nan_weights_is_reported_not_a_traceback(trained_checkpoint, demo_data,
                                                              tmp_path):
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    ckpt["model"]["final_layer.1.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    result = evaluate_cli("--checkpoint", str(tmp_path / "nan.pt"), "--output", str(tmp_path / "e"),
                          "--data-path", demo_data, "--max-images", "4", "--lpips-net", "none",
                          "--num-samples", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 4 reconstructions hold NaN or inf" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["reconstruction"]["psnr"]["mean"] is None


def test_an_interrupted_evaluation_leaves_no_report_of_an_earlier_run(trained_checkpoint,
                                                                     demo_data, tmp_path,
                                                                     monkeypatch):
    """Into a folder that holds an earlier run's metrics.json: interrupted before its own
    report is written, the run leaves its reconstructions and no report at all, never the old
    report beside the new pictures; a killed writer's temp there is cleaned up."""
    import subprocess

    import evaluation
    out = tmp_path / "e"
    out.mkdir()
    (out / "metrics.json").write_text('{"num_images": 1}')
    (out / "per_image.csv").write_text("index\n0\n")
    proc = subprocess.Popen(["true"])
    proc.wait()
    orphan = out / f"metrics.json.tmp.{proc.pid}"
    orphan.write_text("{")
    os.utime(orphan, (0, 0))

    real = evaluation.atomic_write

    def interrupted(path, *args, **kwargs):        # Ctrl-C as the report is being written
        if path.endswith("metrics.json"):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)
    monkeypatch.setattr(evaluation, "atomic_write", interrupted)
    result = evaluate_cli("--checkpoint", trained_checkpoint, "--output", str(out), "--data-path",
                          demo_data, "--lpips-net", "none", "--num-samples", "0",
                          "--save-reconstructions", "--max-images", "4")
    assert result.returncode == 130
    assert sorted(os.listdir(out)) == ["reconstructions"]


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["config"]["model_params"].update(latent_dim=16),
     "its weights do not fit the VanillaVAE its config describes"),
    (lambda c: c["config"]["model_params"].update(name="NoSuchVAE"),
     "model_params.name: unknown model"),
    (lambda c: c["config"].pop("model_params"), "model_params: missing"),
    (lambda c: c.update(config="a string"), "model_params: missing"),
    (lambda c: c["config"]["model_params"].update(name="VQVAE", num_embeddings=8,
                                                  embedding_dim=4),
     "model_params.latent_dim: unknown key for VQVAE"),
    (lambda c: c["config"]["model_params"].update(image_size=30),
     "holds a config this version cannot use: model_params"),
    (lambda c: c["config"].pop("exp_params"), "exp_params.kld_weight: missing"),
], ids=["latent_dim", "unknown_name", "no_model_params", "string_config", "other_family",
        "image_size_30", "no_exp_params"])
def test_a_checkpoint_whose_config_was_edited_is_one_line_exit_2(edit, expected, demo_data,
                                                                 trained_checkpoint, tmp_path):
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    result = evaluate_cli("--checkpoint", str(tmp_path / "edited.pt"), "--output",
                          str(tmp_path / "e"), "--lpips-net", "none", "--data-path", demo_data)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, \
        result.stderr
    assert not (tmp_path / "e").exists()
