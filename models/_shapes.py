"""Input-shape checks shared by the architectures."""

from __future__ import annotations

from compressor.errors import CompressError


def image_shape(arch: str, input_shape: tuple[int, ...], min_hw: int = 1) -> tuple[int, int, int]:
    """Return (C, H, W), or raise CompressError if `input_shape` is not an image this arch takes."""
    shape = tuple(input_shape)
    if len(shape) != 3 or any(int(d) < 1 for d in shape) or min(shape[1:]) < min_hw:
        need = f"H, W >= {min_hw}" if min_hw > 1 else "positive sizes"
        raise CompressError(
            f"{arch} needs an image input (C, H, W) with {need}; got {shape}"
        )
    c, h, w = (int(d) for d in shape)
    return c, h, w
