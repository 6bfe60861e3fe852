"""Learning-rate schedules: each is a multiple of the optimizer's learning rate as a function of the step.

A schedule is a plain callable object, so `torch.optim.lr_scheduler.LambdaLR` steps it after every
optimizer step and a checkpoint stores its settings as plain values.
"""
from __future__ import annotations

import math


class Exponential:
    """decay_rate^(step / decay_steps), the exponent floored when staircase: TensorFlow's exponential_decay,
    the recipe's 0.1 * 0.9^floor(step / 250)."""

    def __init__(self, decay_rate: float = 0.9, decay_steps: int = 250, staircase: bool = True):
        self.decay_rate, self.decay_steps, self.staircase = decay_rate, decay_steps, staircase

    def __call__(self, step: int) -> float:
        exponent = step // self.decay_steps if self.staircase else step / self.decay_steps
        return self.decay_rate**exponent


class Triangle:
    """Piecewise linear: `start` at step 0, 1 at step peak * total_steps, `end` at the last step."""

    def __init__(self, total_steps: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07):
        self.total_steps, self.start, self.peak, self.end = total_steps, start, peak, end

    def __call__(self, step: int) -> float:
        top = max(1, round(self.peak * self.total_steps))
        if step <= top:
            return self.start + (1 - self.start) * step / top
        return 1 + (self.end - 1) * min(1.0, (step - top) / max(1, self.total_steps - top))


class Cosine:
    """A linear warm-up from 0 to 1 over warmup_steps, then half a cosine down to `final` at total_steps."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, final: float = 0.0):
        self.total_steps, self.warmup_steps, self.final = total_steps, warmup_steps, final

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


class Constant:
    """The optimizer's learning rate throughout."""

    def __call__(self, step: int) -> float:
        return 1.0


class MultiStep:
    """The learning rate times gamma at each milestone, the milestones fractions of total_steps (He et al.'s
    0.1 at 32k and 48k of 64k steps is milestones [0.5, 0.75]), so that a shorter run keeps the shape. The
    first warmup_steps take warmup_factor (the paper's 0.01 start for its 110-layer network)."""

    def __init__(self, total_steps: int, milestones=(0.5, 0.75), gamma: float = 0.1, warmup_steps: int = 0,
                 warmup_factor: float = 0.1):
        self.total_steps, self.milestones, self.gamma = total_steps, list(milestones), gamma
        self.warmup_steps, self.warmup_factor = warmup_steps, warmup_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor
        return self.gamma ** sum(step >= round(fraction * self.total_steps) for fraction in self.milestones)
