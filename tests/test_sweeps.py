"""A stopped sweep finishes with the same command: done runs kept untouched, an interrupted run resumed at its
step, failed and never-started runs run; a folder of another command is refused; two sweeps never share a
folder; a signal stops a sweep with its summary and the command that finishes it."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from deepcnn.summary import read_sweep
from deepcnn.sweeps import BASIC_SWEEPER

STEPS = 12
TINY = ("data.batch_size=16", "data.eval_batch_size=16", "data.val_size=32", f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "trainer.precision=32", "data.download=false",
        "model.channels=8", "model.hidden=[16,8]")
# A callback that fails the run whose learning rate $FAIL_LR names at step 6, after its checkpoint at step 4 (a
# fault of that moment, not of its settings),
# and one that sends this process a signal once a run has ended (between the runs of a sweep).
HELPERS = '''import os, signal
import pytorch_lightning as pl
from hydra.experimental.callback import Callback


class FailAt(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if str(pl_module.hparams.optimizer["lr"]) == os.environ.get("FAIL_LR") and trainer.global_step == 6:
            raise RuntimeError("the disk went away")


class SignalAfterRun(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        os.kill(os.getpid(), int(os.environ["SIGNAL_AFTER_RUN"]))
'''


def with_path(folder) -> str:
    """PYTHONPATH with `folder` in front, so that train.py imports the test's own callbacks from it."""
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def helpers(tmp_path):
    folder = tmp_path / "helpers"
    folder.mkdir()
    (folder / "sweep_helpers.py").write_text(HELPERS)
    return folder


def files_of(folder) -> dict:
    """Every file under `folder`: its bytes and modification time."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def summary_rows(sweep_dir) -> dict[str, dict]:
    with (sweep_dir / "summary.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert len({row["run"] for row in rows}) == len(rows)  # every run once
    return {row["run"]: row for row in rows}


def stop_line(stderr: str) -> tuple[str, list[str]]:
    found = re.search(r"^deepcnn: (SIG\w+): sweep (.*); finish it with (python src/train.py -m .*)$", stderr, re.M)
    assert found, stderr[-3000:]
    return found.group(2), shlex.split(found.group(3))


@pytest.mark.slow
def test_the_same_command_finishes_a_stopped_sweep(tiny_data, helpers, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["-m", "optimizer.lr=0.05,0.1,0.2,0.3", f"data.data_dir={tiny_data}", *TINY,
               "+callbacks.fail._target_=sweep_helpers.FailAt", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": with_path(helpers)}
    # Run 0 finishes, run 1 fails at step 6, run 2 is stopped by SIGTERM after a few steps, run 3 never starts.
    process = subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *command], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "FAIL_LR": "0.1"})
    current = None
    for line in process.stdout:
        current = line.split("#", 1)[1].split()[0] if "[HYDRA] \t#" in line else current
        if current == "2" and line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    what, finish = stop_line(stderr)
    assert what == f"stopped in run 2 ({sweep_dir / '2'})"
    # The command that finishes it is the one that made it, its folder named.
    assert finish[2:] == [*command[:-1], f"hydra.sweep.dir={sweep_dir}"]
    rows = summary_rows(sweep_dir)
    assert {run: row["status"] for run, row in rows.items()} == {
        "0": "done", "1": "failed", "2": "interrupted", "3": "not started"}
    assert rows["1"]["reason"] == "RuntimeError: the disk went away"
    stopped = torch.load(sweep_dir / "2" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 3 <= stopped < STEPS
    done = files_of(sweep_dir / "0")

    again = run_cli("train.py", *finish[2:], cwd=tmp_path, env={"PYTHONPATH": env["PYTHONPATH"]})
    assert again.returncode == 0, again.stderr[-3000:]
    # The done run is kept as it was, every file; the others ran, runs 1 and 2 from their last checkpoints.
    assert files_of(sweep_dir / "0") == done
    assert f"run 0: done, kept as it is ({sweep_dir / '0' / 'results.json'})" in again.stdout
    first_steps = {}
    for block in re.split(r"\[HYDRA\] \t#", again.stdout)[1:]:
        steps = re.findall(rf"^step (\d+)/{STEPS} ", block, re.M)
        first_steps[block.split()[0]] = int(steps[0]) if steps else None
    assert first_steps == {"0": None, "1": 5, "2": stopped + 1, "3": 1}
    rows = summary_rows(sweep_dir)
    assert {run: row["status"] for run, row in rows.items()} == {run: "done" for run in "0123"}
    for run, lr in (("1", "0.1"), ("2", "0.2"), ("3", "0.3")):
        results = json.loads((sweep_dir / run / "results.json").read_text())
        history = torch.load(sweep_dir / run / "checkpoints" / "last.ckpt", weights_only=False)["deepcnn_history"]
        assert results["steps"] == STEPS and [step for step, _ in history["loss"]] == list(range(1, STEPS + 1))
        # One TensorBoard curve a run, its failed or stopped start and the rest in one place.
        assert [p.name for p in (sweep_dir / run / "tensorboard").iterdir()] == [f"optimizer.lr={lr}"]
    assert "Traceback" not in again.stderr


def test_a_sweep_folder_made_by_another_command_is_refused(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    for number, lr in enumerate(("0.05", "0.1")):
        (sweep_dir / str(number) / ".hydra").mkdir(parents=True)
        (sweep_dir / str(number) / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer.lr={lr}\n- data.data_dir=/elsewhere\n- trainer.max_steps={STEPS}\n")
        (sweep_dir / str(number) / "results.json").write_text('{"status": "done"}\n')
    before = files_of(sweep_dir)
    common = (f"data.data_dir={tiny_data}", f"trainer.max_steps={STEPS}", f"hydra.sweep.dir={sweep_dir}")
    for lrs, step, line in (
            ("0.05,0.2", STEPS, f"{sweep_dir / '1'}: was made with optimizer.lr=0.1, but this command's run 1 has "
                                "optimizer.lr=0.2"),
            ("0.05,0.1", 20, f"{sweep_dir / '0'}: was made with trainer.max_steps={STEPS}, but this command's run 0 "
                             "has trainer.max_steps=20"),
            ("0.05", STEPS, f"{sweep_dir / '1'}: this command's sweep has 1 runs, not run 1")):
        result = run_cli("train.py", "-m", f"optimizer.lr={lrs}", *common, f"trainer.max_steps={step}", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(f"deepcnn: error: {line}"), result.stderr[-3000:]
        assert files_of(sweep_dir) == before


def test_two_sweeps_started_in_the_same_second_get_their_own_folders(tiny_data, tmp_path):
    # Every folder a sweep started in the next minute would be named for is already another sweep's.
    now = datetime.now()
    taken = [tmp_path / "outputs" / "multiruns" / (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S")
             for s in range(-1, 60)]
    for folder in taken:
        folder.mkdir(parents=True)
    result = run_cli("train.py", "-m", "optimizer.lr=0.05", f"data.data_dir={tiny_data}", *TINY,
                     "trainer.max_steps=2", "trainer.val_check_interval=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(list(folder.iterdir()) == [] for folder in taken)
    (claimed,) = [p for p in (tmp_path / "outputs" / "multiruns").iterdir() if p not in taken]
    assert claimed.name.endswith("_1") and claimed.name[:-2] in {folder.name for folder in taken}
    assert json.loads((claimed / "0" / "results.json").read_text())["steps"] == 2
    assert f"sweep summary: {claimed.relative_to(tmp_path) / 'summary.md'}" in result.stdout


def test_a_sweep_whose_every_run_failed_exits_non_zero_with_its_summary(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "data.crop_size=40,50", f"data.data_dir={tiny_data}", *TINY,
                     f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"deepcnn: error: no run of the sweep finished ({sweep_dir / 'summary.md'} says why)")
    rows = summary_rows(sweep_dir)
    assert {run: row["status"] for run, row in rows.items()} == {"0": "failed", "1": "failed"}
    assert all("data.crop_size" in row["reason"] for row in rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_between_runs_stops_the_sweep_before_the_next(signum, tiny_data, helpers, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["-m", "optimizer.lr=0.05,0.1", f"data.data_dir={tiny_data}", *TINY, "trainer.max_steps=2",
               "trainer.val_check_interval=2", f"hydra.sweep.dir={sweep_dir}"]
    result = run_cli("train.py", *command, "+hydra.callbacks.signal._target_=sweep_helpers.SignalAfterRun",
                     cwd=tmp_path, env={"PYTHONPATH": with_path(helpers),
                                        "SIGNAL_AFTER_RUN": str(int(signum))})
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    what, finish = stop_line(result.stderr)
    assert what == "stopped before run 1"
    assert finish[2:] == [*command[:-1], "+hydra.callbacks.signal._target_=sweep_helpers.SignalAfterRun",
                          f"hydra.sweep.dir={sweep_dir}"]
    assert {run: row["status"] for run, row in summary_rows(sweep_dir).items()} == {"0": "done", "1": "not started"}
    assert not (sweep_dir / "1").exists()


def test_a_killed_sweeps_summary_lists_the_runs_that_never_started(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0" / ".hydra").mkdir(parents=True)
    (sweep_dir / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.05\n- seed=1\n")
    OmegaConf.save({"hydra": {"sweeper": {"_target_": BASIC_SWEEPER, "params": None},
                              "overrides": {"task": ["optimizer.lr=0.05,0.1", "seed=1,2"], "hydra": []}}},
                   sweep_dir / "multirun.yaml")
    runs = {run.name: (run.status, run.overrides) for run in read_sweep(sweep_dir).runs}
    assert runs == {"0": ("interrupted", {"optimizer.lr": "0.05", "seed": "1"}),
                    "1": ("not started", {"optimizer.lr": "0.05", "seed": "2"}),
                    "2": ("not started", {"optimizer.lr": "0.1", "seed": "1"}),
                    "3": ("not started", {"optimizer.lr": "0.1", "seed": "2"})}


@pytest.mark.slow
def test_the_same_command_finishes_a_sweep_under_joblib(tiny_data, helpers, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra/launcher=joblib needs the cluster extra")
    sweep_dir = tmp_path / "sweep"
    command = ["-m", "optimizer.lr=0.05,0.1", f"data.data_dir={tiny_data}", *TINY, "hydra/launcher=joblib",
               "+callbacks.fail._target_=sweep_helpers.FailAt", f"hydra.sweep.dir={sweep_dir}"]
    path = with_path(helpers)
    first = run_cli("train.py", *command, cwd=tmp_path, env={"PYTHONPATH": path, "FAIL_LR": "0.1"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert {run: row["status"] for run, row in summary_rows(sweep_dir).items()} == {"0": "done", "1": "failed"}
    done = files_of(sweep_dir / "0")

    again = run_cli("train.py", *command, cwd=tmp_path, env={"PYTHONPATH": path})
    assert again.returncode == 0, again.stderr[-3000:]
    assert files_of(sweep_dir / "0") == done
    assert {run: row["status"] for run, row in summary_rows(sweep_dir).items()} == {"0": "done", "1": "done"}
    # Run 1 logged steps 1 to 5 and failed in step 6; again, it carried on from its checkpoint at step 4.
    logged = [int(n) for n in re.findall(rf"step (\d+)/{STEPS} ", (sweep_dir / "1" / "train.log").read_text())]
    assert logged == [*range(1, 6), *range(5, STEPS + 1)]
    history = torch.load(sweep_dir / "1" / "checkpoints" / "last.ckpt", weights_only=False)["deepcnn_history"]
    assert [step for step, _ in history["loss"]] == list(range(1, STEPS + 1))
