"""Tests for compressor.shrink: physical removal of dead neurons/channels.

Every case zeroes some channels, shrinks, and checks three things against numbers computed
here independently of the shrink code: the outputs (random normal inputs, batch 3, different
from the example's batch 2), each layer's weight shape after shrinking, and the parameter total.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import models
from compressor.errors import CompressError
from compressor.shrink import (
    ShrinkResult,
    UnsupportedModel,
    channel_groups,
    dead_channels,
    shrink,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the machine is shared; two intra-op threads oversubscribe it badly
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_params(mod: nn.Module, shape: tuple[int, ...]) -> int:
    """Parameters of `mod` if its weight had `shape` (its bias following dim 0)."""
    if not shape:
        return 0
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return 2 * shape[0] if mod.affine else 0
    return math.prod(shape) + (shape[0] if mod.bias is not None else 0)


def randomize_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    """Random affine parameters and real (batch-estimated) running statistics, then eval."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
            bn.momentum = 1.0
        if bns:
            model.train()
            model(torch.randn(8, *shape, generator=g))
        for bn in bns:
            bn.momentum = 0.1
    model.eval()


def zero_rows(mod: nn.Module, idx: list[int], bias: float | None = 0.0) -> None:
    """Zero output channels `idx` of a Linear/Conv (weight rows), and set their bias."""
    with torch.no_grad():
        mod.weight[idx] = 0
        if mod.bias is not None and bias is not None:
            mod.bias[idx] = bias


def zero_bn(bn: nn.Module, idx: list[int]) -> None:
    with torch.no_grad():
        bn.weight[idx] = 0
        bn.bias[idx] = 0


def check(model: nn.Module, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]],
          **kw) -> ShrinkResult:
    """Shrink `model`; check outputs, the plan (expected after-shapes) and the parameter total."""
    model.eval()
    x = torch.randn(2, *shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = shrink(model, x, **kw)
    # the input model is left alone
    after_state = model.state_dict()
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    xs = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(res.model(xs), model(xs), rtol=1e-4, atol=1e-5)
    mods = dict(model.named_modules())
    plan = {c.name: c for c in res.plan}
    for name, shp in expected.items():
        assert plan[name].after == shp, f"{name}: {plan[name].after} != expected {shp}"
    for c in res.plan:
        if c.name not in expected:
            assert c.after == c.before, f"{c.name} changed unexpectedly: {c.before} -> {c.after}"
    removed = sum(layer_params(mods[n], tuple(mods[n].weight.shape)) - layer_params(mods[n], shp)
                  for n, shp in expected.items())
    assert res.params_before == n_params(model)
    assert res.params_after == n_params(res.model)
    assert res.params_after == n_params(model) - removed
    return res


def onnx_parity(model: nn.Module, shape: tuple[int, ...]) -> None:
    import onnxruntime as ort

    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # raised inside torch's exporter
        prog = torch.onnx.export(
            model, (x,), dynamo=True, external_data=False, opset_version=18,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
        )
    proto = prog.model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"ScatterElements", "ScatterND"}, ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        xb = torch.randn(batch, *shape)
        got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        with torch.no_grad():
            want = model(xb).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# zoo models: coupled groups written out by hand from the architectures
# --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """Coupled channels: producers' rows, BatchNorms, depthwise filters, consumers' columns."""

    width: int
    out: list[str] = field(default_factory=list)
    bn: list[str] = field(default_factory=list)
    dw: list[str] = field(default_factory=list)
    inp: list[tuple[str, int]] = field(default_factory=list)  # (consumer, features per channel)


def groups_lenet300(m: nn.Module) -> list[Group]:
    return [Group(300, out=["fc1"], inp=[("fc2", 1)]), Group(100, out=["fc2"], inp=[("fc3", 1)])]


def groups_lenet5(m: nn.Module) -> list[Group]:
    return [
        Group(20, out=["conv1"], inp=[("conv2", 1)]),
        Group(50, out=["conv2"], inp=[("fc1", 16)]),
        Group(500, out=["fc1"], inp=[("fc2", 1)]),
    ]


def groups_vgg16(m: nn.Module) -> list[Group]:
    convs = [i for i, l in enumerate(m.features) if isinstance(l, nn.Conv2d)]
    out = []
    for j, i in enumerate(convs):
        nxt = [(f"features.{convs[j + 1]}", 1)] if j + 1 < len(convs) else [("fc", 1)]
        out.append(Group(m.features[i].out_channels, out=[f"features.{i}"], bn=[f"features.{i + 1}"], inp=nxt))
    return out


def groups_resnet32(m: nn.Module) -> list[Group]:
    out = []
    stream = Group(16, out=["conv1"], bn=["bn1"])
    for s in ("layer1", "layer2", "layer3"):
        for b, block in enumerate(getattr(m, s)):
            p = f"{s}.{b}"
            stream.inp.append((f"{p}.conv1", 1))  # conv1 reads the block's input stream
            if isinstance(block.shortcut, nn.Sequential):
                stream.inp.append((f"{p}.shortcut.0", 1))
                out.append(stream)
                stream = Group(block.conv2.out_channels, out=[f"{p}.shortcut.0"], bn=[f"{p}.shortcut.1"])
            out.append(Group(block.conv1.out_channels, out=[f"{p}.conv1"], bn=[f"{p}.bn1"], inp=[(f"{p}.conv2", 1)]))
            stream.out.append(f"{p}.conv2")
            stream.bn.append(f"{p}.bn2")
    stream.inp.append(("fc", 1))
    out.append(stream)
    return out


def groups_mobilenetv2(m: nn.Module) -> list[Group]:
    out = []
    f = m.features
    cur = Group(32, out=["features.0"], bn=["features.1"])  # stem; 'features.2' is ReLU6
    for i in range(3, len(f)):
        layer = f[i]
        if not isinstance(layer, models.mobilenet.InvertedResidual):
            break
        p = f"features.{i}.conv"
        n = len(layer.conv)
        if n == 8:  # expand 1x1, BN, ReLU6, dw, BN, ReLU6, project, BN
            cur.inp.append((f"{p}.0", 1))
            hidden = Group(layer.conv[0].out_channels, out=[f"{p}.0"], bn=[f"{p}.1", f"{p}.4"], dw=[f"{p}.3"],
                           inp=[(f"{p}.6", 1)])
            out.append(hidden)
            proj = 6
        else:  # no expansion: the dw conv reads the stream itself
            cur.dw.append(f"{p}.0")
            cur.bn.append(f"{p}.1")
            cur.inp.append((f"{p}.3", 1))
            proj = 3
        if layer.use_residual:
            cur.out.append(f"{p}.{proj}")
            cur.bn.append(f"{p}.{proj + 1}")
        else:
            out.append(cur)
            cur = Group(layer.conv[proj].out_channels, out=[f"{p}.{proj}"], bn=[f"{p}.{proj + 1}"])
    head = f"features.{len(f) - 3}"
    cur.inp.append((head, 1))
    out.append(cur)
    out.append(Group(f[len(f) - 3].out_channels, out=[head], bn=[f"features.{len(f) - 2}"], inp=[("fc", 1)]))
    return out


def zero_groups(model: nn.Module, groups: list[Group], frac: float, seed: int) -> dict[str, tuple[int, ...]]:
    """Zero `frac` of every group's channels; return the expected after-shapes."""
    rng = np.random.default_rng(seed)
    mods = dict(model.named_modules())
    keep_out: dict[str, np.ndarray] = {}
    keep_in: dict[str, np.ndarray] = {}
    for g in groups:
        dead = rng.choice(g.width, size=min(g.width - 1, round(frac * g.width)), replace=False).tolist()
        alive = np.ones(g.width, dtype=bool)
        alive[dead] = False
        for n in g.out + g.dw:
            zero_rows(mods[n], dead)
            keep_out[n] = alive
        for n in g.bn:
            zero_bn(mods[n], dead)
            keep_out[n] = alive
        for n, block in g.inp:
            keep_in[n] = np.repeat(alive, block)
    expected = {}
    for n in set(keep_out) | set(keep_in):
        mod = mods[n]
        w = tuple(mod.weight.shape)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            expected[n] = (int(keep_out[n].sum()),)
        elif isinstance(mod, nn.Conv2d) and mod.groups > 1:  # depthwise
            expected[n] = (int(keep_out[n].sum()), 1, *w[2:])
        else:
            o = int(keep_out[n].sum()) if n in keep_out else w[0]
            i = int(keep_in[n].sum()) if n in keep_in else w[1]
            expected[n] = (o, i, *w[2:])
    return {n: s for n, s in expected.items() if s != tuple(mods[n].weight.shape)}


ZOO = [
    pytest.param("lenet300", MNIST, groups_lenet300, id="lenet300"),
    pytest.param("lenet5", MNIST, groups_lenet5, id="lenet5"),
    pytest.param("resnet32", CIFAR, groups_resnet32, id="resnet32"),
    pytest.param("vgg16", CIFAR, groups_vgg16, id="vgg16"),
    pytest.param("mobilenetv2", CIFAR, groups_mobilenetv2, id="mobilenetv2"),
]


@pytest.mark.parametrize(("name", "shape", "groups"), ZOO)
def test_zoo(name: str, shape: tuple[int, ...], groups: Callable[[nn.Module], list[Group]]) -> None:
    torch.manual_seed(1)
    m = models.build(name, shape, 10)
    randomize_bn(m, shape)
    expected = zero_groups(m, groups(m), frac=0.5, seed=2)
    res = check(m, shape, expected)
    assert res.notes == []
    if name in ("lenet5", "resnet32"):
        onnx_parity(res.model, shape)


@pytest.mark.parametrize(("name", "shape", "groups"), ZOO)
def test_channel_groups_match_hand_written(name: str, shape: tuple[int, ...], groups: Callable) -> None:
    m = models.build(name, shape, 10).eval()
    mine = {frozenset(n for n, r in g.members if r != "in") for g in channel_groups(m, torch.randn(1, *shape))
            if not g.pinned}
    theirs = {frozenset(g.out + g.bn + g.dw) for g in groups(m)}
    assert mine == theirs


def test_untouched_model_shrinks_to_itself() -> None:
    m = models.build("resnet32", CIFAR, 10)
    randomize_bn(m, CIFAR)
    res = check(m, CIFAR, {})
    assert res.params_after == res.params_before


# --------------------------------------------------------------------------------------------
# architectures written for the purpose
# --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.c1(x)))
        x = self.relu(x + self.bn2(self.c2(y)))  # relu module reused: fine, it has no state
        return self.fc(torch.flatten(self.pool(x), 1))


def test_residual_add_keeps_union_of_alive_channels() -> None:
    m = Residual()
    randomize_bn(m, (3, 8, 8))
    zero_rows(m.stem, [1, 3, 5]); zero_bn(m.bn0, [1, 3, 5])
    zero_rows(m.c2, [1, 5]); zero_bn(m.bn2, [1, 5])  # channel 3 stays alive in the branch
    zero_rows(m.c1, [0, 4]); zero_bn(m.bn1, [0, 4])
    check(m, (3, 8, 8), {
        "stem": (6, 3, 3, 3), "bn0": (6,), "c1": (4, 6, 3, 3), "bn1": (4,),
        "c2": (6, 4, 3, 3), "bn2": (6,), "fc": (5, 6),
    })


def test_residual_fuse_bn_and_export() -> None:
    m = Residual()
    randomize_bn(m, (3, 8, 8))
    zero_rows(m.c1, [0, 4]); zero_bn(m.bn1, [0, 4])
    x = torch.randn(2, 3, 8, 8)
    res = shrink(m, x, fuse_bn=True)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in res.model.modules())
    plan = {c.name: c for c in res.plan}
    assert plan["bn1"].after == () and plan["c1"].after == (4, 8, 3, 3)
    # BN (2 per channel) gone; the stem/c1/c2 biases already existed
    assert res.params_after == n_params(m) - (2 * 8 + 2 * 6 + 2 * 8) - 2 * (8 * 9 + 1) - 8 * 2 * 9
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.model(xs), m(xs), rtol=1e-4, atol=1e-5)
    onnx_parity(res.model, (3, 8, 8))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        y = torch.relu(self.c(y))
        return self.fc(y.mean((2, 3)))


def test_concat_offsets() -> None:
    m = Concat()
    zero_rows(m.a, [1, 4])
    zero_rows(m.b, [0, 9], bias=-1.0)  # relu(-1) = 0: removable even before a padded conv
    res = check(m, (3, 8, 8), {"a": (4, 3, 3, 3), "b": (8, 3, 1, 1), "c": (8, 12, 3, 3)})
    onnx_parity(res.model, (3, 8, 8))


def test_concat_whole_dead_branch_disappears() -> None:
    m = Concat()
    zero_rows(m.b, list(range(10)), bias=-0.3)  # relu -> exactly zero: even the padded c drops it
    res = check(m, (3, 8, 8), {"b": (), "c": (8, 6, 3, 3)})
    assert "b" not in dict(res.model.named_modules())


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(3, 4, 3, padding=1)
        self.a2 = nn.Conv2d(4, 6, 3, padding=1)
        self.b1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a2(torch.relu(self.a1(x)))
        b = self.b2(torch.relu(self.b1(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(a + b), 1).flatten(1))


def test_dead_branch_into_add_keeps_one_channel() -> None:
    m = Branches()
    zero_rows(m.b1, list(range(4)))
    # b2 still adds its bias to every channel of the sum: it must stay, reading one channel
    res = check(m, (3, 8, 8), {"b1": (1, 3, 3, 3), "b2": (6, 1, 1, 1)})
    assert any("at least one input" in n for n in res.notes)


class Depthwise(nn.Module):
    def __init__(self, project_bias: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1, bias=project_bias)
        self.bn3 = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.expand(x)))
        y = self.act(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(self.drop(self.flatten(self.pool(x))))


@pytest.mark.parametrize("project_bias", [False, True], ids=["fold-into-bn-mean", "fold-into-bias"])
def test_depthwise(project_bias: bool) -> None:
    m = Depthwise(project_bias)
    randomize_bn(m, (3, 8, 8))
    # dead expand channels: dw sees zeros, bn2 turns them into a non-zero constant that
    # the unpadded 1x1 project folds (into bn3's running mean when it has no bias)
    zero_rows(m.expand, [2, 7]); zero_bn(m.bn1, [2, 7])
    zero_rows(m.dw, [5])  # a dead depthwise filter frees its expand channel too
    res = check(m, (3, 8, 8), {
        "expand": (9, 4, 1, 1), "bn1": (9,), "dw": (9, 1, 3, 3), "bn2": (9,), "project": (4, 9, 1, 1),
    })
    assert res.notes == []
    onnx_parity(res.model, (3, 8, 8))


class Grouped(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c3(torch.relu(self.g(torch.relu(self.c1(x))))))
        return self.fc(torch.amax(y, dim=(2, 3)))


def test_grouped_conv_groups4_drops_a_whole_group() -> None:
    m = Grouped(4)
    # dead inputs per group: {0,1}, {4}, {}, all of group 3
    zero_rows(m.c1, [0, 1, 4, 12, 13, 14, 15])
    # group 3 then only outputs its bias (folded by the 1x1 c3) and goes; the other groups
    # must keep equal widths, so groups 0 and 1 keep their dead inputs
    res = check(m, (3, 8, 8), {"c1": (12, 3, 3, 3), "g": (12, 4, 3, 3), "c3": (8, 12, 1, 1)})
    assert dict(res.model.named_modules())["g"].groups == 3
    assert any("g: kept" in n for n in res.notes)


def test_grouped_conv_groups2_equal_widths() -> None:
    m = Grouped(2)
    zero_rows(m.c1, [0, 3, 9, 12])  # two dead inputs per group
    zero_rows(m.g, [2, 10, 11])  # one / two dead outputs: group widths 7 and 6 -> both 7
    res = check(m, (3, 8, 8), {"c1": (12, 3, 3, 3), "g": (14, 6, 3, 3), "c3": (8, 14, 1, 1)})
    assert dict(res.model.named_modules())["g"].groups == 2
    onnx_parity(res.model, (3, 8, 8))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        b, c = y.shape[0], y.shape[1]
        s = nn.functional.adaptive_avg_pool2d(y, 1).view(b, c)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        y = y * s.view(b, c, 1, 1)  # per-channel gate: couples fc2's rows with conv1's channels
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


def test_squeeze_excitation_gate() -> None:
    m = SqueezeExcite()
    zero_rows(m.conv1, [1, 5])  # zero channel * gate == 0: channel and gate row both go
    res = check(m, (3, 8, 8), {"conv1": (6, 3, 3, 3), "fc1": (4, 6), "fc2": (6, 4), "conv2": (6, 6, 1, 1)})
    onnx_parity(res.model, (3, 8, 8))


class FlattenNet(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 5 * 5, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.conv(x)))
        if self.style == "module":
            y = self.flatten(y)
        elif self.style == "view":
            y = y.view(y.size(0), -1)
        else:  # a hard-coded width, which must not survive shrinking
            y = y.reshape(-1, 150)
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.mark.parametrize("style", ["module", "view", "hardcoded"])
def test_flatten_then_linear(style: str) -> None:
    m = FlattenNet(style)
    zero_rows(m.conv, [1])
    zero_rows(m.conv, [4], bias=2.0)  # a constant 2 block of 25 features, folded into fc1
    res = check(m, (3, 12, 12), {"conv": (4, 3, 3, 3), "fc1": (10, 100)})
    if style == "hardcoded":
        onnx_parity(res.model, (3, 12, 12))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12)
        self.bn2 = nn.BatchNorm1d(12)
        self.fc3 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.bn1(self.fc1(x)))
        x = nn.functional.silu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def test_batchnorm1d_mlp_constants_fold() -> None:
    m = MLP()
    randomize_bn(m, (20,))
    zero_rows(m.fc1, [0, 3, 9], bias=None)  # bias kept: BN + GELU make a non-zero constant
    with torch.no_grad():
        m.bn2.weight[[2, 5]] = 0  # BN scale 0: outputs beta whatever comes in
    res = check(m, (20,), {"fc1": (13, 20), "bn1": (13,), "fc2": (10, 13), "bn2": (10,), "fc3": (5, 10)})
    onnx_parity(res.model, (20,))


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TwoConv(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=padding)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=padding)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        # (adaptive *max* pooling has no ONNX export in torch < 2.13; PoolNet covers it)
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class ActMLP(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.act = act
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


ACTIVATIONS = [
    pytest.param(act, id=name) for name, act in [
        ("ReLU", nn.ReLU()), ("ReLU6", nn.ReLU6()), ("LeakyReLU", nn.LeakyReLU(0.1)), ("GELU", nn.GELU()),
        ("SiLU", nn.SiLU()), ("Sigmoid", nn.Sigmoid()), ("Tanh", nn.Tanh()), ("Hardswish", nn.Hardswish()),
        ("ELU", nn.ELU()), ("Dropout", nn.Dropout(0.5)), ("Identity", nn.Identity()),
        ("F.leaky_relu", lambda x: nn.functional.leaky_relu(x, 0.2)), ("torch.sigmoid", torch.sigmoid),
        ("torch.tanh", torch.tanh), ("F.hardswish", nn.functional.hardswish),
        ("F.gelu-tanh", lambda x: nn.functional.gelu(x, approximate="tanh")), ("method-clamp", lambda x: x.clamp(-0.5, 1.0)),
        ("scalar-arith", lambda x: (x * 2.0 + 1.0) / 3.0),
    ]
]


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_constants_fold(act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    m = ActMLP(act)
    zero_rows(m.fc1, [2], bias=1.3)
    zero_rows(m.fc1, [4], bias=-0.7)
    check(m, (8,), {"fc1": (4, 8), "fc2": (3, 4)})


class PoolNet(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.pool = pool
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.pool(torch.relu(self.conv1(x))))
        return self.fc(y.mean(dim=(-2, -1)))


@pytest.mark.parametrize(("pool", "removable"), [
    pytest.param(nn.MaxPool2d(3, 1, padding=1), True, id="maxpool-padded"),
    pytest.param(nn.AvgPool2d(2), True, id="avgpool"),
    pytest.param(nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), True, id="avgpool-padded-exclude"),
    pytest.param(nn.AdaptiveAvgPool2d(3), True, id="adaptive-avg"),
    pytest.param(nn.AdaptiveMaxPool2d(2), True, id="adaptive-max"),
    pytest.param(nn.AvgPool2d(3, 1, padding=1), False, id="avgpool-padded-include"),
])
def test_constant_through_pooling(pool: nn.Module, removable: bool) -> None:
    m = PoolNet(pool)
    zero_rows(m.conv1, [1], bias=0.8)
    expected = {"conv1": (5, 3, 3, 3), "conv2": (4, 5, 1, 1)} if removable else {}
    res = check(m, (3, 10, 10), expected)
    if removable:
        assert res.notes == []
    else:  # the borders average in padding zeros: the constant is position-dependent
        assert len(res.notes) == 1 and "conv1[1]" in res.notes[0]


def test_dead_neuron_large_bias_linear() -> None:
    m = TwoLinear()
    zero_rows(m.fc1, [2], bias=50.0)
    check(m, (8,), {"fc1": (5, 8), "fc2": (3, 5)})


def test_dead_channel_large_bias_unpadded_conv() -> None:
    m = TwoConv(padding=0)
    zero_rows(m.conv1, [1], bias=30.0)
    check(m, (3, 10, 10), {"conv1": (5, 3, 3, 3), "conv2": (4, 5, 3, 3)})


def test_dead_channel_before_padded_conv_is_kept_and_noted() -> None:
    m = TwoConv(padding=1)
    zero_rows(m.conv1, [2], bias=0.7)  # constant 0.7 into a zero-padded conv: not foldable
    zero_rows(m.conv1, [4], bias=-0.5)  # relu(-0.5) == 0: removable anyway
    res = check(m, (3, 8, 8), {"conv1": (5, 3, 3, 3), "conv2": (4, 5, 3, 3)})
    assert len(res.notes) == 1
    assert "conv2" in res.notes[0] and "conv1[2]" in res.notes[0] and "zero-pads" in res.notes[0]


def test_all_but_one_dead_linear() -> None:
    m = TwoLinear()
    zero_rows(m.fc1, [0, 1, 2, 3, 5])
    check(m, (8,), {"fc1": (1, 8), "fc2": (3, 1)})


def test_all_but_one_dead_conv() -> None:
    m = TwoConv(padding=1)
    zero_rows(m.conv1, [0, 1, 2, 4, 5])
    zero_rows(m.conv2, [0, 1, 3])
    res = check(m, (3, 8, 8), {"conv1": (1, 3, 3, 3), "conv2": (1, 1, 3, 3), "fc": (2, 1)})
    onnx_parity(res.model, (3, 8, 8))


def test_logits_layer_keeps_its_width() -> None:
    m = TwoLinear()
    zero_rows(m.fc2, [0, 2])  # dead logits are still outputs
    res = check(m, (8,), {})
    assert res.model(torch.randn(4, 8)).shape == (4, 3)


# --------------------------------------------------------------------------------------------
# the rest of the interface
# --------------------------------------------------------------------------------------------


def test_dead_channels() -> None:
    m = Depthwise(project_bias=True)
    zero_rows(m.expand, [1, 3])
    with torch.no_grad():
        m.bn2.weight[[4]] = 0  # dw channel 4 becomes constant through its BN
    dead = dead_channels(m)
    assert set(dead) == {"stem", "expand", "dw", "project", "fc"}
    assert dead["expand"].nonzero().flatten().tolist() == [1, 3]
    assert dead["dw"].nonzero().flatten().tolist() == [4]
    assert not dead["fc"].any()


class ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


class Permute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1)


def test_prune_masks_are_rejected() -> None:
    m = TwoLinear()
    torch.nn.utils.prune.ln_structured(m.fc1, "weight", amount=0.5, n=2, dim=0)
    with pytest.raises(UnsupportedModel, match="prune.remove"):
        shrink(m, torch.randn(2, 8))
    torch.nn.utils.prune.remove(m.fc1, "weight")
    check(m, (8,), {"fc1": (3, 8), "fc2": (3, 3)})


@pytest.mark.parametrize("name", ["resnet32", "mobilenetv2"])
def test_zoo_fuse_bn(name: str) -> None:
    torch.manual_seed(3)
    m = models.build(name, CIFAR, 10)
    randomize_bn(m, CIFAR)
    groups = {"resnet32": groups_resnet32, "mobilenetv2": groups_mobilenetv2}[name](m)
    zero_groups(m, groups, frac=0.3, seed=4)
    res = shrink(m, torch.randn(2, *CIFAR), fuse_bn=True)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in res.model.modules())
    xs = torch.randn(3, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(res.model(xs), m(xs), rtol=1e-4, atol=1e-5)


def test_untraceable_model() -> None:
    with pytest.raises(UnsupportedModel, match=r"cannot trace.*if y\.sum\(\) > 0"):
        shrink(ControlFlow(), torch.randn(2, 4))


def test_unsupported_op_names_node() -> None:
    with pytest.raises(UnsupportedModel, match=r"'\.permute\(\)' at fx node 'permute'") as info:
        shrink(Permute(), torch.randn(2, 3, 4, 4))
    assert isinstance(info.value, CompressError) and "\n" not in str(info.value)


def test_pipeline_exports_the_pruned_model_when_shrink_cannot_and_says_why() -> None:
    from conftest import make_dataset
    from compressor.pipeline import remove_dead_neurons

    model = Permute()
    with torch.no_grad():
        model.conv.weight[1] = 0
        model.conv.bias[1] = 0
    before = copy.deepcopy(model.state_dict())
    logged: list[str] = []
    out, removal = remove_dead_neurons(model, make_dataset(n=8, shape=(3, 4, 4)), enabled=True, fuse_bn=False,
                                       log=logged.append)
    assert out is model and removal["applied"] is False
    assert "'.permute()' at fx node 'permute'" in removal["reason"]
    assert len(logged) == 1 and logged[0].startswith("physical removal skipped: ")
    for name, value in before.items():  # the zeros are exported as they are, nothing else changed
        torch.testing.assert_close(out.state_dict()[name], value, rtol=0, atol=0)


def test_bad_example_input() -> None:
    with pytest.raises(CompressError, match="does not fit"):
        shrink(TwoLinear(), torch.randn(2, 7))


def test_input_model_untouched_and_result_printable() -> None:
    m = models.build("lenet5", MNIST, 10)
    m.train()
    zero_rows(m.conv2, list(range(0, 50, 2)))
    before = copy.deepcopy(m.state_dict())
    res = shrink(m, torch.randn(2, *MNIST))
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    text = str(res)
    assert "conv2" in text and "25x20x5x5" in text and "fc1" in text and "500x400" in text
    assert f"{res.params_before:,} -> {res.params_after:,}" in text


# --------------------------------------------------------------------------------------------
# input features the first Linear never reads
# --------------------------------------------------------------------------------------------


class Tabular(nn.Module):
    """A 2-D input straight into a Linear (no flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class InputTwice(nn.Module):
    """The input also feeds a second branch: its features cannot be dropped for fc1 alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 3)
        self.skip = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x) + self.skip(x)


@pytest.mark.parametrize("build, shape, first, dead_columns, dead_rows", [
    pytest.param(lambda: models.build("lenet300", MNIST, 10), MNIST, "fc1", [0, 1, 27, 28, 400, 783], [5, 6], id="lenet300-flatten"),
    pytest.param(Tabular, (12,), "fc1", [0, 4, 11], [], id="tabular-2d-input"),
])
def test_unread_input_features_are_skipped(build: Callable, shape: tuple[int, ...], first: str,
                                           dead_columns: list[int], dead_rows: list[int]) -> None:
    torch.manual_seed(0)
    model = build().eval()
    layer = getattr(model, first)
    with torch.no_grad():
        layer.weight[:, dead_columns] = 0
    zero_rows(layer, dead_rows)
    res = shrink(model, torch.randn(2, *shape))
    xs = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(res.model(xs), model(xs), rtol=1e-4, atol=1e-5)
    plan = {c.name: c for c in res.plan}
    features = layer.in_features
    assert plan["input features"].before == (features,)
    assert plan["input features"].after == (features - len(dead_columns),)
    rows_left = layer.out_features - len(dead_rows)
    assert plan[first].after == (rows_left, features - len(dead_columns))
    # exactly the dead columns of the surviving rows, plus the dead rows, are gone
    expected_removed = rows_left * len(dead_columns) + len(dead_rows) * (features + 1)
    consumers = [c for c in res.plan if c.name not in ("input features", first) and c.before != c.after]
    expected_removed += sum(c.before[0] * len(dead_rows) for c in consumers)
    assert res.params_before - res.params_after == expected_removed
    onnx_parity(res.model, shape)


@pytest.mark.parametrize("build, shape", [
    pytest.param(InputTwice, (12,), id="input-read-twice"),
    pytest.param(lambda: models.build("lenet5", MNIST, 10), MNIST, id="conv-first"),
])
def test_inputs_read_elsewhere_are_left_alone(build: Callable, shape: tuple[int, ...]) -> None:
    model = build().eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():  # input feature 0 unread (for the conv: one tap of every filter)
        first.weight[(slice(None), 0) + (0,) * (first.weight.dim() - 2)] = 0
    res = shrink(model, torch.randn(2, *shape))
    assert "input features" not in {c.name for c in res.plan}
    assert res.params_after == res.params_before


# --------------------------------------------------------------------------------------------
# widths rounded to a multiple (blocked CPU kernels)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiple, widths", [
    pytest.param(1, {"conv1": 11, "conv2": 23, "fc1": 253}, id="exact"),
    pytest.param(8, {"conv1": 16, "conv2": 24, "fc1": 256}, id="round-to-8"),
    pytest.param(16, {"conv1": 16, "conv2": 32, "fc1": 256}, id="round-to-16"),
])
def test_round_to_keeps_widths_at_multiples(multiple: int, widths: dict[str, int]) -> None:
    model = models.build("lenet5", MNIST, 10).eval()
    zero_rows(model.conv1, list(range(9)))
    zero_rows(model.conv2, list(range(27)))
    zero_rows(model.fc1, list(range(247)))
    res = shrink(model, torch.randn(2, *MNIST), round_to=multiple)
    plan = {c.name: c for c in res.plan}
    assert {name: plan[name].after[0] for name in widths} == widths
    assert plan["conv2"].after[1] == widths["conv1"] and plan["fc1"].after[1] == widths["conv2"] * 16
    assert plan["fc2"].after == (10, widths["fc1"])  # the logits keep their width
    xs = torch.randn(3, *MNIST)
    with torch.no_grad():
        torch.testing.assert_close(res.model(xs), model(xs), rtol=1e-4, atol=1e-5)
    assert res.params_after == n_params(res.model)
    assert any("round" in note for note in res.notes) == (multiple > 1)


def test_round_to_never_exceeds_the_original_width() -> None:
    model = models.build("lenet300", MNIST, 10).eval()
    zero_rows(model.fc2, [0, 1, 2])  # 97 of 100 left: rounding up to 104 would be wider than the layer
    res = shrink(model, torch.randn(2, *MNIST), round_to=8)
    assert {c.name: c.after for c in res.plan}["fc2"] == (100, 300)


def test_round_to_must_be_positive() -> None:
    with pytest.raises(ValueError, match="round_to"):
        shrink(models.build("lenet300", MNIST, 10), torch.randn(2, *MNIST), round_to=0)
