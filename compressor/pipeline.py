"""The end-to-end job behind ``compress MODEL``: load -> train/prune -> export -> measure -> report.

Launched by ``torchrun``, every rank loads and trains (see :mod:`compressor.train`); rank 0 alone
writes the checkpoint, exports, measures and reports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from exporters import onnx_export, report as reporting, sparse_onnx

from . import checkpoint, distributed
from .atomic import check_writable
from .augment import check_shiftable
from .data import Dataset, describe, load_dataset
from .errors import CompressError
from .loading import LoadedModel, load_model
from .masks import model_sparsity
from .methods import PruningConfig, make as make_method
from .shrink import ShrinkResult, UnsupportedModel, dead_channels, shrink, unread_inputs
from .train import Trainer, TrainConfig, evaluate

PARITY_SAMPLES = 256


@dataclass
class Job:
    """Everything one ``compress MODEL ...`` invocation needs."""

    model: str
    out: Path
    method: str = "none"
    data: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    epochs_given: bool = True
    val_fraction: float = 0.1
    workdir: Path | None = None
    resume: bool = False
    finetune_again: bool = False
    report: Path | None = None
    baseline_report: Path | None = None
    save_checkpoint: Path | None = None
    allow_unsafe_pickle: bool = False
    opset: int = onnx_export.DEFAULT_OPSET
    physical_removal: bool = True
    fuse_bn: bool = False
    round_channels: int = 1
    encoding: str = "auto"
    runtime_sparse: bool = False
    progress: bool = True
    command: str = ""

    def report_path(self) -> Path:
        return self.report or reporting.default_path(self.out)

    def work_path(self) -> Path:
        return self.workdir or self.out.with_name(self.out.stem + ".work")


def run(job: Job, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run the whole job; returns the report that was written next to ``job.out`` (None on the
    ranks other than 0 of a torchrun job, which only train)."""
    joined = distributed.init_from_env()
    try:
        return _run(job, log if distributed.is_main() else (lambda msg: None))
    finally:
        if joined:
            distributed.shutdown()


def _run(job: Job, log: Callable[[str], None]) -> dict[str, Any] | None:
    timings: dict[str, float] = {}
    job.train.validate()
    job.pruning.validate()
    if job.out.suffix.lower() != ".onnx":
        raise CompressError(f"--out must end in .onnx, got {job.out}")
    for target in (job.out, job.report_path(), job.save_checkpoint):
        if target is not None and distributed.is_main():
            check_writable(target)  # fail now, not after an hour of training

    t0 = time.perf_counter()
    torch.manual_seed(job.train.seed)  # before the model is built: a fresh zoo model's weights depend on it
    if not distributed.is_main():
        distributed.barrier()  # rank 0 downloads missing data first; the others then read its copy
    data = load_dataset(job.data, seed=job.train.seed, val_fraction=job.val_fraction)
    if distributed.is_main():
        distributed.barrier()
    check_shiftable(data.input_shape, job.train.shift)
    loaded = load_model(job.model, data, allow_unsafe_pickle=job.allow_unsafe_pickle)
    timings["load_s"] = time.perf_counter() - t0
    # Read the dense baseline's report now: a wrong file fails before training, not after.
    baseline = reporting.load_baseline(job.baseline_report, data.test.fingerprint()) if job.baseline_report else None
    log(f"model {loaded.name} ({loaded.source}); data {describe(data)}")

    config = job.train
    if not job.epochs_given and job.method == "none" and loaded.trained:
        config.epochs = 0  # a trained model with nothing to do: export it as it is

    t0 = time.perf_counter()
    teacher = None
    distilling = [flag for flag, weight in (("--finetune-distill", job.pruning.finetune_distill),
                                            ("--prune-distill", job.pruning.prune_distill)) if weight > 0]
    if job.method != "none" and distilling:
        if not loaded.trained:
            raise CompressError(f"{distilling[0]} learns from MODEL as given, but {job.model} is an untrained zoo "
                                f"model: give a trained checkpoint, or drop {' and '.join(distilling)}")
        teacher = loaded.model  # the plugin keeps a frozen copy of it, before any training
    plugin = make_method(job.method, job.pruning, example_input=data.train.x[:2], teacher=teacher)
    trainer = Trainer(loaded.model, data, config, workdir=job.work_path(), plugin=plugin, progress=job.progress, log=log)
    result = None
    if job.finetune_again:
        trainer.finetune_again()
    elif job.resume and not trainer.resume():
        log(f"--resume: nothing to resume in {job.work_path()}, starting from scratch")
    if config.epochs > trainer.epoch or trainer.finishing:  # fine-tuning runs past the epoch budget
        result = trainer.fit()
        trainer.model.load_state_dict(result.best_state)
        log(f"kept the epoch-{result.best_epoch} model: validation error {100 * result.best_val_error:.2f} %, "
            f"sparsity {100 * model_sparsity(trainer.model):.2f} % (stopped: {result.stopped_because})")
    if plugin is not None:
        plugin.detach()
    if not distributed.is_main():
        return None  # rank 0 has the same model and does the rest
    model = trainer.model.cpu().eval()
    timings["train_s"] = time.perf_counter() - t0

    if job.save_checkpoint is not None:
        if loaded.source == "pickle":
            raise CompressError("--save-checkpoint needs a zoo architecture; a pickled module cannot be re-saved as a checkpoint")
        checkpoint.save_model(job.save_checkpoint, model, arch=loaded.name, input_shape=data.input_shape, num_classes=data.num_classes)
        log(f"saved checkpoint {job.save_checkpoint}")

    t0 = time.perf_counter()
    pruned_model = model
    model, removal = remove_dead_neurons(model, data, enabled=job.physical_removal, fuse_bn=job.fuse_bn,
                                         round_to=job.round_channels, log=log)
    timings["shrink_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exported = export_verified(model, data, job.out, opset=job.opset, encoding=job.encoding,
                               runtime_sparse=job.runtime_sparse, log=log)
    timings["export_s"] = time.perf_counter() - t0

    rep = build_report(job, loaded, data, model, trainer, result, exported, timings,
                       pruned_model=pruned_model, removal=removal, baseline=baseline, log=log)
    json_path, md_path, html_path = reporting.write(rep, job.report_path())
    log(f"wrote {job.out} ({exported['file_bytes']:,} bytes), {json_path}, {md_path}, {html_path}")
    if warning := reporting.pruning_warning(rep):
        log(f"warning: {warning}")
    return rep


def remove_dead_neurons(
    model: torch.nn.Module, data: Dataset, *, enabled: bool, fuse_bn: bool, log: Callable[[str], None],
    round_to: int = 1,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Physically remove zeroed neurons/channels; on a model shrink cannot handle, keep the
    pruned model as it is and say why (never a wrong model)."""
    if not enabled:
        return model, {"applied": False, "reason": "disabled with --no-physical-removal"}
    try:
        dead = sum(int(mask.sum()) for mask in dead_channels(model).values())
        unread = unread_inputs(model)
        dead += int(unread.sum()) if unread is not None else 0
        if dead == 0 and not fuse_bn:
            return model, {"applied": False, "reason": "no dead neurons or channels, no unread input features"}
        result: ShrinkResult = shrink(model, data.test.x[:2], fuse_bn=fuse_bn, round_to=round_to)
    except UnsupportedModel as exc:
        log(f"physical removal skipped: {exc}; exporting the pruned model with its zeros")
        return model, {"applied": False, "reason": str(exc)}
    log(str(result))
    return result.model, {
        "applied": True,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "fused_batchnorm": fuse_bn,
        "round_channels": round_to,
        "layers": [
            {"name": c.name, "type": c.kind, "before": list(c.before), "after": list(c.after)} for c in result.plan
        ],
        "notes": list(result.notes),
    }


def export_verified(
    model: torch.nn.Module,
    data: Dataset,
    out: str | Path,
    *,
    opset: int = onnx_export.DEFAULT_OPSET,
    encoding: str = "auto",
    runtime_sparse: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, encode sparse weights compactly, check, verify parity and accuracy in
    onnxruntime, and only then write ``out``."""
    proto = onnx_export.to_onnx(model, data.test.x[:2], opset=opset)
    encodings: list[sparse_onnx.TensorEncoding] = []
    if encoding != "dense":
        proto, encodings = sparse_onnx.compact(proto, encoding)
    if runtime_sparse:
        proto = sparse_onnx.runtime_sparse_linear(proto)
    onnx_export.check(proto)
    sess = onnx_export.session(proto)
    parity = onnx_export.verify(model, sess, data.test.x[:PARITY_SAMPLES])
    log(f"onnxruntime vs PyTorch on {parity.samples} test inputs: max abs difference {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:.3g})")
    if not parity.ok:
        raise onnx_export.ExportError(
            f"onnxruntime disagrees with PyTorch: max abs difference {parity.max_abs_diff:.3g} > {parity.tolerance:.3g}; nothing was written"
        )
    onnx_accuracy = onnx_export.accuracy(sess, data.test.x, data.test.y)
    leftover = sparse_onnx.decode_ops_remaining(proto) if any(e.format not in ("dense", "coo") for e in encodings) else []
    files = onnx_export.save(proto, Path(out))
    return {
        "file_bytes": sum(f.stat().st_size for f in files),
        "files": [str(f) for f in files],
        "opset": opset,
        "parity": parity,
        "onnx_accuracy": onnx_accuracy,
        "encoding": encoding,
        "runtime_sparse": runtime_sparse,
        "encodings": [asdict(e) for e in encodings],
        "decode_ops_after_load": leftover,
    }


def build_report(
    job: Job,
    loaded: LoadedModel,
    data: Dataset,
    model: torch.nn.Module,
    trainer: Trainer,
    result: Any,
    exported: dict[str, Any],
    timings: dict[str, float],
    *,
    pruned_model: torch.nn.Module | None = None,
    removal: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``compress-report/2`` of one export: what the pipeline knows, plus the measurements
    of the written file (sizes, parameters in the graph, MACs, runtime in a fresh process)."""
    import onnx

    from exporters import footprint

    pruned_model = model if pruned_model is None else pruned_model
    nulls: dict[str, str] = {}
    t_measure = time.perf_counter()
    total, nonzero = reporting.count_params(model)
    original = reporting.count_params(pruned_model)[0]
    sparsity = model_sparsity(model)
    _, test_error = evaluate(model, data.test)
    _, val_error = evaluate(model, data.val)
    parity = exported["parity"]
    onnx_path = Path(exported["files"][0])
    stored = onnx.load(str(onnx_path))
    log("measuring the exported file (sizes, graph, runtime in a fresh process)")
    measured = reporting.measure_artifact(onnx_path, stored, data.test.x[: max(reporting.LATENCY_BATCHES)].numpy(),
                                          tuple(data.input_shape), nulls)
    gm = measured["graph_macs"]
    input_shape = tuple(data.input_shape)
    compute = {
        "macs_original": footprint.count_macs(pruned_model, input_shape),
        "macs_exported": footprint.count_macs(model, input_shape),
        "macs_nonzero_weights": footprint.count_macs(model, input_shape, nonzero_weights=True),
        "onnx_graph_macs": gm["macs"] if gm else None,
        "onnx_graph_macs_nonzero_weights": gm["macs_nonzero_weights"] if gm else None,
        "source": "pytorch forward hooks on Linear/Conv (original: the model before physical removal); "
                  "onnx_graph_*: Gemm/MatMul/Conv nodes of the exported file",
    }
    layers = reporting.merged_layers(pruned_model, model, stored, exported["encodings"])
    plugin = trainer.plugin
    timings["prune_s"] = plugin.seconds if plugin is not None else None
    if plugin is None:
        nulls["timings.prune_s"] = "no pruning method (--method none)"
    if removal is None or not removal.get("applied"):
        nulls["physical_removal.layers"] = (removal or {}).get("reason", "physical removal was not run")
    if baseline is None:
        nulls["quality.baseline"] = "no --baseline-report given"
    else:
        baseline = dict(baseline)
        if baseline.get("onnx_test_accuracy") is not None:
            baseline["onnx_test_accuracy_delta"] = exported["onnx_accuracy"] - baseline["onnx_test_accuracy"]
    if result is None:
        nulls["training.best_epoch"] = "no training requested"
    timings["measure_s"] = time.perf_counter() - t_measure
    return {
        "schema": reporting.SCHEMA,
        "created": reporting.now(),
        "command": job.command or reporting.command_line(),
        "versions": reporting.versions(),
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
        },
        "method": {"name": job.method, "settings": plugin_settings(job)},
        "data": {
            "spec": job.data,
            "name": data.name,
            "seed": job.train.seed,
            "train_size": len(data.train),
            "val_size": len(data.val),
            "test_size": len(data.test),
            "test_fingerprint": data.test.fingerprint(),
        },
        "training": {
            "config": asdict(job.train),
            "epochs": trainer.epoch,
            "best_epoch": result.best_epoch if result else None,
            "stopped_because": result.stopped_because if result else "no training requested",
            "wall_seconds": result.wall_seconds if result else 0.0,
            "history": trainer.history,
        },
        "physical_removal": removal,
        "size": {
            "file_bytes": exported["file_bytes"],
            "files": [Path(f).name for f in exported["files"]],
            "gzip9_bytes": measured["gzip9_bytes"],
            "zstd19_bytes": measured["zstd19_bytes"],
            "opset": exported["opset"],
            "encoding": exported["encoding"],
            "runtime_sparse": exported["runtime_sparse"],
            "tensor_encodings": exported["encodings"],
            "decode_ops_after_load": exported["decode_ops_after_load"],
            "params_original": original,
            "dense_fp32_bytes_original": 4 * original,
            "params_total": total,
            "dense_fp32_bytes": 4 * total,
            "params_nonzero": nonzero,
            "remaining_fraction": nonzero / original if original else None,
            "prunable_sparsity": sparsity,
            "params_source": "pytorch parameters of the exported model (weights and biases; not BatchNorm statistics)",
            "onnx": reporting.size_onnx(measured),
        },
        "layers": layers,
        "compute": compute,
        "runtime": measured["runtime"],
        "quality": {
            "onnx_test_accuracy": exported["onnx_accuracy"],
            "torch_test_accuracy": 1.0 - test_error,
            "val_accuracy": 1.0 - val_error,
            "max_abs_diff": parity.max_abs_diff,
            "parity_tolerance": parity.tolerance,
            "parity_samples": parity.samples,
            "baseline": baseline,
        },
        "timings": {k: timings.get(k) for k in reporting.REQUIRED_KEYS["timings"]},
        "null_reasons": nulls,
    }


def plugin_settings(job: Job) -> dict[str, Any]:
    return {} if job.method == "none" else asdict(job.pruning)
