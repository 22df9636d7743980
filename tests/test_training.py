"""Single-process training: contract outputs, TensorBoard tags, exact resume, safe restarts."""
import glob
import io
import os
import re
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoint import REQUIRED_KEYS
from config import config_from_dict
from conftest import ROOT, run_in_process, tiny_config, write_config
from errors import TrainingError
from models import build_model
from runtime import Runtime
from training import run, train
from vanilla_vae_model import VanillaVAE

CONTRACT_SCALARS = {"train/loss", "train/recon_loss", "train/kld", "train/lr", "train/grad_norm",
                    "train/images_per_sec", "val/loss", "val/recon_loss", "val/kld"}
CONTRACT_IMAGES = {"images/reconstructions", "images/samples"}


def train_cli(config_path, *extra):
    result = run_in_process("train_single_gpu.py", "--config", config_path, "--device", "cpu", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_tensors(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], exact)
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_run_writes_the_contract_outputs(demo_data, tmp_path):
    cfg = tiny_config(demo_data, str(tmp_path / "logs"))     # 5 steps per epoch, 3 epochs
    train_cli(write_config(tmp_path / "c.yaml", cfg))
    run_dir = tmp_path / "logs" / "run"
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["last.pt", "step_0000008.pt", "step_0000012.pt", "step_0000015.pt",
                     "vae_final.pt"]                          # step_0000004 pruned (keep 3)
    final = torch.load(run_dir / "checkpoints" / "vae_final.pt", weights_only=True)
    assert set(REQUIRED_KEYS) <= set(final) and final["step"] == 15 and final["epoch"] == 3
    assert not [k for k in final["model"] if k.startswith(("module.", "_orig_mod."))]
    model = build_model(final["config"]["model_params"])
    model.load_state_dict(final["model"])                    # strict: every key matches
    assert final["config"]["exp_params"]["LR"] == 1e-3
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    # the manifest: this repository's commit, the versions, the command, the data's hashes
    import hashlib
    import subprocess

    from config import load_config
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    manifest = final["manifest"]
    if head.returncode == 0:
        assert manifest["git"]["commit"] == head.stdout.strip()
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["command"].startswith("train_single_gpu.py --config")
    label = os.path.join(demo_data, "something-something-v2-train.json")
    assert manifest["labels"]["something-something-v2-train.json"] == \
        hashlib.sha256(open(label, "rb").read()).hexdigest()
    assert manifest["frame_index"]["videos"] == 6
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["manifest"] == manifest
    assert load_config(str(run_dir / "config.yaml")).to_dict() == final["config"]   # re-usable

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert CONTRACT_SCALARS <= set(events.Tags()["scalars"])
    assert CONTRACT_IMAGES <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert all(e.value > 0 for e in events.Scalars("train/kld"))
    assert len(events.Scalars("val/loss")) == 3               # once per epoch
    assert glob.glob(str(run_dir / "images" / "reconstructions_*.png"))


def test_a_run_outside_a_git_checkout_says_so(tmp_path):
    from manifest import git_state
    assert git_state(str(tmp_path)) == {"commit": None, "note": "not a git checkout"}


@pytest.mark.slow
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(demo_data, tmp_path):
    """Also from a checkpoint in the layout written before optimizer states were stored by
    group (one optimizer's state as it is)."""
    def config(name, steps):
        return config_from_dict(tiny_config(
            demo_data, str(tmp_path / "logs"), **{
                "logging_params.name": name, "trainer_params.max_steps": steps,
                "data_params.num_workers": 1, "exp_params.hflip": True,
                "exp_params.warmup_steps": 3, "exp_params.scheduler_gamma": 0.9}))

    train(config("straight", 14), Runtime())                  # 2N = 14 steps, 5 per epoch
    halfway = train(config("resumed", 7), Runtime())          # stops mid-epoch at N = 7
    old = torch.load(halfway, weights_only=True)
    old["optimizer"], old["scheduler"] = old["optimizer"]["model"], old["scheduler"]["model"]
    torch.save(old, tmp_path / "old_layout.pt")
    train(config("resumed", 14), Runtime(), resume="auto")
    train(config("legacy", 14), Runtime(), resume=str(tmp_path / "old_layout.pt"))
    a = torch.load(tmp_path / "logs/straight/checkpoints/vae_final.pt", weights_only=True)
    for name in ("resumed", "legacy"):
        b = torch.load(tmp_path / f"logs/{name}/checkpoints/vae_final.pt", weights_only=True)
        assert a["step"] == b["step"] == 14
        assert_same_tensors(a["model"], b["model"])
        assert_same_tensors(a["optimizer"], b["optimizer"])
        assert a["scheduler"] == b["scheduler"]


def test_a_new_learning_rate_on_resume_takes_effect_from_the_resume_step(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        demo_data, str(tmp_path / "logs"), **{"trainer_params.max_steps": 7}))
    train_cli(path)
    result = train_cli(path, "--resume", "auto", "--set", "exp_params.LR=5e-4",
                       "--set", "trainer_params.max_steps=10")
    assert "exp_params.LR 0.0005 (checkpoint: 0.001)" in result.stdout
    final = torch.load(tmp_path / "logs/run/checkpoints/vae_final.pt", weights_only=True)
    assert final["scheduler"]["model"]["base_lrs"] == [5e-4]
    assert final["optimizer"]["model"]["param_groups"][0]["lr"] == pytest.approx(5e-4 * 0.95 ** 2)


def test_existing_run_is_never_overwritten_without_resume(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        demo_data, str(tmp_path / "logs"), **{"trainer_params.max_steps": 2}))
    train_cli(path)
    before = open(tmp_path / "logs/run/checkpoints/last.pt", "rb").read()
    result = run_in_process("train_single_gpu.py", "--config", path, "--device", "cpu")
    assert result.returncode == 2 and "--resume auto" in result.stderr
    assert open(tmp_path / "logs/run/checkpoints/last.pt", "rb").read() == before


def test_resume_auto_skips_a_truncated_checkpoint(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        demo_data, str(tmp_path / "logs"), **{"trainer_params.max_steps": 9}))
    train_cli(path)
    ckpt_dir = tmp_path / "logs/run/checkpoints"
    for name in ("last.pt", "step_0000009.pt"):               # as if killed mid-write
        data = (ckpt_dir / name).read_bytes()
        (ckpt_dir / name).write_bytes(data[: len(data) // 3])
    result = train_cli(path, "--set", "trainer_params.max_steps=10", "--resume", "auto")
    assert "step_0000008.pt" in result.stdout and "truncated" in result.stdout + result.stderr
    assert torch.load(ckpt_dir / "vae_final.pt", weights_only=True)["step"] == 10


def test_non_finite_steps_are_skipped_then_stop_the_run(demo_data, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_nonfinite_steps": 3}))
    original = VanillaVAE.loss_function

    def poisoned(self, *args):
        losses = original(self, *args)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(VanillaVAE, "loss_function", poisoned)
    # read at log steps (every 2): 2 in a row at step 2 is fine, 4 at step 4 is not
    with pytest.raises(TrainingError, match=r"4 non-finite steps in a row by step 4 \(not "
                                            r"finite: loss, the gradient norm; lower exp_"):
        train(cfg, Runtime())
    saved = torch.load(tmp_path / "logs/run/checkpoints/last.pt", weights_only=True)
    assert saved["step"] == 4                                 # no update was ever applied:
    assert all(s["step"] == 0 and not s["exp_avg"].any()
               for s in saved["optimizer"]["model"]["state"].values())
    torch.manual_seed(cfg.exp_params.seed)                    # the run's initialisation
    for name, p in build_model(cfg.model_params).named_parameters():
        assert torch.equal(saved["model"][name], p), name


def test_a_non_finite_codebook_is_named_when_the_run_stops(demo_data, tmp_path, monkeypatch):
    from latent_action_model import LatentActionModel
    cfg = tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_nonfinite_steps": 1, "data_params.frame_offset": 2})
    cfg["model_params"] = {"name": "LatentActionModel", "dim": 32, "quant_dim": 4,
                           "codebook_size": 8, "image_size": 32, "patch_size": 8,
                           "spatial_depth": 1, "temporal_depth": 1, "dim_head": 16, "heads": 2,
                           "code_seq_len": 4, "bottleneck": "nsvq"}
    original = LatentActionModel.before_step

    def poisoned(self, step):
        original(self, step)
        with torch.no_grad():
            self.bottleneck.codebook[3] = float("nan")
    monkeypatch.setattr(LatentActionModel, "before_step", poisoned)
    with pytest.raises(TrainingError, match=r"the model's own tensors are not finite: "
                                            r"bottleneck.codebook; resume from a checkpoint before this"):
        train(config_from_dict(cfg), Runtime())


def test_skipped_steps_leave_batchnorm_statistics_as_they_were(demo_data, tmp_path, monkeypatch):
    """Exploding inputs make the forward pass write NaN running statistics; the checkpoint
    saved when the run stops must hold the last good ones."""
    import trainer
    cfg = config_from_dict(tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_nonfinite_steps": 3}))
    original = trainer.to_model_input
    monkeypatch.setattr(trainer, "to_model_input",
                        lambda *a, **k: original(*a, **k) * float("inf"))
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        train(cfg, Runtime())
    saved = torch.load(tmp_path / "logs/run/checkpoints/last.pt", weights_only=True)["model"]
    torch.manual_seed(cfg.exp_params.seed)
    for name, b in build_model(cfg.model_params).named_buffers():
        assert torch.equal(saved[name], b), name            # zeros, ones, 0 batches tracked


def test_flip_mask_flips_exactly_the_chosen_images():
    from trainer import to_model_input
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    x = to_model_input(images, torch.device("cpu"), flip=torch.tensor([True, False]))
    expected = images.float() / 127.5 - 1
    assert torch.equal(x[0], expected[0].flip(-1)) and torch.equal(x[1], expected[1])


def test_learning_rate_warms_up_then_decays_once_per_epoch():
    from trainer import make_lr_lambda
    factor = make_lr_lambda(warmup_steps=4, gamma=0.5, steps_per_epoch=10)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == 1.0 and factor(10) == 0.5 and factor(25) == 0.25


def test_hflip_switch_reaches_the_training_batches(demo_data, tmp_path):
    def final(name, hflip):
        cfg = config_from_dict(tiny_config(demo_data, str(tmp_path), **{
            "logging_params.name": name, "exp_params.hflip": hflip,
            "trainer_params.max_steps": 2}))
        return torch.load(train(cfg, Runtime()), weights_only=True)["model"]

    plain, flipped, plain_again = final("a", False), final("b", True), final("c", False)
    assert all(torch.equal(plain[k], plain_again[k]) for k in plain)
    assert any(not torch.equal(plain[k], flipped[k]) for k in plain)


def test_a_failed_start_writes_nothing_and_a_finished_run_is_left_alone(demo_data, tmp_path):
    from errors import CheckpointError
    from errors import DataError
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no frames found"):
        train(config_from_dict(tiny_config(str(empty), str(tmp_path / "logs"), **{
            "data_params.index_cache_dir": str(tmp_path / "cache")})), Runtime())
    assert not (tmp_path / "logs").exists()                   # no run dir, no train.log
    cfg = config_from_dict(tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_steps": 4, "data_params.index_cache_dir": str(tmp_path / "cache")}))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, Runtime(), resume=str(tmp_path / "missing.pt"))
    assert not (tmp_path / "logs").exists()

    final = train(cfg, Runtime())
    run_dir = tmp_path / "logs" / "run"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert train(cfg, Runtime(), resume="auto") == final
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    again = run_in_process("train_single_gpu.py", "--config", write_config(
        tmp_path / "c.yaml", cfg.to_dict()), "--device", "cpu", "--resume", "auto")
    assert again.returncode == 0 and "the run finished at step 4" in again.stdout
    assert "nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_show_on_a_terminal_only(demo_data, tmp_path, monkeypatch, capsys,
                                               terminal):
    """tqdm decides (disable=None): bars for training, validation and indexing on a terminal,
    none in a batch job's log; log lines keep going to stdout either way."""
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    cfg = tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_steps": 4, "data_params.index_cache_dir": str(tmp_path / "new")})
    run(lambda: config_from_dict(cfg), lambda c: Runtime(), None)
    bars = err.getvalue()
    for name in ("indexing", "training", "validation"):
        assert (f"{name}:" in bars) == terminal, (name, bars[-500:])
    assert "validating on 20 frames" in capsys.readouterr().out


def test_a_step_slower_than_stop_within_s_is_announced_once(demo_data, tmp_path, capsys):
    cfg = config_from_dict(tiny_config(demo_data, str(tmp_path), **{
        "trainer_params.max_steps": 6, "trainer_params.stop_within_s": 1e-6}))
    train(cfg, Runtime())
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert out.count("a stop signal is acted on within 1 step, ") == 1, out[-3000:]
    assert "more than trainer_params.stop_within_s = 1e-06 s" in out
    train(config_from_dict(tiny_config(demo_data, str(tmp_path), **{
        "trainer_params.max_steps": 2, "logging_params.name": "fast"})), Runtime())
    assert "a stop signal is acted on" not in "".join(capsys.readouterr())   # 20 s default


def test_train_ddp_without_torchrun_says_so_and_a_resume_names_its_step(demo_data, tmp_path):
    from conftest import run_in_process, write_config
    config = write_config(tmp_path / "c.yaml", tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_steps": 2, "logging_params.save_every_n_steps": 1}))
    first = run_in_process("train_ddp.py", "--config", config, "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "train_ddp.py: not started by torchrun (no RANK in the environment): training as " \
           "one process" in first.stderr
    again = run_in_process("train_ddp.py", "--config", config, "--device", "cpu", "--resume",
                           str(tmp_path / "logs/run/checkpoints/step_0000001.pt"),
                           "--set", "logging_params.name=run")
    assert again.returncode == 0, again.stderr[-2000:]
    log = (tmp_path / "logs/run/train.log").read_text()
    assert f"resuming from {tmp_path / 'logs/run/checkpoints/step_0000001.pt'} at step 1 " \
           f"(epoch 1)" in log
    assert re.search(r"step 2/2 \(epoch 1, [\d.]+ steps/s, 0:00:00 left\)", log), log
