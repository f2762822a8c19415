"""Benchmark `compressor.shrink`: does removing zeroed channels buy the speed the MACs promise?

For every zoo model: random BatchNorm statistics, then 50 % of the channels of every coupled
group zeroed (random; groups from `channel_groups`, so residual adds, depthwise convs and the
logits layer are respected), then `shrink`. Both the zeroed dense model and the shrunk one are
exported to ONNX (in memory) and timed in ONNX Runtime on one thread, at batch 1 and batch 64,
dense and shrunk sessions alternating so that load from other processes hits both alike.

The issue's target: the batch-64 latency ratio (shrunk / dense) within 20 % of the MACs ratio,
i.e. 0.8 <= latency_ratio / macs_ratio <= 1.2. Each model is shrunk exactly and with each
``round_to`` (widths kept at multiples of 8 and of 16: onnxruntime's NCHWc block is 8 channels
with AVX2 and 16 with AVX-512), and the sessions are timed in rotating blocks of consecutive
runs (``interleaved_latency``).

    python bench/bench_shrink.py [--models vgg16 resnet32] [--round-to 8 16] [--out bench/results/shrink.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from compressor.shrink import channel_groups, shrink  # noqa: E402
from bench._machine import cpu_description  # noqa: E402
from exporters.footprint import count_macs, interleaved_latency  # noqa: E402

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
ZOO = {"lenet300": MNIST, "lenet5": MNIST, "resnet32": CIFAR, "vgg16": CIFAR, "mobilenetv2": CIFAR}
# (warm-up, timed runs) per batch size; the big models get fewer batch-64 runs
RUNS = {1: (10, 200), 64: (3, 40)}
RUNS_BIG = {1: (5, 100), 64: (2, 15)}
BIG = {"vgg16", "mobilenetv2"}


def randomize_bn(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> None:
    """Random affine parameters and batch-estimated running statistics (as after training)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
            bn.momentum = 1.0
        if bns:
            model.train()
            model(torch.randn(16, *shape, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
    model.eval()


def zero_channels(model: nn.Module, example: torch.Tensor, frac: float, gen: torch.Generator) -> int:
    """Zero `frac` of every coupled group's channels; return how many channels were zeroed."""
    mods = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for group in channel_groups(model, example):
            n = len(group.channels)
            if group.pinned or n < 2 or not any(r in ("out", "dw") for _, r in group.members):
                continue
            k = min(n - 1, round(frac * n))
            for i in torch.randperm(n, generator=gen)[:k].tolist():
                for (name, role), idx in zip(group.members, group.channels[i]):
                    if role in ("out", "dw", "bn"):
                        mod = mods[name]
                        mod.weight[idx] = 0
                        if mod.bias is not None:
                            mod.bias[idx] = 0
            zeroed += k
    return zeroed


def onnx_model_bytes(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The model as exported for deployment: dynamo exporter, opset 18, dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (torch.randn(2, *shape),), dynamo=True, external_data=False, opset_version=18,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
        )
    return prog.model_proto.SerializeToString()


def session_options() -> ort.SessionOptions:
    """One thread, sequential: the setting every latency here is measured in."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def to_session(model: nn.Module, shape: tuple[int, ...]) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_model_bytes(model, shape), session_options(), providers=["CPUExecutionProvider"])


def zeroed_zoo_model(name: str, seed: int) -> tuple[nn.Module, torch.Tensor, int, torch.Generator]:
    """A zoo model with random BN statistics and half of every coupled group zeroed; also the
    example input for `shrink`, how many channels were zeroed and the generator, to go on with."""
    shape = ZOO[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = models.build(name, shape, 10)
    randomize_bn(dense, shape, gen)
    example = torch.randn(2, *shape, generator=gen)
    return dense, example, zero_channels(dense, example, 0.5, gen), gen


def bench_model(name: str, seed: int, round_to: list[int]) -> list[dict]:
    shape = ZOO[name]
    dense, example, zeroed, gen = zeroed_zoo_model(name, seed)
    variants = {"shrunk": 1} | {f"shrunk, widths rounded to {r}": r for r in round_to if r > 1}
    results, seconds, sessions = {}, {}, [to_session(dense, shape)]
    for label, multiple in variants.items():
        t0 = time.perf_counter()
        results[label] = shrink(dense, example, round_to=multiple)
        seconds[label] = time.perf_counter() - t0
        sessions.append(to_session(results[label].model, shape))
    x1 = torch.randn(1, *shape, generator=gen).numpy()
    ref = sessions[0].run(None, {sessions[0].get_inputs()[0].name: x1})[0]
    runs = RUNS_BIG if name in BIG else RUNS
    lat = {}
    for batch in (1, 64):
        x = torch.randn(batch, *shape, generator=gen).numpy()
        lat[batch] = interleaved_latency(sessions, x, warmup=runs[batch][0], runs=runs[batch][1])
    macs_d = count_macs(dense, shape)
    rows = []
    for i, (label, res) in enumerate(results.items(), start=1):
        s = sessions[i]
        parity = float(np.abs(ref - s.run(None, {s.get_inputs()[0].name: x1})[0]).max())
        macs_ratio = count_macs(res.model, shape) / macs_d
        ratio = {b: lat[b][i] / lat[b][0] for b in lat}
        agreement = ratio[64] / macs_ratio
        rows.append({
            "model": name,
            "variant": label,
            "round_to": variants[label],
            "input_shape": list(shape),
            "channels_zeroed": zeroed,
            "params_dense": res.params_before,
            "params_shrunk": res.params_after,
            "macs_dense": macs_d,
            "macs_shrunk": count_macs(res.model, shape),
            "macs_ratio": macs_ratio,
            "latency": {f"b{b}": {"dense_ms": 1e3 * lat[b][0], "shrunk_ms": 1e3 * lat[b][i], "ratio": ratio[b],
                                  "runs": runs[b][1]} for b in lat},
            "latency_ratio_b1": ratio[1],
            "latency_ratio_b64": ratio[64],
            "b64_latency_over_macs_ratio": agreement,
            "b64_within_20pct_of_macs": bool(0.8 <= agreement <= 1.2),
            "shrink_seconds": seconds[label],
            "ort_max_abs_diff_b1": parity,
            "notes": res.notes,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = ("model", "variant", "params dense", "params shrunk", "MACs ratio", "lat ratio b1", "lat ratio b64",
            "b64 ms dense->shrunk", "b64 within 20%")
    table = [head]
    for r in rows:
        b64 = r["latency"]["b64"]
        table.append((
            r["model"], r["variant"], f"{r['params_dense']:,}", f"{r['params_shrunk']:,}", f"{r['macs_ratio']:.3f}",
            f"{r['latency_ratio_b1']:.3f}", f"{r['latency_ratio_b64']:.3f}",
            f"{b64['dense_ms']:.1f} -> {b64['shrunk_ms']:.1f}",
            ("yes" if r["b64_within_20pct_of_macs"] else "NO") + f" ({r['b64_latency_over_macs_ratio']:.2f}x)",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 16],
                    help="also time shrink(round_to=N) for each N, widths rounded up to multiples of N "
                         "(1: exact removal only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "shrink.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" chatter
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        rows.extend(bench_model(name, args.seed, args.round_to))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "shrink: 50 % of channels zeroed per coupled group, dense vs shrunk ONNX (exact, and widths rounded)",
        "target": "batch-64 latency ratio within 20 % of the MACs ratio (0.8 <= lat/MACs <= 1.2)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            **cpu_description(), "cpu_count": os.cpu_count(),
            "ort_threads": 1, "load_average_at_end": os.getloadavg(),
        },
        "timing": "median over rotating blocks of consecutive runs; ms per batch; ratio = shrunk / dense",
        "models": rows,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
