"""Lookahead weight averaging: an exponential moving average of the weights that the network is
pulled back to every few steps, and takes over at the last step (airbench's scheme)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


class Lookahead(pl.Callback):
    """Every `every` steps: average <- decay * average + (1 - decay) * weights, then weights <- average.

    decay grows as max_decay * (step / max_steps)^power: no averaging early, when the weights move
    far, and strong averaging late. At the last step the weights become the average, before that
    step's validation and checkpoint.
    """

    def __init__(self, every: int = 5, max_decay: float = 0.95**5, power: float = 3.0):
        self.every, self.max_decay, self.power = every, max_decay, power
        self.average: dict[str, torch.Tensor] | None = None

    def decay(self, step: int, max_steps: int) -> float:
        return self.max_decay * (step / max_steps) ** self.power

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float) -> None:
        state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        for key, value in state.items():
            # A resumed checkpoint's average is read onto the CPU; the weights may live on a GPU. Averages from
            # when filters were stored as matrices take the filters' shape.
            average = self.average[key] = self.average[key].to(value.device).reshape(value.shape)
            average.lerp_(value, 1 - decay)
            value.copy_(average)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step >= trainer.max_steps:
            self.update(pl_module.model, 1.0)
        elif step % self.every == 0:
            self.update(pl_module.model, self.decay(step, trainer.max_steps))

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step < trainer.max_steps and self.average is not None:
            self.update(pl_module.model, 1.0)

    def state_dict(self):
        return {"average": self.average}

    def load_state_dict(self, state_dict):
        self.average = state_dict["average"]
