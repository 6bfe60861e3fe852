"""Beyond one process: runs whose processes a launcher starts (submitit, or the variables torchrun sets), sweeps
that would make Lightning start them refused, processes that stop together, and jobs requeued at their time limit."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, run_cli, write_dataset
from deepcnn.cluster import end_processes, refuse_spawning_sweep
from deepcnn.errors import SettingsError

needs_cluster_extra = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("submitit", "hydra_plugins.hydra_submitit_launcher")),
    reason="submitit and Hydra's submitit launcher are not installed (pip install -e '.[cluster]')")

STEPS = 30
SETTINGS = ("data.download=false", "data.val_size=32", "data.batch_size=16", "data.eval_batch_size=16",
            "model.channels=8", "model.hidden=[16,8]", "trainer.precision=32", "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=10", f"trainer.max_steps={STEPS}", "seed=7",
            "callbacks=none")
TWO_PROCESSES = ("trainer.devices=2", "trainer.strategy=ddp")
# A bound on any one run here, so that a test fails rather than hangs.
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(data, run_dir, *extra, tmp_path):
    """Both processes of a two-process run, started as torchrun would: each with its LOCAL_RANK, so that
    Lightning starts none itself. Rank 0's stdout is a pipe; stderr of rank r goes to tmp_path/stderr-r."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        command = [sys.executable, str(ROOT / "src" / "train.py"), f"data.data_dir={data}", *SETTINGS,
                   *TWO_PROCESSES, f"hydra.run.dir={run_dir}", *extra]
        with open(tmp_path / f"stderr-{rank}", "w") as stderr:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, text=True, stderr=stderr,
                                              stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL))
    return processes


def finish(processes, timeout=RUN_TIMEOUT) -> list[int]:
    """The exit codes; a process still running after `timeout` seconds is killed and fails the test."""
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"a process of the run did not exit within {timeout} s")
        codes.append(process.returncode)
    return codes


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_run(run_dir: Path, reference_dir: Path, steps: int = STEPS):
    """Same results and bit-identical final weights, losses and learning-rate schedule state."""
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference_dir))
    assert got["steps"] == want["steps"] == steps
    for key in ("val_accuracy", "test_accuracy", "per_class_accuracy"):
        assert got[key] == want[key], key
    got, want = (checkpoint(d / "checkpoints" / "last.ckpt") for d in (run_dir, reference_dir))
    assert got["global_step"] == want["global_step"] == steps
    assert got["deepcnn_history"]["loss"] == want["deepcnn_history"]["loss"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted two-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    processes = start_processes(data, tmp / "run", tmp_path=tmp)
    assert finish(processes) == [0, 0], (tmp / "stderr-0").read_text()[-3000:]
    return tmp / "run"


def trainer_config(**settings):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", **settings})


def launcher_config(target: str):
    return OmegaConf.create({"_target_": target})


BASIC_LAUNCHER = launcher_config("hydra._internal.core_plugins.basic_launcher.BasicLauncher")
JOBLIB_LAUNCHER = launcher_config("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
SUBMITIT_LAUNCHER = launcher_config("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")


def test_which_multiruns_would_make_lightning_start_processes(monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    for launcher in (BASIC_LAUNCHER, JOBLIB_LAUNCHER):
        for settings in ({"devices": 2}, {"devices": "2"}, {"devices": 2, "strategy": "ddp"},
                         {"devices": 1, "num_nodes": 2, "strategy": "ddp"}):
            with pytest.raises(SettingsError, match="hydra/launcher=local .* or hydra/launcher=slurm"):
                refuse_spawning_sweep(launcher, trainer_config(**settings))
        # One process, or processes that Lightning spawns from within the run (not the command line), are fine.
        refuse_spawning_sweep(launcher, trainer_config())
        refuse_spawning_sweep(launcher, trainer_config(devices=2, strategy="ddp_spawn"))
        # Settings Lightning refuses are the run's to report, as without a multirun.
        refuse_spawning_sweep(launcher, trainer_config(devices=[0, 1]))
    # submitit starts each process as a task; torchrun's variables say the processes are started already.
    refuse_spawning_sweep(SUBMITIT_LAUNCHER, trainer_config(devices=2, strategy="ddp"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    refuse_spawning_sweep(BASIC_LAUNCHER, trainer_config(devices=2, strategy="ddp"))


def test_multirun_that_would_make_lightning_start_processes_stops_before_any_run(data, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", f"data.data_dir={data}", *SETTINGS, *TWO_PROCESSES, "optimizer.lr=0.05,0.1",
                     f"hydra.sweep.dir={sweep}", timeout=RUN_TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "deepcnn: error: trainer.devices=2, trainer.num_nodes=1: in a multirun Lightning cannot start each run's "
        "processes itself (each would re-run the whole sweep); start them with hydra/launcher=local (this machine) "
        "or hydra/launcher=slurm (one task per process)"]
    assert not sweep.exists()


@needs_cluster_extra
def test_sweep_of_two_process_runs_under_submitit_local(data, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "hydra/launcher=local", f"data.data_dir={data}", *SETTINGS, *TWO_PROCESSES,
                     "trainer.max_steps=4", "trainer.val_check_interval=4", "optimizer.lr=0.05,0.1",
                     f"hydra.sweep.dir={sweep}", timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("0", "1"):
        results = json.loads((sweep / run / "results.json").read_text())
        assert results["status"] == "done" and results["steps"] == 4
    # Each run was trained by its job's two tasks, ranks 0 and 1 of one process group.
    job_logs = [sorted(job.glob("*_log.err")) for job in (sweep / ".submitit").iterdir() if job.name != "%j"]
    assert len(job_logs) == 2
    for task_logs in job_logs:
        assert len(task_logs) == 2
        members = {re.search(r"GLOBAL_RANK: (\d), MEMBER: (\d)/(\d)", log.read_text()).groups() for log in task_logs}
        assert members == {("0", "1", "2"), ("1", "2", "2")}
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 3  # a header and the two runs


def test_signal_to_one_process_stops_both_after_the_same_step_and_resumes_to_the_uninterrupted_run(
        data, reference, tmp_path):
    run_dir = tmp_path / "run"
    processes = start_processes(data, run_dir, tmp_path=tmp_path)
    for line in processes[0].stdout:
        if line.startswith("step 3/"):
            processes[1].send_signal(signal.SIGTERM)
            break
    assert finish(processes) == [128 + signal.SIGTERM] * 2
    stderr = [(tmp_path / f"stderr-{rank}").read_text() for rank in (0, 1)]
    assert "SIGTERM received" in stderr[1] and "SIGTERM received" not in stderr[0]
    stopped = [int(re.search(r"deepcnn: stopped at step (\d+);", text).group(1)) for text in stderr]
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < STEPS
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == stopped[0]
    assert not (run_dir / "results.json").exists()

    resumed = start_processes(data, run_dir, "ckpt_path=auto", tmp_path=tmp_path)
    assert finish(resumed) == [0, 0], (tmp_path / "stderr-0").read_text()[-3000:]
    assert_same_run(run_dir, reference)


def submitit_tasks(sweep: Path) -> list[int]:
    """The process ids of the submitit tasks running the jobs of this sweep."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(str(sweep).encode() in part for part in command):
            pids.append(int(entry.name))
    return pids


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)
    return found


SUBMITIT_TIME = re.compile(r"submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - Starting with")
# submitit's local jobs are signalled 30 s before their time limit (timeout_min, whole minutes).
SIGNAL_AFTER = 60 - 30


@needs_cluster_extra
def test_job_at_its_time_limit_checkpoints_is_requeued_and_ends_as_the_uninterrupted_run(data, reference, tmp_path):
    sweep = tmp_path / "sweep"
    with open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), "-m", "hydra/launcher=local",
             "hydra.launcher.timeout_min=1", f"data.data_dir={data}", *SETTINGS, *TWO_PROCESSES,
             f"hydra.sweep.dir={sweep}"],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        log = wait_for(lambda: next(sweep.glob(".submitit/*/*_0_log.out"), None), RUN_TIMEOUT, "the job's start")
        wait_for(lambda: "step 2/" in log.read_text(), RUN_TIMEOUT, "training")
        # Held still from here until its time limit's signal has come, whatever this machine's speed: the job
        # is then midway through its steps.
        tasks = submitit_tasks(sweep)
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(pid, signal.SIGSTOP)
        started = datetime.strptime(SUBMITIT_TIME.search(log.read_text()).group(1), "%Y-%m-%d %H:%M:%S,%f")
        time.sleep(max(0.0, (started - datetime.now()).total_seconds() + SIGNAL_AFTER + 2))
        for pid in tasks:
            os.kill(pid, signal.SIGCONT)
        launcher.wait(timeout=RUN_TIMEOUT)
    finally:
        launcher.kill()
        for pid in submitit_tasks(sweep):
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    output = log.read_text()
    assert "this job is timed-out" in log.with_suffix(".err").read_text()
    assert "Requeued job" in output
    stopped = int(re.search(r"deepcnn: stopped at step (\d+);", log.with_name(log.name.replace("_0_", "_1_"))
                            .with_suffix(".err").read_text()).group(1))
    assert 2 <= stopped < STEPS
    # Each step was trained once: the second attempt carried on from the step the first one stopped at.
    assert [int(step) for step in re.findall(r"^step (\d+)/", output, re.MULTILINE)] == list(range(1, STEPS + 1))
    assert_same_run(sweep / "0", reference)


def test_stop_on_a_lookahead_step_keeps_its_averaging_and_resumes_to_the_uninterrupted_run(data, tmp_path):
    # Every step averages, so wherever the signal lands, the stop comes right after an averaging.
    lookahead = (f"data.data_dir={data}", *SETTINGS, "callbacks=fast", "callbacks.lookahead.every=1",
                 "callbacks.best_checkpoint=null")
    reference = run_cli("train.py", *lookahead, f"hydra.run.dir={tmp_path / 'reference'}", timeout=RUN_TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *lookahead, f"hydra.run.dir={run_dir}"],
                               cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    assert finish([process]) == [128 + signal.SIGTERM]
    saved = checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert 3 <= saved["global_step"] < STEPS
    average = next(state["average"] for key, state in saved["callbacks"].items() if "Lookahead" in key)
    # The checkpoint was written after that step's averaging: the weights are the average.
    for name, tensor in average.items():
        assert torch.equal(saved["state_dict"][f"model.{name}"], tensor), name

    resumed = run_cli("train.py", *lookahead, f"hydra.run.dir={run_dir}", "ckpt_path=auto", timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, tmp_path / "reference")


def test_a_run_ends_by_destroying_its_process_group(monkeypatch):
    """Left to the interpreter's exit, gloo's group can abort a finished process (CI saw exit code -6)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    end_processes()
    assert not torch.distributed.is_initialized()
    end_processes()  # and a run of one process, with no group, has nothing to end
