"""Knowledge distillation during fine-tuning: the loss, its wiring into the trainer, bad settings."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import models
from compressor.distill import Distiller, distillation_loss
from compressor.errors import CompressError
from compressor.methods import PruningConfig, make
from compressor.train import Trainer, TrainConfig


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0], ids=["T1", "T2", "T4"])
def test_distillation_loss_is_the_scaled_kl_divergence_by_hand(temperature: float) -> None:
    student = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    teacher = np.array([[1.0, 0.0, -1.0], [-0.5, 2.5, 0.5]])
    p_t, p_s = _softmax(teacher / temperature), _softmax(student / temperature)
    expected = temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    s = torch.tensor(student, requires_grad=True)
    got = distillation_loss(s, torch.tensor(teacher), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # The T^2 factor keeps the gradient at T * (p_s - p_t) / batch: the cross-entropy's scale.
    got.backward()
    np.testing.assert_allclose(s.grad.numpy(), temperature * (p_s - p_t) / 2, rtol=1e-10)


def test_distillation_loss_is_zero_when_the_outputs_agree() -> None:
    logits = torch.randn(5, 10)
    assert distillation_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0], ids=["labels-only", "blend", "teacher-only"])
def test_distiller_blends_the_labels_loss_with_the_teachers(weight: float) -> None:
    teacher, student = _linear(0), _linear(1)
    x = torch.randn(6, 1, 2, 2)
    hard = torch.tensor(0.7)
    logits = student(x)
    got = Distiller(teacher, weight, 2.0).loss(hard, x, logits)
    soft = distillation_loss(logits, teacher(x), 2.0)
    assert got.item() == pytest.approx(((1 - weight) * hard + weight * soft).item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher is frozen"


def test_distiller_refuses_a_teacher_with_other_outputs() -> None:
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(CompressError, match=r"teacher's outputs have shape \(2, 5\), the model's \(2, 3\)"):
        Distiller(teacher, 0.5, 4.0).loss(torch.tensor(0.0), x, _linear(0)(x))


def _kl_to(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    was_training = student.training
    with torch.no_grad():
        kl = distillation_loss(student.eval()(x), teacher.eval()(x), 1.0).item()
    student.train(was_training)
    return kl


def test_finetuning_learns_from_a_frozen_copy_of_the_model_before_pruning(synthetic, tmp_path) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    model = models.build("lenet300", data.input_shape, data.num_classes)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, stall_limit=1000, finetune_epochs=3,
                           finetune_lr=0.05, finetune_distill=1.0, finetune_temperature=1.0)
    plugin = make("lobster", config, teacher=model)
    teacher = plugin.distiller.teacher
    assert teacher is not model
    reference = copy.deepcopy(teacher)  # to measure with, uncounted
    calls: list[bool] = []
    teacher.register_forward_hook(lambda *_: calls.append(plugin.finishing))
    logged: list[str] = []
    trainer = Trainer(model, data, TrainConfig(epochs=4, lr=0.05, batch_size=16), plugin=plugin, progress=False,
                      log=logged.append, workdir=tmp_path)
    start = {}
    real = plugin.before_stop

    def record(trainer, reason):
        started = real(trainer, reason)
        start["kl"] = _kl_to(reference, trainer.model, data.train.x)
        return started

    plugin.before_stop = record
    trainer.fit()
    batches = math.ceil(len(data.train) / 16)
    assert calls == [True] * (3 * batches), "the teacher runs on every fine-tuning batch and on no pruning batch"
    # The teacher is the model as given, untouched by the training of the model itself.
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in original.items())
    assert not torch.equal(model.state_dict()["fc1.weight"], original["fc1.weight"])
    # Trained on the teacher's outputs alone (weight 1), the pruned model moved towards them.
    assert _kl_to(reference, model, data.train.x) < 0.5 * start["kl"]
    assert any("distilling from the model before pruning (weight 1, temperature 1)" in line for line in logged)


def test_the_weight_of_the_teacher_changes_the_finetuning(synthetic, tmp_path) -> None:
    """Same run with and without distillation: identical pruning epochs, different fine-tuning."""
    data = synthetic(n=96)
    runs = {}
    for weight in (0.0, 0.7):
        torch.manual_seed(0)
        model = models.build("lenet300", data.input_shape, data.num_classes)
        teacher = models.build("lenet300", data.input_shape, data.num_classes)  # any trained-looking other model
        config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, stall_limit=1000, finetune_epochs=2,
                               finetune_distill=weight)
        trainer = Trainer(model, data, TrainConfig(epochs=3, lr=0.05, batch_size=16),
                          plugin=make("lobster", config, teacher=teacher), progress=False, log=lambda s: None,
                          workdir=tmp_path / str(weight))
        trainer.fit()
        runs[weight] = trainer.history
    plain, distilled = runs[0.0], runs[0.7]
    assert [h["train_loss"] for h in plain[:3]] == [h["train_loss"] for h in distilled[:3]]
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(plain[3:], distilled[3:]))


@pytest.mark.parametrize(("settings", "message"), [
    (dict(finetune_epochs=2, finetune_distill=-0.1), r"--finetune-distill must be in \[0, 1\]"),
    (dict(finetune_epochs=2, finetune_distill=1.5), r"--finetune-distill must be in \[0, 1\]"),
    (dict(finetune_epochs=2, finetune_distill=float("nan")), r"--finetune-distill must be in \[0, 1\]"),
    (dict(finetune_epochs=2, finetune_distill=0.5, finetune_temperature=0.0), "--finetune-temperature must be a positive"),
    (dict(finetune_epochs=2, finetune_distill=0.5, finetune_temperature=float("inf")), "--finetune-temperature must be a positive"),
    (dict(finetune_distill=0.5), "give --finetune-epochs too"),
], ids=["negative-weight", "weight-above-one", "nan-weight", "zero-temperature", "infinite-temperature", "no-finetuning"])
def test_bad_distillation_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(CompressError, match=message):
        PruningConfig(**settings).validate()


def test_distillation_needs_a_teacher() -> None:
    with pytest.raises(CompressError, match="needs the trained model before pruning"):
        make("lobster", PruningConfig(finetune_epochs=2, finetune_distill=0.5))


def test_cli_refuses_to_distill_from_an_untrained_model(run_cli, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    res = run_cli("lenet300", "--method", "lobster", "--data", "digits", "--epochs", "1", "--finetune-epochs", "1",
                  "--finetune-distill", "0.5", "--out", str(out), "-q")
    assert res.code != 0 and "lenet300 is an untrained zoo model: give a trained checkpoint" in res.err
    assert not out.exists()


def test_cli_distills_from_a_trained_checkpoint(run_cli, tmp_path) -> None:
    ckpt, dense = tmp_path / "dense.pt", tmp_path / "dense.onnx"
    assert run_cli("lenet300", "--method", "none", "--data", "digits", "--epochs", "3", "--out", str(dense),
                   "--save-checkpoint", str(ckpt), "-q").code == 0
    out = tmp_path / "m.onnx"
    res = run_cli(str(ckpt), "--method", "lobster", "--data", "digits", "--epochs", "2", "--finetune-epochs", "2",
                  "--finetune-distill", "0.5", "--finetune-temperature", "3", "--out", str(out), "-q")
    assert res.code == 0, res
    report = json.loads(out.with_suffix(".report.json").read_text())
    settings = report["method"]["settings"]
    assert settings["finetune_distill"] == 0.5 and settings["finetune_temperature"] == 3.0
    assert sum(1 for h in report["training"]["history"] if h.get("finetune")) == 2


@pytest.mark.parametrize(("prune_weight", "finetune_weight", "teacher_runs_in"), [
    (0.5, 0.0, "pruning"),
    (0.5, 0.5, "both"),
    (0.0, 0.5, "finetuning"),
], ids=["prune-only", "both-phases", "finetune-only"])
def test_distillation_runs_in_the_phases_it_is_asked_for(synthetic, tmp_path, prune_weight: float,
                                                          finetune_weight: float, teacher_runs_in: str) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    model = models.build("lenet300", data.input_shape, data.num_classes)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, stall_limit=1000, finetune_epochs=2,
                           finetune_distill=finetune_weight, prune_distill=prune_weight)
    plugin = make("lobster", config, teacher=model)
    calls: list[bool] = []
    plugin.distiller.teacher.register_forward_hook(lambda *_: calls.append(plugin.finishing))
    trainer = Trainer(model, data, TrainConfig(epochs=3, lr=0.05, batch_size=16), plugin=plugin, progress=False,
                      log=lambda s: None, workdir=tmp_path)
    trainer.fit()
    batches = math.ceil(len(data.train) / 16)
    expected = {"pruning": [False] * (3 * batches), "finetuning": [True] * (2 * batches)}
    expected["both"] = expected["pruning"] + expected["finetuning"]
    assert calls == expected[teacher_runs_in]


def test_distilling_while_pruning_changes_what_the_regularizer_reads(synthetic, tmp_path) -> None:
    """The regularizer shrinks by the gradient of the loss the step used: blended, the run differs
    from the labels-only run from the first epoch on."""
    data = synthetic(n=96)
    runs = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = models.build("lenet300", data.input_shape, data.num_classes)
        teacher = models.build("lenet300", data.input_shape, data.num_classes)
        config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, stall_limit=1000, prune_distill=weight)
        trainer = Trainer(model, data, TrainConfig(epochs=1, lr=0.05, batch_size=16),
                          plugin=make("lobster", config, teacher=teacher), progress=False, log=lambda s: None,
                          workdir=tmp_path / str(weight))
        trainer.fit()
        runs[weight] = model.state_dict()["fc1.weight"]
    assert not torch.equal(runs[0.0], runs[0.5])


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")], ids=["negative", "above-one", "nan"])
def test_bad_prune_distill_weights_are_refused(weight: float) -> None:
    with pytest.raises(CompressError, match=r"--prune-distill must be in \[0, 1\]"):
        PruningConfig(prune_distill=weight).validate()


def test_distilling_while_pruning_needs_a_teacher() -> None:
    with pytest.raises(CompressError, match="needs the trained model before pruning"):
        make("lobster", PruningConfig(prune_distill=0.5))


def test_cli_refuses_to_distill_while_pruning_from_an_untrained_model(run_cli, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    res = run_cli("lenet300", "--method", "lobster", "--data", "digits", "--epochs", "1", "--prune-distill", "0.5",
                  "--out", str(out), "-q")
    assert res.code != 0 and "--prune-distill learns from MODEL as given" in res.err
    assert "drop --prune-distill" in res.err
    assert not out.exists()
