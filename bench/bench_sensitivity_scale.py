"""How far the sensitivities fall below 1, i.e. how much the shrink factor max(0, 1 - S) varies.

The regularizers shrink every parameter by ``lambda * p * max(0, 1 - S)``: a parameter is spared
only as far as its sensitivity S approaches 1. This measures, on a trained model and real MNIST
batches, the distribution of S for LOBSTER (|dL/dp|, plain cross-entropy), the output-sensitivity
bound and its exact form, and the share of parameters whose shrink is relaxed by more than 1 %
and 10 %. If almost none are, the regularizer acts as uniform weight decay ``lambda`` and
the sensitivity hardly steers which weights shrink. Results go to
``bench/results/sensitivity_scale.json``.

    python bench/bench_sensitivity_scale.py [--init bench/results/baselines/lenet5-dense-shift2.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from compressor import atomic, checkpoint  # noqa: E402
from compressor.data import load_dataset  # noqa: E402
from compressor.masks import prunable_parameters  # noqa: E402
from compressor.regularizers import LOBSTER, OutputSensitivity, SensitivityRegularizer  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def sensitivities(reg: SensitivityRegularizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """S of every non-zero prunable parameter on one batch, flattened (pruned entries stay
    zero and are not shrunk, so they do not count)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    if isinstance(reg, OutputSensitivity):
        reg.observe(out)  # its own backward passes; the loss gradient is LOBSTER's only
    else:
        nn.functional.cross_entropy(out, y).backward()
    parts = [(reg.sensitivity(name, p), p) for name, p in prunable_parameters(model)]
    return torch.cat([s.detach()[p.detach() != 0] for s, p in parts if s is not None]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5", choices=["lenet300", "lenet5"])
    ap.add_argument("--init", type=Path, default=ROOT / "bench" / "results" / "baselines" / "lenet5-dense-shift2.pt")
    ap.add_argument("--data", default=f"mnist:{MNIST}")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sensitivity_scale.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # light enough to run beside a benchmark
    data = load_dataset(args.data, seed=0)
    model = models.build(args.arch, data.input_shape, data.num_classes)
    model.load_state_dict(checkpoint.load_safely(args.init)["state_dict"])
    model.train()  # as during training (dropout, if any, included)
    named = list(prunable_parameters(model))
    variants = {
        "lobster": LOBSTER(named, 1e-4),
        "sensitivity_bound": OutputSensitivity(named, 1e-4),
        "sensitivity_exact": OutputSensitivity(named, 1e-4, exact=True),
    }
    order = torch.randperm(len(data.train.y))[: args.batches * args.batch_size].view(args.batches, -1)
    result: dict = {"arch": args.arch, "init": str(args.init.relative_to(ROOT) if args.init.is_relative_to(ROOT) else args.init),
                    "batches": args.batches, "batch_size": args.batch_size, "parameters": sum(p.numel() for _, p in named),
                    "nonzero": sum(int(torch.count_nonzero(p)) for _, p in named),
                    "variants": {}}
    for name, reg in variants.items():
        per_batch = [sensitivities(reg, model, data.train.x[idx], data.train.y[idx]) for idx in order]
        s = np.concatenate(per_batch)
        result["variants"][name] = {
            "quantiles": {str(q): float(np.quantile(s, q)) for q in QUANTILES},
            "share_relaxed_over_1pct": float((s > 0.01).mean()),    # shrink factor 1 - S below 0.99
            "share_relaxed_over_10pct": float((s > 0.1).mean()),    # below 0.9
            "share_spared": float((s >= 1).mean()),                 # not shrunk at all
        }
        v = result["variants"][name]
        print(f"{name:18s} median S {v['quantiles']['0.5']:.2e}, 99.9 % {v['quantiles']['0.999']:.2e}, max {v['quantiles']['1.0']:.2e}; "
              f"relaxed >1 %: {100 * v['share_relaxed_over_1pct']:.2f} %, >10 %: {100 * v['share_relaxed_over_10pct']:.3f} %, "
              f"spared: {100 * v['share_spared']:.3f} %")
    atomic.write_text(args.out, json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
