"""Checkpoint files: saving and safely loading models and training state.

A *model checkpoint* is a dict ``{"format", "arch", "input_shape", "num_classes",
"state_dict", ...}`` that ``torch.load(..., weights_only=True)`` can read, so opening a
checkpoint never executes code. Training state (optimizer, scheduler, history) lives in
the same kind of file under ``workdir/``.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import CompressError

CHECKPOINT_FORMAT = "compress-checkpoint/1"


def save(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Save ``obj`` with ``torch.save``, atomically.

    The pickle is built in memory and written with a plain file write: torch's own writer
    reports a full disk as an opaque ``RuntimeError``, a plain write as ``ENOSPC``, which
    :func:`atomic_path` turns into a clear message.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    **extra: Any,
) -> None:
    """Write a model checkpoint that ``compress PATH ...`` can load again."""
    save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch,
            "input_shape": list(input_shape),
            "num_classes": int(num_classes),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **extra,
        },
        path,
    )


class UnsafePickleError(CompressError):
    """The file holds arbitrary pickled objects; loading it could run code."""


def load_safely(path: str | os.PathLike[str]) -> Any:
    """Load a torch file with ``weights_only=True``.

    Raises :class:`UnsafePickleError` if the file needs full unpickling (for example a
    whole pickled ``nn.Module``) and :class:`CompressError` if it is missing or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only a reference to a class or function (a pickle GLOBAL) needs full unpickling;
        # any other refusal ("Unsupported operand ...") means the bytes are no torch file.
        if "Unsupported global" in str(exc):
            raise UnsafePickleError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), which can run "
                "arbitrary code when loaded; pass --allow-unsafe-pickle only if you trust the file, "
                "or save {'arch', 'state_dict'} instead"
            ) from exc
        raise CompressError(f"{path} is corrupt or not a PyTorch file (no torch.save pickle stream)") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CompressError(f"{path} is corrupt or not a PyTorch file ({_first_line(exc)})") from exc


def load_unsafely(path: str | os.PathLike[str]) -> Any:
    """Fully unpickle a torch file. Only for files the user explicitly trusts."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # anything can fail inside an arbitrary pickle
        raise CompressError(f"{path} could not be unpickled ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
