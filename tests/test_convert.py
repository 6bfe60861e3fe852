"""Image-folder datasets converted to CIFAR binary records, and the CIFAR-100 binary layout."""
import hashlib
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from conftest import group_config, make_classifier, run_cli, write_records
from deepcnn import convert
from deepcnn.convert import convert_image_folder
from deepcnn.datamodule import CifarDataModule
from deepcnn.errors import DataError, ImageError
from deepcnn.records import CIFAR10, CIFAR100, PIXELS, open_dataset, read_class_names


def record_hashes(files) -> Counter:
    records = np.concatenate([np.fromfile(f, np.uint8) for f in files]).reshape(-1, CIFAR10.record_size())
    return Counter(hashlib.sha1(record.tobytes()).digest() for record in records)


@pytest.mark.slow
def test_converting_the_shared_jpegs_gives_the_shared_binary_batches(shared_data, tmp_path):
    with tarfile.open(shared_data / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(tmp_path / "jpeg", filter="data")
    counts = convert_image_folder(tmp_path / "jpeg", tmp_path / "converted")
    assert counts == {"classes": 10, "train": 50_000, "test": 10_000}
    original, converted = shared_data / CIFAR10.folder, tmp_path / "converted"
    assert read_class_names(converted / "batches.meta.txt") == read_class_names(original / "batches.meta.txt")
    assert sorted(p.name for p in converted.glob(CIFAR10.train_glob)) == [f"data_batch_{i}.bin" for i in range(1, 6)]
    # the same (label, pixels) records in each split, in whatever order
    assert record_hashes(sorted(converted.glob(CIFAR10.train_glob))) == \
        record_hashes(sorted(original.glob(CIFAR10.train_glob)))
    assert record_hashes([converted / CIFAR10.test_file]) == record_hashes([original / CIFAR10.test_file])


def save(path, image: Image.Image, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def image_folder(root, classes=("zebra", "ant", "cat"), per_class: int = 3):
    """Lossless 32x32 PNGs of random pixels, per_class a class in each split; returns their pixels."""
    pixels = {}
    for split in ("train", "test"):
        for name in classes:
            for i in range(per_class):
                path = root / split / name / f"{i}.png"
                pixels[path] = noise(len(pixels))
                save(path, Image.fromarray(pixels[path]))
    return pixels


def test_labels_follow_sorted_class_names_and_train_records_fill_files(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "RECORDS_PER_FILE", 4)
    pixels = image_folder(tmp_path / "images")
    counts = convert_image_folder(tmp_path / "images", tmp_path / "out")
    assert counts == {"classes": 3, "train": 9, "test": 9}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "batches.meta.txt", "data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "test_batch.bin"]
    data = open_dataset(tmp_path / "out")
    assert data.classes == ["ant", "cat", "zebra"]
    assert len(data.train) == 9 and len(data.test) == 9
    images, labels = data.train.batch(np.arange(9))
    # records in class order, then file order: ant 0-2, cat 0-2, zebra 0-2
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    expected = [pixels[tmp_path / "images" / "train" / name / f"{i}.png"] for name in data.classes for i in range(3)]
    np.testing.assert_array_equal(images, np.stack(expected).transpose(0, 3, 1, 2))


def test_any_image_format_and_size_becomes_32x32_rgb(tmp_path):
    train, test = tmp_path / "images" / "train", tmp_path / "images" / "test"
    save(train / "red" / "wide.jpg", Image.new("RGB", (300, 40), (255, 0, 0)))
    save(train / "red" / "tiny.bmp", Image.new("RGB", (5, 7), (250, 0, 0)))
    save(train / "grey" / "grey.gif", Image.new("L", (64, 64), 77))
    save(train / "grey" / "clear.png", Image.new("RGBA", (16, 48), (90, 90, 90, 0)))
    save(test / "red" / "r.tiff", Image.new("RGB", (32, 32), (200, 10, 10)))
    save(test / "grey" / "g.webp", Image.new("LA", (33, 31), (60, 255)), lossless=True)
    (train / "red" / ".DS_Store").write_bytes(b"\0not an image")
    convert_image_folder(tmp_path / "images", tmp_path / "out")
    data = open_dataset(tmp_path / "out")
    images, labels = data.train.batch(np.arange(len(data.train)))
    assert data.classes == ["grey", "red"] and len(data.train) == 4
    colours = [tuple(int(np.median(images[i, c])) for c in range(3)) for i in range(4)]
    assert list(labels) == [0, 0, 1, 1]
    # grey: clear.png, grey.gif; red: tiny.bmp, wide.jpg (JPEG moves solid red a little)
    assert colours[:3] == [(90, 90, 90), (77, 77, 77), (250, 0, 0)]
    assert np.allclose(colours[3], (255, 0, 0), atol=3)
    test_images, _ = data.test.batch(np.arange(2))
    assert (test_images[0] == 60).all() and (test_images[1] == np.array([200, 10, 10])[:, None, None]).all()


def corrupt_image(root):
    image_folder(root)
    (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return "cat/1.png", "not a readable image"


def missing_test(root):
    image_folder(root)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    return "no test/ folder", "train/<class>/*"


def other_classes(root):
    image_folder(root)
    (root / "test" / "cat").rename(root / "test" / "dog")
    return "only in train/: cat", "only in test/: dog"


def stray_file(root):
    image_folder(root)
    save(root / "train" / "loose.png", Image.new("RGB", (32, 32)))
    return "train/loose.png", "outside a class folder"


def empty_class_folders(root):
    image_folder(root)
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    return ("test/ant: an empty class folder (no image files)",)


def one_empty_class_folder(root):
    image_folder(root)
    (root / "train" / "zebra" / ".DS_Store").write_bytes(b"\0not an image")
    for path in (root / "train" / "zebra").glob("*.png"):
        path.unlink()
    return ("train/zebra: an empty class folder (no image files); add its images or remove it",)


def one_class(root):
    image_folder(root, classes=("cat",))
    return ("1 class folder (cat) in train/ and test/; a classifier needs at least 2 classes",)


def empty_folder(root):
    root.mkdir()
    return ("no train/ folder",)


@pytest.mark.parametrize("make", [corrupt_image, missing_test, other_classes, stray_file, empty_class_folders,
                                  one_empty_class_folder, one_class, empty_folder])
def test_bad_folder_is_refused_and_leaves_nothing(make, tmp_path):
    words = make(tmp_path / "images")
    with pytest.raises((DataError, ImageError)) as caught:
        convert_image_folder(tmp_path / "images", tmp_path / "out")
    for word in words:
        assert word in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_output_that_holds_files_is_not_overwritten(tmp_path):
    image_folder(tmp_path / "images")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        convert_image_folder(tmp_path / "images", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_converted_folder_trains_with_its_own_classes(tmp_path):
    image_folder(tmp_path / "images", classes=("sun", "moon", "star", "comet"), per_class=8)
    converted = run_cli("convert.py", f"input={tmp_path / 'images'}", f"output={tmp_path / 'data'}",
                        f"hydra.run.dir={tmp_path / 'hydra'}")
    assert converted.returncode == 0, converted.stderr
    assert "32 training and 32 test images of 4 classes" in converted.stdout
    trained = run_cli("train.py", f"data.data_dir={tmp_path / 'data'}", "data.download=false", "data.val_size=0", "data.batch_size=8",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["per_class_accuracy"]) == ["comet", "moon", "star", "sun"]


def test_cli_names_the_bad_image_without_traceback(tmp_path):
    corrupt_image(tmp_path / "images")
    result = run_cli("convert.py", f"input={tmp_path / 'images'}", f"output={tmp_path / 'data'}",
                     f"hydra.run.dir={tmp_path / 'hydra'}")
    assert result.returncode == 2
    assert f"{tmp_path / 'images' / 'train' / 'cat' / '1.png'}: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("output, problem", [
    ("images", "is the input"),
    ("images/data", "lies inside the input folder"),
    ("images/train/new", "lies inside the input folder"),
    (".", "holds the input"),
])
def test_output_and_input_folders_never_overlap(output, problem, tmp_path):
    image_folder(tmp_path / "images")
    before = {path: path.read_bytes() for path in (tmp_path / "images").rglob("*") if path.is_file()}
    result = run_cli("convert.py", "input=images", f"output={output}", f"hydra.run.dir={tmp_path / 'hydra'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert (f"deepcnn: error: {output}: {problem} images; writing it would change the input, choose another output"
            in result.stderr)
    assert "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in (tmp_path / "images").rglob("*") if path.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hydra", "images"]


def write_cifar100(root, train: int = 40, test: int = 20):
    """A small dataset in the CIFAR-100 binary layout: 20 coarse and 100 fine classes."""
    folder = root / CIFAR100.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for name, count in (("train.bin", train), ("test.bin", test)):
        fine = rng.integers(0, 100, count)
        labels[name] = np.stack([fine // 5, fine], axis=1)  # coarse byte first, then fine
        write_records(folder / name, labels[name], label_bytes=2)
    (folder / "coarse_label_names.txt").write_text("".join(f"coarse{i}\n" for i in range(20)))
    (folder / "fine_label_names.txt").write_text("".join(f"fine{i}\n" for i in range(100)))
    return labels


@pytest.mark.parametrize("label,column,classes", [("coarse", 0, 20), ("fine", 1, 100)])
def test_cifar100_trains_on_coarse_or_fine_labels(label, column, classes, tmp_path):
    labels = write_cifar100(tmp_path)
    datamodule = CifarDataModule(str(tmp_path), batch_size=8, eval_batch_size=16, val_size=0, label=label, download=False)
    datamodule.setup()
    assert len(datamodule.classes) == classes and datamodule.classes[0] == f"{label}0"
    np.testing.assert_array_equal(datamodule.dataset.train.labels, labels["train.bin"][:, column])
    np.testing.assert_array_equal(datamodule.dataset.test.labels, labels["test.bin"][:, column])
    images, _ = datamodule.dataset.train.batch(np.arange(2))
    assert images.shape == (2, 3, 32, 32) and images.size == 2 * PIXELS

    module = make_classifier(datamodule.classes, model=group_config("model", "recipe"))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert trainer.global_step == 2
    assert module.model.head.out_features == classes
    assert len(module.test_result["per_class"]) == classes
    assert np.array(module.test_result["confusion"]).sum() == 20
