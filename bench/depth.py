"""What depth buys: experiment=resnet at several depths, the same epochs and schedule shape each, on the
validation split, each run in a fresh process on this machine.

    .venv/bin/python bench/depth.py --depths 20 32 44 56 --epochs 4

Prints one table row a depth (parameters, steps, training seconds, images/s, validation and test accuracy)
and appends each row, with this machine's CPU and the date, to bench/depth.jsonl; a long table can be
measured in parts (--depths 20 32, later --depths 44 56). Then plots every row of bench/depth.jsonl at
these epochs, accuracy against depth and against training time, into bench/depth.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import tempfile
from pathlib import Path

from runs import DATA, ROOT, train

TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 less the default validation split of 5,000
ROWS = ROOT / "bench" / "depth.jsonl"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def plot(rows: list[dict], epochs: float, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_depth, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for cpu in sorted({row["cpu"] for row in rows}):
        mine = sorted((row for row in rows if row["cpu"] == cpu), key=lambda row: row["depth"])
        accuracy = [100 * row["val_accuracy"] for row in mine]
        by_depth.plot([row["depth"] for row in mine], accuracy, "o-", label=cpu)
        by_time.plot([row["train_seconds"] / 60 for row in mine], accuracy, "o-", label=cpu)
        for row, value in zip(mine, accuracy):
            by_time.annotate(f"ResNet-{row['depth']}", (row["train_seconds"] / 60, value), fontsize=8,
                             textcoords="offset points", xytext=(4, -10))
    by_depth.set(xlabel="depth (layers)", ylabel="validation accuracy (%)", title=f"ResNets, {epochs:g} epochs each")
    by_time.set(xlabel="training time (minutes)", ylabel="validation accuracy (%)", title="what each depth costs")
    for axes in (by_depth, by_time):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"plotted {len(rows)} rows into {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32, 44, 56])
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "depth.png")
    args = parser.parse_args()
    steps = math.ceil(args.epochs * TRAIN_IMAGES / args.batch)
    cpu, day = cpu_name(), datetime.date.today().isoformat()
    print(f"{cpu}, {day}: experiment=resnet, {args.epochs:g} epochs = {steps} steps of {args.batch}")
    print("| depth | parameters | steps | training s | images/s | val accuracy | test accuracy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            result, wall = train(Path(tmp) / f"resnet{depth}", [
                "experiment=resnet", f"model.depth={depth}", f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}", f"data.batch_size={args.batch}"], args.data)
            row = {"depth": depth, "epochs": args.epochs, "batch": args.batch, "cpu": cpu, "date": day,
                   "parameters": result["parameters"], "steps": result["steps"],
                   "train_seconds": result["train_seconds"], "wall_seconds": round(wall, 1),
                   "images_per_second": result["images_per_second"], "val_accuracy": result["val_accuracy"],
                   "test_accuracy": result["test_accuracy"]}
            with ROWS.open("a") as rows:
                rows.write(json.dumps(row) + "\n")
            print(f"| {depth} | {row['parameters']:,} | {row['steps']:,} | {row['train_seconds']:,.0f} | "
                  f"{row['images_per_second']:,.0f} | {100 * row['val_accuracy']:.2f}% | "
                  f"{100 * row['test_accuracy']:.2f}% |", flush=True)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    plot([row for row in rows if row["epochs"] == args.epochs and row["batch"] == args.batch], args.epochs,
         args.plot)


if __name__ == "__main__":
    main()
