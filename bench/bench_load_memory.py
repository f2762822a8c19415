"""Memory at session creation per sparse encoding: what decoding at load costs in onnxruntime.

Takes a compact ONNX file written by ``compress`` (default: the LeNet-5 lobster model of
``ARCH=lenet5 EPOCHS=20 bench/compare_mnist.sh``), rebuilds its dense-with-zeros graph from
onnxruntime's folded initializers, re-encodes it with every format, and measures each file in
a fresh process (``exporters.measure``): file bytes, RSS delta and peak (VmHWM) delta of
session creation, and RSS after ``malloc_trim``.

    python bench/bench_load_memory.py [--model PATH.onnx] [--out bench/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from exporters import sparse_onnx  # noqa: E402
from exporters.footprint import ort_optimized  # noqa: E402
from exporters.measure import measure_runtime  # noqa: E402

ENCODINGS = ("dense", "rel", "relb", "bitmask", "csr", "auto")
MIB = 2**20


def dense_with_zeros(compact: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every decode subgraph replaced by the tensor onnxruntime folds it to."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        onnx.save(compact, path)
        folded = {t.name: t for t in ort_optimized(path).graph.initializer}
    prefix = sparse_onnx.DECODE_PREFIX
    out = onnx.ModelProto()
    out.CopyFrom(compact)
    nodes = [n for n in out.graph.node
             if not any(x.startswith(prefix) for x in list(n.input) + list(n.output))]
    needed = {i for n in nodes for i in n.input}
    inits = [t for t in out.graph.initializer if not t.name.startswith(prefix) and t.name in needed]
    have = {t.name for t in inits}
    inits += [folded[name] for name in sorted(needed - have) if name in folded]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    onnx.checker.check_model(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "bench" / "results" / "compare" / "lenet5-lobster.onnx")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_memory.json")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model} not found: run `ARCH=lenet5 EPOCHS=20 bench/compare_mnist.sh` first, or pass --model")
    base = dense_with_zeros(onnx.load(str(args.model)))
    shape = [d.dim_value or 1 for d in base.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in ENCODINGS:
            proto = base if encoding == "dense" else sparse_onnx.compact(base, encoding)[0]
            path = os.path.join(tmp, f"{encoding}.onnx")
            onnx.save(proto, path)
            memory = measure_runtime(path, x, batches=[1])["memory"]
            row = {"encoding": encoding, "file_bytes": os.path.getsize(path),
                   **{k: memory.get(k) for k in ("session_rss_delta_bytes", "session_peak_delta_bytes",
                                                 "trimmed_rss_delta_bytes")}}
            rows.append(row)
            print(f"{encoding:8s} {row['file_bytes']:>10,} B  session RSS {row['session_rss_delta_bytes'] / MIB:5.1f} MiB  "
                  f"peak {row['session_peak_delta_bytes'] / MIB:5.1f} MiB  trimmed {row['trimmed_rss_delta_bytes'] / MIB:5.1f} MiB",
                  flush=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
                                   "rows": rows}, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
