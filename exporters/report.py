"""The footprint report written next to every export, ``compress report`` and ``compress compare``.

Schema ``compress-report/2`` (every field documented in docs/report.md). Every number in a
report is measured on the artefact it describes; nothing is estimated. A field that could not
be measured, or does not apply, is null and ``null_reasons`` says why.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from compressor.atomic import write_text
from compressor.errors import CompressError
from compressor.masks import PRUNABLE_LAYERS

SCHEMA = "compress-report/2"
PRUNABLE = PRUNABLE_LAYERS
LATENCY_BATCHES = (1, 64)

# The keys every compress-report/2 has, per section (a section may be null where it does not
# apply: `training` and `physical_removal` for external ONNX files). docs/report.md lists them.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "": ("schema", "created", "command", "versions", "model", "method", "data", "training", "physical_removal",
         "size", "layers", "compute", "runtime", "quality", "timings", "null_reasons"),
    "model": ("name", "source", "input_shape", "num_classes"),
    "method": ("name", "settings"),
    "data": ("spec", "name", "seed", "train_size", "val_size", "test_size", "test_fingerprint"),
    "training": ("config", "epochs", "best_epoch", "stopped_because", "wall_seconds", "history"),
    "size": ("file_bytes", "files", "gzip9_bytes", "zstd19_bytes", "opset", "encoding", "runtime_sparse",
             "tensor_encodings", "decode_ops_after_load", "params_original", "dense_fp32_bytes_original",
             "params_total", "dense_fp32_bytes", "params_nonzero", "remaining_fraction", "prunable_sparsity",
             "params_source", "onnx"),
    "size.onnx": ("stored_float_elements", "stored_float_nonzero", "stored_constant_bytes",
                  "runtime_float_elements", "runtime_float_nonzero", "runtime_constant_bytes"),
    "layers[]": ("name", "type", "shape_before", "shape_after", "params_before", "params", "nonzero",
                 "remaining_fraction", "format", "tensors", "encoded_bytes", "dense_bytes_before", "dense_bytes",
                 "bytes_vs_dense", "note"),
    "compute": ("macs_original", "macs_exported", "macs_nonzero_weights", "onnx_graph_macs",
                "onnx_graph_macs_nonzero_weights", "source"),
    "runtime": ("process", "platform", "session_options", "create_seconds", "memory", "latency"),
    "runtime.latency": tuple(f"b{b}" for b in LATENCY_BATCHES),
    "quality": ("onnx_test_accuracy", "torch_test_accuracy", "val_accuracy", "max_abs_diff", "parity_tolerance",
                "parity_samples", "baseline"),
    "timings": ("load_s", "train_s", "prune_s", "shrink_s", "export_s", "measure_s"),
}
MEMORY_KEYS = ("source", "hwm_reset_before_create", "process_rss_bytes_before_runtime", "runtime_init_rss_delta_bytes",
               "baseline_rss_bytes", "session_rss_delta_bytes", "session_peak_delta_bytes", "first_run_batch",
               "first_run_rss_delta_bytes", "first_run_peak_delta_bytes", "after_latency_rss_delta_bytes",
               "trimmed_rss_delta_bytes")
LATENCY_KEYS = ("batch", "p50_s", "p90_s", "mean_s", "runs", "warmup_runs")
def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers in a report."""
    out = {"python": platform.python_version()}
    for pkg in ("compress-toolchain", "torch", "onnx", "onnxruntime", "onnxscript", "numpy", "zstandard", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def command_line() -> str:
    """The command as the user typed it (program name without its directory)."""
    argv = [Path(sys.argv[0]).name] + sys.argv[1:]
    return shlex.join(argv)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return int(total), int(nonzero)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``small.onnx`` -> ``small.report.json``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".report.json")


# -- per-layer table --------------------------------------------------------------------------


def _float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own float parameters and buffers (BatchNorm running statistics included)."""
    out = {}
    for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t is not None and t.is_floating_point():
            out[n] = t
    return out


def merged_layers(before: nn.Module, after: nn.Module, proto: Any, encodings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per Linear/Conv/BatchNorm layer of the model before physical removal: its shape
    before and after removal, non-zeros, and how its tensors are stored in the ONNX file."""
    from exporters.footprint import tensor_storage

    fmt_of = {e["name"]: e["format"] for e in encodings}
    after_modules = dict(after.named_modules())
    rows = []
    for name, mod in before.named_modules():
        if not isinstance(mod, PRUNABLE):
            continue
        b_params = [p for p in (mod.weight, mod.bias) if p is not None]
        params_before = int(sum(p.numel() for p in b_params))
        dense_before = int(sum(t.numel() * t.element_size() for t in _float_tensors(mod).values()))
        new = after_modules.get(name)
        gone = not isinstance(new, PRUNABLE) or getattr(new, "weight", None) is None or new.weight.numel() == 0
        row: dict[str, Any] = {
            "name": name,
            "type": type(mod).__name__,
            "shape_before": list(mod.weight.shape),
            "shape_after": [] if gone else list(new.weight.shape),
            "params_before": params_before,
            "params": 0,
            "nonzero": 0,
            "remaining_fraction": 0.0,
            "format": "removed" if gone else None,
            "tensors": [],
            "encoded_bytes": 0 if gone else None,
            "dense_bytes_before": dense_before,
            "dense_bytes": 0,
            "bytes_vs_dense": 0.0 if gone else None,
            "note": "physically removed (or fused into the layer before it)" if gone else None,
        }
        if not gone:
            a_params = [p for p in (new.weight, new.bias) if p is not None]
            row["params"] = int(sum(p.numel() for p in a_params))
            row["nonzero"] = int(sum(int(torch.count_nonzero(p)) for p in a_params))
            row["remaining_fraction"] = row["nonzero"] / params_before if params_before else None
            tensors = _float_tensors(new)
            row["dense_bytes"] = int(sum(t.numel() * t.element_size() for t in tensors.values()))
            found = 0
            for tname in tensors:
                full = f"{name}.{tname}" if name else tname
                fmt, nbytes = tensor_storage(proto, full, fmt_of)
                row["tensors"].append({"name": full, "format": fmt, "stored_bytes": nbytes})
                found += nbytes is not None
            if found:
                row["encoded_bytes"] = int(sum(t["stored_bytes"] or 0 for t in row["tensors"]))
                weight = next((t for t in row["tensors"] if t["name"].endswith(".weight") or t["name"] == "weight"), None)
                row["format"] = weight["format"] if weight and weight["format"] else "partly stored"
                row["bytes_vs_dense"] = row["encoded_bytes"] / dense_before if dense_before else None
                if found < len(tensors):
                    missing = [t["name"] for t in row["tensors"] if t["stored_bytes"] is None]
                    row["note"] = f"not stored under their own names (folded by the exporter): {', '.join(missing)}"
            else:
                row["note"] = "not stored under its own name: the exporter folded it into a neighbouring layer"
        rows.append(row)
    return rows


def onnx_layers(stored: Any, graph_layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer rows for an ONNX file without its PyTorch model: one per Gemm/MatMul/Conv with a
    constant weight (from :func:`exporters.footprint.onnx_macs` on the optimized graph)."""
    from exporters.footprint import tensor_storage

    rows = []
    for g in graph_layers:
        tensors = []
        for tname in [g["name"], g["bias"]] if g["bias"] else [g["name"]]:
            fmt, nbytes = tensor_storage(stored, tname)
            tensors.append({"name": tname, "format": fmt, "stored_bytes": nbytes})
        stored_bytes = [t["stored_bytes"] for t in tensors]
        encoded = int(sum(b for b in stored_bytes if b is not None)) if any(b is not None for b in stored_bytes) else None
        dense = 4 * g["params"]
        rows.append({
            "name": g["name"],
            "type": g["type"],
            "shape_before": None,
            "shape_after": g["weight_shape"],
            "params_before": None,
            "params": g["params"],
            "nonzero": g["nonzero"],
            "remaining_fraction": None,
            "format": tensors[0]["format"],
            "tensors": tensors,
            "encoded_bytes": encoded,
            "dense_bytes_before": None,
            "dense_bytes": dense,
            "bytes_vs_dense": encoded / dense if encoded is not None and dense else None,
            "note": None if encoded is not None else "weight not stored under this name (computed by the graph)",
        })
    return rows


# -- measurements shared by `compress MODEL` and `compress report` ---------------------------


def _input_batch(proto: Any) -> int | None:
    """The fixed batch size of the model's first real input, or None when it is dynamic."""
    inits = {t.name for t in proto.graph.initializer}
    feeds = [i for i in proto.graph.input if i.name not in inits]
    dims = feeds[0].type.tensor_type.shape.dim if feeds else []
    return int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") else None


def measure_artifact(onnx_path: Path, stored: Any, x: np.ndarray, input_shape: tuple[int, ...],
                     nulls: dict[str, str]) -> dict[str, Any]:
    """File sizes (raw, gzip, zstd), parameters as stored and as onnxruntime materialises them,
    MACs of the graph, and the runtime footprint in a fresh process."""
    from exporters import footprint

    files = footprint.model_files(onnx_path)
    out: dict[str, Any] = {
        "files": files,
        "file_bytes": int(sum(f.stat().st_size for f in files)),
        **footprint.compressed_sizes(files),
        "stored": footprint.param_counts(stored),
    }
    if out["zstd19_bytes"] is None:
        nulls["size.zstd19_bytes"] = "the zstandard package is not installed"
    try:
        optimized = footprint.ort_optimized(onnx_path)
        out["runtime_params"] = footprint.param_counts(optimized)
    except Exception as exc:  # onnxruntime raises its own types
        optimized = None
        out["runtime_params"] = None
        nulls["size.onnx.runtime_float_elements"] = f"onnxruntime could not save its optimized model: {_first_line(exc)}"
    out["graph_macs"] = None
    if optimized is not None:
        try:
            out["graph_macs"] = footprint.onnx_macs(optimized, input_shape)
        except Exception as exc:  # shape inference on arbitrary graphs
            nulls["compute.onnx_graph_macs"] = f"cannot count MACs on the ONNX graph: {_first_line(exc)}"
    out["runtime"] = runtime_section(onnx_path, stored, x, nulls)
    return out


def runtime_section(onnx_path: Path, stored: Any, x: np.ndarray, nulls: dict[str, str]) -> dict[str, Any]:
    """Runtime footprint measured by :func:`exporters.measure.measure_runtime`."""
    from exporters import measure

    fixed = _input_batch(stored)
    batches = [b for b in LATENCY_BATCHES if fixed is None or b == fixed]
    for b in LATENCY_BATCHES:
        if b not in batches:
            nulls[f"runtime.latency.b{b}"] = f"the model's input has a fixed batch of {fixed}"
    section: dict[str, Any] = {
        "process": "fresh process: python -m exporters.measure (imports numpy and onnxruntime only)",
        "platform": None,
        "session_options": None,
        "create_seconds": None,
        "memory": None,
        "latency": {f"b{b}": None for b in LATENCY_BATCHES},
    }
    try:
        got = measure.measure_runtime(onnx_path, x, batches=batches, first_run_batch=max(batches) if batches else fixed)
    except measure.MeasureError as exc:
        nulls["runtime"] = str(exc)
        return section
    section.update({k: got[k] for k in ("platform", "session_options", "create_seconds", "memory")})
    section["latency"].update(got["latency"])
    if got["memory"] is None:
        nulls["runtime.memory"] = got["memory_unavailable"]
    elif got["memory"].get("trimmed_rss_delta_bytes") is None:
        nulls["runtime.memory.trimmed_rss_delta_bytes"] = "no malloc_trim in this C library"
    if got["memory"] is not None and not got["memory"]["hwm_reset_before_create"]:
        nulls["runtime.memory.hwm_reset_before_create"] = ("VmHWM could not be reset: the peak deltas are upper bounds "
                                                          "(they include any earlier peak of the process)")
    return section


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def size_onnx(m: dict[str, Any]) -> dict[str, Any]:
    rp = m["runtime_params"] or {}
    return {
        "stored_float_elements": m["stored"]["float_elements"],
        "stored_float_nonzero": m["stored"]["float_nonzero"],
        "stored_constant_bytes": m["stored"]["constant_bytes"],
        "runtime_float_elements": rp.get("float_elements"),
        "runtime_float_nonzero": rp.get("float_nonzero"),
        "runtime_constant_bytes": rp.get("constant_bytes"),
    }


def load_baseline(path: str | os.PathLike[str], test_fingerprint: str) -> dict[str, Any]:
    """The dense baseline's figures from its report, checked to be on the same test set."""
    base = load(path)
    if base["schema"] not in ("compress-report/1", SCHEMA):
        raise CompressError(f"--baseline-report {path}: unknown schema {base['schema']!r}")
    if base.get("data", {}).get("test_fingerprint") != test_fingerprint:
        raise CompressError(f"--baseline-report {path} was measured on a different test set; use a report made with the same --data")
    size, quality = base.get("size", {}), base.get("quality", {})
    return {
        "report": str(path),
        "method": base.get("method", {}).get("name"),
        "onnx_test_accuracy": quality.get("onnx_test_accuracy"),
        "file_bytes": size.get("file_bytes"),
        "gzip9_bytes": size.get("gzip9_bytes"),
        "params_nonzero": size.get("params_nonzero"),
    }


# -- `compress report MODEL.onnx` ---------------------------------------------------------------


def external_report(onnx_path: str | os.PathLike[str], data_spec: str, *, command: str = "",
                    baseline_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Measure any ONNX classifier (one made by this tool or not) on the test split of ``data_spec``."""
    import onnx
    from google.protobuf.message import DecodeError

    from compressor.data import load_dataset
    from exporters import onnx_export, sparse_onnx

    onnx_path = Path(onnx_path)
    timings: dict[str, float | None] = {k: None for k in REQUIRED_KEYS["timings"]}
    nulls: dict[str, str] = {}
    if not onnx_path.is_file():
        raise CompressError(f"{onnx_path}: no such file")
    t0 = time.perf_counter()
    try:
        stored = onnx.load(str(onnx_path))
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise CompressError(f"{onnx_path} is not an ONNX model ({_first_line(exc)})") from exc
    if not stored.graph.node or not stored.graph.input or not stored.graph.output:
        raise CompressError(f"{onnx_path} is not an ONNX model (no graph nodes, inputs or outputs)")
    data = load_dataset(data_spec)
    _check_input(stored, onnx_path, data)
    fixed = _input_batch(stored)
    try:
        sess = onnx_export.session(onnx_path)
    except CompressError as exc:
        raise CompressError(f"{onnx_path}: {exc}") from exc
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x, y = data.test.x.numpy(), data.test.y.numpy()
    logits = _run_batched(sess, x, fixed, onnx_path, data)
    accuracy = float((logits.argmax(1) == y).mean()) if len(y) else None
    m = measure_artifact(onnx_path, stored, x[:max(LATENCY_BATCHES)], tuple(data.input_shape), nulls)
    leftover = sparse_onnx.decode_ops_remaining(stored)
    timings["measure_s"] = time.perf_counter() - t0

    rp = m["runtime_params"]
    gm = m["graph_macs"]
    opset = next((o.version for o in stored.opset_import if o.domain in ("", "ai.onnx")), None)
    for key in ("train_s", "prune_s", "shrink_s", "export_s"):
        nulls[f"timings.{key}"] = "external ONNX file: this tool did not train, prune, shrink or export it"
    nulls.update({
        "training": "external ONNX file: no training history",
        "physical_removal": "external ONNX file: this tool did not shrink it",
        "size.encoding": "external ONNX file: not exported by this tool",
        "size.runtime_sparse": "external ONNX file: not exported by this tool",
        "size.tensor_encodings": "external ONNX file: not exported by this tool (see layers[].tensors)",
        "size.params_original": "external ONNX file: the architecture before pruning is unknown",
        "size.dense_fp32_bytes_original": "external ONNX file: the architecture before pruning is unknown",
        "size.remaining_fraction": "external ONNX file: the architecture before pruning is unknown",
        "size.prunable_sparsity": "external ONNX file: no PyTorch layers to attribute zeros to",
        "compute.macs_original": "external ONNX file: the architecture before pruning is unknown",
        "quality.torch_test_accuracy": "external ONNX file: no PyTorch model",
        "quality.val_accuracy": "external ONNX file: no validation split is used",
        "quality.max_abs_diff": "external ONNX file: no PyTorch model to compare with",
        "quality.parity_tolerance": "external ONNX file: no PyTorch model to compare with",
        "quality.parity_samples": "external ONNX file: no PyTorch model to compare with",
        "data.seed": "only the test split is used; it does not depend on the seed",
        "data.train_size": "only the test split is used",
        "data.val_size": "only the test split is used",
    })
    baseline = load_baseline(baseline_path, data.test.fingerprint()) if baseline_path else None
    if baseline is None:
        nulls["quality.baseline"] = "no --baseline-report given"
    elif baseline["onnx_test_accuracy"] is not None and accuracy is not None:
        baseline["onnx_test_accuracy_delta"] = accuracy - baseline["onnx_test_accuracy"]
    name = onnx_path.name[: -len(".onnx")] if onnx_path.name.lower().endswith(".onnx") else onnx_path.name
    return {
        "schema": SCHEMA,
        "created": now(),
        "command": command or command_line(),
        "versions": versions(),
        "model": {"name": name, "source": "onnx", "input_shape": list(data.input_shape), "num_classes": data.num_classes},
        "method": {"name": "external", "settings": {}},
        "data": {
            "spec": data_spec, "name": data.name, "seed": None, "train_size": None, "val_size": None,
            "test_size": len(data.test), "test_fingerprint": data.test.fingerprint(),
        },
        "training": None,
        "physical_removal": None,
        "size": {
            "file_bytes": m["file_bytes"],
            "files": [f.name for f in m["files"]],
            "gzip9_bytes": m["gzip9_bytes"],
            "zstd19_bytes": m["zstd19_bytes"],
            "opset": opset,
            "encoding": None,
            "runtime_sparse": None,
            "tensor_encodings": None,
            "decode_ops_after_load": leftover,
            "params_original": None,
            "dense_fp32_bytes_original": None,
            "params_total": rp["float_elements"] if rp else m["stored"]["float_elements"],
            "dense_fp32_bytes": 4 * (rp["float_elements"] if rp else m["stored"]["float_elements"]),
            "params_nonzero": rp["float_nonzero"] if rp else m["stored"]["float_nonzero"],
            "remaining_fraction": None,
            "prunable_sparsity": None,
            "params_source": ("onnx graph after onnxruntime's basic optimisations (float constants)" if rp
                              else "onnx graph as stored (float constants)"),
            "onnx": size_onnx(m),
        },
        "layers": onnx_layers(stored, gm["layers"]) if gm else [],
        "compute": {
            "macs_original": None,
            "macs_exported": gm["macs"] if gm else None,
            "macs_nonzero_weights": gm["macs_nonzero_weights"] if gm else None,
            "onnx_graph_macs": gm["macs"] if gm else None,
            "onnx_graph_macs_nonzero_weights": gm["macs_nonzero_weights"] if gm else None,
            "source": "onnx graph: Gemm/MatMul/Conv nodes, shapes from onnx shape inference at batch 1",
        },
        "runtime": m["runtime"],
        "quality": {
            "onnx_test_accuracy": accuracy,
            "torch_test_accuracy": None,
            "val_accuracy": None,
            "max_abs_diff": None,
            "parity_tolerance": None,
            "parity_samples": None,
            "baseline": baseline,
        },
        "timings": timings,
        "null_reasons": nulls,
    }


def _check_input(proto: Any, path: Path, data: Any) -> None:
    """The model must take one float32 input [N, *input_shape] and return [N, classes]."""
    import onnx

    want = "[N, " + ", ".join(str(d) for d in data.input_shape) + "] float32"
    inits = {t.name for t in proto.graph.initializer}
    feeds = [i for i in proto.graph.input if i.name not in inits]
    if len(feeds) != 1:
        raise CompressError(f"{path} has {len(feeds)} inputs; compress report needs one input {want} (the data {data.spec})")
    tt = feeds[0].type.tensor_type if feeds[0].type.HasField("tensor_type") else None
    if tt is None or tt.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tt.elem_type) if tt is not None else "not a tensor"
        raise CompressError(f"{path}: input '{feeds[0].name}' is {kind}; the data {data.spec} gives {want}")
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        fits = len(dims) == 1 + len(data.input_shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(dims[1:], data.input_shape))
        if not fits:
            shown = "[" + ", ".join(str(d) for d in dims) + "]"
            raise CompressError(f"{path}: input '{feeds[0].name}' takes {shown}; the data {data.spec} gives {want}")


def _run_batched(sess: Any, x: np.ndarray, fixed: int | None, path: Path, data: Any) -> np.ndarray:
    """Logits of the test split; a model with a fixed batch runs in chunks (the last one padded)."""
    name = sess.get_inputs()[0].name
    step = fixed or 1000
    outs = []
    try:
        for i in range(0, len(x), step):
            chunk = x[i: i + step]
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            outs.append(np.asarray(sess.run(None, {name: chunk})[0])[:n])
    except Exception as exc:  # onnxruntime's own error types
        raise CompressError(f"{path}: onnxruntime cannot run it on the data {data.spec}: {_first_line(exc)}") from exc
    logits = np.concatenate(outs) if outs else np.zeros((0, data.num_classes), np.float32)
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise CompressError(f"{path}: the first output has shape {list(logits.shape)}; a classifier for the data "
                            f"{data.spec} returns [N, {data.num_classes}]")
    return logits


# -- writing ----------------------------------------------------------------------------------


def write(report: dict[str, Any], json_path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """Write ``X.report.json``, ``X.report.md`` and a self-contained ``X.report.html`` atomically."""
    from exporters.html import render_html

    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    html_path = json_path.with_suffix(".html")
    _finite(report, "", report.setdefault("null_reasons", {}))
    write_text(json_path, json.dumps(report, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n")
    write_text(md_path, render_markdown(report))
    write_text(html_path, render_html(report))
    return json_path, md_path, html_path


def _finite(node: Any, path: str, nulls: dict[str, str]) -> None:
    """Replace NaN and infinities (not valid JSON) by null, with a reason, in place."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):
        sub = f"{path}.{key}" if path else str(key)
        if isinstance(value, float) and not np.isfinite(value):
            node[key] = None
            nulls.setdefault(sub, f"measured {value} (not a finite number), e.g. on an empty split")
        elif isinstance(value, (dict, list)) and value is not nulls:
            _finite(value, sub, nulls)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# -- formatting -------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:,.0f} {unit}" if unit == "B" else f"{sign}{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:,.1f} µs"
    if s < 1:
        return f"{s * 1e3:,.2f} ms"
    return f"{s:,.2f} s"


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def get(r: dict[str, Any], path: str) -> Any:
    """``get(r, "runtime.latency.b1.p50_s")``; None where any part is missing or null."""
    cur: Any = r
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return None
        cur = cur[part]
    return cur


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline figures of a report, labelled, for Markdown and HTML."""
    size, q = r["size"], r["quality"]
    mem = get(r, "runtime.memory") or {}
    lat = get(r, "runtime.latency") or {}
    rows = [
        ("ONNX file on disk", f"{fmt_bytes(size['file_bytes'])} ({size['file_bytes']:,} bytes; {', '.join(size['files'])})"),
        ("same, gzip -9 / zstd -19", f"{fmt_int(size['gzip9_bytes'])} / {fmt_int(size['zstd19_bytes'])} bytes"),
        ("dense fp32 parameters, original model", fmt_bytes(size["dense_fp32_bytes_original"])
         + (f" ({size['params_original']:,} parameters)" if size["params_original"] is not None else "")),
        ("parameters exported / non-zero", f"{fmt_int(size['params_total'])} / {fmt_int(size['params_nonzero'])}"
         + (f" ({fmt_pct(size['remaining_fraction'])} of the original remain)" if size["remaining_fraction"] is not None else "")),
        ("float elements onnxruntime materialises", fmt_int(get(r, "size.onnx.runtime_float_elements"))),
        ("MACs / sample: original / exported / non-zero weights only",
         f"{fmt_int(get(r, 'compute.macs_original'))} / {fmt_int(get(r, 'compute.macs_exported'))} / "
         f"{fmt_int(get(r, 'compute.macs_nonzero_weights'))}"),
        ("session creation", fmt_seconds(get(r, "runtime.create_seconds"))),
        ("RSS added by the session / peak (VmHWM) during creation",
         f"{fmt_bytes(mem.get('session_rss_delta_bytes'))} / {fmt_bytes(mem.get('session_peak_delta_bytes'))}"),
        (f"RSS added after the first run at batch {mem.get('first_run_batch', '-')} / peak",
         f"{fmt_bytes(mem.get('first_run_rss_delta_bytes'))} / {fmt_bytes(mem.get('first_run_peak_delta_bytes'))}"),
    ]
    for b in LATENCY_BATCHES:
        l = lat.get(f"b{b}") or {}
        rows.append((f"latency batch {b}: p50 / p90 (runs)",
                     f"{fmt_seconds(l.get('p50_s'))} / {fmt_seconds(l.get('p90_s'))} ({l.get('runs', '-')})"))
    rows += [
        ("test accuracy, onnxruntime", fmt_pct(q["onnx_test_accuracy"])),
        ("test accuracy, PyTorch", fmt_pct(q["torch_test_accuracy"])),
    ]
    if q["max_abs_diff"] is not None:
        rows.append(("max abs difference PyTorch vs onnxruntime", f"{q['max_abs_diff']:.3g} (tolerance {q['parity_tolerance']:.3g})"))
    base = q.get("baseline")
    if base:
        delta = base.get("onnx_test_accuracy_delta")
        rows.append(("dense baseline accuracy (onnxruntime)", fmt_pct(base.get("onnx_test_accuracy"))
                     + (f" ({100 * delta:+.2f} pt)" if delta is not None else "") + f", file {fmt_int(base.get('file_bytes'))} bytes"))
    rows.append(("data", f"{r['data']['spec']} (test set: {r['data']['test_size']:,} samples)"))
    return rows


def history_rows(r: dict[str, Any]) -> list[list[str]]:
    t = r.get("training") or {}
    out = []
    for h in t.get("history") or []:
        thr = h.get("threshold")
        out.append([str(h["epoch"]), fmt_pct(h.get("val_error")), fmt_pct(h.get("test_error")),
                    fmt_pct(h.get("sparsity")) if h.get("sparsity") is not None else "-",
                    f"{thr:.3g}" if thr is not None else "-", f"{h.get('lr', 0):.3g}"])
    return out


def pruning_warning(r: dict[str, Any]) -> str | None:
    """Why a pruning run kept a model with nothing pruned, and what to change; None otherwise.
    Read from the report alone, so that old reports render it too."""
    t = r.get("training") or {}
    history = t.get("history") or []
    if r["method"]["name"] == "none" or not history:
        return None
    best = t.get("best_epoch") or 0
    if best and (history[best - 1].get("sparsity") or 0.0) > 0:
        return None
    plateaus = [h for h in history if h.get("threshold") is not None]
    if not plateaus:
        pwe = (r["method"].get("settings") or {}).get("pwe")
        return (f"no validation plateau was reached (the validation loss never went --pwe {pwe} epochs without "
                "a 1 % improvement), so nothing was pruned: give more --epochs, a smaller --pwe, or start from a "
                "trained checkpoint")
    if not any(h.get("pruned_now") for h in plateaus):
        return (f"none of the {len(plateaus)} threshold searches could prune within the tolerance: "
                "raise --twt or --max-error-increase")
    return ("every pruned model exceeded the validation error allowance, so an unpruned one was kept: "
            "raise --max-error-increase")


HISTORY_HEADER = ["epoch", "val error", "test error", "sparsity", "threshold", "lr"]
LAYER_HEADER = ["layer", "type", "shape before", "shape after", "params before", "non-zero", "remaining",
                "format", "stored bytes", "dense bytes before", "vs dense"]


def layer_cells(layer: dict[str, Any]) -> list[str]:
    shape = lambda s: "-" if s is None else ("removed" if s == [] else "x".join(str(d) for d in s))
    ratio = layer["bytes_vs_dense"]
    return [layer["name"], layer["type"], shape(layer["shape_before"]), shape(layer["shape_after"]),
            fmt_int(layer["params_before"]), fmt_int(layer["nonzero"]), fmt_pct(layer["remaining_fraction"]),
            layer["format"] or "-", fmt_int(layer["encoded_bytes"]), fmt_int(layer["dense_bytes_before"]),
            "-" if ratio is None else f"{ratio:.3f}"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def render_markdown(r: dict[str, Any]) -> str:
    """A human-readable rendering of a report."""
    lines = [
        f"# Compression report: {r['model']['name']} ({r['method']['name']})",
        "",
        f"Command: `{r['command']}`  ",
        f"Created: {r['created']}  ",
        f"Schema: {r['schema']}",
        "",
        "Every figure is measured on the exported file; `-` marks a figure that was not measured "
        "(see *Not measured* at the end).",
        "",
        *_md_table(["", "value"], [list(row) for row in summary_rows(r)]),
        "",
    ]
    rt = r.get("runtime") or {}
    if rt.get("session_options"):
        opts = ", ".join(f"{k}={v}" for k, v in rt["session_options"].items())
        lines += ["## Runtime measurement", "",
                  f"Measured in a {rt['process']} on {rt['platform']}; session options: {opts}. "
                  "Memory deltas are VmRSS/VmHWM differences from /proc/self/status, taken after a one-node session "
                  "has paid onnxruntime's one-time set-up "
                  f"({fmt_bytes(get(r, 'runtime.memory.runtime_init_rss_delta_bytes'))}).", ""]
    if r["layers"]:
        lines += ["## Layers", "", *_md_table(LAYER_HEADER, [layer_cells(x) for x in r["layers"]]), ""]
    hist = history_rows(r)
    if hist:
        t = r["training"]
        lines += ["## Training", "",
                  f"{t['epochs']} epochs, {t['wall_seconds']:.1f} s, kept epoch {t['best_epoch']} ({t['stopped_because']}).", "",
                  *([f"**Warning:** {warning}", ""] if (warning := pruning_warning(r)) else []),
                  *_md_table(HISTORY_HEADER, hist), ""]
    timings = r.get("timings") or {}
    lines += ["## Wall time per stage", "",
              *_md_table(["stage", "seconds"], [[k.removesuffix("_s"), "-" if v is None else f"{v:.2f}"] for k, v in timings.items()]), ""]
    if r.get("null_reasons"):
        lines += ["## Not measured", ""] + [f"- `{k}`: {v}" for k, v in r["null_reasons"].items()] + [""]
    lines += ["## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in r["versions"].items()]
    return "\n".join(lines) + "\n"


# -- compare ----------------------------------------------------------------------------

COMPARE_ROWS: list[tuple[str, str, str]] = [
    ("ONNX file bytes", "size.file_bytes", "int"),
    ("gzip -9 bytes", "size.gzip9_bytes", "int"),
    ("zstd -19 bytes", "size.zstd19_bytes", "int"),
    ("parameters", "size.params_total", "int"),
    ("non-zero parameters", "size.params_nonzero", "int"),
    ("MACs / sample", "compute.macs_exported", "int"),
    ("MACs / sample, non-zero weights only", "compute.macs_nonzero_weights", "int"),
    ("session creation", "runtime.create_seconds", "time"),
    ("session RSS delta", "runtime.memory.session_rss_delta_bytes", "bytes"),
    ("session peak (VmHWM) delta", "runtime.memory.session_peak_delta_bytes", "bytes"),
    ("RSS delta after first b64 run", "runtime.memory.first_run_rss_delta_bytes", "bytes"),
    ("latency p50 batch 1", "runtime.latency.b1.p50_s", "time"),
    ("latency p50 batch 64", "runtime.latency.b64.p50_s", "time"),
    ("test accuracy (onnxruntime)", "quality.onnx_test_accuracy", "pct"),
    ("test accuracy (PyTorch)", "quality.torch_test_accuracy", "pct"),
]
_FORMATTERS = {"int": fmt_int, "bytes": fmt_bytes, "time": fmt_seconds, "pct": fmt_pct}


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report and check it is one this version understands."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CompressError(f"{path}: no such report file") from exc
    except IsADirectoryError as exc:
        raise CompressError(f"{path} is a directory, not a report file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} is not a JSON report ({exc})") from exc
    if not isinstance(report, dict) or "schema" not in report:
        raise CompressError(f"{path} is not a report written by compress (no 'schema' field)")
    return report


def compare_data(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column titles and, per row, the raw values and ratios against the first report."""
    paths = list(paths)
    reports = [load(p) for p in paths]
    schemas = {r["schema"] for r in reports}
    if len(schemas) > 1:
        raise CompressError(f"the reports have different schema versions ({', '.join(sorted(schemas))}); regenerate them with one version")
    tests = {(r.get("data") or {}).get("test_fingerprint") for r in reports}
    if len(tests) > 1:
        raise CompressError("the reports were measured on different test sets; compare reports made with the same --data and --seed")
    columns = [f"{Path(p).name} ({r['method']['name']})" for p, r in zip(paths, reports)]
    rows = []
    for label, key, kind in COMPARE_ROWS:
        values = [get(r, key) for r in reports]
        base = values[0]
        if kind == "pct":
            vs = [None if v is None or base is None else v - base for v in values]
        else:
            vs = [None if v is None or base in (None, 0) else v / base for v in values]
        rows.append({"label": label, "key": key, "kind": kind, "values": values,
                     "vs_first": vs, "vs_first_unit": "difference" if kind == "pct" else "ratio"})
    return columns, rows


def compare_table(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Header, formatted rows and raw per-row data (see :func:`compare_data`)."""
    columns, data = compare_data(paths)
    rows = []
    for row in data:
        fmt = _FORMATTERS[row["kind"]]
        cells = []
        for i, (v, rel) in enumerate(zip(row["values"], row["vs_first"])):
            text = fmt(v)
            if i > 0 and rel is not None:
                text += f" ({100 * rel:+.2f} pt)" if row["kind"] == "pct" else f" ({rel:.3g}x)"
            cells.append(text)
        rows.append([row["label"], *cells])
    return ["", *columns], rows, data


def render_table(header: list[str], rows: list[list[str]], fmt: str = "text", data: list[dict[str, Any]] | None = None) -> str:
    """Render a table as aligned text, Markdown or JSON (with the raw values when given)."""
    if fmt == "json":
        out: dict[str, Any] = {"columns": header, "rows": rows}
        if data is not None:
            out["values"] = data
        return json.dumps(out, indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        return "\n".join(_md_table(header, rows)) + "\n"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(header), *[fmt_row(r) for r in rows]]) + "\n"
