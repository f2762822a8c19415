"""Random-shift augmentation: what each image becomes, determinism, and its place in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.augment import check_shiftable, random_shift
from compressor.errors import CompressError
from compressor.train import Trainer, TrainConfig


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) with edge pixels replicated, by explicit loops."""
    c, h, w = image.shape
    out = torch.empty_like(image)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = image[:, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


@pytest.mark.parametrize("max_shift", [1, 2], ids=["shift1", "shift2"])
def test_every_image_is_itself_translated_within_the_range(max_shift: int) -> None:
    x = torch.randn(16, 2, 5, 6)
    out = random_shift(x, max_shift, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for image, moved in zip(x, out):
        matches = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
                   if torch.equal(_shifted(image, dy, dx), moved)]
        assert matches, "an output image is no translation of its input"
        seen.add(matches[0])
    assert len(seen) > 1  # images get their own offsets, not one for the batch


def test_shift_is_deterministic_per_generator_and_zero_is_identity() -> None:
    x = torch.randn(8, 1, 7, 7)
    a = random_shift(x, 2, torch.Generator().manual_seed(5))
    b = random_shift(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert random_shift(x, 0, torch.Generator()) is x


@pytest.mark.parametrize("shape, shift, message", [
    pytest.param((64,), 1, "needs image inputs", id="flat-features"),
    pytest.param((1, 8, 8), 8, "not smaller than the 8x8 images", id="larger-than-image"),
])
def test_unusable_shift_is_a_clear_error(shape, shift: int, message: str) -> None:
    with pytest.raises(CompressError, match=message):
        check_shiftable(shape, shift)
    check_shiftable(shape, 0)  # off: anything goes


def test_negative_shift_is_refused() -> None:
    with pytest.raises(CompressError, match="--shift must be >= 0"):
        TrainConfig(shift=-1).validate()


def test_training_with_shift_changes_the_run_and_resumes_exactly(tmp_path: Path, synthetic) -> None:
    data = synthetic(n=96)
    assert len(data.input_shape) == 3

    def trained(shift: int, epochs: int, workdir: Path, resume: bool = False) -> Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(data.input_shape[0], 4, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * (data.input_shape[1] - 2) * (data.input_shape[2] - 2), data.num_classes))
        trainer = Trainer(model, data, TrainConfig(epochs=epochs, lr=0.05, batch_size=16, shift=shift),
                          workdir=workdir, progress=False, log=lambda s: None)
        if resume:
            assert trainer.resume()
        trainer.fit()
        return trainer

    plain = trained(0, 4, tmp_path / "plain")
    straight = trained(1, 4, tmp_path / "a")
    trained(1, 2, tmp_path / "b")
    resumed = trained(1, 4, tmp_path / "b", resume=True)
    assert [h["train_loss"] for h in straight.history] != [h["train_loss"] for h in plain.history]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
