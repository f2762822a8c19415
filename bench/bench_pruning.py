"""Pruning on real MNIST: lobster vs sensitivity vs magnitude (unstructured) and serene (structured).

One run per invocation; writes ``bench/results/pruning/<arch>-<method>[-tag].json`` with the
settings, the per-epoch history and the model selected on validation (the sparsest whose
validation error is within the allowed increase), whose error is then measured once on the
10k test set. ``bench/plot_pruning.py`` turns the JSON files into the table and the plot.

    python bench/bench_pruning.py --arch lenet300 --method lobster --minutes 30
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
from compressor import checkpoint  # noqa: E402
from compressor.cli import default_recipe  # noqa: E402
from compressor.data import load_dataset  # noqa: E402
from compressor.masks import prunable_parameters  # noqa: E402
from compressor.methods import FINETUNE_SCHEDULES, PruningConfig, make  # noqa: E402
from compressor.train import PRUNED_STATE, Trainer, TrainConfig, evaluate  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
ROUND_TO = 8  # the deployment metrics are also measured with widths rounded up to this


def layer_counts(model: torch.nn.Module) -> list[dict]:
    return [
        {"name": name, "shape": list(p.shape), "params": p.numel(), "nonzero": int(torch.count_nonzero(p))}
        for name, p in prunable_parameters(model)
    ]


def deployment(arch: str, model: torch.nn.Module, data) -> dict:
    """What the selected model costs once deployed: physical removal, MACs, compact ONNX
    size against the information-theoretic bound, and onnxruntime latency vs the dense export."""
    import numpy as np

    import formats
    from compressor.shrink import shrink
    from exporters import onnx_export, sparse_onnx
    from exporters.footprint import count_macs, interleaved_latency, single_thread_session

    model = model.cpu().eval()
    dense = models.build(arch, data.input_shape, data.num_classes).eval()
    removal = shrink(model, data.test.x[:2])
    small = removal.model
    dense_proto = onnx_export.to_onnx(dense, data.test.x[:2])
    small_proto = onnx_export.to_onnx(small, data.test.x[:2])
    compact_proto, encodings = sparse_onnx.compact(small_proto, "auto")
    # Also with widths rounded up to multiples of 8 (--round-channels 8): onnxruntime's blocked
    # conv kernels can run those faster although they compute more.
    rounded = shrink(model, data.test.x[:2], round_to=ROUND_TO)
    rounded_proto, _ = sparse_onnx.compact(onnx_export.to_onnx(rounded.model, data.test.x[:2]), "auto")
    sessions = [single_thread_session(p.SerializeToString()) for p in (dense_proto, compact_proto, rounded_proto)]
    latency, latency_rounded = {}, {}
    for batch in (1, 64):
        x = data.test.x[:batch].numpy()
        d, c, r = interleaved_latency(sessions, x, runs=200 if batch == 1 else 50)
        latency[f"batch{batch}"] = {"dense_ms": 1000 * d, "pruned_ms": 1000 * c, "speedup": d / c}
        latency_rounded[f"batch{batch}"] = {"dense_ms": 1000 * d, "pruned_ms": 1000 * r, "speedup": d / r}
    _, test_err = evaluate(small, data.test)
    bound = sum(formats.size_bound(np.asarray(t)) for t in
                (p.detach().numpy() for p in small.parameters()))
    return {
        "widths_after": [list(c.after[:1]) for c in removal.plan],
        "plan": [{"name": c.name, "before": list(c.before), "after": list(c.after)} for c in removal.plan],
        "params_before_removal": removal.params_before,
        "params_after_removal": removal.params_after,
        "macs_dense": count_macs(dense, data.input_shape),
        "macs_after_removal": count_macs(small, data.input_shape),
        "test_error_after_removal": test_err,
        # the deployed file itself, run in onnxruntime on the test set
        "onnx_test_error": 1.0 - onnx_export.accuracy(sessions[1], data.test.x, data.test.y),
        "onnx_bytes_dense": len(dense_proto.SerializeToString()),
        "onnx_bytes_removed": len(small_proto.SerializeToString()),
        "onnx_bytes_compact": len(compact_proto.SerializeToString()),
        "parameter_bound_bytes": bound,
        "encodings": [e.__dict__ for e in encodings],
        "latency": latency,
        f"rounded_to_{ROUND_TO}": {
            "widths_after": [list(c.after[:1]) for c in rounded.plan],
            "macs_after_removal": count_macs(rounded.model, data.input_shape),
            "onnx_bytes_compact": len(rounded_proto.SerializeToString()),
            "latency": latency_rounded,
        },
    }


def redeploy(args: argparse.Namespace) -> None:
    name = f"{args.arch}-{args.method}" + (f"-{args.tag}" if args.tag else "")
    path = args.out_dir / f"{name}.json"
    record = json.loads(path.read_text())
    data = load_dataset(args.data, seed=record.get("split_seed", record["train_config"]["seed"]))
    model = models.build(args.arch, data.input_shape, data.num_classes)
    best = checkpoint.load_safely(args.out_dir / f"{name}.work" / "best.pt")
    model.load_state_dict(best["state_dict"])
    assert best["epoch"] == record["selected_epoch"], "best.pt is not the selected model"
    record["deployment"] = deployment(args.arch, model, data)
    _write_json(path, record)
    print(f"{name}: deployment metrics added to {path}")


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # atomic: an interrupted write leaves the earlier result, not half a file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=["lenet300", "lenet5"])
    ap.add_argument("--method", required=True, choices=["lobster", "sensitivity", "magnitude", "serene"])
    ap.add_argument("--data", default=f"mnist:{MNIST}")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint instead of from scratch")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--epochs", type=int, default=10_000)
    ap.add_argument("--lr", type=float, default=None, help="default: the CLI's recipe for the method")
    ap.add_argument("--momentum", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--lr-schedule", default=None)
    ap.add_argument("--lr-patience", type=int, default=10)
    ap.add_argument("--lmbda", type=float, default=1e-4)
    ap.add_argument("--pwe", type=int, default=5)
    ap.add_argument("--twt", type=float, default=0.05)
    ap.add_argument("--max-error-increase", type=float, default=0.005)
    ap.add_argument("--target-sparsity", type=float, default=None, help="stop pruning once this share of the prunable parameters is zero")
    ap.add_argument("--min-width", type=int, default=1)
    ap.add_argument("--prune-inputs", action="store_true", help="serene: input features are units too")
    ap.add_argument("--neuron-criterion", default="norm", choices=["norm", "sensitivity", "both"])
    ap.add_argument("--exact-sensitivity", action="store_true",
                    help="sensitivity/serene: exact per-class output sensitivity (C backward passes) instead of the one-pass bound")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="after pruning stops (or --minutes is up): epochs of fine-tuning, masks fixed")
    ap.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning lr (default: --lr / 10)")
    ap.add_argument("--finetune-momentum", type=float, default=None, help="fine-tuning momentum (default: --momentum)")
    ap.add_argument("--finetune-schedule", default="plateau", choices=FINETUNE_SCHEDULES, help="fine-tuning lr schedule")
    ap.add_argument("--finetune-distill", type=float, default=0.0,
                    help="fine-tuning loss share of matching the --init model's softened outputs (needs --init)")
    ap.add_argument("--finetune-temperature", type=float, default=4.0, help="distillation temperature")
    ap.add_argument("--prune-distill", type=float, default=0.0,
                    help="the same distillation while pruning: the loss share of the --init model's outputs (needs --init)")
    ap.add_argument("--rank-per-mac", action="store_true", help="serene: criterion per MAC the neuron's removal saves")
    ap.add_argument("--width-multiple", type=int, default=1,
                    help="serene: also try to bring layer widths down to multiples of N at each plateau")
    ap.add_argument("--rescale-sensitivity", action="store_true", help="serene: sensitivity relative to the layer's largest")
    ap.add_argument("--anneals", type=int, default=0, help="lr/lambda cuts by 10 when pruning stalls (0: stop instead)")
    ap.add_argument("--anneal-after", type=int, default=2, help="fruitless plateaus in a row before each anneal")
    ap.add_argument("--stall-limit", type=int, default=5, help="stop after this many plateaus in a row that prune nothing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two runs share the 2-core machine)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="validation split; keep 0 with an --init from bench/results/baselines, whose training "
                         "held out that split (another would put its training images in the validation set)")
    ap.add_argument("--shift", type=int, default=0, help="augment training images by random shifts of up to N pixels")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "pruning")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run of the same name from its workdir for another --minutes (wall times add up)")
    ap.add_argument("--finetune-from", type=Path, default=None,
                    help="the workdir of an earlier run: fine-tune anew from its pruned.pt, with this run's --finetune-* "
                         "settings, under this run's --tag (its pruning time is counted)")
    ap.add_argument("--deploy-only", action="store_true",
                    help="recompute only the deployment metrics of a finished run, from its workdir's best.pt")
    args = ap.parse_args()
    if args.deploy_only:
        redeploy(args)
        return
    for key, value in default_recipe(args.method).items():
        if key != "epochs" and getattr(args, key) is None:
            setattr(args, key, value)

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, seed=args.split_seed)
    torch.manual_seed(args.seed)
    model = models.build(args.arch, data.input_shape, data.num_classes)
    if args.init is not None:
        model.load_state_dict(checkpoint.load_safely(args.init)["state_dict"])
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                            lr_schedule=args.lr_schedule, plateau_patience=args.lr_patience, seed=args.seed, shift=args.shift,
                            device="cpu", max_seconds=60 * args.minutes)
    prune_cfg = PruningConfig(lmbda=args.lmbda, pwe=args.pwe, twt=args.twt, max_error_increase=args.max_error_increase, target_sparsity=args.target_sparsity,
                              min_width=args.min_width, anneals=args.anneals, anneal_after=args.anneal_after, stall_limit=args.stall_limit, prune_inputs=args.prune_inputs,
                              finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, finetune_momentum=args.finetune_momentum, finetune_schedule=args.finetune_schedule,
                              finetune_distill=args.finetune_distill, finetune_temperature=args.finetune_temperature, prune_distill=args.prune_distill,
                              neuron_criterion=args.neuron_criterion, rescale_sensitivity=args.rescale_sensitivity, exact=args.exact_sensitivity,
                              rank_per_mac=args.rank_per_mac, width_multiple=args.width_multiple)
    name = f"{args.arch}-{args.method}" + (f"-{args.tag}" if args.tag else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{name}.json"
    if (args.finetune_distill > 0 or args.prune_distill > 0) and args.init is None:
        sys.exit("--finetune-distill and --prune-distill learn from the --init model: give --init")
    plugin = make(args.method, prune_cfg, example_input=data.train.x[:2], teacher=model if args.init is not None else None)
    log = open(args.out_dir / f"{name}.log", "a" if args.resume else "w", buffering=1)
    trainer = Trainer(model, data, train_cfg, workdir=args.out_dir / f"{name}.work", plugin=plugin, progress=False,
                      log=lambda s: print(s, file=log))
    earlier_wall, command = 0.0, "python bench/bench_pruning.py " + " ".join(sys.argv[1:])
    if args.finetune_from is not None:
        source = args.finetune_from / PRUNED_STATE
        if not source.is_file():
            sys.exit(f"--finetune-from: no {source}")
        trainer.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, trainer.workdir / PRUNED_STATE)
        trainer.finetune_again()
        earlier_wall = sum(h["seconds"] for h in trainer.history)  # the pruning epochs' own times
        command = f"(pruning in {args.finetune_from}: {trainer.epoch} epochs, {earlier_wall / 60:.1f} min) ; then " + command
    elif args.resume:
        if not trainer.resume():
            sys.exit(f"--resume: nothing to resume in {args.out_dir / f'{name}.work'}")
        if out.exists():
            earlier = json.loads(out.read_text())
            earlier_wall, command = earlier["wall_seconds"], earlier["command"] + " ; then " + command
        else:
            # The earlier run was interrupted before writing its JSON: its epochs' own times
            # (training, evaluation, pruning) are what it spent, less its start-up.
            earlier_wall = sum(h["seconds"] for h in trainer.history)
            command = f"(interrupted run: {trainer.epoch} epochs, {earlier_wall / 60:.1f} min) ; then " + command
    started = time.perf_counter()
    result = trainer.fit()
    wall = earlier_wall + time.perf_counter() - started
    plugin.detach()
    model.load_state_dict(result.best_state)
    _, test_err = evaluate(model, data.test)
    _, val_err = evaluate(model, data.val)
    layers = layer_counts(model)
    total = sum(l["params"] for l in layers)
    nonzero = sum(l["nonzero"] for l in layers)
    weights = [l for l in layers if l["name"].endswith("weight")]
    w_total = sum(l["params"] for l in weights)
    w_nonzero = sum(l["nonzero"] for l in weights)
    record = {
        "arch": args.arch,
        "method": args.method,
        "tag": args.tag,
        "command": command,
        "train_config": asdict(train_cfg),
        "pruning_config": asdict(prune_cfg),
        "init": str(args.init) if args.init else "scratch",
        "split_seed": args.split_seed,
        "wall_seconds": wall,
        "epochs_run": trainer.epoch,
        "stopped_because": result.stopped_because,
        "selected_epoch": result.best_epoch,
        "selected": {
            "val_error": val_err,
            "test_error": test_err,
            "params": total,
            "nonzero": nonzero,
            "pruned_fraction": 1 - nonzero / total,
            "compression": total / max(nonzero, 1),
            "weights": w_total,
            "weights_nonzero": w_nonzero,
            "weights_pruned_fraction": 1 - w_nonzero / w_total,
            "layers": layers,
        },
        "deployment": deployment(args.arch, model, data),
        "history": result.history,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    _write_json(out, record)
    dep = record["deployment"]
    print(f"{name}: {100 * record['selected']['pruned_fraction']:.3f} % pruned ({record['selected']['compression']:.1f}x), "
          f"test error {100 * test_err:.2f} %, {wall / 60:.1f} min; after removal {dep['params_after_removal']:,} params, "
          f"MACs /{dep['macs_dense'] / dep['macs_after_removal']:.1f}, ONNX {dep['onnx_bytes_compact']:,} B "
          f"(dense {dep['onnx_bytes_dense']:,} B), b64 speed-up {dep['latency']['batch64']['speedup']:.2f}x -> {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("bench_pruning: interrupted; the workdir keeps the last finished epoch: "
                 "rerun the same command with --resume to continue")
