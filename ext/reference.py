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
