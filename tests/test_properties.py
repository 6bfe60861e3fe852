"""Properties of the record reader and the augmentations over many generated cases (hypothesis)."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_records
from deepcnn import augment
from deepcnn.datamodule import CifarDataModule
from deepcnn.errors import DataError
from deepcnn.records import CIFAR10, RECORD_SIZE, open_dataset

# No deadline: examples that write files or run on a busy machine take uneven time.
examples = settings(max_examples=40, deadline=None)

seeds = st.integers(0, 2**32 - 1)


def uint8_images(seed: int, n: int, side: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8))


def dataset_folder(root: Path, num_classes: int) -> Path:
    folder = root / CIFAR10.folder
    folder.mkdir()
    (folder / "batches.meta.txt").write_text("".join(f"class{i}\n" for i in range(num_classes)))
    return folder


@examples
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=3), num_classes=st.integers(2, 256), seed=seeds,
       picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=20))
def test_reader_returns_records_exactly_as_written(counts, num_classes, seed, picks):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = dataset_folder(Path(tmp), num_classes)
        labels, pixels = [], []
        for i, count in enumerate(counts, start=1):
            file_labels = rng.integers(0, num_classes, count)
            file_pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            write_records(folder / f"data_batch_{i}.bin", file_labels, file_pixels)
            labels.append(file_labels)
            pixels.append(file_pixels)
        write_records(folder / "test_batch.bin", labels[0], pixels[0])
        data = open_dataset(tmp)
        labels, pixels = np.concatenate(labels), np.concatenate(pixels)
        order = np.array(picks) % len(labels)
        images, got_labels = data.train.batch(order)
        assert len(data.train) == len(labels) and len(data.test) == counts[0]
        assert images.dtype == np.uint8 and images.shape == (len(order), 3, 32, 32)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_labels, labels[order])
        np.testing.assert_array_equal(images.reshape(len(order), -1), pixels[order])


@examples
@given(size=st.integers(1, 5 * RECORD_SIZE).filter(lambda n: n % RECORD_SIZE))
def test_reader_refuses_partial_records(size):
    with tempfile.TemporaryDirectory() as tmp:
        folder = dataset_folder(Path(tmp), 10)
        (folder / "data_batch_1.bin").write_bytes(bytes(size))
        write_records(folder / "test_batch.bin", [0])
        with pytest.raises(DataError) as err:
            open_dataset(tmp)
    records, over = divmod(size, RECORD_SIZE)
    assert str(err.value) == (f"{folder / 'data_batch_1.bin'}: {size:,} bytes is not a whole number of 3,073-byte "
                              f"records ({records:,} records and {over:,} bytes over: truncated or extra bytes)")


@examples
@given(num_classes=st.integers(2, 255), seed=seeds, count=st.integers(1, 30), data=st.data())
def test_reader_refuses_labels_outside_the_classes(num_classes, seed, count, data):
    labels = np.random.default_rng(seed).integers(0, 256, count)
    labels[data.draw(st.integers(0, count - 1))] = data.draw(st.integers(num_classes, 255))
    bad = np.flatnonzero(labels >= num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        folder = dataset_folder(Path(tmp), num_classes)
        write_records(folder / "data_batch_1.bin", labels)
        write_records(folder / "test_batch.bin", [0])
        with pytest.raises(DataError) as err:
            open_dataset(tmp)
    assert str(err.value) == (f"{folder / 'data_batch_1.bin'}: record {bad[0]:,} has label {labels[bad[0]]}, outside "
                              f"the {num_classes} classes named in the class-name file ({bad.size:,} such records)")


@st.composite
def crops(draw, side=32):
    """(size, top, left) lists for a batch: windows that fit inside a side x side image."""
    n = draw(st.integers(1, 4))
    size = draw(st.integers(1, side))
    offsets = st.lists(st.integers(0, side - size), min_size=n, max_size=n)
    return size, torch.tensor(draw(offsets)), torch.tensor(draw(offsets))


@examples
@given(window=crops(), seed=seeds)
def test_crop_is_the_window_at_each_offset(window, seed):
    size, top, left = window
    images = uint8_images(seed, len(top))
    out = augment.crop(images, top, left, size)
    assert out.shape == (len(top), 3, size, size) and out.dtype == torch.uint8
    for i, (t, l) in enumerate(zip(top.tolist(), left.tolist())):
        assert torch.equal(out[i], images[i, :, t : t + size, l : l + size])


@examples
@given(outer=crops(), seed=seeds, data=st.data())
def test_crop_of_a_crop_is_one_crop_and_full_crop_is_identity(outer, seed, data):
    size, top, left = outer
    images = uint8_images(seed, len(top))
    full = torch.zeros(len(top), dtype=torch.long)
    assert torch.equal(augment.crop(images, full, full, 32), images)
    assert torch.equal(augment.centre_crop(images, 32), images)
    inner = data.draw(st.integers(1, size))
    offsets = st.lists(st.integers(0, size - inner), min_size=len(top), max_size=len(top))
    top2, left2 = torch.tensor(data.draw(offsets)), torch.tensor(data.draw(offsets))
    assert torch.equal(augment.crop(augment.crop(images, top, left, size), top2, left2, inner),
                       augment.crop(images, top + top2, left + left2, inner))


@examples
@given(window=crops(), seed=seeds)
def test_flip_is_its_own_inverse_and_mirrors_the_crop_window(window, seed):
    size, top, left = window
    images = uint8_images(seed, len(top))
    mask = torch.from_numpy(np.random.default_rng(seed).random(len(top)) < 0.5)
    flipped = augment.flip(images, mask)
    assert torch.equal(augment.flip(flipped, mask), images)
    assert torch.equal(flipped[~mask], images[~mask])
    everything = torch.ones(len(top), dtype=torch.bool)
    # Mirroring a window equals taking the mirrored window of the mirrored image.
    assert torch.equal(augment.flip(augment.crop(images, top, left, size), everything),
                       augment.crop(augment.flip(images, everything), top, 32 - size - left, size))


@examples
@given(seed=seeds, n=st.integers(1, 4), scale=st.floats(0.01, 100), shift=st.floats(-500, 500))
def test_standardize_ignores_affine_changes_of_brightness(seed, n, scale, shift):
    images = uint8_images(seed, n).float()
    standard = augment.standardize(images)
    assert torch.allclose(augment.standardize(images * scale + shift), standard, atol=1e-3)
    assert torch.allclose(standard.flatten(1).mean(1), torch.zeros(n), atol=1e-4)
    assert torch.allclose(standard.flatten(1).std(1, correction=0), torch.ones(n), atol=1e-4)


@examples
@given(seed=seeds, n=st.integers(1, 4), crop_size=st.integers(2, 32), random_crop=st.booleans(),
       flip_prob=st.floats(0, 1), max_brightness=st.floats(0, 255),
       contrast=st.none() | st.tuples(st.floats(0, 1), st.floats(1, 3)))
def test_distort_gives_standardized_crops_reproducibly(seed, n, crop_size, random_crop, flip_prob, max_brightness,
                                                       contrast):
    images = uint8_images(seed, n)
    options = dict(random_crop=random_crop, flip_prob=flip_prob, max_brightness=max_brightness, contrast=contrast)
    out = augment.distort(images, torch.Generator().manual_seed(seed), crop_size, **options)
    assert out.shape == (n, 3, crop_size, crop_size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    flat = out.flatten(1)
    assert flat.mean(1).abs().max() < 1e-3
    # At most 1: a flat image (contrast 0 makes one) is divided by 1/sqrt(N), not by its zero spread.
    assert (flat.std(1, correction=0) <= 1 + 1e-4).all()
    again = augment.distort(images, torch.Generator().manual_seed(seed), crop_size, **options)
    assert torch.equal(out, again)


@examples
@given(seed=seeds, n=st.integers(1, 4), crop_size=st.integers(1, 32), flip=st.booleans())
def test_distort_without_random_parts_is_preprocess(seed, n, crop_size, flip):
    images = uint8_images(seed, n)
    out = augment.distort(images, torch.Generator().manual_seed(seed), crop_size, random_crop=False,
                          flip_prob=float(flip), max_brightness=0, contrast=None)
    expected = augment.preprocess(images, crop_size)
    # equal up to rounding: distort standardizes from each channel's statistics, preprocess from the image's
    torch.testing.assert_close(out, expected.flip(-1) if flip else expected, rtol=1e-5, atol=1e-5)


@examples
@given(seed=seeds, n=st.integers(1, 8), steps=st.integers(1, 4), first=st.integers(0, 10**6))
def test_batches_distorted_together_come_out_as_each_alone(seed, n, steps, first):
    module = CifarDataModule(data_dir="unused", crop_size=24, seed=seed)
    batches = [(uint8_images(seed + k, n), torch.arange(n) + k, first + k, None) for k in range(steps)]
    together = list(module.ready_batches(batches))
    assert len(together) == steps
    for batch, (x, labels) in zip(batches, together):
        alone, alone_labels = next(module.ready_batches([batch]))
        assert labels is batch[1] and alone_labels is batch[1] and x.shape == (n, 3, 24, 24)
        torch.testing.assert_close(x, alone)
        assert x.is_contiguous(memory_format=torch.channels_last)
