"""Atomic file output: a file either appears complete or not at all.

Everything this tool writes (ONNX models, checkpoints, reports) goes through these helpers,
so Ctrl-C, a full disk or a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success, rename it onto ``final``.

    The temporary file lives in the same directory so that the final ``os.replace`` is an
    atomic rename on POSIX. On any exception the temporary file is removed and the
    exception propagates.
    """
    final = Path(final)
    directory = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    except FileNotFoundError as exc:
        raise CompressError(f"cannot write {final}: directory {directory} does not exist; create it first") from exc
    except PermissionError as exc:
        raise CompressError(f"cannot write {final}: no permission to write in {directory}; choose another path") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise CompressError(f"cannot write {final}: the disk is full; free space or choose another path") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    write_bytes(final, text.encode("utf-8"))


def check_writable(final: str | os.PathLike[str]) -> None:
    """Fail early, before any long work, if ``final`` cannot be written.

    Creates and removes a temporary file in the target directory; the final path is
    never touched.
    """
    final = Path(final)
    if final.is_dir():
        raise CompressError(f"cannot write {final}: it is a directory; give a file name")
    directory = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".probe", dir=directory)
    except FileNotFoundError as exc:
        raise CompressError(f"cannot write {final}: directory {directory} does not exist; create it first") from exc
    except PermissionError as exc:
        raise CompressError(f"cannot write {final}: no permission to write in {directory}; choose another path") from exc
    os.close(fd)
    os.unlink(tmp_name)
