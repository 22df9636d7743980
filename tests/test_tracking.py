"""Weights & Biases logging (offline): the TensorBoard scalars and images mirrored, the same W&B
run continued on --resume, and a clear config error when wandb is not installed."""
import glob
import os
import sys

import pytest

from config import config_from_dict
from conftest import tiny_config
from errors import ConfigError, TrainingError
from runtime import Runtime
from training import train

wandb = pytest.importorskip("wandb")


@pytest.mark.slow
def test_wandb_offline_mirrors_tensorboard_and_resumes_the_same_run(demo_data, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows, log = [], wandb.sdk.wandb_run.Run.log
    def spy(run, data, *args, **kwargs):                       # what reaches W&B, then W&B
        rows.append(dict(data))
        return log(run, data, *args, **kwargs)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)

    def config(steps):
        return config_from_dict(tiny_config(demo_data, str(tmp_path / "logs"), **{
            "trainer_params.max_steps": steps, "logging_params.wandb": True,
            "logging_params.wandb_mode": "offline", "logging_params.wandb_project": "demo"}))
    train(config(4), Runtime())
    run_dir = tmp_path / "logs" / "run"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    train(config(8), Runtime(), resume="auto")
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)   # one id, two starts
    assert all(os.path.getsize(glob.glob(os.path.join(r, "run-*.wandb"))[0]) > 0 for r in runs)

    losses = [(r["trainer/step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in losses] == [2, 4, 6, 8]
    assert {"val/loss", "val/kld", "train/lr", "data/unreadable_frames"} <= set().union(*rows)
    pictures = [r for r in rows if "images/reconstructions" in r]
    assert [r["trainer/step"] for r in pictures] == [4, 5, 8]
    assert isinstance(pictures[0]["images/reconstructions"], wandb.Image)


def test_wandb_on_without_the_package_is_a_config_error(demo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # as if it were not installed
    raw = tiny_config(demo_data, str(tmp_path), **{"logging_params.wandb": True})
    with pytest.raises(ConfigError, match=r"logging_params.wandb: .*pip install wandb==0.31.0"):
        config_from_dict(raw)
    raw["logging_params"]["wandb"] = False
    config_from_dict(raw)                                      # off: no need for the package


def test_wandb_that_cannot_start_is_one_line_naming_the_way_out(demo_data, tmp_path,
                                                                monkeypatch):
    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=...)")
    monkeypatch.setattr(wandb, "init", no_login)
    cfg = config_from_dict(tiny_config(demo_data, str(tmp_path / "logs"), **{
        "trainer_params.max_steps": 2, "logging_params.wandb": True}))
    with pytest.raises(TrainingError, match=r"Weights & Biases could not start \(UsageError: "
                                            r"api_key not configured.*WANDB_MODE=offline"):
        train(cfg, Runtime())
