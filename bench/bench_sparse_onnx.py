"""Compact ONNX for unstructured sparsity: file sizes per encoding, and runtime-sparse Linear speed/memory.

    python bench/bench_sparse_onnx.py [--out bench/results/sparse_onnx.json] [--seed 0] [--threads 1] [--runtime-only]

1. File size of a single exported Linear layer (784->300 and 4096->4096, no bias) with an i.i.d.
   random mask at each sparsity, per encoding of ``exporters.sparse_onnx.compact``, against the
   information-theoretic bound ``formats.size_bound`` and ONNX COO with int64 indices. The graph
   overhead (file bytes - encoded tensor bytes) is reported separately, and also less the dense
   export's own overhead (what the decode subgraph or sparse Constant adds). Decode formats are checked
   to fold in onnxruntime and to reproduce the dense output exactly (every 784x300 row; 4096x4096 at
   95 and 99 %).
2. ``runtime_sparse_linear`` vs dense on a 4096->4096 Linear (with bias): onnxruntime latency
   (``--threads``, default one, median) at batch 1 and 32, and resident memory after session creation (VmRSS delta
   and VmHWM from /proc/self/status), every configuration in a fresh subprocess. Dense and sparse
   processes alternate for ``ROUNDS`` rounds and the latency is the median of the rounds' medians,
   so that a slow spell of the machine does not land on one side only. (Running the two sessions
   interleaved in one process would be unfair the other way: each dense run evicts the sparse
   model's data from the caches.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from bench._machine import cpu_description  # noqa: E402

SIZE_SHAPES = [(784, 300), (4096, 4096)]  # (in_features, out_features)
SIZE_SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]
SIZE_ENCODINGS = ("dense", "bitmask", "csr", "rel", "relb", "coo", "auto")
DECODE_ENCODINGS = ("bitmask", "csr", "rel", "relb", "auto")
BIG_CHECKED = (0.95, 0.99)  # 4096x4096 rows whose folding and parity are checked (session time)
RUNTIME_SIZE = 4096
RUNTIME_SPARSITIES = [0.9, 0.95, 0.99]
BATCHES = (1, 32)
ROUNDS = 3
TIME_BUDGET_S = 1.5  # per (configuration, batch) timing loop
MIN_RUNS = 10


# ---------------------------------------------------------------------------------------------
# Child process: one configuration, nothing else loaded (no torch), fresh VmHWM.


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def child(path: str, batches: list[int], in_features: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    before = _status_kib()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    create_s = time.perf_counter() - t0
    after = _status_kib()
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    latency = {}
    for b in batches:
        x = rng.standard_normal((b, in_features)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {name: x})
        times: list[float] = []
        end = time.perf_counter() + TIME_BUDGET_S
        while len(times) < MIN_RUNS or time.perf_counter() < end:
            t = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t)
        latency[str(b)] = {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times), "runs": len(times)}
    ran = _status_kib()
    mib = 1 / 1024
    return {
        "create_s": create_s,
        "rss_delta_create_mib": (after["VmRSS"] - before["VmRSS"]) * mib,
        "hwm_delta_create_mib": (after["VmHWM"] - before["VmRSS"]) * mib,
        "rss_delta_after_runs_mib": (ran["VmRSS"] - before["VmRSS"]) * mib,
        "latency": latency,
    }


def _run_child(path: Path, batches: tuple[int, ...], in_features: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--batches", ",".join(map(str, batches)),
           "--in-features", str(in_features), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed for {path.name}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parent


def _linear_proto(n_in: int, n_out: int, bias: bool):
    import torch

    from exporters import onnx_export

    torch.manual_seed(0)
    proto = onnx_export.to_onnx(torch.nn.Linear(n_in, n_out, bias=bias), torch.randn(2, n_in))
    weight = next(t.name for t in proto.graph.initializer if list(t.dims) == [n_out, n_in])
    return proto, weight


def _with_weight(proto, name: str, w):
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, name))
    return out


def _ort_out(proto, x):
    from exporters import onnx_export

    sess = onnx_export.session(proto, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def sizes(seed: int) -> list[dict]:
    import numpy as np

    import formats
    from exporters import sparse_onnx

    rows = []
    for n_in, n_out in SIZE_SHAPES:
        base, wname = _linear_proto(n_in, n_out, bias=False)
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((n_out, n_in)).astype(np.float32)
        u = rng.random((n_out, n_in))
        x = rng.standard_normal((4, n_in)).astype(np.float32)
        for s in SIZE_SPARSITIES:
            w = np.where(u < s, np.float32(0), values)
            proto = _with_weight(base, wname, w)
            bound = formats.size_bound(w)
            coo64 = formats.coo_int64_nbytes(w)
            check = n_in * n_out < 10**6 or s in BIG_CHECKED
            ref = _ort_out(proto, x) if check else None
            for enc in SIZE_ENCODINGS:
                t0 = time.perf_counter()
                compacted, report = sparse_onnx.compact(proto, enc)
                compact_s = time.perf_counter() - t0
                r = next(r for r in report if r.name == wname)
                file_bytes = sparse_onnx.model_bytes(compacted)
                row = {
                    "shape": [n_in, n_out],
                    "sparsity": s,
                    "nnz": r.nonzero,
                    "encoding": enc,
                    "format": r.format,
                    "file_bytes": file_bytes,
                    "tensor_bytes": r.encoded_bytes,
                    "graph_overhead_bytes": file_bytes - r.encoded_bytes,
                    "bound_bytes": round(bound, 1),
                    "coo_int64_bytes": coo64,
                    "dense_bytes": r.dense_bytes,
                    "file_over_bound": round(file_bytes / bound, 4),
                    "tensor_over_bound": round(r.encoded_bytes / bound, 4),
                    "file_over_coo_int64": round(file_bytes / coo64, 4),
                    "compact_s": round(compact_s, 3),
                }
                if check and enc != "dense":
                    got = _ort_out(compacted, x)
                    row["exact"] = bool(np.array_equal(got, ref))
                    if enc in DECODE_ENCODINGS:
                        row["ops_left_after_ort"] = sparse_onnx.decode_ops_remaining(compacted)
                rows.append(row)
            dense_overhead = next(r["graph_overhead_bytes"] for r in rows[-len(SIZE_ENCODINGS):] if r["encoding"] == "dense")
            for r in rows[-len(SIZE_ENCODINGS):]:
                # What the encoding adds beyond the exported model's own graph (names, value_info, opset).
                r["decode_graph_bytes"] = r["graph_overhead_bytes"] - dense_overhead
            print(f"  sizes {n_in}x{n_out} s={s:g} done", file=sys.stderr, flush=True)
    return rows


def runtime(seed: int, threads: int) -> list[dict]:
    import numpy as np
    import onnx
    from onnx import helper, TensorProto

    from exporters import onnx_export, sparse_onnx

    n = RUNTIME_SIZE
    base, wname = _linear_proto(n, n, bias=True)
    rng = np.random.default_rng(seed + 1)
    values = rng.standard_normal((n, n)).astype(np.float32)
    u = rng.random((n, n))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        # A trivial session, to separate onnxruntime's own footprint from the weights'.
        x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
        trivial = helper.make_model(
            helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g", [x_info], [y_info]),
            opset_imports=[helper.make_opsetid("", 18)],
        )
        trivial.ir_version = 9
        onnx.save(trivial, tmpdir / "trivial.onnx")
        baseline = _run_child(tmpdir / "trivial.onnx", BATCHES, n, threads)
        rows.append({"sparsity": None, "kind": "trivial (Identity)", "weight_bytes": 0, **baseline})
        for s in RUNTIME_SPARSITIES:
            w = np.where(u < s, np.float32(0), values)
            dense = _with_weight(base, wname, w)
            sparse = sparse_onnx.runtime_sparse_linear(dense, min_sparsity=0.0)
            parity = {}
            for b in BATCHES:
                x = rng.standard_normal((b, n)).astype(np.float32)
                parity[str(b)] = float(np.max(np.abs(_ort_out(sparse, x) - _ort_out(dense, x))))
            kinds = (("dense", dense), ("runtime-sparse", sparse))
            paths = {}
            for kind, proto in kinds:
                paths[kind] = tmpdir / f"{kind}_{s}.onnx"
                onnx_export.save(proto, paths[kind])
            rounds: dict[str, list[dict]] = {kind: [] for kind, _ in kinds}
            for _ in range(ROUNDS):
                for kind, _ in kinds:
                    rounds[kind].append(_run_child(paths[kind], BATCHES, n, threads))
            for kind, proto in kinds:
                path = paths[kind]
                weight_bytes = sum(
                    onnx.numpy_helper.to_array(t).nbytes
                    for t in proto.graph.initializer
                    if t.name == wname or t.name.startswith(sparse_onnx.SPARSE_PREFIX)
                )
                res = dict(rounds[kind][0])  # memory: deterministic, first round
                res["latency"] = {
                    str(b): {
                        "median_ms": float(np.median([r["latency"][str(b)]["median_ms"] for r in rounds[kind]])),
                        "min_ms": min(r["latency"][str(b)]["min_ms"] for r in rounds[kind]),
                        "runs": sum(r["latency"][str(b)]["runs"] for r in rounds[kind]),
                        "round_medians_ms": [r["latency"][str(b)]["median_ms"] for r in rounds[kind]],
                    }
                    for b in BATCHES
                }
                rows.append({
                    "sparsity": s, "kind": kind, "file_bytes": path.stat().st_size, "weight_bytes": int(weight_bytes),
                    "max_abs_diff_vs_dense": parity if kind != "dense" else None, **res,
                })
                print(f"  runtime s={s:g} {kind} done", file=sys.stderr, flush=True)
    for r in rows:
        r["rss_net_of_trivial_mib"] = r["rss_delta_create_mib"] - baseline["rss_delta_create_mib"]
    return rows


def print_sizes(rows: list[dict]) -> None:
    head = ["layer", "s", "encoding", "format", "file B", "tensor B", "overhead B", "decode graph B", "bound B", "COO-i64 B",
            "file/bound", "tensor/bound", "file/COO-i64", "exact", "folded"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        left = r.get("ops_left_after_ort")
        folded = "" if left is None else ("yes" if not left else ",".join(left))
        exact = "" if "exact" not in r else ("yes" if r["exact"] else "NO")
        cells = [
            "x".join(map(str, r["shape"])), f"{r['sparsity']:g}", r["encoding"], r["format"], f"{r['file_bytes']:,}",
            f"{r['tensor_bytes']:,}", f"{r['graph_overhead_bytes']:,}", f"{r['decode_graph_bytes']:,}",
            f"{r['bound_bytes']:,.0f}",
            f"{r['coo_int64_bytes']:,}", f"{r['file_over_bound']:.3f}", f"{r['tensor_over_bound']:.3f}",
            f"{r['file_over_coo_int64']:.3f}", exact, folded,
        ]
        print("| " + " | ".join(cells) + " |")


def print_runtime(rows: list[dict]) -> None:
    head = ["s", "model", "weight MiB", "file MiB", "create s", "RSS Δ MiB", "HWM Δ MiB", "RSS Δ net MiB",
            "b1 ms", "b32 ms", "b1 speedup", "b32 speedup", "weight ratio", "RSS-net ratio", "max|Δ| b1/b32"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    dense = {r["sparsity"]: r for r in rows if r["kind"] == "dense"}
    for r in rows:
        d = dense.get(r["sparsity"])
        lat = r["latency"]
        sparse_row = r["kind"] == "runtime-sparse" and d is not None
        cells = [
            "-" if r["sparsity"] is None else f"{r['sparsity']:g}", r["kind"], f"{r['weight_bytes'] / 2**20:.2f}",
            f"{r.get('file_bytes', 0) / 2**20:.2f}", f"{r['create_s']:.3f}", f"{r['rss_delta_create_mib']:.1f}",
            f"{r['hwm_delta_create_mib']:.1f}", f"{r['rss_net_of_trivial_mib']:.1f}",
            f"{lat['1']['median_ms']:.3f}", f"{lat['32']['median_ms']:.3f}",
            f"{d['latency']['1']['median_ms'] / lat['1']['median_ms']:.2f}x" if sparse_row else "",
            f"{d['latency']['32']['median_ms'] / lat['32']['median_ms']:.2f}x" if sparse_row else "",
            f"{d['weight_bytes'] / r['weight_bytes']:.1f}x" if sparse_row else "",
            f"{d['rss_net_of_trivial_mib'] / r['rss_net_of_trivial_mib']:.1f}x" if sparse_row else "",
            (f"{r['max_abs_diff_vs_dense']['1']:.1e}/{r['max_abs_diff_vs_dense']['32']:.1e}" if sparse_row else ""),
        ]
        print("| " + " | ".join(cells) + " |")


def print_summary(size_rows: list[dict], runtime_rows: list[dict]) -> None:
    print("\n## Targets\n")
    for r in size_rows:
        if r["encoding"] == "auto" and r["sparsity"] >= 0.95:
            ok = "meets" if r["file_over_bound"] <= 1.10 else "MISSES"
            print(f"- {'x'.join(map(str, r['shape']))} s={r['sparsity']:g}: auto ({r['format']}) file/bound "
                  f"{r['file_over_bound']:.3f}, tensor/bound {r['tensor_over_bound']:.3f} -> {ok} <= 1.10x")
    dense = next((r for r in runtime_rows if r["kind"] == "dense" and r["sparsity"] == 0.99), None)
    sparse = next((r for r in runtime_rows if r["kind"] == "runtime-sparse" and r["sparsity"] == 0.99), None)
    if dense and sparse:
        for b in BATCHES:
            sp = dense["latency"][str(b)]["median_ms"] / sparse["latency"][str(b)]["median_ms"]
            print(f"- 99 % batch {b}: {sp:.1f}x faster than dense -> {'meets' if sp >= 5 else 'MISSES'} >= 5x")
        wr = dense["weight_bytes"] / sparse["weight_bytes"]
        rr = dense["rss_net_of_trivial_mib"] / sparse["rss_net_of_trivial_mib"]
        print(f"- 99 % weight bytes {wr:.1f}x smaller -> {'meets' if wr >= 20 else 'MISSES'} >= 20x; "
              f"RSS delta net of an empty session {rr:.1f}x smaller -> {'meets' if rr >= 20 else 'MISSES'} >= 20x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sparse_onnx.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the runtime timings")
    ap.add_argument("--runtime-only", action="store_true", help="skip the file-size part")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batches", default="1,32", help=argparse.SUPPRESS)
    ap.add_argument("--in-features", type=int, default=RUNTIME_SIZE, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, [int(b) for b in args.batches.split(",")], args.in_features, args.threads)))
        return

    from exporters.report import versions

    t0 = time.perf_counter()
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    size_rows = [] if args.runtime_only else sizes(args.seed)
    runtime_rows = runtime(args.seed, args.threads)
    total_s = time.perf_counter() - t0
    if size_rows:
        print("\n## File size per encoding (single Linear layer, no bias, i.i.d. random mask, fp32)\n")
        print_sizes(size_rows)
    print(f"\n## Runtime-sparse vs dense, 4096x4096 Linear with bias, onnxruntime {args.threads} thread(s), fresh process each\n")
    print_runtime(runtime_rows)
    print_summary(size_rows, runtime_rows)
    meta = {
        "seed": args.seed, "dtype": "float32", "mask": "i.i.d. uniform", "versions": versions(),
        "machine": platform.machine(), **cpu_description(), "cpus": os.cpu_count(), "ort_threads": args.threads, "time_budget_per_timing_s": TIME_BUDGET_S, "latency_rounds": ROUNDS,
        "note": "shared, noisy 2-core VM: only ratios of about 2x or more are meaningful",
        "bench_wall_s": round(total_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "sizes": size_rows, "runtime": runtime_rows}, indent=1) + "\n")
    print(f"\nwrote {args.out} in {total_s:.0f} s")


if __name__ == "__main__":
    main()
