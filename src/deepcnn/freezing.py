"""Stopping the whitening layer's bias partway through training (airbench's scheme)."""
from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger("deepcnn")


class FreezeWhiteningBias(pl.Callback):
    """From `fraction` of the steps on, the whitening layer's bias (the only trained parameter before the
    first convolution) stays as it is, so the backward pass stops at that convolution: about 5% less work
    a step of the fast network. airbench94 trains that bias for the first 3 of its 8 epochs.

    Under DDP the bias keeps learning: DDP expects a gradient for every parameter at every step.
    """

    def __init__(self, fraction: float = 0.375):
        self.fraction = fraction
        self.bias = None

    def on_train_start(self, trainer, pl_module):
        whiten = getattr(pl_module.model, "whiten", None)
        self.bias = getattr(whiten, "bias", None)
        if self.bias is None:
            log.warning(f"freeze_whitening_bias: {type(pl_module.model).__name__} has no whitening bias to freeze")
        elif trainer.world_size > 1:
            log.warning("freeze_whitening_bias: under DDP the whitening bias keeps learning")
            self.bias = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.bias is not None and trainer.global_step >= self.fraction * trainer.max_steps:
            self.bias.requires_grad_(False)
            self.bias = None
