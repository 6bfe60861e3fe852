"""Every setting of a training run checked in one place, before any data is read: a bad value stops the
run with one line naming the key and what it may be (exit code 2)."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from deepcnn.errors import SettingsError
from deepcnn.models import whitening_width
from deepcnn.module import build_model

ABSENT = object()
# Lightning's names for float64 training.
DOUBLE_PRECISION = {"64", "64-true", "double"}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int, high: int | None = None) -> tuple[Callable[[Any], bool], str]:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    return (lambda v: is_int(v) and v >= low and (high is None or v <= high)), allowed


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    def ok(v):
        return (is_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"a number in {left}{low}, {high}{right}" if high is not None else \
        f"a number {'>' if low_open else '>='} {low}"
    return ok, allowed


BOOLEAN = (lambda v: isinstance(v, bool), "true or false")
POSITIVE_INTEGERS = (lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(is_int(x) and x >= 1 for x in v),
                     "a non-empty list of integers >= 1")
CONTRAST = (lambda v: v is None or (isinstance(v, (list, ListConfig)) and len(v) == 2 and all(is_number(x) for x in v)
                                    and 0 <= v[0] <= v[1]),
            "null or [low, high] with 0 <= low <= high")

# key -> (test, what it may be). Keys a config does not have (a scheduler without decay_rate) are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # trainer keys first: other defaults are computed from max_steps.
    "trainer.max_steps": integer(1),
    "trainer.log_every_n_steps": integer(1),
    # The lookahead averaging, the progress lines and the data stream all count optimizer steps.
    "trainer.accumulate_grad_batches": (lambda v: v == 1, "1 (deepcnn counts optimizer steps)"),
    "trainer.precision": (lambda v: str(v) not in DOUBLE_PRECISION, "auto, 32-true, bf16-mixed or 16-mixed (deepcnn's "
                          "data and layers are float32: it does not train in 64 bits)"),
    "seed": integer(0),
    "budget_s": (lambda v: v is None or (is_number(v) and v > 0), "null or a number of seconds > 0"),
    "tta": integer(0, 2),
    "checkpoint_every_n_steps": integer(1),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.crop_size": integer(8, 32),
    "data.early_steps": integer(0),
    "data.early_size": (lambda v: v is None or (is_int(v) and 8 <= v <= 32), "null or an integer from 8 to 32"),
    "data.val_size": integer(0),
    "data.split_seed": integer(0),
    "data.prefetch": integer(1),
    "data.download": BOOLEAN,
    "data.in_memory": BOOLEAN,
    "data.augment.random_crop": BOOLEAN,
    "data.augment.alternate_flips": BOOLEAN,
    "data.augment.pad": integer(0, 31),
    "data.augment.flip_prob": number(0, 1),
    "data.augment.max_brightness": number(0),
    "data.augment.contrast": CONTRAST,
    "model.widths": POSITIVE_INTEGERS,
    "model.hidden": POSITIVE_INTEGERS,
    "model.channels": integer(1),
    "model.convs_per_block": integer(1),
    # The fast network's whitening keeps every filter a 2x2 patch of RGB gives: fewer would drop some silently,
    # more cannot be filled.
    "model.whiten_width": (lambda v: v == whitening_width(), f"{whitening_width()}, the filters the fast network's "
                           "2x2 whitening of 3 channels gives"),
    "optimizer.lr": number(0, low_open=True),
    "optimizer.momentum": number(0, 1, high_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.nesterov": BOOLEAN,
    "scheduler.decay_rate": number(0, low_open=True),
    "scheduler.decay_steps": integer(1),
    "scheduler.staircase": BOOLEAN,
    "scheduler.total_steps": integer(1),
    "scheduler.warmup_steps": integer(0),
    "loss.label_smoothing": number(0, 1, high_open=True),
}
# Keys deepcnn passes to a network itself.
GIVEN_TO_MODELS = {"num_classes": "the dataset's classes", "input_size": "data.crop_size"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def check_value(key: str, value, test: Callable[[Any], bool], allowed: str) -> None:
    if not test(value):
        raise SettingsError(f"{key}: got {value!r}; it must be {allowed}")


def check_keys(path: str, node: DictConfig, extra: set[str] = frozenset()) -> None:
    """The keys of a `_target_` config must be arguments of what it names (nested targets are checked too)."""
    target = hydra.utils.get_object(node["_target_"])
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = (set(parameters) | set(extra)) - set(GIVEN_TO_MODELS if path == "model" else ())
    for key in node:
        if key in HYDRA_KEYS:
            continue
        if path == "model" and key in GIVEN_TO_MODELS:
            raise SettingsError(f"model.{key}: set by deepcnn from {GIVEN_TO_MODELS[key]}; leave it out")
        if key not in accepted:
            choices = ", ".join(sorted(k for k in accepted if k not in ("params", "self")))
            raise SettingsError(f"{path}.{key}: unknown key; {node['_target_']} takes {choices}")
        child = node[key]
        if isinstance(child, DictConfig) and "_target_" in child:
            check_keys(f"{path}.{key}", child)


def check_network(cfg: DictConfig) -> None:
    """A network refuses its own bad settings when it is built: built here on the meta device (no memory, no
    data), so that they stop the run before any work. Ten classes stand in for the dataset's, not read yet."""
    try:
        with torch.device("meta"):
            build_model(OmegaConf.to_container(cfg.model, resolve=True), 10, cfg.data.crop_size)
    except InstantiationException as err:
        if isinstance(err.__cause__, SettingsError):
            raise err.__cause__ from None
    except Exception:  # noqa: BLE001 - other failures are the real build's to report, with the run's context
        pass


def check_added_keys(overrides: list[str], groups) -> None:
    """Hydra adds a key given with "+" wherever it is asked to; at the top level nothing would read it (keys
    in a group are checked against what the group's target takes, and "+group=option" chooses an option)."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith("+") and not key.startswith("++") and "." not in key and key[1:] not in groups:
            raise SettingsError(f"{key[1:]}: unknown setting (added by {override}); nothing reads it. The settings "
                                "are listed by: python src/train.py --cfg job")


def check(cfg: DictConfig, overrides: list[str] = ()) -> None:
    """`overrides`: the command line's, whose added keys are checked too."""
    if overrides:
        check_added_keys(overrides, HydraConfig.get().runtime.choices)
    if cfg.get("init_from") and cfg.get("ckpt_path") not in (None, "auto"):
        raise SettingsError(f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path}: choose one; ckpt_path resumes "
                            "a run where it stopped, init_from starts a new run from a checkpoint's weights")
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT:
            check_value(key, value, test, allowed)
    val_check = cfg.trainer.get("val_check_interval")
    if not (is_int(val_check) and 1 <= val_check <= cfg.trainer.max_steps):
        raise SettingsError(f"trainer.val_check_interval: got {val_check!r}; it must be an integer from 1 to "
                            f"trainer.max_steps ({cfg.trainer.max_steps})")
    for group, extra in (("model", set()), ("optimizer", {"param_groups"}), ("scheduler", set()), ("loss", set()),
                         ("data", set())):
        check_keys(group, cfg[group], extra)
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is None:
            continue
        if not (isinstance(callback, DictConfig) and "_target_" in callback):
            raise SettingsError(f"callbacks.{name}: not a chosen callback (it has no _target_); choose callbacks "
                                f"with callbacks=[default,{name}] when conf/callbacks/{name}.yaml exists")
        check_keys(f"callbacks.{name}", callback)
    check_network(cfg)
