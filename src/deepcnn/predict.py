"""Classifying image files with a checkpoint: a CSV row of path, class and probability for each."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from deepcnn.errors import ImageError, print_error
from deepcnn.images import files_under, read_image
from deepcnn.checkpoints import load_classifier
from deepcnn.module import Classifier

BATCH_SIZE = 256
HEADER = ("path", "class", "probability")


def input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ImageError(f"{path}: no such file or folder")
    files = files_under(path)
    if not files:
        raise ImageError(f"{path}: no files in this folder")
    return files


@torch.inference_mode()
def classify(module: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top class of each uint8 (n, 3, 32, 32) image and its softmax probability."""
    probabilities = torch.softmax(module.logits(torch.from_numpy(images)), dim=1)
    top = probabilities.max(dim=1)
    return top.indices.numpy(), top.values.numpy()


def predict(ckpt_path: str | Path, source: str | Path, out: TextIO) -> None:
    """Write a CSV row for every image file at source to out. Unreadable files are reported on
    stderr as they come and the rest classified; an ImageError at the end says how many failed."""
    module = load_classifier(ckpt_path)
    classes = module.hparams.classes
    files = input_files(Path(source))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    failed = 0
    for start in range(0, len(files), BATCH_SIZE):
        readable, images = [], []
        for path in files[start : start + BATCH_SIZE]:
            try:
                images.append(read_image(path))
                readable.append(path)
            except ImageError as err:
                print_error(err)
                failed += 1
        if images:
            labels, probabilities = classify(module, np.stack(images))
            writer.writerows((path, classes[label], f"{p:.6f}")
                             for path, label, p in zip(readable, labels, probabilities))
    if failed:
        raise ImageError(f"{failed} of {len(files)} files could not be classified (named above); "
                         "the others were")
