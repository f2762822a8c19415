"""The channel dependency graph: layouts, constants, the keep/remove solver, the rewrite."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ._ops import (
    BINARY_FUNCS,
    BINARY_METHODS,
    BN_TYPES,
    CAT_FUNCS,
    CHANNELWISE_FUNCS,
    CHANNELWISE_METHODS,
    CHANNELWISE_MODULES,
    CONV_TYPES,
    DROPOUT_TRAINING_DEFAULT,
    LINEAR_TYPES,
    META_METHODS,
    MUL_OPS,
    REDUCE_FUNCS,
    REDUCE_METHODS,
    SHAPE_FUNCS,
    SHAPE_METHODS,
    SOFTMAX_FUNCS,
    SOFTMAX_METHODS,
    SPATIAL_FUNCS,
    SPATIAL_MODULES,
)
from ._trace import _Probe, _arg, _unsupported
from ._types import ChannelGroup, UnsupportedModel


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
        self.rounded: dict[str, int] = {}
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
        if node.op == "call_method" and node.target in META_METHODS:
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
            if t in LINEAR_TYPES or t in CONV_TYPES:
                return self.layer(node, mod, srcs)
            if t in BN_TYPES:
                return self.channelwise(node, srcs, channel_param=mod)
            if t is nn.PReLU:
                return self.channelwise(node, srcs, channel_param=mod if mod.num_parameters > 1 else None)
            if t in CHANNELWISE_MODULES:
                return self.channelwise(node, srcs)
            if t in SPATIAL_MODULES:
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
            if tgt in CHANNELWISE_FUNCS:
                if tgt in DROPOUT_TRAINING_DEFAULT and _arg(node, 2, "training", DROPOUT_TRAINING_DEFAULT[tgt]):
                    raise self.err(node, "applies dropout in eval mode (training=True)")
                return self.channelwise(node, srcs)
            if tgt in SPATIAL_FUNCS:
                return self.channelwise(node, srcs, spatial=True)
            if tgt in BINARY_FUNCS:
                return self.binary(node, srcs)
            if tgt in REDUCE_FUNCS:
                return self.reduce(node, srcs, _arg(node, 1, "dim"))
            if tgt in SOFTMAX_FUNCS:
                return self.softmax(node, srcs, _arg(node, 1, "dim"))
            if tgt in CAT_FUNCS:
                return self.cat(node)
            if tgt in SHAPE_FUNCS:
                return self.reshape(node, srcs)
            raise self.err(node, "is not an op shrink understands")
        if node.op == "call_method":
            m = node.target
            if m in CHANNELWISE_METHODS:
                return self.channelwise(node, srcs)
            if m in BINARY_METHODS:
                return self.binary(node, srcs)
            if m in REDUCE_METHODS:
                return self.reduce(node, srcs, _arg(node, 1, "dim"))
            if m in SOFTMAX_METHODS:
                return self.softmax(node, srcs, _arg(node, 1, "dim"))
            if m in SHAPE_METHODS:
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
            if type(channel_param) in BN_TYPES and channel_param.affine:
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
        if node.target in MUL_OPS:
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
        is_conv = type(mod) in CONV_TYPES
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

    def round_widths(self, needed: np.ndarray, multiple: int) -> None:
        """Keep extra channels so that every shrunk layer's width is a multiple of ``multiple``
        (or its full width): CPU kernels run blocked layouts (onnxruntime's NCHWc: 8 channels
        on AVX2, 16 on AVX-512) far faster than odd widths. Kept channels change no output."""
        if multiple <= 1:
            return
        changed = True
        while changed:
            changed = False
            for L in self.layers:
                if L.groups != 1:
                    continue  # grouped/depthwise widths follow their input's
                out = np.unique(L.out_r)
                kept = int(needed[out].sum())
                want = min(out.size, -(-kept // multiple) * multiple)
                if 0 < kept < want:
                    extra = out[~needed[out]][: want - kept]
                    needed[extra] = True
                    self.rounded[L.name] = self.rounded.get(L.name, 0) + len(extra)
                    self.explained.update(extra.tolist())
                    changed = True
            if changed:  # what the kept channels read must stay too
                for L in reversed(self.layers):
                    if not L.depthwise:
                        self.propagate(L, needed)

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
        for name, n in self.rounded.items():
            self.notes.append(f"{name}: kept {n} extra zero or unused channel(s) to round its width to the requested multiple")
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
        if type(mod) in LINEAR_TYPES:
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
            if type(bn) in BN_TYPES and bn.running_mean is not None:
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
                if type(mod) in LINEAR_TYPES + CONV_TYPES + BN_TYPES:
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


