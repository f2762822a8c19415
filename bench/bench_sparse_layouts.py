"""Other standard-op layouts for the runtime-sparse Linear, against the one the exporter uses.

    python bench/bench_sparse_layouts.py [--variants dense,cur,padmin300,kmajor,chunk2] [--out bench/results/sparse_layouts.json]

A 4096x4096 Linear with bias at 99 % i.i.d. sparsity, batch 32, onnxruntime on one thread; every
variant is checked against numpy, then timed in a fresh process (median of >= 2 s of runs), three
rounds interleaved, and the median of the rounds is reported. Variants:

* ``dense``: one Gemm.
* ``cur``: the exporter's sliced ELL, its many-rows branch rebuilt alone (rows sorted by length,
  slices of 256; per slice one Gather of rows of x^T and one batched [1, width] @ [width, batch]
  MatMul).
* ``padminN``: ``cur`` with the sorted rows cut where the padding is least (at most 256 rows per
  slice; each extra slice must save N padded entries) instead of every 256 rows.
* ``gnd``: ``cur`` with GatherND in place of Gather.
* ``mid``: ``cur``'s gather, then Mul by the values and ReduceSum over the middle (width) axis.
* ``einsum``: ``cur``'s gather, then one Einsum ``nk,nkb->nb``.
* ``kmajor``: the same slices gathered K-major ([width, rows, batch]), then Mul by the values and
  ReduceSum over the leading axis (no per-row products).
* ``chunkC``: C rows share one gathered block of C*width columns and one [C, C*width] block-diagonal
  product (C times fewer, C times larger products).
"""
import argparse, json, platform, shutil, subprocess, sys, time, tempfile
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from exporters.sparse_onnx import _SLICE_ROWS, _SlicedEll, _sliced_ell  # noqa: E402

N = 4096
B = 32
S = 0.99


def _padmin_layout(w: np.ndarray, slice_cost: int) -> _SlicedEll:
    """The exporter's layout with the sorted rows cut where padding is least, not every 256 rows.

    Slices [j, i) of the rows sorted by decreasing length are padded to row j's length; the
    cutting that minimises padded entries + ``slice_cost`` per slice (at most 256 rows each) is
    a shortest path over row positions. Each cut block is then laid out by the exporter itself.
    """
    counts = np.count_nonzero(w, axis=1)
    order = np.argsort(-counts, kind="stable")
    widths = np.maximum(counts[order], 1)
    best, start = np.zeros(N + 1), np.zeros(N + 1, np.int64)
    for i in range(1, N + 1):
        j = np.arange(max(0, i - _SLICE_ROWS), i)
        cost = best[j] + (i - j) * widths[j] + slice_cost
        k = int(np.argmin(cost))
        best[i], start[i] = cost[k], j[k]
    bounds, i = [], N
    while i > 0:
        bounds.append((int(start[i]), i))
        i = int(start[i])
    # Each block is already sorted, so the exporter keeps its order and makes it one slice.
    slices = [_sliced_ell(w[order[a:b]]).slices[0] for a, b in reversed(bounds)]
    return _SlicedEll(slices, np.argsort(order).astype(np.int64))


def build(variant: str, w: np.ndarray, bias: np.ndarray):
    import onnx
    from onnx import helper, numpy_helper, TensorProto as T
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(t, ins, out, **kw):
        nodes.append(helper.make_node(t, ins, [out], **kw))
        return out

    if variant == "dense":
        init("w", w.T.copy())
        init("b", bias)
        op("Gemm", ["x", "w", "b"], "y")
    else:
        # the exporter's layout (sorted rows, padded per slice), or padmin's cutting of the same rows
        layout = _padmin_layout(w, int(variant[6:])) if variant.startswith("padmin") else _sliced_ell(w)
        inverse = layout.inverse if layout.inverse is not None else np.arange(N, dtype=np.int64)
        init("inv", inverse)
        xt = op("Transpose", ["x"], "xt", perm=[1, 0])
        parts = []
        for i, (idx, vals3) in enumerate(layout.slices):
            n_rows, _, width = vals3.shape
            vals = vals3.reshape(n_rows, width)
            if variant == "cur" or variant.startswith("padmin"):
                g = op("Gather", [xt, init(f"i{i}", idx)], f"g{i}", axis=0)
                parts.append(op("MatMul", [init(f"v{i}", vals.reshape(-1, 1, width)), g], f"d{i}"))
            elif variant == "gnd":
                nd = init(f"i{i}", idx.astype(np.int64).reshape(n_rows, width, 1))
                g = op("GatherND", [xt, nd], f"g{i}")  # [n, width, B]
                parts.append(op("MatMul", [init(f"v{i}", vals.reshape(-1, 1, width)), g], f"d{i}"))
            elif variant == "mid":
                g = op("Gather", [xt, init(f"i{i}", idx)], f"g{i}", axis=0)  # [n, width, B]
                p = op("Mul", [g, init(f"v{i}", vals.reshape(n_rows, width, 1))], f"p{i}")
                parts.append(op("ReduceSum", [p, init(f"a{i}", np.array([1], np.int64))], f"d{i}", keepdims=1))
            elif variant == "einsum":
                g = op("Gather", [xt, init(f"i{i}", idx)], f"g{i}", axis=0)  # [n, width, B]
                parts.append(op("Einsum", [init(f"v{i}", vals), g], f"d{i}", equation="nk,nkb->nb"))
            elif variant == "kmajor":
                g = op("Gather", [xt, init(f"i{i}", idx.T.copy())], f"g{i}", axis=0)  # [K, n, B]
                p = op("Mul", [g, init(f"v{i}", vals.T.reshape(width, -1, 1).copy())], f"p{i}")
                parts.append(op("ReduceSum", [p, init(f"a{i}", np.array([0], np.int64))], f"d{i}", keepdims=0))
            elif variant.startswith("chunk"):
                c = int(variant[5:])
                n = n_rows // c
                # rows (c per group) share one gathered block of c*width columns (block-diagonal values)
                gi = idx.reshape(n, c * width)
                gv = np.zeros((n, c, c * width), np.float32)
                for j in range(c):
                    gv[:, j, j * width:(j + 1) * width] = vals.reshape(n, c, width)[:, j]
                g = op("Gather", [xt, init(f"i{i}", gi)], f"g{i}", axis=0)  # [n, c*w, B]
                parts.append(op("MatMul", [init(f"v{i}", gv), g], f"d{i}"))  # [n, c, B]
        cat = op("Concat", parts, "cat", axis=0)
        cat = op("Reshape", [cat, init("shp", np.array([N, -1], np.int64))], "cat2")  # [N, B]
        y = op("Gather", [cat, "inv"], "ys", axis=0)
        yt = op("Transpose", [y], "yt", perm=[1, 0])
        init("b", bias)
        op("Add", [yt, "b"], "y")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [B, N])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [B, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    stored = 0 if variant == "dense" else sum(idx.size for idx, _ in layout.slices)  # non-zeros + padding
    return m, stored


def child(path):
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((B, N)).astype(np.float32)
    for _ in range(5):  # warm-up
        s.run(None, {"x": x})
    t = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2.0 or len(t) < 20:
        a = time.perf_counter()
        s.run(None, {"x": x})
        t.append(time.perf_counter() - a)
    print(json.dumps(float(np.median(t) * 1e3)))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        sys.exit()
    import onnx, onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="dense,cur,padmin300,kmajor,chunk2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sparse_layouts.json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    rng = np.random.default_rng(1)
    vals = rng.standard_normal((N, N)).astype(np.float32)
    w = np.where(rng.random((N, N)) < S, np.float32(0), vals)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((B, N)).astype(np.float32)
    ref = x @ w.T + bias
    tmp = Path(tempfile.mkdtemp())
    diffs, stored = {}, {}
    for v in variants:
        model, stored[v] = build(v, w, bias)
        onnx.save(model, tmp / f"{v}.onnx")
        s = ort.InferenceSession(str(tmp / f"{v}.onnx"), providers=["CPUExecutionProvider"])
        diffs[v] = float(np.abs(s.run(None, {"x": x})[0] - ref).max())
        print(v, "max abs diff vs numpy", diffs[v], flush=True)
    res = {v: [] for v in variants}
    for _ in range(3):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--child", str(tmp / f"{v}.onnx")], capture_output=True, text=True, check=True)
            res[v].append(json.loads(out.stdout.strip()))
    rows = {v: {"round_medians_ms": res[v], "median_ms": float(np.median(res[v])), "max_abs_diff": diffs[v],
                "stored_entries": stored[v]} for v in variants}
    for v in variants:
        print(v, [round(t, 3) for t in res[v]], "median", round(rows[v]["median_ms"], 3))
    result = {"size": N, "batch": B, "sparsity": S, "nonzeros": int(np.count_nonzero(w)), "slice_rows": _SLICE_ROWS,
              "threads": 1, "variants": rows,
              "machine": {"python": platform.python_version(), "onnxruntime": ort.__version__}}
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(args.out)  # atomic
    shutil.rmtree(tmp)
    print("->", args.out)
