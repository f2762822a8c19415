"""Dense ONNX export, verified in onnxruntime before anything is written.

The exporter is torch's dynamo exporter (``torch.onnx.export(dynamo=True)``) with the
weights embedded in the single ``.onnx`` file, a dynamic batch dimension and a pinned
opset. Node metadata that would leak stack traces and absolute source paths is stripped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compressor.atomic import atomic_path
from compressor.errors import CompressError

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_PROTOBUF_LIMIT = 2**31 - 1


class ExportError(CompressError):
    """The model could not be exported, or the export does not match PyTorch."""


@dataclass(frozen=True)
class Parity:
    """How closely onnxruntime reproduces PyTorch on the verification batch."""

    max_abs_diff: float
    tolerance: float
    samples: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def to_onnx(model: nn.Module, example_input: torch.Tensor, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (in eval mode, on CPU) to an in-memory ``ModelProto`` with a dynamic batch."""
    model = model.eval().cpu()
    example_input = example_input.detach().cpu()
    if example_input.shape[0] < 2:
        # A batch of 1 lets the tracer specialise the batch dimension away.
        example_input = torch.cat([example_input, example_input])
    batch = torch.export.Dim("batch", min=1)
    quiet_logs = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    saved_levels = [lg.level for lg in quiet_logs]
    try:
        for lg in quiet_logs:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example_input,),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many different types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed: {first}; the model may use an operation torch.onnx cannot export") from exc
    finally:
        for lg, level in zip(quiet_logs, saved_levels):
            lg.setLevel(level)
    proto = program.model_proto
    strip_metadata(proto)
    return proto


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node metadata (stack traces, absolute paths) and doc strings, in place."""
    graphs = [proto.graph] + [f for f in proto.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""
    proto.doc_string = ""
    proto.producer_name = "compress"


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes (If/Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from subgraphs(g)


def check(proto: onnx.ModelProto) -> None:
    """Run the full ONNX checker (with shape inference)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc


def session(model: onnx.ModelProto | bytes | str | os.PathLike[str], *, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session with default graph optimisations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (str(model) if not isinstance(model, bytes) else model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from exc


def run(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Run ``x`` through the session in batches; returns the stacked first output."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,))


def verify(model: nn.Module, sess: ort.InferenceSession, inputs: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-4) -> Parity:
    """Compare onnxruntime against PyTorch on ``inputs``.

    The tolerance scales with the size of the logits: ``atol + rtol * max|logit|``, which
    covers float32 reassociation in large reductions without hiding real mismatches.
    """
    model = model.eval().cpu()
    with torch.no_grad():
        expected = model(inputs.cpu()).numpy()
    got = run(sess, inputs.cpu().numpy())
    if got.shape != expected.shape:
        raise ExportError(f"onnxruntime output shape {got.shape} differs from PyTorch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    tol = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
    return Parity(max_abs_diff=diff, tolerance=tol, samples=len(inputs))


def accuracy(sess: ort.InferenceSession, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of the ONNX model measured in onnxruntime."""
    if len(y) == 0:
        return float("nan")
    logits = run(sess, x.cpu().numpy(), batch_size)
    return float((logits.argmax(1) == y.cpu().numpy()).mean())


def save(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """Write the model atomically; returns every file written (the .onnx, plus a sidecar over 2 GB)."""
    path = Path(path)
    if proto.ByteSize() <= _PROTOBUF_LIMIT:
        with atomic_path(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return [path]
    # Protobuf cannot hold more than 2 GB: weights go to a sidecar next to the model.
    sidecar = path.with_name(path.name + ".data")
    with atomic_path(sidecar) as tmp_data, atomic_path(path) as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name)
        os.replace(tmp.parent / tmp_data.name, tmp_data)
        # Point the model at the final sidecar name.
        model = onnx.load(tmp, load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = sidecar.name
        onnx.save_model(model, tmp)
    return [path, sidecar]
