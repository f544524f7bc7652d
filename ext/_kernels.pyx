# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython shell over ext/csrc: checks the arrays it is handed, releases the GIL, calls C.

The Python layer (qkit.ext) validates and explains errors; the checks here are
the last line that keeps a bad array from reaching C (a ValueError, never a
segfault), so they are cheap and repeated on purpose.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t

cnp.import_array()

cdef extern from "qk_kernels.h":
    int QK_I8, QK_U8, QK_ISA_SCALAR, QK_ISA_AVX2, QK_ISA_VNNI, QK_OK, QK_EARG
    int qk_cpu_has_avx2() nogil
    int qk_cpu_has_popcnt() nogil
    int qk_cpu_has_fma() nogil
    int qk_cpu_has_avx512vnni() nogil
    int qk_dot_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) nogil
    int qk_l2_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) nogil
    int qk_dot_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa) nogil
    int qk_l2_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa) nogil
    int QK_OP_DOT, QK_OP_L2, QK_ENOMEM
    int qk_int4_i8(int op, const int8_t *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed, int32_t *out, int isa) nogil
    int qk_int4_f32(int op, const float *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed, float *out, int isa) nogil
    int qk_hamming(const uint8_t *q, const uint8_t *codes, int64_t n, int64_t nbytes, int32_t *out, int isa) nogil
    int qk_and_popcount(const uint8_t *planes, int64_t B, const uint8_t *codes, int64_t n, int64_t nbytes, int32_t *out, int isa) nogil
    int qk_fastscan(const uint8_t *lut, int64_t M, const uint8_t *codes, int64_t n, int32_t *out, int isa) nogil
    void qk_quantize_q8(const float *x, int64_t n, int8_t *xq, float *xs) nogil
    int qk_w4a8_blocks(const int8_t *xq, const int32_t *qweight, int64_t n_in, int64_t n_out, int32_t *acc,
                       int isa) nogil
    int qk_gemv_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                     const float *scales, int64_t n_in, int64_t n_out, int64_t group, float *y, int isa,
                     int threads) nogil
    int qk_gemm_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                     const float *scales, int64_t n_in, int64_t n_out, int64_t group, int64_t m, float *y, int isa,
                     int threads) nogil
    int qk_gemm_w8a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                     const float *scales, int64_t n_in, int64_t n_out, int64_t group, int64_t m, float *y, int isa,
                     int threads) nogil
    int qk_pool_threads() nogil
    void qk_pool_set_spin_us(long us) nogil
    long qk_pool_spin_us() nogil

ISA_SCALAR = QK_ISA_SCALAR
ISA_AVX2 = QK_ISA_AVX2
ISA_VNNI = QK_ISA_VNNI


def cpu_flags():
    """The run-time features the kernels dispatch on."""
    return {"avx2": bool(qk_cpu_has_avx2()), "fma": bool(qk_cpu_has_fma()), "popcnt": bool(qk_cpu_has_popcnt()),
            "avx512vnni": bool(qk_cpu_has_avx512vnni())}


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
    if rc == QK_ENOMEM:
        raise MemoryError("kernel could not allocate its query buffer")
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


cdef int _need(cnp.ndarray a, int ndim, object dtype, str what) except -1:
    _need_c(a, ndim, what)
    if a.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    return 0


def int4_scan(str op, cnp.ndarray q, cnp.ndarray codes, int64_t d, bint is_signed, int isa):
    """op(q, row) for packed int4 rows (n, ceil(d/2)); int8 query -> int32, float32 query -> float32."""
    _need_c(q, 1, "query")
    _need(codes, 2, np.uint8, "codes")
    if d < 0 or q.shape[0] != d or codes.shape[1] != (d + 1) // 2:
        raise ValueError(f"int4 rows of {d} codes need {(d + 1) // 2} bytes and a query of {d}, "
                         f"got rows of {codes.shape[1]} bytes and a query of {q.shape[0]}")
    cdef int opc
    if op == "dot":
        opc = QK_OP_DOT
    elif op == "l2":
        opc = QK_OP_L2
    else:
        raise ValueError(f"unknown op {op!r}")
    cdef int64_t n = codes.shape[0]
    cdef const uint8_t *cp = <const uint8_t *>cnp.PyArray_DATA(codes)
    cdef int rc
    cdef cnp.ndarray out
    cdef const int8_t *qi
    cdef const float *qf
    cdef int32_t *oi
    cdef float *of
    if q.dtype == np.int8:
        out = np.empty(n, dtype=np.int32)
        qi = <const int8_t *>cnp.PyArray_DATA(q)
        oi = <int32_t *>cnp.PyArray_DATA(out)
        with nogil:
            rc = qk_int4_i8(opc, qi, cp, n, d, is_signed, oi, isa)
    elif q.dtype == np.float32:
        out = np.empty(n, dtype=np.float32)
        qf = <const float *>cnp.PyArray_DATA(q)
        of = <float *>cnp.PyArray_DATA(out)
        with nogil:
            rc = qk_int4_f32(opc, qf, cp, n, d, is_signed, of, isa)
    else:
        raise ValueError(f"query: expected dtype int8 or float32, got {q.dtype}")
    _check_rc(rc)
    return out


def hamming(cnp.ndarray q, cnp.ndarray codes, int isa):
    """popcount(q ^ row) over rows of packed bits (n, nbytes) -> int32 (n,)."""
    _need(q, 1, np.uint8, "query")
    _need(codes, 2, np.uint8, "codes")
    if q.shape[0] != codes.shape[1]:
        raise ValueError(f"query has {q.shape[0]} bytes, codes have {codes.shape[1]}")
    cdef int64_t n = codes.shape[0], nb = codes.shape[1]
    cdef cnp.ndarray out = np.empty(n, dtype=np.int32)
    cdef const uint8_t *qp = <const uint8_t *>cnp.PyArray_DATA(q)
    cdef const uint8_t *cp = <const uint8_t *>cnp.PyArray_DATA(codes)
    cdef int32_t *op_ = <int32_t *>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = qk_hamming(qp, cp, n, nb, op_, isa)
    _check_rc(rc)
    return out


def and_popcount(cnp.ndarray planes, cnp.ndarray codes, int isa):
    """sum_j 2^j popcount(row & planes[j]) -> int32 (n,)."""
    _need(planes, 2, np.uint8, "query planes")
    _need(codes, 2, np.uint8, "codes")
    if planes.shape[1] != codes.shape[1]:
        raise ValueError(f"query planes have {planes.shape[1]} bytes, codes have {codes.shape[1]}")
    if not 1 <= planes.shape[0] <= 16:
        raise ValueError(f"expected 1..16 query bit planes, got {planes.shape[0]}")
    cdef int64_t n = codes.shape[0], nb = codes.shape[1], B = planes.shape[0]
    cdef cnp.ndarray out = np.empty(n, dtype=np.int32)
    cdef const uint8_t *pp = <const uint8_t *>cnp.PyArray_DATA(planes)
    cdef const uint8_t *cp = <const uint8_t *>cnp.PyArray_DATA(codes)
    cdef int32_t *op_ = <int32_t *>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = qk_and_popcount(pp, B, cp, n, nb, op_, isa)
    _check_rc(rc)
    return out


def fastscan(cnp.ndarray lut, cnp.ndarray codes, int64_t n, int isa):
    """sum_m lut[m, code[v, m]] for n vectors in FastScan blocks (nblocks, M, 16) -> int32 (n,)."""
    _need(lut, 2, np.uint8, "lut")
    _need(codes, 3, np.uint8, "codes")
    if lut.shape[1] != 16:
        raise ValueError(f"lut: expected 16 entries per sub-space, got {lut.shape[1]}")
    if codes.shape[1] != lut.shape[0] or codes.shape[2] != 16:
        raise ValueError(f"codes: expected blocks of shape ({lut.shape[0]}, 16), got ({codes.shape[1]}, {codes.shape[2]})")
    if n < 0 or n > codes.shape[0] * 32:
        raise ValueError(f"{codes.shape[0]} blocks hold at most {codes.shape[0] * 32} vectors, asked for {n}")
    cdef int64_t M = lut.shape[0]
    cdef cnp.ndarray out = np.empty(n, dtype=np.int32)
    cdef const uint8_t *lp = <const uint8_t *>cnp.PyArray_DATA(lut)
    cdef const uint8_t *cp = <const uint8_t *>cnp.PyArray_DATA(codes)
    cdef int32_t *op_ = <int32_t *>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = qk_fastscan(lp, M, cp, n, op_, isa)
    _check_rc(rc)
    return out


def w4a8_blocks(cnp.ndarray xq, cnp.ndarray qweight, int isa):
    """Exact int32 block sums (ceil(in/32), out) of GPTQ-packed int4 weights against int8 activations."""
    _need(xq, 1, np.int8, "xq")
    _need(qweight, 2, np.int32, "qweight")
    cdef int64_t n_in = qweight.shape[0] * 8, n_out = qweight.shape[1]
    if xq.shape[0] != n_in:
        raise ValueError(f"qweight holds {n_in} inputs, the activation {xq.shape[0]}")
    cdef cnp.ndarray acc = np.empty(((n_in + 31) // 32, n_out), dtype=np.int32)
    cdef const int8_t *xp = <const int8_t *>cnp.PyArray_DATA(xq)
    cdef const int32_t *wp = <const int32_t *>cnp.PyArray_DATA(qweight)
    cdef int32_t *ap = <int32_t *>cnp.PyArray_DATA(acc)
    cdef int rc
    with nogil:
        rc = qk_w4a8_blocks(xp, wp, n_in, n_out, ap, isa)
    _check_rc(rc)
    return acc


def gemm_a8(cnp.ndarray xq, cnp.ndarray xs, cnp.ndarray qweight, cnp.ndarray zeros, cnp.ndarray scales,
            int64_t group, int bits, int isa, int threads=1):
    """y (m, out) float32 of GPTQ-packed int4 or int8 weights against m int8 activation rows with block scales."""
    if bits != 4 and bits != 8:
        raise ValueError(f"the A8 kernels take 4- or 8-bit weights, not {bits}")
    _need(xq, 2, np.int8, "xq")
    _need(xs, 2, np.float32, "xs")
    _need(qweight, 2, np.int32, "qweight")
    _need(zeros, 2, np.uint8, "zeros")
    _need(scales, 2, np.float32, "scales")
    cdef int64_t n_in = qweight.shape[0] * (32 // bits), n_out = qweight.shape[1], m = xq.shape[0]
    cdef int64_t ng = (n_in + group - 1) // group if group > 0 else 0
    if m < 1 or xs.shape[0] != m:
        raise ValueError(f"xq and xs must hold the same m >= 1 rows, got {xq.shape[0]} and {xs.shape[0]}")
    if xq.shape[1] != n_in or xs.shape[1] != (n_in + 31) // 32:
        raise ValueError(f"qweight holds {n_in} inputs: the activation needs {n_in} codes and {(n_in + 31) // 32} "
                         f"block scales per row, got {xq.shape[1]} and {xs.shape[1]}")
    if group <= 0 or (group % 32 and group < n_in):
        raise ValueError(f"group size {group}: the kernel needs a multiple of 32, or one group per row")
    if zeros.shape[0] != ng or zeros.shape[1] != n_out or scales.shape[0] != ng or scales.shape[1] != n_out:
        raise ValueError(f"zeros and scales must be ({ng}, {n_out}), got {zeros.shape[0]}x{zeros.shape[1]} and "
                         f"{scales.shape[0]}x{scales.shape[1]}")
    if threads < 1 or threads > 256:
        raise ValueError(f"threads must be 1..256, got {threads}")
    cdef cnp.ndarray y = np.empty((m, n_out), dtype=np.float32)
    cdef const int8_t *xp = <const int8_t *>cnp.PyArray_DATA(xq)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(xs)
    cdef const int32_t *wp = <const int32_t *>cnp.PyArray_DATA(qweight)
    cdef const uint8_t *zp = <const uint8_t *>cnp.PyArray_DATA(zeros)
    cdef const float *scp = <const float *>cnp.PyArray_DATA(scales)
    cdef float *yp = <float *>cnp.PyArray_DATA(y)
    cdef int rc
    with nogil:
        if bits == 4:
            rc = qk_gemm_w4a8(xp, sp, wp, zp, scp, n_in, n_out, group, m, yp, isa, threads)
        else:
            rc = qk_gemm_w8a8(xp, sp, wp, zp, scp, n_in, n_out, group, m, yp, isa, threads)
    _check_rc(rc)
    return y


def pool_threads():
    """Threads in the runtime's pool (the caller counts as one)."""
    return qk_pool_threads()


def pool_spin_us(us=None):
    """How long (microseconds) an idle pool worker, or a caller waiting on one, spins before sleeping; with
    `us`, set it first (0: sleep at once). The value in effect is returned."""
    if us is not None:
        if us < 0 or us > 10_000_000:
            raise ValueError(f"spin must lie in 0..10000000 us, got {us}")
        qk_pool_set_spin_us(us)
    return qk_pool_spin_us()


def quantize_q8_rows(cnp.ndarray x):
    """Each row of a finite float32 (m, n) matrix as quantize_q8 codes it: (xq (m, n), xs (m, ceil(n/32)))."""
    _need(x, 2, np.float32, "x")
    cdef int64_t m = x.shape[0], n = x.shape[1], nb = (x.shape[1] + 31) // 32, r
    cdef cnp.ndarray xq = np.empty((m, n), dtype=np.int8)
    cdef cnp.ndarray xs = np.empty((m, nb), dtype=np.float32)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef int8_t *qp = <int8_t *>cnp.PyArray_DATA(xq)
    cdef float *sp = <float *>cnp.PyArray_DATA(xs)
    with nogil:
        for r in range(m):
            qk_quantize_q8(xp + r * n, n, qp + r * n, sp + r * nb)
    return xq, xs


def quantize_q8(cnp.ndarray x):
    """(xq int8 (n,), xs float32 (ceil(n/32),)) of a finite float32 vector, q8_0's rule with float32 scales."""
    _need(x, 1, np.float32, "x")
    cdef int64_t n = x.shape[0]
    cdef cnp.ndarray xq = np.empty(n, dtype=np.int8)
    cdef cnp.ndarray xs = np.empty((n + 31) // 32, dtype=np.float32)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef int8_t *qp = <int8_t *>cnp.PyArray_DATA(xq)
    cdef float *sp = <float *>cnp.PyArray_DATA(xs)
    with nogil:
        qk_quantize_q8(xp, n, qp, sp)
    return xq, xs
