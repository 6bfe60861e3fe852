"""The fast preset's pieces: whitening, test-time augmentation, lookahead averaging, the triangle schedule,
BatchNorm-bias learning rates, the whitening bias frozen partway, alternating flips, progressive resizing and
the in-memory dataset."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, write_dataset, write_records
from deepcnn.augment import distort, preprocess, shrink, tta_views
from deepcnn.averaging import Lookahead
from deepcnn.datamodule import CifarDataModule, TrainStream, step_seed
from deepcnn.errors import SettingsError
from deepcnn.freezing import FreezeWhiteningBias
from deepcnn.models import FastCNN, whitening_filters
from deepcnn.records import open_dataset


def test_whitened_patches_have_identity_covariance():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 1, 16, 16, generator=g)
    # strongly correlated channels and neighbouring pixels, like natural images
    images = torch.cat([base, 0.8 * base + 0.2 * torch.randn(400, 1, 16, 16, generator=g),
                        base.roll(1, -1) + 0.1 * torch.randn(400, 1, 16, 16, generator=g)], dim=1)
    filters = whitening_filters(images, size=2, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    out = torch.nn.functional.conv2d(images.double(), filters[:12].double())
    features = out.permute(0, 2, 3, 1).reshape(-1, 12)
    features = features - features.mean(0)
    covariance = features.T @ features / len(features)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)


def test_fast_cnn_whitening_init_freezes_filters():
    model = FastCNN(num_classes=5, widths=(8, 16, 16))
    model.init_whitening(torch.rand(64, 3, 32, 32))
    assert not model.whiten.weight.requires_grad
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_tta_is_the_weighted_mean_of_its_views():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.rand(5, 3, 8, 8)
    model(x)
    for level, count in ((0, 1), (1, 2), (2, 6)):
        views = tta_views(x, level)
        assert len(views) == count and abs(sum(w for w, _ in views) - 1) < 1e-12
        assert all(v.shape == x.shape for _, v in views)
    views = tta_views(x, 2)
    flipped = x.flip(-1)
    up_left = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., :8, :8]
    expected = (model(x) + model(flipped)) / 4 + (model(up_left) + model(up_left.flip(-1))) / 8
    down_right = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., 2:, 2:]
    expected = expected + (model(down_right) + model(down_right.flip(-1))) / 8
    torch.testing.assert_close(sum(w * model(v) for w, v in views), expected)


def test_lookahead_arithmetic():
    net = torch.nn.Linear(2, 1, bias=False)
    lookahead = Lookahead(every=5, max_decay=0.5, power=1.0)
    with torch.no_grad():
        net.weight.fill_(1.0)
    lookahead.update(net, decay=0.5)
    torch.testing.assert_close(net.weight, torch.ones(1, 2))
    with torch.no_grad():
        net.weight.fill_(3.0)
    lookahead.update(net, decay=0.25)  # 0.25 * 1 + 0.75 * 3
    torch.testing.assert_close(net.weight, torch.full((1, 2), 2.5))
    torch.testing.assert_close(lookahead.average["weight"], torch.full((1, 2), 2.5))
    assert lookahead.decay(50, 100) == 0.25 and lookahead.decay(0, 100) == 0.0


def test_alternating_flips_mirror_each_image_in_every_other_epoch(tmp_path):
    records = open_dataset(write_dataset(tmp_path, per_file=40, train_files=2)).train
    stream = TrainStream(records, 16, seed=7, alternate_flips=True)
    assert stream.steps_per_epoch == 5
    mirrored = []
    for epoch in range(3):
        seen = np.zeros(len(records), dtype=int) - 1
        for step in range(epoch * 5, epoch * 5 + 5):
            _, _, _, mirror = stream.batch(step)
            seen[stream.indices(step)] = mirror.numpy()
        used = seen >= 0
        mirrored.append((seen, used))
    for (a, used_a), (b, used_b) in zip(mirrored, mirrored[1:]):
        both = used_a & used_b
        assert both.sum() > 40 and np.all(a[both] != b[both])
    assert 20 < mirrored[0][0][mirrored[0][1]].sum() < 60
    assert TrainStream(records, 16, seed=7).batch(0)[3] is None


def test_given_mirror_replaces_the_coin_and_nothing_else():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mirror = torch.tensor([True, False, True, True, False, False])
    options = dict(pad=2, max_brightness=0, contrast=None)
    got = distort(images, torch.Generator().manual_seed(3), 32, mirror=mirror, **options)
    unflipped = distort(images, torch.Generator().manual_seed(3), 32, flip_prob=0.0, **options)
    torch.testing.assert_close(got, torch.where(mirror[:, None, None, None], unflipped.flip(-1), unflipped))


def test_dataset_in_memory_gives_the_streamed_batches(tmp_path):
    root = write_dataset(tmp_path, per_file=30, train_files=3)
    streamed, loaded = open_dataset(root), open_dataset(root)
    loaded.train = loaded.train.loaded()
    order = np.random.default_rng(0).permutation(len(streamed.train))[:50]
    for got, expected in zip(loaded.train.batch(order), streamed.train.batch(order)):
        np.testing.assert_array_equal(got, expected)


def test_whitening_sample_spans_class_sorted_records(tmp_path):
    # A dataset converted from an image folder lists its records class by class: the first images of the
    # training files would all be of one class.
    folder = write_dataset(tmp_path, classes=("cat", "dog", "ship", "frog"), train_files=0)
    labels = np.repeat(np.arange(4), 300)
    pixels = write_records(folder / "data_batch_1.bin", labels)
    datamodule = CifarDataModule(data_dir=str(tmp_path), crop_size=32, val_size=0, download=False)
    sample = datamodule.whitening_sample(count=200)
    every = preprocess(torch.from_numpy(pixels.reshape(-1, 3, 32, 32)), 32)
    index = {image[:, 0, :4].numpy().tobytes(): i for i, image in enumerate(every)}
    drawn = np.unique([index[image[:, 0, :4].numpy().tobytes()] for image in sample])
    torch.testing.assert_close(sample, every[drawn])
    assert len(drawn) == 200
    assert np.bincount(labels[drawn], minlength=4).min() > 30


def test_fast_preset_trains_with_whitening_from_data_muon_tta_and_lookahead(tiny_data, tmp_path):
    run_dir = tmp_path / "fast"
    result = run_cli("train.py", "experiment=fast", "model.widths=[8,16,16]",
                     "callbacks.lookahead.every=2", "data.val_size=0", f"data.data_dir={tiny_data}",
                     "data.batch_size=16", "trainer.max_steps=4", "trainer.precision=32", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["tta"] == 2
    assert "Lookahead" in saved["callbacks"]
    # Muon's filters, then SGD's whitening bias, BatchNorm biases (64x) and head, decayed to zero at the end.
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [group["initial_lr"] for group in groups] == pytest.approx([0.24, 1.5, 1.5 * 64, 1.5])
    assert [group["lr"] for group in groups] == [0.0] * 4
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    datamodule = CifarDataModule(data_dir=str(tiny_data), crop_size=32, val_size=0, download=False)
    datamodule.setup()
    expected = whitening_filters(datamodule.whitening_sample())
    torch.testing.assert_close(saved["state_dict"]["model.whiten.weight"], expected)


def test_early_steps_train_on_shrunken_images_then_full_size(tmp_path):
    root = write_dataset(tmp_path, per_file=40, train_files=1)
    datamodule = CifarDataModule(data_dir=str(root), batch_size=8, crop_size=32, val_size=0, download=False,
                                 augment={"pad": 2, "max_brightness": 0, "contrast": None},
                                 early_size=24, early_steps=3)
    datamodule.setup()
    stream = TrainStream(datamodule.train_records, 8, seed=0)
    ready = list(datamodule.ready_batches([stream.batch(step) for step in range(5)]))  # distorted together
    for step, size in ((0, 24), (2, 24), (3, 32), (4, 32)):
        images, labels = ready[step]
        assert images.shape == (8, 3, size, size) and images.is_contiguous(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(step_seed(0, step))
        full = distort(stream.batch(step)[0], generator, 32, pad=2, max_brightness=0, contrast=None)
        expected = F.interpolate(full, size=(24, 24), mode="bilinear", antialias=True) if size == 24 else full
        torch.testing.assert_close(images, expected)
    # Shrinking averages neighbouring pixels: a flat image stays flat.
    flat = torch.full((2, 3, 32, 32), 0.7)
    torch.testing.assert_close(shrink(flat, 24), torch.full((2, 3, 24, 24), 0.7))
    assert datamodule.state_dict()["data.early_steps"] == 3


def test_early_size_larger_than_the_crop_is_refused():
    with pytest.raises(SettingsError, match=r"data.early_size=32: the early steps' image side must be between 1 "
                                            r"and data.crop_size=24"):
        CifarDataModule(data_dir="unused", crop_size=24, early_size=32, early_steps=10)


@pytest.mark.parametrize("world_size, frozen_from", [(1, 38), (2, None)])
def test_the_whitening_bias_stops_learning_at_its_fraction_of_the_steps(world_size, frozen_from, caplog):
    module = SimpleNamespace(model=FastCNN(widths=(8, 8, 8)))
    freeze = FreezeWhiteningBias(fraction=0.375)
    trainer = SimpleNamespace(max_steps=100, world_size=world_size, global_step=0)
    freeze.on_train_start(trainer, module)
    learning = []
    for step in range(100):
        trainer.global_step = step
        freeze.on_train_batch_start(trainer, module, None, step)
        learning.append(module.model.whiten.bias.requires_grad)
    assert learning == [frozen_from is None or step < frozen_from for step in range(100)]
    if frozen_from:
        # The backward pass then ends at the first convolution.
        module.model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert module.model.whiten.bias.grad is None and module.model.groups[0].conv1.weight.grad is not None
    else:
        assert "under DDP the whitening bias keeps learning" in caplog.text


def test_freezing_the_whitening_bias_of_a_network_without_one_says_so(caplog):
    freeze = FreezeWhiteningBias()
    freeze.on_train_start(SimpleNamespace(world_size=1), SimpleNamespace(model=torch.nn.Linear(2, 2)))
    assert "Linear has no whitening bias to freeze" in caplog.text
