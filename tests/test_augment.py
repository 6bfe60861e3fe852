"""Augmentations against NumPy transcriptions of tf.image's formulas."""
import numpy as np
import pytest
import torch

from deepcnn import augment


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 3, 32, 32)).astype(np.float32)


def np_standardize(x):
    # tf.image.per_image_standardization: (x - mean) / max(stddev, 1/sqrt(N)) over each image's N values
    out = np.empty_like(x)
    for i, image in enumerate(x):
        out[i] = (image - image.mean()) / max(image.std(), 1 / np.sqrt(image.size))
    return out


def test_standardize_matches_formula(images):
    got = augment.standardize(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, np_standardize(images), rtol=1e-5, atol=1e-5)


def test_standardize_of_flat_image_uses_minimum_std():
    flat = np.full((1, 3, 4, 4), 7.0, dtype=np.float32)
    flat[0, 0, 0, 0] = 8.0
    expected = (flat - flat.mean()) / max(flat.std(), 1 / np.sqrt(flat[0].size))
    np.testing.assert_allclose(augment.standardize(torch.from_numpy(flat)).numpy(), expected, rtol=1e-5)


def np_brightness(x, delta):
    return x + delta[:, None, None, None]


def np_contrast(x, factor):
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * factor[:, None, None, None] + mean


@pytest.mark.parametrize("brightness, contrast", [(True, False), (False, True), (True, True)])
def test_brightness_and_contrast_then_standardize_match_formulas(images, brightness, contrast):
    rng = np.random.default_rng(1)
    delta = rng.uniform(-63, 63, len(images)).astype(np.float32) if brightness else np.zeros(len(images), np.float32)
    factor = rng.uniform(0.2, 1.8, len(images)).astype(np.float32) if contrast else np.ones(len(images), np.float32)
    got = augment.standardized_brightness_contrast(torch.from_numpy(images), torch.from_numpy(delta),
                                                   torch.from_numpy(factor))
    assert got.is_contiguous(memory_format=torch.channels_last)
    expected = np_standardize(np_contrast(np_brightness(images, delta), factor))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_channel_moments_match_numpy_even_far_from_zero():
    rng = np.random.default_rng(2)
    # pixels, and values with a large mean and a small spread, where one-pass formulas lose the variance
    for x in (rng.integers(0, 256, (5, 3, 24, 24)).astype(np.float32),
              (1e4 + rng.normal(0, 0.5, (5, 3, 24, 24))).astype(np.float32)):
        mean, variance = augment.channel_moments(torch.from_numpy(x))
        np.testing.assert_allclose(mean.numpy(), x.astype(np.float64).mean(axis=(2, 3)), rtol=1e-6)
        np.testing.assert_allclose(variance.numpy(), x.astype(np.float64).var(axis=(2, 3)), rtol=1e-3)


def test_flat_image_keeps_minimum_std_after_brightness_and_contrast():
    flat = np.full((1, 3, 4, 4), 7.0, dtype=np.float32)
    got = augment.standardized_brightness_contrast(torch.from_numpy(flat), torch.tensor([5.0]), torch.tensor([1.5]))
    np.testing.assert_allclose(got.numpy(), np.zeros_like(flat), atol=1e-4)  # not NaN: std floored at 1/sqrt(N)
    # channels apart by their means only: their spread is all the variance there is
    steps = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 10.0, 20.0)])[None]
    got = augment.standardized_brightness_contrast(torch.from_numpy(steps), torch.tensor([3.0]), torch.tensor([0.5]))
    np.testing.assert_allclose(got.numpy(), np_standardize(np_contrast(np_brightness(steps, np.array([3.0])),
                                                                        np.array([0.5]))), atol=1e-5)


def test_crop_takes_window_at_offsets(images):
    top = np.array([0, 8, 3, 5, 1, 7])
    left = np.array([8, 0, 4, 2, 6, 7])
    got = augment.crop(torch.from_numpy(images), torch.from_numpy(top), torch.from_numpy(left), 24).numpy()
    expected = np.stack([img[:, t : t + 24, l : l + 24] for img, t, l in zip(images, top, left)])
    np.testing.assert_array_equal(got, expected)


def test_centre_crop_matches_tf_crop_or_pad(images):
    # tf.image.resize_image_with_crop_or_pad crops (32 - 24) // 2 = 4 from the top and left
    np.testing.assert_array_equal(augment.centre_crop(torch.from_numpy(images), 24).numpy(), images[:, :, 4:28, 4:28])


def test_flip_mirrors_only_masked(images):
    mask = np.array([True, False, True, False, False, True])
    got = augment.flip(torch.from_numpy(images), torch.from_numpy(mask)).numpy()
    expected = np.where(mask[:, None, None, None], images[..., ::-1], images)
    np.testing.assert_array_equal(got, expected)


def test_distort_pipeline_matches_formula_with_same_draws(images):
    """distort() = crop, flip, brightness, contrast, standardize, with draws in that order."""
    uint8 = torch.from_numpy(images.astype(np.uint8))
    got = augment.distort(uint8, torch.Generator().manual_seed(5), 24).numpy()

    g = torch.Generator().manual_seed(5)
    n = len(images)
    top = torch.randint(0, 9, (n,), generator=g).numpy()
    left = torch.randint(0, 9, (n,), generator=g).numpy()
    flips = (torch.rand(n, generator=g) < 0.5).numpy()
    delta = (torch.rand(n, generator=g) * 126 - 63).numpy()
    factor = (torch.rand(n, generator=g) * 1.6 + 0.2).numpy()
    x = images.astype(np.uint8).astype(np.float32)
    x = np.stack([img[:, t : t + 24, l : l + 24] for img, t, l in zip(x, top, left)])
    x = np.where(flips[:, None, None, None], x[..., ::-1], x)
    np.testing.assert_allclose(got, np_standardize(np_contrast(np_brightness(x, delta), factor)), rtol=1e-4, atol=1e-4)


def test_crop_offsets_of_an_oblong_image_range_over_each_side():
    images = np.random.default_rng(3).integers(0, 256, size=(64, 3, 40, 32)).astype(np.uint8)
    got = augment.distort(torch.from_numpy(images), torch.Generator().manual_seed(5), 24, flip_prob=0.0,
                          max_brightness=0, contrast=None).numpy()
    g = torch.Generator().manual_seed(5)
    top = torch.randint(0, 17, (64,), generator=g).numpy()  # 40 - 24 + 1 positions down, 32 - 24 + 1 across
    left = torch.randint(0, 9, (64,), generator=g).numpy()
    assert top.max() > 8
    x = np.stack([img[:, t : t + 24, l : l + 24] for img, t, l in zip(images.astype(np.float32), top, left)])
    np.testing.assert_allclose(got, np_standardize(x), rtol=1e-4, atol=1e-4)


def test_distort_output_is_standardized_and_varies_with_seed():
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    n = len(images)
    out = augment.distort(images, torch.Generator().manual_seed(0), 24)
    again = augment.distort(images, torch.Generator().manual_seed(1), 24)
    assert (out != again).any(dim=(1, 2, 3)).float().mean() > 0.9
    assert out.shape == (n, 3, 24, 24)
    flat = out.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(n), atol=1e-3, rtol=0)


def test_preprocess_is_centre_crop_then_standardize(images):
    got = augment.preprocess(torch.from_numpy(images.astype(np.uint8)), 24).numpy()
    x = images.astype(np.uint8).astype(np.float32)[:, :, 4:28, 4:28]
    np.testing.assert_allclose(got, np_standardize(x), rtol=1e-5, atol=1e-5)
