"""The shrink rules, the masks and the threshold search, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor.masks import Masks, prunable_parameters
from compressor.regularizers import LOBSTER, OutputSensitivity
from compressor.thresholding import PlateauDetector, find_threshold


def test_lobster_update_matches_hand_computation() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    p.grad = torch.tensor([0.5, 0.0, 2.0, -0.25])
    # insensitivity = max(0, 1 - |g|) = [0.5, 1, 0, 0.75]; p - 0.1 * p * insensitivity
    LOBSTER([("w", p)], lmbda=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.8, 0.5, 2.775]))


def test_lobster_is_not_scaled_by_learning_rate() -> None:
    """With lr = 0 the optimizer does nothing, yet LOBSTER still shrinks by lambda."""
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg = LOBSTER(model, lmbda=0.5)
    model(torch.zeros(1, 3)).sum().backward()  # zero input: weight gradients are exactly 0
    opt.step()
    reg.step()
    torch.testing.assert_close(model.weight.detach(), before * 0.5)


def _train_steps(model: nn.Module, masks: Masks | None, steps: int = 20) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = LOBSTER(model, lmbda=1e-3, masks=masks)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        reg.step()


def test_masks_keep_pruned_entries_zero_through_momentum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = Masks(prunable_parameters(model))
    _train_steps(model, masks, steps=3)  # build up momentum first
    masks.prune_below(0.2)
    pruned = {name: ~mask.clone() for name, _, mask in masks}
    assert sum(int(m.sum()) for m in pruned.values()) > 0
    _train_steps(model, masks)
    for name, p, _ in masks:
        assert torch.all(p[pruned[name]] == 0), name


def test_without_masks_momentum_revives_pruned_entries() -> None:
    """The counterpart of the test above: it is the masks that keep the zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0
    _train_steps(model, masks=None)
    assert torch.any(model[0].weight[0, :3] != 0)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def test_output_sensitivity_bound_never_exceeds_exact() -> None:
    model = _mlp()
    x = torch.randn(9, 5)
    exact = OutputSensitivity(model, lmbda=0.1, exact=True)
    bound = OutputSensitivity(model, lmbda=0.1, exact=False)
    out = model(x)
    exact.observe(out)
    bound.observe(out)
    for name, p in prunable_parameters(model):
        s_exact, s_bound = exact.sensitivity(name, p), bound.sensitivity(name, p)
        assert s_exact.shape == p.shape
        assert torch.all(s_bound <= s_exact + 1e-7), name
    # On the hidden layer, different classes pull in different directions: the bound is strictly lower somewhere.
    assert torch.any(bound.sensitivity("0.weight", model[0].weight) < exact.sensitivity("0.weight", model[0].weight) - 1e-6)


def test_output_sensitivity_exact_matches_finite_differences() -> None:
    model = _mlp().double()
    x = torch.randn(9, 5, dtype=torch.float64)
    reg = OutputSensitivity(model, lmbda=0.1, exact=True)
    reg.observe(model(x))
    w = model[0].weight
    eps = 1e-6
    classes = 4
    for (i, j) in [(0, 0), (3, 2), (6, 4)]:
        with torch.no_grad():
            w[i, j] += eps
            up = model(x).mean(0)
            w[i, j] -= 2 * eps
            down = model(x).mean(0)
            w[i, j] += eps
        fd = ((up - down) / (2 * eps)).abs().sum() / classes
        assert math.isclose(reg.sensitivity("0.weight", w)[i, j].item(), fd.item(), rel_tol=1e-5, abs_tol=1e-9)


def test_output_sensitivity_exact_for_single_linear_layer() -> None:
    """y = W x + b: d mean(y_k) / d W_kj = mean(x_j), and only row k depends on W_k."""
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, -2.0, 4.0], [3.0, 0.0, -2.0]])
    reg = OutputSensitivity(layer, lmbda=0.1, exact=True)
    reg.observe(layer(x))
    expected = x.mean(0).abs().expand(2, 3) / 2
    torch.testing.assert_close(reg.sensitivity("weight", layer.weight), expected)
    torch.testing.assert_close(reg.sensitivity("bias", layer.bias), torch.full((2,), 0.5))


def test_plateau_detector_waits_patience_epochs() -> None:
    model = nn.Linear(1, 1)
    det = PlateauDetector(patience=2)
    assert not det.update(1.0, model)
    assert not det.update(0.5, model)     # >1 % better
    assert not det.update(0.499, model)   # better, but by less than 1 %: counts as no improvement
    assert det.update(0.6, model)
    assert det.best_loss == pytest.approx(0.499)


@pytest.mark.parametrize("max_loss", [1.0, 1.5, 10.0, 100.0, 1e9], ids=lambda v: f"max_loss={v:g}")
def test_find_threshold_bisection_on_known_loss_curve(max_loss: float) -> None:
    """Loss = 1 + sum of squares of pruned weights: the answer is computable by hand."""
    values = torch.tensor([0.5, -1.0, 1.5, 2.0, -2.5, 3.0, 3.5, -4.0, 4.5, 5.0])
    p = nn.Parameter(values.clone())
    masks = Masks([("w", p)])

    def evaluate() -> tuple[float, float]:
        lost = values[p.detach() == 0]
        return 1.0 + float((lost**2).sum()), 0.0

    result = find_threshold(masks, evaluate, max_loss=max_loss)
    squares = torch.sort(values.abs()).values ** 2
    expected_k = int(((1.0 + torch.cumsum(squares, 0)) <= max_loss).sum())
    assert result.pruned == expected_k
    assert int((p == 0).sum()) == expected_k
    assert result.val_loss == pytest.approx(evaluate()[0])
    if expected_k:
        assert result.threshold == pytest.approx(float(torch.sort(values.abs()).values[expected_k - 1]))
        assert not bool(masks.masks["w"][values.abs() <= result.threshold].any())


def test_find_threshold_respects_error_cap() -> None:
    values = torch.arange(1.0, 11.0)
    p = nn.Parameter(values.clone())
    masks = Masks([("w", p)])

    def evaluate() -> tuple[float, float]:
        pruned = int((p == 0).sum())
        return 1.0, pruned / 10  # loss never limits; error grows by 0.1 per pruned entry

    result = find_threshold(masks, evaluate, max_loss=2.0, max_error=0.35)
    assert result.pruned == 3
