"""Measured footprint: multiply-accumulates, parameters in an ONNX graph, file sizes as shipped,
and onnxruntime latency.

Everything here counts what is there; nothing is estimated. Runtime memory and the latency
percentiles of a report are measured in a fresh process by :mod:`exporters.measure`.
"""

from __future__ import annotations

import gzip
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from exporters.onnx_export import subgraphs
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
GZIP_LEVEL = 9
ZSTD_LEVEL = 19


# -- MACs of a PyTorch model ------------------------------------------------------------------


def count_macs(model: nn.Module, input_shape: tuple[int, ...], *, nonzero_weights: bool = False) -> int:
    """Multiply-accumulates per sample of the Linear and Conv layers.

    With ``nonzero_weights`` only the multiplications by a non-zero weight count: each non-zero
    weight is used once per output position (``out.numel() / out_channels``). That is what a
    sparse kernel would need; stock onnxruntime runs dense kernels, which do the dense count.
    """
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        per_out = out[0].numel()
        if nonzero_weights:
            channels = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            total += int(torch.count_nonzero(mod.weight)) * (per_out // channels)
        elif isinstance(mod, nn.Linear):
            total += per_out * mod.in_features
        else:
            total += per_out * (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


# -- files as shipped -------------------------------------------------------------------------


def model_files(onnx_path: str | os.PathLike[str]) -> list[Path]:
    """The ``.onnx`` file and every external-data file its tensors point at."""
    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    sidecars: list[Path] = []
    for tensor in _all_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    p = onnx_path.parent / entry.value
                    if p not in sidecars:
                        sidecars.append(p)
    return [onnx_path, *sidecars]


def compressed_sizes(files: list[Path]) -> dict[str, int | None]:
    """Bytes of the files after a standard general-purpose compressor, summed over the files.

    gzip: ``gzip.compress(data, compresslevel=9, mtime=0)`` (deterministic; what a download or
    an APK/zip entry costs, roughly). zstd: ``zstandard.ZstdCompressor(level=19)``, None when
    the ``zstandard`` package is missing.
    """
    gz = 0
    zs: int | None = 0
    try:
        import zstandard
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    except ImportError:  # pragma: no cover - a declared dependency
        compressor = None
        zs = None
    for f in files:
        data = Path(f).read_bytes()
        gz += len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))
        if compressor is not None:
            zs += len(compressor.compress(data))
    return {"gzip9_bytes": gz, "zstd19_bytes": zs}


# -- parameters in an ONNX graph --------------------------------------------------------------


def _all_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in subgraphs(graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        yield a.t
                    elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                        yield a.sparse_tensor.values
                        yield a.sparse_tensor.indices


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored (raw_data, typed fields or external data)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        for entry in t.external_data:
            if entry.key == "length":
                return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    return int(numpy_helper.to_array(t).nbytes)


def graph_constants(proto: onnx.ModelProto, base_dir: str | None = None) -> Iterator[tuple[str, str, tuple[int, ...], int, int, int]]:
    """Every constant tensor of the graph and its subgraphs: initializers, sparse initializers and
    ``Constant`` nodes. Yields ``(name, kind, dense shape, element type, non-zeros, stored bytes)``;
    a sparse tensor counts its dense shape and its stored values and indices.
    """
    for g in subgraphs(proto.graph):
        for t in g.initializer:
            yield t.name, "initializer", tuple(t.dims), t.data_type, _nonzero(t, base_dir), _tensor_bytes(t)
        for sp in g.sparse_initializer:
            yield (sp.values.name, "sparse_initializer", tuple(sp.dims), sp.values.data_type, _nonzero(sp.values, base_dir),
                   _tensor_bytes(sp.values) + _tensor_bytes(sp.indices))
        for node in g.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield node.output[0], "constant", tuple(a.t.dims), a.t.data_type, _nonzero(a.t, base_dir), _tensor_bytes(a.t)
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    sp = a.sparse_tensor
                    yield (node.output[0], "sparse_constant", tuple(sp.dims), sp.values.data_type, _nonzero(sp.values, base_dir),
                           _tensor_bytes(sp.values) + _tensor_bytes(sp.indices))


def _nonzero(t: onnx.TensorProto, base_dir: str | None) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL and base_dir is not None:
        t = onnx.TensorProto.FromString(t.SerializeToString())
        onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)
    return int(np.count_nonzero(numpy_helper.to_array(t)))


def param_counts(proto: onnx.ModelProto, base_dir: str | None = None) -> dict[str, int]:
    """Float parameters of a graph as it is stored.

    ``float_elements`` / ``float_nonzero``: elements (dense shape for sparse tensors) and
    non-zeros of every float constant (initializers, sparse initializers, ``Constant`` nodes,
    subgraphs included); ``constant_bytes``: stored bytes of all constants of any type (index
    buffers included).
    """
    elements = nonzero = stored = 0
    for _name, _kind, shape, dtype, nnz, nbytes in graph_constants(proto, base_dir):
        stored += nbytes
        if dtype in _FLOAT_TYPES:
            elements += int(np.prod(shape, dtype=np.int64)) if shape else 1
            nonzero += nnz
    return {"float_elements": elements, "float_nonzero": nonzero, "constant_bytes": stored}


def ort_optimized(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model as onnxruntime materialises it: saved after ``ORT_ENABLE_BASIC`` optimisations
    (constant folding, so decode subgraphs become the dense tensors they produce; standard ops
    only). Never used in a memory measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = out
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(2**30))
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return onnx.load(out)


# Buffer names of exporters.sparse_onnx decode subgraphs, and the format each one marks.
_BUFFER_FORMATS = {"mask": "bitmask", "row_ptr": "csr", "gaps": "rel", "packed_gaps": "relb", "indices": "coo"}


def tensor_storage(proto: onnx.ModelProto, name: str, encodings: dict[str, str] | None = None) -> tuple[str | None, int | None]:
    """How the float tensor ``name`` is stored in ``proto`` and its stored bytes.

    A plain initializer is ``dense``; a decode subgraph's buffers ``decode/<name>/*`` take the
    format the exporter recorded (``encodings``); a ``Constant`` sparse tensor is ``coo``; a
    ``ConstantOfShape`` output is an all-zero tensor (0 bytes); ELL buffers ``sparse/<name>/*``
    are the runtime-sparse layout. ``(None, None)`` when the tensor is not in the file.
    """
    graph = proto.graph
    for t in graph.initializer:
        if t.name == name:
            return "dense", _tensor_bytes(t)
    prefix = f"decode/{name}/"
    buffers = [t for t in graph.initializer if t.name.startswith(prefix)]
    if buffers:
        fmt = (encodings or {}).get(name)
        if fmt is None:  # a file from elsewhere: tell the format by its buffers' names
            tags = {t.name[len(prefix):] for t in buffers}
            fmt = next((f for tag, f in _BUFFER_FORMATS.items() if tag in tags), "decoded")
        return fmt, sum(_tensor_bytes(t) for t in buffers)
    for node in graph.node:
        if name in node.output:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.SPARSE_TENSOR:
                        return "coo", _tensor_bytes(a.sparse_tensor.values) + _tensor_bytes(a.sparse_tensor.indices)
                    if a.type == onnx.AttributeProto.TENSOR:
                        return "dense", _tensor_bytes(a.t)
            if node.op_type == "ConstantOfShape":
                return "zeros", 0
    for sp in graph.sparse_initializer:
        if sp.values.name == name:
            return "coo", _tensor_bytes(sp.values) + _tensor_bytes(sp.indices)
    ell = [t for t in graph.initializer if t.name.startswith(f"sparse/{name}/")]
    if ell:
        return "ell (runtime sparse)", sum(_tensor_bytes(t) for t in ell)
    return None, None


# -- MACs of an ONNX graph --------------------------------------------------------------------


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of an ONNX COO sparse tensor (linear [nnz] or coordinate [nnz, rank] indices)."""
    values = numpy_helper.to_array(sp.values)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(tuple(sp.dims), dtype=values.dtype)
    if indices.ndim == 2:
        dense[tuple(indices.T)] = values
    else:
        dense.reshape(-1)[indices] = values
    return dense


def onnx_macs(proto: onnx.ModelProto, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Multiply-accumulates per sample of the ``Gemm``, ``MatMul`` and ``Conv`` nodes of the main
    graph, from ONNX shape inference at batch 1.

    Returns ``macs`` (dense count), ``macs_nonzero_weights`` (only multiplications by a non-zero
    constant weight; a node whose weight is not a constant counts densely) and ``layers``: one
    row per node with a constant weight (weight name, op, shape, elements, non-zeros, bias
    elements). Use it on :func:`ort_optimized` so decode subgraphs are already folded.
    """
    model = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for sp in graph.sparse_initializer:
        consts[sp.values.name] = sparse_to_dense(sp)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    consts[node.output[0]] = sparse_to_dense(a.sparse_tensor)
    feeds = [i for i in graph.input if i.name not in consts]
    if feeds:
        dims = feeds[0].type.tensor_type.shape.dim
        batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0
        if not batch:
            dims[0].Clear()
            dims[0].dim_value = 1
            batch = 1
        for d, size in zip(list(dims)[1:], input_shape):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = int(size)
    else:
        batch = 1
    del graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims] if vi.type.tensor_type.HasField("shape") else None
    for name, arr in consts.items():
        shapes[name] = list(arr.shape)

    def shape(name: str) -> list[int] | None:
        s = shapes.get(name)
        return None if s is None or any(d is None for d in s) else s

    control = [n.op_type for n in graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
    if control:
        raise ValueError(f"the graph has control flow ({', '.join(sorted(set(control)))}); MACs inside subgraphs are not counted")
    macs = nz_macs = 0
    layers: list[dict[str, Any]] = []
    for node in graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv"):
            continue
        out, a, b = shape(node.output[0]), shape(node.input[0]), shape(node.input[1])
        if out is None or a is None or b is None:
            raise ValueError(f"cannot infer the shapes around {node.op_type} node {node.name or node.output[0]}")
        out_elems = int(np.prod(out, dtype=np.int64))
        w = consts.get(node.input[1])
        if node.op_type == "Conv":
            k = int(np.prod(b[1:], dtype=np.int64))
            dense = out_elems * k
            per_weight = out_elems // b[0]  # uses of each weight: batch x output positions
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if trans_a else a[1]
            dense = out_elems * k
            per_weight = out[0]  # each weight multiplies once per row of A
        else:  # MatMul
            k = a[-1]
            dense = out_elems * k
            per_weight = out_elems // (b[-1] if len(b) > 1 else 1)
            if w is not None and w.ndim != 2:
                w = None  # batched or 1-D constant operand: counted densely
        macs += dense
        nz_macs += int(np.count_nonzero(w)) * per_weight if w is not None else dense
        if w is not None:
            bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            layers.append({
                "name": node.input[1],
                "type": node.op_type,
                "weight_shape": [int(d) for d in w.shape],
                "params": int(w.size + (bias.size if bias is not None else 0)),
                "nonzero": int(np.count_nonzero(w) + (np.count_nonzero(bias) if bias is not None else 0)),
                "bias": node.input[2] if bias is not None else None,
            })
    return {"macs": macs // batch, "macs_nonzero_weights": nz_macs // batch, "layers": layers}


# -- latency helpers used by the benchmarks ---------------------------------------------------


def single_thread_session(model_bytes: bytes) -> ort.InferenceSession:
    """A sequential, one-thread CPU session: the setting latency comparisons use."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def interleaved_latency(
    sessions: list[ort.InferenceSession], x: np.ndarray, *, warmup: int = 5, runs: int = 50, rounds: int = 5
) -> list[float]:
    """Median seconds per run of each session, over ``runs`` timed runs each.

    Each session is timed in blocks of consecutive runs, after one untimed run, so that its data
    is in the caches as when it serves alone; the blocks alternate between the sessions over
    ``rounds`` rounds in a rotating order, so that machine noise hits every session alike and no
    session always follows the same other one. (Alternating single runs instead would charge
    whichever session follows the largest one for reloading the caches it evicted.)
    """
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    rounds = max(1, min(rounds, runs))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        block = runs // rounds + (1 if r < runs % rounds else 0)
        for k in range(len(sessions)):
            i = (k + r) % len(sessions)
            s, f = sessions[i], feeds[i]
            s.run(None, f)
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, f)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
