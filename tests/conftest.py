"""Shared test helpers: small datasets written on the spot, the shared CIFAR-10 copy, and CLI runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omegaconf import OmegaConf

from deepcnn.module import Classifier
from deepcnn.records import CIFAR10, PIXELS

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPCNN_DATA", ROOT.parent / "shared" / "cifar10"))


def write_records(path: Path, labels, pixels: np.ndarray | None = None, label_bytes: int = 1) -> np.ndarray:
    """Write CIFAR binary records; returns the uint8 pixels (n, 3072) written."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(len(labels), -1)
    if pixels is None:
        rng = np.random.default_rng(len(labels))
        pixels = rng.integers(0, 256, size=(len(labels), PIXELS), dtype=np.uint8)
    path.write_bytes(np.concatenate([labels[:, :label_bytes], pixels.reshape(len(labels), PIXELS)], axis=1).tobytes())
    return pixels


def write_dataset(root: Path, classes=("cat", "dog", "ship"), train_files: int = 2, per_file: int = 64,
                  test_records: int = 32, seed: int = 0) -> Path:
    """A small dataset in the CIFAR-10 binary layout under root/cifar-10-batches-bin."""
    folder = root / CIFAR10.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, train_files + 1):
        write_records(folder / f"data_batch_{i}.bin", rng.integers(0, len(classes), per_file))
    write_records(folder / "test_batch.bin", rng.integers(0, len(classes), test_records))
    (folder / "batches.meta.txt").write_text("\n".join(classes) + "\n\n")
    return folder


def group_config(group: str, option: str) -> dict:
    """A config group option as written in conf/, e.g. group_config("optimizer", "sgd")."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml"))


def make_classifier(classes=("cat", "dog", "ship"), model: dict | None = None, input_size: int = 24,
                    **settings) -> Classifier:
    """A Classifier with the recipe's defaults (a narrow recipe network unless `model` is given)."""
    model = model or {"_target_": "deepcnn.models.RecipeCNN", "channels": 8, "hidden": [16, 8]}
    parts = {"optimizer": group_config("optimizer", "sgd"), "scheduler": group_config("scheduler", "exponential"),
             "loss": group_config("loss", "cross_entropy"), **settings}
    return Classifier(model=model, classes=list(classes), input_size=input_size, **parts)


def save_checkpoint(module: Classifier, path: Path) -> Path:
    """A checkpoint of `module` holding what load_classifier reads."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """An untrained network's checkpoint."""
    return save_checkpoint(make_classifier(["cat", "dog"]), tmp_path / "model.ckpt")


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    write_dataset(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / CIFAR10.folder / "test_batch.bin").is_file():
        pytest.skip(f"the shared CIFAR-10 copy is not at {SHARED_DATA} (set DEEPCNN_DATA to its folder)")
    return SHARED_DATA


def run_cli(script: str, *overrides: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None):
    """Run src/<script> in a subprocess, as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
