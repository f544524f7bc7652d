"""Outputs appear whole or not at all; inputs are never overwritten."""
import os

import pytest

from qkit.errors import UsageError
from qkit.fileio import atomic_path, atomic_write


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        f.write(b"new contents")
        assert p.read_bytes() == b"old"  # not visible until the block ends
    assert p.read_bytes() == b"new contents"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("keep me")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    p = tmp_path / "model.safetensors"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp != p
        tmp.write_bytes(b"x" * 10)
    assert p.read_bytes() == b"x" * 10


def test_refuses_to_overwrite_an_input(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"precious")
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        with atomic_write(src, inputs=(src,)) as f:
            f.write(b"oops")
    assert src.read_bytes() == b"precious"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="output directory does not exist"):
        with atomic_write(tmp_path / "nope" / "x.bin") as f:
            f.write(b"")
