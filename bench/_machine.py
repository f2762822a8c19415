"""What CPU a benchmark ran on: its timings depend on it (onnxruntime's kernels differ by vendor and ISA)."""
from __future__ import annotations

import platform


def cpu_description() -> dict[str, object]:
    """Model name and the vector extensions that decide onnxruntime's kernels; None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux: the model falls back to platform's word, the flags are unknown
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's entry
    flags = set(fields["flags"].split()) if "flags" in fields else None
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "avx2": None if flags is None else "avx2" in flags,
        "avx512f": None if flags is None else "avx512f" in flags,
    }
