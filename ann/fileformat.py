"""qkit's index files: a fixed binary header, a small JSON table, raw arrays at 64-byte offsets.

Layout of a file (all little-endian):

    offset 0   magic (8 bytes: b"QKITANN\\0" for an index, b"QKITVEC\\0" for re-rank vectors)
           8   version u32                     (this reader knows 1; a newer file is refused)
          12   header_crc u32                  (CRC-32 of bytes 16 .. header_len)
          16   header_len u32                  (bytes before the first array, a multiple of 64)
          20   meta_len u32                    (bytes of JSON after the fixed fields)
          24   data_crc u32                    (CRC-32 of every array's bytes, in table order)
          28   reserved u32
          32   the kind's fixed fields         (INDEX_FIELDS or VECTOR_FIELDS below)
           .   JSON: {"arrays": [{"name", "dtype", "shape", "offset"}...], ...kind-specific}
           .   zero padding to header_len, then each array at its 64-byte-aligned offset

Nothing is unpickled: dtypes come from a short allow-list, shapes are checked
against the file size before anything is mapped, and the checksums catch a
torn or bit-flipped file. Arrays can be memory-mapped read-only
(``np.memmap``), so opening a large index costs no reads until search touches
the pages. Files are written through qkit.fileio.atomic_path (temp file,
fsync, rename).
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkit.errors import FormatError, InputError
from qkit.fileio import atomic_path, pause_point

VERSION = 1
ALIGN = 64
MAGIC_INDEX = b"QKITANN\0"
MAGIC_VECTORS = b"QKITVEC\0"
_PRE = struct.Struct("<8sIIIIII")  # magic, version, header_crc, header_len, meta_len, data_crc, reserved
# index: dim, metric, M, M0, ef_construction, ntotal, n_upper, entry, max_level, seed, codec, store
# (store: 0 none, 1 float, 2 u8, 3 sq8 -- the re-rank store in PATH.vectors)
INDEX_FIELDS = struct.Struct("<IB3xIIIQQqi4xQ16sB7x")
VECTOR_FIELDS = struct.Struct("<IIQ")  # dim, store kind, n
METRIC_CODES = {"l2": 0, "ip": 1, "cosine": 2}
_DTYPES = {"<i4": np.int32, "<i8": np.int64, "<f4": np.float32, "|u1": np.uint8}
MAX_META = 1 << 20


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def _bytes(a: np.ndarray) -> memoryview:
    """The array's bytes (empty arrays included: memoryview.cast refuses a zero in the shape)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _int(v) -> int:
    """A JSON integer (not a bool, a float or a string)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v


def crc_arrays(arrays: list[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        mv = _bytes(a)
        for s in range(0, len(mv), 1 << 24):
            crc = zlib.crc32(mv[s: s + (1 << 24)], crc)
    return crc


def write_file(path, magic: bytes, fixed: bytes, meta: dict, arrays: dict[str, np.ndarray], *, inputs=()) -> int:
    """Write one container to a temporary name and rename it into place; returns its size in bytes."""
    with atomic_path(path, inputs=inputs) as tmp:
        return _write_container(tmp, magic, fixed, meta, arrays)


def _write_container(tmp, magic: bytes, fixed: bytes, meta: dict, arrays: dict[str, np.ndarray]) -> int:
    table, offset = [], 0
    ordered = [(k, np.ascontiguousarray(v)) for k, v in arrays.items()]
    # offsets are relative to header_len, fixed after the JSON length is known: two passes
    for name, a in ordered:
        dt = a.dtype.str
        if dt not in _DTYPES:
            raise TypeError(f"array {name}: dtype {dt} is not storable")
        table.append({"name": name, "dtype": dt, "shape": list(a.shape), "offset": offset})
        offset = _align(offset + a.nbytes)
    meta = dict(meta, arrays=table)
    blob = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    header_len = _align(_PRE.size + len(fixed) + len(blob))
    data_crc = crc_arrays([a for _, a in ordered])
    body = fixed + blob
    head = bytearray(header_len)
    struct.pack_into("<IIII", head, 12 + 4, header_len, len(blob), data_crc, 0)
    head[_PRE.size: _PRE.size + len(body)] = body
    head[0:8] = magic
    struct.pack_into("<I", head, 8, VERSION)
    struct.pack_into("<I", head, 12, zlib.crc32(bytes(head[16:header_len])))
    with open(tmp, "wb") as f:
        f.write(head)
        pause_point("index.writing")  # crash-test hook (qkit.fileio): header written, arrays not
        pos = header_len
        for (name, a), t in zip(ordered, table):
            start = header_len + t["offset"]
            if start > pos:
                f.write(b"\0" * (start - pos))
            f.write(_bytes(a))
            pos = start + a.nbytes
        end = header_len + offset
        if end > pos:
            f.write(b"\0" * (end - pos))
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(tmp)


@dataclass
class Container:
    path: Path
    fixed: bytes
    meta: dict
    arrays: dict[str, np.ndarray]
    size: int
    data_crc: int


def read_file(path, magic: bytes, fixed_size: int, *, mmap: bool = True, verify: bool = True) -> Container:
    """Open a container: header checks always; the data checksum when verify (reads every byte once)."""
    path = Path(path)
    what = "index" if magic == MAGIC_INDEX else "vectors file"
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a qkit {what}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(_PRE.size)
        if len(pre) < _PRE.size:
            raise FormatError(f"{path}: too short to be a qkit {what} ({size} bytes)")
        mg, version, header_crc, header_len, meta_len, data_crc, _ = _PRE.unpack(pre)
        if mg != magic:
            other = "index" if mg == MAGIC_INDEX else "vectors file" if mg == MAGIC_VECTORS else None
            hint = f" (it is a qkit {other})" if other else ""
            raise FormatError(f"{path}: not a qkit {what}{hint}")
        if version > VERSION or version < 1:
            raise FormatError(f"{path}: format version {version}; this qkit reads version {VERSION}")
        if header_len % ALIGN or header_len > size or meta_len > MAX_META or \
                _PRE.size + fixed_size + meta_len > header_len:
            raise FormatError(f"{path}: header is truncated or corrupt")
        f.seek(16)
        rest = f.read(header_len - 16)
    if zlib.crc32(rest) != header_crc:
        raise FormatError(f"{path}: header checksum mismatch (file is corrupt)")
    fixed = rest[_PRE.size - 16: _PRE.size - 16 + fixed_size]
    try:
        meta = json.loads(rest[_PRE.size - 16 + fixed_size: _PRE.size - 16 + fixed_size + meta_len])
        table = meta["arrays"]
        specs = [(t["name"], _DTYPES[t["dtype"]], tuple(_int(s) for s in t["shape"]), _int(t["offset"]))
                 for t in table]
        if not isinstance(meta, dict) or len({s[0] for s in specs}) != len(specs) or \
                not all(isinstance(s[0], str) for s in specs):
            raise ValueError("array names are not unique strings")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{path}: header table is corrupt ({type(e).__name__})") from None
    arrays = {}
    for name, dt, shape, off in specs:
        nbytes = math.prod(shape) * np.dtype(dt).itemsize   # Python ints: no overflow on crafted shapes
        if off < 0 or off % ALIGN or any(s < 0 for s in shape) or header_len + off + nbytes > size:
            raise FormatError(f"{path}: truncated: array {name!r} runs past the end of the file")
        if nbytes == 0:
            arrays[name] = np.zeros(shape, dt)
        elif mmap:
            arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=header_len + off, shape=shape)
        else:
            with open(path, "rb") as f:
                f.seek(header_len + off)
                arrays[name] = np.fromfile(f, dtype=dt, count=nbytes // np.dtype(dt).itemsize).reshape(shape)
    if verify and mmap:
        # read the bytes with plain reads, not through the map: mapped pages that the checksum touched would
        # stay resident in this process, and a memory-mapped index is meant to cost memory only once searched
        crc = 0
        with open(path, "rb") as f:
            buf = bytearray(1 << 24)
            for name, dt, shape, off in specs:
                left = math.prod(shape) * np.dtype(dt).itemsize
                f.seek(header_len + off)
                while left:
                    got = f.readinto(memoryview(buf)[: min(left, len(buf))])
                    if not got:
                        raise FormatError(f"{path}: truncated while checking array {name!r}")
                    crc = zlib.crc32(memoryview(buf)[:got], crc)
                    left -= got
        if crc != data_crc:
            raise FormatError(f"{path}: data checksum mismatch (file is corrupt)")
    elif verify and crc_arrays(list(arrays.values())) != data_crc:
        raise FormatError(f"{path}: data checksum mismatch (file is corrupt)")
    return Container(path, fixed, meta, arrays, size, data_crc)
