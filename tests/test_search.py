"""Optuna searches (hparams_search=...): every trial's result told to the study, failed trials recorded
and the search going on, and a stopped search carried on by the same command, counting what it ran."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT, run_cli
from deepcnn import cli, settings  # noqa: F401  (cli registers the config resolvers)

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason="the Optuna sweeper comes with the sweep extra: pip install -e '.[sweep]'")
import optuna  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

COMPLETE, FAIL, RUNNING = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING
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
    space, fixed = create_params_from_overrides([f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()])
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
