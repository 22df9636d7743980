"""run_train.sh and test_setup.py as a user runs them; the other model families under torchrun."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import (HANG_GUARD, ROOT, run_in_process, run_script, tiny_config, trainer_hook,
                      write_config)
from test_model_family import family_config


def shell(*args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.slow
def test_run_train_sh_trains_in_one_process_without_gpus(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        demo_data, str(tmp_path / "logs"), **{"trainer_params.max_steps": 3}))
    result = shell("--config", path, "--device", "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 processes on cpu" in result.stdout
    assert (tmp_path / "logs/run/checkpoints/vae_final.pt").exists()


@pytest.mark.slow
def test_run_train_sh_takes_paths_from_where_it_is_called(demo_data, tmp_path):
    """A SLURM job submitted from its own folder: a relative config, and relative paths in it,
    are the caller's, as with python train_single_gpu.py."""
    cfg = tiny_config(demo_data, "logs", **{"trainer_params.max_steps": 2})
    write_config(tmp_path / "my.yaml", cfg)
    result = subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), "--config", "my.yaml",
                             "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=HANG_GUARD, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "logs/run/checkpoints/vae_final.pt").exists()
    assert not os.path.exists(os.path.join(ROOT, "logs", "run"))


@pytest.mark.slow
def test_run_train_sh_checks_the_config_before_launching(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        demo_data, str(tmp_path / "logs"), **{"trainer_params.gpus": "all"}))
    result = shell("--config", path)
    assert result.returncode == 2                             # bad input, as every script
    assert "trainer_params.gpus: expected int, got str 'all'" in result.stderr
    assert not (tmp_path / "logs").exists()
    usage = shell("--help")
    assert usage.returncode == 0 and "Usage: ./run_train.sh" in usage.stdout


def test_test_setup_passes_on_a_good_setup_and_names_the_fix_otherwise(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(demo_data, str(tmp_path / "logs")))
    ok = run_in_process("test_setup.py", "--config", path, "--device", "cpu")
    assert ok.returncode == 0, ok.stdout[-3000:]
    for check in ("package lpips", "config", "data layout", "sample batch",
                  "model training step", "log directory"):
        assert any(line.startswith(" ✓") and check in line for line in ok.stdout.splitlines()), check
    assert re.search(r" ✓  sample batch +batch \(8, 3, 32, 32\) torch\.uint8", ok.stdout)
    assert re.search(r" ✓  model training step +VanillaVAE [\d,]+ parameters, one step of 2 on cpu",
                     ok.stdout)
    bad = run_in_process("test_setup.py", "--config", path, "--set",
                     f"data_params.data_path={tmp_path / 'missing'}")
    assert bad.returncode == 2                                 # bad input, as every script
    assert " ✗  config" in bad.stdout and "fix:" in bad.stdout


RANK_STATES = """\
    import atexit, os
    init = module.Trainer.__init__

    def keep(self, *args, **kwargs):    # each rank saves its weights at exit
        init(self, *args, **kwargs)
        atexit.register(lambda: __import__("torch").save(
            self.bare.state_dict(),
            os.path.join(os.environ["RANK_STATE_DIR"], f"rank{os.environ['RANK']}.pt")))
    module.Trainer.__init__ = keep"""


# Each rank's BatchNorm statistics are those of its own batches (DDP hands rank 0's to every
# rank before each forward pass; sync_batchnorm would make them global): not weights.
BATCHNORM_STATISTICS = re.compile(r"running_(mean|var)$|num_batches_tracked$")


@pytest.mark.slow
def test_vq_vae_and_vae_gan_train_under_torchrun_with_the_same_weights_on_every_rank(
        demo_data, tmp_path):
    """VQ-VAE syncs its EMA codebook inside forward; VAE-GAN's three groups are averaged over
    ranks by the step engine and its equilibrium rules decided on rank-averaged losses: after
    training, both ranks hold the same weights, bit for bit, and the checkpoint is rank 0's."""
    hook = trainer_hook(tmp_path / "hook", RANK_STATES)
    for name, extra in (("VQVAE", {"model_params.ema": True, "model_params.dead_code_steps": 2}),
                        ("VAEGAN", {})):
        raw = family_config(demo_data, str(tmp_path / "logs"), name, **{
            "logging_params.name": name, "data_params.train_batch_size": 16,
            "trainer_params.max_steps": 4})
        for key, value in extra.items():
            raw["model_params"][key.split(".")[1]] = value
        path = write_config(tmp_path / f"{name}.yaml", raw)
        states = tmp_path / f"{name}_states"
        states.mkdir()
        result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train_ddp.py", "--config", path, "--device", "cpu",
                            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": hook,
                                 "RANK_STATE_DIR": str(states)})
        assert result.returncode == 0, result.stderr[-3000:]
        ckpt = torch.load(tmp_path / "logs" / name / "checkpoints" / "vae_final.pt",
                          weights_only=True)
        assert ckpt["world_size"] == 2 and ckpt["step"] == 4
        rank0, rank1 = (torch.load(states / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert rank0.keys() == rank1.keys() == ckpt["model"].keys()
        for key in rank0:
            assert torch.equal(rank0[key], ckpt["model"][key]), (name, key)
            if not BATCHNORM_STATISTICS.search(key):
                assert torch.equal(rank0[key], rank1[key]), (name, key)
