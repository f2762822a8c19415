"""Model zoo: the reference architectures the toolchain can build by name."""

from __future__ import annotations

from typing import Callable

from torch import nn

from compressor.errors import CompressError

from .lenet import build_lenet5, build_lenet300
from .mobilenet import build_mobilenetv2
from .resnet import build_resnet32
from .vgg import build_vgg16

__all__ = ["available", "build"]

_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "lenet300": build_lenet300,
    "lenet5": build_lenet5,
    "mobilenetv2": build_mobilenetv2,
    "resnet32": build_resnet32,
    "vgg16": build_vgg16,
}


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_BUILDERS)


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a freshly initialised `name` for `input_shape` ((C, H, W) or (D,)) and `num_classes`.

    Raises CompressError for an unknown name or an input shape the architecture cannot take.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise CompressError(
            f"unknown model {name!r}; choose one of {', '.join(available())}, "
            "or pass a checkpoint file"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CompressError(f"{name} needs num_classes >= 1; got {num_classes!r}")
    return builder(tuple(input_shape), num_classes)
