"""Cost of one training step with a regularizer, relative to a plain SGD step.

LeNet-5 on MNIST-shaped batches of 100 (random data: the cost does not depend on the
values). Steps are timed in interleaved rounds (plain, lobster, sensitivity, plain, ...) so
that machine noise hits every variant alike; the medians and their ratios are written to
``bench/results/step_overhead.json``.

    python bench/bench_step_overhead.py [--rounds 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from compressor.masks import Masks, prunable_parameters  # noqa: E402
from compressor.regularizers import LOBSTER, OutputSensitivity  # noqa: E402


def make_step(variant: str, model: nn.Module, opt: torch.optim.Optimizer):
    masks = Masks(prunable_parameters(model))
    reg = {"lobster": LOBSTER(model, 1e-4, masks), "sensitivity": OutputSensitivity(model, 1e-4, masks)}.get(variant)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        if reg is not None:
            reg.observe(out)
        loss.backward()
        opt.step()
        if reg is not None:
            reg.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,))
    variants = ["plain", "lobster", "sensitivity"]
    steps = {}
    for v in variants:
        model = models.build("lenet5", (1, 28, 28), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[v] = make_step(v, model, opt)
        for _ in range(5):  # warm-up
            steps[v](x, y)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[v](x, y)
            times[v].append((time.perf_counter() - t0) / args.steps)
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "model": "lenet5", "batch": 100, "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
        "median_step_ms": {v: 1000 * m for v, m in medians.items()},
        "ratio_to_plain": {v: medians[v] / medians["plain"] for v in variants},
        "command": "python bench/bench_step_overhead.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for v in variants:
        print(f"{v:12s} {1000 * medians[v]:7.2f} ms/step  x{medians[v] / medians['plain']:.3f}")


if __name__ == "__main__":
    main()
