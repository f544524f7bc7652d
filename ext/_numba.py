"""Numba twins of the compiled kernels (the fallback when the extension is not built).

Written to be fast, not as strawmen: the inner loops multiply int16 values and
accumulate in int32 (Numba would otherwise promote every product to int64 and
lose the vpmaddwd idiom), fastmath lets LLVM reassociate the sum into vector
lanes, nogil lets callers run them in threads. Compiled lazily per dtype pair
and cached on disk.
"""
import numpy as np
from numba import njit

_JIT = dict(nogil=True, fastmath=True, cache=True, boundscheck=False)


@njit(**_JIT)
def _dot_row(q, x):
    acc = np.int32(0)
    for j in range(x.shape[0]):
        acc += np.int32(np.int16(q[j]) * np.int16(x[j]))
    return acc


@njit(**_JIT)
def _l2_row(q, x):
    acc = np.int32(0)
    for j in range(x.shape[0]):
        t = np.int32(np.int16(q[j]) - np.int16(x[j]))
        acc += t * t
    return acc


@njit(**_JIT)
def dot_1xn(q, X, out):
    for i in range(X.shape[0]):
        out[i] = _dot_row(q, X[i])


@njit(**_JIT)
def l2_1xn(q, X, out):
    for i in range(X.shape[0]):
        out[i] = _l2_row(q, X[i])


@njit(**_JIT)
def dot_mxn(X, Y, out, block):
    # same blocking as the C kernel: a block of rows of Y stays in cache while every X row scans it
    for j0 in range(0, Y.shape[0], block):
        j1 = min(j0 + block, Y.shape[0])
        for i in range(X.shape[0]):
            for j in range(j0, j1):
                out[i, j] = _dot_row(X[i], Y[j])


@njit(**_JIT)
def l2_mxn(X, Y, out, block):
    for j0 in range(0, Y.shape[0], block):
        j1 = min(j0 + block, Y.shape[0])
        for i in range(X.shape[0]):
            for j in range(j0, j1):
                out[i, j] = _l2_row(X[i], Y[j])
