"""A self-contained HTML rendering of a report: tables plus matplotlib plots embedded as
base64 PNG (no external files, scripts, fonts or links).

Figures (each a ``<figure id=...>``):

* ``fig-layer-remaining``: per layer, the share of its parameters that remain (non-zero, after
  physical removal) against the layer before removal;
* ``fig-layer-bytes``: per layer, the bytes stored in the ONNX file against the dense fp32 layer;
* ``fig-training``: validation and test error, and sparsity, per epoch (only with a history).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from exporters import report as reporting

FIGURE_IDS = ("fig-layer-remaining", "fig-layer-bytes", "fig-training")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; height: auto; }
code, pre { background: #f5f5f5; } pre { padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
"""


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(fig_id: str, fig: Figure, caption: str) -> str:
    return (f'<figure id="{fig_id}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def layer_remaining_figure(layers: list[dict[str, Any]]) -> tuple[Figure, str]:
    names = [x["name"] for x in layers]
    external = all(x["remaining_fraction"] is None for x in layers)
    if external:
        values = [x["nonzero"] / x["params"] if x["params"] else 0.0 for x in layers]
        caption = "Non-zero share of each layer's parameters (as onnxruntime materialises them)."
    else:
        values = [x["remaining_fraction"] or 0.0 for x in layers]
        caption = "Remaining parameters per layer: non-zero after physical removal / parameters before pruning."
    fig = Figure(figsize=(8, 0.6 + 0.35 * len(layers)))
    ax = fig.add_subplot()
    y = range(len(layers))
    ax.barh(list(y), [100 * v for v in values], color="#4c72b0")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("remaining parameters (%)")
    for i, v in enumerate(values):
        ax.text(min(100 * v + 1, 92), i, f"{100 * v:.1f} %", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig, caption


def layer_bytes_figure(layers: list[dict[str, Any]]) -> tuple[Figure, str]:
    names = [x["name"] for x in layers]
    dense = [x["dense_bytes_before"] if x["dense_bytes_before"] is not None else x["dense_bytes"] for x in layers]
    stored = [x["encoded_bytes"] or 0 for x in layers]
    fig = Figure(figsize=(8, 0.8 + 0.5 * len(layers)))
    ax = fig.add_subplot()
    pos = list(range(len(layers)))
    ax.barh([p - 0.2 for p in pos], [d / 1024 for d in dense], height=0.4, color="#bbbbbb", label="dense fp32 layer")
    ax.barh([p + 0.2 for p in pos], [s / 1024 for s in stored], height=0.4, color="#dd8452", label="stored in the ONNX file")
    ax.set_yticks(pos, names)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig, "Bytes per layer: stored in the ONNX file (all its tensors, any encoding) against the dense fp32 layer before pruning."


def training_figure(history: list[dict[str, Any]]) -> tuple[Figure, str]:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 5.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for key, label, color in (("val_error", "validation error", "#4c72b0"), ("test_error", "test error", "#c44e52")):
        pts = [(e, 100 * h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label, color=color, marker=".", markersize=3)
    ax1.set_ylabel("error (%)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    pts = [(e, 100 * h["sparsity"]) for e, h in zip(epochs, history) if h.get("sparsity") is not None]
    if pts:
        ax2.plot(*zip(*pts), color="#55a868", marker=".", markersize=3, label="sparsity (prunable parameters at zero)")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no sparsity recorded (dense training)", ha="center", va="center", transform=ax2.transAxes)
    pruned = [e for e, h in zip(epochs, history) if h.get("pruned_now")]
    for e in pruned:
        ax2.axvline(e, color="#999999", lw=0.6, ls=":")
    ax2.set_ylabel("sparsity (%)")
    ax2.set_xlabel("epoch")
    ax2.grid(alpha=0.3)
    caption = "Validation and test error, and sparsity, per training epoch" + (" (dotted lines: prune steps)." if pruned else ".")
    return fig, caption


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c: str, i: int) -> str:
        num = i > 0 and c[:1].isdigit() or c[:1] == "-" and c[1:2].isdigit()
        return f'<td class="num">{html.escape(c)}</td>' if num else f"<td>{html.escape(c)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(str(c), i) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(r: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    title = f"Compression report: {r['model']['name']} ({r['method']['name']})"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Command: <code>{html.escape(r['command'])}</code><br>Created: {html.escape(r['created'])}"
        f"<br>Schema: {html.escape(r['schema'])}</p>",
        "<p>Every figure is measured on the exported file; &ldquo;-&rdquo; marks a figure that was not measured "
        "(see <a href=\"#not-measured\">Not measured</a>).</p>",
        "<h2>Summary</h2>",
        _table(["", "value"], [list(row) for row in reporting.summary_rows(r)]),
    ]
    rt = r.get("runtime") or {}
    if rt.get("session_options"):
        opts = ", ".join(f"{k}={v}" for k, v in rt["session_options"].items())
        parts += ["<h2>Runtime measurement</h2>",
                  f"<p>{html.escape(rt['process'])} on {html.escape(str(rt['platform']))}. Session options: "
                  f"<code>{html.escape(opts)}</code>. Memory deltas are VmRSS/VmHWM differences from /proc/self/status, "
                  "taken after a one-node session has paid onnxruntime's one-time set-up "
                  f"({html.escape(reporting.fmt_bytes(reporting.get(r, 'runtime.memory.runtime_init_rss_delta_bytes')))}).</p>"]
        mem = rt.get("memory")
        if mem:
            parts.append(_table(["memory figure", "bytes"],
                                [[k, reporting.fmt_int(v) if isinstance(v, int) and not isinstance(v, bool) else str(v)]
                                 for k, v in mem.items()]))
    layers = r.get("layers") or []
    if layers:
        parts.append("<h2>Layers</h2>")
        fig, cap = layer_remaining_figure(layers)
        parts.append(_figure("fig-layer-remaining", fig, cap))
        fig, cap = layer_bytes_figure(layers)
        parts.append(_figure("fig-layer-bytes", fig, cap))
        parts.append(_table(reporting.LAYER_HEADER, [reporting.layer_cells(x) for x in layers]))
    history = (r.get("training") or {}).get("history") or []
    if history:
        t = r["training"]
        parts.append("<h2>Training</h2>")
        parts.append(f"<p>{t['epochs']} epochs, {t['wall_seconds']:.1f} s, kept epoch {t['best_epoch']} "
                     f"({html.escape(str(t['stopped_because']))}).</p>")
        if warning := reporting.pruning_warning(r):
            parts.append(f"<p><strong>Warning:</strong> {html.escape(warning)}</p>")
        fig, cap = training_figure(history)
        parts.append(_figure("fig-training", fig, cap))
        parts.append(_table(reporting.HISTORY_HEADER, reporting.history_rows(r)))
    timings = r.get("timings") or {}
    parts += ["<h2>Wall time per stage</h2>",
              _table(["stage", "seconds"], [[k.removesuffix("_s"), "-" if v is None else f"{v:.2f}"] for k, v in timings.items()])]
    nulls = r.get("null_reasons") or {}
    parts.append('<h2 id="not-measured">Not measured</h2>')
    parts.append("<ul>" + "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(str(v))}</li>" for k, v in nulls.items())
                 + "</ul>" if nulls else "<p>Everything was measured.</p>")
    parts += ["<h2>Versions</h2>", _table(["package", "version"], [[k, v] for k, v in r["versions"].items()])]
    parts += ["<h2>Raw report</h2>", "<details><summary>JSON</summary><pre>"
              + html.escape(json.dumps(r, indent=1, default=str)) + "</pre></details>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
