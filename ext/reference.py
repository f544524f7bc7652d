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
