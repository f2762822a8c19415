"""Compact ONNX for unstructured sparsity, and a runtime-sparse rewrite of sparse Linear layers.

:func:`compact` replaces each large float initializer by its :mod:`formats` encoding, stored as
plain initializers (narrow integer index buffers included), plus a *decode subgraph* of standard
ONNX ops that rebuilds the dense tensor under the original name, so no consumer changes. Every
shape in a decode subgraph is static, so onnxruntime constant-folds it at session creation
(any optimisation level >= BASIC) and runs the dense model afterwards; :func:`decode_ops_remaining`
checks that. ``coo`` instead stores a standard ONNX sparse tensor (``Constant(sparse_value=...)``
with int64 linear indices), which needs no folding and survives ``.ort`` conversion.

Decode subgraphs use default-domain ops only (opset >= 13; csr needs 16). Stored buffers are
named ``decode/<tensor>/<buffer>``, intermediates ``decode/<k>/<tag>`` and shared constants
``decode/c/<tag>``: short names, because names are most of a subgraph's bytes. Nodes are unnamed.

* bitmask: ``Unsqueeze(mask) -> BitShift(RIGHT, [7..0]) -> Mod(2) -> Reshape -> Slice(N)`` gives
  the element mask (no [256, 8] lookup table to store); ``Cast(int32) -> CumSum -> Mul(mask)``
  gives 1-based value slots (0 for zeros); ``Reshape(shape)`` then ``Gather(Concat([0], values))``
  gives the weight.
* csr: ``ScatterElements(reduction="add")`` of ones at ``row_ptr[1:R]`` into zeros[nnz+1] and a
  ``CumSum`` give each non-zero's row; ``lin = row * C + col``.
* rel: ``lin = CumSum(gaps + 1) - 1``.
* relb: entry k's b-bit gap starts at bit ``k*b``: ``Range -> Mul(b) -> Div/Mod(8)`` give its
  byte and shift, a ``Gather`` of three bytes (the stream padded by two zero bytes) and
  ``Mul([1, 256, 65536]) -> ReduceSum`` a 24-bit word, ``Div(2**shift) -> Mod(2**b)`` the gap;
  then as rel.
* coo (chosen by ``auto`` only, narrow indices): ``lin = Cast(indices, int64)``.
* csr/rel/relb/coo then unravel ``lin`` with ``Div``/``Mod`` by the strides and ``ScatterND`` the
  values into ``ConstantOfShape(shape)``: scattering straight into the final shape keeps the
  session-creation peak lower than scattering flat and reshaping (shared/research/formats.md 2.4).
* an all-zero tensor is a bare ``ConstantOfShape`` whatever the encoding (reported with 0 bytes).

:func:`runtime_sparse_linear` is the other trade: the weight of a sparse Gemm/MatMul stays sparse
in memory (sliced ELL layout: rows sorted by length and cut into slices, each slice storing per
row a fixed number of column indices and values) and is executed with Gather-based standard ops,
so it is never materialised dense. An ``If`` on the number of input rows picks
``GatherElements`` for tiny batches and a transposed ``Gather`` plus a batched ``MatMul``
otherwise.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import formats
from exporters import onnx_export
from exporters.onnx_export import ExportError

ENCODINGS: tuple[str, ...] = ("auto", "dense", "bitmask", "csr", "rel", "relb", "coo")
DECODE_PREFIX = "decode/"
SPARSE_PREFIX = "sparse/"
# Float element types that are encoded; the codecs need a numpy dtype.
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
# Serialized bytes each decode subgraph adds to the file, measured per format on a 2-D weight
# (the first subgraph of a model also stores the shared constants, about 100-450 more). "auto"
# picks the format with the smallest buffers + subgraph, and keeps a tensor dense unless that
# saves bytes.
_GRAPH_OVERHEAD = {"bitmask": 700, "csr": 1300, "rel": 660, "relb": 1600, "coo": 660}
# Runtime-sparse: batches of at most this many rows take the GatherElements path (its cost grows
# with rows); larger ones gather whole rows of x^T, whose cost is nearly flat in the batch
# (measured crossover 4-8 rows on 4096x4096 at 99 % zeros).
_FEW_ROWS = 4
_SLICE_ROWS = 256  # output rows per slice of the runtime-sparse layout (bench/bench_sparse_onnx.py)


@dataclass
class TensorEncoding:
    """One row of the per-layer report: how one float initializer is stored."""

    name: str
    shape: tuple[int, ...]
    nonzero: int
    format: str
    encoded_bytes: int
    dense_bytes: int


# ---------------------------------------------------------------------------------------------
# Helpers


class _Builder:
    """Collects the nodes and initializers of one rewritten tensor, with unique prefixed names.

    Names are short on purpose: in a decode subgraph they are most of the graph overhead.
    Intermediate tensors are ``<prefix><tag>``; stored buffers get ``<buffer_prefix><tag>``
    so the encoded data stays readable; ``shared`` constants are created once per model.
    """

    def __init__(
        self, prefix: str, taken: set[str], shared: dict[str, str], shared_inits: list[onnx.TensorProto],
        buffer_prefix: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.buffer_prefix = buffer_prefix if buffer_prefix is not None else prefix
        self.taken = taken
        self.shared = shared
        self.shared_inits = shared_inits
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def child(self, prefix: str) -> "_Builder":
        return _Builder(prefix, self.taken, self.shared, self.shared_inits, self.buffer_prefix)

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def name(self, tag: str) -> str:
        return self._unique(self.prefix + tag)

    def buffer(self, tag: str, array: np.ndarray) -> str:
        name = self._unique(self.buffer_prefix + tag)
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def init(self, tag: str, array: np.ndarray) -> str:
        name = self.name(tag)
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, key: str, array: np.ndarray) -> str:
        """A small constant shared by every subgraph in the model (axes, ones, shift amounts)."""
        if key not in self.shared:
            self.shared[key] = name = self._unique(self.prefix.split("/")[0] + "/c/" + key)
            self.shared_inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return self.shared[key]

    def op(self, op_type: str, inputs: list[str], tag: str, *, out: str | None = None, **attrs: object) -> str:
        output = out if out is not None else self.name(tag)
        # No node name: outputs already carry the prefix, and names would add bytes to every node.
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output


def _default_opset(proto: onnx.ModelProto) -> int:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise ExportError("the model imports no default-domain (ai.onnx) opset")


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for t in graph.initializer:
        names.add(t.name)
    for t in graph.sparse_initializer:
        names.add(t.values.name)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        names.add(v.name)
    stack = [graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
            names.add(n.name)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
    names.discard("")
    return names


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _scalar(value: float | int, dtype: np.dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], dtype=dtype), "value")


# ---------------------------------------------------------------------------------------------
# Decode subgraphs


def _scatter(b: _Builder, lin: str, values: str, shape: tuple[int, ...], dtype: np.dtype, out: str) -> None:
    """ScatterND ``values`` at the int64 linear positions ``lin`` into zeros of ``shape``."""
    idx = b.op("Unsqueeze", [lin, b.const("axis1", np.array([1], np.int64))], "ix")
    if len(shape) > 1:
        strides = np.array([math.prod(shape[i + 1 :]) for i in range(len(shape))], np.int64)
        idx = b.op("Div", [idx, b.init("strides", strides)], "q")
        idx = b.op("Mod", [idx, b.init("dims", np.array(shape, np.int64))], "nd")
    zeros = b.op("ConstantOfShape", [b.init("shape", np.array(shape, np.int64))], "z", value=_scalar(0, dtype))
    b.op("ScatterND", [zeros, idx, values], "", out=out)


def _decode_bitmask(b: _Builder, enc: formats.Encoded, out: str) -> None:
    shape, n = enc.shape, math.prod(enc.shape)
    nbytes = int(enc.buffers["mask"].size)
    # int32 slots cover every tensor the codecs accept except a full 2**31-element one.
    slot_t, slot_np = (TensorProto.INT32, np.int32) if n < 2**31 - 1 else (TensorProto.INT64, np.int64)
    mask = b.buffer("mask", enc.buffers["mask"])
    values = b.buffer("values", enc.buffers["values"])
    # Bit j of byte m, most significant first (np.packbits' order): (m >> (7 - j)) mod 2. BitShift
    # and Mod exist for uint8 since opset 11/10, so no [256, 8] lookup table has to be stored.
    col = b.op("Unsqueeze", [mask, b.const("axis1", np.array([1], np.int64))], "m")
    bits = b.op("BitShift", [col, b.const("shift8", np.arange(7, -1, -1, dtype=np.uint8))], "sh", direction="RIGHT")
    bits = b.op("Mod", [bits, b.const("two_u8", np.array([2], np.uint8))], "bits")
    flat = b.op("Reshape", [bits, b.init("nbits", np.array([nbytes * 8], np.int64))], "bf")
    if nbytes * 8 != n:
        flat = b.op(
            "Slice", [flat, b.const("zero_i64", np.array([0], np.int64)), b.init("n", np.array([n], np.int64))], "keep"
        )
    keep = b.op("Cast", [flat], "k", to=slot_t)
    count = b.op("CumSum", [keep, b.const(f"axis0_{slot_np.__name__}", np.array(0, slot_np))], "cs")
    slot = b.op("Mul", [count, keep], "slot")  # 1-based value slot, 0 for zeros
    slot = b.op("Reshape", [slot, b.init("shape", np.array(shape, np.int64))], "slot_nd")
    zero = b.const(f"zero_{np.dtype(enc.dtype).name}", np.zeros(1, enc.dtype))
    vals0 = b.op("Concat", [zero, values], "v0", axis=0)
    b.op("Gather", [vals0, slot], "", out=out, axis=0)


def _decode_csr(b: _Builder, enc: formats.Encoded, out: str) -> None:
    shape = enc.shape
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
    nnz = int(enc.buffers["values"].size)
    row_ptr = b.buffer("row_ptr", enc.buffers["row_ptr"])
    col_idx = b.buffer("col_idx", enc.buffers["col_idx"])
    values = b.buffer("values", enc.buffers["values"])
    # Gather/Scatter indices must be int32/int64: widen the narrow stored buffers in the graph.
    col = b.op("Cast", [col_idx], "col", to=TensorProto.INT64)
    if rows == 1:
        lin = col
    else:
        starts = b.op(
            "Slice", [row_ptr, b.const("one_i64", np.array([1], np.int64)), b.init("r", np.array([rows], np.int64))], "rs"
        )
        starts = b.op("Cast", [starts], "rs64", to=TensorProto.INT64)
        ones = b.op("ConstantOfShape", [b.init("r1", np.array([rows - 1], np.int64))], "ones", value=_scalar(1, np.int64))
        zeros = b.op("ConstantOfShape", [b.init("nnz1", np.array([nnz + 1], np.int64))], "z0", value=_scalar(0, np.int64))
        # "add" because empty rows put several row starts on the same slot.
        marks = b.op("ScatterElements", [zeros, starts, ones], "mk", axis=0, reduction="add")
        marks = b.op(
            "Slice", [marks, b.const("zero_i64", np.array([0], np.int64)), b.init("nnz", np.array([nnz], np.int64))], "mk2"
        )
        row = b.op("CumSum", [marks, b.const("axis0_int64", np.array(0, np.int64))], "row")
        base = b.op("Mul", [row, b.init("cols", np.array([cols], np.int64))], "rb")
        lin = b.op("Add", [base, col], "lin")
    _scatter(b, lin, values, shape, enc.dtype, out)


def _decode_rel(b: _Builder, enc: formats.Encoded, out: str) -> None:
    gaps = b.buffer("gaps", enc.buffers["gaps"])
    values = b.buffer("values", enc.buffers["values"])
    one = b.const("one_i64", np.array([1], np.int64))
    g64 = b.op("Cast", [gaps], "g", to=TensorProto.INT64)
    step = b.op("Add", [g64, one], "st")
    end = b.op("CumSum", [step, b.const("axis0_int64", np.array(0, np.int64))], "end")
    lin = b.op("Sub", [end, one], "lin")
    _scatter(b, lin, values, enc.shape, enc.dtype, out)


def _decode_relb(b: _Builder, enc: formats.Encoded, out: str) -> None:
    """Bit-packed gaps: entry k's gap is bits [k*w, (k+1)*w) of the little-endian stream, read
    as three bytes from byte k*w // 8 (w <= 16 bits plus a shift < 8 fit in 24 bits). The per-entry
    arithmetic runs in int32 where positions fit (halving the memory ORT needs to fold it)."""
    width = int(enc.buffers["width"][0])
    entries = int(enc.buffers["values"].size)
    n = math.prod(enc.shape)
    narrow = max(n, entries * width + 24) < 2**31 - 1
    it, inp = (TensorProto.INT32, np.int32) if narrow else (TensorProto.INT64, np.int64)
    tag = "i32" if narrow else "i64"
    packed = b.buffer("packed_gaps", enc.buffers["packed_gaps"])
    values = b.buffer("values", enc.buffers["values"])
    one = b.const(f"one_{tag}", np.array([1], inp))
    zero_scalar, one_scalar = b.const(f"zero_s{tag}", np.array(0, inp)), b.const(f"one_s{tag}", np.array(1, inp))
    stream = b.op("Cast", [packed], "p", to=it)
    stream = b.op("Concat", [stream, b.const(f"zeros2_{tag}", np.zeros(2, inp))], "pp", axis=0)
    k = b.op("Range", [zero_scalar, b.init("count", np.array(entries, inp)), one_scalar], "k")
    offset = b.op("Mul", [k, b.init("width", np.array([width], inp))], "o")
    eight = b.const(f"eight_{tag}", np.array([8], inp))
    byte, shift = b.op("Div", [offset, eight], "by"), b.op("Mod", [offset, eight], "sh")
    three = b.op("Add", [b.op("Unsqueeze", [byte, b.const("axis1", np.array([1], np.int64))], "u"),
                         b.const(f"arange3_{tag}", np.arange(3, dtype=inp))], "t")
    weights = b.const(f"bytes3_{tag}", np.array([1, 256, 65536], inp))
    word = b.op("ReduceSum", [b.op("Mul", [b.op("Gather", [stream, three], "b3", axis=0), weights], "m"),
                              b.const("one_i64", np.array([1], np.int64))], "w", keepdims=0)
    divisor = b.op("Gather", [b.const(f"pow2_{tag}", 2 ** np.arange(8, dtype=inp)), shift], "d", axis=0)
    gap = b.op("Mod", [b.op("Div", [word, divisor], "q"), b.init("modulus", np.array([1 << width], inp))], "g")
    end = b.op("CumSum", [b.op("Add", [gap, one], "st"), b.const("axis0_int64", np.array(0, np.int64))], "end")
    lin = b.op("Sub", [end, one], "lin")
    if narrow:
        lin = b.op("Cast", [lin], "lin64", to=TensorProto.INT64)  # ScatterND wants int64 indices
    _scatter(b, lin, values, enc.shape, enc.dtype, out)


def _decode_coo_narrow(b: _Builder, enc: formats.Encoded, out: str) -> None:
    indices = b.buffer("indices", enc.buffers["indices"])
    values = b.buffer("values", enc.buffers["values"])
    lin = b.op("Cast", [indices], "lin", to=TensorProto.INT64)
    _scatter(b, lin, values, enc.shape, enc.dtype, out)


def _zeros(b: _Builder, shape: tuple[int, ...], dtype: np.dtype, out: str) -> None:
    b.op("ConstantOfShape", [b.init("shape", np.array(shape, np.int64))], "", out=out, value=_scalar(0, dtype))


def _coo_constant(b: _Builder, array: np.ndarray, out: str) -> int:
    """Standard ONNX COO (int64 linear indices) as Constant(sparse_value); returns the stored bytes."""
    flat = array.reshape(-1)
    nz = np.flatnonzero(flat)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[nz]), b.buffer_prefix + "values")
    indices = numpy_helper.from_array(nz.astype(np.int64), b.buffer_prefix + "indices")
    sparse = helper.make_sparse_tensor(values, indices, list(array.shape))
    # Constant's output is a dense tensor, so full_check's shape inference accepts it where a
    # graph.sparse_initializer fails (formats.md 1.1).
    b.nodes.append(helper.make_node("Constant", [], [out], sparse_value=sparse))
    return int(nz.size) * (8 + array.dtype.itemsize)


# ---------------------------------------------------------------------------------------------
# compact


def compact(
    proto: onnx.ModelProto, encoding: str = "auto", *, min_elements: int = 1024
) -> tuple[onnx.ModelProto, list[TensorEncoding]]:
    """Replace each top-level float initializer with >= ``min_elements`` elements by its sparse encoding.

    ``auto`` picks the format whose buffers plus decode subgraph take the fewest bytes, and keeps
    a tensor dense unless that is smaller than the dense tensor; ``bitmask``/``csr``/``rel``/``relb`` force that format
    on every eligible tensor; ``coo`` stores ONNX sparse tensors; ``dense`` changes nothing.
    All-zero tensors become a ``ConstantOfShape``. Returns the new model (``proto`` is not
    mutated) and one report row per float initializer.
    """
    if encoding not in ENCODINGS:
        raise ExportError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if min_elements < 1:
        raise ExportError(f"min_elements must be >= 1, got {min_elements}")
    opset = _default_opset(proto)
    needed = 16 if encoding in ("auto", "csr") else 13  # ScatterElements(reduction=add) is opset 16
    if encoding not in ("dense", "coo") and opset < needed:
        raise ExportError(f"encoding {encoding!r} needs default-domain opset >= {needed}, the model has {opset}")

    out = _copy(proto)
    graph = out.graph
    taken = _all_names(graph)
    graph_inputs = {v.name for v in graph.input}
    report: list[TensorEncoding] = []
    new_nodes: list[onnx.NodeProto] = []
    kept: list[onnx.TensorProto] = []
    added: list[onnx.TensorProto] = []
    shared: dict[str, str] = {}
    shared_inits: list[onnx.TensorProto] = []
    ordinal = 0

    for tensor in graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            kept.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
        shape = tuple(int(d) for d in array.shape)
        dense_bytes = int(array.nbytes)
        nnz = int(np.count_nonzero(array))
        row = TensorEncoding(tensor.name, shape, nnz, "dense", dense_bytes, dense_bytes)
        report.append(row)
        # Initializers listed as graph inputs are overridable defaults: a node output cannot stand in.
        if encoding == "dense" or array.size < min_elements or not shape or tensor.name in graph_inputs:
            kept.append(tensor)
            continue

        # Intermediates get a short per-tensor number; the stored buffers keep the tensor's name.
        b = _Builder(
            f"{DECODE_PREFIX}{ordinal}/", taken, shared, shared_inits, buffer_prefix=f"{DECODE_PREFIX}{tensor.name}/"
        )
        ordinal += 1
        if encoding == "coo":
            row.format, row.encoded_bytes = "coo", _coo_constant(b, array, tensor.name)
        else:
            if encoding == "auto":
                cost = {f: n + _GRAPH_OVERHEAD.get(f, 0) for f, n in formats.all_nbytes(array).items()}
                fmt = min(cost, key=lambda f: (cost[f], f != "dense"))
                if fmt == "dense" or cost[fmt] >= dense_bytes:
                    kept.append(tensor)
                    continue
                enc = formats.encode(array, fmt)
            else:
                enc = formats.encode(array, encoding)
            row.format, row.encoded_bytes = enc.format, enc.nbytes
            if nnz == 0:
                _zeros(b, shape, array.dtype, tensor.name)
                row.encoded_bytes = 0
            elif enc.format == "bitmask":
                _decode_bitmask(b, enc, tensor.name)
            elif enc.format == "csr":
                _decode_csr(b, enc, tensor.name)
            elif enc.format == "rel":
                _decode_rel(b, enc, tensor.name)
            elif enc.format == "relb":
                _decode_relb(b, enc, tensor.name)
            else:  # coo picked by auto: narrow indices, decoded in the graph
                _decode_coo_narrow(b, enc, tensor.name)
        new_nodes.extend(b.nodes)
        added.extend(b.inits)

    del graph.initializer[:]
    graph.initializer.extend(kept + shared_inits + added)
    # Decode nodes read only initializers, so putting them first keeps the graph topologically sorted.
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    return out, report


def model_bytes(proto: onnx.ModelProto) -> int:
    """Serialized size of the model in bytes (what an embedded-weights ``.onnx`` file takes)."""
    return int(proto.ByteSize())


def decode_ops_remaining(proto: onnx.ModelProto) -> list[str]:
    """Op types of decode-subgraph nodes left after onnxruntime's default graph optimisations.

    An empty list means ORT folded every decode subgraph into dense initializers at session
    creation, so inference runs the dense model. A node counts as a leftover when its name has
    the ``decode/`` prefix or it still reads a ``decode/`` tensor (ORT may rename nodes it rewrites).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = path
        ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    left = []
    for node in _walk_nodes(optimized.graph):
        if node.name.startswith(DECODE_PREFIX) or any(i.startswith(DECODE_PREFIX) for i in node.input):
            left.append(node.op_type)
    return left


def _walk_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for g in onnx_export.subgraphs(graph):
        yield from g.node


# ---------------------------------------------------------------------------------------------
# Runtime-sparse Linear


@dataclass
class _SlicedEll:
    """Sliced ELL layout of ``w`` [out, in]: rows sorted by their number of non-zeros, cut into
    slices of ``_SLICE_ROWS`` rows, each slice padded only to its own longest row."""

    slices: list[tuple[np.ndarray, np.ndarray]]  # per slice: column indices [rows, width], values [rows, 1, width]
    inverse: np.ndarray | None  # sorted position of each original row; None when already in order


def _sliced_ell(w: np.ndarray) -> _SlicedEll:
    counts = np.count_nonzero(w, axis=1)
    order = np.argsort(-counts, kind="stable")
    slices = []
    for start in range(0, w.shape[0], _SLICE_ROWS):
        rows = order[start:start + _SLICE_ROWS]
        block = w[rows]
        r, cols = np.nonzero(block)
        width = max(int(counts[rows].max()) if rows.size else 0, 1)
        starts = np.concatenate([[0], np.cumsum(counts[rows])[:-1]])
        slot = np.arange(r.size) - starts[r]
        # Padding reads column 0 and multiplies it by 0, which is what the dense product does too.
        idx = np.zeros((rows.size, width), np.int32)
        vals = np.zeros((rows.size, width), w.dtype)
        idx[r, slot] = cols
        vals[r, slot] = block[r, cols]
        slices.append((idx, vals.reshape(rows.size, 1, width)))
    identity = bool(np.all(order == np.arange(order.size)))
    return _SlicedEll(slices, None if identity else np.argsort(order).astype(np.int64))


def _known_rank(graph: onnx.GraphProto, name: str) -> int | None:
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        if v.name == name and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _sparse_matmul(
    b: _Builder, x: str, slices: list[tuple[str, str, int, int]], inverse: str | None, out: str, elem_type: int, n_out: int
) -> None:
    """y[r, o] = sum_k x[r, idx[o, k]] * vals[o, k] for a 2-D ``x`` [rows, in], as standard ops.

    ``slices`` holds, per slice of (sorted) output rows, the names of its [rows, width] int32 index
    and [rows, 1, width] value initializers, its row count and width; ``inverse`` the Gather
    indices that put the sorted rows back in order.
    """
    rows = b.op("Shape", [x], "rows", start=0, end=1)
    few = b.op("LessOrEqual", [rows, b.init("few_rows", np.array([_FEW_ROWS], np.int64))], "few")
    cond = b.op("Squeeze", [few], "cond")

    # Few rows: GatherElements copies single elements fast, but its indices need one row per
    # batch row, so the cost grows with the batch. Only activations are reshaped: a Reshape of
    # the stored values would be constant-folded into a second copy of them.
    t = b.child(b.prefix + "few/")
    axes = b.init("sum_axes", np.array([2, 3], np.int64))
    parts = []
    for i, (idx, vals, n, width) in enumerate(slices):
        shape = t.op("Concat", [rows, b.init(f"s{i}_idx_dims", np.array([n, width], np.int64))], f"s{i}_idx_shape", axis=0)
        ie = t.op("Expand", [idx, shape], f"s{i}_idx_rows")  # [rows, n, width]
        ie = t.op("Reshape", [ie, b.init(f"s{i}_flat_shape", np.array([0, n * width], np.int64))], f"s{i}_idx_flat")
        g = t.op("GatherElements", [x, ie], f"s{i}_picked", axis=1)
        g = t.op("Reshape", [g, b.init(f"s{i}_picked_shape", np.array([-1, n, 1, width], np.int64))], f"s{i}_picked4")
        prod = t.op("Mul", [g, vals], f"s{i}_prod")  # [rows, n, 1, width]
        parts.append(t.op("ReduceSum", [prod, axes], f"s{i}_y", keepdims=0))
    y_few = t.op("Concat", parts, "y_sorted", axis=1) if len(parts) > 1 else parts[0]
    if inverse is not None:
        y_few = t.op("Gather", [y_few, inverse], "y", axis=1)

    # Many rows: gather whole rows of x^T (one memcpy of `rows` floats per stored entry), then a
    # batched [1, width] @ [width, rows] product per output row. Slicing keeps each gathered
    # block small enough to stay in cache between the Gather and the MatMul, and sorting the
    # rows by length first keeps the padding small.
    e = b.child(b.prefix + "many/")
    xt = e.op("Transpose", [x], "xt", perm=[1, 0])
    parts = []
    for i, (idx, vals, n, width) in enumerate(slices):
        g = e.op("Gather", [xt, idx], f"s{i}_picked", axis=0)  # [n, width, rows]
        parts.append(e.op("MatMul", [vals, g], f"s{i}_dot"))  # [n, 1, rows]
    y_many = e.op("Concat", parts, "dot_sorted", axis=0) if len(parts) > 1 else parts[0]
    if inverse is not None:
        y_many = e.op("Gather", [y_many, inverse], "dot", axis=0)
    y_many = e.op("Squeeze", [y_many, b.init("unit_axis", np.array([1], np.int64))], "dot2")  # [out, rows]
    y_many = e.op("Transpose", [y_many], "y", perm=[1, 0])

    def branch(bld: _Builder, y: str, label: str) -> onnx.GraphProto:
        vi = helper.make_tensor_value_info(y, elem_type, [None, n_out])
        return helper.make_graph(bld.nodes, b.prefix + label, [], [vi])

    b.nodes.append(
        helper.make_node(
            "If",
            [cond],
            [out],
            then_branch=branch(t, y_few, "few_rows"),
            else_branch=branch(e, y_many, "many_rows"),
        )
    )


def runtime_sparse_linear(
    proto: onnx.ModelProto, names: list[str] | None = None, *, min_sparsity: float = 0.9
) -> onnx.ModelProto:
    """Execute sparse Gemm/MatMul weights sparse, with standard ops, never materialising them dense.

    Rewrites every ``Gemm`` (``transA=0``) and ``MatMul`` whose second input is a 2-D float32
    initializer with at least ``min_sparsity`` zeros (only weights named in ``names`` when given;
    each must be such a weight) into an ELL gather-multiply-reduce; the batch stays dynamic.
    Returns a new model; ``proto`` is not mutated.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ExportError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if _default_opset(proto) < 13:
        raise ExportError("runtime_sparse_linear needs default-domain opset >= 13")
    out = _copy(proto)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    taken = _all_names(graph)

    def weight_of(node: onnx.NodeProto) -> str | None:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            return None
        w = node.input[1]
        t = inits.get(w)
        # float32 only: onnxruntime's CPU kernels for this op mix are not all there for float16.
        if t is None or w in graph_inputs or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            return None
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return None
        return w

    candidates = {w for n in graph.node if (w := weight_of(n)) is not None}
    if names is not None:
        missing = sorted(set(names) - candidates)
        if missing:
            raise ExportError(f"not the 2-D float weight initializer of a Gemm/MatMul: {', '.join(missing)}")
        candidates &= set(names)

    ell: dict[str, tuple[list[tuple[str, str, int, int]], str | None]] = {}  # weight variant -> slices, inverse
    shared: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    rewritten: set[str] = set()
    for node in graph.node:
        w_name = weight_of(node)
        if w_name is None or w_name not in candidates:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name])
        if node.op_type == "MatMul" or not _attr(node, "transB", 0):
            w = w.T  # ELL rows are output features
        if w.size == 0 or 1.0 - np.count_nonzero(w) / w.size < min_sparsity:
            new_nodes.append(node)
            continue
        n_out, n_in = w.shape
        b = _Builder(f"{SPARSE_PREFIX}{w_name}/", taken, shared, [])
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        key = f"{w_name}|{node.op_type}|{_attr(node, 'transB', 0)}|{alpha}"
        if key not in ell:  # a weight shared by several nodes is stored once
            layout = _sliced_ell(w)
            slices = []
            for i, (idx, vals) in enumerate(layout.slices):
                if alpha != 1.0:
                    vals = (vals * alpha).astype(w.dtype)
                slices.append((b.init(f"ell{i}_idx", idx), b.init(f"ell{i}_vals", vals), vals.shape[0], vals.shape[2]))
            inverse = b.init("ell_inverse", layout.inverse) if layout.inverse is not None else None
            ell[key] = (slices, inverse)
        slices, inverse = ell[key]
        x, y = node.input[0], node.output[0]
        elem = inits[w_name].data_type
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        flatten = node.op_type == "MatMul" and _known_rank(graph, x) != 2
        x2 = x
        if flatten:
            x2 = b.op("Reshape", [x, b.init("x2_shape", np.array([-1, n_in], np.int64))], "x2")
        y2 = b.name("y2") if (has_bias or flatten) else y
        _sparse_matmul(b, x2, slices, inverse, y2, elem, n_out)
        if flatten:
            lead = b.op("Shape", [x], "lead", start=0, end=-1)
            y_shape = b.op("Concat", [lead, b.init("out_dim", np.array([n_out], np.int64))], "y_shape", axis=0)
            b.op("Reshape", [y2, y_shape], "", out=y)
        if has_bias:
            bias = node.input[2]
            beta = float(_attr(node, "beta", 1.0))
            if beta != 1.0:
                bias = b.op("Mul", [bias, b.init("beta", np.array(beta, dtype=w.dtype))], "bias_scaled")
            b.op("Add", [y2, bias], "", out=y)
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.inits)
        rewritten.add(w_name)

    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop the dense weights nothing reads any more.
    used = {i for n in _walk_nodes(graph) for i in n.input}
    dead = {w for w in rewritten if w not in used}
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_vi = [v for v in graph.value_info if v.name not in dead]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return out
