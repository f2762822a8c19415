"""Pruning methods as training plugins: a regularizer plus the shared threshold schedule.

``lobster``      LOBSTER regularizer (loss sensitivity) + plateau/bisection thresholding
``sensitivity``  output-sensitivity regularizer (Tartaglione et al. 2018) + the same schedule
``magnitude``    no regularizer (plain SGD, L2 weight decay) + the same schedule: iterative
                 global magnitude pruning with fine-tuning between prunes (Han et al. 2015)
``serene``       SeReNe: neuron-sensitivity regularizer + the same schedule over whole
                 neurons (structured)
``none``         plain training; no plugin
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from . import distill
from .errors import CompressError
from .masks import Masks, prunable_parameters
from .regularizers import LOBSTER, OutputSensitivity
from .structured import NeuronPruner, SeReNe, find_neurons
from .thresholding import EntryPruner, PlateauDetector, Pruner, align_widths, find_threshold

UNSTRUCTURED = ("lobster", "sensitivity", "magnitude")
NEURON_CRITERIA = ("norm", "sensitivity", "both")
FINETUNE_SCHEDULES = ("plateau", "cosine")
STRUCTURED = ("serene",)
METHODS = UNSTRUCTURED + STRUCTURED


@dataclass
class PruningConfig:
    """Settings shared by the unstructured methods. Defaults work on MNIST-sized problems."""

    lmbda: float = 1e-4               # shrink strength per step (not scaled by the learning rate)
    pwe: int = 5                      # plateau: epochs without > 1 % validation-loss improvement
    twt: float = 0.05                 # threshold search: validation loss may grow by this factor
    # Validation error may exceed the first plateau's by this much (absolute). None: 0.5 points,
    # or two validation samples' worth where the validation set is too small to resolve that.
    max_error_increase: float | None = None
    target_sparsity: float | None = None  # stop once this share of prunable parameters is zero
    exact: bool = False               # output sensitivity: exact per-class form instead of the bound
    stall_limit: int = 5              # stop after this many plateaus in a row that pruned nothing
    # When `anneal_after` plateaus in a row prune nothing, divide the learning rate and lambda by
    # 10 (at most `anneals` times) before giving up: the same regularized objective with less SGD
    # noise. Measured to help serene and hurt lobster (docs/results.md); the CLI picks per method.
    anneals: int = 0
    anneal_after: int = 2
    min_width: int = 1                # serene: neurons every layer keeps
    # serene: rank neurons by parameter norm ("norm"), by "sensitivity", or "both": at each
    # plateau a search by sensitivity, then one by norm, under the same bounds
    neuron_criterion: str = "norm"
    # serene: divide the criterion by the multiply-accumulates removing the neuron saves
    rank_per_mac: bool = False
    # serene: at each plateau, after the searches, also try to bring every layer's width down to
    # a multiple of this (8: AVX2 blocked convolutions, 16: AVX-512); 1: off
    width_multiple: int = 1
    # serene: divide sensitivities by the largest live one of their layer before shrinking
    rescale_sensitivity: bool = False
    prune_inputs: bool = True         # serene: input features are units too, where the input goes into a Linear
    # Once pruning stops (its own rule or the time/epoch budget), train the selected model this
    # many more epochs, masks fixed and no regularizer, to win back what the last prunes cost.
    # The budgets do not cover it.
    finetune_epochs: int = 0
    # Default: a tenth of the run's starting learning rate, not of the current one, which
    # anneals and the plateau schedule may have made too small to train anything.
    finetune_lr: float | None = None
    # Default: the training momentum. The papers' pruning recipe is plain SGD; a fine-tuning
    # phase that only trains a fixed sparse network can take the heavy-ball recipe instead.
    finetune_momentum: float | None = None
    # "plateau": the run's own learning-rate schedule, restarted; "cosine": from the fine-tuning
    # lr down to zero over the fine-tuning epochs, so that the last epochs, not a noisy one
    # among them, are what validation picks from.
    finetune_schedule: str = "plateau"
    # Knowledge distillation while fine-tuning: the share of the loss given to matching the
    # softened outputs of the model as it was before pruning (0: labels only), and the softening
    # temperature. Needs that model to be trained (see compressor.distill).
    finetune_distill: float = 0.0
    finetune_temperature: float = 4.0
    # The same distillation while pruning (0: off): the regularizer then reads the gradient of
    # the blended loss, so the shrinking spares what the teacher's outputs need as well.
    prune_distill: float = 0.0

    def validate(self) -> None:
        if self.lmbda < 0:
            raise CompressError(f"--lambda must be >= 0, got {self.lmbda}")
        if self.pwe < 1:
            raise CompressError(f"--pwe must be >= 1, got {self.pwe}")
        if self.twt < 0:
            raise CompressError(f"--twt must be >= 0, got {self.twt}")
        if self.max_error_increase is not None and self.max_error_increase < 0:
            raise CompressError(f"--max-error-increase must be >= 0, got {self.max_error_increase}")
        if self.target_sparsity is not None and not 0 < self.target_sparsity < 1:
            raise CompressError(f"--target-sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.stall_limit < 1:
            raise CompressError(f"--stall-limit must be >= 1, got {self.stall_limit}")
        if self.min_width < 1:
            raise CompressError(f"--min-width must be >= 1, got {self.min_width}")
        if self.width_multiple < 1:
            raise CompressError(f"--width-multiple must be >= 1, got {self.width_multiple}")
        if self.anneals < 0:
            raise CompressError(f"--anneals must be >= 0, got {self.anneals}")
        if self.anneal_after < 1:
            raise CompressError(f"--anneal-after must be >= 1, got {self.anneal_after}")
        if self.finetune_epochs < 0:
            raise CompressError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_lr is not None and not (0 < self.finetune_lr < math.inf):
            raise CompressError(f"--finetune-lr must be a positive number, got {self.finetune_lr}")
        if self.finetune_momentum is not None and not (0 <= self.finetune_momentum < 1):
            raise CompressError(f"--finetune-momentum must be in [0, 1), got {self.finetune_momentum}")
        if self.finetune_schedule not in FINETUNE_SCHEDULES:
            raise CompressError(f"--finetune-schedule must be one of {', '.join(FINETUNE_SCHEDULES)}, got {self.finetune_schedule!r}")
        distill.check_settings(self.finetune_distill, self.finetune_temperature)
        distill.check_weight(self.prune_distill, "--prune-distill")
        if self.finetune_distill > 0 and self.finetune_epochs == 0:
            raise CompressError("--finetune-distill acts during the fine-tuning: give --finetune-epochs too")
        if self.neuron_criterion not in NEURON_CRITERIA:
            raise CompressError(f"--neuron-criterion must be one of {', '.join(NEURON_CRITERIA)}, got {self.neuron_criterion!r}")


class ThresholdPruning:
    """Training plugin: shrink with a regularizer every step; prune at validation plateaus.

    ``example_input`` (one batch of inputs) is needed by ``serene`` to trace the model's
    neurons; ``teacher`` (the trained model before pruning, of which a frozen copy is kept) by
    ``finetune_distill`` and ``prune_distill``."""

    def __init__(self, name: str, config: PruningConfig, example_input: torch.Tensor | None = None,
                 teacher: nn.Module | None = None) -> None:
        config.validate()
        self.distiller: distill.Distiller | None = None
        if config.finetune_distill > 0 or config.prune_distill > 0:
            if teacher is None:
                raise CompressError("distillation (--finetune-distill, --prune-distill) needs the trained model "
                                    "before pruning to learn from")
            self.distiller = distill.Distiller(copy.deepcopy(teacher), config.finetune_distill, config.finetune_temperature)
        self.name = name
        self.config = config
        self.example_input = example_input
        self.pruner: Pruner | None = None
        self.detector = PlateauDetector(config.pwe)
        self.reference_error: float | None = None
        self.allowance = 0.0
        self.stalled = 0
        self.prunes = 0
        self.annealed = 0
        # Host seconds spent on pruning work (sensitivity passes, regularizer steps, threshold
        # searches), the part of the training time that plain training would not spend.
        self.seconds = 0.0
        # Fine-tuning: epochs left (None: not started) and why pruning stopped.
        self.finetune_left: int | None = None
        self.stop_reason: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.masks: Masks | None = None
        self.regularizer: Any = None
        self.model: nn.Module | None = None

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        if self.distiller is not None:
            self.distiller.to(next(model.parameters()).device)
        named = prunable_parameters(model)
        self.masks = Masks(named)
        self.masks.update_from_zeros()  # entries already zero in a given checkpoint stay pruned
        if self.name == "serene":
            if self.example_input is None:
                raise CompressError("serene needs an example input to find the model's neurons")
            device = next(model.parameters()).device
            neurons = find_neurons(model, self.example_input.to(device), inputs=self.config.prune_inputs)
            self.regularizer = SeReNe(model, neurons, self.config.lmbda, self.masks, exact=self.config.exact,
                                      rescale=self.config.rescale_sensitivity)
            self.pruner = NeuronPruner(neurons, self.masks, min_width=self.config.min_width,
                                       per_mac=self.config.rank_per_mac)
            self.regularizer.alive = self.pruner.alive
            return
        if self.name == "lobster":
            self.regularizer = LOBSTER(named, self.config.lmbda, self.masks)
        elif self.name == "sensitivity":
            self.regularizer = OutputSensitivity(named, self.config.lmbda, self.masks, exact=self.config.exact)
        self.pruner = EntryPruner(self.masks)

    def detach(self) -> None:
        """Remove anything the method hooked into the model; call once training is over."""
        if isinstance(self.regularizer, SeReNe):
            self.regularizer.remove_hooks()

    @property
    def finishing(self) -> bool:
        """In the final fine-tuning phase: no regularizer, no pruning, masks fixed."""
        return self.finetune_left is not None

    def after_forward(self, output: torch.Tensor) -> None:
        if self.regularizer is not None and not self.finishing:
            t0 = time.perf_counter()
            self.regularizer.observe(output)
            self.seconds += time.perf_counter() - t0

    def training_loss(self, loss: torch.Tensor, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """With distillation in the current phase: the labels' loss blended with the teacher's."""
        weight = self.config.finetune_distill if self.finishing else self.config.prune_distill
        if self.distiller is not None and weight > 0:
            return self.distiller.loss(loss, inputs, output, weight=weight)
        return loss

    def after_step(self) -> None:
        t0 = time.perf_counter()
        if self.regularizer is not None and not self.finishing:
            self.regularizer.step()  # re-applies the masks
        else:
            self.masks.apply()
        self.seconds += time.perf_counter() - t0

    # -- schedule ------------------------------------------------------------------------------
    def sparsity(self) -> float:
        return self.masks.sparsity()

    def error_cap(self) -> float:
        return math.inf if self.reference_error is None else self.reference_error + self.allowance

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"threshold": None}
        if self.finishing:
            self.finetune_left -= 1
            extra["finetune"] = True
            if self.config.finetune_schedule == "cosine":
                done = self.config.finetune_epochs - self.finetune_left
                lr = self._finetune_lr(trainer) * 0.5 * (1 + math.cos(math.pi * done / self.config.finetune_epochs))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                extra["restart_lr_plateau"] = True  # this schedule alone sets the rate
        elif self.detector.update(metrics["val_loss"], self.model):
            t0 = time.perf_counter()
            extra.update(self._prune(trainer))
            self.seconds += time.perf_counter() - t0
        extra["sparsity"] = self.sparsity()
        extra["weight_sparsity"] = self.masks.sparsity(weights_only=True)
        if isinstance(self.pruner, NeuronPruner):
            extra["neurons"] = self.pruner.remaining_per_layer()
        return extra

    def _prune(self, trainer: Any) -> dict[str, Any]:
        self.model.load_state_dict(self.detector.best_state)  # back to the plateau's best point
        ref_loss, ref_err = trainer.evaluate(trainer.data.val)
        if self.reference_error is None:
            # The error allowance is anchored to the model at the first plateau, so that it
            # does not compound from prune to prune the way a loss bound alone does.
            self.reference_error = ref_err
            self.allowance = allowed_error_increase(self.config.max_error_increase, len(trainer.data.val))
        pruned, threshold = 0, 0.0
        for ranking in self._rankings():
            search = find_threshold(
                self.pruner,
                lambda: trainer.evaluate(trainer.data.val),
                max_loss=(1 + self.config.twt) * ref_loss,
                max_error=self.error_cap(),
            )
            pruned += search.pruned
            threshold = search.threshold if search.pruned else threshold
        aligned, fading = 0, 0
        if isinstance(self.pruner, NeuronPruner) and self.config.width_multiple > 1:
            # Within a layer, the neurons to go are the weakest by the method's own criterion.
            self.pruner.by_sensitivity = None if self.config.neuron_criterion == "norm" else self.regularizer
            aligned = align_widths(self.pruner, lambda: trainer.evaluate(trainer.data.val),
                                   self.config.width_multiple, max_loss=(1 + self.config.twt) * ref_loss,
                                   max_error=self.error_cap())
            pruned += aligned
            # What could not go yet is phased out by the regularizer until a later plateau can remove it.
            excess = self.pruner.excess(self.config.width_multiple)
            self.regularizer.fading = excess if bool(excess.any()) else None
            fading = int(excess.sum())
        val_loss, val_error = trainer.evaluate(trainer.data.val) if aligned else (search.val_loss, search.val_error)
        self.detector.reset()
        self.prunes += 1
        self.stalled = 0 if pruned else self.stalled + 1
        annealed = self._maybe_anneal()
        test_loss, test_err = trainer.evaluate(trainer.data.test)
        return {
            "annealed": annealed,
            "threshold": threshold,
            "pruned_now": pruned,
            **({"aligned": aligned} if aligned else {}),
            **({"fading": fading} if fading else {}),
            "val_loss": val_loss,
            "val_error": val_error,
            "test_loss": test_loss,
            "test_error": test_err,
            "restart_lr_plateau": True,
        }

    def _rankings(self) -> Iterator[str]:
        """Point the neuron pruner at each ranking this plateau searches in turn (entry pruners
        have one). All searches of a plateau are bounded by the same reference loss and error, so
        together they degrade the model no more than one search would.

        With ``rank_per_mac`` each criterion is searched per MAC first, then alone: a bisection
        only prunes a prefix of its ranking, so once the costliest channel at the head of the
        per-MAC ranking cannot go, cheap near-dead neurons further down would never be reached."""
        if not isinstance(self.pruner, NeuronPruner):
            yield "magnitude"
            return
        criteria = ("sensitivity", "norm") if self.config.neuron_criterion == "both" else (self.config.neuron_criterion,)
        try:
            for criterion in criteria:
                self.pruner.by_sensitivity = self.regularizer if criterion == "sensitivity" else None
                if self.config.rank_per_mac:
                    self.pruner.per_mac = True
                    yield f"{criterion} per MAC"
                    self.pruner.per_mac = False
                yield criterion
        finally:  # also when a search raises: the pruner keeps the configured ranking
            self.pruner.per_mac = self.config.rank_per_mac

    def _maybe_anneal(self) -> bool:
        """Divide the learning rate and lambda by 10 once pruning has stalled long enough."""
        if self.stalled < self.config.anneal_after or self.annealed >= self.config.anneals:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.1  # magnitude's L2 term scales with it, being part of the optimizer
        if self.regularizer is not None:
            self.regularizer.lmbda *= 0.1
        self.annealed += 1
        self.stalled = 0
        return True

    def selection_key(self, metrics: dict[str, Any]) -> tuple[float, ...] | None:
        """The sparsest model whose validation error is within the allowed increase wins."""
        if metrics["val_error"] > self.error_cap():
            return None
        return (-round(metrics.get("sparsity", 0.0), 6), metrics["val_error"], metrics["val_loss"])

    def before_stop(self, trainer: Any, reason: str) -> bool:
        """Start fine-tuning the selected model instead of stopping (if asked for)."""
        if self.config.finetune_epochs == 0 or self.finishing:
            return False
        if trainer.best_state is not None:
            self.model.load_state_dict(trainer.best_state)
        with torch.no_grad():  # the selected model's zeros are what stays pruned
            for name, p, m in self.masks:
                m.copy_(p != 0)
        if isinstance(self.pruner, NeuronPruner):
            self.pruner.alive.copy_(self.pruner.alive_from_masks())
        for group in self.optimizer.param_groups:
            group["lr"] = self._finetune_lr(trainer)
            if self.config.finetune_momentum is not None:
                group["momentum"] = self.config.finetune_momentum
        self.optimizer.state.clear()  # momentum gathered on the pruned-further model
        trainer.restart_lr_plateau()  # judge the fine-tuning by its own epochs, not the pruning's last bad ones
        self.finetune_left = self.config.finetune_epochs
        self.stop_reason = reason
        trainer.log(f"{reason}: fine-tuning the selected model (epoch {trainer.best_epoch}) for "
                    f"{self.config.finetune_epochs} epochs at lr {self.optimizer.param_groups[0]['lr']:.3g}, "
                    f"momentum {self.optimizer.param_groups[0].get('momentum', 0):.3g}"
                    + (", cosine to 0" if self.config.finetune_schedule == "cosine" else "")
                    + (f", distilling from the model before pruning (weight {self.config.finetune_distill:.3g}, "
                       f"temperature {self.distiller.temperature:.3g})" if self.config.finetune_distill > 0 else ""))
        return True

    def _finetune_lr(self, trainer: Any) -> float:
        """The learning rate fine-tuning starts at."""
        return 0.1 * trainer.config.lr if self.config.finetune_lr is None else self.config.finetune_lr

    def should_stop(self) -> str | None:
        if self.finishing:
            if self.finetune_left > 0:
                return None
            return f"{self.stop_reason}; then {self.config.finetune_epochs} fine-tuning epochs"
        target = self.config.target_sparsity
        if target is not None and self.sparsity() >= target:
            return f"target sparsity {100 * target:.2f} % reached"
        if self.stalled >= self.config.stall_limit and self.annealed >= self.config.anneals:
            return f"{self.stalled} plateaus in a row pruned nothing within the tolerance"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "detector": self.detector.state_dict(),
            "reference_error": self.reference_error,
            "allowance": self.allowance,
            "stalled": self.stalled,
            "prunes": self.prunes,
            "annealed": self.annealed,
            "seconds": self.seconds,
            "finetune_left": self.finetune_left,
            "stop_reason": self.stop_reason,
            "regularizer": self.regularizer.state_dict() if self.regularizer else None,
            "alive_neurons": self.pruner.alive.clone() if isinstance(self.pruner, NeuronPruner) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.detector.load_state_dict(state["detector"])
        self.reference_error = state["reference_error"]
        self.allowance = float(state.get("allowance", 0.0))
        self.stalled = int(state["stalled"])
        self.prunes = int(state["prunes"])
        self.annealed = int(state.get("annealed", 0))
        self.seconds = float(state.get("seconds", 0.0))
        self.finetune_left = state.get("finetune_left")
        self.stop_reason = state.get("stop_reason")
        if self.regularizer is not None and state.get("regularizer"):
            self.regularizer.load_state_dict(state["regularizer"])
        if isinstance(self.pruner, NeuronPruner) and state.get("alive_neurons") is not None:
            self.pruner.alive = state["alive_neurons"].clone()
            self.regularizer.alive = self.pruner.alive

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)


def allowed_error_increase(requested: float | None, val_size: int) -> float:
    """The error allowance: as requested, or by default 0.5 points but never less than two
    validation samples (below that, the allowance is smaller than the set can measure)."""
    if requested is not None:
        return requested
    return max(0.005, 2.0 / val_size) if val_size else 0.005


def make(method: str, config: PruningConfig | None = None, example_input: torch.Tensor | None = None,
         teacher: nn.Module | None = None) -> ThresholdPruning | None:
    """The training plugin for ``method`` (None for ``none``)."""
    if method == "none":
        return None
    if method in METHODS:
        return ThresholdPruning(method, config or PruningConfig(), example_input, teacher)
    raise CompressError(f"unknown method {method!r}; choose one of none, {', '.join(METHODS)}")
