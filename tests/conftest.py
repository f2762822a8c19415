"""Shared fixtures: tiny in-memory datasets and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.data import Dataset, Split

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def make_dataset(n: int = 64, shape: tuple[int, ...] = (1, 8, 8), classes: int = 3, seed: int = 0) -> Dataset:
    """A small, learnable synthetic dataset (class = which third of the image is bright)."""
    g = torch.Generator().manual_seed(seed)

    def split(count: int) -> Split:
        y = torch.arange(count) % classes
        x = torch.randn(count, *shape, generator=g) * 0.3
        flat = x.view(count, -1)
        width = flat.shape[1] // classes
        for c in range(classes):
            flat[y == c, c * width : (c + 1) * width] += 1.0
        return Split(x, y.long())

    return Dataset(
        name="synthetic",
        spec="synthetic",
        train=split(n),
        val=split(n // 4),
        test=split(n // 4),
        input_shape=shape,
        num_classes=classes,
        mean=(0.0,),
        std=(1.0,),
    )


@pytest.fixture
def tiny_data() -> Dataset:
    return make_dataset()


@pytest.fixture
def synthetic():
    """The :func:`make_dataset` factory, for tests that need several datasets."""
    return make_dataset


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err[-500:]!r})"


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Call the console entry point in-process; returns exit code, stdout and stderr."""
    from compressor.cli import main

    def run(*args: str) -> CliResult:
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
