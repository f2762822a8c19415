"""What training needs to run unchanged under ``torchrun`` (DistributedDataParallel).

DDP averages the parameter gradients across ranks during ``backward()``; anything else a
regularizer derives from the local batch (output sensitivities computed with
``torch.autograd.grad``, which DDP does not see) must be averaged the same way, or the ranks
would shrink different parameters and the replicas would drift apart. Decisions (plateaus,
thresholds, when to stop, checkpoints) are taken on rank 0 and sent to the others.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the running torch.distributed job (1 outside one)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process takes the decisions and writes the files (rank 0, or no job)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the job ``torchrun`` describes in the environment; returns whether this call did.

    gloo on CPU, nccl on CUDA (each rank on the GPU of its LOCAL_RANK)."""
    if not launched_by_torchrun() or active():
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here; a no-op outside a job."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for states and decisions)."""
    if world_size() == 1:
        return obj
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on every rank (one tiny all-reduce)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (the values themselves outside a job)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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
