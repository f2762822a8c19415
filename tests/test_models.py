"""Tests for the model zoo in `models`."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import models
from compressor.errors import CompressError

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available() -> None:
    assert models.available() == ["lenet300", "lenet5", "mobilenetv2", "resnet32", "vgg16"]


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        pytest.param("lenet300", MNIST, 266_610, id="lenet300-mnist"),
        pytest.param("lenet5", MNIST, 431_080, id="lenet5-mnist"),
        pytest.param("resnet32", CIFAR, 466_906, id="resnet32-cifar"),
        pytest.param("vgg16", CIFAR, 14_728_266, id="vgg16-cifar"),
        pytest.param("mobilenetv2", CIFAR, 2_236_682, id="mobilenetv2-cifar"),
    ],
)
def test_parameter_count(name: str, shape: tuple[int, ...], count: int) -> None:
    assert n_params(models.build(name, shape, 10)) == count


def test_lenet300_flat_input_matches_image_input() -> None:
    assert n_params(models.build("lenet300", (784,), 10)) == 266_610


FORWARD_CASES = [
    pytest.param("lenet300", MNIST, 10, id="lenet300-mnist"),
    pytest.param("lenet300", (64,), 10, id="lenet300-flat64"),
    pytest.param("lenet300", DIGITS, 10, id="lenet300-digits"),
    pytest.param("lenet5", MNIST, 10, id="lenet5-mnist"),
    pytest.param("lenet5", CIFAR, 100, id="lenet5-cifar100"),
    pytest.param("lenet5", (1, 16, 20), 3, id="lenet5-min-16x20"),
    pytest.param("resnet32", CIFAR, 10, id="resnet32-cifar"),
    pytest.param("resnet32", MNIST, 10, id="resnet32-mnist"),
    pytest.param("resnet32", DIGITS, 5, id="resnet32-digits"),
    pytest.param("vgg16", CIFAR, 10, id="vgg16-cifar"),
    pytest.param("vgg16", MNIST, 10, id="vgg16-mnist"),
    pytest.param("vgg16", DIGITS, 10, id="vgg16-digits"),
    pytest.param("mobilenetv2", CIFAR, 10, id="mobilenetv2-cifar"),
    pytest.param("mobilenetv2", MNIST, 10, id="mobilenetv2-mnist"),
    pytest.param("mobilenetv2", DIGITS, 7, id="mobilenetv2-digits"),
]


@pytest.mark.parametrize(("name", "shape", "classes"), FORWARD_CASES)
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
def test_forward_shape(name: str, shape: tuple[int, ...], classes: int, batch: int) -> None:
    torch.manual_seed(0)
    model = models.build(name, shape, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, *shape))
    assert out.shape == (batch, classes)
    assert torch.isfinite(out).all()


def test_train_mode_forward_backward() -> None:
    # BatchNorm needs > 1 value per channel in train mode; batch 2 on CIFAR is enough.
    model = models.build("resnet32", CIFAR, 10).train()
    model(torch.randn(2, *CIFAR)).sum().backward()
    assert model.fc.weight.grad is not None


def test_unknown_name() -> None:
    with pytest.raises(CompressError) as info:
        models.build("alexnet", CIFAR, 10)
    msg = str(info.value)
    assert "alexnet" in msg
    for name in models.available():
        assert name in msg
    assert "or pass a checkpoint file" in msg


@pytest.mark.parametrize(
    ("name", "shape", "needle"),
    [
        pytest.param("lenet5", DIGITS, "H, W >= 16", id="lenet5-too-small"),
        pytest.param("lenet5", (1, 28, 15), "H, W >= 16", id="lenet5-narrow"),
        pytest.param("lenet5", (784,), "image input (C, H, W)", id="lenet5-flat"),
        pytest.param("resnet32", (784,), "image input (C, H, W)", id="resnet32-flat"),
        pytest.param("vgg16", (3, 32), "image input (C, H, W)", id="vgg16-2d"),
        pytest.param("mobilenetv2", (0, 32, 32), "image input (C, H, W)", id="mobilenetv2-zero"),
        pytest.param("lenet300", (), "positive sizes", id="lenet300-empty"),
    ],
)
def test_impossible_shape(name: str, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(CompressError) as info:
        models.build(name, shape, 10)
    msg = str(info.value)
    assert name in msg and needle in msg and str(shape) in msg
    assert "\n" not in msg


def test_bad_num_classes() -> None:
    with pytest.raises(CompressError, match="num_classes"):
        models.build("lenet300", MNIST, 0)


SMALL_CASES = [
    pytest.param("lenet300", MNIST, id="lenet300"),
    pytest.param("lenet5", MNIST, id="lenet5"),
    pytest.param("resnet32", DIGITS, id="resnet32"),
    pytest.param("vgg16", DIGITS, id="vgg16"),
    pytest.param("mobilenetv2", DIGITS, id="mobilenetv2"),
]


@pytest.mark.parametrize(("name", "shape"), SMALL_CASES)
def test_fx_trace(name: str, shape: tuple[int, ...]) -> None:
    model = models.build(name, shape, 10).eval()
    traced = torch.fx.symbolic_trace(model)
    # Activations and flatten must be modules so the graph exposes them as call_module nodes.
    nodes = list(traced.graph.nodes)
    assert not any(n.op == "call_function" and "relu" in str(n.target) for n in nodes)
    assert not any(n.op == "call_function" and "flatten" in str(n.target) for n in nodes)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize(("name", "shape"), SMALL_CASES)
def test_eval_forward_deterministic(name: str, shape: tuple[int, ...]) -> None:
    model = models.build(name, shape, 10).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(("name", "shape"), SMALL_CASES)
def test_same_seed_same_weights(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(123)
    a = models.build(name, shape, 10).state_dict()
    torch.manual_seed(123)
    b = models.build(name, shape, 10).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.manual_seed(124)
    c = models.build(name, shape, 10).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].dim() > 1)


def test_resnet_uses_projection_shortcuts() -> None:
    model = models.build("resnet32", CIFAR, 10)
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Sequential) and len(m) == 2
                   and isinstance(m[0], torch.nn.Conv2d) and m[0].kernel_size == (1, 1)]
    assert len(projections) == 2
    traced = torch.fx.symbolic_trace(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 15


def test_mobilenetv2_depthwise_and_residuals() -> None:
    model = models.build("mobilenetv2", CIFAR, 10)
    depthwise = [m for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) == 17
    traced = torch.fx.symbolic_trace(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 10  # (2-1)+(3-1)+(4-1)+(3-1)+(3-1) stride-1, same-width repeats
