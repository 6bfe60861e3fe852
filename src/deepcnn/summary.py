"""One table for a sweep: every run's overrides and results in summary.csv, summary.md and summary.png.

A sweep directory holds one subdirectory per run, each with `.hydra/overrides.yaml` and, once the
run has ended, `results.json`. Runs are sorted by the metric the sweep maximises, best first;
failed, pruned (a search's trials its pruner stopped) and interrupted runs come last, with those of the
sweep's command (its multirun.yaml) that never started. When `seed` is swept, summary_by_seed.csv (and a
second table in summary.md) gives each setting's mean and sample standard deviation over its seeds.
"""
from __future__ import annotations

import csv
import json
import math
import re
import signal
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import matplotlib
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from deepcnn import reports, sweeps
from deepcnn.errors import UserError, print_error
from deepcnn.files import replaced_on_success

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OVERRIDES = Path(".hydra") / "overrides.yaml"
RESULTS = "results.json"
STATUSES = ("done", "failed", "pruned", "interrupted")
NOT_STARTED = "not started"
OBJECTIVES = ("val_accuracy", "test_accuracy")
NUMBERS = ("val_accuracy", "test_accuracy", "parameters", "steps", "train_seconds", "images_per_second")
# Results written before deepcnn recorded these.
OPTIONAL = ("parameters",)
NOT_FINISHED = f"no {RESULTS} (stopped or still running)"
SEED = "seed"
LABELS = {"val_accuracy": "val accuracy", "test_accuracy": "test accuracy"}


class SweepError(UserError):
    """A folder is not a sweep directory, or a run in it left unreadable files."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its overrides and what its results.json says."""

    name: str
    overrides: dict[str, str]
    status: str
    reason: str | None = None
    objective: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    parameters: int | None = None
    steps: int | None = None
    train_seconds: float | None = None
    images_per_second: float | None = None

    @property
    def score(self) -> float | None:
        """The value of the metric this run's sweep maximises; None unless the run is done."""
        return getattr(self, self.objective) if self.status == "done" and self.objective else None


@dataclass(frozen=True)
class Sweep:
    folder: Path
    runs: list[Run]  # best first
    keys: list[str]  # every override key of any run, in order of first appearance

    @property
    def best(self) -> Run | None:
        return self.runs[0] if self.runs[0].score is not None else None

    @property
    def objective(self) -> str:
        objectives = [run.objective for run in self.runs if run.objective]
        return max(OBJECTIVES, key=objectives.count)


@dataclass(frozen=True)
class SeedGroup:
    """The done runs of one setting of the overrides other than the seed."""

    values: dict[str, str]
    runs: list[Run]

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        values = [getattr(run, metric) for run in self.runs if getattr(run, metric) is not None]
        mean = statistics.mean(values) if values else None
        return mean, statistics.stdev(values) if len(values) > 1 else None


def natural_key(name: str) -> list:
    """Run 10 after run 9: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_overrides(path: Path) -> dict[str, str]:
    """The run's hyperparameter overrides as key -> value; Hydra's own settings are not hyperparameters."""
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot be read as YAML ({err})") from None
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise SweepError(f"{path}: should be a list of overrides such as optimizer.lr=0.05")
    return sweeps.settings_of(entries)


def read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(results, dict):
        raise SweepError(f"{path}: should hold a JSON object")
    missing = [key for key in ("status", "reason", "objective", *NUMBERS) if key not in results and key not in OPTIONAL]
    if missing:
        raise SweepError(f"{path}: has no {', '.join(missing)} (written by an older deepcnn?)")
    if results["status"] not in STATUSES:
        raise SweepError(f"{path}: status is {results['status']!r}, expected one of {', '.join(STATUSES)}")
    # A run that did not finish measured nothing: train.py writes its objective as null.
    if results["objective"] not in OBJECTIVES and not (results["objective"] is None and results["status"] != "done"):
        raise SweepError(f"{path}: objective is {results['objective']!r}, expected one of {', '.join(OBJECTIVES)}")
    for key in NUMBERS:
        value = results.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SweepError(f"{path}: {key} is {value!r}, expected a number or null")
    return results


def read_run(folder: Path) -> Run:
    overrides = read_overrides(folder / OVERRIDES)
    if not (folder / RESULTS).exists():
        return Run(folder.name, overrides, "interrupted", NOT_FINISHED)
    results = read_results(folder / RESULTS)
    return Run(folder.name, overrides, results["status"], results["reason"], results["objective"],
               **{key: results.get(key) for key in NUMBERS})


def best_first(value: float | None) -> tuple:
    """Sort key: highest value first, missing values last."""
    return value is None, -(value or 0.0)


def rank(run: Run) -> tuple:
    return *best_first(run.score), natural_key(run.name)


def read_sweep(folder: str | Path) -> Sweep:
    """Every run under `folder`, best first; entries that are not runs (Optuna's files) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"{folder}: is not a folder (give a sweep directory such as outputs/multiruns/DATE_TIME)")
    runs = [read_run(child) for child in folder.iterdir() if (child / OVERRIDES).is_file()]
    # The runs the sweep's command is made of that have no folder: it stopped before them.
    started = {run.name for run in runs}
    runs += [Run(str(number), sweeps.settings_of(job), NOT_STARTED, "the sweep stopped before it")
             for number, job in enumerate(sweeps.planned_runs(folder) or []) if str(number) not in started]
    if not runs:
        raise SweepError(f"{folder}: holds no runs (subfolders with {OVERRIDES})")
    keys = list(dict.fromkeys(key for run in sorted(runs, key=lambda run: natural_key(run.name))
                              for key in run.overrides))
    return Sweep(folder, sorted(runs, key=rank), keys)


def seed_groups(sweep: Sweep) -> list[SeedGroup]:
    """Runs grouped by every override but the seed, best mean first; empty when the seed is not swept."""
    if SEED not in sweep.keys:
        return []
    others = [key for key in sweep.keys if key != SEED]
    groups: dict[tuple, list[Run]] = {}
    for run in sorted(sweep.runs, key=lambda run: natural_key(run.name)):
        setting = tuple(run.overrides.get(key, "") for key in others)
        done = groups.setdefault(setting, [])
        if run.status == "done":
            done.append(run)
    found = [SeedGroup(dict(zip(others, setting)), runs) for setting, runs in groups.items()]
    return sorted(found, key=lambda group: best_first(group.mean_std(sweep.objective)[0]))


def csv_value(value) -> str:
    return "" if value is None else str(value)


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def cell(value) -> str:
    """Text for one markdown cell: a `|` or a line break would end the cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def mean_std_text(group: SeedGroup, metric: str) -> str:
    mean, std = group.mean_std(metric)
    return percent(mean) + ("" if std is None else f" ± {percent(std)}")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]


def run_rows(sweep: Sweep) -> tuple[list[str], list[list]]:
    header = ["run", *sweep.keys, *NUMBERS, "status", "reason"]
    rows = [[run.name, *(run.overrides.get(key) for key in sweep.keys),
             *(getattr(run, key) for key in NUMBERS), run.status, run.reason] for run in sweep.runs]
    return header, rows


def seed_rows(sweep: Sweep, groups: list[SeedGroup]) -> tuple[list[str], list[list]]:
    others = [key for key in sweep.keys if key != SEED]
    header = [*others, "val_accuracy_mean", "val_accuracy_std", "test_accuracy_mean", "test_accuracy_std", "seeds"]
    rows = [[*group.values.values(), *group.mean_std("val_accuracy"), *group.mean_std("test_accuracy"),
             len(group.runs)] for group in groups]
    return header, rows


def markdown(sweep: Sweep) -> str:
    counts = ", ".join(f"{sum(run.status == status for run in sweep.runs)} {status}" for status in STATUSES)
    if any(run.status == NOT_STARTED for run in sweep.runs):
        counts += f", {sum(run.status == NOT_STARTED for run in sweep.runs)} {NOT_STARTED}"
    lines = [f"# Sweep {sweep.folder}", "",
             f"{len(sweep.runs)} runs: {counts}. Sorted by {LABELS[sweep.objective]}, best first.", ""]
    lines += markdown_table(
        ["run", *sweep.keys, "val accuracy (%)", "test accuracy (%)", "parameters", "steps", "training s", "images/s",
         "status", "reason"],
        [[run.name, *(run.overrides.get(key, "") for key in sweep.keys), percent(run.val_accuracy),
          percent(run.test_accuracy), "" if run.parameters is None else f"{run.parameters:,}",
          "" if run.steps is None else f"{run.steps:,}",
          "" if run.train_seconds is None else f"{run.train_seconds:.1f}",
          "" if run.images_per_second is None else f"{run.images_per_second:,.0f}", run.status, run.reason or ""]
         for run in sweep.runs])
    groups = seed_groups(sweep)
    if groups:
        others = [key for key in sweep.keys if key != SEED]
        lines += ["", "## Over seeds", "",
                  "Mean ± sample standard deviation over the seeds of each setting, done runs only.", ""]
        lines += markdown_table(
            [*others, "val accuracy (%)", "test accuracy (%)", "seeds"],
            [[*group.values.values(), mean_std_text(group, "val_accuracy"), mean_std_text(group, "test_accuracy"),
              str(len(group.runs))] for group in groups])
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with replaced_on_success(path) as partial, partial.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows([csv_value(value) for value in row] for row in rows)


def numeric(values: list[str]) -> bool:
    try:
        return all(math.isfinite(float(value)) for value in values)
    except ValueError:
        return False


def plot(sweep: Sweep, path: Path) -> None:
    """The objective against each swept value, one panel per key that varies; failed runs as red crosses."""
    varying = [key for key in sweep.keys if len({run.overrides.get(key) for run in sweep.runs}) > 1]
    panels = varying or ["run"]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for key, ax in zip(panels, axes.flat):
        runs = [run for run in sweep.runs if key == "run" or key in run.overrides]
        labels = [run.name if key == "run" else run.overrides[key] for run in runs]
        if numeric(labels):
            xs = [float(label) for label in labels]
            # Learning rates and weight decays are swept over decades.
            if min(xs) > 0 and max(xs) >= 100 * min(xs):
                ax.set_xscale("log")
        else:
            categories = sorted(set(labels), key=natural_key)
            xs = [categories.index(label) for label in labels]
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        done = [(x, 100 * run.score) for x, run in zip(xs, runs) if run.score is not None]
        ended = [x for x, run in zip(xs, runs) if run.score is None]
        if done:
            ax.plot(*zip(*done), "o", color="tab:blue", label="done")
        if ended:
            ax.plot(ended, [0.03] * len(ended), "x", color="red", markersize=9, mew=2,
                    transform=ax.get_xaxis_transform(), label="failed or interrupted")
        ax.set(xlabel=key, ylabel=f"{LABELS[sweep.objective]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Sweep {sweep.folder.name}")
    fig.tight_layout()
    reports.save_figure(fig, path)


def write_summary(sweep: Sweep) -> list[Path]:
    """summary.csv, summary.md, summary.png and, when seeds are swept, summary_by_seed.csv; each whole or not at all."""
    table, text, figure = sweep.folder / "summary.csv", sweep.folder / "summary.md", sweep.folder / "summary.png"
    write_csv(table, *run_rows(sweep))
    with replaced_on_success(text) as partial:
        partial.write_text(markdown(sweep))
    plot(sweep, figure)
    groups = seed_groups(sweep)
    if not groups:
        return [table, text, figure]
    by_seed = sweep.folder / "summary_by_seed.csv"
    write_csv(by_seed, *seed_rows(sweep, groups))
    return [table, text, figure, by_seed]


def best_line(sweep: Sweep) -> str:
    best = sweep.best
    if best is None:
        return f"sweep summary: {sweep.folder / 'summary.md'}; no run finished"
    settings = " ".join(f"{key}={value}" for key, value in best.overrides.items())
    return (f"sweep summary: {sweep.folder / 'summary.md'}; best: run {best.name}, "
            f"{LABELS[best.objective]} {percent(best.score)}%" + (f" ({settings})" if settings else ""))


def summarize(folder: str | Path) -> Sweep | None:
    """The sweep's summary written and its best run printed. The runs are over and their results on disk: a
    summary that cannot be made is reported in one line rather than failing the sweep."""
    try:
        sweep = read_sweep(folder)
        write_summary(sweep)
    except UserError as err:
        print_error(err)
        return None
    print(best_line(sweep))
    return sweep


def stop_sweep(folder: Path, signum: int, what: str) -> NoReturn:
    """A signal stopped the sweep: the summary of what exists, the command that finishes it, exit code 128+n."""
    summarize(folder)
    print(f"deepcnn: {signal.Signals(signum).name}: sweep {what}; finish it with {sweeps.sweep_command(folder)}",
          file=sys.stderr)
    sys.exit(128 + signum)


class SummarizeSweep(Callback):
    """Hydra callback: the sweep's summary once every run of a multirun has returned; a sweep none of whose runs
    finished ends with exit code 1, and one a signal stopped after its last run with 128+n.
    Enable it under `hydra.callbacks` with `_target_: deepcnn.summary.SummarizeSweep`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        if sweeps.received:
            stop_sweep(folder, sweeps.received[0], "stopped after its last run")
        sweep = summarize(folder)
        if sweep is not None and sweep.best is None:
            print(f"deepcnn: error: no run of the sweep finished ({folder / 'summary.md'} says why)", file=sys.stderr)
            sys.exit(1)
