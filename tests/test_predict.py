"""Classifying image files from the command line: CSV out, bad files named, the rest still classified."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_records
from deepcnn.errors import CheckpointError, ImageError
from deepcnn.predict import predict
from deepcnn.records import CIFAR10

COLOURS = {"blue": (30, 40, 210), "green": (40, 190, 50), "red": (210, 40, 30)}
# Two threads fighting over this machine's two shared cores run far slower than one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def colour_images(rng, colour, n: int, size=(32, 32)) -> np.ndarray:
    """n noisy images (n, h, w, 3) of one colour."""
    noise = rng.integers(-40, 41, (n, size[1], size[0], 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint that tells red, green and blue images apart, trained on records of noisy colours."""
    root = tmp_path_factory.mktemp("colours")
    folder = root / CIFAR10.folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("data_batch_1.bin", 64), ("test_batch.bin", 16)):
        labels = rng.integers(0, 3, count)
        images = np.stack([colour_images(rng, list(COLOURS.values())[label], 1)[0] for label in labels])
        write_records(folder / name, labels, images.transpose(0, 3, 1, 2).reshape(count, -1))
    (folder / "batches.meta.txt").write_text("\n".join(COLOURS) + "\n")
    run = root / "run"
    result = run_cli("train.py", f"data.data_dir={root}", "data.download=false", "data.val_size=0", "data.batch_size=16",
                     "trainer.max_steps=40", "trainer.val_check_interval=40", f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def rows(stdout: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(stdout))
    assert reader.fieldnames == ["path", "class", "probability"]
    return list(reader)


def test_folder_of_any_images_is_classified_and_bad_files_are_named(checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(colour_images(rng, COLOURS["red"], 1, (300, 200))[0]).save(folder / "big_red.png")
    Image.fromarray(colour_images(rng, COLOURS["blue"], 1, (50, 50))[0]).save(folder / "blue.jpg", quality=90)
    Image.fromarray(colour_images(rng, COLOURS["green"], 1, (12, 20))[0]).save(folder / "more" / "green.gif")
    Image.fromarray(colour_images(rng, COLOURS["red"], 1)[0]).convert("RGBA").save(folder / "more" / "red.webp")
    (folder / "notes.txt").write_text("not an image\n")
    jpeg = io.BytesIO()
    Image.fromarray(colour_images(rng, COLOURS["blue"], 1, (64, 64))[0]).save(jpeg, "JPEG")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[:200])

    result = run_cli("predict.py", f"ckpt_path={checkpoint}", f"input={folder}", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode != 0
    predicted = {row["path"]: row for row in rows(result.stdout)}
    assert {path: row["class"] for path, row in predicted.items()} == {
        str(folder / "big_red.png"): "red",
        str(folder / "blue.jpg"): "blue",
        str(folder / "more" / "green.gif"): "green",
        str(folder / "more" / "red.webp"): "red",
    }
    assert all(1 / 3 < float(row["probability"]) <= 1 for row in predicted.values())
    assert f"{folder / 'notes.txt'}: not a readable image" in result.stderr
    assert f"{folder / 'cut.jpg'}: not a readable image" in result.stderr
    assert "2 of 6 files could not be classified" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_file_to_an_output_file(checkpoint, tmp_path):
    image = tmp_path / "green.png"
    Image.fromarray(colour_images(np.random.default_rng(2), COLOURS["green"], 1)[0]).save(image)
    output = tmp_path / "predictions.csv"
    result = run_cli("predict.py", f"ckpt_path={checkpoint}", f"input={image}", f"output={output}",
                     f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    [row] = rows(output.read_text())
    assert row["path"] == str(image) and row["class"] == "green"


def test_unusable_checkpoint_or_input_stops_before_any_output(checkpoint, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    out = io.StringIO()
    with pytest.raises(CheckpointError, match=f"{image}: not a readable PyTorch checkpoint"):
        predict(image, image, out)
    with pytest.raises(ImageError, match=f"{tmp_path / 'absent'}: no such file or folder"):
        predict(checkpoint, tmp_path / "absent", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=f"{tmp_path / 'empty'}: no files in this folder"):
        predict(checkpoint, tmp_path / "empty", out)
    assert out.getvalue() == ""
