"""Byte sizes of every sparse format on random-mask fp32 tensors, against the entropy bound.

    python bench/bench_formats.py [--out bench/results/formats.json] [--seed 0]

Prints a table and writes JSON: one row per (shape, sparsity) with bytes per format, the best
format, size_bound, best/bound, COO-int64 bytes and the best format's encode/decode time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from formats import FORMATS, all_nbytes, best, coo_int64_nbytes, decode, size_bound  # noqa: E402

SHAPES = [(784, 300), (4096, 4096)]
SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]


def run(seed: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(seed)
        values = rng.standard_normal(shape).astype(np.float32)
        u = rng.random(shape)
        for s in SPARSITIES:
            a = np.where(u < s, np.float32(0), values)
            sizes = all_nbytes(a)
            t0 = time.perf_counter()
            enc = best(a)
            t1 = time.perf_counter()
            out = decode(enc)
            t2 = time.perf_counter()
            assert np.array_equal(out, a)
            bound = size_bound(a)
            rows.append(
                {
                    "shape": list(shape),
                    "sparsity": s,
                    "nnz": int(np.count_nonzero(a)),
                    "bytes": sizes,
                    "best": enc.format,
                    "best_bytes": enc.nbytes,
                    "bound_bytes": round(bound, 1),
                    "best_over_bound": round(enc.nbytes / bound, 4),
                    "coo_int64_bytes": coo_int64_nbytes(a),
                    "best_encode_s": round(t1 - t0, 4),
                    "decode_s": round(t2 - t1, 4),
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    head = ["shape", "s", *FORMATS, "coo_i64", "bound", "best", "best/bound", "enc s", "dec s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            "x".join(map(str, r["shape"])),
            f"{r['sparsity']:g}",
            *(f"{r['bytes'][f]:,}" for f in FORMATS),
            f"{r['coo_int64_bytes']:,}",
            f"{r['bound_bytes']:,.0f}",
            r["best"],
            f"{r['best_over_bound']:.3f}",
            f"{r['best_encode_s']:.3f}",
            f"{r['decode_s']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "formats.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = run(args.seed)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seed": args.seed, "dtype": "float32", "mask": "i.i.d. uniform", "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
