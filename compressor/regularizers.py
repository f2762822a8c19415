"""Sensitivity-driven shrinking, as optimizer-like objects.

Each regularizer is used like a second optimizer::

    output = model(x); loss = criterion(output, y)
    reg.observe(output)          # only regularizers that need the output (no-op for LOBSTER)
    loss.backward()
    optimizer.step()
    reg.step()                   # p <- p - lmbda * p * max(0, 1 - S(p)); pruned entries stay 0

``lmbda`` is *not* scaled by the learning rate. Because ``step()`` reads ``p.grad`` after
``backward()``, it sees the gradients DistributedDataParallel has already averaged; output
sensitivities, which DDP does not see, are averaged across ranks in ``observe()``. So the
same code runs unchanged under ``torchrun`` and every rank applies the same update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import torch
from torch import nn

from .distributed import mean_across_ranks
from .masks import Masks, prunable_parameters


class SensitivityRegularizer(ABC):
    """Shrinks every parameter in proportion to its *insensitivity* ``max(0, 1 - S)``."""

    def __init__(self, params: nn.Module | Iterable[tuple[str, nn.Parameter]], lmbda: float, masks: Masks | None = None) -> None:
        if lmbda < 0:
            raise ValueError(f"lmbda must be >= 0, got {lmbda}")
        self.named_params = prunable_parameters(params) if isinstance(params, nn.Module) else list(params)
        self.lmbda = lmbda
        self.masks = masks

    @abstractmethod
    def sensitivity(self, name: str, p: nn.Parameter) -> torch.Tensor | None:
        """S for every entry of ``p`` (same shape), or None to leave ``p`` alone this step."""

    def observe(self, output: torch.Tensor) -> None:
        """Called with the batch's logits before ``loss.backward()``; default: nothing to do."""

    @torch.no_grad()
    def step(self) -> None:
        params, sens = [], []
        for name, p in self.named_params:
            s = self.sensitivity(name, p)
            if s is not None:
                params.append(p)
                sens.append(s)
        if params:
            # Multi-tensor kernels: a handful of launches for the whole model, which keeps
            # the step cheap next to the forward/backward pass.
            shrink = torch._foreach_neg(sens)
            torch._foreach_add_(shrink, 1.0)
            torch._foreach_clamp_min_(shrink, 0.0)
            torch._foreach_mul_(shrink, params)
            torch._foreach_add_(params, shrink, alpha=-self.lmbda)
        if self.masks is not None:
            self.masks.apply()

    def state_dict(self) -> dict:
        return {"lmbda": self.lmbda}

    def load_state_dict(self, state: dict) -> None:
        self.lmbda = float(state["lmbda"])


class LOBSTER(SensitivityRegularizer):
    """Loss-based sensitivity: S = |dL/dp|, the mini-batch gradient the optimizer just used.

    No extra backward pass: the cost is one element-wise update per parameter.
    """

    def sensitivity(self, name: str, p: nn.Parameter) -> torch.Tensor | None:
        return None if p.grad is None else p.grad.abs()


class OutputSensitivity(SensitivityRegularizer):
    """Output-based sensitivity (Tartaglione et al. 2018): S = (1/C) * sum_k |d y_k / d p|.

    ``y_k`` is the batch mean of logit k. ``exact=False`` (the default) uses the bound
    S = (1/C) * |d (sum_k y_k) / d p| <= exact S, which costs one extra backward pass per
    step; ``exact=True`` costs one backward per class (batched when autograd allows), i.e.
    about C times as much, and shrinks fewer parameters because S is larger.
    """

    def __init__(self, params: nn.Module | Iterable[tuple[str, nn.Parameter]], lmbda: float, masks: Masks | None = None, *, exact: bool = False) -> None:
        super().__init__(params, lmbda, masks)
        self.exact = exact
        self._sens: dict[str, torch.Tensor] = {}

    def observe(self, output: torch.Tensor) -> None:
        names = [n for n, p in self.named_params if p.requires_grad]
        params = [p for _, p in self.named_params if p.requires_grad]
        classes = output.shape[1]
        mean_output = output.mean(0)
        if self.exact:
            grads = self._per_class_grads(mean_output, params)
            mean_across_ranks(grads)  # signed, as for the global batch
            sens = [g.abs().sum(0) / classes for g in grads]
        else:
            grads = torch.autograd.grad(mean_output.sum(), params, retain_graph=True, allow_unused=True)
            mean_across_ranks([g for g in grads if g is not None])  # signed, as for the global batch
            sens = [None if g is None else g.abs() / classes for g in grads]
        self._sens = {n: s for n, s in zip(names, sens) if s is not None}

    @staticmethod
    def _per_class_grads(mean_output: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        classes = mean_output.shape[0]
        eye = torch.eye(classes, device=mean_output.device, dtype=mean_output.dtype)
        try:
            grads = torch.autograd.grad(mean_output, params, grad_outputs=eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
        except RuntimeError:
            # Some ops have no batching rule: fall back to one backward per class.
            per_class = [torch.autograd.grad(mean_output[k], params, retain_graph=True, allow_unused=True) for k in range(classes)]
            grads = tuple(
                None if per_class[0][i] is None else torch.stack([pc[i] for pc in per_class]) for i in range(len(params))
            )
        return [torch.zeros((classes, *p.shape), device=p.device) if g is None else g for g, p in zip(grads, params)]

    def sensitivity(self, name: str, p: nn.Parameter) -> torch.Tensor | None:
        return self._sens.get(name)

    def state_dict(self) -> dict:
        return {"lmbda": self.lmbda, "exact": self.exact}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.exact = bool(state.get("exact", self.exact))
