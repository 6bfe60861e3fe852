"""Peak memory of training on CIFAR-10 against a synthetic dataset ten times its size, same layout.

Records are read from disk batch by batch, so the larger dataset should cost only its per-record
labels and the epoch's permutation (a few bytes a record), not its pixels. Each run is a fresh
train.py process, measured twice by the kernel: its peak resident set size when its last training
step is done (VmHWM, read as it prints that step), and over the whole run, test pass included
(wait4's ru_maxrss). The synthetic copy goes to a temporary folder that is removed afterwards.

    .venv/bin/python bench/streaming_memory.py --steps 200
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepcnn.records import CIFAR10, RECORD_SIZE

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES, RECORDS_PER_FILE, TEST_RECORDS, CLASSES = 5, 10_000, 10_000, 10
LIMIT = 1.25


def write_synthetic(folder: Path, scale: int, seed: int = 0) -> int:
    """CIFAR-10's layout with scale times its files' records; returns the bytes written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}.bin", RECORDS_PER_FILE) for i in range(1, scale * TRAIN_FILES + 1)]
    files.append((CIFAR10.test_file, scale * TEST_RECORDS))
    for name, count in files:
        with open(folder / name, "wb") as out:
            for start in range(0, count, RECORDS_PER_FILE):
                n = min(RECORDS_PER_FILE, count - start)
                records = np.frombuffer(rng.bytes(n * RECORD_SIZE), dtype=np.uint8).reshape(n, RECORD_SIZE).copy()
                records[:, 0] %= CLASSES
                out.write(records.tobytes())
    (folder / "batches.meta.txt").write_text("".join(f"class{i}\n" for i in range(CLASSES)))
    return sum((folder / name).stat().st_size for name, _ in files)


def peak_rss_of_training(data: Path, steps: int, run_dir: Path, overrides: list[str]) -> tuple[int, int, float]:
    """Peak resident bytes of one train.py run on data: through its training steps, and through the
    whole run (which ends with a pass over the test set); and the run's seconds."""
    command = [sys.executable, str(ROOT / "src" / "train.py"), f"data.data_dir={data}", "data.download=false",
               f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={steps}",
               f"trainer.val_check_interval={steps}", "data.val_size=0", f"hydra.run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    training_peak = 0
    for line in process.stdout:
        # The one progress line comes after the last training step, before the test pass begins.
        if line.startswith(f"step {steps}/{steps}"):
            training_peak = high_water_mark(process.pid)
    _, status, usage = os.wait4(process.pid, 0)
    if code := os.waitstatus_to_exitcode(status):
        raise SystemExit(f"training on {data} failed with exit status {code}")
    return training_peak, usage.ru_maxrss * 1024, time.perf_counter() - started


def high_water_mark(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def dataset_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("DEEPCNN_DATA", ROOT.parent / "shared" / "cifar10")))
    parser.add_argument("--tmp", type=Path, default=None, help="where the synthetic copy is written")
    parser.add_argument("overrides", nargs="*", default=["trainer.precision=32"],
                        help="train.py overrides for both runs (default: trainer.precision=32)")
    args = parser.parse_args()
    cifar = args.data / CIFAR10.folder
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="streaming-memory-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        synthetic_bytes = write_synthetic(tmp / "synthetic" / CIFAR10.folder, args.scale)
        print(f"synthetic dataset: {synthetic_bytes / 2**30:.2f} GiB ({synthetic_bytes / dataset_bytes(cifar):.1f}x "
              f"CIFAR-10's {dataset_bytes(cifar) / 2**20:.0f} MiB), written in {time.perf_counter() - started:.0f} s",
              flush=True)
        figures = {}
        for name, data in (("CIFAR-10", args.data), (f"{args.scale}x synthetic", tmp / "synthetic")):
            figures[name] = peak_rss_of_training(data, args.steps, tmp / f"run-{len(figures)}", args.overrides)
            training, whole, seconds = figures[name]
            print(f"{name:>14}: peak RSS {training / 2**20:7.1f} MiB training, {whole / 2**20:7.1f} MiB whole run "
                  f"({args.steps} steps, then the test set; {seconds:.0f} s)", flush=True)
    small, large = figures.values()
    ratios = [big / base for big, base in zip(large[:2], small[:2])]
    print(f"ratio {ratios[0]:.3f} training, {ratios[1]:.3f} whole run (limit {LIMIT}); "
          f"overrides: {' '.join(args.overrides)}")
    if max(ratios) > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
