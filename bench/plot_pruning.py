"""Table and plot of the pruning benchmark: test error vs fraction of weights remaining.

Reads every ``bench/results/pruning/*.json`` written by ``bench_pruning.py`` and writes
``bench/results/pruning/summary.md``, ``<arch>.png`` (lobster, sensitivity and magnitude under the
same schedule and budget) and ``<arch>-all.png`` (every run). For each run,
the curve has one point per compression level reached: the epoch with the best validation
error at that level, at its test error (as the LOBSTER authors log it). The table row is the
model the run selected on validation; the matched comparisons (``MATCHED_ERROR``) are also read
at equal epochs and at a matched test error.

    python bench/plot_pruning.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pruning"


def curve(history: list[dict]) -> list[tuple[float, float]]:
    """(remaining fraction, test error) of the best-validated epoch at each sparsity level."""
    best: dict[float, dict] = {}
    for h in history:
        level = round(h.get("sparsity", 0.0), 6)
        if level not in best or h["val_error"] < best[level]["val_error"]:
            best[level] = h
    return sorted((1 - level, h["test_error"]) for level, h in best.items())


def main() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not runs:
        sys.exit(f"no results in {RESULTS}")
    lines = [
        "| arch | method | tag | pruned | compression | test error | wall | params after removal | MACs ratio | ONNX bytes (dense -> compact) | b1 / b64 speed-up | widths rounded to 8: MACs ratio, b1 / b64 speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["arch"], r["method"], r["tag"])):
        s, d = r["selected"], r.get("deployment", {})
        lat = d.get("latency", {})
        r8 = d.get("rounded_to_8")
        rounded = "-" if r8 is None else (
            f"{d['macs_dense'] / r8['macs_after_removal']:.1f}x, {r8['latency']['batch1']['speedup']:.2f}x / "
            f"{r8['latency']['batch64']['speedup']:.2f}x"
        )
        lines.append(
            f"| {r['arch']} | {r['method']} | {r['tag'] or '-'} | {100 * s['pruned_fraction']:.2f} % | {s['compression']:.1f}x | "
            f"{100 * s['test_error']:.2f} % | {r['wall_seconds'] / 60:.0f} min | "
            f"{d.get('params_after_removal', 0):,} | {d.get('macs_dense', 0) / max(d.get('macs_after_removal', 1), 1):.1f}x | "
            f"{d.get('onnx_bytes_dense', 0):,} -> {d.get('onnx_bytes_compact', 0):,} | "
            f"{lat.get('batch1', {}).get('speedup', float('nan')):.2f}x / {lat.get('batch64', {}).get('speedup', float('nan')):.2f}x | {rounded} |"
        )
    lines += ["", *equal_epochs_table(runs), "", *matched_error_table(runs), *seed_means_table(runs)]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for arch in sorted({r["arch"] for r in runs}):
        mine = [r for r in runs if r["arch"] == arch]
        # The methods compared under the same conditions: <arch>.png; every run: <arch>-all.png.
        same = [r for r in mine if r["method"] in COMPARED and r["tag"] == COMPARISON_TAG.get(arch, "")]
        plot(same, arch, RESULTS / f"{arch}.png", "same schedule and time budget")
        plot(mine, arch, RESULTS / f"{arch}-all.png", "every run")


def selected_by(history: list[dict], epoch: int) -> dict | None:
    """The model the run would have kept had it stopped after ``epoch``: its last new best."""
    best = [h for h in history if h["epoch"] <= epoch and h.get("best")]
    return best[-1] if best else None


def equal_epochs_table(runs: list[dict]) -> list[str]:
    """The compared methods, each stopped at the epoch count of the one that ran fewest epochs
    (their time budgets bought different epoch counts on a shared machine)."""
    lines = ["| arch | epochs (all methods) | method | pruned | compression | test error |", "|---|---:|---|---:|---:|---:|"]
    for arch, tag in COMPARISON_TAG.items():
        same = [r for r in runs if r["arch"] == arch and r["method"] in COMPARED and r["tag"] == tag]
        if len(same) < 2:
            continue
        epochs = min(r["epochs_run"] for r in same)
        for r in sorted(same, key=lambda r: r["method"]):
            h = selected_by(r["history"], epochs)
            if h is not None:
                sp = h.get("sparsity", 0.0)
                lines.append(f"| {arch} | {epochs} | {r['method']} | {100 * sp:.2f} % | {compression(h):.1f}x | "
                             f"{100 * h['test_error']:.2f} % |")
    return lines


def compression(h: dict) -> float:
    """Parameters per non-zero parameter at one epoch of a run's history."""
    return 1 / max(1 - h.get("sparsity", 0.0), 1e-12)


def sparsest_within(history: list[dict], epoch: int, cap: float) -> dict | None:
    """The sparsest of the first ``epoch`` epochs whose test error is at most ``cap``.

    A reading of the error-vs-weights curve at a matched test error, for comparing methods;
    not a way to select a model (that is done on validation)."""
    within = [h for h in history if h["epoch"] <= epoch and h["test_error"] <= cap + 1e-12]
    return max(within, key=lambda h: h.get("sparsity", 0.0)) if within else None


def matched_error_table(runs: list[dict]) -> list[str]:
    """Compression of each run of a matched comparison at equal test error, per cap."""
    lines = []
    for (arch, tags), (epoch_counts, caps) in MATCHED_ERROR.items():
        same = sorted((r for r in runs if r["arch"] == arch and re.fullmatch(tags, r["tag"])),
                      key=lambda r: (r["method"], r["tag"]))
        for epochs in epoch_counts if same else ():
            lines += [f"{arch} runs whose tag matches `{tags}`, first {epochs} epochs: the model selected on validation, and the "
                      "sparsest epoch whose test error is within each cap",
                      "", "| method | tag | epochs run | selected on validation | "
                      + " | ".join(f"test <= {100 * c:.2f} %" for c in caps) + " |",
                      "|---|---|---:|---:|" + "---:|" * len(caps)]
            for r in same:
                if r["epochs_run"] < epochs:  # a run that stopped earlier has no reading at this count
                    cells = ["-"] * (1 + len(caps))
                else:
                    chosen = selected_by(r["history"], epochs)
                    cells = ["-" if chosen is None else f"{compression(chosen):.1f}x at {100 * chosen['test_error']:.2f} %"]
                    for cap in caps:
                        h = sparsest_within(r["history"], epochs, cap)
                        cells.append("-" if h is None else f"{compression(h):.1f}x (ep {h['epoch']})")
                lines.append(f"| {r['method']} | {r['tag']} | {r['epochs_run']} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


# Matched-error comparisons: (arch, regular expression the whole tag matches) -> (epoch counts
# read, test-error caps). LeNet-300: the from-scratch runs and the exact output sensitivity.
MATCHED_ERROR = {
    ("lenet300", "|exact"): ((143,), (0.0180, 0.0190, 0.0200, 0.0210)),
    ("lenet5", "shift2t-pkd05-mei006.*"): ((23, 39, 45), (0.0060, 0.0065, 0.0070, 0.0075, 0.0080)),
}

# Seeds of one setting, averaged at a matched test error: label -> (arch, method, regular
# expression the whole tag matches). LeNet-5 from the --shift 2 baseline, row 6's settings.
SEED_GROUPS = {
    "output sensitivity, lambda 3e-4": ("lenet5", "sensitivity", r"shift2t-pkd05-mei006-l3e4(-s\d)?-(48m|45e)"),
    "magnitude": ("lenet5", "magnitude", r"shift2t-pkd05-mei006(-s\d)?-(48m|45e)"),
    "magnitude, --weight-decay 6e-3": ("lenet5", "magnitude", r"shift2t-pkd05-mei006-wd6e3(-s\d)?-(48m|45e)"),
}
SEED_MEANS_AT = {"lenet5": ((39, 45), (0.0065, 0.0070, 0.0075, 0.0080))}


def _mean_range(values: list[float], digits: int, unit: str) -> str:
    """``mean<unit> (min-max)``, e.g. ``72.4x (59.2-83.3)``."""
    return f"{sum(values) / len(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def seed_means_table(runs: list[dict]) -> list[str]:
    """Per setting of ``SEED_GROUPS``: mean (min-max) over its seeds of the model selected on
    validation and of the sparsest epoch within each test-error cap, among the first N epochs; a
    seed whose run stopped earlier is left out."""
    lines = []
    for arch, (epoch_counts, caps) in SEED_MEANS_AT.items():
        for epochs in epoch_counts:
            rows = []
            for label, (group_arch, method, tags) in SEED_GROUPS.items():
                seeds = [r for r in runs if r["arch"] == group_arch == arch and r["method"] == method
                         and re.fullmatch(tags, r["tag"]) and r["epochs_run"] >= epochs]
                if not seeds:
                    continue
                picked = [selected_by(r["history"], epochs) for r in seeds]
                picked = [h for h in picked if h is not None]
                cells = [_mean_range([compression(h) for h in picked], 1, "x") + " at "
                         + _mean_range([100 * h["test_error"] for h in picked], 2, " %")] if picked else ["-"]
                for cap in caps:
                    got = [sparsest_within(r["history"], epochs, cap) for r in seeds]
                    values = [compression(h) if h is not None else 1.0 for h in got]
                    cells.append(_mean_range(values, 1, "x"))
                rows.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
            if rows:
                lines += [f"{arch}, first {epochs} epochs: mean (min-max) over seeds of the model selected on validation "
                          "and of the sparsest epoch within each test-error cap (no epoch within a cap counts as 1x)", "",
                          "| setting | seeds | selected on validation | "
                          + " | ".join(f"test <= {100 * c:.2f} %" for c in caps) + " |",
                          "|---|---:|---:|" + "---:|" * len(caps), *rows, ""]
    return lines


# The runs that compare the unstructured methods under one schedule and budget, per architecture.
COMPARED = ("lobster", "sensitivity", "magnitude")
COMPARISON_TAG = {"lenet300": "", "lenet5": "2h"}


def plot(runs: list[dict], arch: str, path: Path, subtitle: str) -> None:
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in sorted(runs, key=lambda r: (r["method"], r["tag"])):
        pts = curve(r["history"])
        label = r["method"] + (f" ({r['tag']})" if r["tag"] else "")
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=".", label=label)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("fraction of parameters remaining (log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{arch} on MNIST: {subtitle}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
