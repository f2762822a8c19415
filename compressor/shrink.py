"""Physical removal of dead neurons and channels: a smaller dense model with the same outputs.

Pruning by masking leaves zeros in full-size tensors. :func:`shrink` turns such a model into a
smaller dense one built from the same standard layers, whose outputs equal the original's
(eval mode) up to float rounding, for any input of the example's shape and any batch size.

How it works (see the module's test-suite for the cases covered):

1. ``torch.fx`` traces a copy of the model; an interpreter run on the example input records
   every tensor's shape. Reshapes are rewritten into ``torch.flatten(x, 1)`` so that no
   hard-coded channel count survives.
2. Every tensor gets a *layout*: one entry per channel along dim 1, naming a *slot* (a
   union-find class of channels that must be kept or removed together: the channels joined by
   an elementwise op, a residual add, BatchNorm or a depthwise conv), the number of features a
   channel spans after flattening, and the channel's value when it is an input-independent
   constant (evaluated through BatchNorm, activations and pooling on constant maps).
3. A backward fixed point marks the slots something *needs*: the model output and input, and
   every input channel a Linear/Conv reads through a non-zero weight, unless that channel is a
   constant the layer can fold into its bias exactly (a Linear, or a conv whose padding cannot
   make the contribution position-dependent). Grouped convs keep equal per-group widths; every
   kept layer keeps at least one input.
4. Slots nobody needs are removed everywhere; folded constants go into the consumer's bias (or
   into the running mean of the BatchNorm that follows a bias-free layer).
5. The result is checked against the original on the example and on a random input.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CompressError

__all__ = [
    "ChannelGroup",
    "LayerChange",
    "ShrinkResult",
    "UnsupportedModel",
    "channel_groups",
    "dead_channels",
    "shrink",
]


class UnsupportedModel(CompressError):
    """The model cannot be shrunk safely: untraceable, or it uses an op shrink does not know."""


@dataclass
class LayerChange:
    """One row of the plan: a layer's weight shape before and after shrinking.

    ``after == ()`` means the layer is gone (all its channels removed, or a BatchNorm fused
    into the layer before it).
    """

    name: str
    kind: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    params_before: int = 0
    params_after: int = 0


@dataclass
class ShrinkResult:
    """The shrunk model, what changed, and why some dead channels were kept."""

    model: nn.Module
    plan: list[LayerChange]
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        changed = [c for c in self.plan if c.before != c.after or c.params_before != c.params_after]
        rows = [("layer", "kind", "before", "after", "params removed")]
        for c in changed:
            rows.append((c.name, c.kind, _fmt_shape(c.before), _fmt_shape(c.after) if c.after else "removed",
                         f"{c.params_before - c.params_after:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(
                (s.rjust(w) if j == 4 else s.ljust(w)) for j, (s, w) in enumerate(zip(r, widths))
            ).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        unchanged = len(self.plan) - len(changed)
        if unchanged:
            lines.append(f"({unchanged} layer{'s' if unchanged != 1 else ''} unchanged)")
        removed = self.params_before - self.params_after
        pct = 100.0 * removed / self.params_before if self.params_before else 0.0
        lines.append(
            f"params: {self.params_before:,} -> {self.params_after:,} "
            f"({removed:,} removed, {pct:.1f} %)"
        )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


@dataclass
class ChannelGroup:
    """Channels that can only be removed together (one coupled group of the dependency graph).

    ``members`` lists (module name, role) pairs; role is ``"out"`` (output channel of a
    Linear/Conv: weight row/filter and bias), ``"dw"`` (a depthwise conv's filter, which
    passes the channel through), ``"bn"`` (BatchNorm / per-channel PReLU entry) or ``"in"``
    (input channel of a consuming Linear/Conv; for a Linear after Flatten this is the channel
    index, covering a block of features). ``channels[i][j]`` is the index of coupled channel i
    in member j. ``pinned`` groups (model input/output, shape reads) cannot shrink.
    """

    members: list[tuple[str, str]]
    channels: list[tuple[int, ...]]
    pinned: bool


# --------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------

_LINEAR_TYPES = (nn.Linear,)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Modules that act on every channel separately (so a channel can be dropped through them).
_CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Channelwise, but only meaningful on (N, C, spatial...) tensors.
_SPATIAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)

_CHANNELWISE_FUNCS: set[Callable[..., Any]] = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink,
    F.hardshrink, F.softshrink, F.threshold, torch.clamp, torch.clip, torch.abs, torch.neg,
    torch.exp, torch.square, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout,
}
_SPATIAL_FUNCS: set[Callable[..., Any]] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.pad, torch.max_pool1d, torch.max_pool2d,
    torch.avg_pool1d,
}
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "abs", "neg", "exp", "square", "detach", "clone",
}
_DROPOUT_TRAINING_DEFAULT: dict[Callable[..., Any], bool] = {
    F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
    F.alpha_dropout: False, F.feature_alpha_dropout: False,
}
_BINARY_FUNCS: set[Callable[..., Any]] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_MUL_OPS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_FUNCS: set[Callable[..., Any]] = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SOFTMAX_FUNCS: set[Callable[..., Any]] = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_CAT_FUNCS: set[Callable[..., Any]] = {torch.cat, torch.concat, torch.concatenate}
_SHAPE_FUNCS: set[Callable[..., Any]] = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                                         torch.unflatten}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "contiguous"}
_META_METHODS = {"size", "dim"}

_TORCH_DIR = os.path.dirname(torch.__file__)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def dead_channels(model: nn.Module) -> dict[str, Tensor]:
    """Per Linear/Conv module: bool mask of output channels that are *dead*.

    A channel is dead when its output does not depend on the input: its weight row (Linear) or
    filter (Conv) is all exactly zero, or the BatchNorm that directly and solely follows the
    layer has an exactly zero scale (gamma) for it. A dead channel emits a constant (its bias,
    mapped through the BatchNorm); :func:`shrink` removes it when that constant is zero after
    the following ops or can be folded exactly into the consumers' biases.
    """
    gm = _trace(model)
    mods = dict(gm.named_modules())
    out: dict[str, Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) not in _LINEAR_TYPES + _CONV_TYPES:
            continue
        w = mods[node.target].weight.detach()
        mask = (w.reshape(w.shape[0], -1) == 0).all(1)
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = mods[users[0].target]
            if type(bn) in _BN_TYPES and bn.affine and bn.num_features == mask.numel():
                mask = mask | (bn.weight.detach() == 0)
        out[str(node.target)] = mask
    return out


def channel_groups(model: nn.Module, example_input: Tensor) -> list[ChannelGroup]:
    """The coupled channel groups of `model` (the dependency graph :func:`shrink` uses).

    Handy for structured pruning that must respect residual adds, concatenation and
    depthwise convs (zero one coupled channel in every ``"out"``/``"dw"``/``"bn"`` member).
    """
    gm, probe = _prepare(model, example_input)
    graph = _Graph(gm, probe)
    graph.build()
    return graph.groups()


def shrink(model: nn.Module, example_input: Tensor, *, fuse_bn: bool = False) -> ShrinkResult:
    """Remove dead neurons/channels from a copy of `model`; the result has the same outputs.

    `model` is not modified; the result is in eval mode. `fuse_bn` additionally folds every
    BatchNorm that follows a Linear/Conv into it (eval statistics, computed in float64).
    Raises UnsupportedModel (naming the op and fx node) for models it cannot handle safely.
    """
    params_before = _n_params(model)
    with _full_fp32(example_input.device if isinstance(example_input, Tensor) else torch.device("cpu")):
        return _shrink(model, example_input, fuse_bn, params_before)


def _shrink(model: nn.Module, example_input: Tensor, fuse_bn: bool, params_before: int) -> ShrinkResult:
    gm, probe = _prepare(model, example_input)
    with torch.no_grad():
        check_x = torch.randn(example_input.shape, generator=torch.Generator().manual_seed(0),
                              dtype=example_input.dtype).to(example_input.device)
        y_refs = [probe.result, gm(check_x)]
        graph = _Graph(gm, probe)
        graph.build()
        before = graph.layer_table()
        needed = graph.solve()
        graph.apply(needed)
        if fuse_bn:
            _fuse_batchnorms(gm, graph.notes)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        gm.eval()
        _verify(gm, [example_input, check_x], y_refs)
    mods = dict(gm.named_modules())
    plan = []
    for name, kind, shape, n in before:
        mod = mods.get(name)
        if mod is None:
            plan.append(LayerChange(name, kind, shape, (), n, 0))
        else:
            plan.append(LayerChange(name, kind, shape, _weight_shape(mod), n, _n_params(mod, recurse=False)))
    return ShrinkResult(gm, plan, params_before, _n_params(gm), graph.notes)


@contextlib.contextmanager
def _full_fp32(device: torch.device) -> Iterator[None]:
    """TF32 convs/matmuls (CUDA) would make the reference-vs-shrunk check fail spuriously."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------------------------
# Tracing and probing
# --------------------------------------------------------------------------------------------


class _Probe(fx.Interpreter):
    """Runs the graph once, remembering every tensor's shape and every non-tensor value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}
        self.devices: dict[fx.Node, torch.device] = {}
        self.values: dict[fx.Node, Any] = {}
        self.result: Any = None

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = tuple(result.shape)
            self.dtypes[n] = result.dtype
            self.devices[n] = result.device
        elif n.op != "output":
            self.values[n] = result
        return result


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        where = ""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if not frame.filename.startswith(_TORCH_DIR):
                where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
                break
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(
            f"cannot shrink {type(model).__name__}: torch.fx cannot trace it{where} ({msg})"
        ) from exc


def _prepare(model: nn.Module, example_input: Tensor) -> tuple[fx.GraphModule, _Probe]:
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise CompressError("shrink needs an example input tensor shaped (batch, ...)")
    if not example_input.is_floating_point():
        raise CompressError(f"shrink needs a floating-point example input; got {example_input.dtype}")
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or hasattr(mod, "parametrizations"):
            raise UnsupportedModel(
                f"cannot shrink: module '{name}' ({type(mod).__name__}) has forward hooks or "
                "parametrizations (e.g. torch.nn.utils.prune masks: call prune.remove first)"
            )
    work = copy.deepcopy(model).eval()
    gm = _trace(work)
    gm.eval()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModel(f"cannot shrink {type(model).__name__}: its forward takes no input")
    probe = _Probe(gm)
    try:
        with torch.no_grad():
            probe.result = probe.run(example_input)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(
            f"the example input of shape {tuple(example_input.shape)} does not fit "
            f"{type(model).__name__}: {first}"
        ) from exc
    for n in placeholders[1:]:
        if n in probe.shapes:
            raise UnsupportedModel(f"cannot shrink: input '{n.name}' is a second tensor input; "
                                   "shrink takes models with one tensor input")
    _canonicalize(gm, probe)
    return gm, probe


def _describe(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(mods[node.target]).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()'"
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", repr(t))
        if getattr(F, name, None) is t:
            return f"function 'torch.nn.functional.{name}'"
        if getattr(torch, name, None) is t:
            return f"function 'torch.{name}'"
        if getattr(operator, name, None) is t:
            return f"function 'operator.{name}'"
        return f"function '{getattr(t, '__module__', '') or ''}.{name}'"
    if node.op == "get_attr":
        return f"attribute '{node.target}'"
    return f"'{node.op}'"


def _unsupported(node: fx.Node, mods: dict[str, nn.Module], why: str) -> UnsupportedModel:
    return UnsupportedModel(f"cannot shrink: {_describe(node, mods)} at fx node '{node.name}' {why}")


# --------------------------------------------------------------------------------------------
# Canonicalizing reshapes
# --------------------------------------------------------------------------------------------


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_shape_op(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(mods[node.target]) in (nn.Flatten, nn.Unflatten)
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target in _SHAPE_FUNCS


def _keeps_channel_dim(node: fx.Node, mods: dict[str, nn.Module], rank_in: int, rank_out: int) -> bool:
    """True for flatten/unflatten/squeeze/unsqueeze whose dims are all spatial (>= 2)."""
    off = 1  # args[0] is the tensor for both torch.flatten(x, ...) and x.flatten(...)

    def norm(d: Any, rank: int) -> int | None:
        return d + rank if isinstance(d, int) and d < 0 else (d if isinstance(d, int) else None)

    if node.op == "call_module":
        mod = mods[node.target]
        if isinstance(mod, nn.Flatten):
            start = norm(mod.start_dim, rank_in)
        else:
            start = norm(mod.dim, rank_in)  # type: ignore[union-attr]
        return start is not None and start >= 2
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "flatten":
        start = norm(_arg(node, off + 0, "start_dim", 0), rank_in)
        return start is not None and start >= 2
    if name == "unflatten":
        d = norm(_arg(node, off + 0, "dim"), rank_in)
        return d is not None and d >= 2
    if name == "squeeze":
        dims = _arg(node, off + 0, "dim")
        if dims is None:
            return False
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return all((norm(d, rank_in) or 0) >= 2 for d in dims)
    if name == "unsqueeze":
        d = norm(_arg(node, off + 0, "dim"), rank_out)
        return d is not None and d >= 2
    return False


def _canonicalize(gm: fx.GraphModule, probe: _Probe) -> None:
    """Drop no-op reshapes, turn (N, C, ...) -> (N, C*...) reshapes into torch.flatten(x, 1).

    Keeps reshapes robust to the new channel counts (a literal ``view(-1, 320)`` would
    otherwise break after shrinking).
    """
    mods = dict(gm.named_modules())
    graph = gm.graph
    for node in list(graph.nodes):
        if node not in probe.shapes or not _is_shape_op(node, mods):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in probe.shapes:
            raise _unsupported(node, mods, "reshapes something that is not a traced tensor")
        s_in, s_out = probe.shapes[src], probe.shapes[node]
        if s_in == s_out:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            continue
        if (len(s_in) >= 2 and len(s_out) == 2 and s_out[0] == s_in[0]
                and s_out[1] == math.prod(s_in[1:])):
            if node.op == "call_module" and isinstance(mods[node.target], nn.Flatten) \
                    and mods[node.target].start_dim == 1 and mods[node.target].end_dim == -1:
                continue
            with graph.inserting_after(node):
                new = graph.call_function(torch.flatten, (src, 1))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            probe.shapes[new] = s_out
            probe.dtypes[new] = probe.dtypes[src]
            probe.devices[new] = probe.devices[src]
            continue
        if len(s_in) >= 3 and s_in[:2] == s_out[:2] and _keeps_channel_dim(node, mods, len(s_in), len(s_out)):
            continue
        if s_in[:2] == s_out[:2] and math.prod(s_in[2:]) == math.prod(s_out[2:]):
            # e.g. s.view(b, c, 1, 1) in squeeze-excitation: same channels, new spatial dims.
            # Rebuild it from ops that never name the channel count.
            new, shape = src, s_in
            steps: list[tuple[Callable[..., Any], tuple[Any, ...], tuple[int, ...]]] = []
            if len(s_in) == 2:
                steps.append((torch.unsqueeze, (2,), (*s_in, 1)))
            elif len(s_in) > 3:
                steps.append((torch.flatten, (2,), (*s_in[:2], math.prod(s_in[2:]))))
            if len(s_out) > 3 or (len(s_out) == 3 and s_out[2] != math.prod(s_in[2:])):
                steps.append((torch.unflatten, (2, tuple(s_out[2:])), s_out))
            for fn, extra, shape in steps:
                with graph.inserting_before(node):
                    new = graph.call_function(fn, (new, *extra))
                probe.shapes[new] = shape
                probe.dtypes[new] = probe.dtypes[src]
                probe.devices[new] = probe.devices[src]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        raise _unsupported(node, mods, f"reshapes {s_in} to {s_out} across the channel dimension")
    graph.eliminate_dead_code()
    gm.recompile()


# --------------------------------------------------------------------------------------------
# Layouts and the dependency graph
# --------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Layout:
    """Channels (dim 1) of one tensor."""

    slots: list[int]
    blocks: list[int]  # features per channel along dim 1 (> 1 after flattening (N, C, H, W))
    consts: list[float | None]  # the channel's value when input-independent and uniform
    origins: list[str]

    def known(self) -> np.ndarray:
        return np.array([c is not None for c in self.consts], dtype=bool)

    def values(self) -> np.ndarray:
        return np.array([0.0 if c is None else c for c in self.consts], dtype=np.float64)


@dataclass
class _Layer:
    """A Linear or Conv and what shrink needs to know about it."""

    node: fx.Node
    name: str
    module: nn.Module
    src: fx.Node
    groups: int
    depthwise: bool
    nz: np.ndarray  # (Cout, inputs per group): weight from input channel to output non-zero
    S: np.ndarray  # (Cout, inputs per group): sum of those weights (float64)
    k: np.ndarray  # (P,) input constants (0 where not constant)
    known: np.ndarray  # (P,) input channel is constant
    foldable: np.ndarray  # (P,) constant whose contribution is the same at every position
    padded: bool
    bias: np.ndarray  # (Cout,) float64, zeros when the layer has none
    in_r: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    out_r: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _zero_padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding keeps a constant map constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def _weight_shape(mod: nn.Module) -> tuple[int, ...]:
    w = getattr(mod, "weight", None)
    if isinstance(w, Tensor):
        return tuple(w.shape)
    rm = getattr(mod, "running_mean", None)
    return tuple(rm.shape) if isinstance(rm, Tensor) else ()


def _n_params(mod: nn.Module, recurse: bool = True) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=recurse))


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class _Graph:
    """The channel dependency graph of a traced model, and the rewrite that shrinks it."""

    def __init__(self, gm: fx.GraphModule, probe: _Probe) -> None:
        self.gm = gm
        self.probe = probe
        self.mods = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.layouts: dict[fx.Node, _Layout] = {}
        self.layers: list[_Layer] = []
        self.channel_params: list[tuple[fx.Node, nn.Module]] = []  # BatchNorm, per-channel PReLU
        self.cats: list[fx.Node] = []
        self.pinned: list[int] = []
        self.notes: list[str] = []
        self.forced: dict[str, int] = {}
        self.explained: set[int] = set()  # slot roots a note already accounts for
        self.roots: np.ndarray | None = None

    # -- building ------------------------------------------------------------------------

    def err(self, node: fx.Node, why: str) -> UnsupportedModel:
        return _unsupported(node, self.mods, why)

    def fresh(self, node: fx.Node, origin: str, pinned: bool = False) -> _Layout:
        c = self.probe.shapes[node][1]
        slots = self.uf.new(c)
        if pinned:
            self.pinned.extend(slots)
        return _Layout(slots, [1] * c, [None] * c, [f"{origin}[{i}]" for i in range(c)])

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.probe.shapes]

    def build(self) -> None:
        seen_params: dict[str, fx.Node] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node in self.probe.shapes:
                    if len(self.probe.shapes[node]) < 2:
                        raise self.err(node, "is not shaped (batch, channels, ...)")
                    self.layouts[node] = self.fresh(node, "input", pinned=True)
                continue
            if node.op == "output":
                for a in node.all_input_nodes:
                    if a in self.layouts:
                        self.pin(a)
                continue
            if node.op == "get_attr":
                raise self.err(node, "reads a parameter or buffer directly in forward")
            if node not in self.probe.shapes:
                self.meta(node)
                continue
            if len(self.probe.shapes[node]) < 2:
                raise self.err(node, "produces a tensor without a channel dimension")
            for a in self.tensor_inputs(node):
                if a not in self.layouts:
                    raise self.err(node, f"reads '{a.name}', which shrink cannot follow")
            if node.op == "call_module":
                mod = self.mods[node.target]
                if any(True for _ in mod.parameters(recurse=False)):
                    if node.target in seen_params:
                        raise self.err(node, "is called more than once (shared weights)")
                    seen_params[node.target] = node
            self.visit(node)

    def pin(self, node: fx.Node) -> None:
        self.pinned.extend(self.layouts[node].slots)

    def meta(self, node: fx.Node) -> None:
        """Non-tensor nodes: shape reads are fine unless they read the channel count."""
        if node.op == "call_method" and node.target in _META_METHODS:
            src = node.args[0]
            if node.target == "size":
                d = _arg(node, 1, "dim")
                if d is None or _norm_dim(d, len(self.probe.shapes[src])) == 1:
                    self.pin(src)  # the channel count is read: keep it
            return
        if node.op == "call_function" and node.target is getattr and node.args[1] != "shape":
            return  # dtype, device, ndim: harmless
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            src = node.args[0]
            rank = len(self.probe.shapes[src])
            for user in node.users:
                idx = user.args[1] if user.target is operator.getitem and len(user.args) > 1 else None
                if not isinstance(idx, int) or _norm_dim(idx, rank) == 1:
                    self.pin(src)
            return
        if any(a in self.probe.shapes for a in node.all_input_nodes):
            raise self.err(node, "is not an op shrink understands")

    def visit(self, node: fx.Node) -> None:
        srcs = self.tensor_inputs(node)
        if node.op == "call_module":
            mod = self.mods[node.target]
            t = type(mod)
            if t in _LINEAR_TYPES or t in _CONV_TYPES:
                return self.layer(node, mod, srcs)
            if t in _BN_TYPES:
                return self.channelwise(node, srcs, channel_param=mod)
            if t is nn.PReLU:
                return self.channelwise(node, srcs, channel_param=mod if mod.num_parameters > 1 else None)
            if t in _CHANNELWISE_MODULES:
                return self.channelwise(node, srcs)
            if t in _SPATIAL_MODULES:
                if getattr(mod, "return_indices", False):
                    raise self.err(node, "returns pooling indices")
                return self.channelwise(node, srcs, spatial=True)
            if t in (nn.Softmax, nn.LogSoftmax):
                return self.softmax(node, srcs, mod.dim)
            if t is nn.Flatten:
                return self.reshape(node, srcs)
            raise self.err(node, "is not a layer shrink knows how to follow")
        if node.op == "call_function":
            tgt = node.target
            if tgt in _CHANNELWISE_FUNCS:
                if tgt in _DROPOUT_TRAINING_DEFAULT and _arg(node, 2, "training", _DROPOUT_TRAINING_DEFAULT[tgt]):
                    raise self.err(node, "applies dropout in eval mode (training=True)")
                return self.channelwise(node, srcs)
            if tgt in _SPATIAL_FUNCS:
                return self.channelwise(node, srcs, spatial=True)
            if tgt in _BINARY_FUNCS:
                return self.binary(node, srcs)
            if tgt in _REDUCE_FUNCS:
                return self.reduce(node, srcs, _arg(node, 1, "dim"))
            if tgt in _SOFTMAX_FUNCS:
                return self.softmax(node, srcs, _arg(node, 1, "dim"))
            if tgt in _CAT_FUNCS:
                return self.cat(node)
            if tgt in _SHAPE_FUNCS:
                return self.reshape(node, srcs)
            raise self.err(node, "is not an op shrink understands")
        if node.op == "call_method":
            m = node.target
            if m in _CHANNELWISE_METHODS:
                return self.channelwise(node, srcs)
            if m in _BINARY_METHODS:
                return self.binary(node, srcs)
            if m in _REDUCE_METHODS:
                return self.reduce(node, srcs, _arg(node, 1, "dim"))
            if m in _SOFTMAX_METHODS:
                return self.softmax(node, srcs, _arg(node, 1, "dim"))
            if m in _SHAPE_METHODS:
                return self.reshape(node, srcs)
            raise self.err(node, "is not an op shrink understands")
        raise self.err(node, "is not an op shrink understands")

    # -- constants --------------------------------------------------------------------------

    def const_map(self, node: fx.Node) -> Tensor:
        """A batch-1 tensor shaped like `node`, each channel filled with its constant (0 if none)."""
        lay = self.layouts[node]
        shape = self.probe.shapes[node]
        vals = torch.tensor(lay.values()).repeat_interleave(torch.tensor(lay.blocks))
        vals = vals.to(device=self.probe.devices[node], dtype=self.probe.dtypes[node])
        return vals.view(1, -1, *([1] * (len(shape) - 2))).expand(1, *shape[1:]).contiguous()

    def eval_consts(self, node: fx.Node, srcs: list[fx.Node], blocks: list[int]) -> list[float | None]:
        """Constants of `node`'s channels, by running the op on constant maps of its inputs."""
        n_out = len(blocks)
        known = np.ones(n_out, dtype=bool)
        for s in srcs:
            k = self.layouts[s].known()
            known &= k if k.size == n_out else np.full(n_out, bool(k[0]))
        if not known.any():
            return [None] * n_out
        subst = {s: self.const_map(s) for s in srcs}

        def sub(a: fx.Node) -> Any:
            if a in subst:
                return subst[a]
            if a in self.probe.values:
                return self.probe.values[a]
            raise self.err(node, f"depends on '{a.name}', whose value is unknown")

        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        if node.op == "call_module":
            out = self.mods[node.target](*args, **kwargs)
        elif node.op == "call_function":
            out = node.target(*args, **kwargs)
        else:
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        return _read_consts(out, blocks, known)

    # -- node kinds -------------------------------------------------------------------------

    def single(self, node: fx.Node, srcs: list[fx.Node]) -> fx.Node:
        if len(srcs) != 1:
            raise self.err(node, f"takes {len(srcs)} tensors; shrink only follows one here")
        return srcs[0]

    def channelwise(self, node: fx.Node, srcs: list[fx.Node], spatial: bool = False,
                    channel_param: nn.Module | None = None) -> None:
        src = self.single(node, srcs)
        lay = self.layouts[src]
        s_in, s_out = self.probe.shapes[src], self.probe.shapes[node]
        if s_out[1] != s_in[1] or (spatial and len(s_in) < 3):
            raise self.err(node, f"maps {s_in} to {s_out}; shrink expects a per-channel op here")
        consts = self.eval_consts(node, [src], lay.blocks)
        if channel_param is not None:
            n = getattr(channel_param, "num_features", None) or getattr(channel_param, "num_parameters")
            if n != sum(lay.blocks):
                raise self.err(node, f"has {n} channels but its input has {sum(lay.blocks)}")
            if type(channel_param) in _BN_TYPES and channel_param.affine:
                # a zero scale makes the channel constant (beta) whatever comes in
                starts = np.cumsum([0] + lay.blocks[:-1])
                gamma = channel_param.weight.detach().cpu().numpy()[starts]
                beta = channel_param.bias.detach().to(torch.float64).cpu().numpy()[starts]
                for p in np.flatnonzero((gamma == 0) & (np.array(lay.blocks) == 1)):
                    if consts[p] is None:
                        consts[p] = float(beta[p])
            self.channel_params.append((node, channel_param))
        self.layouts[node] = _Layout(lay.slots, lay.blocks, consts, lay.origins)

    def reduce(self, node: fx.Node, srcs: list[fx.Node], dims: Any) -> None:
        src = self.single(node, srcs)
        rank = len(self.probe.shapes[src])
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        if any(not isinstance(d, int) or _norm_dim(d, rank) < 2 for d in dims):
            raise self.err(node, f"reduces over dims {tuple(dims)}; only spatial dims (>= 2) are supported")
        self.channelwise(node, srcs, spatial=True)

    def softmax(self, node: fx.Node, srcs: list[fx.Node], dim: Any) -> None:
        src = self.single(node, srcs)
        rank = len(self.probe.shapes[src])
        if not isinstance(dim, int):
            raise self.err(node, "has no explicit dim")
        if _norm_dim(dim, rank) >= 2:
            return self.channelwise(node, srcs)
        if _norm_dim(dim, rank) == 1:
            # mixes channels: keep all of its input, its output is a new set of channels
            self.pin(src)
            self.layouts[node] = self.fresh(node, node.name, pinned=True)
            return
        raise self.err(node, "normalizes over the batch dimension")

    def reshape(self, node: fx.Node, srcs: list[fx.Node]) -> None:
        src = self.single(node, srcs)
        lay = self.layouts[src]
        s_in, s_out = self.probe.shapes[src], self.probe.shapes[node]
        if len(s_out) == 2 and s_out[0] == s_in[0] and s_out[1] == math.prod(s_in[1:]):
            r = math.prod(s_in[2:])
            self.layouts[node] = _Layout(lay.slots, [b * r for b in lay.blocks], lay.consts, lay.origins)
        elif s_in[:2] == s_out[:2]:
            self.layouts[node] = _Layout(lay.slots, lay.blocks, lay.consts, lay.origins)
        else:
            raise self.err(node, f"reshapes {s_in} to {s_out} across the channel dimension")

    def binary(self, node: fx.Node, srcs: list[fx.Node]) -> None:
        if len(srcs) == 1:
            return self.channelwise(node, srcs)
        if len(srcs) != 2:
            raise self.err(node, f"takes {len(srcs)} tensors")
        s_out = self.probe.shapes[node]
        full = [s for s in srcs if self.probe.shapes[s][1] == s_out[1]
                and len(self.probe.shapes[s]) == len(s_out)]
        if not full:
            raise self.err(node, "broadcasts along the channel dimension in a way shrink cannot follow")
        for s in srcs:
            if s in full:
                continue
            if len(self.probe.shapes[s]) != len(s_out) or self.probe.shapes[s][1] != 1:
                raise self.err(node, f"combines tensors shaped {self.probe.shapes[srcs[0]]} and "
                                     f"{self.probe.shapes[srcs[1]]}")
            self.pin(s)  # a one-channel operand broadcast over all channels stays as it is
        base = self.layouts[full[0]]
        for s in full[1:]:
            other = self.layouts[s]
            if other.blocks != base.blocks:
                raise self.err(node, "combines tensors whose channels are laid out differently")
            for a, b in zip(base.slots, other.slots):
                self.uf.union(a, b)
        consts = self.eval_consts(node, srcs, base.blocks)
        if node.target in _MUL_OPS:
            # a zero channel times anything finite is zero (squeeze-excitation gates, masks)
            for src in srcs:
                lay = self.layouts[src]
                zero = [c == 0 for c in lay.consts] if len(lay.consts) == len(consts) else [lay.consts[0] == 0] * len(consts)
                consts = [0.0 if z else c for z, c in zip(zero, consts)]
        self.layouts[node] = _Layout(base.slots, base.blocks, consts, base.origins)

    def cat(self, node: fx.Node) -> None:
        tensors = _arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not all(
                isinstance(t, fx.Node) and t in self.layouts for t in tensors):
            raise self.err(node, "concatenates something shrink cannot follow")
        rank = len(self.probe.shapes[node])
        dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
        lays = [self.layouts[t] for t in tensors]
        if dim == 1:
            self.cats.append(node)
            self.layouts[node] = _Layout(
                [s for l in lays for s in l.slots], [b for l in lays for b in l.blocks],
                [c for l in lays for c in l.consts], [o for l in lays for o in l.origins])
            return
        if dim == 0:
            raise self.err(node, "concatenates along the batch dimension")
        base = lays[0]
        for other in lays[1:]:
            if other.blocks != base.blocks:
                raise self.err(node, "concatenates tensors whose channels are laid out differently")
            for a, b in zip(base.slots, other.slots):
                self.uf.union(a, b)
        consts = self.eval_consts(node, list(tensors), base.blocks)
        self.layouts[node] = _Layout(base.slots, base.blocks, consts, base.origins)

    def layer(self, node: fx.Node, mod: nn.Module, srcs: list[fx.Node]) -> None:
        src = self.single(node, srcs)
        lay = self.layouts[src]
        name = str(node.target)
        w = mod.weight.detach()
        w64 = w.to(torch.float64).cpu()
        s_in = self.probe.shapes[src]
        known, k = lay.known(), lay.values()
        is_conv = type(mod) in _CONV_TYPES
        if is_conv:
            if len(s_in) != w.dim() or any(b != 1 for b in lay.blocks) or len(lay.blocks) != mod.in_channels:
                raise self.err(node, f"gets an input shaped {s_in}")
            groups = mod.groups
            nz = (w != 0).flatten(2).any(2).cpu().numpy()
            S = w64.flatten(2).sum(2).numpy()
            padded = _zero_padded(mod)
            depthwise = groups > 1 and groups == mod.in_channels == mod.out_channels
        else:
            if len(s_in) != 2:
                raise self.err(node, f"gets a rank-{len(s_in)} input; shrink supports (N, features) only")
            if sum(lay.blocks) != mod.in_features:
                raise self.err(node, "gets an input whose width does not match in_features")
            groups, padded, depthwise = 1, False, False
            if all(b == 1 for b in lay.blocks):
                nz, S = (w != 0).cpu().numpy(), w64.numpy()
            else:
                idx = torch.repeat_interleave(torch.arange(len(lay.blocks)), torch.tensor(lay.blocks))
                S = torch.zeros(w.shape[0], len(lay.blocks), dtype=torch.float64).index_add_(1, idx, w64).numpy()
                nzc = torch.zeros(w.shape[0], len(lay.blocks), dtype=torch.float64)
                nz = (nzc.index_add_(1, idx, (w != 0).to(torch.float64).cpu()) > 0).numpy()
        bias = (mod.bias.detach().to(torch.float64).cpu().numpy() if mod.bias is not None
                else np.zeros(w.shape[0]))
        # A constant input contributes the same amount at every output position unless zero
        # padding cuts taps off at the borders (then only a zero constant is position-free).
        foldable = known & ((k == 0) | (not padded))
        cout = w.shape[0]
        ig, og = nz.shape[1], cout // groups
        bad = (nz.reshape(groups, og, ig) & ~foldable.reshape(groups, 1, ig)).any(2).reshape(cout)
        val = bias + np.einsum("goi,gi->go", S.reshape(groups, og, ig), k.reshape(groups, ig)).reshape(cout)
        consts: list[float | None] = [None if b else float(v) for b, v in zip(bad, val)]
        info = _Layer(node, name, mod, src, groups, depthwise, nz, S, k, known, foldable, padded, bias)
        self.layers.append(info)
        if depthwise:
            # a depthwise conv passes each channel through: same slot on both sides
            self.layouts[node] = _Layout(lay.slots, [1] * cout, consts, [f"{name}[{i}]" for i in range(cout)])
        else:
            out = self.fresh(node, name)
            out.consts = consts
            self.layouts[node] = out

    # -- solving ----------------------------------------------------------------------------

    def resolve(self) -> np.ndarray:
        if self.roots is None:
            self.roots = np.array([self.uf.find(i) for i in range(len(self.uf.parent))], dtype=np.int64)
            for L in self.layers:
                L.in_r = self.r(L.src)
                L.out_r = self.r(L.node)
        return self.roots

    def r(self, node: fx.Node) -> np.ndarray:
        assert self.roots is not None
        return self.roots[np.array(self.layouts[node].slots, dtype=np.int64)]

    def solve(self) -> np.ndarray:
        """Bool per slot root: True where some kept computation reads the channel."""
        roots = self.resolve()
        needed = np.zeros(len(roots), dtype=bool)
        needed[roots[np.array(self.pinned, dtype=np.int64)]] = True
        changed = True
        while changed:
            changed = False
            for L in reversed(self.layers):
                if not L.depthwise:
                    changed |= self.propagate(L, needed)
        return needed

    def mark(self, needed: np.ndarray, roots: np.ndarray) -> bool:
        new = roots[~needed[roots]]
        if new.size:
            needed[new] = True
            return True
        return False

    def force(self, L: _Layer, needed: np.ndarray, roots: np.ndarray, count: int) -> bool:
        if count <= 0:
            return False
        free = roots[~needed[roots]][:count]
        self.forced[L.name] = self.forced.get(L.name, 0) + len(free)
        self.explained.update(free.tolist())
        return self.mark(needed, free)

    def propagate(self, L: _Layer, needed: np.ndarray) -> bool:
        changed = False
        g, ig = L.groups, L.nz.shape[1]
        og = L.nz.shape[0] // g
        for k in range(g):
            rows = needed[L.out_r[k * og:(k + 1) * og]]
            if rows.any():
                cols = slice(k * ig, (k + 1) * ig)
                need = L.nz[k * og:(k + 1) * og][rows].any(0) & ~L.foldable[cols]
                changed |= self.mark(needed, L.in_r[cols][need])
        if g == 1:
            if needed[L.out_r].any() and not needed[L.in_r].any():
                changed |= self.force(L, needed, L.in_r, 1)  # a layer cannot have zero inputs
            return changed
        kin = [needed[L.in_r[k * ig:(k + 1) * ig]] for k in range(g)]
        kout = [needed[L.out_r[k * og:(k + 1) * og]] for k in range(g)]
        active = [k for k in range(g) if kin[k].any() or kout[k].any()]
        if not active:
            return changed
        # nn.Conv needs the same number of inputs and outputs in every group it keeps
        in_size = max(1, max(int(kin[k].sum()) for k in active))
        out_size = max(1, max(int(kout[k].sum()) for k in active))
        for k in active:
            changed |= self.force(L, needed, L.in_r[k * ig:(k + 1) * ig], in_size - int(kin[k].sum()))
            changed |= self.force(L, needed, L.out_r[k * og:(k + 1) * og], out_size - int(kout[k].sum()))
        return changed

    # -- applying ---------------------------------------------------------------------------

    def keep(self, node: fx.Node, needed: np.ndarray) -> np.ndarray:
        return needed[self.r(node)]

    def apply(self, needed: np.ndarray) -> None:
        for L in self.layers:
            self.apply_layer(L, needed)
        self.note_dead_kept(needed)
        for node, mod in self.channel_params:
            lay = self.layouts[node]
            fkeep = torch.from_numpy(np.repeat(self.keep(node, needed), lay.blocks))
            if not fkeep.all():
                _slice_channel_params(mod, fkeep)
        for node in self.cats:
            tensors = _arg(node, 0, "tensors")
            kept = [t for t in tensors if self.keep(t, needed).any()]
            if len(kept) != len(tensors):
                if node.args:
                    node.args = (kept, *node.args[1:])
                else:
                    node.kwargs = {**node.kwargs, "tensors": kept}
        self.gm.graph.eliminate_dead_code()
        for node in self.gm.graph.nodes:
            if node in self.layouts and not self.keep(node, needed).any():
                users = ", ".join(u.name for u in node.users)
                raise self.err(node, f"would lose all its channels but is still used by {users}")
        for name, n in self.forced.items():
            self.notes.append(f"{name}: kept {n} extra channel(s) that are dead or unused, because "
                              "a layer needs at least one input and a grouped conv equal group widths")

    def apply_layer(self, L: _Layer, needed: np.ndarray) -> None:
        mod = L.module
        rows = needed[L.out_r]
        cols = needed[L.in_r]
        if not rows.any():
            return  # the whole layer goes; dead-code elimination drops its node
        w = mod.weight.detach()
        if L.depthwise:
            assert (rows == cols).all()
            self.note_unfoldable(L, rows, cols)
            idx = torch.from_numpy(np.flatnonzero(rows)).to(w.device)
            _set_param(mod, "weight", w[idx])
            if mod.bias is not None:
                _set_param(mod, "bias", mod.bias.detach()[idx])
            mod.in_channels = mod.out_channels = mod.groups = int(rows.sum())
            return
        self.note_unfoldable(L, rows, cols)
        g, ig = L.groups, L.nz.shape[1]
        og = L.nz.shape[0] // g
        delta = np.zeros(L.nz.shape[0])
        keep_rows: list[int] = []
        keep_cols: list[np.ndarray] = []
        for k in range(g):
            rk = rows[k * og:(k + 1) * og]
            ck = cols[k * ig:(k + 1) * ig]
            if not rk.any():
                continue
            sl = slice(k * ig, (k + 1) * ig)
            dropped = ~ck
            lost = L.nz[k * og:(k + 1) * og][rk][:, dropped & ~L.foldable[sl]]
            if lost.any():  # the solver never drops a channel a kept output still reads
                raise RuntimeError(f"shrink: internal error, {L.name} would lose live inputs")
            fold = dropped & L.known[sl] & (L.k[sl] != 0)
            delta[k * og:(k + 1) * og] = L.S[k * og:(k + 1) * og][:, fold] @ L.k[sl][fold]
            keep_rows.extend(k * og + np.flatnonzero(rk))
            keep_cols.append(np.flatnonzero(ck))
        row_counts = {int(rows[k * og:(k + 1) * og].sum()) for k in range(g)} - {0}
        if len({len(c) for c in keep_cols}) != 1 or len(row_counts) != 1:
            raise RuntimeError(f"shrink: internal error, unequal group widths in {L.name}")
        dev = w.device
        ridx = torch.tensor(keep_rows, dtype=torch.long, device=dev)
        if type(mod) in _LINEAR_TYPES:
            fmask = torch.from_numpy(np.repeat(cols, self.layouts[L.src].blocks)).to(dev)
            new_w = w[ridx][:, fmask]
            mod.in_features, mod.out_features = int(fmask.sum()), len(keep_rows)
        else:
            parts = []
            for k, c in zip([k for k in range(g) if rows[k * og:(k + 1) * og].any()], keep_cols):
                part_rows = ridx[(ridx >= k * og) & (ridx < (k + 1) * og)]
                parts.append(w[part_rows][:, torch.from_numpy(c).to(dev)])
            new_w = torch.cat(parts, 0)
            mod.groups = len(parts)
            mod.in_channels = new_w.shape[1] * mod.groups
            mod.out_channels = new_w.shape[0]
        _set_param(mod, "weight", new_w)
        d = delta[keep_rows]
        if mod.bias is not None:
            b = mod.bias.detach()
            new_b = (b[ridx].to(torch.float64) + torch.from_numpy(d).to(dev)).to(b.dtype)
            _set_param(mod, "bias", new_b)
        elif np.any(d != 0):
            bn = self.bn_after(L.node)
            if bn is not None:
                # BN(z + d) == BN'(z) with running_mean' = running_mean - d: no new parameters
                rm = bn.running_mean
                bn.running_mean = (rm.to(torch.float64) - torch.from_numpy(delta).to(rm.device)).to(rm.dtype)
            else:
                mod.bias = nn.Parameter(torch.from_numpy(d).to(device=dev, dtype=w.dtype),
                                        requires_grad=mod.weight.requires_grad)
                self.notes.append(f"{L.name}: added a bias to absorb the constant output of removed input channels")

    def bn_after(self, node: fx.Node) -> nn.Module | None:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = self.mods[users[0].target]
            if type(bn) in _BN_TYPES and bn.running_mean is not None:
                return bn
        return None

    def note_unfoldable(self, L: _Layer, rows: np.ndarray, cols: np.ndarray) -> None:
        """Note constant (dead) inputs kept because a zero-padded conv cannot fold them."""
        g, ig = L.groups, L.nz.shape[1]
        og = L.nz.shape[0] // g
        reads = (L.nz.reshape(g, og, ig) & rows.reshape(g, og, 1)).any(1).reshape(-1)
        hit = np.flatnonzero(L.known & ~L.foldable & cols & reads).tolist()
        if not hit:
            return
        self.explained.update(L.in_r[hit].tolist())
        origins = self.layouts[L.src].origins
        shown = ", ".join(f"{origins[p]}={L.k[p]:.4g}" for p in hit[:6]) + (", ..." if len(hit) > 6 else "")
        self.notes.append(
            f"{L.name}: kept {len(hit)} constant (dead) input channel(s) ({shown}): {L.name} "
            "zero-pads its input, so border outputs see fewer taps and the constant cannot be "
            "folded into the bias exactly"
        )

    def note_dead_kept(self, needed: np.ndarray) -> None:
        """Note channels dead in every layer that produces them but kept for another reason."""
        assert self.roots is not None
        pinned = set(self.roots[np.array(self.pinned, dtype=np.int64)].tolist())
        dead: dict[int, bool] = {}
        origin: dict[int, str] = {}
        for L in self.layers:
            lay = self.layouts[L.node]
            for root, c, o in zip(L.out_r.tolist(), lay.consts, lay.origins):
                dead[root] = dead.get(root, True) and c is not None
                origin.setdefault(root, o)
        kept = [r for r, d in dead.items() if d and needed[r] and r not in pinned and r not in self.explained]
        if kept:
            shown = ", ".join(origin[r] for r in kept[:6]) + (", ..." if len(kept) > 6 else "")
            self.notes.append(
                f"kept {len(kept)} dead (constant) channel(s) ({shown}): their constant cannot be "
                "folded exactly into the layers that read them (it becomes position-dependent, "
                "e.g. through padding, or meets an op shrink does not fold through)"
            )

    # -- reporting --------------------------------------------------------------------------

    def layer_table(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        out = []
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                mod = self.mods[node.target]
                if type(mod) in _LINEAR_TYPES + _CONV_TYPES + _BN_TYPES:
                    out.append((str(node.target), type(mod).__name__, _weight_shape(mod),
                                _n_params(mod, recurse=False)))
        return out

    def groups(self) -> list[ChannelGroup]:
        roots = self.resolve()
        pinned = set(roots[np.array(self.pinned, dtype=np.int64)].tolist())
        members: dict[int, list[tuple[str, str, int]]] = {}

        def add(node: fx.Node, name: str, role: str) -> None:
            for i, root in enumerate(self.r(node).tolist()):
                members.setdefault(root, []).append((name, role, i))

        by_node = {L.node: L for L in self.layers}
        with_params = {n for n, _ in self.channel_params}
        for node in self.gm.graph.nodes:
            if node.op != "call_module":
                continue
            L = by_node.get(node)
            if L is not None:
                if L.depthwise:
                    add(node, L.name, "dw")
                else:
                    add(L.src, L.name, "in")
                    add(node, L.name, "out")
            elif node in with_params and all(
                    b == 1 for b in self.layouts[node].blocks):
                add(node, str(node.target), "bn")
        by_sig: dict[tuple[Any, ...], ChannelGroup] = {}
        for root, ms in members.items():
            # dedupe: one channel can feed the same consumer at several positions (cat)
            sig = tuple((n, r) for n, r, _ in ms) + (root in pinned,)
            grp = by_sig.setdefault(sig, ChannelGroup([(n, r) for n, r, _ in ms], [], root in pinned))
            grp.channels.append(tuple(i for _, _, i in ms))
        return list(by_sig.values())


def _read_consts(out: Tensor, blocks: list[int], known: np.ndarray) -> list[float | None]:
    """Per channel of `out` (batch 1): its value if uniform over its features, else None."""
    flat = out.detach().to(torch.float64).reshape(out.shape[1], -1) if out.dim() > 1 else None
    if flat is None or flat.shape[0] != sum(blocks):
        return [None] * len(blocks)
    if all(b == 1 for b in blocks):
        lo, hi = flat.min(1).values, flat.max(1).values
        ok = torch.isfinite(lo) & torch.isfinite(hi) & (hi - lo <= 1e-6 * torch.maximum(lo.abs(), hi.abs()))
        mean = flat.mean(1)
        return [float(m) if (kn and o) else None for kn, o, m in zip(known.tolist(), ok.tolist(), mean.tolist())]
    res: list[float | None] = []
    start = 0
    for p, b in enumerate(blocks):
        v = flat[start:start + b]
        start += b
        if not known[p]:
            res.append(None)
            continue
        lo, hi = float(v.min()), float(v.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            res.append(None)
        elif hi - lo <= 1e-6 * max(abs(lo), abs(hi)):
            res.append(float(v.mean()))
        else:
            res.append(None)
    return res


def _set_param(mod: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def _slice_channel_params(mod: nn.Module, keep: Tensor) -> None:
    tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
    if tensors:
        keep = keep.to(tensors[0].device)
    if isinstance(mod, nn.PReLU):
        _set_param(mod, "weight", mod.weight.detach()[keep])
        mod.num_parameters = int(keep.sum())
        return
    for pname in ("weight", "bias"):
        if getattr(mod, pname, None) is not None:
            _set_param(mod, pname, getattr(mod, pname).detach()[keep])
    for bname in ("running_mean", "running_var"):
        if getattr(mod, bname, None) is not None:
            setattr(mod, bname, getattr(mod, bname)[keep].clone())
    mod.num_features = int(keep.sum())


# --------------------------------------------------------------------------------------------
# BatchNorm fusion and verification
# --------------------------------------------------------------------------------------------


def _fuse_batchnorms(gm: fx.GraphModule, notes: list[str]) -> None:
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mods.get(node.target)) not in _BN_TYPES:
            continue
        bn = mods[node.target]
        src = node.args[0]
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or type(mods[src.target]) not in _LINEAR_TYPES + _CONV_TYPES or bn.running_mean is None):
            notes.append(f"{node.target}: not fused (it does not directly follow a Linear/Conv "
                         "used only by it, or has no running statistics)")
            continue
        layer = mods[src.target]
        w = layer.weight.detach()
        scale = (bn.weight.detach().double() if bn.affine
                 else torch.ones(bn.num_features, dtype=torch.float64, device=w.device))
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(scale)
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
        new_w = w.double() * scale.view(-1, *([1] * (w.dim() - 1)))
        new_b = (b - bn.running_mean.double()) * scale + shift
        _set_param(layer, "weight", new_w.to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=layer.weight.requires_grad)
        else:
            _set_param(layer, "bias", new_b.to(w.dtype))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)


def _verify(gm: fx.GraphModule, inputs: Iterable[Tensor], refs: list[Any]) -> None:
    """Never hand back a wrong model: compare with the original on the probe inputs."""
    for x, ref in zip(inputs, refs):
        got = gm(x)
        flat_ref, _ = torch.utils._pytree.tree_flatten(ref)
        flat_got, _ = torch.utils._pytree.tree_flatten(got)
        for a, b in zip(flat_got, flat_ref):
            if not isinstance(b, Tensor):
                continue
            scale = float(b.abs().max()) if b.numel() else 0.0
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-5 + 1e-4 * scale):
                diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
                raise RuntimeError(
                    f"shrink: internal error, the shrunk model's outputs differ from the original "
                    f"(max abs diff {diff:.3g}); please report this model"
                )
