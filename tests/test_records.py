"""Reading the CIFAR binary layout: records come back exactly as written, and the training stream hands them out
step by step, reading ahead in its own thread."""
import itertools
import time

import numpy as np
import pytest
import torch

from conftest import write_dataset, write_records
from deepcnn.datamodule import CifarDataModule, TrainStream
from deepcnn.errors import DataError
from deepcnn.records import CIFAR10, RECORD_SIZE, open_dataset


def test_record_size_is_label_plus_pixels():
    assert RECORD_SIZE == 1 + 3 * 32 * 32 == 3073


def test_reads_labels_and_pixels_as_written(tmp_path):
    folder = tmp_path / CIFAR10.folder
    folder.mkdir()
    labels = np.array([2, 0, 1, 2, 1])
    pixels = write_records(folder / "data_batch_1.bin", labels)
    write_records(folder / "data_batch_2.bin", [0, 0])
    write_records(folder / "test_batch.bin", [1])
    (folder / "batches.meta.txt").write_text("a\nb\nc\n\n")
    data = open_dataset(tmp_path)
    assert data.classes == ["a", "b", "c"]
    assert len(data.train) == 7 and len(data.test) == 1
    images, got_labels = data.train.batch(np.array([4, 0, 2]))
    np.testing.assert_array_equal(got_labels, labels[[4, 0, 2]])
    # plane order: red plane, then green, then blue, each row-major
    np.testing.assert_array_equal(images, pixels[[4, 0, 2]].reshape(3, 3, 32, 32))
    assert images[1, 1, 0, 5] == pixels[0, 1024 + 5]


def test_indices_span_files(tmp_path):
    folder = write_dataset(tmp_path, per_file=10, train_files=3)
    data = open_dataset(folder)
    expected = b"".join((folder / f"data_batch_{i}.bin").read_bytes() for i in (1, 2, 3))
    records = np.frombuffer(expected, np.uint8).reshape(30, RECORD_SIZE)
    order = np.array([29, 0, 10, 9, 20, 19])
    images, labels = data.train.batch(order)
    np.testing.assert_array_equal(labels, records[order, 0])
    np.testing.assert_array_equal(images.reshape(6, -1), records[order, 1:])


def test_a_file_cut_short_after_opening_is_named_with_the_record(tmp_path):
    folder = write_dataset(tmp_path, per_file=10, train_files=2)
    data = open_dataset(folder)
    cut = folder / "data_batch_2.bin"
    with open(cut, "r+b") as f:
        f.truncate(4 * RECORD_SIZE + 100)
    images, _ = data.train.batch(np.array([3, 13]))  # records before the cut still read
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match=rf"{cut}: file shrank while being read \(record 4\)"):
        data.train.batch(np.array([0, 14]))


def test_the_stream_does_not_read_while_a_group_is_prepared(tmp_path):
    records = open_dataset(write_dataset(tmp_path, per_file=40, train_files=2)).train
    events = []

    def prepare(batches):
        events.append("prepare")
        time.sleep(0.2)  # long enough for the reading thread to refill the queue, were it let
        events.append("prepared")
        return batches

    class Logged(TrainStream):
        def batch(self, step):
            events.append(step)
            return super().batch(step)

    stream = Logged(records, 16, seed=7, prefetch=4, together=4, prepare=prepare)
    assert [step for _, _, step, _ in itertools.islice(stream, 8)] == list(range(8))
    reads_while_preparing = []
    for start in (i for i, event in enumerate(events) if event == "prepare"):
        end = events.index("prepared", start)
        reads_while_preparing.append(len(events[start + 1 : end]))
    # Four slots free up as a group is taken; at most one read, already past the wait, may still start.
    assert len(reads_while_preparing) == 2 and max(reads_while_preparing) <= 1


def test_the_stream_hands_out_its_steps_in_order_prepared_together(tmp_path):
    records = open_dataset(write_dataset(tmp_path, per_file=40, train_files=2)).train
    raw = TrainStream(records, 16, seed=7, start_step=3)
    got = list(itertools.islice(raw, 4))
    assert [step for _, _, step, _ in got] == [3, 4, 5, 6]  # across an epoch's end: 5 steps an epoch
    for images, labels, step, _ in got:
        images_alone, labels_alone, _, _ = raw.batch(step)
        assert torch.equal(images, images_alone) and torch.equal(labels, labels_alone)
    groups = []
    prepared = TrainStream(records, 16, seed=7, start_step=3, together=3,
                           prepare=lambda batches: groups.append([s for _, _, s, _ in batches]) or batches)
    assert [step for _, _, step, _ in itertools.islice(prepared, 5)] == [3, 4, 5, 6, 7]
    assert groups == [[3, 4, 5], [6, 7, 8]]
    # The data module distorts as many whole batches together as fit in data.distort_at_once images.
    for at_once, together in ((1024, 64), (40, 2), (8, 1)):
        module = CifarDataModule(str(tmp_path), batch_size=16, val_size=0, distort_at_once=at_once, download=False)
        module.setup()
        assert module.train_dataloader().together == together
