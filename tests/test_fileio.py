"""Atomic writes: the target holds the old bytes or the new ones, never a mix, and no temporary
file is left behind."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from lora_min.fileio import atomic_write_bytes, atomic_write_text
from lora_min.weights import write_safetensors


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    atomic_write_text(path, "new\nlines é\n")
    assert path.read_bytes() == "new\nlines é\n".encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write_half_then_fail(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(path, write_half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.fixture
def umask():
    """Set the process's umask for the test; restore it afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    """Like open(): mkstemp alone would make every file 0o600 whatever the umask."""
    umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    write_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    (tmp_path / "by-open.txt").write_text("reference")
    for name in ("a.json", "w.safetensors", "by-open.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_full_disk_names_the_file(tmp_path):
    def disk_full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        atomic_write_bytes(tmp_path / "resume.pt", disk_full)
    assert info.value.filename == str(tmp_path / "resume.pt") and info.value.errno == errno.ENOSPC


def test_the_file_gets_the_usual_permissions(tmp_path):
    """Like any new file (0o666 less the umask): an adapter written for sharing is not private."""
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "adapter.json", "{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
