"""Training-loop helpers: timing, signals, plain progress lines and atomic checkpoint writes."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from deepcnn.files import replaced_on_success


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, syncs it, then renames it over the old one,
    so a write cut off midway leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with replaced_on_success(path) as partial, open(partial, "wb") as out:
            torch.save(checkpoint, out)
            out.flush()
            os.fsync(out.fileno())


class TrainTimer(pl.Callback):
    """Seconds spent in the training loop, validation excluded, and the images it trained on."""

    def __init__(self):
        self.seconds = 0.0
        self.images = 0
        self._started: float | None = None

    def _resume(self):
        self._started = time.perf_counter()

    def _pause(self):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_start(self, trainer, pl_module):
        self._resume()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[1]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module):
        self._pause()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self._resume()

    def on_train_end(self, trainer, pl_module):
        self._pause()


class StopRequested(Exception):
    """Raised out of the training loop once a signal's checkpoint is written: no further validation,
    no test pass, no results that would look final."""

    def __init__(self, signum: int, step: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = signum, step


class GracefulStop(pl.Callback):
    """On SIGINT or SIGTERM, finish the current step, write the last checkpoint and stop."""

    def __init__(self, checkpoint_path: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\ndeepcnn: {signal.Signals(signum).name} received; stopping after this step", file=sys.stderr)

    def on_train_start(self, trainer, pl_module):
        # Installed here, after Lightning registers its own handlers, so these take precedence.
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.signal is not None:
            trainer.save_checkpoint(self.checkpoint_path)
            raise StopRequested(self.signal, trainer.global_step)

    def _restore_handlers(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_end(self, trainer, pl_module):
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_handlers()


class StepProgressBar(RichProgressBar):
    """The rich progress bar, titled in steps: a run is one endless epoch of its training stream,
    so Lightning's "Epoch 0/-2" would say nothing."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training steps"


class LogLines(pl.Callback):
    """Plain progress lines for logs and pipes, where a live progress bar would be noise."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and trainer.is_global_zero:
            loss = trainer.callback_metrics.get("train/loss")
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(f"step {step}/{trainer.max_steps}  loss {float(loss):.4f}  lr {lr:.3g}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        accuracy = trainer.callback_metrics.get("val/accuracy")
        if trainer.state.fn == "fit" and accuracy is not None and trainer.is_global_zero:
            print(f"step {trainer.global_step}  test accuracy {100 * float(accuracy):.2f}%", flush=True)
