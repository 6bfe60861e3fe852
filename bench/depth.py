"""What depth buys: the deep preset at several depths, the same steps each, on one machine.

    .venv/bin/python bench/depth.py --steps 1500 --convs 1 2 3

Prints depth (conv layers), parameters, training images/s and whole-test-set accuracy per run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from deepcnn.module import load_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--convs", type=int, nargs="+", default=[1, 2, 3], help="convs per block to try")
    parser.add_argument("--widths", default="[32,64,128]")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("DEEPCNN_DATA", ROOT.parent / "shared" / "cifar10")))
    args = parser.parse_args()
    print("| convs per block | conv layers | parameters | images/s | test accuracy |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for convs in args.convs:
            run_dir = Path(tmp) / f"convs{convs}"
            subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "experiment=deep",
                            f"model.convs_per_block={convs}", f"model.widths={args.widths}",
                            f"data.data_dir={args.data}", f"trainer.max_steps={args.steps}",
                            f"hydra.run.dir={run_dir}"], check=True, stdout=subprocess.DEVNULL)
            result = json.loads((run_dir / "results.json").read_text())
            model = load_classifier(result["checkpoint"]).model
            layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            params = sum(p.numel() for p in model.parameters())
            print(f"| {convs} | {layers} | {params:,} | {result['images_per_second']:,.0f} | "
                  f"{100 * result['test_accuracy']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
