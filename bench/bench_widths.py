"""Benchmark: what LeNet-5's layer widths cost in onnxruntime, against what their MACs promise.

For each width triple (conv1-conv2-fc1), the zoo LeNet-5 with all other channels zeroed is
physically removed (`shrink`, as the export does), exported to ONNX and timed on one thread at
batch 1 and 64, interleaved with the dense model so that machine noise hits all alike. Shows
where blocked convolution kernels (NCHWc: 8 channels per block on AVX2) make a width that is
one channel above a multiple of 8 cost a whole block, which is what `--width-multiple` avoids.

    python bench/bench_widths.py [--out bench/results/widths.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from compressor import atomic  # noqa: E402
from compressor.shrink import shrink  # noqa: E402
from exporters import onnx_export  # noqa: E402
from exporters.footprint import count_macs, interleaved_latency, single_thread_session  # noqa: E402

SHAPE = (1, 28, 28)
WIDTHS = [
    (9, 18, 31),    # SeReNe per-MAC result (docs/results.md)
    (8, 18, 31),    # one conv1 channel less: conv1 fits one AVX2 block, conv2's input too
    (9, 16, 31),
    (8, 16, 31),
    (8, 16, 32),
    (16, 24, 32),   # 9-18-31 rounded up to multiples of 8 at export (--round-channels 8)
    (3, 18, 283),   # StructuredBP's published LeNet-5
    (4, 16, 32),
    (8, 8, 16),
]


def lenet5_with_widths(widths: tuple[int, int, int]) -> torch.nn.Module:
    """The zoo LeNet-5 (random weights) with only the first ``widths`` channels/neurons alive, shrunk."""
    torch.manual_seed(0)
    model = models.build("lenet5", SHAPE, 10).eval()
    with torch.no_grad():
        for layer, keep in zip((model.conv1, model.conv2, model.fc1), widths):
            layer.weight[keep:] = 0
            layer.bias[keep:] = 0
    return shrink(model, torch.randn(2, *SHAPE)).model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "widths.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(2, *SHAPE)
    dense = models.build("lenet5", SHAPE, 10).eval()
    nets = [dense] + [lenet5_with_widths(w) for w in WIDTHS]
    sessions = [single_thread_session(onnx_export.to_onnx(n, x).SerializeToString()) for n in nets]
    macs = [count_macs(n, SHAPE) for n in nets]
    rows = [{"widths": list(w), "macs": m, "macs_ratio": macs[0] / m} for w, m in zip(WIDTHS, macs[1:])]
    for batch, runs in ((1, 300), (64, 60)):
        xb = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
        times = interleaved_latency(sessions, xb, warmup=10, runs=runs)
        for row, t in zip(rows, times[1:]):
            row[f"batch{batch}"] = {"dense_ms": 1000 * times[0], "ms": 1000 * t, "speedup": times[0] / t}
    record = {
        "command": "python bench/bench_widths.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "onnxruntime": ort.__version__, "threads": 1},
        "dense_macs": macs[0],
        "rows": rows,
    }
    atomic.write_text(args.out, json.dumps(record, indent=1))
    print(f"{'widths':>12} {'MACs /':>7} {'b1 x':>6} {'b64 x':>6}")
    for row in rows:
        print(f"{'-'.join(map(str, row['widths'])):>12} {row['macs_ratio']:7.1f} "
              f"{row['batch1']['speedup']:6.2f} {row['batch64']['speedup']:6.2f}")


if __name__ == "__main__":
    main()
