"""One table for a sweep: run directories written by hand, summarised into CSV, markdown and a plot."""
import csv
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, run_cli
from deepcnn.summary import SummarizeSweep, SweepError, read_sweep, write_summary

DONE = {"status": "done", "reason": None, "objective": "val_accuracy", "test_accuracy": 0.5, "parameters": 269722,
        "steps": 2000, "train_seconds": 61.3, "images_per_second": 4180.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(sweep, name, overrides, **results):
    """A run directory as train.py leaves it; no results.json unless results are given."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {entry}\n" for entry in overrides))
    if results:
        (run / "results.json").write_text(json.dumps({**DONE, **results}))


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def lr_sweep(tmp_path):
    """Three learning rates, the largest diverged; Optuna-style files beside the runs."""
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["optimizer.lr=0.01", "hydra/launcher=joblib"], val_accuracy=0.61, test_accuracy=0.6)
    write_run(sweep, "1", ["optimizer.lr=0.5", "hydra.job.chdir=true"], status="failed",
              reason="loss became nan at step 37", val_accuracy=None, test_accuracy=None)
    write_run(sweep, "2", ["optimizer.lr=0.05"], val_accuracy=0.7125, test_accuracy=0.7)
    (sweep / "optimization_results.yaml").write_text("best_value: 0.7125\n")
    (sweep / "study.db").write_bytes(b"SQLite format 3\x00")
    return sweep


def test_runs_best_first_and_failed_last_with_reason(lr_sweep):
    written = write_summary(read_sweep(lr_sweep))
    assert [path.name for path in written] == ["summary.csv", "summary.md", "summary.png"]
    rows = read_csv(lr_sweep / "summary.csv")
    assert list(rows[0]) == ["run", "optimizer.lr", "val_accuracy", "test_accuracy", "parameters", "steps",
                             "train_seconds", "images_per_second", "status", "reason"]
    assert [(row["run"], row["optimizer.lr"], row["status"]) for row in rows] == [
        ("2", "0.05", "done"), ("0", "0.01", "done"), ("1", "0.5", "failed")]
    assert rows[0]["val_accuracy"] == "0.7125" and rows[0]["test_accuracy"] == "0.7"
    assert rows[2]["reason"] == "loss became nan at step 37" and rows[2]["val_accuracy"] == ""
    table = (lr_sweep / "summary.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ")][2:]
    assert body == ["| 2 | 0.05 | 71.25 | 70.00 | 269,722 | 2,000 | 61.3 | 4,180 | done |  |",
                    "| 0 | 0.01 | 61.00 | 60.00 | 269,722 | 2,000 | 61.3 | 4,180 | done |  |",
                    "| 1 | 0.5 |  |  | 269,722 | 2,000 | 61.3 | 4,180 | failed | loss became nan at step 37 |"]
    assert not (lr_sweep / "summary_by_seed.csv").exists()


def test_seed_table_is_mean_and_sample_std_of_done_runs(tmp_path):
    sweep = tmp_path / "sweep"
    accuracy = {("0.05", "1"): (0.7012, 0.6954), ("0.05", "2"): (0.7241, 0.7133), ("0.05", "3"): (0.6897, 0.6902),
                ("0.1", "1"): (0.7310, 0.7288), ("0.1", "2"): (0.7402, 0.7399)}
    for number, (lr, seed) in enumerate((lr, seed) for lr in ("0.05", "0.1") for seed in "123"):
        if (lr, seed) in accuracy:
            val, test = accuracy[lr, seed]
            write_run(sweep, str(number), [f"optimizer.lr={lr}", f"seed={seed}"], val_accuracy=val, test_accuracy=test)
        else:  # a failed run's partial accuracy must not count
            write_run(sweep, str(number), [f"optimizer.lr={lr}", f"seed={seed}"], status="failed",
                      reason="killed", val_accuracy=0.99, test_accuracy=0.99)
    write_summary(read_sweep(sweep))
    rows = read_csv(sweep / "summary_by_seed.csv")
    assert list(rows[0]) == ["optimizer.lr", "val_accuracy_mean", "val_accuracy_std", "test_accuracy_mean",
                             "test_accuracy_std", "seeds"]
    assert [row["optimizer.lr"] for row in rows] == ["0.1", "0.05"]
    for row in rows:
        done = [accuracy[key] for key in accuracy if key[0] == row["optimizer.lr"]]
        vals, tests = [val for val, _ in done], [test for _, test in done]
        assert float(row["val_accuracy_mean"]) == statistics.mean(vals)
        assert float(row["val_accuracy_std"]) == statistics.stdev(vals)
        assert float(row["test_accuracy_mean"]) == statistics.mean(tests)
        assert float(row["test_accuracy_std"]) == statistics.stdev(tests)
        assert row["seeds"] == str(len(done))
    text = (sweep / "summary.md").read_text()
    vals = [accuracy["0.05", seed][0] for seed in "123"]
    assert "## Over seeds" in text
    assert (f"| 0.05 | {100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f} |" in text)


def test_one_seed_leaves_the_standard_deviation_blank(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["seed=1"], val_accuracy=0.7, test_accuracy=0.69)
    write_run(sweep, "1", ["seed=2"])
    write_summary(read_sweep(sweep))
    [row] = read_csv(sweep / "summary_by_seed.csv")
    assert row == {"val_accuracy_mean": "0.7", "val_accuracy_std": "", "test_accuracy_mean": "0.69",
                   "test_accuracy_std": "", "seeds": "1"}


def test_results_from_before_parameters_were_recorded_still_read(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["optimizer.lr=0.1"], val_accuracy=0.7)
    results = sweep / "0" / "results.json"
    results.write_text(json.dumps({k: v for k, v in json.loads(results.read_text()).items() if k != "parameters"}))
    (run,) = read_sweep(sweep).runs
    assert run.parameters is None and run.val_accuracy == 0.7


def test_run_without_results_is_interrupted(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["optimizer.lr=0.1"], val_accuracy=0.7)
    write_run(sweep, "1", ["optimizer.lr=0.2"])
    runs = read_sweep(sweep).runs
    assert [(run.name, run.status, run.reason) for run in runs] == [
        ("0", "done", None), ("1", "interrupted", "no results.json (stopped or still running)")]


def test_failed_run_as_train_py_writes_it_has_no_objective(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["optimizer.lr=0.1"], val_accuracy=0.7)
    write_run(sweep, "1", ["optimizer.lr=1e30"], status="failed", reason="loss became nan at step 2", objective=None,
              val_accuracy=None, test_accuracy=None, steps=None, train_seconds=None, images_per_second=None)
    runs = read_sweep(sweep).runs
    assert [(run.name, run.status, run.objective, run.score) for run in runs] == [
        ("0", "done", "val_accuracy", 0.7), ("1", "failed", None, None)]
    write_run(sweep, "2", ["optimizer.lr=0.2"], objective=None, val_accuracy=0.5)
    with pytest.raises(SweepError, match=r"2/results.json: objective is None, expected one of val_accuracy"):
        read_sweep(sweep)


def test_runs_sort_by_test_accuracy_when_that_is_the_objective(tmp_path):
    sweep = tmp_path / "sweep"
    for name, test in (("9", 0.4), ("10", 0.8), ("11", 0.6)):
        write_run(sweep, name, [f"optimizer.lr={test}"], objective="test_accuracy", val_accuracy=None,
                  test_accuracy=test)
    assert [run.name for run in read_sweep(sweep).runs] == ["10", "11", "9"]


def test_bad_results_name_the_file_and_key(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0", ["optimizer.lr=0.1"], val_accuracy="high")
    with pytest.raises(SweepError, match=r"0/results.json: val_accuracy is 'high', expected a number or null"):
        read_sweep(sweep)


def test_folder_without_runs_is_refused(lr_sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "optimization_results.yaml").write_text("best_value: 0.7\n")
    with pytest.raises(SweepError, match="empty: holds no runs"):
        read_sweep(empty)


def test_plot_has_a_panel_per_swept_key_and_marks_failed_runs(lr_sweep, tmp_path):
    write_summary(read_sweep(lr_sweep))
    with Image.open(lr_sweep / "summary.png") as image:
        assert image.format == "PNG" and image.size == (450, 350)
        assert (np.asarray(image.convert("RGB")) == (255, 0, 0)).all(axis=-1).any()
    sweep = tmp_path / "two_keys"
    for number, (lr, model) in enumerate([("0.01", "deep"), ("0.1", "deep"), ("0.1", "fast")]):
        write_run(sweep, str(number), [f"optimizer.lr={lr}", f"model={model}", "trainer.max_steps=100"],
                  val_accuracy=0.5 + number / 10)
    write_summary(read_sweep(sweep))
    assert (sweep / "summary.png").read_bytes().startswith(PNG_MAGIC)
    with Image.open(sweep / "summary.png") as image:
        assert image.size == (900, 350)  # lr and model; the constant max_steps gets no panel
        assert not (np.asarray(image.convert("RGB")) == (255, 0, 0)).all(axis=-1).any()


def test_cli_prints_the_table_and_the_files_it_wrote(lr_sweep, tmp_path):
    result = run_cli("summarize.py", f"dir={lr_sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 1 | 0.5 |  |  | 269,722 | 2,000 | 61.3 | 4,180 | failed | loss became nan at step 37 |" in result.stdout
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert f"wrote {lr_sweep / name}" in result.stdout
        assert (lr_sweep / name).is_file()


def test_cli_refuses_a_path_that_is_not_a_folder(tmp_path):
    not_a_folder = tmp_path / "results.json"
    not_a_folder.write_text("{}")
    result = run_cli("summarize.py", f"dir={not_a_folder}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"deepcnn: error: {not_a_folder}: is not a folder (give a sweep directory such as outputs/multiruns/DATE_TIME)"]


def test_callback_writes_the_summary_of_its_sweep_dir(lr_sweep, tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(lr_sweep)}}})
    SummarizeSweep().on_multirun_end(config)
    assert capsys.readouterr().out.splitlines() == [
        f"sweep summary: {lr_sweep / 'summary.md'}; best: run 2, val accuracy 71.25% (optimizer.lr=0.05)"]
    assert read_csv(lr_sweep / "summary.csv")[0]["run"] == "2"
    # A folder it cannot summarise is reported in one line; the finished sweep is not failed.
    SummarizeSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}}))
    assert capsys.readouterr().err.startswith(f"deepcnn: error: {tmp_path / 'none'}: is not a folder")


APP = """
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    results = {"status": "done", "reason": None, "objective": "val_accuracy", "val_accuracy": 1 - abs(cfg.lr - 0.2),
               "test_accuracy": None, "steps": 10, "train_seconds": 1.0, "images_per_second": 100.0}
    (Path(HydraConfig.get().runtime.output_dir) / "results.json").write_text(json.dumps(results))


main()
"""


def test_hydra_runs_the_callback_at_the_end_of_a_multirun(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    sweep = tmp_path / "multirun"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", "+lr=0.1,0.25,0.5",
                             f"hydra.sweep.dir={sweep}",
                             "+hydra.callbacks.summary._target_=deepcnn.summary.SummarizeSweep"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep summary: {sweep / 'summary.md'}; best: run 1, val accuracy 95.00% (lr=0.25)" in result.stdout
    assert [row["lr"] for row in read_csv(sweep / "summary.csv")] == ["0.25", "0.1", "0.5"]
