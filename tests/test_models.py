"""The recipe network's pieces against TensorFlow's definitions, and the learning-rate schedule."""
import math

import numpy as np
import pytest
import torch

from deepcnn.models import DeepCNN, RecipeCNN, local_response_norm, same_max_pool


def np_lrn(x, depth_radius=5, bias=2.0, alpha=1e-3, beta=0.75):
    # tf.nn.lrn: sqr_sum[c] = sum(x[c - r : c + r + 1] ** 2); out = x / (bias + alpha * sqr_sum) ** beta
    out = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        window = x[:, max(0, c - depth_radius) : min(channels, c + depth_radius + 1)]
        out[:, c] = x[:, c] / (bias + alpha * (window**2).sum(axis=1)) ** beta
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_matches_tensorflow_formula(channels_last):
    x = np.random.default_rng(0).normal(0, 30, size=(3, 64, 5, 5)).astype(np.float64)
    t = torch.from_numpy(x)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(local_response_norm(t).numpy(), np_lrn(x), rtol=1e-10)


def test_lrn_differs_from_torch_local_response_norm():
    """torch divides alpha by the window size; ours must not."""
    x = torch.randn(2, 64, 3, 3, dtype=torch.float64) * 30
    ours = local_response_norm(x)
    torchs = torch.nn.functional.local_response_norm(x, size=11, alpha=1e-3, beta=0.75, k=2.0)
    assert not torch.allclose(ours, torchs)
    torch.testing.assert_close(ours, torch.nn.functional.local_response_norm(x, 11, alpha=11e-3, beta=0.75, k=2.0))


def test_lrn_gradient():
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, depth_radius=2), (x,))


def test_same_max_pool_matches_tensorflow_padding():
    # TF 'SAME', 3x3 stride 2 on 24: 12 outputs, windows [2i, 2i+2], the last clipped at the border.
    x = np.random.default_rng(1).normal(size=(1, 1, 24, 24))
    got = same_max_pool(torch.from_numpy(x)).numpy()
    expected = np.array([[x[0, 0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(12)] for i in range(12)])
    np.testing.assert_array_equal(got[0, 0], expected)


def test_recipe_cnn_shapes_and_init():
    model = RecipeCNN(num_classes=10)
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 10)
    weights = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("weight")])
    assert weights.abs().max() <= 0.1 and abs(weights.std().item() - 0.05 * 0.88) < 0.003
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith("bias"))
    assert [layer.out_features for layer in model.hidden] == [384, 192]
    assert model.hidden[0].in_features == 6 * 6 * 64


def test_deep_cnn_depth_from_config():
    model = DeepCNN(num_classes=7, widths=(16, 32), convs_per_block=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 16, 32, 32, 32]
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 7)
