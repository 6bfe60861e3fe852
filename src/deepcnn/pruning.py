"""A search's trials pruned from inside their runs: each validation's accuracy told to the study, and a
trial whose curve lags the others' at the same step stopped there (hydra/sweeper/pruner=median or
hyperband; no pruner, and the accuracies are only recorded).

The run reaches its trial through the study's storage, as its sweeper (hydra_plugins/deepcnn_search.py)
left it: the study named in hydra.sweeper, the trial numbered as the run's job. Outside such a search
the callback does nothing.
"""
from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from pytorch_lightning import Callback, LightningModule, Trainer

SWEEPER = "hydra_plugins.deepcnn_search.ResumableOptunaSweeper"


class Pruned(Exception):
    """The study's pruner stopped this run's trial."""

    def __init__(self, step: int, accuracy: float):
        # Its arguments as the exception's: a launcher's worker process sends it back pickled.
        super().__init__(step, accuracy)
        self.step, self.accuracy = step, accuracy

    def __str__(self) -> str:
        return f"pruned at step {self.step}: validation accuracy {self.accuracy:.4f} lags the study's other " \
               "trials at that step"


def search_trial():
    """This run's Optuna trial, with its study's pruner; None outside a search by deepcnn's sweeper."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.sweeper.get("_target_") != SWEEPER:
        return None
    import optuna

    sweeper = hydra_cfg.sweeper
    pruner = instantiate(sweeper.pruner) if sweeper.pruner else optuna.pruners.NopPruner()
    storage = optuna.storages.RDBStorage(sweeper.storage)
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, hydra_cfg.job.num))


class ReportToStudy(Callback):
    """Tells the search's study each validation's accuracy, and stops the run when its pruner says so."""

    def __init__(self, monitor: str = "val/accuracy"):
        self.monitor = monitor
        self.trial = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.trial = search_trial()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or accuracy is None:
            return
        accuracy, step = float(accuracy), trainer.global_step
        prune = False
        if self.trial is not None:
            self.trial.report(accuracy, step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            raise Pruned(step, accuracy)
