"""Outputs appear whole or not at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from compressor import checkpoint
from compressor.atomic import atomic_path, check_writable, write_text
from compressor.errors import CompressError


def test_write_replaces_atomically_and_keeps_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    write_text(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failure_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_disk_full_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="disk is full"):
        with atomic_path(tmp_path / "x.onnx"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_write_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CompressError, match="disk space"):
        checkpoint.save({"a": torch.zeros(1)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make_target,fragment",
    [
        pytest.param(lambda d: d / "missing" / "x.onnx", "does not exist", id="missing-directory"),
        pytest.param(lambda d: d, "is a directory", id="target-is-directory"),
    ],
)
def test_check_writable_rejects_bad_targets(tmp_path: Path, make_target, fragment: str) -> None:
    with pytest.raises(CompressError, match=fragment):
        check_writable(make_target(tmp_path))
    assert not (tmp_path / "x.onnx").exists()
