"""Training and evaluation runs, assembled from the Hydra config: every component is instantiated from
its config group, and the safety callbacks are added in code, always."""
from __future__ import annotations

import logging
import shlex
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from deepcnn import checkpoints, cli, cluster, reports, settings, sweeps
from deepcnn.allocator import keep_freed_memory
from deepcnn.budget import apply_budget
from deepcnn.callbacks import DivergenceStop, GracefulStop, LogLines, StepProgressBar, StopRequested, TrainTimer
from deepcnn.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from deepcnn.errors import CheckpointError, Interrupted, SettingsError, UserError
from deepcnn.module import Classifier
from deepcnn.precision import detect_precision
from deepcnn.pruning import Pruned
from deepcnn.summary import read_results, stop_sweep
from deepcnn.sweeps import BASIC_SWEEPER
from deepcnn.sync_batchnorm import BatchNormSync

log = logging.getLogger("deepcnn")

# The train stream resumes at the checkpoint's step by itself (see TrainStream), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
# Epoch-level values are logged from torchmetrics results, which are already reduced over all processes.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")

# Loggers whose packages are optional extras of pyproject.toml, by their conf/logger/ name.
LOGGER_EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}
# Callbacks whose only work is writing to the loggers.
LOGGING_ONLY = {"pytorch_lightning.callbacks.LearningRateMonitor"}


class RunFailed(Exception):
    """A run of a search failed. Not a UserError: the entry script would end the whole search with its
    one line, where the sweeper should record the run as failed and go on."""


def plain(config) -> dict | list | None:
    return OmegaConf.to_container(config, resolve=True) if config is not None else None


def build_trainer(trainer_cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> pl.Trainer:
    interactive = sys.stdout.isatty()
    progress = StepProgressBar() if interactive else LogLines(trainer_cfg.get("log_every_n_steps", 50))
    precision, why = detect_precision(trainer_cfg.precision, trainer_cfg.accelerator)
    if str(trainer_cfg.precision) == "auto":
        log.info(f"precision {why}")
    plugins = [AtomicCheckpointIO(), *([BatchNormSync()] if trainer_cfg.get("sync_batchnorm") else [])]
    try:
        return instantiate(trainer_cfg, precision=precision, callbacks=[*callbacks, progress], plugins=plugins,
                           logger=loggers or False, enable_progress_bar=interactive, default_root_dir=str(run_dir))
    except InstantiationException as err:
        # Lightning's own word on a setting it cannot use (an unknown accelerator, too many devices, ...).
        if isinstance(err.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise SettingsError(f"trainer: {' '.join(str(err.__cause__).split())}") from None
        raise


def build_datamodule(data_cfg: DictConfig, **given):
    try:
        return instantiate(data_cfg, **given)
    except InstantiationException as err:
        # The data module's own word on a setting (an unknown distortion, an empty data_dir), not Hydra's wrapping.
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_loggers(logger_cfg: DictConfig | None) -> list:
    loggers = []
    for name, config in (logger_cfg or {}).items():
        try:
            loggers.append(instantiate(config))
        except InstantiationException as err:
            if isinstance(err.__cause__, ImportError):
                extra = LOGGER_EXTRAS.get(name, name)
                raise SettingsError(f"logger {name} needs a package that is not installed ({err.__cause__}); "
                                    f"install it with: pip install -e '.[{extra}]'") from None
            raise
    return loggers


def build_callbacks(callbacks_cfg: DictConfig | None, validation_label: str, logged: bool = True) -> list:
    """The config's callbacks. Without a validation split nothing may select on validation accuracy,
    so the callbacks that monitor it are left out, saying so once; without a logger (logger=none), so
    are those that only write to one."""
    chosen = {name: config for name, config in (callbacks_cfg or {}).items() if config is not None}
    if not logged:
        logging_only = [name for name, config in chosen.items() if config.get("_target_") in LOGGING_ONLY]
        if logging_only:
            log.warning(f"logger=none: {', '.join(logging_only)} would have nothing to write to and is off")
        chosen = {name: config for name, config in chosen.items() if name not in logging_only}
    if validation_label != "val":
        selecting = [name for name, config in chosen.items() if str(config.get("monitor", "")).startswith("val/")]
        if selecting:
            log.warning(f"data.val_size=0: no validation split to select on; the accuracy curve is test accuracy, "
                        f"and {', '.join(selecting)} (which select on validation accuracy) are off")
        chosen = {name: config for name, config in chosen.items() if name not in selecting}
    return [instantiate(config) for config in chosen.values()]


def task_overrides() -> list[str]:
    """The command-line overrides of this run (of this job, in a sweep)."""
    return list(HydraConfig.get().overrides.task)


def build_module(cfg: DictConfig, classes: list[str]) -> Classifier:
    return Classifier(model=plain(cfg.model), optimizer=plain(cfg.optimizer), scheduler=plain(cfg.scheduler),
                      loss=plain(cfg.loss), classes=classes, input_size=cfg.data.crop_size, tta=cfg.tta)


def resume_command(ckpt: Path) -> str:
    kept = [o for o in task_overrides() if not o.startswith(("ckpt_path=", "init_from="))]
    return shlex.join(["python", "src/train.py", *kept, f"ckpt_path={ckpt}"])


def refuse_reused_run_dir(run_dir: Path) -> None:
    if cli.holds_run(run_dir):
        raise SettingsError(f"{run_dir}: already holds a run; choose another hydra.run.dir, or resume it with "
                            "ckpt_path=auto")


def train(cfg: DictConfig) -> dict:
    """One training run: settings checked, data opened, the network trained, evaluated and reported.
    Returns the run's results (also written to results.json)."""
    settings.check(cfg, task_overrides())
    chosen = apply_budget(cfg, task_overrides())
    if chosen:
        settings.check(cfg)
        log.info(f"budget_s={cfg.budget_s}: {', '.join(f'{k}={v}' for k, v in chosen['settings'].items())} "
                 f"(measured: {chosen['seconds']} s)")
    cluster.prepare_processes(cfg.trainer)
    keep_freed_memory()
    run_dir = Path(cfg.run_dir)
    ckpt_path = checkpoints.resolve_resume(cluster.default_ckpt_path(cfg.ckpt_path), run_dir)
    run_dir = checkpoints.run_directory(ckpt_path, run_dir)
    if ckpt_path:
        checkpoints.refuse_final(run_dir, ckpt_path, cfg.trainer.max_steps)
    else:
        refuse_reused_run_dir(run_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    module = build_module(cfg, datamodule.classes)
    module.validation_label = datamodule.validation_label
    if ckpt_path:
        checkpoints.check_resumable(ckpt_path, module.hparams, datamodule, cfg.trainer.max_steps)
    elif cfg.init_from:
        checkpoints.init_weights(module, cfg.init_from)
    elif hasattr(module.model, "init_whitening"):
        # Layers fitted to the data rather than learned: fitted once, here, before training.
        module.model.init_whitening(datamodule.whitening_sample())
    # Loggers create their files as they start: only once the run is known to start.
    loggers = build_loggers(cfg.logger)
    checkpoint_dir = run_dir / "checkpoints"
    last = checkpoint_dir / "last.ckpt"
    timer = TrainTimer()
    stop = GracefulStop(last, requeue=cluster.requeue_signals(), received=sweeps.received)
    safety = [timer, stop, DivergenceStop(last, cfg.trainer.log_every_n_steps),
              # One last.ckpt, written over on a resume (Lightning would add last-v1.ckpt beside it).
              ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True, enable_version_counter=False,
                              every_n_train_steps=cfg.checkpoint_every_n_steps)]
    callbacks = build_callbacks(cfg.callbacks, module.validation_label, logged=bool(loggers))
    trainer = build_trainer(cfg.trainer, run_dir, [*safety, *callbacks], loggers)
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            trainer.save_checkpoint(last, weights_only=False)
        except StopRequested as stopped:
            raise Interrupted(f"stopped at step {stopped.step}; resume with {resume_command(last)}",
                              stopped.signum) from None
        except CheckpointWriteError as err:
            kept = (f"the previous checkpoint is kept: once there is room, resume with {resume_command(last)}"
                    if last.is_file() else "no checkpoint had been written yet")
            raise CheckpointWriteError(f"{err}; {kept}") from None
        summary = evaluate_trained(trainer, module, datamodule)
        summary.update(parameters=sum(p.numel() for p in module.model.parameters()), steps=trainer.global_step,
                       train_seconds=round(timer.seconds, 3), images_per_second=timer.images_per_second,
                       checkpoint=str(last.resolve()))
        if trainer.is_global_zero:
            write_reports(module, summary, run_dir, trainer.loggers)
    finally:
        stop.restore()
        cluster.end_processes()
    if stop.signal is not None:
        raise Interrupted(f"a signal came during the final evaluation; training had finished and its results are "
                          f"in {run_dir}", stop.signal)
    return summary


def evaluate_trained(trainer: pl.Trainer, module: Classifier, datamodule) -> dict:
    """Validation accuracy of the final weights (the end of the curve) and the whole test set, once.
    Without a validation split the curve is test accuracy: its last point is the final test pass, which
    a validation at the last step has already made."""
    curve, step = module.history["accuracy"], trainer.global_step
    has_validation = module.validation_label == "val"
    # Training stopped before max_steps may have changed the weights after its last validation (lookahead's
    # final swap to the average): they are measured again, and that point of the curve replaced.
    measured_at_end = bool(curve) and curve[-1][0] == step and step >= trainer.max_steps
    if curve and curve[-1][0] == step and not measured_at_end:
        curve.pop()
    if has_validation and not measured_at_end:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        curve.append((step, float(trainer.callback_metrics["val/accuracy"])))
    # None when this process did not validate (a run resumed from its last step).
    result = module.validation_result if not has_validation and measured_at_end else None
    if result is None:
        trainer.test(module, datamodule=datamodule, verbose=False)
        result = module.test_result
    if not has_validation and not measured_at_end:
        curve.append((step, result["accuracy"]))
    return {
        "status": "done",
        "reason": None,
        "objective": "val_accuracy" if has_validation else "test_accuracy",
        "val_accuracy": curve[-1][1] if has_validation else None,
        "test_accuracy": result["accuracy"],
        "per_class_accuracy": result["per_class"],
        "confusion": result["confusion"],
    }


def write_reports(module: Classifier, summary: dict, run_dir: Path, loggers: list) -> None:
    confusion = summary.pop("confusion")
    classes = module.hparams.classes
    reports.plot_curves(module.history, run_dir, module.validation_label)
    figure = run_dir / "confusion.png"
    reports.plot_confusion(confusion, classes, figure)
    reports.write_json(run_dir / "per_class_accuracy.json", summary["per_class_accuracy"])
    reports.write_json(run_dir / "results.json", summary)
    table = reports.accuracy_table(summary)
    overrides = dict(o.lstrip("+~").split("=", 1) for o in task_overrides() if "=" in o)
    finals = {f"final/{key}": summary[key] for key in ("val_accuracy", "test_accuracy") if summary[key] is not None}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # The HPARAMS tab: this run's overrides beside its final accuracies, to compare the runs of a sweep.
            logger.log_hyperparams(overrides, finals)
            logger.experiment.add_text("test/per_class_accuracy", table.replace("\n", "  \n"))
            logger.experiment.add_image("test/confusion_matrix", reports.png_array(figure), dataformats="HWC")
        else:
            logger.log_hyperparams(overrides)
            logger.log_metrics(finals)
        logger.finalize("success")
    log.info(table)
    log.info(f"{summary['images_per_second']} training images/s; run directory: {run_dir}")


def write_unfinished_results(run_dir: Path, reason: str, status: str = "failed", val_accuracy: float | None = None,
                             steps: int | None = None) -> None:
    """results.json of a run of a sweep that did not finish: failed (its reason, no measurements) or pruned (the
    validation accuracy and step its pruner stopped it at)."""
    reports.write_json(run_dir / "results.json", {
        "status": status, "reason": reason, "objective": None, "val_accuracy": val_accuracy, "test_accuracy": None,
        "steps": steps, "train_seconds": None, "images_per_second": None})


def train_job(cfg: DictConfig) -> float:
    """train.py's task: the run's objective, validation accuracy (test accuracy without a split).

    In a sweep, a run that fails is recorded as failed, with its reason, in its results.json, and the
    sweep goes on. Hydra's basic sweeper would stop the sweep on an exception, so there the run returns
    NaN; a sweeper that chooses the next values (Optuna) is told of the failure by a RunFailed, which
    it records and counts against its max_failure_rate. A trial its study's pruner stops is recorded as
    pruned, with the accuracy it reached. Alone, the error reaches the command line.

    A run of a sweep carries on in its folder (the sweep's command run again finishes it, see
    deepcnn.sweeps): a done run is kept and its result returned, a run with a last.ckpt resumes from it,
    a failed one runs again. A signal stops the sweep: during a run after its current step, between runs
    before the next one; the summary is written and the command that finishes the sweep printed.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            return _objective(train(cfg))
        except UserError:
            # Refused before it started (a setting, a checkpoint): the folder made for it goes too.
            cli.forget_claimed(Path(cfg.run_dir))
            raise
    run_dir = Path(cfg.run_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    if sweeps.received:
        sweeps.forget_unstarted(run_dir, hydra_cfg.sweeper)
        stop_sweep(sweep_dir, sweeps.received[0], f"stopped before run {hydra_cfg.job.num}")
    kept = read_results(run_dir / "results.json") if (run_dir / "results.json").is_file() else None
    if kept and kept["status"] == "done":
        print(f"run {hydra_cfg.job.num}: done, kept as it is ({run_dir / 'results.json'})")
        return _objective(kept)
    if kept:
        # A failure record says only why the run did not finish: it runs again.
        (run_dir / "results.json").unlink()
    with open_dict(cfg):
        cfg.ckpt_path = cfg.ckpt_path or "auto"
    try:
        result = train(cfg)
    except Interrupted as err:
        if not sweeps.in_sweep_process(hydra_cfg):
            raise
        stop_sweep(sweep_dir, err.signum, f"stopped in run {hydra_cfg.job.num} ({run_dir})")
    except Pruned as pruned:
        # The sweeper tells the study the trial was pruned; the summary shows the accuracy it reached.
        log.info(f"run {pruned}")
        write_unfinished_results(run_dir, str(pruned), "pruned", pruned.accuracy, pruned.step)
        raise
    except Exception as err:
        reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        log.error(f"run failed: {reason}")
        write_unfinished_results(run_dir, reason)
        if hydra_cfg.sweeper["_target_"] != BASIC_SWEEPER:
            raise RunFailed(reason) from err
        return float("nan")
    if sweeps.received:
        stop_sweep(sweep_dir, sweeps.received[0], f"stopped after run {hydra_cfg.job.num}")
    return _objective(result)


def _objective(results: dict) -> float:
    return results[results["objective"]]


def test_checkpoint(cfg: DictConfig) -> dict:
    """Overall and per-class accuracy of a checkpoint on the whole test set."""
    settings.check_value("trainer.precision", cfg.trainer.precision, *settings.RULES["trainer.precision"])
    keep_freed_memory()
    module = checkpoints.load_classifier(cfg.ckpt_path)
    # Only the test set is read: no training records are held out (data.val_size would refuse a small dataset).
    datamodule = build_datamodule(cfg.data, crop_size=module.hparams.input_size, val_size=0)
    datamodule.prepare_data()
    datamodule.setup()
    if datamodule.classes != module.hparams.classes:
        raise CheckpointError(
            f"{cfg.ckpt_path}: trained on classes {module.hparams.classes}, but {datamodule.dataset.root} has "
            f"{datamodule.classes}"
        )
    trainer = build_trainer(cfg.trainer, Path(HydraConfig.get().runtime.output_dir), [], [])
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.test_result
    summary = {"test_accuracy": result["accuracy"], "per_class_accuracy": result["per_class"]}
    log.info(reports.accuracy_table(summary))
    return summary
