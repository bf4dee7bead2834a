"""Atomic writes: the target holds the old bytes or the new ones, never a mix, and no temporary
file is left behind."""
from __future__ import annotations

import pytest

from lora_min.fileio import atomic_write_bytes, atomic_write_text


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
