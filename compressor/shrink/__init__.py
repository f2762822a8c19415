"""Physical removal of dead neurons and channels: a smaller dense model with the same outputs.

Pruning by masking leaves zeros in full-size tensors. :func:`shrink` turns such a model into a
smaller dense one built from the same standard layers, whose outputs equal the original's
(eval mode) up to float rounding, for any input of the example's shape and any batch size.

How it works (see the module's test-suite for the cases covered):

1. ``torch.fx`` traces a copy of the model; an interpreter run on the example input records
   every tensor's shape. Reshapes are rewritten (``torch.flatten(x, 1)``, or unsqueeze /
   flatten / unflatten over spatial dims) so that no hard-coded channel count survives.
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
5. Where the model input goes straight (through flattening) into a Linear, input features whose
   weight column is all zero are skipped: a gather of the used features feeds a narrower Linear.
6. The result is checked against the original on the example and on a random input.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._graph import _Graph, _n_params, _set_param, _weight_shape
from ._inputs import SelectFeatures, input_linear, select_input_features, unread_input_features
from ._ops import BN_TYPES, CONV_TYPES, LINEAR_TYPES
from ._trace import _prepare, _trace
from ._types import ChannelGroup, LayerChange, ShrinkResult, UnsupportedModel

__all__ = [
    "ChannelGroup",
    "LayerChange",
    "SelectFeatures",
    "ShrinkResult",
    "UnsupportedModel",
    "channel_groups",
    "dead_channels",
    "input_layer",
    "shrink",
    "unread_inputs",
]


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
        if node.op != "call_module" or type(mods[node.target]) not in LINEAR_TYPES + CONV_TYPES:
            continue
        w = mods[node.target].weight.detach()
        mask = (w.reshape(w.shape[0], -1) == 0).all(1)
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = mods[users[0].target]
            if type(bn) in BN_TYPES and bn.affine and bn.num_features == mask.numel():
                mask = mask | (bn.weight.detach() == 0)
        out[str(node.target)] = mask
    return out


def input_layer(model: nn.Module) -> str | None:
    """Name of the Linear that reads the model input straight (through flattening only), whose
    unread input features :func:`shrink` removes; None for any other kind of first layer."""
    node = input_linear(_trace(model))
    return None if node is None else str(node.target)


def unread_inputs(model: nn.Module) -> Tensor | None:
    """Bool mask of the model's input features that :func:`shrink` will stop reading (their
    weight column in the first Linear is all zero); None when the input does not go straight,
    through flattening only, into one Linear."""
    return unread_input_features(_trace(model))


def channel_groups(model: nn.Module, example_input: Tensor) -> list[ChannelGroup]:
    """The coupled channel groups of `model` (the dependency graph :func:`shrink` uses).

    Handy for structured pruning that must respect residual adds, concatenation and
    depthwise convs (zero one coupled channel in every ``"out"``/``"dw"``/``"bn"`` member).
    """
    gm, probe = _prepare(model, example_input)
    graph = _Graph(gm, probe)
    graph.build()
    return graph.groups()


def shrink(model: nn.Module, example_input: Tensor, *, fuse_bn: bool = False, round_to: int = 1) -> ShrinkResult:
    """Remove dead neurons/channels from a copy of `model`; the result has the same outputs.

    `model` is not modified; the result is in eval mode. `fuse_bn` additionally folds every
    BatchNorm that follows a Linear/Conv into it (eval statistics, computed in float64).
    `round_to` > 1 keeps a few dead channels so that every shrunk (non-grouped) layer's width
    is a multiple of it, for the blocked kernels of CPU runtimes (8 suits AVX2, 16 AVX-512).
    Raises UnsupportedModel (naming the op and fx node) for models it cannot handle safely.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    params_before = _n_params(model)
    with _full_fp32(example_input.device if isinstance(example_input, Tensor) else torch.device("cpu")):
        return _shrink(model, example_input, fuse_bn, params_before, round_to)


def _shrink(model: nn.Module, example_input: Tensor, fuse_bn: bool, params_before: int, round_to: int = 1) -> ShrinkResult:
    gm, probe = _prepare(model, example_input)
    with torch.no_grad():
        check_x = torch.randn(example_input.shape, generator=torch.Generator().manual_seed(0),
                              dtype=example_input.dtype).to(example_input.device)
        y_refs = [probe.result, gm(check_x)]
        graph = _Graph(gm, probe)
        graph.build()
        before = graph.layer_table()
        needed = graph.solve()
        graph.round_widths(needed, round_to)
        graph.apply(needed)
        selected = select_input_features(gm)
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
    if selected is not None:
        plan.insert(0, LayerChange("input features", "SelectFeatures", (selected[0],), (selected[1],)))
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


def _fuse_batchnorms(gm: fx.GraphModule, notes: list[str]) -> None:
    """Fold each BatchNorm that solely follows a Linear/Conv into it (float64, eval statistics)."""
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mods.get(node.target)) not in BN_TYPES:
            continue
        bn = mods[node.target]
        src = node.args[0]
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or type(mods[src.target]) not in LINEAR_TYPES + CONV_TYPES or bn.running_mean is None):
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
        for a, b in zip(_leaves(got), _leaves(ref)):
            if not isinstance(b, Tensor):
                continue
            scale = float(b.abs().max()) if b.numel() else 0.0
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-5 + 1e-4 * scale):
                diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
                raise RuntimeError(
                    f"shrink: internal error, the shrunk model's outputs differ from the original "
                    f"(max abs diff {diff:.3g}); please report this model"
                )


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return [x for v in out.values() for x in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [x for v in out for x in _leaves(v)]
    return [out]
