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


# ---------------------------------------------------------------- low-bit
@njit(**_JIT)
def _nib(b, hi, sg):
    v = np.int32(b >> 4) if hi else np.int32(b & 15)
    return ((v ^ 8) - 8) if sg else v


@njit(**_JIT)
def int4_i8(is_l2, q, codes, d, sg, out):
    full = d // 2
    for i in range(codes.shape[0]):
        c = codes[i]
        acc = np.int32(0)
        for k in range(full):
            a = _nib(c[k], False, sg)
            b = _nib(c[k], True, sg)
            if is_l2:
                t0 = np.int32(q[2 * k]) - a
                t1 = np.int32(q[2 * k + 1]) - b
                acc += t0 * t0 + t1 * t1
            else:
                acc += a * np.int32(q[2 * k]) + b * np.int32(q[2 * k + 1])
        if d & 1:
            a = _nib(c[full], False, sg)
            if is_l2:
                t = np.int32(q[d - 1]) - a
                acc += t * t
            else:
                acc += a * np.int32(q[d - 1])
        out[i] = acc


@njit(**_JIT)
def int4_f32(is_l2, q, codes, d, sg, out):
    for i in range(codes.shape[0]):
        c = codes[i]
        acc = np.float32(0)
        for j in range(d):
            v = np.float32(_nib(c[j >> 1], (j & 1) == 1, sg))
            if is_l2:
                t = q[j] - v
                acc += t * t
            else:
                acc += v * q[j]
        out[i] = acc


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


@njit(**_JIT)
def _popcount64(x):
    # the SWAR idiom, which LLVM recognises and lowers to POPCNT where the CPU has it
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int32((x * _H01) >> np.uint64(56))


@njit(**_JIT)
def hamming_words(qw, cw, out):
    """Rows of whole 64-bit words: qw (nw,) uint64, cw (n, nw) uint64."""
    for i in range(cw.shape[0]):
        acc = np.int32(0)
        for k in range(cw.shape[1]):
            acc += _popcount64(qw[k] ^ cw[i, k])
        out[i] = acc


@njit(**_JIT)
def hamming_bytes(q, codes, out):
    for i in range(codes.shape[0]):
        acc = np.int32(0)
        for k in range(codes.shape[1]):
            acc += _POP8[q[k] ^ codes[i, k]]
        out[i] = acc


@njit(**_JIT)
def and_popcount_words(pw, cw, out):
    """pw (B, nw) uint64 query planes, cw (n, nw) uint64 rows."""
    for i in range(cw.shape[0]):
        acc = np.int32(0)
        for k in range(cw.shape[1]):
            w = cw[i, k]
            for j in range(pw.shape[0]):
                acc += _popcount64(w & pw[j, k]) << j
        out[i] = acc


@njit(**_JIT)
def and_popcount_bytes(planes, codes, out):
    for i in range(codes.shape[0]):
        acc = np.int32(0)
        for k in range(codes.shape[1]):
            w = codes[i, k]
            for j in range(planes.shape[0]):
                acc += _POP8[w & planes[j, k]] << j
        out[i] = acc


@njit(**_JIT)
def fastscan(lut, codes, n, out):
    acc = np.zeros(32, dtype=np.int32)
    for b in range(codes.shape[0]):
        acc[:] = 0
        for m in range(codes.shape[1]):
            for k in range(16):
                c = codes[b, m, k]
                acc[k] += lut[m, c & 15]
                acc[k + 16] += lut[m, c >> 4]
        for v in range(min(32, n - 32 * b)):
            out[32 * b + v] = acc[v]


@njit(cache=True, nogil=True)
def w4a8_blocks(xq, qweight, acc):
    """The C kernel's block sums (qk_w4a8_blocks), int32 exact."""
    n_in = qweight.shape[0] * 8
    n_out = qweight.shape[1]
    for b in range(acc.shape[0]):
        k0 = b * 4
        k1 = min((b + 1) * 4, n_in // 8)
        for o in range(n_out):
            s = 0
            for k in range(k0, k1):
                w = np.uint32(qweight[k, o])
                for j in range(8):
                    s += np.int32((w >> np.uint32(4 * j)) & np.uint32(15)) * np.int32(xq[8 * k + j])
            acc[b, o] = s


@njit(cache=True, nogil=True)
def gemv_w4a8(xq, xs, qweight, zeros, scales, group, y, bits):
    """The C kernels' GEMV (qk_gemm_w4a8 / qk_gemm_w8a8 for one token): float32 in their order, groups then
    blocks; bits 4 (8 nibble codes per word) or 8 (4 byte codes per word)."""
    per = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    n_in = qweight.shape[0] * per
    n_out = qweight.shape[1]
    nb = (n_in + 31) // 32
    sx = np.zeros(nb, np.int32)
    for i in range(n_in):
        sx[i // 32] += xq[i]
    if group > n_in:
        group = n_in
    bpg = group // 32 if group % 32 == 0 else nb
    ng = (n_in + group - 1) // group if group % 32 == 0 else 1
    rows = 32 // per  # word rows per block of 32 inputs
    for o in range(n_out):
        yo = np.float32(0.0)
        for g in range(ng):
            z = np.int32(zeros[g, o])
            t = np.float32(0.0)
            for b in range(g * bpg, min((g + 1) * bpg, nb)):
                s = np.int32(0)
                for k in range(b * rows, min((b + 1) * rows, n_in // per)):
                    w = np.uint32(qweight[k, o])
                    for j in range(per):
                        s += np.int32((w >> np.uint32(bits * j)) & mask) * np.int32(xq[per * k + j])
                t += np.float32(xs[b]) * np.float32(s - z * sx[b])
            yo += scales[g, o] * t
        y[o] = yo
