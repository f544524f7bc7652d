"""Codes to bytes and back.

Every layout here is one rule: codes of `bits` bits laid end to end in a
little-endian bit stream, code k occupying stream bits [k*bits, (k+1)*bits),
least significant bit first. Bytes (and int32 words) are then cut from the
stream in order. What differs between formats is only the axis packed and,
for AWQ, a fixed permutation applied first.

Nibbles (bits=4), two codes per byte, low nibble = even index:

    byte j:  7 6 5 4 | 3 2 1 0
             code 2j+1 | code 2j

2-bit, four codes per byte:   byte j = c[4j+3] c[4j+2] c[4j+1] c[4j]  (c[4j] in bits 0-1)

3-bit, eight codes in three bytes (24-bit stream, LSB first):

    byte 0: c2[1:0] c1 c0          (c0 bits 0-2, c1 bits 3-5, c2 low bits 6-7)
    byte 1: c5[0] c4 c3 c2[2]      (c2 high bit 0, c3 bits 1-3, c4 bits 4-6, c5 low bit 7)
    byte 2: c7 c6 c5[2:1]

1-bit (bit planes, RaBitQ codes): bit i in byte i // 8 at position i % 8
(numpy's ``packbits(bitorder="little")``).

GPTQ int32 (qweight, shape (in * bits / 32, out)): codes packed along the
input dimension, 32 / bits codes per little-endian int32 for 2/4/8 bits:

    word:  31 ........................................ 0
    4-bit:  c7   c6   c5   c4   c3   c2   c1   c0        (c0 = input row 0)

For 3 bits, 32 codes fill three words (96-bit stream) as in the GPTQ
reference's ``QuantLinear.pack``: word 0 holds c0..c9 and the low two bits of
c10, word 1 the high bit of c10, c11..c20 and the low bit of c21, word 2 the
high two bits of c21 and c22..c31. qzeros packs the same way along the output
dimension.

Signed int4 values (-8..7) are stored as two's-complement nibbles (v & 0xF).

Bit planes of a B-bit query (RaBitQ's bit-sliced query): plane j holds bit j
of every code, each plane packed as 1-bit codes; (B, ceil(d / 8)) bytes.

FastScan blocks (4-bit codes of M sub-spaces, 32 vectors per block): block b
is (M, 16) bytes; byte k of sub-space m holds vector 32b + k in its low nibble
and vector 32b + 16 + k in its high nibble:

    block b, sub-space m:  byte 0            byte 1           ...  byte 15
                           v16 | v0          v17 | v1              v31 | v15
                           (high | low nibble, vectors counted within the block)

so one 16-byte load per sub-space feeds two vpshufb table lookups (low and
high nibbles) for all 32 vectors. Vectors past n in the last block are 0.

AWQ GEMM (qweight, shape (in, out * bits / 32)): packed along the output
dimension, but within each word of eight 4-bit codes, nibble slot i holds
output column 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
(AutoAWQ ``gemm.py``; unpacking applies AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]).
"""
from __future__ import annotations

import numpy as np

from qkit.errors import InputError, UsageError

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
AWQ_REVERSE_ORDER = np.argsort(AWQ_ORDER)


def _check_codes(codes, bits: int) -> np.ndarray:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise UsageError(f"bits must be an integer in 1..8, got {bits!r}")
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise InputError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise InputError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, "
                         f"got range [{codes.min()}, {codes.max()}]")
    return codes.astype(np.uint8, copy=False)


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for n codes of `bits` bits (the last byte zero-padded)."""
    return -(-n * bits // 8)


def pack_bits(codes, bits: int, axis: int = -1) -> np.ndarray:
    """Pack codes along `axis` into a uint8 LSB-first bit stream; the last byte is zero-padded."""
    c = np.moveaxis(_check_codes(codes, bits), axis, -1)
    n = c.shape[-1]
    per = 8 // bits if 8 % bits == 0 else 0
    if per and n % per == 0:
        # fast path: whole codes per byte, shift-and-or
        g = c.reshape(*c.shape[:-1], n // per, per).astype(np.uint8)
        out = np.zeros(g.shape[:-1], dtype=np.uint8)
        for k in range(per):
            out |= g[..., k] << np.uint8(k * bits)
    else:
        planes = np.unpackbits(c[..., None], axis=-1, count=bits, bitorder="little")
        stream = planes.reshape(*c.shape[:-1], n * bits)
        out = np.packbits(stream, axis=-1, bitorder="little")
    return np.moveaxis(out, -1, axis)


def unpack_bits(packed, bits: int, count: int, axis: int = -1) -> np.ndarray:
    """Inverse of pack_bits: the first `count` codes along `axis`, as uint8."""
    p = np.moveaxis(np.asarray(packed), axis, -1)
    if p.dtype != np.uint8:
        raise InputError(f"packed codes must be uint8, got {p.dtype}")
    if p.shape[-1] != packed_length(count, bits):
        raise InputError(f"{count} codes of {bits} bits need {packed_length(count, bits)} bytes, "
                         f"got {p.shape[-1]}")
    per = 8 // bits if 8 % bits == 0 else 0
    if per and count % per == 0:
        mask = np.uint8(2**bits - 1)
        out = np.stack([(p >> np.uint8(k * bits)) & mask for k in range(per)], axis=-1)
        out = out.reshape(*p.shape[:-1], count)
    else:
        stream = np.unpackbits(p, axis=-1, count=count * bits, bitorder="little")
        planes = stream.reshape(*p.shape[:-1], count, bits)
        out = np.packbits(planes, axis=-1, bitorder="little")[..., 0]
    return np.moveaxis(out, -1, axis)


def pack_nibbles(codes, axis: int = -1) -> np.ndarray:
    return pack_bits(codes, 4, axis)


def unpack_nibbles(packed, count: int, axis: int = -1) -> np.ndarray:
    return unpack_bits(packed, 4, count, axis)


def pack_int32(codes, bits: int, axis: int = 0) -> np.ndarray:
    """Pack codes along `axis` into little-endian int32 words (GPTQ's qweight/qzeros layout)."""
    c = np.moveaxis(_check_codes(codes, bits), axis, -1)
    n = c.shape[-1]
    if (n * bits) % 32:
        raise InputError(f"{n} codes of {bits} bits do not fill whole int32 words "
                         f"(need a multiple of {32 // np.gcd(32, bits)} along the packed axis)")
    words = np.ascontiguousarray(pack_bits(c, bits, axis=-1)).view("<i4")
    return np.moveaxis(words.astype(np.int32, copy=False), -1, axis)


def unpack_int32(words, bits: int, axis: int = 0) -> np.ndarray:
    """Inverse of pack_int32: uint8 codes, 32 * n_words / bits of them along `axis`."""
    w = np.moveaxis(np.asarray(words), axis, -1)
    if w.dtype not in (np.dtype(np.int32), np.dtype(np.uint32)):
        raise InputError(f"packed words must be int32, got {w.dtype}")
    n = w.shape[-1] * 32 // bits
    b = np.ascontiguousarray(w.astype("<i4", copy=False)).view(np.uint8)
    return np.moveaxis(unpack_bits(b, bits, n, axis=-1), -1, axis)


def pack_gptq_qweight(intweight, bits: int) -> np.ndarray:
    """intweight (in, out) codes -> qweight (in * bits / 32, out) int32."""
    return pack_int32(intweight, bits, axis=0)


def unpack_gptq_qweight(qweight, bits: int) -> np.ndarray:
    return unpack_int32(qweight, bits, axis=0)


def pack_gptq_qzeros(zeros, bits: int) -> np.ndarray:
    """zeros (n_groups, out) -> qzeros (n_groups, out * bits / 32) int32.

    The stored value convention (v1 stores zero - 1) belongs to the exporter, not to packing.
    """
    return pack_int32(zeros, bits, axis=1)


def unpack_gptq_qzeros(qzeros, bits: int) -> np.ndarray:
    return unpack_int32(qzeros, bits, axis=1)


def pack_awq(codes, bits: int = 4) -> np.ndarray:
    """codes (rows, out) -> (rows, out / 8) int32 in AWQ's interleaved order (qweight and qzeros alike)."""
    if bits != 4:
        raise UsageError(f"AWQ GEMM packing is defined for 4 bits, got {bits}")
    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[1] % 8:
        raise InputError(f"AWQ packing needs a 2-D array with a multiple of 8 columns, got shape {c.shape}")
    perm = (np.arange(c.shape[1]).reshape(-1, 8)[:, AWQ_ORDER]).reshape(-1)
    return pack_int32(c[:, perm], bits, axis=1)


def unpack_awq(words, bits: int = 4) -> np.ndarray:
    if bits != 4:
        raise UsageError(f"AWQ GEMM packing is defined for 4 bits, got {bits}")
    c = unpack_int32(words, bits, axis=1)
    perm = (np.arange(c.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER]).reshape(-1)
    return c[:, perm]


def pack_int4_signed(values, axis: int = -1) -> np.ndarray:
    """Signed int4 values in [-8, 7] -> nibbles (two's complement), low nibble = even index."""
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise InputError(f"int4 values must be integers, got dtype {v.dtype}")
    if v.size and (v.min() < -8 or v.max() > 7):
        raise InputError(f"signed int4 values must lie in [-8, 7], got range [{v.min()}, {v.max()}]")
    return pack_bits((v & 0xF).astype(np.uint8), 4, axis)


def unpack_int4_signed(packed, count: int, axis: int = -1) -> np.ndarray:
    u = unpack_bits(packed, 4, count, axis).astype(np.int8)
    return np.where(u >= 8, u - 16, u).astype(np.int8)


def pack_bit_planes(codes, B: int) -> np.ndarray:
    """Query codes (d,) in [0, 2^B) -> (B, ceil(d / 8)) bit planes, plane j = bit j of each code."""
    c = _check_codes(codes, B)
    if c.ndim != 1:
        raise InputError(f"expected a 1-D vector of codes, got shape {c.shape}")
    planes = (c[None, :] >> np.arange(B, dtype=np.uint8)[:, None]) & 1
    return pack_bits(planes, 1, axis=-1)


def pack_fastscan(codes) -> np.ndarray:
    """4-bit codes (n, M) -> FastScan blocks (ceil(n / 32), M, 16) uint8 (layout above)."""
    c = _check_codes(codes, 4)
    if c.ndim != 2:
        raise InputError(f"expected codes of shape (n, M), got {c.shape}")
    n, M = c.shape
    nblk = -(-n // 32)
    padded = np.zeros((nblk * 32, M), dtype=np.uint8)
    padded[:n] = c
    blocks = padded.reshape(nblk, 2, 16, M)  # [b, half, k, m]: vector 32b + 16 half + k
    return np.ascontiguousarray((blocks[:, 0] | (blocks[:, 1] << 4)).transpose(0, 2, 1))


def unpack_fastscan(blocks, n: int) -> np.ndarray:
    """FastScan blocks (nblocks, M, 16) -> codes (n, M)."""
    b = np.asarray(blocks)
    if b.ndim != 3 or b.shape[2] != 16 or b.dtype != np.uint8:
        raise InputError(f"expected uint8 blocks of shape (nblocks, M, 16), got {b.dtype} {b.shape}")
    lo = (b & 15).transpose(0, 2, 1)  # (nblk, 16, M)
    hi = (b >> 4).transpose(0, 2, 1)
    return np.concatenate([lo, hi], axis=1).reshape(-1, b.shape[1])[:n]
