"""Learning-rate schedules against their formulas, parameter groups from config rules, and Muon beside
a second optimizer stepping as one."""
import math

import numpy as np
import pytest
import torch

from deepcnn import optim, schedules
from deepcnn.errors import SettingsError
from deepcnn.models import FastCNN


@pytest.mark.parametrize("step,expected", [(0, 1.0), (249, 1.0), (250, 0.9), (20_000, 0.9**80)])
def test_exponential_staircase_is_the_recipes(step, expected):
    assert math.isclose(schedules.Exponential(0.9, 250)(step), expected, rel_tol=1e-12)


def test_exponential_without_staircase_is_smooth():
    assert math.isclose(schedules.Exponential(0.9, 250, staircase=False)(125), 0.9**0.5)


@pytest.mark.parametrize("total", [10, 100, 1001])
def test_triangle_against_linear_interpolation(total):
    peak_step = round(0.23 * total)
    triangle = schedules.Triangle(total, 0.2, 0.23, 0.07)
    for step in range(total + 1):
        assert triangle(step) == pytest.approx(np.interp(step, [0, peak_step, total], [0.2, 1.0, 0.07]), rel=1e-12)


def test_cosine_warms_up_linearly_then_follows_half_a_cosine():
    cosine = schedules.Cosine(total_steps=110, warmup_steps=10, final=0.1)
    assert [cosine(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    for step in range(10, 111):
        progress = (step - 10) / 100
        assert cosine(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert cosine(110) == pytest.approx(0.1) and schedules.Constant()(12345) == 1.0


def test_rules_give_norm_biases_a_faster_rate_with_the_same_decay_per_step():
    model = FastCNN(widths=(8, 16, 16))
    rules = [{"select": "norm_biases", "lr_scale": 64, "weight_decay_scale": 1 / 64}]
    optimizer = optim.scale_groups(torch.optim.SGD(optim.parameter_groups(model, rules), lr=0.5, weight_decay=0.01))
    rest, fast = optimizer.param_groups
    norm_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in fast["params"]] == [id(p) for p in norm_biases]
    assert fast["lr"] == 32.0 and fast["weight_decay"] == pytest.approx(0.01 / 64)
    assert fast["lr"] * fast["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable  # frozen whitening left out


def test_first_matching_rule_wins_and_unknown_rules_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    rules = [{"select": "norms_and_biases", "weight_decay": 0.0}, {"select": "matrices", "lr_scale": 2.0}]
    optimizer = optim.scale_groups(torch.optim.SGD(optim.parameter_groups(model, rules), lr=0.1, weight_decay=0.5))
    no_decay, matrices = optimizer.param_groups
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0 and no_decay["lr"] == 0.1
    assert [p.shape for p in matrices["params"]] == [(4, 3), (2, 4)] and matrices["lr"] == pytest.approx(0.2)
    with pytest.raises(SettingsError, match=r"optimizer.param_groups\[0\].select: got 'convs'; choose one of"):
        optim.parameter_groups(model, [{"select": "convs"}])
    with pytest.raises(SettingsError, match=r"optimizer.param_groups\[0\]: unknown key 'lr'"):
        optim.parameter_groups(model, [{"select": "all", "lr": 1.0}])


def test_muon_steps_the_matrices_and_the_second_optimizer_the_rest_as_torch_would_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    rest = lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # noqa: E731
    combined = optim.muon(optim.parameter_groups(model, []), rest, lr=0.05, momentum=0.9)
    matrices = [p for p in twin.parameters() if p.ndim == 2]
    others = [p for p in twin.parameters() if p.ndim != 2]
    alone = [torch.optim.Muon(matrices, lr=0.05, momentum=0.9, weight_decay=0.0), torch.optim.SGD(others, lr=0.1,
                                                                                                  momentum=0.9)]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        def closure():
            combined.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        combined.step(closure)
        for o in alone:
            o.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        for o in alone:
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    # A scheduler drives both parts, and the state round-trips into a fresh optimizer.
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, schedules.Exponential(0.5, 1))
    scheduler.step()
    assert [g["lr"] for g in combined.param_groups] == pytest.approx([0.025, 0.05])
    assert combined.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.05)
    again = optim.muon(optim.parameter_groups(model, []), rest, lr=0.05, momentum=0.9)
    again.load_state_dict(combined.state_dict())
    assert again.optimizers[0].state is again.state and again.optimizers[1].param_groups[0]["lr"] == 0.05
    first_matrix = next(p for p in model.parameters() if p.ndim == 2)
    torch.testing.assert_close(again.state[first_matrix]["momentum_buffer"],
                               combined.state[first_matrix]["momentum_buffer"])


def test_muon_takes_every_convolution_and_linear_weight_of_the_networks():
    model = FastCNN(widths=(8, 16, 16))
    combined = optim.muon(optim.parameter_groups(model, []), lambda groups: torch.optim.SGD(groups, lr=0.1))
    muon, rest = combined.optimizers
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert len(convs) == 6 and all(id(c.weight) in in_muon for c in convs) and id(model.head.weight) in in_muon
    assert all(p.ndim == 1 for g in rest.param_groups for p in g["params"])  # BatchNorm biases


def test_a_rest_rule_sends_the_head_to_the_second_optimizer_and_other_optimizers_refuse_it():
    model = FastCNN(widths=(8, 16, 16))
    rules = [{"select": "linear_weights", "rest": True, "lr_scale": 2.0}]
    combined = optim.scale_groups(optim.muon(optim.parameter_groups(model, rules),
                                             lambda groups: torch.optim.SGD(groups, lr=0.1)))
    muon, rest = combined.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.head.weight) not in in_muon and len(in_muon) == 6
    (head_group,) = [g for g in rest.param_groups if any(p is model.head.weight for p in g["params"])]
    assert head_group["lr"] == pytest.approx(0.2) and "rest" not in head_group
    with pytest.raises(SettingsError, match=r"`rest` says which parameters optimizer=muon gives its second "
                                            r"optimizer; SGD has none"):
        optim.scale_groups(torch.optim.SGD(optim.parameter_groups(model, rules), lr=0.1))


def test_normalized_muon_is_torch_muon_on_weights_rescaled_to_norm_sqrt_rows():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(3 * torch.randn(8, 12))
    twin = torch.nn.Parameter(weight.detach().clone())
    normalized = optim.Muon([weight], lr=0.1, momentum=0.6, ns_steps=3, weight_decay=0.0, normalize_weights=True)
    plain = torch.optim.Muon([twin], lr=0.1, momentum=0.6, ns_steps=3, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(8, 12)
        weight.grad, twin.grad = grad.clone(), grad.clone()
        with torch.no_grad():
            twin.mul_(math.sqrt(8) / twin.norm())
        normalized.step()
        plain.step()
        torch.testing.assert_close(weight, twin)
    # The step leaves the norm near sqrt(rows): the update is small beside the rescaled weight.
    assert abs(weight.norm().item() - math.sqrt(8)) < 0.5
