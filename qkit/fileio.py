"""Crash-safe output files.

Every file qkit writes goes to a temporary name in the target directory and is
renamed into place only once complete (os.replace is atomic on POSIX within
one filesystem), so a crash or Ctrl-C never leaves a half-written output, and
an existing file is replaced whole or not at all.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from qkit.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_in(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    return Path(name)


def make_tmp_dir(target: Path) -> Path:
    """A temporary directory beside `target` (same filesystem, so it can be renamed into place)."""
    d = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place; an existing target is swapped out, then removed."""
    import shutil

    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`.

    For writers that want a file name (safetensors, gguf). `inputs` are files
    the caller reads: writing over one of them is refused, so inputs are
    never overwritten.
    """
    target = Path(path)
    if not target.parent.exists():
        raise UsageError(f"output directory does not exist: {target.parent}")
    if target.is_dir():
        raise UsageError(f"output {target} is a directory; give a file name")
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        if Path(src).resolve() == target.resolve() or (target.exists() and os.path.samefile(src, target)):
            raise UsageError(f"refusing to overwrite the input file {src}")
    tmp = _tmp_in(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, inputs=(), **open_kw) -> Iterator[IO]:
    """Open a temporary file for writing; rename it to `path` when the block ends cleanly."""
    if not mode.startswith(("w", "x")):
        raise UsageError(f"atomic_write needs a write mode, got {mode!r}")
    with atomic_path(path, inputs=inputs) as tmp:
        with open(tmp, mode.replace("x", "w"), **open_kw) as f:
            yield f
            f.flush()
