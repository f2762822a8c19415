"""Knowledge distillation: a pruned model's fine-tuning also learns the original model's outputs.

The loss of a fine-tuning batch becomes ``(1 - w) * CE(student, labels) + w * T^2 *
KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015). The softened teacher
outputs say which wrong classes an image resembles, which the labels alone do not; a small pruned
network that must win back a few tenths of a point learns from that more than from the labels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CompressError


def check_weight(weight: float, flag: str = "--finetune-distill") -> None:
    if not 0 <= weight <= 1:
        raise CompressError(f"{flag} must be in [0, 1] (the teacher's share of the loss), got {weight}")


def check_settings(weight: float, temperature: float) -> None:
    check_weight(weight)
    if not (0 < temperature < math.inf):
        raise CompressError(f"--finetune-temperature must be a positive number, got {temperature}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence from the teacher's softened distribution to the student's, averaged over the
    batch and multiplied by ``temperature**2`` so that its gradients keep the cross-entropy's
    scale whatever the temperature."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


class Distiller:
    """Blends the labels' loss with the teacher's softened outputs, batch by batch.

    The teacher is a frozen copy of the model as it was given, kept in eval mode (dropout off,
    BatchNorm on its running statistics) on the student's device."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float) -> None:
        check_settings(weight, temperature)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self.temperature = temperature

    def to(self, device: torch.device) -> "Distiller":
        self.teacher.to(device)
        return self

    def loss(self, hard_loss: torch.Tensor, inputs: torch.Tensor, student_logits: torch.Tensor,
             weight: float | None = None) -> torch.Tensor:
        """The blended loss; ``weight`` overrides the teacher's share given at construction."""
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if teacher_logits.shape != student_logits.shape:
            raise CompressError(f"distillation: the teacher's outputs have shape {tuple(teacher_logits.shape)}, the "
                                f"model's {tuple(student_logits.shape)}; the teacher must be the model that was pruned")
        soft = distillation_loss(student_logits, teacher_logits, self.temperature)
        w = self.weight if weight is None else weight
        return (1 - w) * hard_loss + w * soft
