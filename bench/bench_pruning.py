"""Unstructured pruning on real MNIST: lobster vs sensitivity vs magnitude.

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
from compressor.methods import PruningConfig, make  # noqa: E402
from compressor.train import Trainer, TrainConfig, evaluate  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def layer_counts(model: torch.nn.Module) -> list[dict]:
    return [
        {"name": name, "shape": list(p.shape), "params": p.numel(), "nonzero": int(torch.count_nonzero(p))}
        for name, p in prunable_parameters(model)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=["lenet300", "lenet5"])
    ap.add_argument("--method", required=True, choices=["lobster", "sensitivity", "magnitude"])
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "pruning")
    args = ap.parse_args()
    for key, value in default_recipe(args.method).items():
        if key != "epochs" and getattr(args, key) is None:
            setattr(args, key, value)

    torch.set_num_threads(1)  # two runs share the 2-core machine
    data = load_dataset(args.data, seed=args.seed)
    torch.manual_seed(args.seed)
    model = models.build(args.arch, data.input_shape, data.num_classes)
    if args.init is not None:
        model.load_state_dict(checkpoint.load_safely(args.init)["state_dict"])
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                            lr_schedule=args.lr_schedule, plateau_patience=args.lr_patience, seed=args.seed,
                            device="cpu", max_seconds=60 * args.minutes)
    prune_cfg = PruningConfig(lmbda=args.lmbda, pwe=args.pwe, twt=args.twt, max_error_increase=args.max_error_increase)
    name = f"{args.arch}-{args.method}" + (f"-{args.tag}" if args.tag else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{name}.json"
    plugin = make(args.method, prune_cfg)
    log = open(args.out_dir / f"{name}.log", "w", buffering=1)
    trainer = Trainer(model, data, train_cfg, workdir=args.out_dir / f"{name}.work", plugin=plugin, progress=False,
                      log=lambda s: print(s, file=log))
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
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
        "command": "python bench/bench_pruning.py " + " ".join(sys.argv[1:]),
        "train_config": asdict(train_cfg),
        "pruning_config": asdict(prune_cfg),
        "init": str(args.init) if args.init else "scratch",
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
        "history": result.history,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"{name}: {100 * record['selected']['pruned_fraction']:.3f} % pruned ({record['selected']['compression']:.1f}x), "
          f"test error {100 * test_err:.2f} %, {wall / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
