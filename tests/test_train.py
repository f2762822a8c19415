"""The training loop: exact resume, checkpoints, selection, divergence, and the pruning plugins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from compressor import checkpoint
from compressor.errors import CompressError
from compressor.masks import model_sparsity
from compressor.methods import PruningConfig, make
from compressor.train import Trainer, TrainConfig, TrainingDiverged



def _mlp(data) -> nn.Module:
    torch.manual_seed(0)
    return models.build("lenet300", data.input_shape, data.num_classes)


@pytest.mark.parametrize("method", ["none", "lobster", "sensitivity", "magnitude", "serene", "serene-by-sensitivity",
                                    "serene-width-multiple"])
def test_resume_continues_exactly(method: str, tmp_path: Path, synthetic) -> None:
    data = synthetic(n=96)
    cfg = dict(lr=0.05, momentum=0.9, batch_size=16, seed=3, weight_decay=1e-3)
    criterion = "sensitivity" if method.endswith("by-sensitivity") else "norm"
    multiple = 16 if method.endswith("width-multiple") else 1
    prune = PruningConfig(pwe=1, lmbda=1e-3, twt=0.5, max_error_increase=0.2, neuron_criterion=criterion,
                          width_multiple=multiple)
    plugin = lambda: make(method.split("-")[0], prune, data.train.x[:2])  # noqa: E731

    straight = Trainer(_mlp(data), data, TrainConfig(epochs=10, **cfg), workdir=tmp_path / "a", plugin=plugin(), progress=False, log=lambda s: None)
    straight.fit()

    first = Trainer(_mlp(data), data, TrainConfig(epochs=5, **cfg), workdir=tmp_path / "b", plugin=plugin(), progress=False, log=lambda s: None)
    first.fit()
    resumed = Trainer(_mlp(data), data, TrainConfig(epochs=10, **cfg), workdir=tmp_path / "b", plugin=plugin(), progress=False, log=lambda s: None)
    assert resumed.resume() and resumed.epoch == 5
    resumed.fit()

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["val_loss"] for h in straight.history] == [h["val_loss"] for h in resumed.history]
    if method != "none":  # the run pruned after the resume point, so the pruning state was restored too
        assert any(h.get("pruned_now") for h in straight.history[5:])


def test_checkpoints_are_written_every_epoch(tmp_path: Path, synthetic) -> None:
    data = synthetic()
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=2, batch_size=16), workdir=tmp_path, progress=False, log=lambda s: None)
    trainer.fit()
    state = checkpoint.load_safely(tmp_path / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert "state_dict" in checkpoint.load_safely(tmp_path / "best.pt")
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_other_data(tmp_path: Path, synthetic) -> None:
    data = synthetic(seed=0)
    Trainer(_mlp(data), data, TrainConfig(epochs=1, batch_size=16), workdir=tmp_path, progress=False, log=lambda s: None).fit()
    other = synthetic(seed=1)
    trainer = Trainer(_mlp(other), other, TrainConfig(epochs=2, batch_size=16), workdir=tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(CompressError, match="different data"):
        trainer.resume()


def test_divergence_raises_and_keeps_last_good_state(tmp_path: Path, synthetic) -> None:
    data = synthetic()
    model = _mlp(data)
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=16), workdir=tmp_path, progress=False, log=lambda s: None)
    trainer.fit()
    good = checkpoint.load_safely(tmp_path / "last.pt")["model"]
    with torch.no_grad():
        model.fc1.weight.fill_(float("nan"))
    trainer.config.epochs = 3
    with pytest.raises(TrainingDiverged, match="diverged.*last.pt"):
        trainer.fit()
    kept = checkpoint.load_safely(tmp_path / "last.pt")["model"]
    torch.testing.assert_close(kept["fc1.weight"], good["fc1.weight"])


def test_time_budget_stops_training(synthetic) -> None:
    data = synthetic()
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=1000, batch_size=16, max_seconds=0.0), progress=False, log=lambda s: None)
    result = trainer.fit()
    assert trainer.epoch == 1 and "time budget" in result.stopped_because


@pytest.mark.parametrize("method", ["lobster", "sensitivity", "magnitude"])
def test_pruning_plugins_prune_at_plateaus_and_keep_zeros(method: str, synthetic) -> None:
    data = synthetic(n=96)
    model = _mlp(data)
    plugin = make(method, PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-3))
    trainer = Trainer(model, data, TrainConfig(epochs=20, lr=0.05, batch_size=16), plugin=plugin, progress=False, log=lambda s: None)
    trainer.fit()
    assert any(h["threshold"] for h in trainer.history)
    assert model_sparsity(model) > 0.3
    # the masks and the zeros agree: nothing pruned has come back
    for _, p, mask in plugin.masks:
        assert torch.all(p[~mask] == 0)
    sparsities = [h["sparsity"] for h in trainer.history]
    assert sparsities == sorted(sparsities)


def test_target_sparsity_stops_training(synthetic) -> None:
    data = synthetic(n=96)
    plugin = make("magnitude", PruningConfig(pwe=1, twt=1.0, max_error_increase=1.0, target_sparsity=0.2))
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=50, lr=0.05, batch_size=16), plugin=plugin, progress=False, log=lambda s: None)
    result = trainer.fit()
    assert "target sparsity" in result.stopped_because and trainer.epoch < 50


@pytest.mark.parametrize("method", ["lobster", "magnitude"])
def test_stalled_pruning_anneals_lr_and_lambda_before_stopping(method: str, synthetic) -> None:
    data = synthetic(n=96)
    # No error or loss allowance: every threshold search prunes nothing, so each plateau stalls.
    config = PruningConfig(pwe=1, twt=0.0, max_error_increase=0.0, lmbda=1e-3, anneals=2, anneal_after=1, stall_limit=2)
    plugin = make(method, config)
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=60, lr=0.05, batch_size=16), plugin=plugin, progress=False, log=lambda s: None)
    result = trainer.fit()
    annealed_at = [h["epoch"] for h in trainer.history if h.get("annealed")]
    assert len(annealed_at) == 2, "two cuts, then the stall limit stops the run"
    lrs = sorted({round(h["lr"], 12) for h in trainer.history}, reverse=True)
    assert lrs == [0.05, 0.005, 0.0005]
    if plugin.regularizer is not None:
        assert plugin.regularizer.lmbda == pytest.approx(1e-5)
    assert "pruned nothing" in result.stopped_because and trainer.epoch < 60


@pytest.mark.parametrize("limit", [1, 3], ids=["stall-limit-1", "stall-limit-3"])
def test_stall_limit_is_the_number_of_fruitless_plateaus_before_stopping(limit: int, synthetic, monkeypatch) -> None:
    import compressor.methods as methods
    from compressor.thresholding import ThresholdSearch

    data = synthetic(n=96)
    # Every threshold search comes back empty, as when the validation allowance is used up.
    monkeypatch.setattr(methods, "find_threshold", lambda *a, **k: ThresholdSearch(0.0, 0, 1.0, 1.0, 1))
    config = PruningConfig(pwe=1, lmbda=1e-3, stall_limit=limit)
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=60, lr=0.05, batch_size=16), plugin=make("lobster", config),
                      progress=False, log=lambda s: None)
    result = trainer.fit()
    plateaus = [h for h in trainer.history if h.get("threshold") is not None]
    assert len(plateaus) == limit and all(h["pruned_now"] == 0 for h in plateaus)
    assert f"{limit} plateaus in a row pruned nothing" in result.stopped_because


def test_stall_limit_below_one_is_refused() -> None:
    with pytest.raises(CompressError, match="--stall-limit must be >= 1"):
        PruningConfig(stall_limit=0).validate()


def test_progress_line_shows_sparsity_threshold_and_widths() -> None:
    from compressor.train import format_epoch

    line = format_epoch({"epoch": 7, "train_loss": 0.1, "val_error": 0.02, "test_error": 0.019, "lr": 0.1,
                         "sparsity": 0.5, "threshold": 0.031, "neurons": {"fc1": 70, "fc2": 28, "input features": 300},
                         "best": True}, 100)
    assert line.split() == ["epoch", "7/100", "loss", "0.1000", "val", "err", "2.00%", "test", "err", "1.90%", "lr", "0.1",
                            "sparsity", "50.00%", "fc1=70", "fc2=28", "inputs=300", "T", "0.031", "*"]


@pytest.mark.parametrize("budget", ["epochs", "seconds", "stall"], ids=["after-epoch-budget", "after-time-budget", "after-stall"])
def test_finetuning_trains_the_selected_model_with_its_zeros_fixed(budget: str, synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=3,
                           stall_limit=1 if budget == "stall" else 1000)
    train = TrainConfig(epochs=8 if budget != "stall" else 200, lr=0.05, batch_size=16,
                        max_seconds=0.0 if budget == "seconds" else None)
    logged: list[str] = []
    plugin = make("lobster", config)
    trainer = Trainer(_mlp(data), data, train, plugin=plugin, progress=False, log=logged.append, workdir=tmp_path)
    result = trainer.fit()
    pruning = [h for h in trainer.history if not h.get("finetune")]
    finetune = [h for h in trainer.history if h.get("finetune")]
    assert len(finetune) == 3 and trainer.history[-3:] == finetune, "three fine-tuning epochs close the run"
    assert result.stopped_because.endswith("; then 3 fine-tuning epochs")
    selected_before = max((h for h in pruning if h.get("best")), key=lambda h: h["epoch"], default=None)
    start_sparsity = selected_before["sparsity"] if selected_before else 0.0
    assert all(h["sparsity"] == pytest.approx(start_sparsity) for h in finetune)
    assert all(h["lr"] == pytest.approx(0.1 * train.lr) for h in finetune)
    assert all(h["threshold"] is None for h in finetune), "no pruning while fine-tuning"
    assert any("fine-tuning the selected model" in line for line in logged)
    # The zeros of the selected model stayed zero through the fine-tuning steps.
    for _, p, m in plugin.masks:
        assert torch.all(p.detach()[~m] == 0)


def _interrupt_fit_when_finetune_left(trainer: Trainer, left: int) -> None:
    """Run ``trainer.fit()`` and interrupt it (as Ctrl-C would) once ``left`` fine-tuning epochs remain."""
    plugin = trainer.plugin
    real = plugin.on_epoch_end

    def stop_midway(trainer, metrics):
        extra = real(trainer, metrics)
        if plugin.finetune_left == left:
            raise KeyboardInterrupt
        return extra

    plugin.on_epoch_end = stop_midway
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_finetuning_survives_a_resume(synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=4, stall_limit=1000)
    first = Trainer(_mlp(data), data, TrainConfig(epochs=5, lr=0.05, batch_size=16), plugin=make("lobster", config),
                    progress=False, log=lambda s: None, workdir=tmp_path)
    # Interrupt after two fine-tuning epochs: a later process picks up with two to go.
    _interrupt_fit_when_finetune_left(first, 2)
    second = Trainer(_mlp(data), data, TrainConfig(epochs=5, lr=0.05, batch_size=16), plugin=make("lobster", config),
                     progress=False, log=lambda s: None, workdir=tmp_path)
    assert second.resume()
    assert second.plugin.finishing and second.plugin.finetune_left == 3  # the interrupted epoch is redone
    result = second.fit()
    assert result.stopped_because.endswith("; then 4 fine-tuning epochs")
    assert sum(1 for h in second.history if h.get("finetune")) == 4


@pytest.mark.parametrize("finetune_lr, expected", [(None, 0.005), (0.03, 0.03)], ids=["default-tenth-of-start", "given"])
def test_finetuning_learning_rate_does_not_follow_anneals(finetune_lr, expected, synthetic, tmp_path) -> None:
    """Anneals can leave the learning rate far too small to train: fine-tuning starts from a
    tenth of the starting rate, or from --finetune-lr, and the plateau schedule starts afresh."""
    data = synthetic(n=96)
    torch.manual_seed(0)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=2, finetune_lr=finetune_lr,
                           stall_limit=1000)
    plugin = make("lobster", config)
    train = TrainConfig(epochs=4, lr=0.05, batch_size=16, lr_schedule="plateau", plateau_patience=1)
    trainer = Trainer(_mlp(data), data, train, plugin=plugin, progress=False, log=lambda s: None, workdir=tmp_path)
    real = plugin.on_epoch_end

    def annealed(trainer, metrics):  # as if two anneals had happened during pruning
        if not plugin.finishing:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 0.05 * 0.01
        return real(trainer, metrics)

    plugin.on_epoch_end = annealed
    real_stop = plugin.before_stop

    def after_a_bad_stretch(trainer, reason):  # the plateau schedule was about to cut the rate again
        trainer.scheduler.best, trainer.scheduler.num_bad_epochs = -math.inf, 10
        return real_stop(trainer, reason)

    plugin.before_stop = after_a_bad_stretch
    trainer.fit()
    finetune = [h for h in trainer.history if h.get("finetune")]
    # both fine-tuning epochs at that rate: the schedule judged the first on its own
    assert len(finetune) == 2 and all(h["lr"] == pytest.approx(expected) for h in finetune)


@pytest.mark.parametrize("finetune_momentum, expected", [(None, 0.0), (0.9, 0.9)], ids=["default-training-momentum", "given"])
def test_finetuning_momentum(finetune_momentum, expected, synthetic, tmp_path) -> None:
    """Pruning with plain SGD (the papers' recipe); fine-tuning may switch to heavy-ball SGD."""
    data = synthetic(n=96)
    torch.manual_seed(0)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=2,
                           finetune_momentum=finetune_momentum, stall_limit=1000)
    plugin = make("lobster", config)
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=3, lr=0.05, momentum=0.0, batch_size=16), plugin=plugin,
                      progress=False, log=lambda s: None, workdir=tmp_path)
    momenta = []
    real = plugin.on_epoch_end

    def record(trainer, metrics):
        momenta.append((plugin.finishing, trainer.optimizer.param_groups[0]["momentum"]))
        return real(trainer, metrics)

    plugin.on_epoch_end = record
    trainer.fit()
    assert [m for finishing, m in momenta if not finishing] == [0.0] * 3
    assert [m for finishing, m in momenta if finishing] == [expected] * 2
    buffers = [trainer.optimizer.state[p].get("momentum_buffer") for p in trainer.model.parameters()]
    assert all((b is not None) == (expected > 0) for b in buffers)
    # The switch is in the optimizer's own state, so a resumed fine-tuning keeps it.
    assert torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["momentum"] == expected


def test_cosine_finetuning_anneals_to_zero_and_survives_a_resume(synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    epochs, lr0 = 4, 0.02
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=epochs, finetune_lr=lr0,
                           finetune_schedule="cosine", stall_limit=1000)
    train = TrainConfig(epochs=3, lr=0.05, batch_size=16, lr_schedule="plateau", plateau_patience=0)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(_mlp(data), data, train, plugin=make("lobster", config), progress=False, log=lambda s: None,
                       workdir=tmp_path)

    _interrupt_fit_when_finetune_left(trainer(), 2)
    second = trainer()
    assert second.resume()
    second.fit()
    finetune = [h["lr"] for h in second.history if h.get("finetune")]
    # cos(pi * k / 4) for k = 0..3; the plateau schedule (patience 0) cut none of them
    expected = [lr0 * 0.5 * (1 + math.cos(math.pi * k / epochs)) for k in range(epochs)]
    assert finetune == pytest.approx(expected)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_finetuning_again_starts_from_where_pruning_stopped(synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    train = TrainConfig(epochs=3, lr=0.05, batch_size=16)

    def trainer(**finetune) -> Trainer:
        torch.manual_seed(0)
        config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, stall_limit=1000, **finetune)
        return Trainer(_mlp(data), data, train, plugin=make("lobster", config), progress=False, log=lambda s: None,
                       workdir=tmp_path)

    first = trainer(finetune_epochs=2, finetune_lr=0.01)
    real = first.plugin.before_stop
    seen = {}

    def record(trainer, reason):  # the model and masks the first fine-tuning started from
        started = real(trainer, reason)
        seen["state"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        seen["masks"] = [m.clone() for _, _, m in trainer.plugin.masks]
        return started

    first.plugin.before_stop = record
    first.fit()
    assert len(first.history) == 5

    again = trainer(finetune_epochs=3, finetune_lr=0.02, finetune_schedule="cosine")
    again.finetune_again()
    assert again.epoch == 3, "back to the last pruning epoch; none is run again"
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seen["state"].items())
    assert all(torch.equal(m, seen_m) for (_, _, m), seen_m in zip(again.plugin.masks, seen["masks"]))
    again.fit()
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4, 5, 6]
    assert [h["lr"] for h in again.history if h.get("finetune")] == pytest.approx([0.02, 0.015, 0.005])  # cosine over 3 epochs
    for _, p, m in again.plugin.masks:
        assert torch.all(p.detach()[~m] == 0)


def test_finetuning_again_needs_a_kept_pruned_state(synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, finetune_epochs=2)
    trainer = Trainer(_mlp(data), data, TrainConfig(epochs=2, lr=0.05, batch_size=16), plugin=make("lobster", config),
                      progress=False, log=lambda s: None, workdir=tmp_path)
    with pytest.raises(CompressError, match="pruned.pt: only a run that reached its fine-tuning"):
        trainer.finetune_again()
    no_finetuning = Trainer(_mlp(data), data, TrainConfig(epochs=2, lr=0.05, batch_size=16),
                            plugin=make("lobster", PruningConfig()), progress=False, log=lambda s: None, workdir=tmp_path)
    with pytest.raises(CompressError, match="--finetune-epochs > 0"):
        no_finetuning.finetune_again()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("finetune_schedule", "step", "--finetune-schedule must be one of plateau, cosine"),
    ("finetune_momentum", 1.0, "--finetune-momentum must be in"),
    ("finetune_momentum", -0.1, "--finetune-momentum must be in"),
    ("finetune_momentum", float("nan"), "--finetune-momentum must be in"),
    ("finetune_epochs", -1, "--finetune-epochs must be >= 0"),
    ("finetune_lr", 0.0, "--finetune-lr must be a positive number"),
    ("finetune_lr", float("nan"), "--finetune-lr must be a positive number"),
    ("finetune_lr", float("inf"), "--finetune-lr must be a positive number"),
], ids=["unknown-schedule", "momentum-one", "negative-momentum", "nan-momentum", "negative-epochs", "zero-lr", "nan-lr", "infinite-lr"])
def test_bad_finetune_settings_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(CompressError, match=message):
        PruningConfig(**{field: value}).validate()
