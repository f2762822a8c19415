"""The `compress` command end to end on the bundled digits data, and every bad-input path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import models
from compressor import checkpoint

FAST = ["--epochs", "2", "-q"]


def outputs_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".onnx", ".json", ".md") or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One dense digits run shared by several tests (training is the slow part)."""
    from compressor.cli import main

    out_dir = tmp_path_factory.mktemp("dense")
    out = out_dir / "dense.onnx"
    ckpt = out_dir / "dense.pt"
    main(["lenet300", "--method", "none", "--data", "digits", "--out", str(out), "--save-checkpoint", str(ckpt), "--epochs", "8", "-q"])
    return {"out": out, "ckpt": ckpt, "report": json.loads((out_dir / "dense.report.json").read_text())}


def test_dense_run_writes_onnx_report_and_checkpoint(dense_run: dict) -> None:
    out, report = dense_run["out"], dense_run["report"]
    assert out.exists() and out.with_name("dense.report.md").exists() and dense_run["ckpt"].exists()
    assert report["size"]["file_bytes"] == out.stat().st_size
    assert report["size"]["params_total"] == 8 * 8 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert report["quality"]["max_abs_diff"] <= report["quality"]["parity_tolerance"]
    assert report["training"]["epochs"] == 8 and len(report["training"]["history"]) == 8
    assert report["model"] == {"name": "lenet300", "source": "zoo", "input_shape": [1, 8, 8], "num_classes": 10}
    assert "lenet300" in report["command"] and "--method none" in report["command"]


def test_reported_onnx_accuracy_is_what_onnxruntime_measures(dense_run: dict) -> None:
    from compressor.data import load_dataset

    data = load_dataset("digits", seed=0)
    sess = ort.InferenceSession(str(dense_run["out"]), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: data.test.x.numpy()})[0]
    accuracy = float((logits.argmax(1) == data.test.y.numpy()).mean())
    assert accuracy == pytest.approx(dense_run["report"]["quality"]["onnx_test_accuracy"])
    assert accuracy > 0.85  # 8 epochs on digits


def test_onnx_has_dynamic_batch_and_no_leaked_paths(dense_run: dict) -> None:
    import onnx

    proto = onnx.load(str(dense_run["out"]))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not any(node.metadata_props for node in proto.graph.node)
    assert b"/work/" not in dense_run["out"].read_bytes() and os.getcwd().encode() not in dense_run["out"].read_bytes()
    sess = ort.InferenceSession(str(dense_run["out"]), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        out = sess.run(None, {"input": np.zeros((batch, 1, 8, 8), np.float32)})[0]
        assert out.shape == (batch, 10)


def test_checkpoint_is_accepted_as_model_and_exported_without_training(dense_run: dict, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "again.onnx"
    res = run_cli(str(dense_run["ckpt"]), "--method", "none", "--data", "digits", "--out", str(out), "-q")
    assert res.code == 0, res
    report = json.loads((tmp_path / "again.report.json").read_text())
    assert report["training"]["epochs"] == 0
    assert report["model"]["source"] == "checkpoint"
    assert report["quality"]["onnx_test_accuracy"] == pytest.approx(dense_run["report"]["quality"]["onnx_test_accuracy"])


def test_compare_prints_side_by_side_table(dense_run: dict, run_cli, tmp_path: Path) -> None:
    other = tmp_path / "lob.onnx"
    assert run_cli(str(dense_run["ckpt"]), "--method", "lobster", "--data", "digits", "--out", str(other), *FAST).code == 0
    res = run_cli("compare", str(dense_run["out"].with_name("dense.report.json")), str(tmp_path / "lob.report.json"))
    assert res.code == 0, res
    assert "ONNX file bytes" in res.out and "non-zero parameters" in res.out and "(lobster)" in res.out and "(none)" in res.out
    res_json = run_cli("compare", "--format", "json", str(dense_run["out"].with_name("dense.report.json")), str(tmp_path / "lob.report.json"))
    table = json.loads(res_json.out)
    assert table["rows"][0][0] == "ONNX file bytes"


def test_compare_refuses_different_test_sets(dense_run: dict, run_cli, tmp_path: Path) -> None:
    report = dict(dense_run["report"])
    report["data"] = dict(report["data"], test_fingerprint="0" * 16)
    other = tmp_path / "other.report.json"
    other.write_text(json.dumps(report))
    res = run_cli("compare", str(dense_run["out"].with_name("dense.report.json")), str(other))
    assert res.code == 2 and "different test sets" in res.err


def test_pickled_module_needs_the_explicit_flag(run_cli, tmp_path: Path) -> None:
    model = models.build("lenet300", (1, 8, 8), 10)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    out = tmp_path / "m.onnx"
    res = run_cli(str(path), "--method", "none", "--data", "digits", "--out", str(out), "-q")
    assert res.code == 2
    assert "--allow-unsafe-pickle" in res.err and len(res.err.strip().splitlines()) == 1
    assert not out.exists()
    res = run_cli(str(path), "--method", "none", "--data", "digits", "--out", str(out), "--allow-unsafe-pickle", "--epochs", "1", "-q")
    assert res.code == 0, res
    assert out.exists()


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    text = tmp / "notes.pt"
    text.write_text("garbage, not a checkpoint")  # read as a pickle stream, it has unknown opcodes
    bare = tmp / "bare.pt"
    torch.save(models.build("lenet300", (1, 8, 8), 10).state_dict(), bare)
    wrong_shape = tmp / "mnist_shaped.pt"
    checkpoint.save_model(wrong_shape, models.build("lenet300", (1, 28, 28), 10), arch="lenet300", input_shape=(1, 28, 28), num_classes=10)
    npz3 = tmp / "three.npz"
    np.savez(npz3, x=np.random.rand(30, 8, 8).astype(np.float32), y=np.arange(30) % 3)
    flat = tmp / "flat.npz"
    np.savez(flat, x=np.random.rand(30, 64).astype(np.float32), y=np.arange(30) % 10)
    digits_ckpt = tmp / "digits.pt"
    checkpoint.save_model(digits_ckpt, models.build("lenet300", (1, 8, 8), 10), arch="lenet300", input_shape=(1, 8, 8), num_classes=10)
    return [
        (["resnet1000"], "unknown model"),
        ([str(tmp / "missing.pt")], "no such file"),
        ([str(corrupt)], "corrupt"),
        ([str(text)], "notes.pt is corrupt or not a PyTorch file"),
        ([str(bare)], "bare state_dict"),
        ([str(wrong_shape)], "was made for input"),
        ([str(digits_ckpt), "--data", f"npz:{npz3}"], "classes"),
        (["lenet5"], "lenet5 needs"),
        (["lenet300", "--data", "imagenet"], "imagenet"),
        (["lenet300", "--data", "npz"], "npz"),
        (["lenet300", "--data", f"npz:{tmp / 'nope.npz'}"], "nope.npz"),
        (["lenet300", "--lr", "-1"], "--lr"),
        (["lenet300", "--data", f"npz:{flat}", "--shift", "2"], "--shift needs image inputs"),
        (["lenet300", "--shift", "8"], "--shift 8 is not smaller than the 8x8 images"),
    ]


@pytest.mark.parametrize(
    "case",
    range(14),
    ids=["unknown-model", "missing-file", "corrupt-file", "text-file", "bare-state-dict", "shape-mismatch", "class-mismatch",
         "model-too-small-for-data", "unknown-dataset", "malformed-data-spec", "missing-npz", "negative-lr",
         "shift-on-flat-features", "shift-larger-than-image"],
)
def test_bad_input_gives_one_line_exit_2_and_no_output(case: int, run_cli, tmp_path: Path) -> None:
    args, fragment = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if "--data" not in args:
        args = [*args, "--data", "digits"]
    res = run_cli(*args, "--out", str(out_dir / "x.onnx"), "--method", "none", "--epochs", "1", "-q")
    assert res.code == 2, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compress: error:"), res.err
    assert fragment in lines[0]
    assert outputs_in(out_dir) == []


def test_unwritable_output_fails_before_training(run_cli, tmp_path: Path) -> None:
    res = run_cli("lenet300", "--data", "digits", "--out", str(tmp_path / "no" / "such" / "dir" / "x.onnx"), *FAST)
    assert res.code == 2 and "does not exist" in res.err
    assert "epoch" not in res.err


def test_output_must_be_onnx(run_cli, tmp_path: Path) -> None:
    res = run_cli("lenet300", "--data", "digits", "--out", str(tmp_path / "x.txt"), *FAST)
    assert res.code == 2 and ".onnx" in res.err


def test_diverging_training_stops_with_clear_message_and_keeps_checkpoint(run_cli, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    res = run_cli("lenet300", "--method", "none", "--data", "digits", "--out", str(tmp_path / "x.onnx"),
                  "--lr", "1e6", "--momentum", "0.9", "--epochs", "5", "--workdir", str(workdir), "-q")
    assert res.code == 2, res
    last = res.err.strip().splitlines()[-1]
    assert "diverged" in last and "--lr" in last
    assert not (tmp_path / "x.onnx").exists()


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("compress")
    assert exe.exists(), "pip install -e . should install the compress console script"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "MODEL" in res.stdout and "compare" in res.stdout


DIGITS_PRUNING = ["--epochs", "40", "--momentum", "0.9", "--pwe", "2", "--twt", "0.3", "--max-error-increase", "0.02", "-q"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lobster", "sensitivity", "magnitude"])
def test_unstructured_methods_prune_80_percent_on_digits(method: str, dense_run: dict, run_cli, tmp_path: Path) -> None:
    out = tmp_path / f"{method}.onnx"
    res = run_cli(str(dense_run["ckpt"]), "--method", method, "--data", "digits", "--out", str(out), *DIGITS_PRUNING)
    assert res.code == 0, res
    report = json.loads((tmp_path / f"{method}.report.json").read_text())
    dense_accuracy = dense_run["report"]["quality"]["onnx_test_accuracy"]
    assert report["size"]["remaining_fraction"] <= 0.20
    assert report["quality"]["onnx_test_accuracy"] >= dense_accuracy - 0.03
    history = report["training"]["history"]
    assert any(h["threshold"] for h in history) and all("sparsity" in h for h in history)
    # the compact encoding really shrinks the file
    assert report["size"]["file_bytes"] < 0.35 * dense_run["report"]["size"]["file_bytes"]
    assert report["size"]["decode_ops_after_load"] == []
    # pruning work is timed apart, as a part of the training time
    timings = report["timings"]
    assert 0 < timings["prune_s"] < timings["train_s"]


@pytest.mark.slow
def test_serene_removes_a_third_of_the_hidden_neurons_on_digits(dense_run: dict, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "serene.onnx"
    res = run_cli(str(dense_run["ckpt"]), "--method", "serene", "--data", "digits", "--out", str(out), *DIGITS_PRUNING)
    assert res.code == 0, res
    report = json.loads((tmp_path / "serene.report.json").read_text())
    removal = report["physical_removal"]
    assert removal["applied"]
    widths = {layer["name"]: layer["after"][0] for layer in removal["layers"]}
    assert widths["fc1"] + widths["fc2"] <= (300 + 100) * 2 / 3
    assert widths["fc3"] == 10  # the logits keep their width
    assert report["quality"]["onnx_test_accuracy"] >= dense_run["report"]["quality"]["onnx_test_accuracy"] - 0.03
    # the exported model is the smaller dense one
    assert report["size"]["params_total"] == removal["params_after"] < removal["params_before"]
    assert report["size"]["file_bytes"] < 0.5 * dense_run["report"]["size"]["file_bytes"]


def test_same_seed_gives_the_same_model(run_cli, tmp_path: Path) -> None:
    """Two runs in separate processes: initialisation, split and batch order all follow --seed."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.onnx"
        res = subprocess.run([sys.executable, "-m", "compressor.cli", "lenet300", "--method", "none", "--data", "digits",
                              "--epochs", "1", "--seed", "3", "--out", str(out), "-q"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        outs.append(json.loads((tmp_path / f"{name}.report.json").read_text()))
    a, b = outs
    assert a["training"]["history"][0]["train_loss"] == b["training"]["history"][0]["train_loss"]
    assert a["quality"]["onnx_test_accuracy"] == b["quality"]["onnx_test_accuracy"]


def test_export_skips_unread_input_features(dense_run: dict, run_cli, tmp_path: Path) -> None:
    """No dead neuron, only blank input columns: physical removal still runs, and the exported
    model reads fewer features with the same outputs."""
    state = checkpoint.load_safely(dense_run["ckpt"])
    model = models.build("lenet300", (1, 8, 8), 10)
    model.load_state_dict(state["state_dict"])
    with torch.no_grad():
        model.fc1.weight[:, [0, 7, 56, 63]] = 0  # the four corner pixels
    ckpt = tmp_path / "corners.pt"
    checkpoint.save_model(ckpt, model, arch="lenet300", input_shape=(1, 8, 8), num_classes=10)
    out = tmp_path / "corners.onnx"
    res = run_cli(str(ckpt), "--method", "none", "--epochs", "0", "--data", "digits", "--out", str(out), "-q")
    assert res.code == 0, res
    removal = json.loads((tmp_path / "corners.report.json").read_text())["physical_removal"]
    layers = {x["name"]: x for x in removal["layers"]}
    assert removal["applied"] and layers["input features"]["after"] == [60] and layers["fc1"]["after"] == [300, 60]
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_fine_tuning_resumes_past_the_epoch_budget_and_can_be_redone(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    base = ["lenet300", "--data", "digits", "--epochs", "2", "--momentum", "0.9", "--out", str(out), "-q"]
    assert run_cli(*base, "--finetune-epochs", "3").code == 0
    work = tmp_path / "m.work"
    assert (work / "pruned.pt").exists()
    # An interruption during fine-tuning: the last fine-tuning epoch was never saved. The epoch
    # budget (2) is already spent, yet --resume must still finish the fine-tuning.
    state = torch.load(work / "last.pt", weights_only=False)
    state["epoch"], state["history"] = 4, state["history"][:4]
    state["plugin"]["finetune_left"] = 1
    torch.save(state, work / "last.pt")
    res = run_cli(*base, "--finetune-epochs", "3", "--resume")
    assert res.code == 0, res
    history = json.loads(out.with_suffix(".report.json").read_text())["training"]["history"]
    assert [(h["epoch"], bool(h.get("finetune"))) for h in history] == [(1, False), (2, False), (3, True), (4, True), (5, True)]

    res = run_cli(*base, "--finetune-epochs", "2", "--finetune-lr", "0.02", "--finetune-schedule", "cosine", "--finetune-again")
    assert res.code == 0, res
    history = json.loads(out.with_suffix(".report.json").read_text())["training"]["history"]
    assert [(h["epoch"], bool(h.get("finetune"))) for h in history] == [(1, False), (2, False), (3, True), (4, True)]
    assert [h["lr"] for h in history[2:]] == pytest.approx([0.02, 0.01])

    res = run_cli(*base, "--finetune-again", "--resume")
    assert res.code == 2 and "choose one" in res.err


def test_resuming_a_finished_fine_tuning_trains_nothing_more(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    base = ["lenet300", "--data", "digits", "--epochs", "2", "--finetune-epochs", "1", "--momentum", "0.9", "--out", str(out), "-q"]
    assert run_cli(*base).code == 0
    assert run_cli(*base, "--resume").code == 0
    history = json.loads(out.with_suffix(".report.json").read_text())["training"]["history"]
    assert [(h["epoch"], bool(h.get("finetune"))) for h in history] == [(1, False), (2, False), (3, True)]
