"""A sweep that carries on: its folder claimed, the runs it is made of, the command that finishes it, and
stopping it between runs.

Under Hydra's basic sweeper (whatever the launcher: basic, joblib, submitit) a sweep's runs are the
product of the command's overrides, in a fixed order, and run N lives in the sweep folder's N/. Run the
same `-m` command with the same `hydra.sweep.dir` again and the sweep finishes: each run looks at its
own folder (experiment.train_job) and is kept when done, resumed from its last.ckpt when it has one, and
run again otherwise. A folder made by another command is refused before any run (refuse_other_runs).
Optuna's sweeper resumes its own study (hydra_plugins/deepcnn_search.py).
"""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deepcnn import cli
from deepcnn.errors import SettingsError, reported_errors

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SAVED_SWEEP = "multirun.yaml"
SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"
# A signal that came while no run was training (between runs): the sweep stops before the next one.
received: list[int] = []


def sweep_jobs(sweeper: DictConfig, arguments: list[str]) -> list[list[str]] | None:
    """Each run's overrides, in the basic sweeper's order (run N is the N-th); None under another sweeper, or
    when the overrides cannot be expanded here (a glob needs the config loader of the command's own app)."""
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    try:
        overrides = OverridesParser.create(config_loader=loader).parse_overrides([*params, *arguments])
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
    except HydraException:
        return None
    return jobs


def saved_sweep(folder: Path) -> DictConfig | None:
    path = Path(folder) / SAVED_SWEEP
    return OmegaConf.load(path) if path.is_file() else None


def planned_runs(folder: Path) -> list[list[str]] | None:
    """The runs a sweep folder's command is made of (its multirun.yaml), or None when that is not known."""
    saved = saved_sweep(folder)
    if saved is None:
        return None
    return sweep_jobs(saved.hydra.sweeper, list(saved.hydra.overrides.task))


def sweep_command(folder: Path) -> str:
    """The command that finishes the sweep in `folder`: the one that made it, with its folder named."""
    saved = saved_sweep(folder)
    hydra_overrides = [o for o in saved.hydra.overrides.hydra
                       if cli.override_key(o) not in ("hydra.mode", "hydra.sweep.dir")]
    return shlex.join(["python", "src/train.py", "-m", *saved.hydra.overrides.task, *hydra_overrides,
                       f"hydra.sweep.dir={folder}"])


def settings_of(overrides: list[str]) -> dict[str, str]:
    """A run's overrides as key -> value, Hydra's own left out: what sets the run apart."""
    settings = {}
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if not key.startswith(("hydra/", "hydra.")):
            settings[key] = value
    return settings


def refuse_other_runs(folder: Path, jobs: list[list[str]], ignored: set[str]) -> None:
    """Before any run: every run already in the folder must be the run this command makes under its number,
    or finishing the sweep would mix two sweeps (and a done run would be taken for another's result)."""
    for child in sorted(Path(folder).iterdir()):
        saved_path = child / SAVED_OVERRIDES
        if not (child.name.isdigit() and saved_path.is_file()):
            continue
        saved = {k: v for k, v in settings_of(yaml.safe_load(saved_path.read_text()) or []).items() if k not in ignored}
        if int(child.name) >= len(jobs):
            raise SettingsError(f"{child}: this command's sweep has {len(jobs)} runs, not run {child.name}; finish the "
                                f"sweep with the command that made it ({folder / SAVED_SWEEP}), or choose another "
                                "hydra.sweep.dir")
        wanted = {k: v for k, v in settings_of(jobs[int(child.name)]).items() if k not in ignored}
        for key in sorted(set(saved) | set(wanted)):
            if saved.get(key) != wanted.get(key):
                was = f"{key}={saved[key]}" if key in saved else f"no {key}"
                now = f"{key}={wanted[key]}" if key in wanted else f"no {key}"
                raise SettingsError(f"{child}: was made with {was}, but this command's run {child.name} has {now}; "
                                    f"finish the sweep with the command that made it ({folder / SAVED_SWEEP}), or "
                                    "choose another hydra.sweep.dir")


def claim_sweep_dir(config: DictConfig) -> None:
    """A sweep folder of its own, as a single run gets one: two sweeps started in the same second get DATE_TIME and
    DATE_TIME_1. A folder named on the command line is the user's choice (to finish a sweep there, for one)."""
    given = [o for o in config.hydra.overrides.hydra if cli.override_key(o) == "hydra.sweep.dir"]
    if given:
        return
    claimed = cli.claim_dir(str(config.hydra.sweep.dir), "hydra.sweep.dir")
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = claimed
        # Each run's config is composed again from these overrides (by the launcher, perhaps elsewhere).
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={claimed}")


def in_sweep_process(hydra_cfg: DictConfig) -> bool:
    """Whether the run is one the sweep's own process runs (the basic launcher): where a signal stops the sweep.
    Under joblib or submitit a run has a process of its own, which a signal stops alone (submitit requeues it)."""
    return hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER


def forget_unstarted(run_dir: Path, sweeper: DictConfig) -> None:
    """The folder Hydra made for a run of the basic sweeper that is not going to start, when it holds only the
    config Hydra wrote in it: gone, so that the summary says the run never started (from the sweep's
    multirun.yaml). An Optuna trial is the study's, started: its folder stays."""
    if sweeper.get("_target_") == BASIC_SWEEPER:
        cli.remove_if_unused(run_dir)


def numbered(config: DictConfig) -> bool:
    """Whether run N of the sweep lives in its folder's N/ (Hydra's default subdir, which deepcnn keeps)."""
    return OmegaConf.to_container(config.hydra.sweep)["subdir"] == "${hydra.job.num}"


def _record(signum, frame):
    received.append(signum)
    print(f"\ndeepcnn: {signal.Signals(signum).name} received; the sweep stops (after this step, or before the next "
          "run)", file=sys.stderr)


class ResumableSweep(Callback):
    """Hydra callback, before a multirun's first run: its folder claimed, a folder that holds another command's
    runs refused, its command saved, and a signal that comes between runs recorded (experiment.train_job stops
    the sweep on it)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with reported_errors():
            claim_sweep_dir(config)
            folder = Path(config.hydra.sweep.dir)
            jobs = sweep_jobs(config.hydra.sweeper, list(config.hydra.overrides.task))
            if jobs is not None and folder.is_dir() and numbered(config):
                refuse_other_runs(folder, jobs, set(config.hydra.job.config.override_dirname.exclude_keys))
        # The sweep's command, which sweep_command repeats: saved before the first run (the basic sweeper saves
        # it again, Optuna's never).
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, folder / SAVED_SWEEP)
        received.clear()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _record)
