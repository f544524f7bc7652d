"""llama.cpp's legacy binary importance matrix (``imatrix.dat``), read with every size checked first.

Layout (little-endian), as llama.cpp's ``IMatrixCollector::save_imatrix_legacy``
(tools/imatrix/imatrix.cpp) writes it and ``common_imatrix_load_legacy``
(common/imatrix-loader.cpp) reads it::

    int32 n_entries
    n_entries x { int32 len; char name[len]; int32 ncall; int32 nval; float32 values[nval] }
    optional trailer: int32 chunk_count; int32 len; char dataset[len]

Each stored value is (sum of x_j^2 / token count) * ncall, so the importance
llama-quantize uses is value / ncall (tools/quantize/quantize.cpp,
``load_imatrix``, legacy branch; when ncall <= 0 it takes the values as they
are). That division is done in float32, as the C++ does (float / int64 -> float).

Unlike llama.cpp's stream reader, every declared count and length is checked
against the bytes that are left before anything is allocated, names must be
distinct non-empty UTF-8, values finite and non-negative, and nothing may follow
the trailer: a corrupt or foreign file ends in one FormatError.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from qkit.errors import FormatError

log = logging.getLogger("qkit.imatrix")
_MIN_ENTRY = 4 + 1 + 4 + 4 + 4   # len, a one-byte name, ncall, nval, one value


class _Cursor:
    """Reads little-endian fields from bytes, refusing any read past the end."""

    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not an imatrix GGUF nor a legacy imatrix.dat ({what} at byte {self.pos})")

    def int32(self, what: str) -> int:
        if self.left() < 4:
            raise self.fail(f"file ends inside {what}")
        (v,) = struct.unpack_from("<i", self.buf, self.pos)
        self.pos += 4
        return v

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} declares {n} bytes, {self.left()} are left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def read_legacy(path: str | Path) -> dict[str, np.ndarray]:
    """{gguf weight name: value / ncall (float32)} from a legacy imatrix.dat file."""
    path = Path(path)
    c = _Cursor(path.read_bytes(), path)
    n_entries = c.int32("the entry count")
    if n_entries < 1 or n_entries > c.left() // _MIN_ENTRY:
        raise c.fail(f"entry count {n_entries} does not fit a file of {len(c.buf)} bytes")
    out: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        n = c.int32(f"entry {i}'s name length")
        if n < 1:
            raise c.fail(f"entry {i} has a name length of {n}")
        try:
            name = c.take(n, f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise c.fail(f"entry {i}'s name is not UTF-8") from None
        if "\0" in name or name in out:
            raise c.fail(f"entry {i}'s name {name[:60]!r} is {'repeated' if name in out else 'not a tensor name'}")
        ncall = c.int32(f"{name}'s call count")
        nval = c.int32(f"{name}'s value count")
        if nval < 1 or nval > c.left() // 4:
            raise c.fail(f"{name} declares {nval} values, {c.left() // 4} fit in the file")
        values = np.frombuffer(c.take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all() or (values < 0).any():
            raise FormatError(f"{path}: {name} holds non-finite or negative values")
        if ncall > 0:
            values = values / np.float32(ncall)   # float32 / float32, as float / (int64 -> float) in C++
            if not np.isfinite(values).all():
                raise FormatError(f"{path}: {name} holds non-finite values")
        out[name] = values
    _trailer(c)
    return out


def _trailer(c: _Cursor) -> None:
    """The optional chunk count and dataset name after the entries (logged; nothing else may follow)."""
    if c.left() == 0:
        return
    chunks = c.int32("the chunk count")
    dataset = ""
    if c.left():
        n = c.int32("the dataset name length")
        if n < 0:
            raise c.fail(f"the dataset name length is {n}")
        dataset = c.take(n, "the dataset name").decode("utf-8", errors="replace")
    if c.left():
        raise c.fail(f"{c.left()} stray bytes after the trailer")
    log.debug("legacy imatrix %s: %d chunks of %r", c.path, chunks, dataset)
