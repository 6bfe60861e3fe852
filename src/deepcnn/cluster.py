"""Runs of several processes started by a launcher rather than by Lightning.

Lightning starts the other processes of a run itself only on one machine, by re-running the command
line in each; in a Hydra multirun each of them would re-run the whole sweep. There the processes must
be started by a launcher, one task a process: submitit's (hydra/launcher=local on this machine,
hydra/launcher=slurm on a cluster), or torchrun and SLURM's srun for a single run. Lightning finds the
processes they started through the environment they set (its LightningEnvironment,
TorchElasticEnvironment and SLURMEnvironment), and starts none itself.

Before a job's time limit, or when it is preempted, submitit signals it (USR2): GracefulStop writes the
last checkpoint after the current step and hands the signal on to submitit, which requeues the job, the
same Hydra job in the same run directory. Under submitit, ckpt_path defaults to auto, so that it resumes.
"""
from __future__ import annotations

import os
import signal
import warnings

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
# Lightning's own reading of the Trainer's device settings; it has no public one.
from pytorch_lightning.trainer.connectors.accelerator_connector import _AcceleratorConnector
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from deepcnn.errors import SettingsError, reported_errors

# Launchers that start each process of a run as one of their tasks (deepcnn_slurm: hydra/launcher=slurm).
TASK_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.", "hydra_plugins.deepcnn_slurm.")
WORKING_LAUNCHERS = "hydra/launcher=local (this machine) or hydra/launcher=slurm (one task per process)"

# Lightning's hint, wherever srun is installed, to prepend srun to the command: on SLURM, hydra/launcher=slurm
# starts the processes with srun, and a multirun that would need it stops with WORKING_LAUNCHERS instead.
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")


def lightning_starts_processes(trainer_cfg: DictConfig) -> bool:
    """Whether a Trainer of this config would start the run's other processes itself, re-running the command
    line in each, rather than find them started by torchrun, srun or submitit. Lightning's own reading of
    accelerator, devices, num_nodes and strategy decides, so 'auto' and device lists count as in a run.
    Settings Lightning refuses (accelerator=gpu without a GPU, a device list on the CPU) are left to the
    run to report, as without a multirun."""
    try:
        connector = _AcceleratorConnector(accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
                                          num_nodes=trainer_cfg.num_nodes, strategy=trainer_cfg.strategy)
    except (MisconfigurationException, TypeError, ValueError):
        return False
    launcher = connector.strategy.launcher
    return (isinstance(launcher, _SubprocessScriptLauncher)
            and not connector.cluster_environment.creates_processes_externally)


def refuse_spawning_sweep(launcher_cfg: DictConfig, trainer_cfg: DictConfig) -> None:
    """A multirun whose runs would each start their own processes is refused: in every child process
    Lightning would re-run the command line, the whole sweep."""
    if str(launcher_cfg._target_).startswith(TASK_LAUNCHERS) or not lightning_starts_processes(trainer_cfg):
        return
    raise SettingsError(f"trainer.devices={trainer_cfg.devices}, trainer.num_nodes={trainer_cfg.num_nodes}: in a "
                        "multirun Lightning cannot start each run's processes itself (each would re-run the whole "
                        f"sweep); start them with {WORKING_LAUNCHERS}")


class RefuseSpawningSweep(Callback):
    """Hydra callback: a multirun's trainer settings are checked before any run starts (refuse_spawning_sweep).
    A value swept over (trainer.devices=1,2) is checked by each run instead, which then fails alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with reported_errors():
            refuse_spawning_sweep(config.hydra.launcher, config.trainer)


def prepare_processes(trainer_cfg: DictConfig) -> None:
    """Before the Trainer is built. In a multirun, refuse a run whose processes Lightning would start.
    Under a submitit launcher each task is one process of the run: check that there are as many tasks as
    processes and, off SLURM (where Lightning reads srun's variables), export the rank, world size and main
    address that Lightning reads, so that it starts nothing itself."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        refuse_spawning_sweep(hydra_cfg.launcher, trainer_cfg)
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    job = submitit.JobEnvironment()
    devices, nodes = trainer_cfg.devices, trainer_cfg.num_nodes
    if isinstance(devices, int) and devices * nodes != job.num_tasks:
        raise SettingsError(f"trainer.devices={devices} x trainer.num_nodes={nodes} processes, but the launcher "
                            f"started {job.num_tasks} task(s); set hydra.launcher.tasks_per_node and "
                            "hydra.launcher.nodes to match (hydra/launcher=local and slurm do)")
    if job.num_tasks > 1 and not SLURMEnvironment.detect():
        # The job's own task numbers decide the ranks, whatever a parent environment had set.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def end_processes() -> None:
    """After a run, in each of its processes. Lightning leaves the process group to the interpreter's exit,
    where gloo's worker threads can still hold tensors whose release then aborts the process (SIGABRT):
    a finished run ended with exit code -6 on one rank. Destroyed here, while the interpreter is whole."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_ckpt_path(ckpt_path: str | None) -> str | None:
    """ckpt_path as given; unset under submitit, auto: a requeued job resumes its run directory's checkpoint."""
    if ckpt_path is None and "SUBMITIT_EXECUTOR" in os.environ:
        return "auto"
    return ckpt_path


def requeue_signals() -> tuple[int, ...]:
    """The signal submitit sends a job before its time limit or on preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise), when running under it: after the checkpoint, its handler
    requeues the job."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return ()
    import submitit

    return (getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"),)
