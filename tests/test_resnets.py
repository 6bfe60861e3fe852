"""Residual networks: the papers' sizes, their settings refused in one line before any work, Muon training
their filters, training through src/train.py at both crop sizes, export, resume, and the schedule."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import ROOT, make_classifier, run_cli, save_checkpoint
from deepcnn import augment, optim, schedules
from deepcnn.checkpoints import load_classifier
from deepcnn.errors import SettingsError
from deepcnn.export import export_onnx
from deepcnn.models import DeepCNN, FastCNN, RecipeCNN
from deepcnn.resnets import ResNet, WideResNet

RESNET = {"_target_": "deepcnn.resnets.ResNet", "depth": 8}
WIDE = {"_target_": "deepcnn.resnets.WideResNet", "depth": 10, "widen": 1, "dropout": 0.3}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_resnet_parameters_are_the_papers(depth, millions):
    # He et al. 2016, table 6 (option A shortcuts, which add no parameters).
    assert parameters(ResNet(depth=depth)) == pytest.approx(millions * 1e6, rel=0.02)


@pytest.mark.parametrize("depth, widen, millions", [(16, 4, 2.7), (28, 10, 36.5)])
def test_wide_resnet_parameters_are_the_papers(depth, widen, millions):
    assert parameters(WideResNet(depth=depth, widen=widen)) == pytest.approx(millions * 1e6, rel=0.02)


def test_resnet_layout_and_shortcuts():
    model = ResNet(depth=20)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 and [c.out_channels for c in convs[::6]] == [16, 16, 32, 64]
    # Option B adds one 1x1 projection where each of stages 2 and 3 begins.
    projections = [m for m in ResNet(depth=20, shortcut="B").modules()
                   if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    x = torch.randn(2, 3, 32, 32)
    for network in (model, ResNet(depth=20, preact=True), WideResNet(depth=10, widen=2)):
        assert network(x).shape == (2, 10) and network(x[:, :, :24, :24]).shape == (2, 10)


@pytest.mark.parametrize("build, message", [
    (lambda: ResNet(depth=21), "model.depth: got 21; a CIFAR ResNet's depth is 6n+2 with n >= 1 (20, 32, 44, 56, 110"),
    (lambda: ResNet(depth=2), "model.depth: got 2; a CIFAR ResNet's depth is 6n+2"),
    (lambda: ResNet(shortcut="C"), "model.shortcut: got 'C'; choose A (zero padding) or B (1x1 projections)"),
    (lambda: WideResNet(depth=28.0), "model.depth: got 28.0; a wide ResNet's depth is 6n+4 with n >= 1"),
    (lambda: WideResNet(widen=0), "model.widen: got 0; it must be an integer >= 1"),
    (lambda: WideResNet(dropout=1.0), "model.dropout: got 1.0; it must be a number in [0, 1)"),
])
def test_bad_network_settings_are_refused(build, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("override, message", [
    ("model.depth=51", "model.depth: got 51; a CIFAR ResNet's depth is 6n+2"),
    ("model.shortcut=C", "model.shortcut: got 'C'; choose A"),
])
def test_bad_network_settings_stop_train_py_before_any_work(override, message, tmp_path):
    # The data folder does not exist: the network's settings are checked before it is looked at.
    result = run_cli("train.py", "experiment=resnet", override, f"data.data_dir={tmp_path / 'none'}",
                     "data.download=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"deepcnn: error: {message}")
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("network", [lambda: ResNet(depth=8), lambda: WideResNet(depth=10, widen=1),
                                     lambda: DeepCNN(widths=(8, 16)), lambda: RecipeCNN(channels=8, hidden=(16, 8)),
                                     lambda: FastCNN(widths=(8, 16, 16))])
def test_muon_receives_every_filter_of_a_plain_conv2d_network(network):
    model = network().to(memory_format=torch.channels_last)
    combined = optim.muon(optim.parameter_groups(model, []), lambda groups: torch.optim.SGD(groups, lr=0.1))
    muon, rest = combined.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    filters = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert filters and all(id(w) in in_muon for w in filters)
    assert all(p.ndim == 1 for g in rest.param_groups for p in g["params"])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_muon_updates_a_filter_bank_as_torch_muon_updates_its_matrix(layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, bias=False).to(memory_format=layout)
    matrix = torch.nn.Parameter(conv.weight.detach().reshape(8, -1).clone())
    ours = optim.Muon([conv.weight], lr=0.05, momentum=0.9, weight_decay=0.01)
    theirs = torch.optim.Muon([matrix], lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(8, 6, 3, 3)
        conv.weight.grad = grad.contiguous(memory_format=layout)
        matrix.grad = grad.reshape(8, -1).clone()
        ours.step()
        theirs.step()
    # bf16 Newton-Schulz: the column order of the flattening changes its rounding.
    torch.testing.assert_close(conv.weight.detach().reshape(8, -1), matrix.detach(), rtol=0, atol=2e-3)
    assert conv.weight.is_contiguous(memory_format=layout)


def test_checkpoints_with_filters_stored_as_matrices_keep_loading():
    torch.manual_seed(0)
    fast = {"_target_": "deepcnn.models.FastCNN", "widths": [8, 16, 16]}
    module = make_classifier(model=fast, input_size=32)
    old = {k: (v.reshape(v.shape[0], -1) if v.ndim == 4 and "whiten" not in k else v)
           for k, v in module.state_dict().items()}
    fresh = make_classifier(model=fast, input_size=32)
    fresh.load_state_dict(old)
    for name, tensor in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    # Their Muon momentum buffers were matrices too: a step takes them in the filters' shape.
    conv = fresh.model.groups[0].conv1
    muon = optim.Muon([conv.weight], lr=0.02)
    muon.state[conv.weight]["momentum_buffer"] = torch.ones(conv.out_channels, conv.weight[0].numel())
    conv.weight.grad = torch.zeros_like(conv.weight)
    muon.step()
    assert muon.state[conv.weight]["momentum_buffer"].shape == conv.weight.shape


@pytest.mark.parametrize("model", [RESNET, WIDE], ids=["resnet", "wide_resnet"])
def test_each_family_exports_to_onnx_with_pytorchs_answers(model, tmp_path):
    module = make_classifier(["cat", "dog"], model=model, input_size=32)
    module.eval()
    checkpoint = save_checkpoint(module, tmp_path / "model.ckpt")
    export_onnx(checkpoint, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32)).astype(np.float32)
    [onnx_logits] = session.run(None, {session.get_inputs()[0].name: images})
    loaded = load_classifier(checkpoint)
    with torch.no_grad():
        torch_logits = loaded(augment.preprocess(torch.from_numpy(images), 32)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_multistep_is_gamma_to_the_milestones_passed():
    schedule = schedules.MultiStep(64000, milestones=[0.5, 0.75], gamma=0.1, warmup_steps=400, warmup_factor=0.1)
    lr = {step: 0.1 * schedule(step) for step in (0, 399, 400, 31999, 32000, 47999, 48000, 63999)}
    assert lr == pytest.approx({0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01, 48000: 0.001,
                                63999: 0.001})
    short = schedules.MultiStep(1000, milestones=[0.3, 0.6, 0.8], gamma=0.2)
    assert [short(s) for s in (299, 300, 600, 800)] == pytest.approx([1, 0.2, 0.04, 0.008])


@pytest.mark.slow
@pytest.mark.parametrize("crop", [24, 32])
@pytest.mark.parametrize("experiment, extra", [("resnet", ["model.depth=8"]),
                                               ("resnet", ["model.depth=8", "model.preact=true", "model.shortcut=B"]),
                                               ("wide_resnet", ["model.depth=10", "model.widen=1"])],
                         ids=["resnet", "preact_resnet", "wide_resnet"])
def test_each_family_trains_through_train_py(experiment, extra, crop, shared_data, tmp_path):
    result = run_cli("train.py", f"experiment={experiment}", *extra, f"data.crop_size={crop}",
                     f"data.data_dir={shared_data}", "data.download=false", "trainer.max_steps=5",
                     "data.batch_size=32", "data.val_size=500", "data.eval_batch_size=1000",
                     f"hydra.run.dir={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    model = load_classifier(results["checkpoint"]).model
    assert results["steps"] == 5 and results["parameters"] == parameters(model)
    assert 0.0 <= results["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_a_resumed_resnet_run_ends_identical_to_an_uninterrupted_one(tiny_data, tmp_path):
    args = ["experiment=resnet", "model.depth=8", f"data.data_dir={tiny_data}", "data.download=false",
            "data.batch_size=16", "data.eval_batch_size=64", "data.val_size=32", "trainer.max_steps=12",
            "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "trainer.precision=32", "seed=3"]
    whole = run_cli("train.py", *args, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    process = subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *args, f"hydra.run.dir={cut}"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("step 6/"):
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    resumed = run_cli("train.py", *args, f"hydra.run.dir={cut}", f"ckpt_path={cut / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = (json.loads((d / "results.json").read_text()) for d in (cut, tmp_path / "whole"))
    assert (got["val_accuracy"], got["test_accuracy"]) == (want["val_accuracy"], want["test_accuracy"])
    got, want = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                 for d in (cut, tmp_path / "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
