"""When to prune (a validation-loss plateau) and how much (a bisection on the global threshold)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .masks import Masks


class PlateauDetector:
    """Declares a plateau after ``patience`` epochs without a validation-loss improvement
    of more than ``rel_tol`` (relative), and remembers the best state seen meanwhile."""

    def __init__(self, patience: int, rel_tol: float = 0.01) -> None:
        self.patience = patience
        self.rel_tol = rel_tol
        self.reset()

    def reset(self) -> None:
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def update(self, val_loss: float, model: nn.Module) -> bool:
        """Feed one epoch's validation loss; True when a plateau is reached."""
        if val_loss < self.best_loss * (1 - self.rel_tol) or self.best_state is None:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = copy.deepcopy(model.state_dict())
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_state": self.best_state, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_state = state["best_state"]
        self.bad_epochs = int(state["bad_epochs"])


@dataclass(frozen=True)
class ThresholdSearch:
    """The outcome of one threshold search."""

    threshold: float          # entries with |p| < threshold are pruned (0.0: nothing)
    pruned: int               # entries newly pruned
    val_loss: float           # validation loss after pruning
    val_error: float
    evaluations: int


def find_threshold(
    masks: Masks,
    evaluate: Callable[[], tuple[float, float]],
    *,
    max_loss: float,
    max_error: float = math.inf,
) -> ThresholdSearch:
    """Largest global magnitude threshold whose validation loss stays <= ``max_loss``
    (and error <= ``max_error``), found by bisection over the sorted alive magnitudes.

    ``evaluate()`` returns (val_loss, val_error) of the model as it currently is. The model
    is left pruned at the threshold found (masks updated); candidates are tried on the live
    parameters and rolled back, so no second copy of the model is needed.
    """
    alive = [p.detach()[m].abs().flatten() for _, p, m in masks]
    magnitudes = torch.sort(torch.cat(alive)).values if alive else torch.zeros(0)
    n = magnitudes.numel()
    originals = [p.detach().clone() for _, p, _ in masks]

    def try_count(k: int) -> tuple[float, float]:
        """Zero the k smallest alive entries (ties included), evaluate, and roll back."""
        t = float(magnitudes[k - 1]) if k > 0 else 0.0
        with torch.no_grad():
            for (_, p, m), orig in zip(masks, originals):
                p.copy_(orig * (m & (orig.abs() > t)))
        result = evaluate()
        with torch.no_grad():
            for (_, p, _), orig in zip(masks, originals):
                p.copy_(orig)
        return result

    def acceptable(loss: float, err: float) -> bool:
        return math.isfinite(loss) and loss <= max_loss and err <= max_error

    evaluations = 0
    lo, hi = 0, n  # invariant: pruning lo entries is acceptable; pruning more than hi is not known to be
    lo_result = evaluate()
    evaluations += 1
    # Bisection assumes the loss grows with the threshold, which holds in practice for
    # magnitude ordering; it costs about log2(n) evaluations.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        result = try_count(mid)
        evaluations += 1
        if acceptable(*result):
            lo, lo_result = mid, result
        else:
            hi = mid - 1
    if lo == 0:
        return ThresholdSearch(0.0, 0, lo_result[0], lo_result[1], evaluations)
    threshold = float(magnitudes[lo - 1])
    before, _ = masks.counts()
    with torch.no_grad():
        for _, p, m in masks:
            m &= p.abs() > threshold
    masks.apply()
    after, _ = masks.counts()
    return ThresholdSearch(threshold, before - after, lo_result[0], lo_result[1], evaluations)
