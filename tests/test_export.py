"""Dense ONNX export: torch -> ONNX -> onnxruntime parity on every zoo model, and failure paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from exporters import onnx_export

ZOO_CASES = [
    pytest.param("lenet300", (1, 28, 28), id="lenet300-mnist"),
    pytest.param("lenet5", (1, 28, 28), id="lenet5-mnist"),
    pytest.param("resnet32", (3, 32, 32), id="resnet32-cifar"),
    pytest.param("vgg16", (3, 32, 32), id="vgg16-cifar"),
    pytest.param("mobilenetv2", (3, 32, 32), id="mobilenetv2-cifar"),
]


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so BatchNorm is really exercised in eval mode."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("arch,shape", ZOO_CASES)
def test_zoo_model_round_trip_through_onnxruntime(arch: str, shape: tuple[int, ...], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build(arch, shape, 10).eval()
    _randomise_batchnorm(model)
    x = torch.randn(5, *shape)
    proto = onnx_export.to_onnx(model, x[:2])
    onnx_export.check(proto)
    assert proto.opset_import[0].version == onnx_export.DEFAULT_OPSET
    files = onnx_export.save(proto, tmp_path / "m.onnx")
    assert files == [tmp_path / "m.onnx"]  # weights embedded, no sidecar
    sess = onnx_export.session(tmp_path / "m.onnx")
    parity = onnx_export.verify(model, sess, x)
    assert parity.ok, parity
    assert parity.max_abs_diff < 1e-3
    # dynamic batch: another batch size runs and agrees
    with torch.no_grad():
        expected = model(x[:3]).numpy()
    np.testing.assert_allclose(onnx_export.run(sess, x[:3].numpy()), expected, rtol=1e-4, atol=1e-4)


def test_verify_detects_a_wrong_model() -> None:
    torch.manual_seed(0)
    model = models.build("lenet300", (1, 8, 8), 10).eval()
    x = torch.randn(4, 1, 8, 8)
    sess = onnx_export.session(onnx_export.to_onnx(model, x))
    with torch.no_grad():
        model.fc3.bias.add_(1.0)  # PyTorch and ONNX now disagree by 1.0
    parity = onnx_export.verify(model, sess, x)
    assert not parity.ok and parity.max_abs_diff == pytest.approx(1.0, rel=1e-5)


def test_accuracy_is_measured_in_onnxruntime() -> None:
    torch.manual_seed(0)
    model = models.build("lenet300", (1, 8, 8), 3).eval()
    x = torch.randn(50, 1, 8, 8)
    sess = onnx_export.session(onnx_export.to_onnx(model, x))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    y = predicted.clone()
    y[:10] = (y[:10] + 1) % 3  # exactly 10 of 50 wrong
    assert onnx_export.accuracy(sess, x, y) == pytest.approx(0.8)


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x.flatten(1)
        return -x.flatten(1)


def test_export_failure_is_a_clear_error() -> None:
    with pytest.raises(onnx_export.ExportError, match="ONNX export failed"):
        onnx_export.to_onnx(_Untraceable(), torch.randn(2, 3))


def test_save_is_atomic_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proto = onnx_export.to_onnx(models.build("lenet300", (1, 8, 8), 10), torch.randn(2, 1, 8, 8))

    def boom(self: Path, data: bytes) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.save(proto, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
