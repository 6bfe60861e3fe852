"""Hyperparameter searches that survive being stopped: Hydra's Optuna sweeper, resumed from its study.

The study lives in SQLite in the search's sweep directory. Run again, the same command finds it and
runs only the trials still missing from `n_trials` (the search's total, where the plugin counts per
invocation): trials that finished (complete, failed or pruned) count, a trial left running by a
stopped invocation does not. Run directories are numbered after the study's trials, so they never
collide with an earlier invocation's, and the sampler is reseeded past the trials already proposed,
so that it does not propose the same points again.

Hydra takes sweepers only from the hydra_plugins package, and imports every module in it at start,
with or without the `sweep` extra: this one imports the Optuna sweeper, and Optuna, only once a
search starts, as that plugin itself imports Optuna.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper, carrying on a stored study where it stopped."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**settings)

    def setup(self, **context: Any) -> None:
        self.optuna.setup(**context)

    def stored_trials(self) -> list:
        """The study's trials; none when it does not exist yet."""
        import optuna

        search = self.optuna.sweeper
        try:
            return optuna.load_study(study_name=search.study_name, storage=search.storage).get_trials(deepcopy=False)
        except KeyError:
            return []

    def sweep(self, arguments: list[str]) -> None:
        search = self.optuna.sweeper
        # The SQLite file goes in the sweep directory, which Hydra creates only when it launches a run.
        Path(search.sweep_dir).mkdir(parents=True, exist_ok=True)
        before = self.stored_trials()
        finished = sum(trial.state.is_finished() for trial in before)
        total = search.n_trials
        search.n_trials = max(0, total - finished)
        if before:
            log.info(f"Resuming study {search.study_name}: {finished} of {total} trials finished, "
                     f"{search.n_trials} to run")
            search.job_idx = len(before)
            sampler = search.config.hydra.sweeper.sampler
            if sampler.get("seed") is not None:
                search.sampler = instantiate(sampler, seed=sampler.seed + len(before))
        try:
            self.optuna.sweep(arguments)
        except ValueError:
            # Having run every trial, the plugin names the best one, and fails when none completed: the
            # summary then gives each run's reason. Any other ValueError is the plugin's to report.
            from optuna.trial import TrialState

            after = self.stored_trials()
            asked = after[len(before):]
            ended = len(asked) == search.n_trials and all(trial.state.is_finished() for trial in asked)
            if not ended or any(trial.state == TrialState.COMPLETE for trial in after):
                raise
            log.error(f"No trial of study {search.study_name} completed")
