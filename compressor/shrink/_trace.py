"""Tracing, probing the example input, and rewriting reshapes into channel-robust forms."""

from __future__ import annotations

import copy
import math
import operator
import os
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CompressError
from ._ops import SHAPE_FUNCS, SHAPE_METHODS
from ._types import UnsupportedModel

_TORCH_DIR = os.path.dirname(torch.__file__)


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
        return node.target in SHAPE_METHODS
    return node.op == "call_function" and node.target in SHAPE_FUNCS


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


