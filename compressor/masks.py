"""Which parameters are prunable, and masks that keep pruned entries exactly zero."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights and biases of Linear, Conv and BatchNorm layers, in module order."""
    out = []
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_LAYERS):
            for pname, p in module.named_parameters(recurse=False):
                out.append((f"{module_name}.{pname}" if module_name else pname, p))
    return out


def is_weight(name: str) -> bool:
    return name.endswith("weight")


class Masks:
    """One boolean mask per prunable parameter; ``True`` means the entry is alive.

    ``apply()`` re-zeroes pruned entries; call it after every update that could revive
    them (optimizer step with momentum, regularizer step).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        self.named_params = named_params
        self.masks: dict[str, torch.Tensor] = {name: torch.ones_like(p, dtype=torch.bool) for name, p in named_params}

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        for name, p in self.named_params:
            yield name, p, self.masks[name]

    @torch.no_grad()
    def update_from_zeros(self) -> None:
        """Mark every entry that is exactly zero as pruned (it stays zero from now on)."""
        for name, p, mask in self:
            mask &= p != 0

    @torch.no_grad()
    def prune_below(self, threshold: float) -> None:
        """Prune every entry with ``|p| < threshold`` and zero it."""
        for name, p, mask in self:
            mask &= p.abs() >= threshold
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        params = [p for _, p, _ in self]
        if params:
            torch._foreach_mul_(params, [self.masks[name] for name, _ in self.named_params])

    def counts(self, weights_only: bool = False) -> tuple[int, int]:
        """(alive, total) entries."""
        alive = total = 0
        for name, _, mask in self:
            if weights_only and not is_weight(name):
                continue
            alive += int(mask.sum())
            total += mask.numel()
        return alive, total

    def sparsity(self, weights_only: bool = False) -> float:
        alive, total = self.counts(weights_only)
        return 1.0 - alive / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, mask in state.items():
            self.masks[name] = mask.to(self.masks[name].device)


def model_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero entries among the prunable parameters."""
    params = [p for _, p in prunable_parameters(model)]
    total = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    return zeros / total if total else 0.0
