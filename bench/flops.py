"""Each preset's training FLOP/s as a fraction of this machine's bf16 matrix-multiply peak, one sitting.

    .venv/bin/python bench/flops.py
    .venv/bin/python bench/flops.py --presets fast --steps 60

The peak: the best of several bf16 square matrix products (2 n^3 FLOPs each) on every core. A preset's
work: the FLOPs of one training step (forward and backward of its network on one batch, counted by
torch.utils.flop_counter: convolutions and matrix products, the LRN's banded product included), divided
by the batch. Its speed: the training loop's images/s of a short run (`train.py`, its own timer, on all
50,000 images). Their product over the peak is the fraction of the machine the preset uses.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from runs import DATA, ROOT, compose_config, train

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from deepcnn.module import build_model  # noqa: E402

# Steps long enough that start-up and the first steps' memory faults weigh little in images/s.
STEPS = {"recipe": 400, "deep": 200, "fast": 60}


def matmul_peak(n: int = 4096, repeats: int = 8) -> float:
    """bf16 FLOP/s of the fastest of `repeats` n x n products, after one to warm up."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def flops_per_image(preset: str) -> float:
    """Training FLOPs of one image: forward and backward of the preset's network over one batch, / batch."""
    cfg = compose_config([f"experiment={preset}"])
    size, batch = cfg.data.crop_size, cfg.data.batch_size
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 10, size)
    images = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        model(images).float().logsumexp(1).sum().backward()
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(STEPS))
    parser.add_argument("--steps", type=int, help="training steps a preset (default: a preset's own, above)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"bf16 matrix-multiply peak: {peak / 1e9:,.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    print("| preset | training MFLOP an image | training images/s | GFLOP/s | fraction of the peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            work = flops_per_image(preset)
            steps = args.steps or STEPS.get(preset, 200)
            # Every step at full size: the FLOPs above are those of a full-size image.
            result, _ = train(Path(tmp) / preset, [f"experiment={preset}", "data.val_size=0", "tta=0",
                                                   "data.early_steps=0", f"trainer.max_steps={steps}"], args.data)
            achieved = work * result["images_per_second"]
            print(f"| {preset} | {work / 1e6:,.1f} | {result['images_per_second']:,.0f} | {achieved / 1e9:,.1f} | "
                  f"{achieved / peak:.1%} |", flush=True)
    print(f"peak again, after the runs: {matmul_peak() / 1e9:,.0f} GFLOP/s")


if __name__ == "__main__":
    main()
