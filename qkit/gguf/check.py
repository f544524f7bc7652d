"""A bounded structural check of a GGUF file, run before gguf-py's reader sees it.

gguf-py's ``GGUFReader`` trusts the counts it reads: an array that declares
2^60 items past the end of the file makes it loop forever appending empty
views, a tensor with 2^32 dimensions or an unknown type raises whatever numpy
raises. This walk follows the layout of llama.cpp's ``ggml/docs/gguf.md``
(header: magic "GGUF", u32 version, u64 tensor count, u64 key-value count;
each key-value: string key, u32 value type, value; each tensor info: string
name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset into the data
section, which starts at the next multiple of ``general.alignment``) and checks
every count and size against the bytes the file actually has before anything
is read or allocated. Strings are u64 length + bytes; arrays are u32 item type,
u64 count, items. Big-endian files (version's low half zero, as gguf-py
detects them) are walked with swapped byte order.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from qkit.errors import FormatError

VERSIONS = (2, 3)
MAX_DIMS = 4          # GGML_MAX_DIMS in ggml.h
MAX_ARRAY_DEPTH = 4   # gguf.md allows arrays of arrays; real files use none
DEFAULT_ALIGNMENT = 32
# value type -> size of a scalar (gguf.md, enum gguf_metadata_value_type); 8 string, 9 array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (block size in elements, bytes per block), as the gguf package knows them."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}


class _Walk:
    def __init__(self, buf, path: Path, order: str):
        self.buf, self.path, self.order, self.pos = buf, path, order, 0
        self.size = len(buf)

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: corrupt GGUF ({what} at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file ({self.size} bytes)")

    def u(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.u("Q", f"{what} length")
        self.need(n, what)
        s = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        """Skip (or, for scalars and strings, return) one value of `vtype`."""
        if vtype in _SCALAR:
            n = _SCALAR[vtype]
            self.need(n, what)
            fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}[vtype]
            return self.u(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            itype = self.u("I", f"{what} item type")
            count = self.u("Q", f"{what} count")
            if itype in _SCALAR:
                self.need(count * _SCALAR[itype], f"{what} ({count} items)")
                self.pos += count * _SCALAR[itype]
                return None
            if itype not in (_STRING, _ARRAY):
                raise self.fail(f"{what}: unknown array item type {itype}")
            # each string item takes at least its 8-byte length, each array at least 12 bytes
            self.need(count * (8 if itype == _STRING else 12), f"{what} ({count} items)")
            for _ in range(count):
                self.value(itype, what, depth + 1)
            return None
        raise self.fail(f"{what}: unknown value type {vtype}")


def check_gguf(path: str | Path) -> dict:
    """Walk the header and tensor table; FormatError on anything inconsistent with the file's size.

    Returns {"version", "tensors": [(name, dims, type, offset, nbytes)], "data_offset", "alignment"}.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise FormatError(f"{path}: not a GGUF file ({size} bytes, shorter than the 24-byte header)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf, path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _walk(buf, path: Path) -> dict:
    if bytes(buf[:4]) != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = ">" if version & 0xFFFF == 0 else "<"  # gguf-py's test for a byte-swapped file
    w = _Walk(buf, path, order)
    w.pos = 4
    version = w.u("I", "version")
    if version not in VERSIONS:
        raise FormatError(f"{path}: GGUF version {version}; qkit reads versions {', '.join(map(str, VERSIONS))}")
    n_tensors = w.u("Q", "tensor count")
    n_kv = w.u("Q", "key-value count")
    # smallest key-value: empty key (8) + type (4) + one byte; smallest tensor info: 8 + 4 + 4 + 8
    w.need(n_kv * 13 + n_tensors * 24, f"{n_kv} key-values and {n_tensors} tensor infos")
    alignment = DEFAULT_ALIGNMENT
    keys = set()
    for i in range(n_kv):
        key = w.string(f"key {i}")
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise w.fail(f"key {i} is not UTF-8") from None
        if name in keys:
            raise w.fail(f"duplicate key {name!r}")
        keys.add(name)
        vtype = w.u("I", f"type of {name!r}")
        v = w.value(vtype, repr(name))
        if name == "general.alignment":
            if vtype != 4 or v == 0 or v & (v - 1):
                raise w.fail("general.alignment must be a u32 power of two")
            alignment = v
    sizes = _quant_sizes()
    infos, names = [], set()
    for i in range(n_tensors):
        raw = w.string(f"name of tensor {i}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise w.fail(f"name of tensor {i} is not UTF-8") from None
        if name in names:
            raise w.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = w.u("I", f"{name}: n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS})")
        dims = [w.u("Q", f"{name}: dims") for _ in range(n_dims)]
        ttype = w.u("I", f"{name}: type")
        off = w.u("Q", f"{name}: offset")
        if ttype not in sizes:
            raise w.fail(f"tensor {name!r} has unknown ggml type {ttype}")
        block, bytes_per_block = sizes[ttype]
        n = 1
        for d in dims:   # Python ints: a crafted product cannot overflow
            n *= d
        if dims[0] % block:
            raise w.fail(f"tensor {name!r}: {dims[0]} columns are not whole blocks of {block}")
        infos.append((name, dims, ttype, off, n // block * bytes_per_block))
    data_offset = -(-w.pos // alignment) * alignment
    for name, dims, ttype, off, nbytes in infos:
        if off % alignment:
            raise FormatError(f"{path}: corrupt GGUF (tensor {name!r} offset {off} is not a multiple of "
                              f"the alignment {alignment})")
        if data_offset + off + nbytes > len(buf):
            raise FormatError(f"{path}: truncated GGUF (tensor {name!r} needs bytes up to "
                              f"{data_offset + off + nbytes}, the file has {len(buf)})")
    return {"version": version, "tensors": infos, "data_offset": data_offset, "alignment": alignment}


def open_reader(path: str | Path):
    """gguf-py's reader over a file that passed check_gguf; any error it still raises becomes a FormatError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file" if not path.exists() else f"{path}: not a regular file")
    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the walk above passed; whatever gguf-py still refuses is a bad file
        msg = str(e).splitlines()[0] if str(e) else ""
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {msg})") from None
