"""Safetensors in and out, one tensor at a time.

WeightStore maps tensor names to the files that hold them (a single
``model.safetensors``, a sharded ``model.safetensors.index.json``, or any
``*.safetensors`` set) and reads a tensor (or a range of its rows) only when
asked, with plain file reads at the offsets of the header (checked against the
file first): nothing is mapped or held beyond what the caller keeps, so the
pages of a file read once (a float head quantized at load) do not count in the
process's RSS.
ShardedWriter writes a directory shard by shard (each shard an atomic file)
and the index last, so peak memory is one shard.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from qkit.errors import FormatError
from qkit.fileio import atomic_write, pause_point

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_header(path: Path) -> dict:
    """Parse and check a safetensors header against the file size, before anything is mapped."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise FormatError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ is not a string map)")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, data_len)
    return header


# safetensors' dtypes (safetensors/src/tensor.rs, enum Dtype) -> bits per element
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path: Path, name: str, info, data_len: int) -> None:
    """One tensor's dtype, shape and byte range, checked against each other and the file's data size."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list) \
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
        and all(_is_int(v) for v in info["data_offsets"]) \
        and all(_is_int(v) and 0 <= v < 1 << 62 for v in info["shape"])
    if not ok:
        raise FormatError(f"{path}: tensor {name!r} has a malformed header entry (dtype, shape, data_offsets)")
    start, end = info["data_offsets"]
    if not 0 <= start <= end <= data_len:
        raise FormatError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupt)")
    bits = DTYPE_BITS.get(info["dtype"])
    if bits is None:
        raise FormatError(f"{path}: tensor {name!r} has dtype {info['dtype'][:20]!r}, which qkit does not read")
    count = 1
    for d in info["shape"]:  # Python ints: a crafted shape cannot overflow
        count *= d
    if count * bits // 8 != end - start:
        raise FormatError(f"{path}: tensor {name!r}: shape {info['shape']} of {info['dtype']} needs "
                          f"{count * bits // 8} bytes, its data_offsets span {end - start}")


class WeightStore:
    """Lazy access to the tensors of a safetensors checkpoint (a file or a directory)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
                raise FormatError(f"{path / INDEX}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f and Path(f).name == f and f not in (".", "..")
                    for f in weight_map.values()):
                raise FormatError(f"{path / INDEX}: weight_map must map tensor names to file names in {path}")
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FormatError(f"{path}: shards listed in {INDEX} are missing: {', '.join(missing)}")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FormatError(f"{path}: no *.safetensors files")
        self.files = files
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        for f in files:
            header = read_header(f)
            with open(f, "rb") as fh:
                self._data_start[f] = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = f
                    self._info[name] = info

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._info[name]["dtype"]

    def get(self, name: str):
        """One tensor as a torch tensor in fresh memory (read(), the whole tensor)."""
        return self.read(name)

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """A tensor (or rows r0:r1 of its first axis) read with plain file reads into fresh memory, as a torch
        tensor. Unlike get(), nothing of the file is mapped into the process: pages read this way stay in the
        page cache and are not counted in the process's RSS (a memory map's touched pages are, until it is
        unmapped, and any tensor placed from it keeps the whole mapping alive)."""
        import torch

        if name not in self._where:
            raise FormatError(f"tensor {name!r} is not in the checkpoint ({len(self._where)} tensors)")
        f, info = self._where[name], self._info[name]
        shape, dtype = list(info["shape"]), info["dtype"]
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is None:
            raise FormatError(f"{f}: tensor {name!r} has dtype {dtype}, which qkit does not read this way")
        itemsize = DTYPE_BITS[dtype] // 8
        row = itemsize
        for d in shape[1:]:
            row *= d
        r0, r1 = (0, shape[0] if shape else 1) if rows is None else rows
        if shape:
            r0, r1 = max(0, min(r0, shape[0])), max(0, min(r1, shape[0]))
            r1 = max(r0, r1)
            shape[0] = r1 - r0
        start = self._data_start[f] + info["data_offsets"][0] + r0 * row
        n = (r1 - r0) * row if shape else itemsize
        buf = bytearray(n)
        try:
            with open(f, "rb", buffering=0) as fh:
                got = fh.readinto(memoryview(buf)) if fh.seek(start) == start else -1
        except OSError as e:
            raise FormatError(f"{f}: cannot read tensor {name!r} ({e.strerror})") from None
        if got != n:
            raise FormatError(f"{f}: tensor {name!r} is truncated")
        a = np.frombuffer(buf, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)  # the format is LE
        t = torch.from_numpy(a)
        view = _TORCH_VIEWS.get(dtype)
        return t.view(getattr(torch, view)) if view else t

    def close(self) -> None:
        """Nothing stays open between reads; kept for the readers' API."""


# safetensors dtype -> the numpy dtype its bytes are read as; the ones numpy lacks are then viewed by torch
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
                 "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32,
                 "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
                 "F8_E8M0": np.uint8}
_TORCH_VIEWS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


class ShardedWriter:
    """Write tensors into numbered shards of a directory, then the index (HF's sharded layout)."""

    def __init__(self, directory: str | os.PathLike, metadata: dict | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.shards: list[str] = []
        self.total_bytes = 0

    def write_shard(self, tensors: dict) -> str:
        """tensors: name -> torch tensor or numpy array. Written at once, atomically."""
        import torch
        from safetensors.torch import save

        tens = {k: (torch.from_numpy(np.array(v, copy=True, order='C')) if isinstance(v, np.ndarray) else v.contiguous())
                for k, v in tensors.items()}
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        blob = save(tens, metadata={"format": "pt", **self.metadata})
        with atomic_write(self.dir / name) as f:
            half = len(blob) // 2
            f.write(memoryview(blob)[:half])
            pause_point("shard.writing")  # crash-test hook (qkit.fileio): a half-written shard
            f.write(memoryview(blob)[half:])
        pause_point("shard.written")
        self.shards.append(name)
        for k, v in tens.items():
            self.weight_map[k] = name
            self.total_bytes += v.numel() * v.element_size()
        return name

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with atomic_write(self.dir / INDEX, "w") as f:
            json.dump(index, f, indent=1)
