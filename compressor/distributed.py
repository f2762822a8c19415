"""What the regularizers need to run unchanged under ``torchrun`` (DistributedDataParallel).

DDP averages the parameter gradients across ranks during ``backward()``; anything else a
regularizer derives from the local batch (output sensitivities computed with
``torch.autograd.grad``, which DDP does not see) must be averaged the same way, or the ranks
would shrink different parameters and the replicas would drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks of the running torch.distributed job (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the ranks; a no-op without a job.

    One all-reduce for the whole list, so a call costs about one gradient synchronisation.
    """
    size = world_size()
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(size)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
