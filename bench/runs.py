"""What every benchmark shares: where the data is, a preset's composed config, and one deepcnn training run
in a fresh process."""
from __future__ import annotations

import json
import os
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
