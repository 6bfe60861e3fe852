"""The recipe network's pieces against TensorFlow's definitions, and the learning-rate schedule."""
import math

import numpy as np
import pytest
import torch

from deepcnn.models import DeepCNN, RecipeCNN, local_response_norm, same_max_pool
from deepcnn.patch_gradients import PatchGradConv2d, use_patch_gradients


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_lrn_computes_in_float32_under_bf16_autocast(device, dtype):
    # The denominator 2 + 1e-3 * sum(x^2) lies in [2, 3.4] here, where bf16's spacing is 1/64: computed
    # in bf16, as autocast would, the output is off by up to 1% (float32 input) or 1.2% (bf16 input).
    values = torch.randn(4, 64, 6, 6, generator=torch.Generator().manual_seed(2)).mul(6).bfloat16().double()
    x = values.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(4, 64 * 6 * 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = local_response_norm(x)
    y.flatten(1).backward(grad.to(device, torch.float32))
    reference = values.clone().requires_grad_()
    local_response_norm(reference).flatten(1).backward(grad)
    assert y.dtype == torch.float32 and x.grad.dtype == dtype
    np.testing.assert_allclose(y.detach().cpu().numpy(), np_lrn(values.numpy()), rtol=1e-5)
    # A bf16 input gets its gradient rounded to bf16 (2^-9 relative), and only that.
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.grad.cpu().double(), reference.grad, rtol=rtol, atol=1e-6)


def np_same_max_pool(x, kernel=3, stride=2):
    # tf.nn.max_pool(padding="SAME"): ceil(n / stride) outputs per axis, pad_total = max((out - 1) * stride
    # + kernel - n, 0), pad_total // 2 before, the rest after; padding never wins, so windows are clipped.
    def layout(n):
        out = -(-n // stride)
        return out, max((out - 1) * stride + kernel - n, 0) // 2

    (rows, top), (cols, left) = layout(x.shape[2]), layout(x.shape[3])
    out = np.empty(x.shape[:2] + (rows, cols), dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            r, c = i * stride - top, j * stride - left
            out[:, :, i, j] = x[:, :, max(r, 0) : r + kernel, max(c, 0) : c + kernel].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("side", [3, 4, *range(8, 33)])
def test_same_max_pool_matches_tensorflow_padding(side):
    # All values negative: a zero padding would win at the borders.
    x = np.random.default_rng(1).normal(-5, 1, size=(2, 3, side, side))
    np.testing.assert_array_equal(same_max_pool(torch.from_numpy(x), side).numpy(), np_same_max_pool(x))


@pytest.mark.parametrize("size", range(8, 33))
def test_recipe_cnn_any_input_size_runs_forward_and_backward(size):
    model = RecipeCNN(num_classes=10, input_size=size, channels=8, hidden=(16, 8))
    model(torch.randn(2, 3, size, size)).square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert model.hidden[0].in_features == 8 * math.ceil(size / 4) ** 2


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


def patched(*args, **kwargs) -> torch.nn.Conv2d:
    return use_patch_gradients(torch.nn.Sequential(torch.nn.Conv2d(*args, **kwargs)))[0]


def test_the_patch_gradient_swap_keeps_the_convolution_its_parameters_and_its_keys():
    plain = torch.nn.Conv2d(6, 4, 3, padding=1)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.ReLU())
    weight = model[0].weight
    use_patch_gradients(model)
    assert type(model[0]) is PatchGradConv2d and model[0].weight is weight
    model.load_state_dict({f"0.{k}": v for k, v in plain.state_dict().items()})
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model[0](x), plain(x))


@pytest.mark.parametrize("kernel, padding, bias, side", [(3, 1, False, 3), (3, 1, True, 5), (5, 2, True, 4),
                                                         (3, 0, False, 7), (2, 1, True, 4)])
def test_small_maps_take_the_weight_gradient_from_unfolded_patches_and_it_is_the_convolutions(kernel, padding, bias,
                                                                                               side):
    torch.manual_seed(0)
    conv = patched(8, 6, kernel, padding=padding, bias=bias).double()
    x = torch.randn(4, 8, side, side, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    assert conv.patch_gradient(x)
    g = torch.randn_like(conv(x))

    def gradients(forward):
        conv.zero_grad()
        leaf = x.clone().requires_grad_()
        forward(leaf).backward(g)
        return [leaf.grad, conv.weight.grad] + ([conv.bias.grad] if bias else [])

    for fast, plain in zip(gradients(conv), gradients(lambda t: conv._conv_forward(t, conv.weight, conv.bias))):
        torch.testing.assert_close(fast, plain)


def test_patch_gradients_under_bf16_autocast_match_oneDNNs():
    torch.manual_seed(0)
    conv = patched(64, 64, 3, padding=1, bias=False)
    x = torch.randn(32, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    grads = []
    for forward in (conv, lambda t: conv._conv_forward(t, conv.weight, None)):
        conv.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            y = forward(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append(conv.weight.grad)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2 * grads[1].abs().max().item())


def test_patch_gradients_only_for_training_passes_over_small_maps():
    conv = patched(4, 4, 3, padding=1)
    assert conv.patch_gradient(torch.zeros(1, 4, 5, 5))
    assert not conv.patch_gradient(torch.zeros(1, 4, 6, 6))  # 36 positions: oneDNN's own gradient is faster
    with torch.no_grad():
        assert not conv.patch_gradient(torch.zeros(1, 4, 5, 5))
    assert not patched(4, 4, 3, padding=1, stride=2).patch_gradient(torch.zeros(1, 4, 5, 5))
