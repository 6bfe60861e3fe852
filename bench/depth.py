"""What depth buys: the deep preset at several depths, the same steps each, on one machine.

    .venv/bin/python bench/depth.py --steps 1500 --convs 1 2 3

Prints depth (conv layers), parameters, training images/s and whole-test-set accuracy per run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from runs import DATA, ROOT, train

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from deepcnn.checkpoints import load_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--convs", type=int, nargs="+", default=[1, 2, 3], help="convs per block to try")
    parser.add_argument("--widths", default="[32,64,128]")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    print("| convs per block | conv layers | parameters | images/s | test accuracy |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for convs in args.convs:
            result, _ = train(Path(tmp) / f"convs{convs}", ["experiment=deep", f"model.convs_per_block={convs}",
                              f"model.widths={args.widths}", f"trainer.max_steps={args.steps}"], args.data)
            model = load_classifier(result["checkpoint"]).model
            layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            params = sum(p.numel() for p in model.parameters())
            print(f"| {convs} | {layers} | {params:,} | {result['images_per_second']:,.0f} | "
                  f"{100 * result['test_accuracy']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
