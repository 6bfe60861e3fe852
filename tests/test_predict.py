"""Classifying image files from the command line: CSV out, bad files named, the rest still classified."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_records
from deepcnn.errors import CheckpointError, ImageError
from deepcnn.files import OutputError
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


def test_unusable_checkpoint_or_input_stops_before_any_output(checkpoint, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(CheckpointError, match=f"{image}: not a readable PyTorch checkpoint"):
        predict(image, image)
    with pytest.raises(ImageError, match=f"{tmp_path / 'absent'}: no such file or folder"):
        predict(checkpoint, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=f"{tmp_path / 'empty'}: no files in this folder"):
        predict(checkpoint, tmp_path / "empty")
    assert capsys.readouterr().out == ""


def predict_cli(tmp_path, *overrides):
    return run_cli("predict.py", *overrides, f"hydra.run.dir={tmp_path / 'h'}", env=ONE_THREAD)


def test_failing_run_leaves_an_existing_output_untouched(checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.fromarray(colour_images(np.random.default_rng(3), COLOURS["red"], 1)[0]).save(image)
    output = tmp_path / "predictions.csv"
    output.write_text("earlier results\n")
    result = predict_cli(tmp_path, f"ckpt_path={image}", f"input={image}", f"output={output}")
    assert result.returncode == 2
    assert f"deepcnn: error: {image}: not a readable PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="does not exist"):
        predict(tmp_path / "absent.ckpt", image, output)
    with pytest.raises(ImageError, match="no such file or folder"):
        predict(checkpoint, tmp_path / "absent", output)
    assert output.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "predictions.csv", "red.png"]


@pytest.mark.parametrize("name", ["image", "checkpoint", "inside the input folder"])
def test_output_never_replaces_an_input(name, checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "blue.png"
    Image.fromarray(colour_images(np.random.default_rng(4), COLOURS["blue"], 1)[0]).save(image)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(checkpoint.read_bytes())
    source, output, problem = {
        "image": (image, image, f"is the input {image}"),
        "checkpoint": (image, ckpt, f"is the input {ckpt}"),
        "inside the input folder": (folder, folder / "out.csv", f"lies inside the input folder {folder}"),
    }[name]
    before = {path: path.read_bytes() for path in (image, ckpt)}
    result = predict_cli(tmp_path, f"ckpt_path={ckpt}", f"input={source}", f"output={output}")
    assert result.returncode == 2
    assert f"deepcnn: error: {output}: {problem}; writing it would change the input" in result.stderr
    assert "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in (image, ckpt)} == before
    assert sorted(p.name for p in folder.iterdir()) == ["blue.png"]


def test_missing_output_folder_is_created_and_an_impossible_one_named(checkpoint, tmp_path):
    image = tmp_path / "green.png"
    Image.fromarray(colour_images(np.random.default_rng(5), COLOURS["green"], 1)[0]).save(image)
    output = tmp_path / "new" / "deeper" / "out.csv"
    result = predict_cli(tmp_path, f"ckpt_path={checkpoint}", f"input={image}", f"output={output}")
    assert result.returncode == 0, result.stderr
    assert [row["class"] for row in rows(output.read_text())] == ["green"]

    # A regular file where a folder is needed: no user, root included, can create a folder there.
    (tmp_path / "file").write_text("in the way")
    blocked = tmp_path / "file" / "sub" / "out.csv"
    result = predict_cli(tmp_path, f"ckpt_path={checkpoint}", f"input={image}", f"output={blocked}")
    assert result.returncode == 2
    assert (f"deepcnn: error: {blocked}: cannot create its folder {tmp_path / 'file' / 'sub'} (Not a directory)"
            in result.stderr)
    assert "Traceback" not in result.stderr
    with pytest.raises(OutputError, match=f"{tmp_path / 'new'}: is a folder; name a file to write"):
        predict(checkpoint, image, tmp_path / "new")


def test_readable_images_are_written_when_others_fail(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_images(np.random.default_rng(6), COLOURS["red"], 1)[0]).save(folder / "red.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    output = tmp_path / "out.csv"
    result = predict_cli(tmp_path, f"ckpt_path={checkpoint}", f"input={folder}", f"output={output}")
    assert result.returncode == 2
    assert f"{folder / 'broken.png'}: not a readable image" in result.stderr
    assert "1 of 2 files could not be classified" in result.stderr
    assert [(row["path"], row["class"]) for row in rows(output.read_text())] == [(str(folder / "red.png"), "red")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "images", "out.csv"]
