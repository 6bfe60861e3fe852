"""Hyperparameter searches with Optuna that survive being stopped: a Hydra sweeper asking Optuna for each
trial's values and telling it each run's result.

The study lives in SQLite in the search's sweep directory. Run again, the same command finds it and
runs only the trials still missing from `n_trials` (the search's total): trials that finished
(complete, failed or pruned) count, a trial left running by a stopped invocation does not. A run's
directory is its trial's number, so they never collide with an earlier invocation's, and the run finds
its trial by it to report its validation accuracy (deepcnn.pruning). The sampler is reseeded past the
trials already proposed, so that it does not propose the same points again.

The search space comes from Hydra's override syntax, as Hydra's own Optuna sweeper reads it:
`interval(a, b)` (`tag(log, interval(a, b))` on a log scale), `choice(...)` and `range(start, stop,
step)` (stop excluded, as in Hydra's basic sweeper).

Hydra takes sweepers only from the hydra_plugins package, and imports every module in it at start,
with or without the `sweep` extra: Optuna is imported only once a search starts.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deepcnn.errors import SettingsError, UserError, reported_errors
from deepcnn.files import replaced_on_success

log = logging.getLogger(__name__)


class StudyError(UserError):
    """The study's storage cannot be used as it is."""


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise SettingsError("hparams_search needs Optuna, which comes with the sweep extra: "
                            "pip install -e '.[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distribution(override: Override):
    """The Optuna distribution of one swept key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and sweep.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise SettingsError(f"{override.input_line}: the range holds no value")
        if all(isinstance(value, int) for value in values):
            return IntDistribution(values[0], values[-1], step=int(sweep.step))
        return FloatDistribution(values[0], values[-1], step=sweep.step)
    if override.is_interval_sweep():
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(sweep.start, sweep.end, log=log_scale)
    raise SettingsError(f"{override.input_line}: a search takes interval(...), tag(log, interval(...)), "
                        "choice(...) or range(...)")


def search_space(overrides: Sequence[str]) -> tuple[dict, dict]:
    """The distributions of the swept keys and the values of the fixed ones; a later override of a key
    replaces an earlier one (the command line's replace the preset's)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def open_storage(url: str):
    """The study's storage; one made by an older Optuna stops the search naming Optuna's own upgrade."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except RuntimeError as err:
        if "storage upgrade" not in str(err):
            raise
        raise StudyError(f"{url}: written by an older Optuna; upgrade it in place (its trials are kept) with: "
                         f"optuna storage upgrade --storage {url}") from None


class ResumableOptunaSweeper(Sweeper):
    """Optuna's ask and tell over Hydra's launcher, carrying on a stored study where it stopped."""

    def __init__(self, direction: str, storage: str, study_name: str, n_trials: int, n_jobs: int,
                 max_failure_rate: float, sampler: DictConfig, pruner: DictConfig | str | None,
                 params: DictConfig | None) -> None:
        # The sampler and the pruner come as their configs (_recursive_: false): built once Optuna is
        # known to be installed, the sampler reseeded for the study it carries on.
        self.direction, self.storage, self.study_name = direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.sampler, self.pruner = sampler, pruner
        self.params = {str(key): str(value) for key, value in (params or {}).items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        with reported_errors():
            import_optuna()
            self.search(arguments)

    def open_study(self):
        """The study, created or carried on; the sampler seeded past the trials it already holds."""
        import optuna

        if isinstance(self.pruner, str):
            raise SettingsError(f"hydra.sweeper.pruner={self.pruner}: a pruner is a config group, chosen with "
                                f"hydra/sweeper/pruner={self.pruner}")
        # The SQLite file goes in the sweep directory, which Hydra creates only when it launches a run.
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.storage)
        stored = [study.study_name for study in storage.get_all_studies()]
        before = len(optuna.load_study(study_name=self.study_name, storage=storage).trials) \
            if self.study_name in stored else 0
        seed = self.sampler.get("seed")
        sampler = instantiate(self.sampler, **({} if seed is None else {"seed": seed + before}))
        pruner = instantiate(self.pruner) if self.pruner else None
        return optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                   direction=self.direction, load_if_exists=True)

    def search(self, arguments: list[str]) -> None:
        from optuna.trial import TrialState

        from deepcnn.pruning import Pruned

        space, fixed = search_space([*(f"{key}={value}" for key, value in self.params.items()), *arguments])
        study = self.open_study()
        before = study.get_trials(deepcopy=False)
        finished = sum(trial.state.is_finished() for trial in before)
        to_run = max(0, self.n_trials - finished)
        if before:
            log.info(f"Resuming study {self.study_name}: {finished} of {self.n_trials} trials finished, "
                     f"{to_run} to run")
        while to_run > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, to_run))]
            overrides = [tuple(f"{key}={value}" for key, value in {**trial.params, **fixed}.items())
                         for trial in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            failures = []
            for trial, result in zip(trials, returns):
                value = result.return_value if result.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                elif isinstance(result._return_value, Pruned):
                    study.tell(trial, state=TrialState.PRUNED)
                else:
                    study.tell(trial, state=TrialState.FAIL)
                    failures.append(result._return_value)
            to_run -= len(trials)
            if len(failures) / len(trials) > self.max_failure_rate:
                raise StudyError(f"{len(failures)} of {len(trials)} trials failed, more than "
                                 f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; the last: {failures[-1]}")
        self.write_best(study)

    def write_best(self, study) -> None:
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.error(f"No trial of study {self.study_name} completed")
            return
        best = {"name": "optuna", "best_params": study.best_params, "best_value": study.best_value}
        with replaced_on_success(self.sweep_dir / "optimization_results.yaml") as partial:
            OmegaConf.save(OmegaConf.create(best), partial)
