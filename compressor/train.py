"""The training loop: in-memory batches, per-epoch evaluation, atomic checkpoints, exact resume.

Pruning methods plug in through :class:`TrainingPlugin` (a regularizer ``step()`` after every
optimizer step, and an end-of-epoch decision such as pruning at a plateau); plain training
uses no plugin.

Under ``torchrun`` every rank trains on its share of each batch inside DistributedDataParallel;
rank 0 alone evaluates, decides (plateaus, thresholds, selection, stopping) and writes the
checkpoints, then sends its whole training state to the other ranks.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .atomic import atomic_path
from .augment import check_shiftable, random_shift
from .data import Dataset, Split
from .errors import CompressError

LR_SCHEDULES = ("plateau", "cosine", "constant")
PRUNED_STATE = "pruned.pt"  # in the workdir: the training state when pruning stopped and fine-tuning began


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow the LOBSTER/SeReNe papers' MNIST recipe."""

    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 100
    eval_batch_size: int = 1000
    lr_schedule: str = "plateau"
    plateau_patience: int = 10
    seed: int = 0
    device: str = "auto"
    max_seconds: float | None = None   # wall-clock budget for this call to fit()
    shift: int = 0                     # augmentation: random translation of training images, pixels

    def validate(self) -> None:
        if self.epochs < 0:
            raise CompressError(f"--epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CompressError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise CompressError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise CompressError("--nesterov needs --momentum > 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise CompressError("--batch-size must be >= 1")
        if self.shift < 0:
            raise CompressError(f"--shift must be >= 0 pixels, got {self.shift}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise CompressError(f"unknown learning-rate schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable explicit device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise CompressError(f"unknown device {name!r}; use cpu, cuda or auto") from exc


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 1000, device: torch.device | None = None) -> tuple[float, float]:
    """Mean cross-entropy loss and top-1 error rate of ``model`` on ``split``."""
    if len(split) == 0:
        return float("nan"), float("nan")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, wrong = 0.0, 0
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device, non_blocking=True)
        y = split.y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
    model.train(was_training)
    return total_loss / len(split), wrong / len(split)


class TrainingPlugin(Protocol):
    """What a pruning method adds to the loop (see :mod:`compressor.methods`)."""

    name: str

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once, after the model is on its device."""

    def after_forward(self, output: torch.Tensor) -> None:
        """Runs before ``loss.backward()`` with the batch's logits (graph alive)."""

    def training_loss(self, loss: torch.Tensor, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The loss to minimise for this batch, given the labels' cross-entropy ``loss`` (optional;
        distillation blends in a teacher's outputs)."""

    def after_step(self) -> None:
        """Runs right after ``optimizer.step()``: the regularizer step and the masks."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> dict[str, Any]:
        """Runs after evaluation; returns metrics to merge into the history (sparsity,
        threshold; re-measured errors when it pruned; ``restart_lr_plateau``)."""

    def selection_key(self, metrics: dict[str, Any]) -> tuple[float, ...] | None:
        """Lower is better; None if this epoch's model may not be selected."""

    def should_stop(self) -> str | None:
        """A reason to stop training early, or None."""

    def before_stop(self, trainer: "Trainer", reason: str) -> bool:
        """Training is about to stop for ``reason`` (the plugin's own, or a budget): True to
        go on with a final phase instead, which then ends through :meth:`should_stop`; the
        time and epoch budgets no longer apply while :attr:`finishing` is true."""

    finishing: bool

    def detach(self) -> None:
        """Training is over: remove anything hooked into the model."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_error: float
    stopped_because: str
    wall_seconds: float
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


class TrainingDiverged(CompressError):
    """The loss became NaN or infinite."""


class Trainer:
    """Train ``model`` on ``data`` with SGD, evaluating validation and test error every epoch.

    Writes ``workdir/last.pt`` (full state, for ``resume``) atomically after every epoch and
    ``workdir/best.pt`` whenever the selection rule (lowest validation error, ties broken by
    validation loss; a plugin can veto) finds a better model.

    Inside a torch.distributed job (``torchrun``) the model trains under DistributedDataParallel,
    each rank on its slice of every global batch of ``batch_size``; see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: TrainConfig,
        *,
        workdir: str | os.PathLike[str] | None = None,
        plugin: TrainingPlugin | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        check_shiftable(data.input_shape, config.shift)
        self.config = config
        self.data = data
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        # DDP averages the gradients across ranks; building it also copies rank 0's weights to all.
        self.net: nn.Module = self._distributed(self.model) if self.world > 1 else self.model
        self.workdir = Path(workdir) if workdir is not None else None
        self.plugin = plugin
        self.progress = progress and self.is_main
        self.log = (log or (lambda msg: tqdm.write(msg))) if self.is_main else (lambda msg: None)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        self.scheduler = self._make_scheduler()
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] = {}
        self.initial_val_error = float("nan")  # of the model before training: epoch 0
        if plugin is not None and hasattr(plugin, "attach"):
            plugin.attach(self.model, self.optimizer)

    # -- setup -------------------------------------------------------------------------
    def _distributed(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _make_scheduler(self) -> Any:
        if self.config.lr_schedule == "plateau":
            # threshold=0 as in the papers' code: any improvement counts.
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=0.1, patience=self.config.plateau_patience, threshold=0.0
            )
        if self.config.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.config.epochs))
        return None

    def restart_lr_plateau(self, best: float = math.inf) -> None:
        """Make the plateau schedule (if any) judge the coming epochs against ``best`` only."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.best, self.scheduler.num_bad_epochs, self.scheduler.cooldown_counter = best, 0, 0

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, split: Split) -> tuple[float, float]:
        return evaluate(self.model, split, batch_size=self.config.eval_batch_size, device=self.device)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "compress-training-state/1",
            "epoch": self.epoch,
            "config": asdict(self.config),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": self.history,
            "best_key": list(self.best_key) if self.best_key else None,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "initial_val_error": self.initial_val_error,
            "plugin": self.plugin.state_dict() if self.plugin is not None and hasattr(self.plugin, "state_dict") else None,
            "data_fingerprint": self.data.test.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "compress-training-state/1":
            raise CompressError("the resume file is not a training state written by this tool")
        if state.get("data_fingerprint") != self.data.test.fingerprint():
            raise CompressError("--resume: the checkpoint was trained on different data; use the same --data and --seed")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_key = tuple(state["best_key"]) if state.get("best_key") else None
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.initial_val_error = float(state.get("initial_val_error", float("nan")))
        if self.plugin is not None and state.get("plugin") is not None:
            self.plugin.load_state_dict(state["plugin"])

    def resume(self, name: str = "last.pt") -> bool:
        """Continue from ``workdir/name`` if it exists. Returns whether it did."""
        if self.workdir is None:
            raise CompressError(f"--resume needs a --workdir that holds {name}")
        path = self.workdir / name
        state, error = None, None
        if self.is_main and path.exists():  # rank 0 reads; the others get the state from it
            try:
                state = checkpoint.load_safely(path)
            except CompressError as exc:
                if self.world == 1:
                    raise
                error = str(exc)
        state, error = distributed.broadcast_object((state, error))
        if error is not None:
            raise CompressError(error)
        if state is None:
            return False
        self.load_state_dict(state)
        self.log(f"resumed from {path} at epoch {self.epoch}")
        return True

    def finetune_again(self) -> None:
        """Go back to the state pruning stopped in (``workdir/pruned.pt``, kept when a run's
        fine-tuning began) and start the fine-tuning anew with the plugin's current settings;
        ``fit()`` then runs it."""
        before_stop = getattr(self.plugin, "before_stop", None)
        if before_stop is None or not getattr(getattr(self.plugin, "config", None), "finetune_epochs", 0):
            raise CompressError("fine-tuning again needs a pruning method and --finetune-epochs > 0")
        if not self.resume(PRUNED_STATE):
            raise CompressError(f"no {self.workdir / PRUNED_STATE}: only a run that reached its fine-tuning "
                                "(--finetune-epochs) keeps the state pruning stopped in")
        before_stop(self, "pruning had stopped")

    def _keep_pruned_state(self) -> None:
        """Copy ``last.pt``, which still holds the state pruning stopped in, for ``finetune_again``."""
        if self.workdir is None or not self.is_main:
            return
        with atomic_path(self.workdir / PRUNED_STATE) as tmp:
            shutil.copyfile(self.workdir / "last.pt", tmp)

    def _follow_main(self, reason: str | None = None, failure: Exception | None = None) -> str | None:
        """Distributed: give every rank rank 0's training state and stop decision (or its error)."""
        if self.world == 1:
            return reason
        # On CPU: a CUDA tensor would be unpickled onto rank 0's GPU on every rank.
        payload = (None if failure else _on_cpu(self.state_dict()), reason, failure and str(failure)) if self.is_main else None
        state, reason, error = distributed.broadcast_object(payload)
        if error is not None:
            if failure is not None:
                raise failure
            raise CompressError(f"rank 0 stopped: {error}")
        if not self.is_main:
            self.load_state_dict(state)
        return reason

    def _save(self) -> None:
        if self.workdir is None or not self.is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.state_dict(), self.workdir / "last.pt")

    # -- training ------------------------------------------------------------------------
    def _train_one_epoch(self) -> tuple[float, float]:
        cfg = self.config
        train = self.data.train
        # Seeding from (seed, epoch) makes a resumed run draw the same batches and dropout
        # masks as an uninterrupted one, without storing RNG state.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(train), generator=generator)
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = range(0, len(train), cfg.batch_size)
        training_loss = getattr(self.plugin, "training_loss", None)
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, disable=not self.progress, unit="batch")
        for batch_index, start in enumerate(bar):
            idx = order[start : start + cfg.batch_size]
            if self.world > 1:
                if len(idx) < self.world:
                    continue  # a tail batch too small to give every rank a sample: skipped on all ranks
                idx = idx[self.rank :: self.world]
            x = random_shift(train.x[idx].to(self.device, non_blocking=True), cfg.shift, generator)
            y = train.y[idx].to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            output = self.net(x)
            loss = nn.functional.cross_entropy(output, y)
            if training_loss is not None:
                loss = training_loss(loss, x, output)
            # Agreed across ranks (a no-op alone), so every rank stops and none hangs.
            if not distributed.all_ranks(bool(torch.isfinite(loss)), self.device):
                where = f"epoch {self.epoch + 1}, batch {batch_index + 1}"
                kept = f"; the last good state is in {self.workdir / 'last.pt'}" if self.workdir else ""
                value = f"the loss became {loss.item()}" if self.world == 1 else "the loss became non-finite on a rank"
                raise TrainingDiverged(f"training diverged: {value} at {where}{kept}; lower --lr and retry")
            if self.plugin is not None:
                self.plugin.after_forward(output)
            loss.backward()
            self.optimizer.step()
            if self.plugin is not None:
                self.plugin.after_step()
            total_loss += loss.item() * len(idx)
            correct += (output.argmax(1) == y).sum().item()
            seen += len(idx)
            if batch_index % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        total_loss, correct, seen = distributed.sum_across_ranks([total_loss, correct, seen], self.device)
        return total_loss / max(seen, 1), 1.0 - correct / max(seen, 1)

    def _selection_key(self, metrics: dict[str, Any]) -> tuple[float, ...] | None:
        if self.plugin is not None:
            return self.plugin.selection_key(metrics)
        return (metrics["val_error"], metrics["val_loss"])

    def fit(self) -> TrainResult:
        """Train until the epoch budget is spent or the plugin asks to stop."""
        cfg = self.config
        started = time.perf_counter()
        stopped = "epoch budget reached"
        if self.epoch == 0 and not self.history:
            if self.is_main:
                val_loss, val_err = self.evaluate(self.data.val)
                self.initial_val_error = val_err
                self.best_key = self._selection_key({"val_loss": val_loss, "val_error": val_err, "sparsity": 0.0})
                self.best_epoch, self.best_state = 0, _copy_state(self.model)
            self._follow_main()
        while self.epoch < cfg.epochs or self.finishing:
            epoch_start = time.perf_counter()
            train_loss, train_err = self._train_one_epoch()
            self.epoch += 1
            reason, failure = None, None
            if self.is_main:
                try:
                    reason = self._end_epoch(train_loss, train_err, epoch_start, started)
                except Exception as exc:  # noqa: BLE001 - re-raised by _follow_main, after telling the other ranks
                    if self.world == 1:
                        raise
                    failure = exc
            reason = self._follow_main(reason, failure)
            if reason:
                stopped = reason
                break
        return TrainResult(
            history=self.history,
            best_epoch=self.best_epoch,
            best_val_error=self.history[self.best_epoch - 1]["val_error"] if self.best_epoch > 0 else self.initial_val_error,
            stopped_because=stopped,
            wall_seconds=time.perf_counter() - started,
            best_state=self.best_state,
        )

    def _end_epoch(self, train_loss: float, train_err: float, epoch_start: float, started: float) -> str | None:
        """Evaluate, let the plugin prune, select, checkpoint and log; returns a reason to stop."""
        cfg = self.config
        val_loss, val_err = self.evaluate(self.data.val)
        test_loss, test_err = self.evaluate(self.data.test)
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "train_error": train_err,
            "val_loss": val_loss,
            "val_error": val_err,
            "test_loss": test_loss,
            "test_error": test_err,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        extra = self.plugin.on_epoch_end(self, metrics) if self.plugin is not None else {}
        restart_plateau = extra.pop("restart_lr_plateau", False)
        metrics.update(extra)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if restart_plateau:  # the model just changed (pruned): judge later epochs against it
                self.restart_lr_plateau(metrics["val_loss"])
            else:
                self.scheduler.step(metrics["val_loss"])
        elif self.scheduler is not None:
            self.scheduler.step()
        metrics["seconds"] = time.perf_counter() - epoch_start
        key = self._selection_key(metrics)
        if key is not None and (self.best_key is None or key < tuple(self.best_key)):
            self.best_key, self.best_epoch = key, self.epoch
            self.best_state = _copy_state(self.model)
            metrics["best"] = True
        self.history.append(metrics)
        self._save()
        if self.workdir is not None and metrics.get("best"):
            checkpoint.save({"state_dict": self.best_state, "epoch": self.epoch}, self.workdir / "best.pt")
        self.log(format_epoch(metrics, cfg.epochs))
        reason = self.plugin.should_stop() if self.plugin is not None else None
        if reason is None and not self.finishing:
            if cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds:
                reason = f"time budget of {cfg.max_seconds:.0f} s reached"
            elif self.epoch >= cfg.epochs:
                reason = "epoch budget reached"
        before_stop = getattr(self.plugin, "before_stop", None)
        closing = bool(getattr(self.plugin, "finishing", False))  # already fine-tuning: nothing to start
        if reason is not None and before_stop is not None and not closing and before_stop(self, reason):
            self._keep_pruned_state()
            return None
        return reason

    @property
    def finishing(self) -> bool:
        """In the plugin's closing phase (fine-tuning), which runs past the epoch budget, with
        epochs of it still to run (a resumed run whose fine-tuning is over has none)."""
        return (self.plugin is not None and bool(getattr(self.plugin, "finishing", False))
                and self.plugin.should_stop() is None)


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def format_epoch(m: dict[str, Any], epochs: int) -> str:
    """One progress line per epoch."""
    parts = [
        f"epoch {m['epoch']:>3}/{epochs}",
        f"loss {m['train_loss']:.4f}",
        f"val err {100 * m['val_error']:.2f}%",
        f"test err {100 * m['test_error']:.2f}%",
        f"lr {m['lr']:.3g}",
    ]
    if "sparsity" in m:
        parts.append(f"sparsity {100 * m['sparsity']:.2f}%")
    if m.get("neurons"):
        parts.append(" ".join(f"{name.replace('input features', 'inputs')}={n}" for name, n in m["neurons"].items()))
    if m.get("finetune"):
        parts.append("fine-tune")
    if m.get("threshold") is not None:
        parts.append(f"T {m['threshold']:.3g}")
    if m.get("best"):
        parts.append("*")
    return "  ".join(parts)
