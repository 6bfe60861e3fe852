"""What every benchmark shares: where the data is, a preset's composed config, one deepcnn training run
in a fresh process, and one run of the record-holding peer."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = Path(os.environ.get("DEEPCNN_DATA", SHARED / "cifar10"))


def compose_config(overrides: list[str]):
    """train.yaml composed with these overrides, as `python src/train.py` would (no run directory)."""
    from hydra import compose, initialize_config_dir

    from deepcnn import cli  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["run_dir=unused", *overrides])


def train(run_dir: Path, overrides: list[str], data: Path = DATA) -> tuple[dict, float]:
    """`python src/train.py` with these overrides: its results.json and its wall time in seconds, from
    the command's start to its exit (interpreter start-up, data loading and the final evaluation included)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), f"data.data_dir={data}",
                           f"hydra.run.dir={run_dir}", *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"train.py {' '.join(overrides)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "results.json").read_text()), wall


def run_peer(script: Path, epochs: float, data: Path) -> tuple[float, float]:
    """(accuracy, wall seconds from the command to its final accuracy) of one seed-0 run of the record-holding
    peer, airbench94_muon.py as ../shared/anchors/airbench/port.py ports it to the CPU."""
    env = {**os.environ, "DATA": str(data / "cifar-10-batches-bin"), "EPOCHS": str(epochs), "SEED": "0"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    found = re.search(r"RESULT tta_val_acc=([0-9.]+)", done.stdout)
    if done.returncode or not found:
        sys.exit(f"{script} (EPOCHS={epochs}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(found.group(1)), wall
