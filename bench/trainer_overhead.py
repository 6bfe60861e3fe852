"""The recipe preset's full run against its bare training step: what Lightning, the data stream, the
distortions and the logging cost on top of the arithmetic, in one sitting.

    .venv/bin/python bench/trainer_overhead.py --steps 600 --rounds 2

The bare step is the same network, loss, optimizer and schedule (built from the same config, in the
same precision) stepped in a plain loop over one fixed batch of already-distorted real images: no
data reading, no distortion, no Lightning. The full run is `python src/train.py` for the same number
of steps (all 50,000 images, validation only at the end), its training images/s as it reports them.
Runs alternate, so both see the same machine load; the figures are the ratio of the medians and the median
of each round's own ratio (which a host that drifts between rounds moves less).

Each round also runs both with the network shrunk to almost nothing (`--empty`, the recipe's model by
default): there the arithmetic leaves the cores free, and the difference between the two is what the run
itself costs a step (Lightning, the callbacks, reading and distorting), apart from what it takes from the
arithmetic when the two share the cores.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from runs import DATA, compose_config, train
from deepcnn.allocator import keep_freed_memory
from deepcnn.experiment import build_module
from deepcnn.precision import detect_precision


def bare_rate(overrides: list[str], steps: int, data: Path) -> float:
    """Training images/s of the plain loop, after 20 warm-up steps."""
    cfg = compose_config([f"data.data_dir={data}", "data.val_size=0", *overrides])
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    module = build_module(cfg, datamodule.classes)
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    images, labels = next(datamodule.ready_batches([datamodule.train_dataloader().batch(0)]))
    precision, _ = detect_precision(cfg.trainer.precision, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    module.train()

    def step():
        with autocast:
            loss = module.loss(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    for _ in range(20):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(labels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--empty", nargs="*", default=["model.channels=1", "model.hidden=[1,1]"],
                        help="overrides that shrink the network to almost nothing, for the recipe's model by default; "
                             "another preset's model needs its own, and --empty alone skips the measurement")
    parser.add_argument("overrides", nargs="*", help="overrides for both, e.g. experiment=fast")
    args = parser.parse_args()
    keep_freed_memory()
    ms = {"bare": [], "full": [], "empty bare": [], "empty full": []}
    batch = compose_config(args.overrides).data.batch_size
    networks = [("", [])] + ([("empty ", args.empty)] if args.empty else [])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, extra in networks:
                overrides = [*args.overrides, *extra]
                ms[f"{label}bare"].append(1000 * batch / bare_rate(overrides, args.steps, args.data))
                result, _ = train(Path(tmp) / f"run{r}{label.strip()}",
                                  [f"trainer.max_steps={args.steps}", "data.val_size=0",
                                   f"trainer.val_check_interval={args.steps}", *overrides], args.data)
                ms[f"{label}full"].append(1000 * batch / result["images_per_second"])
            line = f"round {r + 1}: bare step {ms['bare'][-1]:6.2f} ms   full run {ms['full'][-1]:6.2f} ms   " \
                   f"slower by {100 * (1 - ms['bare'][-1] / ms['full'][-1]):5.1f}%"
            if args.empty:
                line += f"   empty network: bare {ms['empty bare'][-1]:5.2f} ms, full {ms['empty full'][-1]:5.2f} ms"
            print(line, flush=True)
    median = {key: statistics.median(values) for key, values in ms.items() if values}
    paired = statistics.median(1 - b / f for f, b in zip(ms["full"], ms["bare"]))
    print(f"{args.steps} steps, {args.rounds} rounds: bare step {median['bare']:.2f} ms, full run {median['full']:.2f} "
          f"ms: the run is {100 * (1 - median['bare'] / median['full']):.1f}% slower (median of the rounds' own "
          f"ratios: {100 * paired:.1f}%)")
    if args.empty:
        own = statistics.median(f - b for f, b in zip(ms["empty full"], ms["empty bare"]))
        taken = median["full"] - median["bare"] - own
        print(f"of the full run's step: {100 * own / median['full']:.1f}% ({own:.2f} ms) is the run's own work, measured "
              f"with an almost empty network; {100 * taken / median['full']:.1f}% ({taken:.2f} ms) is what that work "
              "takes from the arithmetic when they share the cores")


if __name__ == "__main__":
    main()
