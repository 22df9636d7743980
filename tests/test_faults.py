"""Fault injection, done for real: signals, kill -9 while a checkpoint is written, a torchrun
worker killed, a full disk, broken data, a malicious checkpoint. After each, nothing is lost:
the resumed run ends with the same weights as an uninterrupted one."""
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (HANG_GUARD, ROOT, run_in_process, run_script, tiny_config, trainer_hook,
                      write_config)
from runtime import Runtime


def cli(*args):
    return [sys.executable, "train_single_gpu.py", *args, "--device", "cpu"]


def start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)


def wait_for_line(proc, text, timeout=HANG_GUARD):
    """Read the process output until a line contains `text`; returns everything read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"process ended before {text!r}:\n{''.join(seen)}")


def final_weights(save_dir, name):
    return torch.load(os.path.join(save_dir, name, "checkpoints", "vae_final.pt"),
                      weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """An uninterrupted 40-step run, the yardstick for every interrupted one."""
    save_dir = str(tmp_path_factory.mktemp("reference"))
    path = write_config(os.path.join(save_dir, "c.yaml"), config_dict(demo_data, save_dir, "ref"))
    result = run_in_process(*cli("--config", path)[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(save_dir, "ref")


def config_dict(demo_data, save_dir, name, **overrides):
    return tiny_config(demo_data, save_dir, **{
        "logging_params.name": name, "trainer_params.max_steps": 40,
        "trainer_params.log_every_n_steps": 1, "logging_params.save_every_n_steps": 10,
        "logging_params.log_images_every_n_steps": 1000, "exp_params.hflip": True,
        "trainer_params.max_epochs": 100, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_exits_75_and_resumes_exactly(sig, reference, demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", config_dict(demo_data, str(tmp_path), "run"))
    proc = start(cli("--config", path))
    wait_for_line(proc, "step 13/")
    proc.send_signal(sig)
    out = proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 75, out[-3000:]
    assert f"stopping on {sig.name}" in out
    stopped_at = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"]
    assert 13 <= stopped_at < 40
    result = run_in_process(*cli("--config", path, "--resume", "auto")[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(final_weights(str(tmp_path), "run"), reference)


HALF_WRITTEN = """\
import os, sys, time
if os.environ.get("HALF_WRITE_FIFO"):
    import torch
    real_save, writes = torch.save, []

    def half_then_wait(obj, f, *args, **kwargs):
        # every checkpoint after the first: half the bytes, flushed, then say so and wait
        writes.append(1)
        if len(writes) < 2 or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        import io
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        f.flush()
        with open(os.environ["HALF_WRITE_FIFO"], "w") as fifo:
            fifo.write("x")
        time.sleep(3600)
    torch.save = half_then_wait
"""


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_loses_nothing(demo_data, tmp_path):
    """kill -9 of the run while a checkpoint is half written, twice (the run waits there and
    says so through a FIFO): every file left loads, the third start resumes and ends with the
    weights of an uninterrupted run."""
    import select
    overrides = {"logging_params.save_every_n_steps": 3, "trainer_params.max_steps": 12,
                 "logging_params.keep_last_checkpoints": 0}
    ref_path = write_config(tmp_path / "ref.yaml", config_dict(demo_data, str(tmp_path), "ref", **overrides))
    assert run_in_process(*cli("--config", ref_path)[1:]).returncode == 0
    path = write_config(tmp_path / "c.yaml", config_dict(demo_data, str(tmp_path), "run", **overrides))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HALF_WRITTEN)
    fifo = tmp_path / "half_written"
    os.mkfifo(fifo)
    for kill in range(2):
        proc = start(cli("--config", path, "--resume", "auto"),
                     env={"PYTHONPATH": str(tmp_path / "hook"), "HALF_WRITE_FIFO": str(fifo)})
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:                                   # wait for the half-written checkpoint's word
            assert select.select([reader], [], [], HANG_GUARD)[0], "never reached a write"
        finally:
            os.close(reader)
        assert glob.glob(str(ckpt_dir / "*.tmp.*")), "no half-written file"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == -signal.SIGKILL
        for f in glob.glob(str(ckpt_dir / "*.pt")):                  # everything left loads
            torch.load(f, weights_only=True)
    proc = start(cli("--config", path, "--resume", "auto"))
    out = proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 0, out[-3000:]
    assert not glob.glob(str(ckpt_dir / "*.tmp.*"))
    assert_same(final_weights(str(tmp_path), "run"), final_weights(str(tmp_path), "ref"))


def worker_pids(torchrun_pid):
    """PIDs of train_ddp.py processes started by this torchrun, by RANK."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"train_ddp.py" in b" ".join(cmd) and int(stat[1]) == torchrun_pid:
            rank = [e for e in env if e.startswith(b"RANK=")]
            pids[int(rank[0][5:])] = int(entry)
    return pids


DDP = {"data_params.train_batch_size": 16, "trainer_params.max_steps": 30}


def torchrun(path):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", "--max-restarts=1", "train_ddp.py", "--config", path,
            "--device", "cpu"]


@pytest.fixture(scope="module")
def ddp_reference(demo_data, tmp_path_factory):
    """An uninterrupted 2-process run of 30 steps, for the interrupted 2-process runs."""
    save_dir = str(tmp_path_factory.mktemp("ddp_reference"))
    path = write_config(os.path.join(save_dir, "c.yaml"),
                        config_dict(demo_data, save_dir, "ref", **DDP))
    ref = subprocess.run(torchrun(path), cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=HANG_GUARD)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return final_weights(save_dir, "ref")


@pytest.mark.slow
def test_killed_torchrun_worker_restarts_and_resumes(ddp_reference, demo_data, tmp_path):
    path = write_config(tmp_path / "run.yaml", config_dict(
        demo_data, str(tmp_path), "run", **DDP, **{"logging_params.save_every_n_steps": 5}))
    proc = start(torchrun(path), env={"OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "step 12/")
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    out = proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out
    assert_same(final_weights(str(tmp_path), "run"), ddp_reference)
    # the surviving rank says in one line that a peer ended, without gloo's traceback
    assert "error: rank 0: another process of the run ended or stopped" in out, out[-4000:]
    assert "[rank0]:" not in out and "Traceback" not in out.split("resuming from")[0]


@pytest.mark.slow
def test_a_rank_that_cannot_write_the_checkpoint_ends_every_rank_in_one_line_each(
        demo_data, tmp_path):
    """Rank 0 cannot write the checkpoint (a full disk): it says so, and rank 1, waiting for it
    in a collective, says in one line that its peer ended, not with gloo's traceback."""
    path = write_config(tmp_path / "c.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{**DDP, "trainer_params.max_steps": 4}))

    def small_disk():           # files may not grow past 100 kB: a checkpoint here is ~190 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run([c for c in torchrun(path) if c != "--max-restarts=1"], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=small_disk,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=HANG_GUARD)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 2, result.stderr[-4000:]
    assert any(line.startswith("error: step 4: cannot write checkpoint") for line in ours), ours
    assert any(line.startswith("error: rank 1: another process of the run ended or stopped "
                               "answering (gloo: ") and "are intact" in line for line in ours), ours
    assert "[rank1]:" not in result.stderr and "[rank0]:" not in result.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not glob.glob(str(checkpoints / "*.tmp.*")) and not (checkpoints / "last.pt").exists()


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{"data_params.train_batch_size": 16,
                                            "trainer_params.max_steps": 400}))
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "train_ddp.py", "--config", path, "--device", "cpu"],
                 env={"OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "step 12/")
    os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)         # rank 1 only
    out = proc.communicate(timeout=HANG_GUARD)[0]
    stopped = [line for line in out.splitlines() if "stopping on a peer's signal" in line]
    assert len(stopped) == 1, out[-4000:]                     # rank 0 logs, rank 1 got it
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    # within a few steps of the signal, on every rank; the step itself when the signal came
    # during the validation that follows it (the run then stops within that validation)
    assert 12 <= step < 30
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == step and len(ckpt["rng"]) == 2     # both ranks reached the save


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{"trainer_params.max_steps": 10}))
    assert run_in_process(*cli("--config", path)[1:]).returncode == 0
    last = tmp_path / "run/checkpoints/last.pt"
    size = last.stat().st_size

    def small_disk():                         # files may not grow past half a checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    result = subprocess.run(cli("--config", path, "--set", "trainer_params.max_steps=20",
                                "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=small_disk, timeout=HANG_GUARD)
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step 20: cannot write checkpoint") and "intact" in message
    assert "enforce fail" not in message and len(result.stderr.strip().splitlines()) == 1
    assert torch.load(last, weights_only=True)["step"] == 10
    assert not glob.glob(str(tmp_path / "run/checkpoints/*.tmp.*"))


def test_unwritable_run_directory_is_refused_up_front(demo_data, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    path = write_config(tmp_path / "c.yaml", config_dict(demo_data, str(blocker), "run"))
    result = run_in_process(*cli("--config", path)[1:])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: logging_params.save_dir: cannot write to " \
        f"{blocker}/run (Not a directory)"


def test_broken_frames_are_counted_and_training_goes_on(demo_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    frames = sorted(glob.glob(str(data / "*" / "img_*.jpg")))
    open(frames[0], "wb").close()                                      # zero bytes
    blob = open(frames[5], "rb").read()
    open(frames[5], "wb").write(blob[: len(blob) // 3])               # truncated
    open(frames[9], "w").write("<html>not a frame</html>")            # wrong content
    os.makedirs(data / "9999")                                         # empty video
    train_ids = [e["id"] for e in json.load(open(data / "something-something-v2-train.json"))]
    dead = sorted(glob.glob(str(data / train_ids[-1] / "img_*.jpg")))  # no readable neighbour
    for frame in dead:
        open(frame, "w").write("gone")
    path = write_config(tmp_path / "c.yaml", config_dict(str(data), str(tmp_path), "run", **{
        "trainer_params.max_steps": 0, "trainer_params.max_epochs": 2}))
    result = run_in_process(*cli("--config", path)[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert "1 video folders hold no frames" in log
    assert all(sum(f in line for line in log.splitlines()) == 1 for f in (frames[0], frames[5], frames[9]))
    counted = [line for line in log.splitlines() if "unreadable files this epoch" in line]
    assert len(counted) == 2                                           # counted each epoch
    broken = {frames[0], frames[5], frames[9], *dead}                  # distinct files, not tries
    for line in counted:
        number = int(line.split(" unreadable files")[0].split()[-1])
        assert len(dead) <= number <= len(broken)


def test_malicious_checkpoint_is_refused_for_resume(demo_data, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Payload(), "step": 1}, tmp_path / "evil.pt")
    path = write_config(tmp_path / "c.yaml", config_dict(demo_data, str(tmp_path), "run"))
    result = run_in_process(*cli("--config", path, "--resume", str(tmp_path / "evil.pt"))[1:])
    assert result.returncode == 2 and "refused" in result.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(reference, demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", config_dict(demo_data, str(tmp_path), "again", **{
        "trainer_params.deterministic": True}))
    result = run_script(*cli("--config", path)[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(final_weights(str(tmp_path), "again"), reference)


# --- hostile-cluster faults ------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_resumes_exactly(reference, demo_data, tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too: they must not die of it."""
    path = write_config(tmp_path / "c.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{"data_params.num_workers": 2}))
    proc = start(cli("--config", path))
    wait_for_line(proc, "step 12/")
    os.killpg(proc.pid, signal.SIGINT)                         # the whole group, workers too
    out = proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "stopping on SIGINT" in out and "Traceback" not in out
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["signal"] == "SIGINT"
    result = run_in_process(*cli("--config", path, "--resume", "auto")[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run" / "stopped.json").exists()
    assert_same(final_weights(str(tmp_path), "run"), reference)


@pytest.mark.slow
def test_sigterm_to_run_train_sh_under_torchrun_exits_75_and_resumes_exactly(
        ddp_reference, demo_data, tmp_path):
    """The run's name ends in a space: run_train.sh finds its stopped.json all the same."""
    env = {"RUN_TRAIN_NPROC": "2", "OMP_NUM_THREADS": "1"}
    path = write_config(tmp_path / "run.yaml", config_dict(
        demo_data, str(tmp_path), "run ", **DDP, **{"data_params.num_workers": 2}))
    run_train = ["bash", "run_train.sh", "--config", path, "--device", "cpu"]
    proc = start(run_train, env=env)
    wait_for_line(proc, "step 12/")
    os.killpg(proc.pid, signal.SIGTERM)                        # what SLURM and a terminal do
    out = proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 75, out[-4000:]
    assert "stopping on SIGTERM" in out and "killed by signal" not in out
    assert len(torch.load(tmp_path / "run /checkpoints/last.pt", weights_only=True)["rng"]) == 2
    resumed = subprocess.run(run_train + ["--resume", "auto"], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(final_weights(str(tmp_path), "run "), ddp_reference)


@pytest.mark.slow
def test_a_second_start_into_a_running_run_is_refused_and_touches_nothing(demo_data, tmp_path):
    path = write_config(tmp_path / "c.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{"trainer_params.max_steps": 2000}))
    first = start(cli("--config", path))
    wait_for_line(first, "step 3/")
    in_flight = tmp_path / "run" / "checkpoints" / "step_0000010.pt.tmp.99999"
    in_flight.write_bytes(b"being written")
    second = run_in_process(*cli("--config", path, "--resume", "auto")[1:])
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by pid {first.pid} on" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and in_flight.exists()
    os.killpg(first.pid, signal.SIGKILL)                       # a crash: the lock goes with it
    first.communicate(timeout=HANG_GUARD)
    third = run_in_process(*cli("--config", path, "--resume", "auto", "--set",
                            "trainer_params.max_steps=12")[1:])
    assert third.returncode == 0, third.stderr[-3000:]
    assert not in_flight.exists()                              # the holder cleans up


def test_resume_refuses_changed_data_corrupt_checkpoints_and_strangers(demo_data, tmp_path):
    import shutil

    import checkpoint as ck
    import errors
    from config import config_from_dict
    from errors import ConfigError
    from runtime import Runtime
    from training import train
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    raw = config_dict(str(data), str(tmp_path), "run", **{"trainer_params.max_steps": 4,
                                                          "logging_params.save_every_n_steps": 2})
    train(config_from_dict(raw), Runtime())
    train_ids = [e["id"] for e in json.load(open(data / "something-something-v2-train.json"))]
    os.remove(data / train_ids[0] / "img_00010.jpg")                    # a frame goes away
    longer = config_from_dict({**raw, "trainer_params": {**raw["trainer_params"], "max_steps": 6}})
    with pytest.raises(ConfigError) as info:
        train(longer, Runtime(), resume="auto")
    assert "the train split changed since the checkpoint (40 frames in 4 videos then, 39 in 4 " \
           "now)" in str(info.value) and "--allow-data-change" in str(info.value)
    assert torch.load(train(longer, Runtime(), resume="auto", allow_data_change=True),
                      weights_only=True)["step"] == 6

    ckpt_dir = tmp_path / "run" / "checkpoints"
    for name in os.listdir(ckpt_dir):                                  # every one damaged
        (ckpt_dir / name).write_bytes((ckpt_dir / name).read_bytes()[:200])
    with pytest.raises(errors.CheckpointError, match="none of the .* is usable .*last.pt"):
        train(longer, Runtime(), resume="auto", allow_data_change=True)

    path = write_config(tmp_path / "c.yaml", raw)
    (tmp_path / "notes.txt").write_bytes(b"hello, not weights")
    result = run_in_process(*cli("--config", path, "--resume", str(tmp_path / "notes.txt"))[1:])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is not a PyTorch checkpoint (it holds text)" in result.stderr
    (tmp_path / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(errors.CheckpointError, match="not a PyTorch checkpoint .it holds an image"):
        ck.load_training_checkpoint(str(tmp_path / "frame.png"))
    with pytest.raises(errors.CheckpointError, match="is a folder, not a PyTorch checkpoint"):
        ck.load_training_checkpoint(str(tmp_path))
    torch.save({"model": [1, 2], "config": {}, "step": "x", "epoch": 0, "optimizer": {},
                "scheduler": {}, "rng": []}, tmp_path / "odd.pt")
    with pytest.raises(errors.CheckpointError, match="has unusable model, config, step"):
        ck.load_training_checkpoint(str(tmp_path / "odd.pt"))


@pytest.mark.slow
def test_a_worker_that_hangs_is_reported_not_waited_for(demo_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    path = write_config(tmp_path / "c.yaml", config_dict(
        str(data), str(tmp_path), "run", **{"data_params.num_workers": 1,
                                            "data_params.worker_timeout": 3}))
    env = {"PYTHONPATH": str(tmp_path / "hook")}                       # reads hang in workers
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "real = os.open\n"
        "def hang_in_workers(path, *args, **kwargs):\n"
        "    data = sys.modules.get('torch.utils.data')\n"
        "    if str(path).endswith('.jpg') and data and data.get_worker_info() is not None:\n"
        "        time.sleep(3600)                  # a read that never returns\n"
        "    return real(path, *args, **kwargs)\n"
        "os.open = hang_in_workers\n")
    result = subprocess.run(cli("--config", path), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=HANG_GUARD)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "gave no batch for 3 s" in result.stderr and "worker_timeout" in result.stderr


SLOW_STEPS = """\
    import os, time
    step = module.Trainer.step

    def slow_step(self, images):        # a slow model or node: every step SLOW_STEP_S longer
        time.sleep(float(os.environ["SLOW_STEP_S"]))
        return step(self, images)
    module.Trainer.step = slow_step"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_under_torchrun_is_saved_within_its_bound_however_slow_the_steps(
        demo_data, tmp_path, sig):
    """2 ranks x 2 workers, 1 s steps, the signal to run_train.sh's process group as SLURM
    sends it: saved and exit 75 within a few steps of the signal, so within seconds here
    (ranks used to exchange the flag every 10 steps: 15-30 s). Counted in steps, not seconds,
    so that a slower or busier machine does not fail it."""
    env = {"RUN_TRAIN_NPROC": "2", "OMP_NUM_THREADS": "1", "SLOW_STEP_S": "1.0",
           "PYTHONPATH": trainer_hook(tmp_path / "hook", SLOW_STEPS)}
    path = write_config(tmp_path / "run.yaml", config_dict(
        demo_data, str(tmp_path), "run", **{
            **DDP, "data_params.num_workers": 2, "trainer_params.max_steps": 200,
            "trainer_params.max_epochs": 100}))
    proc = start(["bash", "run_train.sh", "--config", path, "--device", "cpu"], env=env)
    wait_for_line(proc, "step 4/")                            # logged after every step
    os.killpg(proc.pid, sig)
    signalled = time.monotonic()
    seen = wait_for_line(proc, "stopping on SIGTERM", timeout=HANG_GUARD)
    latency = time.monotonic() - signalled
    print(f"{sig.name}: signal to saved checkpoint {latency:.1f} s")
    out = seen + proc.communicate(timeout=HANG_GUARD)[0]
    assert proc.returncode == 75, out[-4000:]
    stopped = int(out.split("stopping on SIGTERM at step ")[1].split(";")[0])
    # the step under way and two to agree; step 4 itself when the signal came during the
    # validation after it (the run stops within that validation)
    assert 4 <= stopped <= 8, (latency, out[-3000:])
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == stopped


@pytest.mark.slow
def test_a_resume_on_fewer_videos_makes_progress_and_one_on_another_batch_is_refused(
        demo_data, tmp_path):
    """Stopped 4 steps into an epoch of 5; with 2 of the 4 train videos gone an epoch has 2
    steps: the resume used to wait forever for an epoch that had already ended."""
    import shutil

    from config import config_from_dict
    from errors import ConfigError
    from runtime import Runtime
    from training import train
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    raw = config_dict(str(data), str(tmp_path), "run", **{"trainer_params.max_steps": 4})
    train(config_from_dict(raw), Runtime())
    bigger = config_dict(str(data), str(tmp_path), "run", **{
        "trainer_params.max_steps": 8, "data_params.train_batch_size": 16})
    with pytest.raises(ConfigError, match="the run trained with global batch 8 and this resume "
                                          "asks for 16"):
        train(config_from_dict(bigger), Runtime(), resume="auto")
    train_ids = [e["id"] for e in json.load(open(data / "something-something-v2-train.json"))]
    for vid in train_ids[:2]:
        shutil.rmtree(data / vid)
    path = write_config(tmp_path / "c.yaml", config_dict(str(data), str(tmp_path), "run", **{
        "trainer_params.max_steps": 9}))
    result = run_script(*cli("--config", path, "--resume", "auto", "--allow-data-change")[1:],
                        timeout=HANG_GUARD)                      # a guard against the old endless wait
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp_path / "run" / "checkpoints" / "vae_final.pt", weights_only=True)
    assert final["step"] == 9 and final["steps_per_epoch"] == 2 and final["epoch"] == 4


def test_a_stop_at_a_periodic_save_step_writes_one_checkpoint(demo_data, tmp_path, monkeypatch):
    """The signal arrives during step 4, a periodic save step: one checkpoint at step 4, not
    two (at full size, another ~760 MB inside the grace window)."""
    import checkpoint as ck
    import trainer
    from config import config_from_dict
    from errors import Preempted
    from runtime import Runtime
    from training import train
    steps, saves = trainer.Trainer.step, []

    def step_then_signal(self, images):
        out = steps(self, images)
        if self.steps_done == 4:
            signal.raise_signal(signal.SIGUSR1)
        return out
    real_save = ck.save_step_checkpoint
    monkeypatch.setattr(trainer.Trainer, "step", step_then_signal)
    monkeypatch.setattr(ck, "save_step_checkpoint",
                        lambda d, state, *a, **k: saves.append(state["step"]) or
                        real_save(d, state, *a, **k))
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "logging_params.save_every_n_steps": 4}))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with pytest.raises(Preempted):
            train(cfg, Runtime())
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert saves == [4]
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_a_cpu_resume_with_another_thread_count_says_it_is_not_exact(demo_data, tmp_path):
    from config import config_from_dict
    from runtime import Runtime
    from training import train
    cfg = lambda steps: config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{  # noqa: E731
        "trainer_params.max_steps": steps}))
    first = train(cfg(4), Runtime())
    assert torch.load(first, weights_only=True)["threads"] == torch.get_num_threads() == 1
    torch.set_num_threads(2)
    try:
        train(cfg(6), Runtime(), resume="auto")
    finally:
        torch.set_num_threads(1)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "written with 1 CPU threads per process and this run has 2" in log
    assert "OMP_NUM_THREADS=1 to resume exactly" in log


def test_an_elastic_restart_after_a_stop_stays_stopped(demo_data, tmp_path, monkeypatch):
    """torchrun --max-restarts takes the ranks' exit 75 for a failure and restarts them; the
    restart used to delete stopped.json and train to the end. It now exits 75 again at once,
    and stopped.json stays for run_train.sh."""
    import run_directory
    from config import config_from_dict
    from errors import Preempted
    from runtime import Runtime
    from training import train
    cfg = lambda steps: config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{  # noqa: E731
        "trainer_params.max_steps": steps}))
    train(cfg(4), Runtime())
    run_directory.mark_stopped(str(tmp_path / "run"), 4, "SIGTERM")          # what the stopped ranks wrote
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(Preempted):
        train(cfg(40), Runtime(), resume="auto")
    assert (tmp_path / "run" / "stopped.json").exists()
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 4
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")       # a new job resumes as before
    train(cfg(6), Runtime(), resume="auto")
    assert not (tmp_path / "run" / "stopped.json").exists()


def test_a_stop_during_validation_is_saved_within_a_batch_and_validation_runs_after_resume(
        demo_data, tmp_path, monkeypatch):
    """The signal arrives in the first validation batch: the run saves and stops there, not
    after the whole pass (which can outlast torchrun's 30 s grace), and the resumed run
    validates first."""
    import training
    from config import config_from_dict
    from errors import Preempted
    from runtime import Runtime
    batches, real_metrics = [], training.image_metrics

    def metrics_then_signal(*args, **kwargs):
        batches.append(1)
        if len(batches) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_metrics(*args, **kwargs)
    monkeypatch.setattr(training, "image_metrics", metrics_then_signal)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "trainer_params.max_steps": 5, "data_params.val_batch_size": 2}))   # 5 val batches
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with pytest.raises(Preempted):
            training.train(cfg, Runtime())
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert len(batches) == 1                                    # not the whole pass
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert saved["step"] == 5 and saved["pending_validation"] == "end of epoch 1"
    assert (tmp_path / "run" / "stopped.json").exists()
    monkeypatch.setattr(training, "image_metrics", real_metrics)
    final = training.train(cfg, Runtime(), resume="auto")
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("validation at step 5 (end of epoch 1)") == 1     # run after the resume
    assert torch.load(final, weights_only=True)["pending_validation"] is None


@pytest.fixture
def own_signal_handlers():
    """train() installs the stop-signal handlers in this process: put the test's back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stop_while_waiting_for_a_batch_is_saved_before_another_step_and_resumes_exactly(
        workers, reference, demo_data, tmp_path, monkeypatch, own_signal_handlers):
    """The signal arrives while the run waits for the first batch of epoch 2: saved at step 5
    without another step, exit 75, and the resumed run ends with the uninterrupted run's
    weights. Without workers the wait (here one that never ends) is broken off at once; with
    them the batch is received whole first (a worker's hand-over is not broken off)."""
    import loaders
    import training
    from config import config_from_dict
    from errors import Preempted
    real, epochs = training.device_batches, []

    def a_wait_that_never_ends(loader, device):
        epochs.append(isinstance(loader.sampler, loaders.ResumableSampler))
        if sum(epochs) == 2 and epochs[-1]:                       # epoch 2's training batches
            signal.raise_signal(signal.SIGTERM)
            if not workers:
                time.sleep(HANG_GUARD)
        yield from real(loader, device)
    monkeypatch.setattr(training, "device_batches", a_wait_that_never_ends)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "data_params.num_workers": workers}))
    with pytest.raises(Preempted):
        training.train(cfg, Runtime())
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 5
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["step"] == 5
    monkeypatch.setattr(training, "device_batches", real)
    training.train(cfg, Runtime(), resume="auto")
    assert_same(final_weights(str(tmp_path), "run"), reference)


def test_an_epoch_that_gives_no_batch_is_an_error_not_a_spin(demo_data, tmp_path, monkeypatch,
                                                             own_signal_handlers):
    import loaders
    import training
    from config import config_from_dict
    from errors import TrainingError
    monkeypatch.setattr(loaders.ResumableSampler, "__iter__", lambda self: iter([]))
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run"))
    with pytest.raises(TrainingError, match="epoch 1 gave no batch at step 0"):
        training.train(cfg, Runtime())


def test_a_second_ctrl_c_after_the_save_does_not_abort_the_stop(demo_data, tmp_path, monkeypatch,
                                                                own_signal_handlers):
    """Ctrl-C, then Ctrl-C again while the run is on its way out: the stop still ends as a stop
    (stopped.json, exit 75), not as an abort (exit -2, or a traceback from DataLoader.__del__)."""
    import run_directory
    import trainer
    import training
    from config import config_from_dict
    from errors import Preempted
    steps, mark = trainer.Trainer.step, run_directory.mark_stopped

    def step_then_ctrl_c(self, images):
        out = steps(self, images)
        if self.steps_done == 3:
            signal.raise_signal(signal.SIGINT)
        return out

    def ctrl_c_again(*args):
        signal.raise_signal(signal.SIGINT)
        return mark(*args)
    monkeypatch.setattr(trainer.Trainer, "step", step_then_ctrl_c)
    monkeypatch.setattr(run_directory, "mark_stopped", ctrl_c_again)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run"))
    with pytest.raises(Preempted):
        training.train(cfg, Runtime())
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["step"] == 3


@pytest.mark.slow
def test_a_data_worker_killed_by_the_kernel_saves_and_says_so_in_one_line(
        reference, demo_data, tmp_path, monkeypatch, own_signal_handlers):
    """SIGKILL to the DataLoader workers (what the OOM killer sends) after step 3: the run saves
    the steps since its last checkpoint, names the worker and the likely cause, and exits 1;
    the resumed run ends with the uninterrupted run's weights."""
    import multiprocessing
    import trainer
    import training
    from config import config_from_dict
    from errors import FAILED_EXIT_CODE, TrainingError
    steps = trainer.Trainer.step
    others = {child.pid for child in multiprocessing.active_children()}   # earlier tests'

    def step_then_oom_kill(self, images):
        out = steps(self, images)
        if self.steps_done == 3:
            for child in multiprocessing.active_children():
                if child.pid not in others:                           # this run's workers
                    os.kill(child.pid, signal.SIGKILL)
        return out
    monkeypatch.setattr(trainer.Trainer, "step", step_then_oom_kill)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "data_params.num_workers": 2}))
    with pytest.raises(TrainingError) as raised:
        training.train(cfg, Runtime())
    message = str(raised.value)
    assert raised.value.exit_code == FAILED_EXIT_CODE and "\n" not in message
    assert "data loader worker (pid " in message and "out-of-memory killer" in message
    assert "num_workers" in message and "resume with --resume auto" in message
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"]
    assert 3 <= saved < 10 and f"state at step {saved} is saved" in message  # not the step-0 one
    monkeypatch.setattr(trainer.Trainer, "step", steps)
    training.train(cfg, Runtime(), resume="auto")
    assert_same(final_weights(str(tmp_path), "run"), reference)


def test_a_full_disk_for_tensorboard_and_image_grids_warns_once_and_training_goes_on(
        demo_data, tmp_path, monkeypatch, own_signal_handlers):
    """Every event and PNG write fails with ENOSPC from step 3 to step 8: one warning, no
    traceback, no half-written PNG, training ends, and TensorBoard has the steps after the
    disk had room again (the writer thread is not left dead)."""
    import errno

    import torchvision.utils
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    import training
    from config import config_from_dict
    full, write, save_image = [False], RecordWriter.write, torchvision.utils.save_image

    def event_write(self, data):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    def png_write(grid, f, **kwargs):
        if full[0]:
            f.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_image(grid, f, **kwargs)
    steps = training.Trainer.step

    def step(self, images):
        full[0] = 3 <= self.steps_done < 8
        return steps(self, images)
    monkeypatch.setattr(RecordWriter, "write", event_write)
    monkeypatch.setattr(torchvision.utils, "save_image", png_write)
    monkeypatch.setattr(training.Trainer, "step", step)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "trainer_params.max_steps": 12, "logging_params.log_images_every_n_steps": 2}))
    assert training.train(cfg, Runtime())
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("cannot write") == 1 and "No space left on device" in log, log
    assert "Traceback" not in log
    images = sorted(os.listdir(tmp_path / "run" / "images"))
    assert "samples_0000006.png" not in images and "samples_0000012.png" in images
    assert not [n for n in images if not n.endswith(".png")]           # no temp left behind
    from PIL import Image
    for name in images:
        Image.open(tmp_path / "run" / "images" / name).verify()
    logged = set()
    for name in glob.glob(str(tmp_path / "run" / "events.out.tfevents.*")):
        events = EventAccumulator(name)
        events.Reload()
        logged |= {e.step for e in events.Scalars("train/loss")} if "train/loss" in \
            events.Tags()["scalars"] else set()
    assert {1, 2, 10, 11, 12} <= logged, logged


@pytest.mark.slow
def test_a_resume_from_a_checkpoint_at_an_epoch_end_goes_on_exactly(
        reference, demo_data, tmp_path, monkeypatch, own_signal_handlers):
    """Saved at step 5, the last of epoch 1 (5 steps an epoch), before the epoch is counted
    done: the resumed run finds epoch 1 with nothing left, moves on, and ends exactly."""
    import trainer
    import training
    from config import config_from_dict
    from errors import Preempted
    steps = trainer.Trainer.step

    def step_then_signal(self, images):
        out = steps(self, images)
        if self.steps_done == 5:
            signal.raise_signal(signal.SIGUSR1)
        return out
    monkeypatch.setattr(trainer.Trainer, "step", step_then_signal)
    cfg = config_from_dict(config_dict(demo_data, str(tmp_path), "run", **{
        "logging_params.save_every_n_steps": 5}))
    with pytest.raises(Preempted):
        training.train(cfg, Runtime())
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"]) == (5, 0)
    monkeypatch.setattr(trainer.Trainer, "step", steps)
    training.train(cfg, Runtime(), resume="auto")
    assert_same(final_weights(str(tmp_path), "run"), reference)


def test_a_worker_killed_while_handing_over_a_batch_is_the_same_one_line():
    """The kill lands while the main process takes a batch the worker had queued (its storage
    comes through the worker's socket, now closed): WorkerDied naming it, not a
    ConnectionResetError traceback. The DataLoader iterator is a stand-in in that state."""
    import types
    import loaders

    class Iterator:
        _workers = [types.SimpleNamespace(pid=4242, exitcode=-signal.SIGKILL),
                    types.SimpleNamespace(pid=4243, exitcode=None)]

        def __next__(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    class Loader:
        timeout = 0

        def __iter__(self):
            return Iterator()
    with pytest.raises(loaders.WorkerDied, match=r"worker \(pid 4242\) was killed \(SIGKILL\), "
                                                 r"most likely by the kernel's out-of-memory"):
        next(loaders._reported(Loader()))


def test_a_dead_worker_is_raised_by_its_own_loader_only():
    """One loader's worker dies while another loader is used: the other goes on (a death used
    to be raised by whichever loader was asked for a batch next, even in a later run in the
    same process), and the death is raised where its own loader is waited on."""
    import loaders
    from torch.utils.data import DataLoader
    mine = DataLoader(list(range(400)), batch_size=4, num_workers=1, persistent_workers=True)
    other = DataLoader(list(range(400)), batch_size=4, num_workers=1)
    mine_batches, other_batches = loaders._reported(mine), loaders._reported(other)
    next(mine_batches), next(other_batches)
    victim = mine._iterator._workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(HANG_GUARD)
    assert len([next(other_batches) for _ in range(20)]) == 20
    with pytest.raises(loaders.WorkerDied, match=f"pid {victim.pid}"):
        for _ in range(100):
            next(mine_batches)
