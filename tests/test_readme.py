"""The README and docs/ as written: every script, flag and config key their commands mention
exists, every page they link to exists, and the generated configuration reference is current."""
import contextlib
import dataclasses
import io
import os
import re
import runpy
import subprocess
import sys
import time

import pytest

import inspect

import config
from conftest import HANG_GUARD, ROOT
from models import MODELS

README = open(os.path.join(ROOT, "README.md")).read()
DOCS = {name: open(os.path.join(ROOT, "docs", name)).read()
        for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")}
ALL_TEXT = "\n".join([README, *DOCS.values()])
SECTIONS = {"data_params": config.DataParams, "exp_params": config.ExpParams,
            "trainer_params": config.TrainerParams, "logging_params": config.LoggingParams}


def bash_lines():
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", ALL_TEXT, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line.split(" # ")[0].split("   #")[0]


def commands():
    """(script and subcommand, flags) for each python / torchrun / ./run_train.sh command."""
    found = []
    for line in bash_lines():
        for part in re.split(r" && |; | \| ", line):
            words = part.split()
            scripts = [i for i, w in enumerate(words) if w.endswith((".py", ".sh"))
                       and os.path.basename(w) == w.lstrip("./")]
            if not scripts or words[0] not in ("python", "torchrun", "./run_train.sh"):
                continue
            i = scripts[0]
            args = words[i + 1:]
            script = words[i].lstrip("./")
            if script == "bench.py":
                script, args = f"bench.py {args[0]}", args[1:]
            found.append((script, sorted({m for a in args for m in re.findall(r"--[a-z][\w-]*", a)})))
    return found


def help_text(script):
    if script.endswith(".sh"):
        return subprocess.run(["bash", os.path.join(ROOT, script), "--help"], capture_output=True,
                              text=True).stdout + help_text("train_ddp.py")
    name, *sub = script.split()
    out = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = [name, *sub, "--help"]
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def test_every_readme_command_names_a_script_and_flags_that_exist():
    found = commands()
    assert {"train_single_gpu.py", "train_ddp.py", "run_train.sh", "evaluate.py",
            "compare_with_laq.py", "bench.py data"} <= {s for s, _ in found}
    helps = {}
    for script, flags in found:
        text = helps.setdefault(script, help_text(script))
        missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", text)]
        assert not missing, f"README: {script} has no {missing}"


def test_every_config_key_the_readme_names_exists():
    named = set(re.findall(r"\b(model_params|data_params|exp_params|trainer_params|"
                           r"logging_params)\.(\w+)", ALL_TEXT))
    model_keys = {p for cls in MODELS.values()
                  for p in inspect.signature(cls).parameters} | {"name"}
    unknown = [f"{s}.{k}" for s, k in named
               if k not in (model_keys if s == "model_params" else
                            {f.name for f in dataclasses.fields(SECTIONS[s])})]
    assert len(named) >= 10 and not unknown, unknown


def test_the_readme_is_a_guide_and_its_links_lead_somewhere():
    assert len(README.splitlines()) <= 250
    for page, text in {"README.md": README, **{f"docs/{n}": t for n, t in DOCS.items()}}.items():
        folder = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text):
            assert os.path.isfile(os.path.join(folder, target)), f"{page} links to {target}"


def test_the_configuration_reference_is_generated_from_the_code():
    """docs/configuration.md is what make_docs.py writes now: every key of every section and
    family, with its default, and the docstring written under it in config.py."""
    import make_docs
    assert DOCS["configuration.md"] == make_docs.reference(), "run python make_docs.py --write"
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in DOCS["configuration.md"], f"{name}.{f.name}"
            assert make_docs.key_docs(cls).get(f.name), f"{name}.{f.name} has no docstring"
    for cls in MODELS.values():
        for key in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert f"| `{key}` |" in DOCS["configuration.md"], f"{cls.__name__}: {key}"


def fresh_shell(command, cwd, home, **kwargs):
    """bash -c COMMAND as in a new login: no virtual environment active, a bare PATH."""
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, **kwargs)


def repo_copy(dest):
    """The tracked files (as a clean clone has them, times kept) and the test's .venv."""
    import shutil
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        if os.path.isfile(os.path.join(ROOT, name)):
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(dest, ".venv"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="needs the project's .venv (make venv-dev)")
def test_make_demo_and_the_commands_after_it_work_from_a_fresh_shell(tmp_path):
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo_copy(str(repo))
    home.mkdir()
    demo = fresh_shell("make demo DEMO_DATA_ARGS='--videos 16 --frames 4' DEMO_ARGS='--set "
                       "trainer_params.max_steps=3 --set data_params.train_batch_size=8'",
                       repo, home, timeout=HANG_GUARD)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "psnr of mean colour" in demo.stdout                # the baseline beside the model

    printed = re.search(r"TensorBoard logs: +(.+)", demo.stdout).group(1)
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as out:                               # it serves until killed
        board = subprocess.Popen(["bash", "-c", f"exec {printed} --port 0"], cwd=repo,
                                 env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while "http://localhost:" not in log.read_text() and board.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        board.kill()
        board.wait()
    assert "http://localhost:" in log.read_text(), log.read_text()[-2000:]

    block = re.search(r"### After `make demo`\n.*?```bash\n(.*?)```", README, re.S).group(1)
    after = fresh_shell(f"set -e\n{block}", repo, home, timeout=HANG_GUARD)
    assert after.returncode == 0, after.stderr[-2000:]
    assert (repo / "eval_demo" / "metrics.json").is_file()
