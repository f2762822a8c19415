"""Where a shrunk network's batch-64 time goes, layer kind by layer kind, dense against shrunk.

`bench_shrink.py` compares the whole-model latency ratio with the whole-model MACs ratio. This
script splits both by layer group, with onnxruntime's own profiler, to tell apart the two reasons
why they can differ:

* mix: groups whose MACs shrink by different factors (MobileNetV2's depthwise convs lose half
  their MACs when their pointwise neighbours lose three quarters) and run at different rates, so
  the whole-model MACs ratio weights them by MACs while the latency weights them by time;
* rate: a group that runs at a lower MAC rate once shrunk (narrow convs padded to the runtime's
  channel block).

A group is (layer kind, output height x width): ResNet-32's stages and MobileNetV2's resolution
levels, which dense and shrunk models share. Per group: kernel time per batch (median over the
profiled runs) in both models, the MACs ratio, the MACs onnxruntime actually executes (its
blocked kernels pad channels; shapes as its profiler reports them), and the MAC rate. The
``rate_preserving_ratio`` is the latency ratio the shrunk model would have if every group kept
the dense model's MAC rate: sum of dense time x MACs ratio over groups, over the dense time.

Setup as in `bench_shrink.py` (same seed: same zeroed channels); one thread; batch 64.

    python bench/profile_shrink.py [--models resnet32 mobilenetv2] [--round-to 1 16] [--out bench/results/profile_shrink.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_description  # noqa: E402
from bench.bench_shrink import ZOO, onnx_model_bytes, session_options, zeroed_zoo_model  # noqa: E402
from compressor import atomic  # noqa: E402
from compressor.shrink import shrink  # noqa: E402

BATCH = 64
WARMUP, RUNS = 3, 10


def _kind(weight: list[int], input_channels: int) -> str:
    """Layer kind from a conv weight shape [out, in/groups, kh, kw] (as the profiler reports it)."""
    if len(weight) != 4:
        return f"conv{len(weight) - 2}d"
    if weight[1] == 1 and input_channels > 1:
        return "depthwise"
    return f"conv {weight[2]}x{weight[3]}"


def torch_macs_by_group(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """Per-sample MACs of the Conv2d and Linear layers, by (kind, output size) group."""
    macs: dict[str, int] = defaultdict(int)

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            macs["linear"] += out[0].numel() * mod.in_features
            return
        weight = [mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size]
        group = f"{_kind(weight, mod.in_channels)} @{out.shape[-2]}x{out.shape[-1]}"
        macs[group] += out[0].numel() * weight[1] * weight[2] * weight[3]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return dict(macs)


def profile(onnx_bytes: bytes, x: np.ndarray, workdir: str, tag: str) -> tuple[dict[str, dict[str, float]], float]:
    """Median kernel time (s) and executed MACs per sample by group, and the median run time (s)."""
    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(workdir, tag)
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(WARMUP + RUNS):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][-RUNS:]
    times: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    executed: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(runs) if a <= e["ts"] <= b), None)
        if run is None:
            continue
        args = e["args"]
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        out = next(iter(args["output_type_shape"][0].values())) if args.get("output_type_shape") else []
        if args["op_name"] in ("Conv", "FusedConv") and len(shapes) > 1 and len(out) == 4:
            group = f"{_kind(shapes[1], shapes[0][1])} @{out[2]}x{out[3]}"
            if run == 0:
                w = shapes[1]
                executed[group] += out[1] * out[2] * out[3] * w[1] * w[2] * w[3]  # per sample
        elif args["op_name"] in ("Gemm", "MatMul"):
            group = "linear"
        else:
            group = "other ops"
        times[run][group] += e["dur"] * 1e-6
    groups = sorted({g for t in times for g in t})
    table = {g: {"seconds": statistics.median(t.get(g, 0.0) for t in times), "executed_macs": executed.get(g, 0.0)}
             for g in groups}
    return table, statistics.median((b - a) * 1e-6 for a, b in runs)


def analyse(name: str, seed: int, round_to: list[int], workdir: str) -> list[dict]:
    shape = ZOO[name]
    dense, example, _, _ = zeroed_zoo_model(name, seed)
    x = np.random.default_rng(seed).standard_normal((BATCH, *shape)).astype(np.float32)
    dense_prof, dense_run = profile(onnx_model_bytes(dense, shape), x, workdir, f"{name}-dense")
    dense_macs = torch_macs_by_group(dense, shape)
    rows = []
    for multiple in round_to:
        small = shrink(dense, example, round_to=multiple).model
        small_prof, small_run = profile(onnx_model_bytes(small, shape), x, workdir, f"{name}-r{multiple}")
        small_macs = torch_macs_by_group(small, shape)
        groups = []
        for g in sorted(set(dense_prof) | set(small_prof)):
            d, s = dense_prof.get(g, {"seconds": 0.0}), small_prof.get(g, {"seconds": 0.0})
            row = {"group": g, "dense_ms": 1e3 * d["seconds"], "shrunk_ms": 1e3 * s["seconds"],
                   "time_ratio": s["seconds"] / d["seconds"] if d["seconds"] else None}
            if g in dense_macs:
                row |= {
                    "macs_ratio": small_macs.get(g, 0) / dense_macs[g],
                    "executed_macs_ratio": (s.get("executed_macs", 0) / d["executed_macs"]
                                            if d.get("executed_macs") else None),
                    "dense_gmacs_per_s": BATCH * dense_macs[g] / d["seconds"] / 1e9 if d["seconds"] else None,
                    "shrunk_gmacs_per_s": (BATCH * small_macs.get(g, 0) / s["seconds"] / 1e9
                                           if s["seconds"] else None),
                }
            groups.append(row)
        dense_ms = sum(r["dense_ms"] for r in groups)
        # what the shrunk latency would be if every group kept its dense MAC rate (other ops keep their time)
        preserving = sum(r["dense_ms"] * r.get("macs_ratio", 1.0) for r in groups) / dense_ms
        macs_ratio = sum(small_macs.values()) / sum(dense_macs.values())
        rows.append({
            "model": name, "round_to": multiple, "batch": BATCH,
            "dense_run_ms": 1e3 * dense_run, "shrunk_run_ms": 1e3 * small_run,
            "latency_ratio": small_run / dense_run,
            "kernel_time_ratio": sum(r["shrunk_ms"] for r in groups) / dense_ms,
            "macs_ratio": macs_ratio,
            "rate_preserving_ratio": preserving,
            "latency_over_macs_ratio": small_run / dense_run / macs_ratio,
            "latency_over_rate_preserving_ratio": small_run / dense_run / preserving,
            "groups": groups,
        })
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"\n{r['model']}, widths rounded to {r['round_to']}: batch {r['batch']} {r['dense_run_ms']:.1f} -> "
              f"{r['shrunk_run_ms']:.1f} ms, latency ratio {r['latency_ratio']:.3f}, MACs ratio {r['macs_ratio']:.3f} "
              f"(x{r['latency_over_macs_ratio']:.2f}), rate-preserving ratio {r['rate_preserving_ratio']:.3f} "
              f"(x{r['latency_over_rate_preserving_ratio']:.2f})")
        print(f"  {'group':<22}{'dense ms':>9}{'shrunk ms':>10}{'time':>7}{'MACs':>7}{'exec.':>7}"
              f"{'GMAC/s dense':>14}{'shrunk':>8}")
        for g in r["groups"]:
            def f(key: str, fmt: str) -> str:
                return format(g[key], fmt) if g.get(key) is not None else "-"
            print(f"  {g['group']:<22}{g['dense_ms']:>9.2f}{g['shrunk_ms']:>10.2f}{f('time_ratio', '.3f'):>7}"
                  f"{f('macs_ratio', '.3f'):>7}{f('executed_macs_ratio', '.3f'):>7}"
                  f"{f('dense_gmacs_per_s', '.0f'):>14}{f('shrunk_gmacs_per_s', '.0f'):>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet32", "mobilenetv2"], choices=list(ZOO))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_shrink.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows.extend(analyse(name, args.seed, args.round_to, workdir))
    print_rows(rows)
    result = {
        "benchmark": "onnxruntime profile of dense vs shrunk (50 % of channels zeroed per coupled group), by layer group",
        "command": "python bench/profile_shrink.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "onnxruntime": ort.__version__, **cpu_description(), "cpu_count": os.cpu_count(),
                        "ort_threads": 1, "load_average_at_end": os.getloadavg()},
        "models": rows,
    }
    atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
