"""When to prune (a validation-loss plateau) and how much (a bisection on a global threshold).

What is pruned is a :class:`Pruner`: single entries ranked by magnitude (unstructured) or
whole neurons ranked by norm or sensitivity (structured). The search is the same for both.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from .masks import Masks

if TYPE_CHECKING:
    from .structured import NeuronPruner


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


class Pruner(Protocol):
    """Ranks the surviving prunable units (weakest first) and prunes a prefix of that ranking."""

    def rank(self) -> int:
        """Recompute the ranking; returns how many units may be pruned."""

    def prune_first(self, k: int, *, permanent: bool) -> float:
        """Zero the ``k`` weakest units; returns the criterion value of the last one.
        With ``permanent=False`` the masks are left unchanged so :meth:`restore` can undo it."""

    def restore(self) -> None:
        """Undo a non-permanent :meth:`prune_first`."""

    def pruned_count(self) -> int:
        """Pruned units so far (for progress reports)."""


class EntryPruner:
    """Unstructured: single parameter entries, ranked by magnitude across all layers."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks
        self._magnitudes = torch.zeros(0)
        self._saved: list[torch.Tensor] = []

    def rank(self) -> int:
        alive = [p.detach()[m].abs().flatten().cpu() for _, p, m in self.masks]
        self._magnitudes = torch.sort(torch.cat(alive)).values if alive else torch.zeros(0)
        self._saved = [p.detach().clone() for _, p, _ in self.masks]
        return self._magnitudes.numel()

    def prune_first(self, k: int, *, permanent: bool) -> float:
        t = float(self._magnitudes[k - 1]) if k > 0 else 0.0
        with torch.no_grad():
            for (_, p, m), orig in zip(self.masks, self._saved):
                keep = m & (orig.abs() > t)
                if permanent:
                    m.copy_(keep)
                p.copy_(orig * keep)
        return t

    def restore(self) -> None:
        with torch.no_grad():
            for (_, p, _), orig in zip(self.masks, self._saved):
                p.copy_(orig)

    def pruned_count(self) -> int:
        alive, total = self.masks.counts()
        return total - alive


@dataclass(frozen=True)
class ThresholdSearch:
    """The outcome of one threshold search."""

    threshold: float          # the criterion value of the last unit pruned (0.0: nothing pruned)
    pruned: int               # units newly pruned
    val_loss: float           # validation loss after pruning
    val_error: float
    evaluations: int


def _within(loss: float, err: float, max_loss: float, max_error: float) -> bool:
    return math.isfinite(loss) and loss <= max_loss and err <= max_error


def find_threshold(
    pruner: Pruner | Masks,
    evaluate: Callable[[], tuple[float, float]],
    *,
    max_loss: float,
    max_error: float = math.inf,
) -> ThresholdSearch:
    """Largest global threshold whose validation loss stays <= ``max_loss`` (and error
    <= ``max_error``), found by bisection over the ranked surviving units.

    ``evaluate()`` returns (val_loss, val_error) of the model as it currently is. The model is
    left pruned at the threshold found. Candidates are tried on the live parameters and
    rolled back, so no second copy of the model is needed. Bisection assumes the loss grows
    with the threshold, which holds in practice for magnitude rankings; it costs about
    log2(units) evaluations.
    """
    if isinstance(pruner, Masks):
        pruner = EntryPruner(pruner)
    n = pruner.rank()

    def acceptable(loss: float, err: float) -> bool:
        return _within(loss, err, max_loss, max_error)

    lo_result = evaluate()
    evaluations = 1
    lo, hi = 0, n  # pruning lo units is acceptable; more than hi is not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        pruner.prune_first(mid, permanent=False)
        result = evaluate()
        pruner.restore()
        evaluations += 1
        if acceptable(*result):
            lo, lo_result = mid, result
        else:
            hi = mid - 1
    if lo == 0:
        return ThresholdSearch(0.0, 0, lo_result[0], lo_result[1], evaluations)
    before = pruner.pruned_count()
    threshold = pruner.prune_first(lo, permanent=True)
    return ThresholdSearch(threshold, pruner.pruned_count() - before, lo_result[0], lo_result[1], evaluations)


def align_widths(
    pruner: NeuronPruner,
    evaluate: Callable[[], tuple[float, float]],
    multiple: int,
    *,
    max_loss: float,
    max_error: float = math.inf,
) -> int:
    """Bring layer widths down to multiples of ``multiple`` where the model can afford it.

    For each layer whose width is above a multiple (most MACs saved first), its excess
    neurons, the weakest of the layer, are pruned all together if validation loss and error
    then stay within the bounds, and left alone otherwise: part of the excess would not make
    the layer any cheaper on blocked kernels. Returns the neurons pruned."""
    pruned = 0
    for layer, excess in pruner.misaligned(multiple):
        if pruner.rank_layer(layer, excess) < excess:
            continue
        pruner.prune_first(excess, permanent=False)
        result = evaluate()
        pruner.restore()
        if _within(*result, max_loss, max_error):
            pruner.prune_first(excess, permanent=True)
            pruned += excess
    return pruned
