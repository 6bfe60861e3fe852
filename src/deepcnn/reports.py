"""What a run leaves for people: plots, results.json and printed tables."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from deepcnn.files import replaced_on_success

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """A figure as a PNG file, written whole or not at all."""
    with replaced_on_success(path) as partial:
        fig.savefig(partial, format="png", dpi=100)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    with replaced_on_success(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


CURVE_TITLES = {"val": "Validation accuracy (held-out training images)", "test": "Test accuracy (whole test set)"}


def plot_curves(history: dict[str, list[tuple[int, float]]], run_dir: Path, label: str = "val") -> list[Path]:
    """loss.png (train loss by step) and accuracy.png (validation accuracy by step, or test accuracy when
    the run has no validation split, as the title says), as the recipe draws them."""
    written = []
    for key, filename, title, ylabel in (
        ("loss", "loss.png", "Softmax loss per generation", "Loss"),
        ("accuracy", "accuracy.png", CURVE_TITLES[label], "Accuracy"),
    ):
        points = history.get(key) or []
        fig, ax = plt.subplots(figsize=(6, 4))
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, "k-" if key == "loss" else "r.-")
        ax.set(title=title, xlabel="Generation", ylabel=ylabel)
        fig.tight_layout()
        save_figure(fig, run_dir / filename)
        written.append(run_dir / filename)
    return written


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.6 * len(classes) + 0.8))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="Predicted", ylabel="True", title="Confusion matrix (test set)")
    if len(classes) <= 20:
        top = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > top / 2 else "black")
    fig.tight_layout()
    save_figure(fig, path)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def accuracy_table(summary: dict) -> str:
    """Validation accuracy (when the run had a split), test accuracy and each class's test accuracy;
    a class without test images has none ("n/a")."""
    per_class = summary["per_class_accuracy"]
    width = max(len(name) for name in per_class)
    lines = []
    if summary.get("val_accuracy") is not None:
        lines.append(f"validation accuracy: {percent(summary['val_accuracy'])} (held-out training images)")
    lines.append(f"test accuracy: {percent(summary['test_accuracy'])} (whole test set)")
    lines += [f"  {name:<{width}}  {percent(value):>7}" for name, value in per_class.items()]
    return "\n".join(lines)


def png_array(path: Path):
    """An image file as an H x W x 3 uint8 array, for TensorBoard."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
