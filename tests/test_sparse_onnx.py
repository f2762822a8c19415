"""Compact ONNX for unstructured sparsity: decode subgraphs, ONNX COO, and runtime-sparse Linear."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import formats
import models
from exporters import onnx_export
from exporters import sparse_onnx as sp

SPARSITY = 0.95
DECODE_FORMATS = ("bitmask", "csr", "rel", "relb", "auto")
# Largest file / dense-file ratio accepted for each encoding at ~95 % global sparsity. Measured:
# rel 0.067-0.070, csr 0.08, bitmask 0.087, ONNX COO int64 0.15, auto 0.064 on the LeNets;
# the conv+BN model has more small dense tensors (biases, BN-folded conv1), hence more slack.
MAX_RATIO = {"bitmask": 0.13, "csr": 0.13, "rel": 0.11, "relb": 0.11, "coo": 0.20, "auto": 0.11}
# The 28 KB conv+BN model is dominated by graph overhead and small dense tensors (measured 0.26-0.31).
MAX_RATIO_SMALL = {"bitmask": 0.35, "csr": 0.35, "rel": 0.35, "relb": 0.35, "coo": 0.35, "auto": 0.30}


def _prune(model: nn.Module, sparsity: float, *, per_layer: bool = False) -> nn.Module:
    """Zero the smallest ``sparsity`` fraction of the weight matrices/kernels by magnitude (global by default)."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1]
    groups = [[w] for w in weights] if per_layer else [weights]
    with torch.no_grad():
        for group in groups:
            scores = torch.cat([w.detach().abs().flatten() for w in group])
            threshold = scores.kthvalue(int(sparsity * scores.numel())).values
            for w in group:
                w.mul_(w.abs() > threshold)
    return model


class _ConvBN(nn.Module):
    """A small conv + BatchNorm net (the exporter folds eval-mode BN into the convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _build(arch: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if arch == "convbn":
        model = _ConvBN()
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        return model.eval(), (3, 16, 16)
    return models.build(arch, (1, 28, 28), 10).eval(), (1, 28, 28)


_CACHE: dict[str, tuple[onnx.ModelProto, np.ndarray, np.ndarray]] = {}


def _exported(arch: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """(pruned dense ONNX, input batch of 7, ORT output of the dense model), exported once per run."""
    if arch not in _CACHE:
        model, shape = _build(arch)
        # Global magnitude on the freshly initialised conv+BN net would zero a whole conv (its
        # init scale is smaller), so that one is pruned layer by layer.
        _prune(model, SPARSITY, per_layer=arch == "convbn")
        proto = onnx_export.to_onnx(model, torch.randn(2, *shape))
        x = np.random.default_rng(0).standard_normal((7, *shape)).astype(np.float32)
        ref = onnx_export.session(proto).run(None, {onnx_export.INPUT_NAME: x})[0]
        _CACHE[arch] = (proto, x, ref)
    return _CACHE[arch]


ARCHS = [
    pytest.param("lenet300", id="lenet300"),
    pytest.param("lenet5", id="lenet5"),
    pytest.param("convbn", id="conv-bn"),
]
ENCODINGS = [pytest.param(e, id=e) for e in ("bitmask", "csr", "rel", "relb", "coo", "auto")]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compact_zoo_model(arch: str, encoding: str, tmp_path: Path) -> None:
    proto, x, ref = _exported(arch)
    before = proto.SerializeToString()
    compacted, report = sp.compact(proto, encoding)
    assert proto.SerializeToString() == before, "compact mutated its input"

    onnx_export.check(compacted)  # full_check, shape inference included
    path = tmp_path / "m.onnx"
    onnx_export.save(compacted, path)
    got = onnx_export.session(path).run(None, {onnx_export.INPUT_NAME: x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.array_equal(got, ref)  # ORT folds back to the very same dense weights
    assert sp.decode_ops_remaining(compacted) == []

    size, dense = path.stat().st_size, sp.model_bytes(proto)
    assert size == sp.model_bytes(compacted)
    limit = (MAX_RATIO_SMALL if arch == "convbn" else MAX_RATIO)[encoding]
    assert size < limit * dense, f"{encoding}: {size} bytes is {size / dense:.3f} of dense"

    # The report: one row per float initializer, exact codec byte counts, consistent with the file.
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert [r.name for r in report] == list(inits)
    encoded = [r for r in report if r.format != "dense"]
    assert encoded, "nothing was encoded"
    for r in report:
        a = inits[r.name]
        assert r.shape == a.shape and r.dense_bytes == a.nbytes and r.nonzero == np.count_nonzero(a)
        if r.format == "dense":
            assert r.encoded_bytes == r.dense_bytes
            if encoding != "auto":
                assert a.size < 1024  # forced formats leave only tiny tensors dense
        elif r.nonzero == 0:
            assert r.encoded_bytes == 0  # all-zero: a ConstantOfShape, nothing stored
        elif encoding == "coo":
            assert r.encoded_bytes == formats.coo_int64_nbytes(a)
        else:
            assert r.encoded_bytes == formats.encode(a, r.format).nbytes
            if encoding != "auto":
                assert r.format == encoding
    if encoding == "auto":  # the smallest buffers + decode subgraph among the formats
        for r in encoded:
            cost = {f: n + sp._GRAPH_OVERHEAD.get(f, 0) for f, n in formats.all_nbytes(inits[r.name]).items()}
            assert r.encoded_bytes + sp._GRAPH_OVERHEAD[r.format] == min(cost.values())
    if encoding != "coo":
        # Graph overhead: what the file holds beyond the kept tensors and the codec buffers.
        overhead = size - (dense - sum(r.dense_bytes for r in encoded) + sum(r.encoded_bytes for r in encoded))
        assert 0 < overhead < 2000 * len(encoded)


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_is_smallest(arch: str) -> None:
    proto = _exported(arch)[0]
    sizes = {e: sp.model_bytes(sp.compact(proto, e)[0]) for e in ("bitmask", "csr", "rel", "relb", "coo", "auto")}
    assert sizes["auto"] <= min(sizes.values()) + 64, sizes
    if arch != "convbn":  # where tensors are big enough for index bytes to dominate the overhead
        # ONNX COO with int64 indices is the largest sparse option at this sparsity.
        assert sizes["coo"] == max(sizes.values()), sizes


def test_decode_subgraph_ops_are_standard_and_named() -> None:
    proto = _exported("lenet300")[0]
    for encoding in ("bitmask", "csr", "rel", "relb"):
        compacted, _ = sp.compact(proto, encoding)
        assert [(o.domain, o.version) for o in compacted.opset_import] == [("", 18)]
        decode = [n for n in compacted.graph.node if any(i.startswith("decode/") for i in n.input)]
        assert decode and all(n.domain == "" for n in decode)
        ops = {n.op_type for n in decode}
        assert not ops & {"NonZero", "Compress"}, ops  # data-dependent shapes stop ORT folding
        for n in decode:
            if n.op_type in ("Gather", "GatherElements", "ScatterElements", "ScatterND"):
                # index inputs are computed in the graph (int32/int64), never the stored uint8/16 buffers
                assert not any(i.endswith(("/mask", "/gaps", "/col_idx", "/row_ptr", "/packed_gaps")) for i in n.input[1:])
        assert "fc1.weight" not in {t.name for t in compacted.graph.initializer}
        consumers = [n for n in compacted.graph.node if "fc1.weight" in n.input]
        assert [n.op_type for n in consumers] == ["Gemm"]  # consumer unchanged, reads the decoded name


def test_decode_ops_remaining_detects_unfolded_subgraph() -> None:
    compacted, _ = sp.compact(_exported("lenet300")[0], "rel")
    # An initializer that is also a graph input can be overridden at run time, so ORT must not fold it.
    values = next(t for t in compacted.graph.initializer if t.name == "decode/fc1.weight/values")
    compacted.graph.input.append(helper.make_tensor_value_info(values.name, TensorProto.FLOAT, list(values.dims)))
    # Everything upstream of the values still folds; only the scatter that reads them is left.
    assert sp.decode_ops_remaining(compacted) == ["ScatterND"]


def test_coo_uses_constant_sparse_value_with_int64_indices() -> None:
    proto, x, ref = _exported("lenet5")
    compacted, report = sp.compact(proto, "coo")
    constants = [n for n in compacted.graph.node if n.op_type == "Constant"]
    assert {n.output[0] for n in constants} == {r.name for r in report if r.format == "coo"}
    for n in constants:
        sparse = n.attribute[0].sparse_tensor
        assert sparse.indices.data_type == TensorProto.INT64 and len(sparse.indices.dims) == 1
    assert not compacted.graph.sparse_initializer  # would fail full_check shape inference


def _round_trip_model(arrays: dict[str, np.ndarray], opset: int = 18) -> onnx.ModelProto:
    """A model whose outputs are its initializers (through Identity), to compare decodes exactly."""
    elem = {
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.float16): TensorProto.FLOAT16,
        np.dtype(np.float64): TensorProto.DOUBLE,
    }
    nodes = [helper.make_node("Identity", [name], [f"out_{name}"]) for name in arrays]
    outputs = [helper.make_tensor_value_info(f"out_{n}", elem[a.dtype], list(a.shape)) for n, a in arrays.items()]
    dummy = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(nodes, "g", [dummy], outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _edge_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)

    def sparse(shape: tuple[int, ...], s: float, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * (rng.random(shape) >= s)).astype(dtype)

    empty_rows = sparse((64, 40), 0.9)
    empty_rows[:5] = 0  # leading empty rows
    empty_rows[30:33] = 0
    empty_rows[-7:] = 0  # trailing empty rows: row starts at nnz
    long_gaps = np.zeros(5000, np.float32)
    long_gaps[[3, 700, 701, 4321]] = [1.5, -2.0, 3.0, 4.0]  # gaps > 255 need rel fillers; zero tail
    return {
        "w2d": sparse((64, 40), 0.95),
        "empty_rows": empty_rows,
        "conv": sparse((13, 7, 3, 5), 0.8),  # 1365 elements, not a multiple of 8
        "vec": sparse((3001,), 0.97),  # 1-D: csr is one row
        "long_gaps": long_gaps,
        "zeros": np.zeros((32, 48), np.float32),
        "half": sparse((40, 40), 0.9, np.float16),
        "double": sparse((20, 60), 0.9, np.float64),
        "dense": rng.standard_normal((32, 40)).astype(np.float32),
    }


@pytest.mark.parametrize("opset", [pytest.param(18, id="opset18"), pytest.param(16, id="opset16")])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_edge_cases(encoding: str, opset: int) -> None:
    arrays = _edge_arrays()
    model = _round_trip_model(arrays, opset)
    compacted, report = sp.compact(model, encoding)
    onnx_export.check(compacted)
    sess = ort.InferenceSession(compacted.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": np.zeros(1, np.float32)})
    for (name, a), got in zip(arrays.items(), outs):
        assert got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a), name
    if encoding != "coo":
        assert sp.decode_ops_remaining(compacted) == []
    rows = {r.name: r for r in report}
    assert rows["zeros"].nonzero == 0 and (encoding == "auto" or rows["zeros"].format == encoding)
    if encoding == "auto":
        assert rows["dense"].format == "dense"
        assert rows["long_gaps"].format in ("rel", "coo")


def test_compact_small_tensors_and_dense_are_untouched() -> None:
    proto = _exported("lenet300")[0]
    same, report = sp.compact(proto, "dense")
    assert same.SerializeToString() == proto.SerializeToString()
    assert all(r.format == "dense" for r in report)
    big_min, report = sp.compact(proto, "rel", min_elements=10**9)
    assert big_min.SerializeToString() == proto.SerializeToString()
    _, report = sp.compact(proto, "rel", min_elements=1)
    assert all(r.format == "rel" for r in report)  # biases too when asked


def test_compact_rejects_bad_arguments() -> None:
    proto = _exported("lenet300")[0]
    with pytest.raises(onnx_export.ExportError, match="unknown encoding"):
        sp.compact(proto, "zip")
    with pytest.raises(onnx_export.ExportError, match="min_elements"):
        sp.compact(proto, "rel", min_elements=0)
    old = _round_trip_model({"w": np.ones((40, 40), np.float32)}, opset=15)
    with pytest.raises(onnx_export.ExportError, match="opset >= 16"):
        sp.compact(old, "csr")


# ---------------------------------------------------------------------------------------------
# Runtime-sparse Linear


def _optimized_initializers(proto: onnx.ModelProto, tmp_path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every initializer (subgraphs included) in ORT's optimised version of ``proto``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    shapes: dict[str, tuple[int, ...]] = {}
    graphs = [onnx.load(tmp_path / "opt.onnx").graph]
    while graphs:
        g = graphs.pop()
        shapes.update({t.name: tuple(t.dims) for t in g.initializer})
        shapes.update({t.values.name: tuple(t.dims) for t in g.sparse_initializer})
        graphs.extend(a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return shapes


@pytest.mark.parametrize("arch", [pytest.param("lenet300", id="lenet300"), pytest.param("lenet5", id="lenet5")])
def test_runtime_sparse_linear_parity(arch: str, tmp_path: Path) -> None:
    proto, x, ref = _exported(arch)
    layers = {
        t.name: tuple(t.dims)
        for t in proto.graph.initializer
        if t.name.startswith("fc") and t.name.endswith(".weight")
    }
    sparse = sp.runtime_sparse_linear(proto, min_sparsity=0.0)
    onnx_export.check(sparse)
    assert [(o.domain, o.version) for o in sparse.opset_import] == [("", 18)]
    gemms = [n for n in sparse.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert gemms == []
    sess = onnx_export.session(sparse, threads=1)
    for batch in (1, 7):  # 1 takes the GatherElements branch, 7 the transposed-Gather branch
        got = sess.run(None, {onnx_export.INPUT_NAME: x[:batch]})[0]
        np.testing.assert_allclose(got, ref[:batch], rtol=0, atol=1e-4)
    kept = _optimized_initializers(sparse, tmp_path)
    for name, (n_out, n_in) in layers.items():
        assert name not in kept
        assert not any(math.prod(d) >= n_out * n_in and set(d) <= {n_out, n_in, 1} for d in kept.values()), kept
    # ORT must not fold anything into a second copy of the sparse weights (e.g. a reshaped one).
    # (NCHWc conv-weight reorders are ORT's own and are not counted.)
    stored = sum(math.prod(t.dims) for t in sparse.graph.initializer if t.name.startswith(sp.SPARSE_PREFIX))
    assert sum(math.prod(d) for name, d in kept.items() if name.startswith(sp.SPARSE_PREFIX)) <= stored


def test_runtime_sparse_linear_selects_by_name_and_sparsity() -> None:
    proto, x, ref = _exported("lenet300")
    only = sp.runtime_sparse_linear(proto, ["fc2.weight"], min_sparsity=0.0)
    assert [n.op_type for n in only.graph.node].count("Gemm") == 2
    assert "fc2.weight" not in {t.name for t in only.graph.initializer}
    none = sp.runtime_sparse_linear(proto, min_sparsity=1.0)
    assert none.SerializeToString() == proto.SerializeToString()
    with pytest.raises(onnx_export.ExportError, match="fc9.weight"):
        sp.runtime_sparse_linear(proto, ["fc9.weight"])


def test_runtime_sparse_matmul_rank3_input() -> None:
    """A MatMul with a [batch, tokens, in] input and a transposed [in, out] initializer."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 20)) * (rng.random((48, 20)) > 0.9)).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 48])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 20])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [x_info], [y_info], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    sparse = sp.runtime_sparse_linear(model, min_sparsity=0.8)
    onnx_export.check(sparse)
    assert "w" not in {t.name for t in sparse.graph.initializer}
    sess = ort.InferenceSession(sparse.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rng.standard_normal((batch, 5, 48)).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w, rtol=0, atol=1e-5)


def test_sliced_ell_layout_rebuilds_the_weight_with_less_padding() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((600, 90)) * (rng.random((600, 90)) > 0.9)).astype(np.float32)
    w[:40] *= rng.random((40, 90)) > 0.8  # uneven row lengths
    w[7] = 0.0  # an empty row
    layout = sp._sliced_ell(w)
    assert [vals.shape[0] for _, vals in layout.slices] == [256, 256, 88]
    widths = [vals.shape[2] for _, vals in layout.slices]
    assert widths == sorted(widths, reverse=True)
    sorted_rows = np.concatenate([
        _ell_rows_dense(idx, vals, w.shape[1]) for idx, vals in layout.slices
    ])
    np.testing.assert_array_equal(sorted_rows[layout.inverse], w)
    padded = sum(vals.size for _, vals in layout.slices)
    assert padded < w.shape[0] * np.count_nonzero(w, axis=1).max()


def _ell_rows_dense(idx: np.ndarray, vals: np.ndarray, n_in: int) -> np.ndarray:
    n, _, width = vals.shape
    dense = np.zeros((n, n_in), vals.dtype)
    np.add.at(dense, (np.repeat(np.arange(n), width), idx.reshape(-1)), vals.reshape(-1))
    return dense


@pytest.mark.parametrize("batch", [pytest.param(1, id="few-rows"), pytest.param(9, id="many-rows")])
def test_runtime_sparse_gemm_with_several_slices(batch: int) -> None:
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((700, 64)) * (rng.random((700, 64)) > 0.95)).astype(np.float32)
    w[100:130] = 0.0
    bias = rng.standard_normal(700).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 700])
    node = helper.make_node("Gemm", ["x", "w", "bias"], ["y"], transB=1)
    graph = helper.make_graph([node], "g", [x_info], [y_info],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    sparse = sp.runtime_sparse_linear(model)
    onnx_export.check(sparse)
    sess = ort.InferenceSession(sparse.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((batch, 64)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T + bias, rtol=0, atol=1e-5)
