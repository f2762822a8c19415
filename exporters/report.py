"""The footprint report written next to every export, and ``compress compare``.

Schema ``compress-report/1`` (documented in docs/report.md). Every number in a report is
measured on the artefact it describes; nothing is estimated.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from compressor.atomic import write_text
from compressor.errors import CompressError

SCHEMA = "compress-report/1"
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d)


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers in a report."""
    out = {"python": platform.python_version()}
    for pkg in ("compress-toolchain", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def command_line() -> str:
    """The command as the user typed it (program name without its directory)."""
    argv = [Path(sys.argv[0]).name] + sys.argv[1:]
    return shlex.join(argv)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per prunable layer: weight shape, parameter count and non-zeros (weights and biases)."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE):
            continue
        params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "weight_shape": list(module.weight.shape) if getattr(module, "weight", None) is not None else [],
                "params": int(sum(p.numel() for p in params)),
                "nonzero": int(sum(int(torch.count_nonzero(p)) for p in params)),
            }
        )
    return rows


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return int(total), int(nonzero)


def write(report: dict[str, Any], json_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``X.report.json`` and its Markdown twin ``X.report.md`` atomically."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    write_text(json_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    write_text(md_path, render_markdown(report))
    return json_path, md_path


def default_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``small.onnx`` -> ``small.report.json``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".report.json")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def render_markdown(r: dict[str, Any]) -> str:
    """A human-readable rendering of a report."""
    size, quality = r["size"], r["quality"]
    lines = [
        f"# Compression report: {r['model']['name']} ({r['method']['name']})",
        "",
        f"Command: `{r['command']}`  ",
        f"Created: {r['created']}",
        "",
        "| | value |",
        "|---|---|",
        f"| ONNX file | {_fmt_bytes(size['file_bytes'])} ({size['file_bytes']:,} bytes) |",
        f"| dense fp32 parameters | {_fmt_bytes(size['dense_fp32_bytes'])} |",
        f"| parameters | {size['params_total']:,} ({size['params_nonzero']:,} non-zero) |",
        f"| test accuracy, onnxruntime | {_fmt_pct(quality['onnx_test_accuracy'])} |",
        f"| test accuracy, PyTorch | {_fmt_pct(quality['torch_test_accuracy'])} |",
        f"| max abs difference torch vs onnxruntime | {quality['max_abs_diff']:.3g} (tolerance {quality['parity_tolerance']:.3g}) |",
        f"| data | {r['data']['spec']} (test set: {r['data']['test_size']:,} samples) |",
        f"| training | {r['training']['epochs']} epochs, {r['training']['wall_seconds']:.1f} s |",
        "",
        "## Layers",
        "",
        "| layer | type | weight shape | params | non-zero |",
        "|---|---|---|---:|---:|",
    ]
    for layer in r["layers"]:
        shape = "x".join(str(d) for d in layer["weight_shape"])
        lines.append(f"| {layer['name']} | {layer['type']} | {shape} | {layer['params']:,} | {layer['nonzero']:,} |")
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in r["versions"].items()]
    return "\n".join(lines) + "\n"


# -- compare ----------------------------------------------------------------------------

COMPARE_ROWS: list[tuple[str, tuple[str, str], str]] = [
    ("ONNX file bytes", ("size", "file_bytes"), "int"),
    ("parameters", ("size", "params_total"), "int"),
    ("non-zero parameters", ("size", "params_nonzero"), "int"),
    ("test accuracy (onnxruntime)", ("quality", "onnx_test_accuracy"), "pct"),
    ("test accuracy (PyTorch)", ("quality", "torch_test_accuracy"), "pct"),
]


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report and check it is one this version understands."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CompressError(f"{path}: no such report file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} is not a JSON report ({exc})") from exc
    if not isinstance(report, dict) or "schema" not in report:
        raise CompressError(f"{path} is not a report written by compress (no 'schema' field)")
    return report


def compare(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a side-by-side table; ratios are against the first report."""
    paths = list(paths)
    reports = [load(p) for p in paths]
    schemas = {r["schema"] for r in reports}
    if len(schemas) > 1:
        raise CompressError(f"the reports have different schema versions ({', '.join(sorted(schemas))}); regenerate them with one version")
    tests = {r["data"].get("test_fingerprint") for r in reports}
    if len(tests) > 1:
        raise CompressError("the reports were measured on different test sets; compare reports made with the same --data and --seed")
    header = ["", *[f"{Path(p).name} ({r['method']['name']})" for p, r in zip(paths, reports)]]
    rows = []
    for label, (section, key), kind in COMPARE_ROWS:
        values = [r.get(section, {}).get(key) for r in reports]
        base = values[0]
        cells = []
        for i, v in enumerate(values):
            if v is None:
                cells.append("-")
                continue
            text = f"{v:,}" if kind == "int" else _fmt_pct(v)
            if i > 0 and base not in (None, 0):
                text += f" ({v / base:.3g}x)" if kind == "int" else f" ({100 * (v - base):+.2f} pt)"
            cells.append(text)
        rows.append([label, *cells])
    return header, rows


def render_table(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    """Render a table as aligned text, Markdown or JSON."""
    if fmt == "json":
        return json.dumps({"columns": header, "rows": rows}, indent=2) + "\n"
    if fmt == "md":
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out) + "\n"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(header), *[fmt_row(r) for r in rows]]) + "\n"
