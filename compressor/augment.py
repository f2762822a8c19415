"""Training-time data augmentation: random translations of image batches.

Shifting each training image by a few pixels is the standard cheap regularizer for small
image datasets such as digits. It needs capacity to pay off: fine-tuning LeNet-5 pruned 318x
with it made validation error worse (docs/results.md). Edges are replicated rather than
zero-filled, because inputs are normalised and zero is not the background there.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CompressError


def check_shiftable(input_shape: tuple[int, ...], max_shift: int) -> None:
    """Refuse shifts on inputs that are not (C, H, W) images, or larger than the image."""
    if max_shift == 0:
        return
    if len(input_shape) != 3:
        raise CompressError(f"--shift needs image inputs (C, H, W); this data's inputs are {tuple(input_shape)}; "
                            "drop --shift")
    if max_shift >= min(input_shape[1:]):
        raise CompressError(f"--shift {max_shift} is not smaller than the {input_shape[1]}x{input_shape[2]} images; "
                            "use a few pixels")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of the (N, C, H, W) batch ``x`` by its own random offset of up to
    ``max_shift`` pixels in each direction, replicating the edge pixels into the gap.

    Offsets are drawn on the CPU from ``generator``, so a run seeded per epoch draws the same
    shifts after a resume."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    rows = (torch.arange(h, device=x.device) + offsets[0, :, None])[:, None, :, None]  # N, 1, H, 1
    cols = (torch.arange(w, device=x.device) + offsets[1, :, None])[:, None, None, :]  # N, 1, 1, W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
