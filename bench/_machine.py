"""What CPU a benchmark ran on: its timings depend on it (onnxruntime's kernels differ by vendor and ISA)."""
from __future__ import annotations

import platform


def cpu_description() -> dict[str, object]:
    """Model name and the vector extensions that decide onnxruntime's kernels; None where unknown."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
    except OSError:
        pass  # not Linux
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "avx2": None if flags is None else "avx2" in flags,
        "avx512f": None if flags is None else "avx512f" in flags,
    }
