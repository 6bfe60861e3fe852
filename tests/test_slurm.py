"""hydra/launcher=slurm against a real SLURM (tests/slurm/cluster.sh start runs one on this machine): a sweep of
two-process runs, a preempted job requeued and resumed, and jobs cancelled or killed outright in a sweep that goes on."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, write_dataset
from test_cluster import (RUN_TIMEOUT, SETTINGS, STEPS, TWO_PROCESSES, assert_same_run, needs_cluster_extra,
                          submitit_tasks, wait_for)

pytestmark = [pytest.mark.slow, needs_cluster_extra]

START = "start one on this machine with: tests/slurm/cluster.sh start"
# One CPU a task: on the test cluster's small node a job of two tasks may take every CPU, and jobs run in turn.
LAUNCHER = ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1")
# Waiting for the jobs of a sweep that run one after another, each within RUN_TIMEOUT.
SWEEP_TIMEOUT = 3 * RUN_TIMEOUT


def cluster_missing() -> str | None:
    """Why no SLURM can run these tests here; None when one answers, with accounting (submitit reads job
    states from sacct)."""
    if shutil.which("sinfo") is None:
        return f"no SLURM here (sinfo is not on PATH); {START}"
    for command in (["sinfo", "--noheader", "--responding", "--format=%n"], ["sacct", "--noheader", "-X"]):
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"SLURM does not answer ({command[0]} took over 30 s); {START}"
        if answer.returncode != 0 or command[0] == "sinfo" and not answer.stdout.strip():
            why = " ".join(answer.stderr.split()) or "no node responds"
            return f"SLURM does not answer ({command[0]}: {why}); {START}"
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    missing = cluster_missing()
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("data")
    write_dataset(root)
    return root


@contextmanager
def running_sweep(data, sweep: Path, *overrides: str):
    """A sweep's command, started, its output in SWEEP/../output; when the block fails, it and its jobs are
    stopped."""
    with open(sweep.parent / "output", "w") as output:
        launcher = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), "-m", *LAUNCHER, f"data.data_dir={data}", *SETTINGS,
             *TWO_PROCESSES, f"hydra.sweep.dir={sweep}", *overrides],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield launcher
    except BaseException:
        launcher.kill()
        launcher.wait()
        # A folder for each job submitted: an array's (its id) and each started job's.
        jobs = [folder.name for folder in (sweep / ".submitit").glob("[0-9]*")]
        if jobs:
            subprocess.run(["scancel", *jobs], check=True)
        raise


def finish_sweep(launcher: subprocess.Popen, sweep: Path, timeout: float = SWEEP_TIMEOUT) -> None:
    """The sweep ends well within `timeout` seconds."""
    try:
        code = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sweep did not end within {timeout} s")
    assert code == 0, (sweep.parent / "output").read_text()[-3000:]


def job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of the sweep's jobs that started (ARRAY_INDEX for a job of an array), from submitit's folders."""
    return sorted(log.parent.name for log in (sweep / ".submitit").glob("*/*_0_log.out"))


def task_log(sweep: Path, job: str, task: int, suffix: str = "out") -> Path:
    return sweep / ".submitit" / job / f"{job}_{task}_log.{suffix}"


def sacct(job: str, *fields: str, steps: bool = False) -> list[list[str]]:
    """Accounting records of a job (with every attempt of a requeued one), one list of fields each."""
    command = ["sacct", "--noheader", "--parsable2", "--duplicates", "-j", job, "-o", ",".join(fields)]
    lines = subprocess.run([*command, *([] if steps else ["-X"])], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [line.split("|") for line in lines]


def slurm_tasks(sweep: Path) -> list[int]:
    """The process ids of the tasks running the sweep's jobs: the Python processes srun started, not srun."""
    python = Path(sys.executable).resolve()
    return [pid for pid in submitit_tasks(sweep) if Path(f"/proc/{pid}/exe").resolve() == python]


def states(job: str) -> list[str]:
    """The job's state in each of its attempts, once it has ended: the results come back as its tasks end, and
    SLURM records the job's end just after."""
    wait_for(lambda: sacct(job, "State")[-1] not in (["RUNNING"], ["COMPLETING"]), 30, f"job {job}'s end")
    return [state for [state] in sacct(job, "State")]


def squeue(job: str) -> str:
    """The job's state and the reason it waits, if it does."""
    return subprocess.run(["squeue", "--noheader", "-j", job, "-o", "%T %r"], capture_output=True, text=True,
                          check=True).stdout.strip()


def hold(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: all(process_status(pid)["State"].startswith("T") for pid in pids), 10, "the tasks' stop")


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def pending(pid: int, signum: int) -> bool:
    """Whether the signal waits to be delivered to the (stopped) process."""
    status = process_status(pid)
    return any(int(status[mask], 16) >> (signum - 1) & 1 for mask in ("SigPnd", "ShdPnd"))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def sweep(data, tmp_path_factory):
    """A two-value sweep of two-process runs, uninterrupted."""
    sweep = tmp_path_factory.mktemp("sweep") / "sweep"
    started = time.monotonic()
    with running_sweep(data, sweep, "optimizer.lr=0.05,0.1") as launcher:
        finish_sweep(launcher, sweep)
    print(f"a sweep of two jobs: {time.monotonic() - started:.0f} s")
    return sweep


def test_sweep_of_two_process_runs_on_slurm(sweep):
    for run in ("0", "1"):
        assert results(sweep / run)["status"] == "done" and results(sweep / run)["steps"] == STEPS
    jobs = job_ids(sweep)
    assert len(jobs) == 2
    for job in jobs:
        # One job step of two tasks, srun's, which Lightning took as ranks 0 and 1 of one process group.
        assert sacct(job, "JobID", "NTasks", steps=True)[-1] == [f"{job}.0", "2"]
        assert states(job) == ["COMPLETED"]
        members = {re.search(r"GLOBAL_RANK: (\d), MEMBER: (\d)/(\d)", task_log(sweep, job, task, "err").read_text())
                   .groups() for task in (0, 1)}
        assert members == {("0", "1", "2"), ("1", "2", "2")}
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 3  # a header and the two runs
    assert all(line.endswith(",done,") for line in summary[1:])


def test_preempted_job_checkpoints_is_requeued_and_ends_as_the_uninterrupted_run(data, sweep, tmp_path):
    preempted = tmp_path / "sweep"
    with running_sweep(data, preempted, "optimizer.lr=0.05") as launcher:
        log = wait_for(lambda: next(preempted.glob(".submitit/*/*_0_log.out"), None), RUN_TIMEOUT, "the job's start")
        wait_for(lambda: "step 2/" in log.read_text(), RUN_TIMEOUT, "training")
        # Held still while the signal comes, so that it lands midway through the steps, whatever this machine's speed.
        tasks = slurm_tasks(preempted)
        assert len(tasks) == 2
        hold(tasks)
        [job] = job_ids(preempted)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        wait_for(lambda: all(pending(pid, signal.SIGUSR2) for pid in tasks), 30, "the signal's arrival")
        for pid in tasks:
            os.kill(pid, signal.SIGCONT)
        # SLURM holds a requeued job for two minutes (its BeginTime); released at once here.
        wait_for(lambda: squeue(job) == "PENDING BeginTime", RUN_TIMEOUT, "the requeue")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        finish_sweep(launcher, preempted)
    assert "this job is preempted" in log.with_suffix(".err").read_text()
    # The same job, requeued by submitit, ran again and completed.
    assert states(job) == ["REQUEUED", "COMPLETED"]
    stopped = int(re.search(r"deepcnn: stopped at step (\d+);", task_log(preempted, job, 1, "err").read_text())
                  .group(1))
    assert 2 <= stopped < STEPS
    # Each step was trained once, in the same run directory: the second attempt carried on from the checkpoint.
    output = log.read_text()
    assert [int(step) for step in re.findall(r"^step (\d+)/", output, re.MULTILINE)] == list(range(1, STEPS + 1))
    assert [path.name for path in preempted.iterdir() if path.is_dir() and not path.name.startswith(".")] == ["0"]
    assert_same_run(preempted / "0", sweep / "0")


def test_jobs_cancelled_or_killed_outright_are_failed_runs_of_a_sweep_that_goes_on(data, tmp_path):
    killed = tmp_path / "sweep"
    # One job at a time: the second is still waiting when it is cancelled.
    with running_sweep(data, killed, "hydra.launcher.array_parallelism=1", "optimizer.lr=0.05,0.1,0.2") as launcher:
        log = wait_for(lambda: next(killed.glob(".submitit/*_0/*_0_log.out"), None), RUN_TIMEOUT, "the job's start")
        wait_for(lambda: "step 2/" in log.read_text(), RUN_TIMEOUT, "training")
        hold(slurm_tasks(killed))
        array = log.parent.name.removesuffix("_0")
        subprocess.run(["scancel", f"{array}_1"], check=True)
        subprocess.run(["scancel", "--signal=KILL", f"{array}_0"], check=True)
        killed_at = time.monotonic()
        finish_sweep(launcher, killed)
    # Noticed, and the last job run, well before any bound on waiting.
    after_kill = time.monotonic() - killed_at
    print(f"the sweep ended {after_kill:.0f} s after the kill")
    assert after_kill < RUN_TIMEOUT
    assert results(killed / "2")["status"] == "done"
    # Killed outright (SIGKILL from scancel) counts as cancelled; a job cancelled before it started leaves no record.
    endings = {"0": "ended CANCELLED, without a result; its log: ", "1": "is no longer listed by SLURM"}
    for run, ending in endings.items():
        reason = results(killed / run)["reason"]
        assert reason.startswith(f"SLURM job {array}_{run} {ending}"), reason
    # The cancelled job never started: its run is listed all the same.
    assert not (killed / "1" / "checkpoints").exists()
    with open(killed / "summary.csv", newline="") as table:
        rows = [(row["run"], row["status"], row["reason"]) for row in csv.DictReader(table)]
    assert rows == [("2", "done", ""), *((run, "failed", results(killed / run)["reason"]) for run in endings)]
