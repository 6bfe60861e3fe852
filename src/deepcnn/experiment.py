"""Training and evaluation runs, assembled from the Hydra config."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from deepcnn import reports
from deepcnn.allocator import keep_freed_memory
from deepcnn.averaging import Lookahead
from deepcnn.callbacks import (AtomicCheckpointIO, GracefulStop, LogLines, StepProgressBar, StopRequested,
                               TrainTimer)
from deepcnn.errors import CheckpointError, refuse_changed_settings
from deepcnn.module import Classifier, load_classifier
from deepcnn.sync_batchnorm import BatchNormSync

# The train stream resumes at the checkpoint's step by itself (see TrainStream), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
# Epoch-level values are logged from torchmetrics results, which are already reduced over all processes.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """'auto': bf16 mixed precision where the hardware computes bf16 natively, else float32."""
    if str(precision) != "auto":
        return str(precision)
    on_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else "32-true"


def build_trainer(trainer_cfg: DictConfig, run_dir: Path, callbacks: list, **overrides) -> pl.Trainer:
    interactive = sys.stdout.isatty()
    if interactive:
        callbacks = [*callbacks, StepProgressBar()]
    else:
        callbacks = [*callbacks, LogLines(trainer_cfg.get("log_every_n_steps", 50))]
    precision = resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator)
    plugins = [AtomicCheckpointIO(), *([BatchNormSync()] if trainer_cfg.get("sync_batchnorm") else [])]
    return instantiate(
        trainer_cfg, precision=precision, callbacks=callbacks, plugins=plugins,
        enable_progress_bar=interactive, default_root_dir=str(run_dir), **overrides,
    )


def run_directory(ckpt_path: str | None) -> Path:
    """A resumed run carries on in the run directory its checkpoint belongs to."""
    if ckpt_path:
        ckpt = Path(ckpt_path)
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent
    return Path(HydraConfig.get().runtime.output_dir)


def check_resumable(ckpt_path: str, resumed: Classifier, module: Classifier) -> None:
    """Resuming loads the checkpoint's weights into the configured network, so both must be the same
    network on the same classes; otherwise Lightning fails deep inside with a traceback."""
    keys = ("model", "classes", "crop_size")
    refuse_changed_settings(ckpt_path, {key: resumed.hparams[key] for key in keys},
                            {key: module.hparams[key] for key in keys})


def train(cfg: DictConfig) -> dict:
    keep_freed_memory()
    resumed = load_classifier(cfg.ckpt_path) if cfg.ckpt_path else None
    run_dir = run_directory(cfg.ckpt_path)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    module = Classifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        classes=datamodule.classes,
        crop_size=cfg.data.crop_size,
        tta=cfg.tta,
    )
    if resumed is not None:
        check_resumable(cfg.ckpt_path, resumed, module)
    checkpoint_dir = run_dir / "checkpoints"
    timer = TrainTimer()
    stop = GracefulStop(checkpoint_dir / "last.ckpt")
    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True,
                                  every_n_train_steps=cfg.checkpoint_every_n_steps)
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    averaging = [Lookahead(**cfg.lookahead)] if cfg.lookahead else []
    trainer = build_trainer(cfg.trainer, run_dir, [timer, stop, checkpoints, *averaging], logger=logger)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except StopRequested as stopped:
        if trainer.is_global_zero:
            print(f"deepcnn: stopped at step {stopped.step}; resume with "
                  f"python src/train.py ckpt_path={stop.checkpoint_path}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    last = checkpoint_dir / "last.ckpt"
    trainer.save_checkpoint(last)
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.test_result
    accuracy_curve = module.history["accuracy"]
    if not accuracy_curve or accuracy_curve[-1][0] != trainer.global_step:
        # Presets that validate only at the end (experiment=fast) still get a point on their curve.
        accuracy_curve.append((trainer.global_step, result["accuracy"]))
    summary = {
        "test_accuracy": result["accuracy"],
        "per_class_accuracy": result["per_class"],
        "steps": trainer.global_step,
        "train_seconds": round(timer.seconds, 3),
        "images_per_second": round(timer.images / timer.seconds, 1) if timer.seconds else None,
        "checkpoint": str(last.resolve()),
    }
    if trainer.is_global_zero:
        report(module, result, run_dir, logger)
        reports.write_json(run_dir / "results.json", summary)
        print(reports.accuracy_table(result["accuracy"], result["per_class"]))
        print(f"{summary['images_per_second']} training images/s; run directory: {run_dir}")
    return summary


def report(module: Classifier, result: dict, run_dir: Path, logger: TensorBoardLogger) -> None:
    reports.plot_curves(module.history, run_dir)
    classes = module.hparams.classes
    figure_path = run_dir / "confusion.png"
    reports.plot_confusion(result["confusion"], classes, figure_path)
    reports.write_json(run_dir / "per_class_accuracy.json", result["per_class"])
    logger.experiment.add_text("test/per_class_accuracy",
                               reports.accuracy_table(result["accuracy"], result["per_class"]).replace("\n", "  \n"))
    logger.experiment.add_image("test/confusion_matrix", reports.png_array(figure_path), dataformats="HWC")
    logger.experiment.flush()


def evaluate(cfg: DictConfig) -> dict:
    keep_freed_memory()
    module = load_classifier(cfg.ckpt_path)
    datamodule = instantiate(cfg.data, crop_size=module.hparams.crop_size)
    datamodule.prepare_data()
    datamodule.setup()
    if datamodule.classes != module.hparams.classes:
        raise CheckpointError(
            f"{cfg.ckpt_path}: trained on classes {module.hparams.classes}, but {datamodule.dataset.root} has "
            f"{datamodule.classes}"
        )
    trainer = build_trainer(cfg.trainer, Path(HydraConfig.get().runtime.output_dir), [], logger=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.test_result
    print(reports.accuracy_table(result["accuracy"], result["per_class"]))
    return {"test_accuracy": result["accuracy"], "per_class_accuracy": result["per_class"]}
