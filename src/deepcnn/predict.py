"""Classifying image files with a checkpoint: a CSV row of path, class and probability for each."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from deepcnn.errors import ImageError, print_error
from deepcnn.files import OutputError, refuse_output_over_inputs, replaced_on_success
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


def write_predictions(module: Classifier, files: list[Path], out: TextIO) -> int:
    """Write a CSV row for every file that reads as an image; unreadable ones are reported on stderr
    as they come. Returns how many could not be read."""
    classes = module.hparams.classes
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
    return failed


def write_to_stdout(module: Classifier, files: list[Path]) -> int:
    """write_predictions to stdout; stdout that cannot take them (a full device) is one line, not a traceback."""
    try:
        failed = write_predictions(module, files, sys.stdout)
        sys.stdout.flush()
    except OSError as err:
        # What is left in stdout's buffer would fail again as Python exits, with a traceback of its own.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(f"stdout: cannot be written ({err.strerror or err})") from None
    return failed


def predict(ckpt_path: str | Path, source: str | Path, output: str | Path | None = None) -> None:
    """Classify every image file at source into a CSV: the file output, or stdout when it is None.

    The file is written only once the checkpoint and the input are known to be usable, to a temporary
    file renamed over output at the end (a missing folder is created), and never over an input.
    Unreadable images are named on stderr and the rest still written; then an ImageError says how many
    failed."""
    if output is not None:
        refuse_output_over_inputs(output, [ckpt_path, source])
    module = load_classifier(ckpt_path)
    files = input_files(Path(source))
    if output is None:
        failed = write_to_stdout(module, files)
    else:
        with replaced_on_success(output) as partial, open(partial, "w", newline="") as out:
            failed = write_predictions(module, files, out)
    if failed:
        raise ImageError(f"{failed} of {len(files)} files could not be classified (named above); "
                         "the others were")
