"""Shared fixtures: a tiny synthetic SthV2 tree and a tiny config that trains in seconds."""
import os
import subprocess
import sys

import pytest
import yaml

# One thread per process, set before torch is imported here and inherited by every script the
# tests start: two pytest workers with torch's default threads oversubscribe two cores.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests wait on events (a line, a file, a step), never on a budget a busy machine could miss;
# this only stops a test that hangs.
HANG_GUARD = 1800
sys.path.insert(0, ROOT)

from make_demo_data import make_demo_data  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that starts processes or trains for "
                                       "seconds (make test-fast leaves these out)")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """6 videos x 10 frames in the SthV2 layout, with label files (4 train / 2 val)."""
    return make_demo_data(str(tmp_path_factory.mktemp("sthv2")), videos=6, frames=10, seed=3)


def tiny_config(data_path, save_dir, **overrides):
    """A raw config dict for a ~10k-parameter VAE at 32 px; overrides as {'sec.key': v}."""
    cfg = {
        "model_params": {"name": "VanillaVAE", "in_channels": 3, "hidden_dims": [8, 16],
                         "latent_dim": 8, "image_size": 32},
        "data_params": {"data_path": data_path, "image_size": 32, "train_batch_size": 8,
                        "val_batch_size": 8, "num_workers": 0, "pin_memory": False,
                        "index_cache_dir": os.path.join(save_dir, "index_cache")},
        "exp_params": {"LR": 1e-3, "kld_weight": 1e-3, "seed": 7},
        "trainer_params": {"gpus": 0, "max_epochs": 3, "log_every_n_steps": 2,
                           "precision": "fp32"},
        "logging_params": {"save_dir": save_dir, "name": "run", "save_every_n_steps": 4,
                           "log_images_every_n_steps": 5, "num_image_samples": 4},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def train_tiny_latent_action_model(data_path, save_dir, bottleneck):
    """vae_final.pt of a ~30k-parameter LatentActionModel (run name lam_BOTTLENECK) trained
    for 3 steps on consecutive frames of `data_path`."""
    from config import config_from_dict
    from runtime import Runtime
    from training import train
    cfg = tiny_config(data_path, str(save_dir), **{
        "data_params.frame_offset": 1, "data_params.resize": "stretch",
        "trainer_params.max_steps": 3, "logging_params.name": f"lam_{bottleneck}"})
    cfg["model_params"] = {"name": "LatentActionModel", "dim": 32, "quant_dim": 8,
                           "codebook_size": 8, "image_size": 32, "patch_size": 8,
                           "spatial_depth": 1, "temporal_depth": 1, "dim_head": 8, "heads": 2,
                           "code_seq_len": 4, "bottleneck": bottleneck}
    return train(config_from_dict(cfg), Runtime())


def write_config(path, cfg):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def run_in_process(script, *args, env=None):
    """`python SCRIPT ARGS` run in this process, as `python` runs it (as __main__, its exit
    code from SystemExit): the CompletedProcess without starting an interpreter and importing
    torch again; `env` is set for the call. For tests whose subject is not the process itself
    (signals, kills, launchers and anything read from the environment at import time use
    run_script)."""
    import contextlib
    import io
    import runpy
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd, environ = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = [script, *args]
    os.environ.update(env or {})
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_script(*args, timeout=HANG_GUARD, env=None):
    """Run a project script with the test interpreter in a new process; returns the
    CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def trained_checkpoint(demo_data, tmp_path_factory):
    """vae_final.pt of a tiny VanillaVAE trained for a few steps on the demo data."""
    from config import config_from_dict
    from runtime import Runtime
    from training import train
    save_dir = str(tmp_path_factory.mktemp("trained"))
    cfg = config_from_dict(tiny_config(demo_data, save_dir, **{"trainer_params.max_steps": 6}))
    return train(cfg, Runtime())


TRAINER_HOOK = '''
"""Test-only: patch(module) runs on the project's trainer module right after it is imported."""
import importlib.machinery, sys


def patch(module):
{body}


class PatchTrainer(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "trainer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, PatchTrainer)
'''


def trainer_hook(folder, body):
    """A folder to put on PYTHONPATH: every Python process started with it runs `body` (the
    indented body of `def patch(module)`) on trainer.py's module once imported, e.g. to slow
    each step or to keep each rank's weights. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(TRAINER_HOOK.replace("{body}", body))
    return str(folder)
