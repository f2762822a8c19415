"""Runtime footprint of an ONNX model, measured in a fresh process.

    python -m exporters.measure MODEL.onnx --inputs X.npy --batches 1,64 --first-run-batch 64

The child process imports only numpy and onnxruntime (never torch) and loads the inputs. A
one-node warm-up session pays onnxruntime's one-time set-up (reported on its own); then it reads
``VmRSS``/``VmHWM`` from ``/proc/self/status`` around ``InferenceSession(...)`` and around a
first run at the largest batch, so the deltas are what the model's session itself costs.
``VmHWM`` is reset just before the session is created (``echo 5 > /proc/self/clear_refs``)
so that the peak is the creation peak and not an import peak. ``ru_maxrss`` is not used: in a
child started by a big parent it can carry the parent's peak (shared/research/formats.md 6).
Latency is measured in the same process afterwards, one intra-op thread, sequential execution.
The result is one JSON object on stdout.

:func:`measure_runtime` is the parent side: it writes the inputs, spawns the child with the
current interpreter and returns the parsed result (or raises :class:`MeasureError`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Latency sampling: at least MIN_RUNS timed runs, then until BUDGET_S of timed runs or MAX_RUNS.
WARMUP_RUNS = 10
MIN_RUNS = 20
MAX_RUNS = 2000
BUDGET_S = 1.0
CHILD_TIMEOUT_S = 600


class MeasureError(RuntimeError):
    """The measuring process failed; the message says why."""


# -- child side -------------------------------------------------------------------------------


def _status() -> dict[str, int] | None:
    """VmRSS and VmHWM of this process in bytes, or None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out if len(out) == 2 else None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Return freed heap to the OS (glibc); False where there is no malloc_trim."""
    for lib in (None, "libc.so.6"):  # None: the symbols already loaded into this process
        try:
            ctypes.CDLL(lib).malloc_trim(0)
            return True
        except (OSError, AttributeError, TypeError):
            continue
    return False


def _latency(sess: Any, name: str, x: np.ndarray) -> dict[str, Any]:
    feed = {name: x}
    for _ in range(WARMUP_RUNS):
        sess.run(None, feed)
    times: list[float] = []
    spent = 0.0
    while len(times) < MIN_RUNS or (spent < BUDGET_S and len(times) < MAX_RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    arr = np.asarray(times)
    return {
        "batch": int(x.shape[0]),
        "p50_s": float(np.percentile(arr, 50)),
        "p90_s": float(np.percentile(arr, 90)),
        "mean_s": float(arr.mean()),
        "runs": len(times),
        "warmup_runs": WARMUP_RUNS,
    }


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else np.ascontiguousarray(x[:n])


def child(model: str, inputs: str, batches: list[int], first_run_batch: int, warmup_model: str | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    x = np.load(inputs, allow_pickle=False)
    feeds = {b: _batch(x, b) for b in sorted(set(batches) | {first_run_batch})}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    settings = {
        "provider": "CPUExecutionProvider",
        "graph_optimization_level": str(options.graph_optimization_level).split(".")[-1],
        "intra_op_num_threads": options.intra_op_num_threads,
        "inter_op_num_threads": options.inter_op_num_threads,
        "execution_mode": "sequential",
        "enable_cpu_mem_arena": bool(options.enable_cpu_mem_arena),
        "enable_mem_pattern": bool(options.enable_mem_pattern),
        "arena_extend_strategy": "default (kNextPowerOfTwo)",
    }
    # onnxruntime's one-time global set-up (environment, thread pools, kernel registries) is paid
    # by the first session of a process whatever the model: a one-node session pays it first, so
    # the deltas below are the model's own, and the set-up is reported on its own.
    gc.collect()
    init_before = _status()
    warm = ort.InferenceSession(warmup_model, sess_options=options, providers=["CPUExecutionProvider"]) if warmup_model else None
    init_after = _status()
    gc.collect()
    hwm_reset = _reset_hwm()
    before = _status()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    create_s = time.perf_counter() - t0
    after_create = _status()
    name = sess.get_inputs()[0].name
    sess.run(None, {name: feeds[first_run_batch]})
    after_run = _status()
    latency = {f"b{b}": _latency(sess, name, feeds[b]) for b in batches}
    after_latency = _status()
    trimmed = _malloc_trim()
    after_trim = _status()

    memory = None
    reason = None
    if before is None:
        reason = f"no /proc/self/status on this platform ({platform.system()}); memory is not measured"
    else:
        base = before["VmRSS"]
        memory = {
            "source": "VmRSS/VmHWM from /proc/self/status in a fresh process",
            "hwm_reset_before_create": hwm_reset,
            "process_rss_bytes_before_runtime": init_before["VmRSS"],
            "runtime_init_rss_delta_bytes": init_after["VmRSS"] - init_before["VmRSS"] if warm is not None else None,
            "baseline_rss_bytes": base,
            "session_rss_delta_bytes": after_create["VmRSS"] - base,
            "session_peak_delta_bytes": after_create["VmHWM"] - base,
            "first_run_batch": first_run_batch,
            "first_run_rss_delta_bytes": after_run["VmRSS"] - base,
            "first_run_peak_delta_bytes": after_run["VmHWM"] - base,
            "after_latency_rss_delta_bytes": after_latency["VmRSS"] - base,
            "trimmed_rss_delta_bytes": after_trim["VmRSS"] - base if trimmed else None,
        }
    return {
        "session_options": settings,
        "create_seconds": create_s,
        "memory": memory,
        "memory_unavailable": reason,
        "latency": latency,
        "platform": f"{platform.system()} {platform.machine()}, python {platform.python_version()}, onnxruntime {ort.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters.measure", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--inputs", required=True, help=".npy with float32 inputs [N, ...]")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes to time")
    parser.add_argument("--warmup-model", default=None, help="a one-node model created first, to pay onnxruntime's set-up")
    parser.add_argument("--first-run-batch", type=int, default=None, help="batch of the first run (default: the largest)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    first = args.first_run_batch or max(batches)
    result = child(args.model, args.inputs, batches, first, args.warmup_model)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# -- parent side ------------------------------------------------------------------------------


def _identity_model() -> bytes:
    """A one-node float Identity model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def measure_runtime(model: str | os.PathLike[str], x: np.ndarray, *, batches: list[int] | tuple[int, ...] = (1, 64),
                    first_run_batch: int | None = None, timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Measure ``model`` in a fresh ``python -m exporters.measure`` process.

    ``x`` holds the inputs the runs use (float32 ``[N, ...]``; repeated to fill a batch).
    Raises :class:`MeasureError` with the child's last error line when it fails.
    """
    if not batches and first_run_batch is None:
        raise MeasureError("no batch size to run")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="compress-measure-") as tmp:
        inputs = os.path.join(tmp, "inputs.npy")
        np.save(inputs, np.ascontiguousarray(x, dtype=np.float32))
        warmup = os.path.join(tmp, "identity.onnx")
        with open(warmup, "wb") as f:
            f.write(_identity_model())
        cmd = [sys.executable, "-m", "exporters.measure", str(Path(model).resolve()), "--inputs", inputs,
               "--batches", ",".join(str(b) for b in batches), "--warmup-model", warmup]
        if first_run_batch is not None:
            cmd += ["--first-run-batch", str(first_run_batch)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired as exc:
            raise MeasureError(f"the measuring process took more than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise MeasureError(f"the measuring process failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        raise MeasureError("the measuring process printed no result") from exc


if __name__ == "__main__":
    sys.exit(main())
