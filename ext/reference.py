"""Plain-numpy references for every kernel: slow, obviously correct, int64 sums.

The tests hold the native and Numba backends to these exactly; the `numpy`
backend (QKIT_KERNELS=numpy) is these functions with the result cast to int32.
"""
import numpy as np


def dot(q: np.ndarray, X: np.ndarray) -> np.ndarray:
    """out[i] = sum_j q[j] * X[i, j]."""
    return X.astype(np.int64) @ q.astype(np.int64)


def l2sq(q: np.ndarray, X: np.ndarray) -> np.ndarray:
    """out[i] = sum_j (q[j] - X[i, j])^2."""
    t = X.astype(np.int64) - q.astype(np.int64)
    return np.einsum("ij,ij->i", t, t)


def dot_many(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """out[i, j] = <X[i], Y[j]>."""
    return X.astype(np.int64) @ Y.astype(np.int64).T


def l2sq_many(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """out[i, j] = ||X[i] - Y[j]||^2, by the expansion |x|^2 + |y|^2 - 2<x, y> (exact in int64)."""
    x = X.astype(np.int64)
    y = Y.astype(np.int64)
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)


# ---------------------------------------------------------------- low-bit
def unpack_int4(codes: np.ndarray, d: int, signed: bool) -> np.ndarray:
    """(n, ceil(d/2)) bytes -> (n, d) int64 values; low nibble = even index."""
    c = codes.astype(np.int64)
    v = np.empty((c.shape[0], 2 * c.shape[1]), dtype=np.int64)
    v[:, 0::2] = c & 15
    v[:, 1::2] = c >> 4
    v = v[:, :d]
    return np.where(v >= 8, v - 16, v) if signed else v


def int4_dot(q: np.ndarray, codes: np.ndarray, d: int, signed: bool = False) -> np.ndarray:
    v = unpack_int4(codes, d, signed)
    if q.dtype == np.float32:
        return (v.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)
    return v @ q.astype(np.int64)


def int4_l2sq(q: np.ndarray, codes: np.ndarray, d: int, signed: bool = False) -> np.ndarray:
    v = unpack_int4(codes, d, signed)
    if q.dtype == np.float32:
        t = q.astype(np.float64)[None, :] - v
        return (t * t).sum(1).astype(np.float32)
    t = q.astype(np.int64)[None, :] - v
    return (t * t).sum(1)


def hamming(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Number of differing bits between the packed query and each packed row (padding bits included)."""
    return np.unpackbits(np.bitwise_xor(codes, q[None, :]), axis=1).sum(1).astype(np.int64)


def and_popcount(planes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """sum_j 2^j * popcount(code & plane_j): <x_bits, q> for a query whose bit j is plane j."""
    out = np.zeros(codes.shape[0], dtype=np.int64)
    for j in range(planes.shape[0]):
        out += np.unpackbits(codes & planes[j][None, :], axis=1).sum(1).astype(np.int64) << j
    return out


def fastscan(lut: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """Sum of table entries read through the block layout directly (nblocks, M, 16)."""
    nblk, M, _ = codes.shape
    m = np.arange(M)[None, :, None]
    lo = lut[m, codes & 15].astype(np.int64).sum(1)  # (nblk, 16): vectors 32b + k
    hi = lut[m, codes >> 4].astype(np.int64).sum(1)  # (nblk, 16): vectors 32b + 16 + k
    return np.concatenate([lo, hi], axis=1).reshape(-1)[:n]


# ------------------------------------------------------------------ W4A8 (GPTQ-packed int4 weights, int8 activations)
A8_BLOCK = 32


def quantize_q8(x: np.ndarray, block: int = A8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(xq int8, xs float32 per block) as llama.cpp's quantize_row_q8_0_ref: d = max|x| / 127 per block of 32,
    q = roundf(x / d), half away from zero (ggml-quants.c); the scale is kept in float32, not fp16."""
    x = np.asarray(x, np.float32).reshape(-1)
    nb = -(-len(x) // block)
    xp = np.zeros(nb * block, np.float32)
    xp[: len(x)] = x
    xb = xp.reshape(nb, block)
    d = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = xb * inv[:, None]
    t = np.trunc(v)  # roundf exactly: trunc(v + 0.5) would round 0.49999997 up (v + 0.5 rounds to 1.0 in float32)
    q = (t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0)).astype(np.int8)
    return q.reshape(-1)[: len(x)], d


def unpack_gptq_int4(qweight: np.ndarray) -> np.ndarray:
    """codes (in, out) of GPTQ's qweight (in / 8, out) int32: input 8k + j is nibble j of word [k][o]."""
    w = np.asarray(qweight).view(np.uint32)
    return ((w[:, None, :] >> (4 * np.arange(8, dtype=np.uint32))[None, :, None]) & 0xF).reshape(-1, w.shape[1])


def unpack_gptq_int8(qweight: np.ndarray) -> np.ndarray:
    """codes (in, out) of GPTQ's 8-bit qweight (in / 4, out) int32: input 4k + j is byte j of word [k][o]."""
    w = np.asarray(qweight).view(np.uint32)
    return ((w[:, None, :] >> (8 * np.arange(4, dtype=np.uint32))[None, :, None]) & 0xFF).reshape(-1, w.shape[1])


def w4a8_blocks(xq: np.ndarray, qweight: np.ndarray, block: int = A8_BLOCK, bits: int = 4) -> np.ndarray:
    """acc (ceil(in / 32), out) int32: sum over each block of 32 inputs of code * xq, exact (bits 4 or 8)."""
    q = (unpack_gptq_int4(qweight) if bits == 4 else unpack_gptq_int8(qweight)).astype(np.int64)
    n_in = q.shape[0]
    nb = -(-n_in // block)
    x = np.zeros(nb * block, np.int64)
    x[:n_in] = xq
    qp = np.zeros((nb * block, q.shape[1]), np.int64)
    qp[:n_in] = q
    return np.einsum("bi,bio->bo", x.reshape(nb, block), qp.reshape(nb, block, -1)).astype(np.int32)


def gemv_w4a8(xq, xs, qweight, zeros, scales, group: int, block: int = A8_BLOCK, bits: int = 4) -> np.ndarray:
    """y (out,) float32 = sum_g scale[g] sum_{b in g} xs[b] (acc[b] - zero[g] sum_b xq), in the C kernel's order
    (float32, groups then blocks ascending); bits 4 (W4A8) or 8 (W8A8: the same sums over byte codes)."""
    acc = w4a8_blocks(xq, qweight, block, bits)
    n_in = qweight.shape[0] * (32 // bits)
    nb = acc.shape[0]
    xpad = np.zeros(nb * block, np.int64)
    xpad[:n_in] = xq
    sx = xpad.reshape(nb, block).sum(axis=1)
    group = min(group, n_in)
    bpg = group // block if group % block == 0 else nb
    y = np.zeros(acc.shape[1], np.float32)
    for g in range(-(-n_in // group) if group % block == 0 else 1):
        z = zeros[g].astype(np.int64)
        t = np.zeros(acc.shape[1], np.float32)
        for b in range(g * bpg, min((g + 1) * bpg, nb)):
            t = t + np.float32(xs[b]) * (acc[b] - z * sx[b]).astype(np.float32)
        y = y + scales[g].astype(np.float32) * t
    return y
