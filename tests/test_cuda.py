"""CUDA: every method trains on the GPU, matches the CPU update, and exports.

Skipped where no CUDA device is present (CI and the development machine have none); run on a
GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import models
from compressor.masks import Masks, prunable_parameters
from compressor.methods import PruningConfig, make
from compressor.regularizers import LOBSTER, OutputSensitivity
from compressor.structured import SeReNe, find_neurons
from compressor.train import Trainer, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["lobster", "sensitivity", "magnitude", "serene"])
def test_method_trains_on_cuda_and_keeps_pruned_zeros(method: str, synthetic, tmp_path: Path) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    model = models.build("lenet300", data.input_shape, data.num_classes)
    plugin = make(method, PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2), data.train.x[:2])
    trainer = Trainer(model, data, TrainConfig(epochs=8, lr=0.05, batch_size=16, device="cuda"), workdir=tmp_path,
                      plugin=plugin, progress=False, log=lambda s: None)
    trainer.fit()
    assert next(model.parameters()).is_cuda
    assert plugin.sparsity() > 0
    for _, p, mask in plugin.masks:
        assert p.is_cuda and torch.all(p[~mask] == 0)
    plugin.detach()


def _one_step(reg_factory, device: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = models.build("lenet5", (1, 28, 28), 10).to(device)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    y = (torch.arange(32) % 10).to(device)
    masks = Masks(prunable_parameters(model))
    reg = reg_factory(model, masks, x)
    out = model(x)
    reg.observe(out)
    nn.functional.cross_entropy(out, y).backward()
    reg.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda m, masks, x: LOBSTER(m, 0.1, masks), id="lobster"),
        pytest.param(lambda m, masks, x: OutputSensitivity(m, 0.1, masks), id="sensitivity-bound"),
        pytest.param(lambda m, masks, x: OutputSensitivity(m, 0.1, masks, exact=True), id="sensitivity-exact"),
        pytest.param(lambda m, masks, x: SeReNe(m, find_neurons(m, x[:2]), 0.1, masks), id="serene-bound"),
        pytest.param(lambda m, masks, x: SeReNe(m, find_neurons(m, x[:2]), 0.1, masks, exact=True), id="serene-exact"),
    ],
)
def test_regularizer_step_matches_cpu(factory) -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = _one_step(factory, "cpu"), _one_step(factory, "cuda")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cli_runs_on_cuda_end_to_end(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "gpu.onnx"
    res = run_cli("lenet300", "--method", "serene", "--data", "digits", "--device", "cuda", "--epochs", "6",
                  "--momentum", "0.9", "--pwe", "1", "--twt", "0.3", "--max-error-increase", "0.05", "--out", str(out), "-q")
    assert res.code == 0, res
    assert out.exists()
