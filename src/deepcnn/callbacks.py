"""The callbacks every run has, whatever the config adds: timing, stopping on a signal, stopping on a
diverging loss, and progress. Those a user chooses (best checkpoints, early stopping, learning-rate
monitor, lookahead averaging) come from conf/callbacks/."""
from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, RichProgressBar

from deepcnn.errors import DivergenceError

log = logging.getLogger("deepcnn")


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

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 1) if self.seconds else None


class StopRequested(Exception):
    """Raised out of the training loop once a signal's checkpoint is written: no further validation,
    no test pass, no results that would look final."""

    def __init__(self, signum: int, step: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = signum, step


class GracefulStop(Checkpoint):
    """On SIGINT or SIGTERM, finish the current step, write the last checkpoint and stop.

    A Checkpoint callback, so Lightning runs it after every other callback of the step: the checkpoint
    holds the step's lookahead averaging and everything else the step did. The handlers stay installed
    until `restore` (the end of the whole run), so a signal during the final evaluation is noticed too:
    `signal` says which one came.

    With several processes the decision is taken together after every step: a signal to any process stops
    them all after the same step, with one checkpoint and the same exit code. `requeue` names signals
    (submitit's before a time limit) that are handed on to whoever handled them before, once the checkpoint
    is written; after training they go there directly: the requeued job finds the final checkpoint and
    only evaluates it.
    """

    def __init__(self, checkpoint_path: Path, requeue: tuple[int, ...] = (), received: list[int] | None = None):
        self.checkpoint_path = Path(checkpoint_path)
        self.requeue = requeue
        self.signal: int | None = None
        # Signals that came before training started, recorded by whoever handled them then (a sweep's handler
        # while its run was being set up): the run stops after its first step.
        self.received = received if received is not None else []
        # The handlers in place before the run (a sweep's, between its runs), put back when it ends: not
        # those Lightning installs for the length of each fit, which would outlive it and ignore a signal.
        self._previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, *requeue)}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\ndeepcnn: {signal.Signals(signum).name} received; stopping after this step", file=sys.stderr)

    def _install(self, *signums: int):
        # Lightning registers its own handlers at the start of every fit, validate and test: installed
        # again at the start of each, these take precedence.
        for signum in signums:
            signal.signal(signum, self._handle)

    def on_train_start(self, trainer, pl_module):
        self._install(signal.SIGINT, signal.SIGTERM, *self.requeue)
        if self.received and self.signal is None:
            self.signal = self.received[0]

    def on_validation_start(self, trainer, pl_module):
        self._install(signal.SIGINT, signal.SIGTERM)

    def on_test_start(self, trainer, pl_module):
        self._install(signal.SIGINT, signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        signum = agreed_signal(trainer, self.signal or 0)
        if signum:
            # Collective: every process calls it, rank 0 writes.
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
            # Lightning logs a step's metrics after the callbacks' hooks, which this one leaves by raising: logged
            # here, so the curves of a run stopped and resumed hold every step once (it has no public call for it).
            trainer._logger_connector.on_batch_end()
            trainer._logger_connector.update_train_step_metrics()
            if signum in self.requeue:
                self.restore()
                signal.raise_signal(signum)
            raise StopRequested(signum, trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        for signum in self.requeue:
            if self._previous[signum] is not None:
                signal.signal(signum, self._previous[signum])

    def restore(self):
        for signum, handler in self._previous.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)


def agreed_signal(trainer: pl.Trainer, signum: int) -> int:
    """The signal any of the run's processes received (0: none; the highest-numbered, if several), the same in
    all of them: one all-reduce of one number a step, none when there is one process. (Lightning's
    strategy.reduce would add a barrier before it, doubling the cost.)"""
    if trainer.world_size == 1:
        return signum
    flag = torch.tensor([signum], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


class DivergenceStop(pl.Callback):
    """Stops the run when the loss is no longer finite, naming the step. Every step on the CPU; on a GPU
    every `every` steps, since reading the loss back waits for the device."""

    def __init__(self, checkpoint_path: Path, every: int):
        self.checkpoint_path, self.every = Path(checkpoint_path), every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if pl_module.device.type != "cpu" and step % self.every:
            return
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            when = f"at step {step}" if pl_module.device.type == "cpu" else f"by step {step}"
            kept = (f"the last checkpoint ({self.checkpoint_path}) is kept" if self.checkpoint_path.is_file()
                    else "no checkpoint had been written yet")
            raise DivergenceError(f"loss became {loss.item()} {when}; stopped, {kept} (lower optimizer.lr)")


class StepProgressBar(RichProgressBar):
    """The rich progress bar, titled in steps: a run is one endless epoch of its training stream,
    so Lightning's "Epoch 0/-2" would say nothing."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training steps"


class LogLines(pl.Callback):
    """Progress lines through logging (the console and the run's log file), where a live bar would be noise."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and trainer.is_global_zero:
            loss = trainer.callback_metrics.get("train/loss")
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            log.info(f"step {step}/{trainer.max_steps}  loss {float(loss):.4f}  lr {lr:.3g}")

    def on_validation_end(self, trainer, pl_module):
        label = pl_module.validation_label
        accuracy = trainer.callback_metrics.get(f"{label}/accuracy")
        if trainer.state.fn == "fit" and accuracy is not None and trainer.is_global_zero:
            name = "validation" if label == "val" else "test"
            log.info(f"step {trainer.global_step}  {name} accuracy {100 * float(accuracy):.2f}%")
