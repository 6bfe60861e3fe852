"""Image-folder datasets (train/<class>/*, test/<class>/*) rewritten as CIFAR-10 binary records."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from deepcnn.errors import DataError
from deepcnn.files import refuse_output_over_inputs
from deepcnn.images import files_under, read_image, visible
from deepcnn.records import CIFAR10, MAX_CLASSES, MIN_CLASSES

SPLITS = ("train", "test")
# The official training files hold 10,000 records each.
RECORDS_PER_FILE = 10_000
NAMES_FILE = CIFAR10.label_names["fine"][1]


def split_images(root: Path, split: str) -> dict[str, list[Path]]:
    """The image files of one split, by class folder name."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{root}: no {split}/ folder (expected train/<class>/* and test/<class>/* images)")
    entries = sorted(entry for entry in folder.iterdir() if visible(entry.relative_to(folder)))
    stray = [entry for entry in entries if not entry.is_dir()]
    if stray:
        raise DataError(f"{stray[0]}: a file outside a class folder (expected {split}/<class>/*)")
    if not entries:
        raise DataError(f"{folder}: no class folders (expected {split}/<class>/*)")
    images = {entry.name: files_under(entry) for entry in entries}
    empty = [name for name, files in images.items() if not files]
    if empty:
        raise DataError(f"{folder / empty[0]}: an empty class folder (no image files); "
                        "add its images or remove it")
    return images


def check_classes(root: Path, splits: dict[str, dict[str, list[Path]]]) -> list[str]:
    classes = sorted(splits["train"])
    test_classes = sorted(splits["test"])
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes)) or ["none"]
        only_test = sorted(set(test_classes) - set(classes)) or ["none"]
        raise DataError(
            f"{root}: train/ and test/ have different class folders "
            f"(only in train/: {', '.join(only_train)}; only in test/: {', '.join(only_test)})"
        )
    if len(classes) < MIN_CLASSES:
        raise DataError(f"{root}: {len(classes)} class folder ({classes[0]}) in train/ and test/; a classifier needs "
                        f"at least {MIN_CLASSES} classes")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{root}: {len(classes)} classes; a CIFAR label byte holds at most {MAX_CLASSES}")
    return classes


def labelled_images(images: dict[str, list[Path]], classes: list[str]) -> list[tuple[int, Path]]:
    return [(label, path) for label, name in enumerate(classes) for path in images[name]]


def write_records(path: Path, items: list[tuple[int, Path]]) -> None:
    with open(path, "wb") as out:
        for label, image in items:
            out.write(bytes([label]) + read_image(image).tobytes())


def convert_image_folder(source: str | Path, target: str | Path) -> dict[str, int]:
    """Write every image under source as CIFAR-10 binary records in target; returns the counts.

    Labels are indices into the sorted class names. Everything is written to a temporary folder
    beside target and renamed into place at the end, so a failed conversion leaves no dataset. Neither
    folder may lie inside the other.
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder")
    refuse_output_over_inputs(target, [source])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target}: already exists and is not an empty folder; choose a new output")
    splits = {split: split_images(source, split) for split in SPLITS}
    classes = check_classes(source, splits)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        partial.chmod(0o755)  # mkdtemp's folder is private; the dataset is for every user who trains on it
        train = labelled_images(splits["train"], classes)
        for number, start in enumerate(range(0, len(train), RECORDS_PER_FILE), 1):
            write_records(partial / CIFAR10.train_glob.replace("*", str(number)),
                          train[start : start + RECORDS_PER_FILE])
        test = labelled_images(splits["test"], classes)
        write_records(partial / CIFAR10.test_file, test)
        (partial / NAMES_FILE).write_text("\n".join(classes) + "\n")
        partial.replace(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"classes": len(classes), "train": len(train), "test": len(test)}
