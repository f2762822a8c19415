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


def test_checkpoint_on_a_full_disk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(self: Path, data) -> int:
        with open(self, "wb") as handle:
            handle.write(bytes(data)[:10])  # part of it lands, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(CompressError, match="disk is full"):
        checkpoint.save({"a": torch.zeros(1000)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = {"a": torch.arange(5.0), "epoch": 3}
    checkpoint.save(state, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["a"], state["a"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


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
