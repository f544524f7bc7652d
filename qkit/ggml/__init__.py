"""GGML block formats: one class per type, quantize/dequantize over (n_blocks, ...) arrays.

Byte layouts follow llama.cpp's ``ggml/src/ggml-common.h``; the quantizers
transcribe the reference (no importance matrix) functions of
``ggml/src/ggml-quants.c`` (``quantize_row_*_ref``) in float32, in C's order
of operations, so their bytes equal llama.cpp's. Pinned to the llama.cpp
vendored in llama-cpp-python 0.3.36.

    from qkit import ggml
    blocks = ggml.quantize(W, "q4_K")          # (rows, row_bytes) uint8, rows of a multiple of 256
    W_hat = ggml.dequantize(blocks, "q4_K", W.shape)
"""
from __future__ import annotations

import numpy as np

from qkit.errors import InputError, UsageError
from qkit.ggml import kquants  # noqa: F401  (registers the K types beside the legacy ones of blocks)
from qkit.ggml.blocks import TYPES, BlockType  # noqa: F401  (registers the legacy types)


def get_type(name: str) -> BlockType:
    t = TYPES.get(name) or {k.lower(): v for k, v in TYPES.items()}.get(str(name).lower())
    if t is None:
        raise UsageError(f"unknown GGML type {name!r}; available: {', '.join(sorted(TYPES))}")
    return t


def quantize(data, qtype: str, imatrix=None) -> np.ndarray:
    """float rows (..., n) -> uint8 (..., n / block_size * type_size); n must be a multiple of the block size.

    imatrix: per-column importance (n,) as llama.cpp's imatrix gives it; selects the importance-weighted
    quantizers (quantize_row_<type>_impl via ggml_quantize_chunk). q8_0 ignores it, as llama.cpp does.
    """
    t = get_type(qtype)
    x = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    if x.ndim == 0 or x.shape[-1] % t.block_size:
        raise InputError(f"{t.name} needs rows whose length is a multiple of {t.block_size}, got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise InputError(f"{t.name}: input contains NaN or Inf")
    blocks = x.reshape(-1, t.block_size)
    qw = None
    if imatrix is not None and t.name != "q8_0":
        if not t.imatrix and not hasattr(t, "quantize_rows_imatrix"):
            raise UsageError(f"{t.name} with an importance matrix is not available yet "
                             f"(types that take one: {', '.join(n for n, b in TYPES.items() if b.imatrix)})")
        w = np.asarray(imatrix, dtype=np.float32)
        if w.shape != (x.shape[-1],):
            raise InputError(f"importance matrix has shape {w.shape}, expected ({x.shape[-1]},) for rows of "
                             f"{x.shape[-1]}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise InputError("importance weights must be finite and non-negative")
        if hasattr(t, "quantize_rows_imatrix"):  # statistics over the whole row (the 32-weight types)
            out = t.quantize_rows_imatrix(x.reshape(-1, x.shape[-1]), w)
            return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)
        qw = np.ascontiguousarray(np.broadcast_to(w, x.shape)).reshape(-1, t.block_size)
    out = t.quantize_blocks(blocks, qw)
    return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)


def validate(data, qtype: str) -> None:
    """ggml_validate_row_data's check on the fp16 scales: a scale that overflowed fp16 makes the block garbage."""
    t = get_type(qtype)
    b = np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).reshape(-1, t.type_size)
    for off in t.fp16_offsets:
        d = b[:, off:off + 2].copy().view(np.float16)
        if not np.isfinite(d).all():
            raise InputError(f"{t.name}: a block scale overflows fp16 (weights too large for this type)")


def dequantize(data, qtype: str, shape=None) -> np.ndarray:
    """uint8 (..., row_bytes) -> float32 (..., row_bytes / type_size * block_size), or `shape` if given."""
    t = get_type(qtype)
    b = np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
    if b.ndim == 0 or b.shape[-1] % t.type_size:
        raise InputError(f"{t.name} rows must be a multiple of {t.type_size} bytes, got shape {b.shape}")
    out = t.dequantize_blocks(b.reshape(-1, t.type_size))
    out = out.reshape(*b.shape[:-1], b.shape[-1] // t.type_size * t.block_size)
    return out.reshape(shape) if shape is not None else out
