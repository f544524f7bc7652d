# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython shell over ext/csrc: checks the arrays it is handed, releases the GIL, calls C.

The Python layer (qkit.ext) validates and explains errors; the checks here are
the last line that keeps a bad array from reaching C (a ValueError, never a
segfault), so they are cheap and repeated on purpose.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t

cnp.import_array()

cdef extern from "qk_kernels.h":
    int QK_I8, QK_U8, QK_ISA_SCALAR, QK_ISA_AVX2, QK_OK, QK_EARG
    int qk_cpu_has_avx2() nogil
    int qk_cpu_has_popcnt() nogil
    int qk_cpu_has_fma() nogil
    int qk_dot_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) nogil
    int qk_l2_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) nogil
    int qk_dot_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa) nogil
    int qk_l2_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa) nogil

ISA_SCALAR = QK_ISA_SCALAR
ISA_AVX2 = QK_ISA_AVX2


def cpu_flags():
    """The run-time features the kernels dispatch on."""
    return {"avx2": bool(qk_cpu_has_avx2()), "fma": bool(qk_cpu_has_fma()), "popcnt": bool(qk_cpu_has_popcnt())}


cdef int _tcode(cnp.ndarray a) except -1:
    if a.dtype == np.int8:
        return QK_I8
    if a.dtype == np.uint8:
        return QK_U8
    raise ValueError(f"expected int8 or uint8 array, got {a.dtype}")


cdef int _need_c(cnp.ndarray a, int ndim, str what) except -1:
    if a.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim}-D array, got {a.ndim}-D")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{what}: expected a C-contiguous array, got a non-contiguous array")
    return 0


cdef _check_rc(int rc):
    if rc != QK_OK:
        raise ValueError("kernel refused its arguments (unknown dtype pair or ISA not available on this CPU)")


def scan(str op, cnp.ndarray q, cnp.ndarray X, int isa):
    """out[i] = op(q, X[i]) for op in {'dot', 'l2'}; int32 (n,)."""
    _need_c(q, 1, "query")
    _need_c(X, 2, "rows")
    cdef int64_t n = X.shape[0], d = X.shape[1]
    if q.shape[0] != d:
        raise ValueError(f"query has {q.shape[0]} dims, rows have {d}")
    cdef int tq = _tcode(q), tr = _tcode(X)
    cdef cnp.ndarray out = np.empty(n, dtype=np.int32)
    cdef const void *qp = cnp.PyArray_DATA(q)
    cdef const void *xp = cnp.PyArray_DATA(X)
    cdef int32_t *op_ = <int32_t *>cnp.PyArray_DATA(out)
    cdef int rc
    cdef bint is_dot = op == "dot"
    if not is_dot and op != "l2":
        raise ValueError(f"unknown op {op!r}")
    with nogil:
        if is_dot:
            rc = qk_dot_1xn(tq, tr, qp, xp, n, d, op_, isa)
        else:
            rc = qk_l2_1xn(tq, tr, qp, xp, n, d, op_, isa)
    _check_rc(rc)
    return out


def scan_many(str op, cnp.ndarray X, cnp.ndarray Y, int isa):
    """out[i, j] = op(X[i], Y[j]); int32 (nx, ny)."""
    _need_c(X, 2, "queries")
    _need_c(Y, 2, "rows")
    cdef int64_t nx = X.shape[0], ny = Y.shape[0], d = Y.shape[1]
    if X.shape[1] != d:
        raise ValueError(f"queries have {X.shape[1]} dims, rows have {d}")
    cdef int tq = _tcode(X), tr = _tcode(Y)
    cdef cnp.ndarray out = np.empty((nx, ny), dtype=np.int32)
    cdef const void *xp = cnp.PyArray_DATA(X)
    cdef const void *yp = cnp.PyArray_DATA(Y)
    cdef int32_t *op_ = <int32_t *>cnp.PyArray_DATA(out)
    cdef int rc
    cdef bint is_dot = op == "dot"
    if not is_dot and op != "l2":
        raise ValueError(f"unknown op {op!r}")
    with nogil:
        if is_dot:
            rc = qk_dot_mxn(tq, tr, xp, nx, yp, ny, d, op_, isa)
        else:
            rc = qk_l2_mxn(tq, tr, xp, nx, yp, ny, d, op_, isa)
    _check_rc(rc)
    return out
