"""Crash-safe output files.

Every file qkit writes goes to a temporary name in the target directory and is
renamed into place only once complete (os.replace is atomic on POSIX within
one filesystem), so a crash or Ctrl-C never leaves a half-written output, and
an existing file is replaced whole or not at all.

Temporary names carry their writer: ``.<target>.<host>-<pid>-<random>.tmp``
(and ``.<target>.old-<host>-<pid>`` for a directory being swapped out). A
process killed outright (SIGKILL, power loss) cannot remove its temporaries, so
the next write of the same target removes those whose process is gone (same
host, pid no longer running), and puts back a directory that was swapped out
when the kill came between the two renames of replace_dir.

Test hook: with ``QKIT_TEST_PAUSE=<point>[@<n>]`` in the environment, the n-th
(default first) arrival at ``pause_point(<point>)`` writes the process id to
the file named by ``QKIT_TEST_PAUSE_FILE`` (when set) and sleeps until killed,
so a test can SIGKILL a writer at a known point. Points: ``atomic.before_rename``
(a temporary file is complete, the target untouched), ``dir.before_replace``
(a temporary directory is complete), ``dir.swapped`` (the old directory moved
aside, the new one not yet in place), ``shard.writing`` (half of a safetensors
shard written), ``shard.written`` (a shard renamed into the temporary
directory), ``index.writing`` (an index header written, its arrays not). The
variable is read once at import; unset, a point costs one comparison.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from qkit.errors import UsageError

_PAUSE = os.environ.get("QKIT_TEST_PAUSE") or None
_pause_seen: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Sleep forever at the point QKIT_TEST_PAUSE names (a crash-test hook; a no-op when it is unset)."""
    if _PAUSE is None:
        return
    point, _, nth = _PAUSE.partition("@")
    if point != name:
        return
    _pause_seen[name] = _pause_seen.get(name, 0) + 1
    if _pause_seen[name] != int(nth or 1):
        return
    ready = os.environ.get("QKIT_TEST_PAUSE_FILE")
    if ready:
        Path(ready).write_text(str(os.getpid()))
    # short sleeps: a signal the kernel hands to another thread (BLAS/OpenMP workers) only sets CPython's
    # pending flag, which the main thread sees at its next bytecode, never inside one long sleep
    while True:
        time.sleep(0.05)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    """This machine's name as it appears in temporary names (letters, digits and '-' only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _owner() -> str:
    return f"{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or a pid no kernel gives
        return True
    return True


def _stale(owner: str) -> bool:
    """True when `owner` ("<host>-<pid>") names a process on this host that no longer runs."""
    host, _, pid = owner.rpartition("-")
    return host == _host() and pid.isdigit() and not _pid_alive(int(pid))


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `target` left by dead qkit processes on this host; returns what was removed.

    A directory swapped out by replace_dir is put back when the target is missing (the kill
    came between its two renames), else removed. Temporaries of live processes, of other
    hosts, and files that only look similar are left alone.
    """
    target = Path(target)
    parent = target.parent
    head = f".{target.name}."
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for n in sorted(names):
        if not n.startswith(head):
            continue
        rest = n[len(head):]
        m = re.fullmatch(r"(?P<owner>[A-Za-z0-9-]+-\d+)-[A-Za-z0-9_]+\.tmp", rest)
        old = re.fullmatch(r"old-(?P<owner>[A-Za-z0-9-]+-\d+)", rest)
        hit = m or old
        if hit is None or not _stale(hit.group("owner")):
            continue
        p = parent / n
        with contextlib.suppress(OSError):
            if old and not os.path.lexists(target):
                os.replace(p, target)  # the previous complete version goes back in place
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _tmp_in(target: Path) -> Path:
    remove_stale_temps(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{_owner()}-", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    return Path(name)


def make_tmp_dir(target: Path) -> Path:
    """A temporary directory beside `target` (same filesystem, so it can be renamed into place)."""
    target = Path(target)
    remove_stale_temps(target)
    d = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner()}-", suffix=".tmp", dir=target.parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place; an existing target is swapped out, then removed."""
    pause_point("dir.before_replace")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{_owner()}")
        os.replace(target, old)
        pause_point("dir.swapped")
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
        pause_point("atomic.before_rename")
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
