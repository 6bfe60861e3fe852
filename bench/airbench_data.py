"""The CIFAR-10 records as the peer airbench reads them: cifar10/train.pt and cifar10/test.pt, each
{"images": uint8 (n, 32, 32, 3), "labels": int64 (n,), "classes": [names]}. Written from deepcnn's
records so that the peer, unported, trains on the same images as deepcnn without downloading. The
training images go in a seeded random order: records converted from an image folder come class by
class, and the peer fits its whitening to the first 5,000.

    python bench/airbench_data.py DATA_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from deepcnn.records import open_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder holding cifar-10-batches-bin/ (or the batches)")
    parser.add_argument("out", type=Path, help="where train.pt and test.pt go (the peer's cifar10/)")
    args = parser.parse_args()
    dataset = open_dataset(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", dataset.train), ("test", dataset.test)):
        order = np.random.default_rng(0).permutation(len(records)) if name == "train" else np.arange(len(records))
        images, labels = records.loaded().batch(order)
        torch.save({"images": torch.from_numpy(images.transpose(0, 2, 3, 1).copy()),
                    "labels": torch.from_numpy(labels), "classes": dataset.classes}, args.out / f"{name}.pt")
        print(f"{args.out / name}.pt: {len(labels):,} images")


if __name__ == "__main__":
    main()
