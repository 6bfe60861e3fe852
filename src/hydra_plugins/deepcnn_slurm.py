"""hydra/launcher=slurm: Hydra's submitit SLURM launcher, whose sweep outlives a job that ended without a result.

Hydra's launcher waits for each job's result and raises when one has none (cancelled, killed, its node
lost): the sweep then ends with a traceback, the later jobs' results unread and no summary written. Here
such a job is recorded as failed in its run directory's results.json, with the state SLURM gives it, and
returned to the sweeper as train.py returns a failed run: the sweep goes on and its summary lists the run.
Jobs are submitted, run and requeued exactly as by Hydra's launcher, which this one drives.

Hydra imports every module of hydra_plugins at start, with or without the cluster extra: this one imports
Hydra's submitit launcher, and submitit, only once a sweep is launched.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


# How often the queue is asked about a job whose end accounting has not shown.
QUEUE_POLL_S = 30
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def wait(job) -> str:
    """Until the job has ended; how it ended, as sacct or, failing that, squeue has it.

    submitit waits for as long as sacct knows nothing of a job's end, but a job of an array cancelled before it
    started never reaches accounting (submitit keeps the state it last read for the array): the queue is asked
    too, and a job it no longer lists, or lists as ended, is over.
    """
    asked = float("-inf")
    while not job.done():
        if time.monotonic() - asked > QUEUE_POLL_S:
            asked = time.monotonic()
            queue = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T", "-j", job.job_id],
                                   capture_output=True, text=True)
            # A controller that does not answer says nothing of the job: asked again later.
            listed = queue.stdout.split() if queue.returncode == 0 else None
            if listed == [] or "Invalid job id" in queue.stderr:
                return "is no longer listed by SLURM (cancelled before it started?)"
            if listed and listed[0] not in ACTIVE:
                return f"ended {listed[0]}"
        time.sleep(1)
    return f"ended {job.state.split()[0]}"


class SlurmLauncher(Launcher):
    """Hydra's submitit SlurmLauncher, reporting jobs without a result as failed runs."""

    def __init__(self, **params: Any) -> None:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

        self.submitit = SubmititSlurmLauncher(**params)

    def setup(self, **context: Any) -> None:
        self.submitit.setup(**context)

    def executor(self):
        """submitit's executor with the launcher's settings, as Hydra's launcher makes it."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = dict(self.submitit.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in queue_keys else f"slurm_{key}": value
                                      for key, value in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        config = self.submitit.config
        sweep_dir = Path(str(config.hydra.sweep.dir))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
        numbers = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for number, overrides in zip(numbers, job_overrides):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = self.executor().map_array(self.submitit, [list(overrides) for overrides in job_overrides],
                                         ["hydra.sweep.dir"] * len(numbers), numbers,
                                         [f"job_id_for_{number}" for number in numbers], [state] * len(numbers))
        return [self.job_return(job, list(overrides), number)
                for job, overrides, number in zip(jobs, job_overrides, numbers)]

    def job_return(self, job, overrides: list[str], number: int) -> JobReturn:
        """The job's own return, or, when it ended without one, a failed run recorded in its run directory."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        from deepcnn.experiment import RunFailed, write_unfinished_results
        from deepcnn.sweeps import BASIC_SWEEPER
        from deepcnn.files import replaced_on_success
        from deepcnn.summary import OVERRIDES, RESULTS

        ending = wait(job)
        # Not done when only the queue knew of the job's end: submitit would wait for it again.
        if job.done():
            try:
                return job.results()[0]
            except (UncompletedJobError, FailedJobError):
                pass
        log_file = f"; its log: {job.paths.stderr}" if job.paths.stderr.exists() else ""
        reason = f"SLURM job {job.job_id} {ending}, without a result{log_file}"
        log.error(f"#{number} failed: {reason}")
        run_dir = self.run_dir(overrides, number)
        if not (run_dir / OVERRIDES).exists():
            # A job cancelled before it started: its run is listed in the summary all the same.
            with replaced_on_success(run_dir / OVERRIDES) as partial:
                OmegaConf.save(OmegaConf.create(overrides), partial)
        if not (run_dir / RESULTS).exists():
            write_unfinished_results(run_dir, reason)
        if self.submitit.config.hydra.sweeper._target_ == BASIC_SWEEPER:
            return JobReturn(overrides=overrides, working_dir=str(run_dir), status=JobStatus.COMPLETED,
                             _return_value=float("nan"))
        return JobReturn(overrides=overrides, working_dir=str(run_dir), status=JobStatus.FAILED,
                         _return_value=RunFailed(reason))

    def run_dir(self, overrides: list[str], number: int) -> Path:
        """The job's run directory, as Hydra's run_job names it."""
        launcher = self.submitit
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = number
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
