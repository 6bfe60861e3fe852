"""Optimizers from config: parameter groups described by rules, and Muon beside a second optimizer.

An optimizer config is a partial (`_partial_: true`) that takes the parameter groups, plus a list of
rules under `param_groups`. A rule selects parameters by what they are and scales their learning rate
or weight decay, so a preset's groups live in its YAML, not in code:

    param_groups:
      - {select: norm_biases, lr_scale: 64, weight_decay_scale: 0.015625}
      - {select: norms_and_biases, weight_decay: 0.0}
      - {select: linear_weights, rest: true}   # optimizer=muon: these go to its second optimizer

The first rule that selects a parameter decides its group; the rest keep the optimizer's settings.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

from deepcnn.errors import SettingsError

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
SELECTORS: dict[str, Callable[[nn.Module, str, torch.Tensor], bool]] = {
    "norm_biases": lambda owner, name, p: isinstance(owner, NORMS) and name == "bias",
    "norms_and_biases": lambda owner, name, p: isinstance(owner, NORMS) or name == "bias",
    "matrices": lambda owner, name, p: p.ndim >= 2 and not isinstance(owner, NORMS),
    "linear_weights": lambda owner, name, p: isinstance(owner, nn.Linear) and name == "weight",
    "all": lambda owner, name, p: True,
}
RULE_KEYS = {"select", "lr_scale", "weight_decay", "weight_decay_scale", "rest"}


def check_rules(rules: Iterable[dict]) -> list[dict]:
    rules = [dict(rule) for rule in rules]
    for number, rule in enumerate(rules):
        unknown = set(rule) - RULE_KEYS
        if unknown:
            raise SettingsError(f"optimizer.param_groups[{number}]: unknown key {sorted(unknown)[0]!r}; "
                                f"a rule takes {', '.join(sorted(RULE_KEYS))}")
        if rule.get("select") not in SELECTORS:
            raise SettingsError(f"optimizer.param_groups[{number}].select: got {rule.get('select')!r}; "
                                f"choose one of {', '.join(SELECTORS)}")
    return rules


def parameter_groups(model: nn.Module, rules: Iterable[dict]) -> list[dict]:
    """The trainable parameters of `model` in groups: first those no rule selects (they keep the optimizer's
    settings, so group 0's learning rate is the one a run reports), then one per rule that selects any.
    A group carries its rule's options; `scale_groups` turns the scales into values once the optimizer has
    filled in its own settings."""
    rules = check_rules(rules)
    groups = [{"params": []}] + [{"params": [], **{k: v for k, v in rule.items() if k != "select"}} for rule in rules]
    for owner in model.modules():
        for name, p in owner.named_parameters(recurse=False):
            if p.requires_grad:
                number = next((i + 1 for i, rule in enumerate(rules) if SELECTORS[rule["select"]](owner, name, p)),
                              0)
                groups[number]["params"].append(p)
    return [group for group in groups if group["params"]]


def scale_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for group in optimizer.param_groups:
        if "rest" in group:
            raise SettingsError("optimizer.param_groups: `rest` says which parameters optimizer=muon gives its "
                                f"second optimizer; {type(optimizer).__name__} has none")
        group["lr"] *= group.pop("lr_scale", 1.0)
        group["weight_decay"] = group.get("weight_decay", 0.0) * group.pop("weight_decay_scale", 1.0)
    return optimizer


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: one closure evaluation, then each
    steps its own parameters. Its param_groups are theirs, so a learning-rate scheduler drives all of
    them, and one state dict holds all of their state."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([group for optimizer in optimizers for group in optimizer.param_groups], {})
        self._share()

    def _share(self) -> None:
        start = 0
        for optimizer in self.optimizers:
            count = len(optimizer.param_groups)
            optimizer.param_groups = self.param_groups[start : start + count]
            optimizer.state = self.state
            start += count

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


def as_matrices(param: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`param` and tensors laid out as it is (its gradient, its momentum) as out_channels x rest views, the
    columns in the order of `param`'s memory (channels innermost for a channels-last filter bank). Which order
    does not matter: the orthogonalized update of a matrix with permuted columns is the update with its
    columns permuted alike. A tensor laid out otherwise cannot be viewed so and raises."""
    if param.ndim == 2:
        return (param, *others)
    order = [0, *sorted(range(1, param.ndim), key=lambda d: -param.stride(d))]
    return tuple(t.permute(order).view(t.shape[0], -1) for t in (param, *others))


class Muon(torch.optim.Muon):
    """torch.optim.Muon for matrices and for convolution filters, whose updates are orthogonalized as
    out_channels x (in_channels * kh * kw) matrices, as airbench94_muon does.

    It can also first rescale each weight to Frobenius norm sqrt(out_channels) (every row of unit norm on
    average), as airbench94_muon does. For weights followed by BatchNorm the scale changes nothing in the
    output, but it fixes the size of each update relative to the weight, which would otherwise shrink as
    the weights grow."""

    def __init__(self, params, *args, normalize_weights: bool = False, **kwargs):
        groups = list(params)
        groups = groups if not groups or isinstance(groups[0], dict) else [{"params": groups}]
        # torch.optim.Muon refuses anything but a matrix in its constructor: it is built on a stand-in matrix and
        # given the real groups after, checked here instead.
        super().__init__([torch.zeros(1, 1)], *args, **kwargs)
        self.param_groups, self.state = [], defaultdict(dict)
        for group in groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices and filter banks; got a parameter of shape {tuple(p.shape)}")
            self.add_param_group(group)
        self.normalize_weights = normalize_weights

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        for p in group["params"]:
            buffer = self.state[p].get("momentum_buffer")
            if buffer is not None and buffer.shape != p.shape:
                # Checkpoints from when deepcnn stored filters as out x (in * kh * kw) matrices.
                self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffer.reshape(p.shape))
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        for i, tensors in enumerate(zip(params_with_grad, grads, muon_momentum_bufs)):
            params_with_grad[i], grads[i], muon_momentum_bufs[i] = as_matrices(*tensors)
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        if self.normalize_weights:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
        return super().step(closure)


def muon(params: Iterable[dict], rest: Callable[[list[dict]], torch.optim.Optimizer], lr: float = 0.02,
         momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
         adjust_lr_fn: str | None = None, normalize_weights: bool = False) -> Combined:
    """Muon (above) for the weights of linear layers and the filters of convolutions (every parameter of two
    or more dimensions), `rest` (a partial optimizer) for every other parameter and for those a rule with
    `rest: true` selects."""
    for_muon, to_rest = [], []
    for group in params:
        (to_rest if group.pop("rest", False) else for_muon).append(group)
    matrices = [{**g, "params": [p for p in g["params"] if p.ndim >= 2]} for g in for_muon]
    others = [{**g, "params": [p for p in g["params"] if p.ndim < 2]} for g in for_muon] + to_rest
    parts = [Muon([g for g in matrices if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov,
                  weight_decay=weight_decay, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                  normalize_weights=normalize_weights)]
    if any(g["params"] for g in others):
        parts.append(rest([g for g in others if g["params"]]))
    return Combined(parts)
