"""Optuna searches (hparams_search=...): every trial's result told to the study, failed trials recorded
and the search going on, a stopped search carried on by the same command, counting what it ran, trials
pruned from inside their runs, a study from the old Optuna, and the dashboard."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from conftest import ROOT, run_cli
from deepcnn import cli, settings  # noqa: F401  (cli registers the config resolvers)
from deepcnn.pruning import Pruned

optuna = pytest.importorskip("optuna", reason="Optuna comes with the sweep extra: pip install -e '.[sweep]'")
from hydra_plugins.deepcnn_search import search_space  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

COMPLETE, FAIL, PRUNED, RUNNING = TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING
# Made by Optuna 2.10.1 with SQLAlchemy 1.4 (tests/data/README.md).
OLD_STUDY = Path(__file__).parent / "data" / "optuna-2.10-study.db"
# Three validations a trial, at steps 2, 4 and 6.
SIX_STEPS = ["trainer.max_steps=6", "trainer.val_check_interval=2"]
# A few seconds a trial.
TINY = ["data.val_size=32", "data.batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.precision=32", "model.channels=8", "model.hidden=[16,8]"]


def search_command(data, sweep, n_trials, *overrides):
    return ["-m", "hparams_search=recipe_optuna", f"hydra.sweeper.n_trials={n_trials}", f"data.data_dir={data}",
            *TINY, f"hydra.sweep.dir={sweep}", *overrides]


def trials(sweep):
    return optuna.load_study(study_name="search", storage=f"sqlite:///{sweep}/study.db").get_trials()


def run_dirs(sweep):
    return sorted(int(path.name) for path in sweep.iterdir() if path.is_dir())


def overrides(run):
    return dict(entry.split("=", 1) for entry in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))


def results(run):
    return json.loads((run / "results.json").read_text())


def summary_rows(sweep):
    with (sweep / "summary.csv").open(newline="") as table:
        return list(csv.DictReader(table))


@pytest.mark.parametrize("name,network", [("recipe_optuna", "RecipeCNN"), ("fast_optuna", "FastCNN")])
def test_each_search_composes_its_preset_and_every_point_of_its_space_is_a_valid_run(name, network, tmp_path):
    def composed(*extra):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"run_dir={tmp_path}", f"hparams_search={name}", *extra],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    cfg = composed()
    assert cfg.model._target_ == f"deepcnn.models.{network}"
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.deepcnn_search.ResumableOptunaSweeper"
    assert cfg.hydra.sweep.dir == f"outputs/searches/{name}"
    assert cfg.hydra.sweeper.storage == f"sqlite:///outputs/searches/{name}/study.db"
    space, fixed = search_space([f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()])
    assert not fixed and len(space) >= 5
    for key, distribution in space.items():
        ends = getattr(distribution, "choices", None) or (distribution.low, distribution.high)
        for value in ends:
            point = composed(f"{key}={value}")
            settings.check(point)
            if key == "model.widths":
                assert list(point.model.widths) == json.loads(value)


def test_search_tells_the_study_every_trial_and_summarises_them(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    result = run_cli("train.py", *search_command(tiny_data, sweep, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    found = trials(sweep)
    assert [(trial.number, trial.state) for trial in found] == [(0, COMPLETE), (1, COMPLETE), (2, COMPLETE)]
    assert run_dirs(sweep) == [0, 1, 2]
    for trial in found:
        run = sweep / str(trial.number)
        assert trial.value == results(run)["val_accuracy"]
        assert {key: float(value) for key, value in overrides(run).items() if key in trial.params} == trial.params
    assert len({trial.params["optimizer.lr"] for trial in found}) == 3
    rows = summary_rows(sweep)
    assert sorted(row["run"] for row in rows) == ["0", "1", "2"] and {row["status"] for row in rows} == {"done"}
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == max(
        trial.value for trial in found)


def test_a_failed_trial_is_recorded_and_the_search_goes_on_to_its_summary(tiny_data, tmp_path):
    """Every trial diverges: each is recorded as failed, with its reason, and the search ends with its summary
    and a non-zero exit code."""
    sweep = tmp_path / "search"
    result = run_cli("train.py", *search_command(tiny_data, sweep, 2, "optimizer.lr=1e30"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"deepcnn: error: no run of the sweep finished ({sweep / 'summary.md'} says why)")
    assert [trial.state for trial in trials(sweep)] == [FAIL, FAIL]
    for number in (0, 1):
        failed = results(sweep / str(number))
        assert failed["status"] == "failed" and failed["reason"].startswith("loss became nan")
    assert "No trial of study search completed" in result.stdout
    assert f"sweep summary: {sweep / 'summary.md'}; no run finished" in result.stdout
    assert [row["status"] for row in summary_rows(sweep)] == ["failed", "failed"]


def test_failures_beyond_the_max_failure_rate_stop_the_search_with_one_line(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    result = run_cli("train.py", *search_command(tiny_data, sweep, 3, "optimizer.lr=1e30",
                                                 "hydra.sweeper.max_failure_rate=0.5"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "deepcnn: error: 1 of 1 trials failed, more than hydra.sweeper.max_failure_rate=0.5; the last: loss became nan")
    assert [trial.state for trial in trials(sweep)] == [FAIL]


def test_a_stopped_search_runs_only_its_remaining_trials(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    command = [sys.executable, str(ROOT / "src" / "train.py"), *search_command(tiny_data, sweep, 3)]
    # Ctrl-C as at a terminal: a suite started in the background by a non-interactive shell ignores SIGINT,
    # and the search would inherit that until its training installs its own handler.
    search = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C once the second trial has started: the first is told to the study before the second is asked for.
    deadline = time.monotonic() + 300
    while not (sweep / "1").exists():
        assert search.poll() is None, search.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    search.send_signal(signal.SIGINT)
    _, stderr = search.communicate(timeout=300)
    assert search.returncode != 0, (f"the search ignored its SIGINT: trials {[t.state.name for t in trials(sweep)]}, "
                                    f"stderr: {stderr[-2000:]}")
    assert [trial.state for trial in trials(sweep)] == [COMPLETE, RUNNING]
    first_results = (sweep / "0" / "results.json").read_text()

    resumed = run_cli("train.py", *search_command(tiny_data, sweep, 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming study search: 1 of 3 trials finished, 2 to run" in resumed.stdout
    assert resumed.stdout.count("Launching 1 jobs locally") == 2
    found = trials(sweep)
    assert [(trial.number, trial.state) for trial in found] == [(0, COMPLETE), (1, RUNNING), (2, COMPLETE),
                                                                 (3, COMPLETE)]
    assert run_dirs(sweep) == [0, 1, 2, 3]
    assert (sweep / "0" / "results.json").read_text() == first_results
    for number in (2, 3):
        assert found[number].value == results(sweep / str(number))["val_accuracy"]
    # Reseeded: the resumed invocation proposes new points, not the stopped one's again.
    assert len({trial.params["optimizer.lr"] for trial in found}) == 4


def test_the_search_space_reads_hydras_sweep_syntax_and_the_command_line_replaces_the_preset():
    space, fixed = search_space(["a=interval(0.1, 0.5)", "b=tag(log, interval(1e-4, 1e-1))", "c=choice(16, 32)",
                                 "d=range(2, 11, 4)", "e=range(0.5, 1.6, 0.5)", "f=3", "g=choice(1, 2)", "g=5",
                                 "f=interval(1, 2)"])
    assert space == {"a": FloatDistribution(0.1, 0.5), "b": FloatDistribution(1e-4, 1e-1, log=True),
                     "c": CategoricalDistribution([16, 32]), "d": IntDistribution(2, 10, step=4),
                     "e": FloatDistribution(0.5, 1.5, step=0.5), "f": FloatDistribution(1.0, 2.0)}
    assert fixed == {"g": "5"}


def optuna_command() -> str:
    return str(Path(sys.executable).with_name("optuna"))


def test_a_study_from_optuna_2_10_names_the_upgrade_and_opens_after_it_with_every_trial(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    sweep.mkdir()
    shutil.copy(OLD_STUDY, sweep / "study.db")
    url = f"sqlite:///{sweep}/study.db"
    stopped = run_cli("train.py", *search_command(tiny_data, sweep, 3))
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"deepcnn: error: {url}: written by an older Optuna; upgrade it in place (its trials are kept) with: "
        f"optuna storage upgrade --storage {url}")
    upgrade = subprocess.run([optuna_command(), "storage", "upgrade", "--storage", url], capture_output=True,
                             text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    found = trials(sweep)
    assert [(trial.number, trial.state) for trial in found] == [(0, COMPLETE), (1, COMPLETE), (2, FAIL)]
    # What Optuna 2.10 wrote (tests/data/README.md): value 0.1 + lr + momentum / 10, reports 0.1 + lr + step / 100.
    for trial in found:
        lr = trial.params["optimizer.lr"]
        assert trial.intermediate_values == pytest.approx({2: 0.12 + lr, 4: 0.14 + lr})
        assert trial.value is None if trial.state == FAIL else trial.value == pytest.approx(
            0.1 + lr + trial.params["optimizer.momentum"] / 10)
    assert found[0].params["scheduler.decay_steps"] == 500 and found[1].params["scheduler.decay_steps"] == 1000
    resumed = run_cli("train.py", *search_command(tiny_data, sweep, 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming study search: 3 of 3 trials finished, 0 to run" in resumed.stdout
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == found[0].value


def test_a_pruned_trial_stops_at_the_step_its_pruner_says_and_is_summarised_with_its_accuracy(tiny_data, tmp_path):
    """A pruner that prunes every trial below an accuracy of 1.1, that is all of them, at their first
    validation (step 2 of 6): each is recorded as pruned, its last reported accuracy its value."""
    sweep = tmp_path / "search"
    prune_all = "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}"
    result = run_cli("train.py", *search_command(tiny_data, sweep, 2, *SIX_STEPS, prune_all))
    assert result.returncode == 0, result.stderr[-3000:]
    found = trials(sweep)
    assert [trial.state for trial in found] == [PRUNED, PRUNED]
    rows = {row["run"]: row for row in summary_rows(sweep)}
    for trial in found:
        ran = results(sweep / str(trial.number))
        assert list(trial.intermediate_values) == [2] and trial.value == trial.intermediate_values[2]
        assert (ran["status"], ran["steps"], ran["val_accuracy"]) == ("pruned", 2, trial.value)
        assert ran["reason"] == (f"pruned at step 2: validation accuracy {trial.value:.4f} lags the study's other "
                                 "trials at that step")
        row = rows[str(trial.number)]
        assert (row["status"], row["steps"], float(row["val_accuracy"])) == ("pruned", "2", trial.value)
    assert "No trial of study search completed" in result.stdout


def test_the_median_pruner_stops_a_trial_lagging_the_study_at_the_same_step(tiny_data, tmp_path):
    """The study already holds a trial that reached 100% at every step: the next trial, below that
    median at its first validation (step 2 of 6), is pruned there."""
    sweep = tmp_path / "search"
    sweep.mkdir()
    space, _ = search_space(["optimizer.lr=tag(log, interval(0.003, 0.2))"])
    study = optuna.create_study(study_name="search", storage=f"sqlite:///{sweep}/study.db",
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"optimizer.lr": 0.01}, distributions=space, value=1.0,
                                              intermediate_values={2: 1.0, 4: 1.0, 6: 1.0}))
    result = run_cli("train.py", *search_command(tiny_data, sweep, 2, *SIX_STEPS, "hydra/sweeper/pruner=median",
                                                 "hydra.sweeper.pruner.n_startup_trials=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming study search: 1 of 2 trials finished, 1 to run" in result.stdout
    first, pruned = trials(sweep)
    assert first.state == COMPLETE and pruned.state == PRUNED and list(pruned.intermediate_values) == [2]
    assert pruned.value == pruned.intermediate_values[2] < 1.0
    assert (results(sweep / "1")["status"], results(sweep / "1")["steps"]) == ("pruned", 2)


def test_a_pruned_trial_comes_back_whole_from_a_launchers_worker_process():
    back = pickle.loads(pickle.dumps(Pruned(40, 0.3125)))
    assert (back.step, back.accuracy, str(back)) == (
        40, 0.3125, "pruned at step 40: validation accuracy 0.3125 lags the study's other trials at that step")


def test_without_a_pruner_every_validation_is_told_to_the_study(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    result = run_cli("train.py", *search_command(tiny_data, sweep, 1, *SIX_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = trials(sweep)
    curve = json.loads((sweep / "0" / "results.json").read_text())
    assert trial.state == COMPLETE and sorted(trial.intermediate_values) == [2, 4, 6]
    assert trial.intermediate_values[6] == trial.value == curve["val_accuracy"]


@pytest.mark.parametrize("pruner,target", [("median", "optuna.pruners.MedianPruner"),
                                           ("hyperband", "optuna.pruners.HyperbandPruner")])
def test_a_pruner_is_chosen_by_name(pruner, target, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path}", "hparams_search=recipe_optuna",
                                          f"hydra/sweeper/pruner={pruner}", "trainer.val_check_interval=50"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.sweeper.pruner._target_ == target
    assert isinstance(instantiate(cfg.hydra.sweeper.pruner), getattr(optuna.pruners, target.rsplit(".", 1)[1]))
    if pruner == "hyperband":
        assert cfg.hydra.sweeper.pruner.min_resource == 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answer(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_dashboard_serves_a_search_study_on_localhost_and_stops(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    assert run_cli("train.py", *search_command(tiny_data, sweep, 1)).returncode == 0
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), "--host", "127.0.0.1",
                               "--port", str(port), f"sqlite:///{sweep}/study.db"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                studies = answer(port, "/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not answer within 60 s"
                time.sleep(0.2)
        assert [study["study_name"] for study in studies] == ["search"]
        shown = answer(port, f"/api/studies/{studies[0]['study_id']}")["trials"]
        assert [(trial["number"], trial["state"], trial["values"]) for trial in shown] == [
            (0, "Complete", [trials(sweep)[0].value])]
    finally:
        server.terminate()
        server.wait(timeout=30)
    with pytest.raises(OSError):
        answer(port, "/api/studies")
