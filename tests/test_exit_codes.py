"""One exit-code convention for every script: bad input (arguments, config, data, checkpoint)
exits 2 with one `error:` line on stderr and writes nothing. Run in-process, as `python SCRIPT`."""
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT

MISSING = "no/such/path"


def cases(tmp):
    out = os.path.join(tmp, "out")
    return {
        "train_single_gpu.py": ["--config", f"{MISSING}.yaml", "--device", "cpu"],
        "train_ddp.py": ["--config", f"{MISSING}.yaml", "--device", "cpu"],
        "test_setup.py": ["--config", f"{MISSING}.yaml", "--device", "cpu"],
        "evaluate.py": ["--checkpoint", f"{MISSING}.pt", "--output", out, "--device", "cpu"],
        "compare_with_laq.py": ["--vae", f"{MISSING}.pt", "--laq", MISSING, "--data-path", MISSING,
                                "--output", out, "--device", "cpu", "--lpips-net", "none",
                                "--fid", "none"],
        "pack_frames.py": ["--data-path", MISSING, "--out", out],
        "prepare_celeba.py": ["--src", f"{MISSING}.zip", "-o", out, "--skip-download"],
        "bench.py": ["data", "--data-path", MISSING],
        "make_demo_data.py": ["--out", out, "--videos", "1"],
        "fetch_weights.py": ["--lpips", "resnet"],
        "convert_laq.py": ["--laq", f"{MISSING}.pt", "--out", os.path.join(out, "twin.pt")],
        "label_actions.py": ["--model", f"{MISSING}.pt", "--data-path", MISSING,
                             "--out", os.path.join(out, "labels.jsonl"), "--device", "cpu"],
    }


@pytest.mark.parametrize("script", sorted(cases("")))
def test_bad_input_exits_2_with_one_error_line(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                               # relative paths resolve here
    monkeypatch.setattr(sys, "argv", [script, *cases(str(tmp_path))[script]])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert exit.value.code == 2, err
    if script == "test_setup.py":                             # its table names the failed check
        assert "✗  config" in printed.out and MISSING in printed.out
    else:
        assert [line for line in err if line.startswith(("error:", f"{script}: error:"))], err
    if script not in ("make_demo_data.py", "fetch_weights.py"):
        # the missing input is named, before weight files (evaluate.py's LPIPS backbone is not
        # on this machine either) or anything else is looked at
        assert MISSING in printed.err + printed.out, err
    assert "Traceback" not in printed.err
    assert not (tmp_path / "out").exists()                    # nothing written


SCRIPTS = ["train_single_gpu.py", "train_ddp.py", "test_setup.py", "evaluate.py",
           "compare_with_laq.py", "report.py", "prepare_sthv2.py", "record_episodes.py",
           "downstream.py", "pack_frames.py", "prepare_celeba.py", "bench.py", "make_demo_data.py", "fetch_weights.py",
           "make_docs.py", "convert_laq.py", "label_actions.py"]


@pytest.mark.slow
def test_every_script_answers_help_before_torch_is_imported_in_whole_sentences(tmp_path):
    """--help is parsed before torch is imported (a torch that cannot be imported stands in for
    the 30 s it takes under load), and its description ends a sentence."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported before --help')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    script_files = sorted(n for n in os.listdir(ROOT) if n.endswith(".py")
                          and "__main__\"" in open(os.path.join(ROOT, n)).read())
    assert sorted(SCRIPTS) == script_files, "a new script: add it here"
    for script in SCRIPTS:
        result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
        description = " ".join(result.stdout.split("\n\n")[1].split())
        assert description.endswith("."), f"{script}: {description!r}"
    docs = subprocess.run([sys.executable, "make_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert docs.returncode == 0 and "up to date" in docs.stdout, docs.stderr


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    """Sections, keys and types outside model_params are checked before torch loads (it takes
    30-90 s to import on a busy login node)."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported before the config')\n")
    config = tmp_path / "typo.yaml"
    config.write_text("model_params: {name: VanillaVAE}\ndata_params: {data_pth: x}\n"
                      "exp_params: {}\ntrainer_params: {}\nlogging_params: {}\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    for script in ("train_single_gpu.py", "train_ddp.py"):
        result = subprocess.run([sys.executable, script, "--config", str(config)], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {config}: data_params.data_pth: unknown key")
