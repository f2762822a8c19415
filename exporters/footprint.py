"""Measured footprint: multiply-accumulates and onnxruntime latency."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of the Linear and Conv layers (dense count)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        per_out = out[0].numel()
        if isinstance(mod, nn.Linear):
            total += per_out * mod.in_features
        else:
            total += per_out * (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def single_thread_session(model_bytes: bytes) -> ort.InferenceSession:
    """A sequential, one-thread CPU session: the setting latency comparisons use."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: list[ort.InferenceSession], x: np.ndarray, *, warmup: int = 5, runs: int = 50) -> list[float]:
    """Median seconds per run of each session; runs are interleaved so that machine noise
    hits every session alike."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
