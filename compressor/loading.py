"""Resolve the user's MODEL argument: a zoo name, a checkpoint file, or (opt-in) a pickled module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import models as zoo

from . import checkpoint
from .data import Dataset
from .errors import CompressError


@dataclass
class LoadedModel:
    model: nn.Module
    name: str                 # zoo architecture name, or the file stem for a pickled module
    source: str               # "zoo", "checkpoint" or "pickle"
    trained: bool             # False for a fresh zoo model


def load_model(spec: str, data: Dataset, *, allow_unsafe_pickle: bool = False) -> LoadedModel:
    """Turn MODEL into a module that fits ``data``; raise CompressError with the fix otherwise."""
    path = Path(spec)
    if path.is_file():
        loaded = _load_file(path, data, allow_unsafe_pickle)
    elif spec in zoo.available():
        loaded = LoadedModel(zoo.build(spec, data.input_shape, data.num_classes), spec, "zoo", trained=False)
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin") or "/" in spec:
        raise CompressError(f"{spec}: no such file")
    else:
        raise CompressError(f"unknown model {spec!r}; choose one of {', '.join(zoo.available())}, or pass a checkpoint file")
    check_fits(loaded.model, data, spec)
    return loaded


def _load_file(path: Path, data: Dataset, allow_unsafe_pickle: bool) -> LoadedModel:
    try:
        obj = checkpoint.load_safely(path)
    except checkpoint.UnsafePickleError:
        if not allow_unsafe_pickle:
            raise
        obj = checkpoint.load_unsafely(path)
        if not isinstance(obj, nn.Module):
            raise CompressError(f"{path} unpickled to a {type(obj).__name__}, not an nn.Module")
        return LoadedModel(obj.float().cpu(), path.stem, "pickle", trained=True)
    if isinstance(obj, nn.Module):  # possible only for modules made of allow-listed types
        return LoadedModel(obj.float().cpu(), path.stem, "pickle", trained=True)
    if not isinstance(obj, dict):
        raise CompressError(f"{path} holds a {type(obj).__name__}; expected a checkpoint dict with 'arch' and 'state_dict'")
    if "arch" not in obj or "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CompressError(
                f"{path} holds a bare state_dict, so the architecture is unknown; "
                "save {'arch': <zoo name>, 'state_dict': model.state_dict()} instead"
            )
        raise CompressError(f"{path} is not a checkpoint of this tool: it lacks 'arch' and 'state_dict' keys")
    arch = obj["arch"]
    saved_shape = tuple(obj.get("input_shape") or data.input_shape)
    saved_classes = int(obj.get("num_classes") or data.num_classes)
    if saved_shape != tuple(data.input_shape) or saved_classes != data.num_classes:
        raise CompressError(
            f"{path} was made for input {saved_shape} with {saved_classes} classes, but the data "
            f"has input {tuple(data.input_shape)} with {data.num_classes} classes; use matching --data"
        )
    model = zoo.build(arch, saved_shape, saved_classes)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise CompressError(f"{path}: weights do not match architecture {arch!r} ({detail[1].strip() if len(detail) > 1 else detail[0]})") from exc
    return LoadedModel(model, arch, "checkpoint", trained=True)


def check_fits(model: nn.Module, data: Dataset, spec: str) -> None:
    """Run two training samples through the model: it must return [2, num_classes] logits."""
    x = data.train.x[:2]
    model_was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise CompressError(
            f"model {spec} does not accept the data's input shape {tuple(data.input_shape)}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    finally:
        model.train(model_was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (len(x), data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompressError(
            f"model {spec} returns {shape} for a batch of {len(x)}, but the data has {data.num_classes} classes; "
            "the model's last layer must output one logit per class"
        )
