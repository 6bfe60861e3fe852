"""Every option of every config group, and every experiment preset, composes and builds its objects
(network, data module, optimizer, schedule, loss, loggers, callbacks, trainer) without training; and
settings a run cannot use stop before any work with one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT
from deepcnn import cli, settings  # noqa: F401  (cli registers the config resolvers)
from deepcnn.experiment import build_callbacks, build_loggers, build_module, build_trainer

CONF = ROOT / "conf"
GROUPS = ("data", "model", "optimizer", "scheduler", "loss", "logger", "callbacks", "trainer", "debug", "experiment")
OPTIONAL_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb", "many": "mlflow"}
CLASSES = ["cat", "dog", "ship"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def build_everything(cfg, tmp_path: Path):
    settings.check(cfg)
    module = build_module(cfg, CLASSES)
    optimizer = module.configure_optimizers()
    datamodule = __import__("hydra").utils.instantiate(cfg.data)
    loggers = build_loggers(cfg.logger)
    callbacks = build_callbacks(cfg.callbacks, "val", bool(loggers))
    trainer = None
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():
        trainer = build_trainer(cfg.trainer, tmp_path, callbacks, loggers)
    return module, optimizer, datamodule, loggers, callbacks, trainer


CASES = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_builds(group, option, tmp_path):
    needs = OPTIONAL_PACKAGES.get(option) if group == "logger" else None
    if needs:
        pytest.importorskip(needs, reason=f"logger={option} needs the optional extra '{needs}' (.ci/run installs it)")
    cfg = composed(tmp_path, f"{group}={option}")
    module, optimizer, datamodule, loggers, callbacks, trainer = build_everything(cfg, tmp_path)
    assert isinstance(optimizer["optimizer"], torch.optim.Optimizer)
    schedule = optimizer["lr_scheduler"]["scheduler"]
    assert schedule.get_last_lr()[0] == pytest.approx(optimizer["optimizer"].param_groups[0]["lr"])
    logits = module(torch.zeros(2, 3, cfg.data.crop_size, cfg.data.crop_size).contiguous(
        memory_format=torch.channels_last))
    assert logits.shape == (2, len(CLASSES))
    if group == "logger" and option != "none":
        assert loggers
    if trainer is not None:
        chosen = {type(c).__name__ for c in callbacks}
        assert chosen <= {type(c).__name__ for c in trainer.callbacks}


PRESET_CASES = [(e, g, o) for e in options("experiment") for g in ("model", "optimizer", "scheduler", "loss")
                for o in options(g)]


@pytest.mark.parametrize("experiment,group,option", PRESET_CASES, ids=[f"{e}-{g}={o}" for e, g, o in PRESET_CASES])
def test_every_option_composes_with_every_preset(experiment, group, option, tmp_path):
    cfg = composed(tmp_path, f"experiment={experiment}", f"{group}={option}")
    settings.check(cfg)
    assert cfg[group]["_target_"] == composed(tmp_path, f"{group}={option}")[group]["_target_"]
    build_module(cfg, CLASSES).configure_optimizers()
