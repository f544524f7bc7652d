"""The block types. Each mirrors one ``quantize_row_<type>_ref`` of llama.cpp's ggml-quants.c.

Elementwise float32 numpy operations round exactly like C's float arithmetic on
x86-64 (SSE, FLT_EVAL_METHOD 0); where C accumulates in a loop, the order of
the sum matters and the loop runs in Numba (qkit/ggml/search.py) instead.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

TYPES: dict[str, "BlockType"] = {}
f32 = np.float32


def fp16(x) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even), as the 2 stored bytes' value."""
    with np.errstate(over="ignore"):  # an overflow gives inf, which validate() reports
        return np.asarray(x, np.float32).astype(np.float16)


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly: trunc, then step by the sign when |fraction| >= 0.5."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: adding 1.5 * 2^23 rounds a float32 to an integer, ties to even."""
    x = np.asarray(x, np.float32)
    return ((x + f32(12582912.0)) - f32(12582912.0)).astype(np.int32)


class BlockType(ABC):
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    fp16_offsets: tuple = (0,)  # byte offsets of the block's fp16 scales (d, dmin, m)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        TYPES[cls.name] = cls()

    imatrix = False  # whether quantize_blocks honours importance weights (llama.cpp's _impl path)

    @abstractmethod
    def quantize_blocks(self, blocks: np.ndarray, qw=None) -> np.ndarray:
        """(n, block_size) float32 -> (n, type_size) uint8; qw: importance weights like blocks, or None."""

    @abstractmethod
    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """(n, type_size) uint8 -> (n, block_size) float32."""


def _amax_signed(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude per row, the first one on ties (C's strict `amax < fabsf(v)` scan)."""
    idx = np.argmax(np.abs(x), axis=1)
    return x[np.arange(x.shape[0]), idx]


def _inv(d: np.ndarray) -> np.ndarray:
    """id = d ? 1.0f/d : 0.0f"""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0)).astype(np.float32)


def _nibbles_halves(q: np.ndarray) -> np.ndarray:
    """Element j in the low nibble and j + 16 in the high nibble of byte j (the 32-weight types)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _unnibble_halves(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _qh_bits(q: np.ndarray) -> np.ndarray:
    """Fifth bits of 32 codes into a little-endian uint32: bit j = code j's bit 4."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _unqh_bits(qh: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((v >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _head(blocks: np.ndarray, *halves) -> list[np.ndarray]:
    """Split (n, type_size) bytes into fields of the given byte widths."""
    out, o = [], 0
    for w in halves:
        out.append(blocks[:, o:o + w])
        o += w
    return out


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _rows_imatrix(x: np.ndarray, imatrix: np.ndarray, nmax: int, affine: bool):
    """The first-pass codes of the importance-weighted 32-weight types (Numba), per row."""
    from qkit.ggml import search

    x = np.ascontiguousarray(x, np.float32)
    d = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    L = np.empty(x.shape, np.int32)
    w = np.ascontiguousarray(imatrix, np.float32)
    if affine:
        m = np.empty_like(d)
        search.rows_qkx3_imatrix(x, w, nmax, d, m, L)
        return d.reshape(-1), m.reshape(-1), L.reshape(-1, 32).astype(np.uint8)
    search.rows_qx_imatrix(x, w, nmax, d, L)
    return d.reshape(-1), None, L.reshape(-1, 32).astype(np.uint8)


class Q4_0(BlockType):
    """block_q4_0: d (fp16), qs[16]; x = (q - 8) * d. quantize_row_q4_0_ref."""

    name, block_size, type_size = "q4_0", 32, 18

    def quantize_blocks(self, x, qw=None):
        d = (_amax_signed(x) / f32(-8)).astype(np.float32)
        q = np.minimum(15, np.trunc(x * _inv(d)[:, None] + f32(8.5)).astype(np.int8)).astype(np.uint8)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), _nibbles_halves(q)], axis=1)

    def quantize_rows_imatrix(self, x, imatrix):
        """quantize_row_q4_0_impl: make_qx_quants(32, 8) with importance weights."""
        d, _, L = _rows_imatrix(x, imatrix, 8, False)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), _nibbles_halves(L)], axis=1)

    def dequantize_blocks(self, b):
        d, qs = _head(b, 2, 16)
        return (_unnibble_halves(qs).astype(np.int8) - np.int8(8)).astype(np.float32) * _f16(d)


class Q4_1(BlockType):
    """block_q4_1: d, m (fp16), qs[16]; x = d * q + m. quantize_row_q4_1_ref."""

    name, block_size, type_size = "q4_1", 32, 20
    fp16_offsets = (0, 2)

    def quantize_blocks(self, x, qw=None):
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = ((hi - lo) / f32(15)).astype(np.float32)
        q = np.minimum(15, np.trunc((x - lo[:, None]) * _inv(d)[:, None] + f32(0.5)).astype(np.int8)).astype(np.uint8)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), fp16(lo)[:, None].view(np.uint8),
                               _nibbles_halves(q)], axis=1)

    def quantize_rows_imatrix(self, x, imatrix):
        """quantize_row_q4_1_impl: make_qkx3_quants(32, 15) with importance weights."""
        d, m, L = _rows_imatrix(x, imatrix, 15, True)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), fp16(m)[:, None].view(np.uint8),
                               _nibbles_halves(L)], axis=1)

    def dequantize_blocks(self, b):
        d, m, qs = _head(b, 2, 2, 16)
        return _f16(d) * _unnibble_halves(qs).astype(np.float32) + _f16(m)


class Q5_0(BlockType):
    """block_q5_0: d (fp16), qh (32 fifth bits), qs[16]; x = (q - 16) * d. quantize_row_q5_0_ref."""

    name, block_size, type_size = "q5_0", 32, 22

    def quantize_blocks(self, x, qw=None):
        d = (_amax_signed(x) / f32(-16)).astype(np.float32)
        q = np.minimum(31, np.trunc(x * _inv(d)[:, None] + f32(16.5)).astype(np.int8)).astype(np.uint8)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), _qh_bits(q), _nibbles_halves(q & 0x0F)], axis=1)

    def quantize_rows_imatrix(self, x, imatrix):
        """quantize_row_q5_0_impl: make_qx_quants(32, 16) with importance weights."""
        d, _, L = _rows_imatrix(x, imatrix, 16, False)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), _qh_bits(L), _nibbles_halves(L & 0x0F)], axis=1)

    def dequantize_blocks(self, b):
        d, qh, qs = _head(b, 2, 4, 16)
        q = _unnibble_halves(qs) | (_unqh_bits(qh) << 4)
        return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * _f16(d)


class Q5_1(BlockType):
    """block_q5_1: d, m (fp16), qh, qs[16]; x = d * q + m. quantize_row_q5_1_ref."""

    name, block_size, type_size = "q5_1", 32, 24
    fp16_offsets = (0, 2)

    def quantize_blocks(self, x, qw=None):
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = ((hi - lo) / f32(31)).astype(np.float32)
        q = np.trunc((x - lo[:, None]) * _inv(d)[:, None] + f32(0.5)).astype(np.uint8)  # no clamp in C either
        return np.concatenate([fp16(d)[:, None].view(np.uint8), fp16(lo)[:, None].view(np.uint8), _qh_bits(q),
                               _nibbles_halves(q & 0x0F)], axis=1)

    def quantize_rows_imatrix(self, x, imatrix):
        """quantize_row_q5_1_impl: make_qkx3_quants(32, 31) with importance weights."""
        d, m, L = _rows_imatrix(x, imatrix, 31, True)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), fp16(m)[:, None].view(np.uint8), _qh_bits(L),
                               _nibbles_halves(L & 0x0F)], axis=1)

    def dequantize_blocks(self, b):
        d, m, qh, qs = _head(b, 2, 2, 4, 16)
        q = _unnibble_halves(qs) | (_unqh_bits(qh) << 4)
        return _f16(d) * q.astype(np.float32) + _f16(m)


class Q8_0(BlockType):
    """block_q8_0: d (fp16), qs[32] int8; x = q * d. quantize_row_q8_0_ref."""

    name, block_size, type_size = "q8_0", 32, 34

    def quantize_blocks(self, x, qw=None):
        d = (np.abs(x).max(axis=1) / f32(127)).astype(np.float32)
        q = roundf(x * _inv(d)[:, None]).astype(np.int8)
        return np.concatenate([fp16(d)[:, None].view(np.uint8), q.view(np.uint8)], axis=1)

    def dequantize_blocks(self, b):
        d, qs = _head(b, 2, 32)
        return _f16(d) * qs.view(np.int8).astype(np.float32)
