"""qkit.ext: compiled kernels with a Numba fallback and numpy references.

Backends (environment variable QKIT_KERNELS, or the `backend=` argument):
  native  C with AVX2 intrinsics (run-time CPU check, scalar C otherwise), via Cython, GIL released
  numba   @njit twins (ext/_numba.py), used when the extension is not built
  numpy   the plain references (ext/reference.py), int64 sums cast to int32
Default: native when built, else numba. One log line (logger "qkit.ext") says which.

Kernels on int8/uint8 operands, int32 results:
  dot(q, X) / l2sq(q, X)            one query (d,) against rows (n, d) -> (n,)
  dot_many(X, Y) / l2sq_many(X, Y)  queries (m, d) against rows (n, d) -> (m, n)
Sums are exact: d may not exceed max_dim(op, q.dtype, X.dtype), the length at
which d * max|term| would pass 2^31 - 1 (e.g. 131,071 for int8 x int8 dot).

Low-bit kernels (layouts in qkit.packing):
  int4_dot(q, codes, d) / int4_l2sq(q, codes, d)   packed int4 rows (n, ceil(d/2)), low nibble = even
                                                    index, signed (two's complement) or unsigned codes,
                                                    against an int8 query (exact int32) or a float32
                                                    query (float32, summation order differs by backend)
  hamming(q, codes)                                 packed 1-bit rows (n, nbytes): popcount(q ^ row)
  and_popcount(planes, codes)                       sum_j 2^j popcount(row & planes[j]), B = 1..16 planes
  fastscan(lut, codes, n)                           4-bit LUT scan over FastScan blocks of 32 vectors

W4A8 (the LLM runtime's decode GEMV, kernels_w4a8.c):
  quantize_q8(x)                                    int8 codes + float32 scale per block of 32 (q8_0's rule)
  w4a8_blocks(xq, qweight)                          exact int32 block sums against GPTQ's qweight (in/8, out)
  gemv_w4a8(xq, xs, qweight, zeros, scales, g)      y = W x, zero points and scales per (group, output)
  gemm_w4a8(xq, xs, qweight, zeros, scales, g)      the same for many tokens at once (prefill), bit for bit
  gemv_w8a8 / gemm_w8a8                            the same sums over GPTQ's 8-bit layout (in/4, out)
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache

import numpy as np

from qkit.errors import InputError, UsageError
from qkit.ext import reference

log = logging.getLogger("qkit.ext")

try:  # the extension is optional: a source checkout without a build still works through Numba
    from qkit.ext import _kernels as _native
except ImportError:  # pragma: no cover - exercised on machines without a compiler
    _native = None

BACKENDS = ("native", "numba", "numpy")
ISAS = ("avx2", "scalar")
W4A8_ISAS = ("avx512vnni", "avx2", "scalar")  # the W4A8 kernels also have an AVX-512 VNNI path
_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))
# largest |term| per (op, query dtype, rows dtype): products and squared differences
_MAX_TERM = {
    ("dot", "int8", "int8"): 128 * 128,
    ("dot", "int8", "uint8"): 128 * 255,
    ("dot", "uint8", "int8"): 128 * 255,
    ("dot", "uint8", "uint8"): 255 * 255,
    ("l2", "int8", "int8"): 255 * 255,
    ("l2", "int8", "uint8"): 383 * 383,
    ("l2", "uint8", "int8"): 383 * 383,
    ("l2", "uint8", "uint8"): 255 * 255,
}


def max_dim(op: str, qdtype, xdtype) -> int:
    """Longest vector for which an int32 sum of `op` terms cannot overflow."""
    return (2**31 - 1) // _MAX_TERM[(op, np.dtype(qdtype).name, np.dtype(xdtype).name)]


def native_available() -> bool:
    return _native is not None


def cpu_flags() -> dict:
    """CPU features as the native kernels see them (empty when the extension is not built)."""
    return _native.cpu_flags() if _native is not None else {}


def best_isa() -> str:
    return "avx2" if cpu_flags().get("avx2") else "scalar"


@lru_cache(maxsize=None)
def default_backend() -> str:
    want = os.environ.get("QKIT_KERNELS", "").strip().lower()
    if want and want not in BACKENDS:
        raise UsageError(f"QKIT_KERNELS={want!r}: expected one of {', '.join(BACKENDS)}")
    if want == "native" and _native is None:
        log.warning("QKIT_KERNELS=native but the extension qkit.ext._kernels is not built; using numba")
        want = "numba"
    chosen = want or ("native" if _native is not None else "numba")
    detail = f" ({best_isa()})" if chosen == "native" else ""
    log.info("qkit kernels: %s%s", chosen, detail)
    return chosen


def _resolve(backend: str | None) -> str:
    b = default_backend() if backend is None else backend
    if b not in BACKENDS:
        raise UsageError(f"unknown kernel backend {b!r}: expected one of {', '.join(BACKENDS)}")
    if b == "native" and _native is None:
        raise UsageError("backend 'native' requested but the extension qkit.ext._kernels is not built")
    return b


def best_isa_w4a8() -> str:
    """The fastest path of the W4A8 kernels on this CPU: AVX-512 VNNI (vpdpbusd), else AVX2, else scalar."""
    return "avx512vnni" if cpu_flags().get("avx512vnni") else best_isa()


def _isa_code(isa: str | None, allowed=ISAS) -> int:
    isa = best_isa() if isa is None else isa
    if isa not in allowed:
        raise UsageError(f"unknown ISA {isa!r}: expected one of {', '.join(allowed)}")
    if isa == "avx512vnni":
        if not cpu_flags().get("avx512vnni"):
            raise UsageError("ISA 'avx512vnni' requested but this CPU does not report AVX-512 VNNI")
        return _native.ISA_VNNI
    if isa == "avx2" and not cpu_flags().get("avx2"):
        raise UsageError("ISA 'avx2' requested but this CPU does not report AVX2")
    return _native.ISA_AVX2 if isa == "avx2" else _native.ISA_SCALAR


def _check(name: str, a, ndim: int, dtypes=_INT8) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        want = " or ".join(np.dtype(t).name for t in dtypes)
        raise InputError(f"{name}: expected dtype {want}, got {a.dtype}")
    if a.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise InputError(f"{name}: expected a C-contiguous array, got strides {a.strides} (use np.ascontiguousarray)")
    return a


def _check_pair(op: str, qname: str, q: np.ndarray, X: np.ndarray) -> None:
    d = X.shape[1]
    if q.shape[-1] != d:
        raise InputError(f"{qname} has {q.shape[-1]} dims but rows have {d}")
    lim = max_dim(op, q.dtype, X.dtype)
    if d > lim:
        raise InputError(f"{op} of {q.dtype} x {X.dtype} is exact in int32 only up to d={lim}, got d={d}")


def _scan(op: str, q, X, backend, isa) -> np.ndarray:
    q = _check("query", q, 1)
    X = _check("rows", X, 2)
    _check_pair(op, "query", q, X)
    b = _resolve(backend)
    if b == "native":
        return _native.scan(op, q, X, _isa_code(isa))
    if b == "numba":
        from qkit.ext import _numba

        out = np.empty(X.shape[0], dtype=np.int32)
        (_numba.dot_1xn if op == "dot" else _numba.l2_1xn)(q, X, out)
        return out
    return (reference.dot if op == "dot" else reference.l2sq)(q, X).astype(np.int32)


def _scan_many(op: str, Q, X, backend, isa) -> np.ndarray:
    Q = _check("queries", Q, 2)
    X = _check("rows", X, 2)
    _check_pair(op, "queries", Q, X)
    b = _resolve(backend)
    if b == "native":  # many-against-many also has an AVX-512 VNNI path (ext/csrc/gemm_i8.c)
        return _native.scan_many(op, Q, X, _isa_code(isa or best_isa_w4a8(), W4A8_ISAS))
    if b == "numba":
        from qkit.ext import _numba

        out = np.empty((Q.shape[0], X.shape[0]), dtype=np.int32)
        block = max(16, (256 * 1024) // max(1, X.shape[1]))
        (_numba.dot_mxn if op == "dot" else _numba.l2_mxn)(Q, X, out, block)
        return out
    return (reference.dot_many if op == "dot" else reference.l2sq_many)(Q, X).astype(np.int32)


def dot(q: np.ndarray, X: np.ndarray, *, backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """Inner products of one int8/uint8 query (d,) with rows (n, d): int32 (n,)."""
    return _scan("dot", q, X, backend, isa)


def l2sq(q: np.ndarray, X: np.ndarray, *, backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """Squared L2 distances of one int8/uint8 query (d,) to rows (n, d): int32 (n,)."""
    return _scan("l2", q, X, backend, isa)


def dot_many(Q: np.ndarray, X: np.ndarray, *, backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """Inner products of queries (m, d) with rows (n, d): int32 (m, n)."""
    return _scan_many("dot", Q, X, backend, isa)


def l2sq_many(Q: np.ndarray, X: np.ndarray, *, backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """Squared L2 distances of queries (m, d) to rows (n, d): int32 (m, n)."""
    return _scan_many("l2", Q, X, backend, isa)


# ---------------------------------------------------------------- low-bit
_U8 = (np.dtype(np.uint8),)
INT4_MAX_DIM = (2**31 - 1) // (143 * 143)  # |q - s| <= 128 + 15: the largest int4 L2 term
AND_POPCOUNT_MAX_BITS = (2**31 - 1) // (2**16 - 1)


def _int4(op: str, q, codes, d, signed, backend, isa) -> np.ndarray:
    q = _check("query", q, 1, (np.dtype(np.int8), np.dtype(np.float32)))
    codes = _check("codes", codes, 2, _U8)
    d = q.shape[0] if d is None else int(d)
    if q.shape[0] != d or codes.shape[1] != (d + 1) // 2:
        raise InputError(f"int4 rows of {d} codes need {(d + 1) // 2} bytes and a query of {d} values; "
                         f"got rows of {codes.shape[1]} bytes and a query of {q.shape[0]}")
    if q.dtype == np.int8 and d > INT4_MAX_DIM:
        raise InputError(f"int4 x int8 is exact in int32 only up to d={INT4_MAX_DIM}, got d={d}")
    b = _resolve(backend)
    if b == "native":
        return _native.int4_scan(op, q, codes, d, bool(signed), _isa_code(isa))
    if b == "numba":
        from qkit.ext import _numba

        if q.dtype == np.int8:
            out = np.empty(codes.shape[0], dtype=np.int32)
            _numba.int4_i8(op == "l2", q, codes, d, bool(signed), out)
        else:
            out = np.empty(codes.shape[0], dtype=np.float32)
            _numba.int4_f32(op == "l2", q, codes, d, bool(signed), out)
        return out
    ref = (reference.int4_dot if op == "dot" else reference.int4_l2sq)(q, codes, d, bool(signed))
    return ref.astype(np.int32 if q.dtype == np.int8 else np.float32)


def int4_dot(q: np.ndarray, codes: np.ndarray, d: int | None = None, *, signed: bool = False,
             backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """<q, row> for packed int4 rows (n, ceil(d/2)); d defaults to len(q). int8 q -> int32, float32 q -> float32."""
    return _int4("dot", q, codes, d, signed, backend, isa)


def int4_l2sq(q: np.ndarray, codes: np.ndarray, d: int | None = None, *, signed: bool = False,
              backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """||q - row||^2 for packed int4 rows (n, ceil(d/2)). int8 q -> int32, float32 q -> float32."""
    return _int4("l2", q, codes, d, signed, backend, isa)


def _words(a: np.ndarray) -> np.ndarray | None:
    """View rows of bytes as little-endian uint64 words when they tile exactly (for the Numba twins)."""
    if a.shape[-1] % 8 == 0 and a.shape[-1] > 0:
        return a.view("<u8")
    return None


def hamming(q: np.ndarray, codes: np.ndarray, *, backend: str | None = None, isa: str | None = None) -> np.ndarray:
    """Hamming distance between a packed 1-bit query (nbytes,) and packed rows (n, nbytes): int32 (n,)."""
    q = _check("query", q, 1, _U8)
    codes = _check("codes", codes, 2, _U8)
    if q.shape[0] != codes.shape[1]:
        raise InputError(f"query has {q.shape[0]} bytes but codes have {codes.shape[1]}")
    b = _resolve(backend)
    if b == "native":
        return _native.hamming(q, codes, _isa_code(isa))
    if b == "numba":
        from qkit.ext import _numba

        out = np.empty(codes.shape[0], dtype=np.int32)
        qw, cw = _words(q), _words(codes)
        if qw is not None:
            _numba.hamming_words(qw, cw, out)
        else:
            _numba.hamming_bytes(q, codes, out)
        return out
    return reference.hamming(q, codes).astype(np.int32)


def and_popcount(planes: np.ndarray, codes: np.ndarray, *, backend: str | None = None,
                 isa: str | None = None) -> np.ndarray:
    """sum_j 2^j popcount(row & planes[j]) for B query bit planes (B, nbytes) and packed rows (n, nbytes).

    With planes from qkit.packing.pack_bit_planes(q_codes, B) this is <bits(row), q_codes>, the
    inner product at the core of RaBitQ's estimator.
    """
    planes = _check("query planes", planes, 2, _U8)
    codes = _check("codes", codes, 2, _U8)
    if planes.shape[1] != codes.shape[1]:
        raise InputError(f"query planes have {planes.shape[1]} bytes but codes have {codes.shape[1]}")
    if not 1 <= planes.shape[0] <= 16:
        raise InputError(f"expected 1..16 query bit planes, got {planes.shape[0]}")
    if codes.shape[1] * 8 > AND_POPCOUNT_MAX_BITS:
        raise InputError(f"and_popcount is exact in int32 only up to {AND_POPCOUNT_MAX_BITS} bits per row")
    b = _resolve(backend)
    if b == "native":
        return _native.and_popcount(planes, codes, _isa_code(isa))
    if b == "numba":
        from qkit.ext import _numba

        out = np.empty(codes.shape[0], dtype=np.int32)
        pw, cw = _words(planes), _words(codes)
        if pw is not None:
            _numba.and_popcount_words(pw, cw, out)
        else:
            _numba.and_popcount_bytes(planes, codes, out)
        return out
    return reference.and_popcount(planes, codes).astype(np.int32)


def fastscan(lut: np.ndarray, codes: np.ndarray, n: int, *, backend: str | None = None,
             isa: str | None = None) -> np.ndarray:
    """sum_m lut[m, code(v, m)] for the first n vectors of FastScan blocks (nblocks, M, 16): int32 (n,).

    lut is (M, 16) uint8, one 16-entry table per 4-bit sub-space; see qkit.packing.pack_fastscan.
    """
    lut = _check("lut", lut, 2, _U8)
    codes = _check("codes", codes, 3, _U8)
    if lut.shape[1] != 16:
        raise InputError(f"lut: expected 16 entries per sub-space, got shape {lut.shape}")
    if codes.shape[1:] != (lut.shape[0], 16):
        raise InputError(f"codes: expected blocks of shape ({lut.shape[0]}, 16), got {codes.shape[1:]}")
    n = int(n)
    if not 0 <= n <= 32 * codes.shape[0]:
        raise InputError(f"{codes.shape[0]} blocks hold at most {32 * codes.shape[0]} vectors, asked for {n}")
    b = _resolve(backend)
    if b == "native":
        return _native.fastscan(lut, codes, n, _isa_code(isa))
    if b == "numba":
        from qkit.ext import _numba

        out = np.empty(n, dtype=np.int32)
        _numba.fastscan(lut, codes, n, out)
        return out
    return reference.fastscan(lut, codes, n).astype(np.int32)


__all__ = [
    "BACKENDS", "ISAS", "dot", "l2sq", "dot_many", "l2sq_many", "max_dim",
    "int4_dot", "int4_l2sq", "hamming", "and_popcount", "fastscan",
    "default_backend", "native_available", "cpu_flags", "best_isa", "reference",
]


# ------------------------------------------------------------------ W4A8: GPTQ-packed int4 weights, int8 activations
def quantize_q8(x: np.ndarray, *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An activation vector as the W4A8 kernels take it: int8 codes and a float32 scale per block of 32 (llama.cpp's
    q8_0 rule, reference.quantize_q8); the same bytes on every backend."""
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise InputError(f"activation: expected a vector or a (tokens, features) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("activation holds NaN or Inf")
    if x.ndim == 2:  # one token per row, each row on its own blocks
        if _resolve(backend) == "native":
            return _native.quantize_q8_rows(np.ascontiguousarray(x, dtype=np.float32))
        rows = [reference.quantize_q8(r) for r in x]
        nb = -(-x.shape[1] // 32)
        return (np.stack([q for q, _ in rows]) if rows else np.empty((0, x.shape[1]), np.int8),
                np.stack([s for _, s in rows]) if rows else np.empty((0, nb), np.float32))
    if _resolve(backend) == "native":
        return _native.quantize_q8(np.ascontiguousarray(x, dtype=np.float32))
    return reference.quantize_q8(x)


def _w4a8_shapes(xq, qweight) -> tuple[int, int]:
    _check("xq", xq, 1, (np.dtype(np.int8),))
    _check("qweight", qweight, 2, (np.dtype(np.int32),))
    n_in, n_out = qweight.shape[0] * 8, qweight.shape[1]
    if xq.shape[0] != n_in:
        raise InputError(f"qweight holds {n_in} inputs (8 per int32 word), the activation {xq.shape[0]}")
    return n_in, n_out


def w4a8_blocks(xq: np.ndarray, qweight: np.ndarray, *, backend: str | None = None,
                isa: str | None = None) -> np.ndarray:
    """(ceil(in/32), out) int32: for each block of 32 inputs, sum of code * xq, for GPTQ's qweight (in/8, out)."""
    n_in, n_out = _w4a8_shapes(xq, qweight)
    b = _resolve(backend)
    if b == "native":
        return _native.w4a8_blocks(xq, qweight, _isa_code(isa or best_isa_w4a8(), W4A8_ISAS))
    if b == "numba":
        from qkit.ext import _numba

        acc = np.empty((-(-n_in // 32), n_out), np.int32)
        _numba.w4a8_blocks(xq, qweight, acc)
        return acc
    return reference.w4a8_blocks(xq, qweight)


def _a8_args(n_in, n_out, xs, zeros, scales, group_size, threads, xs_shape, bits) -> int:
    g = n_in if group_size is None or group_size >= n_in else int(group_size)
    if g <= 0 or (g % 32 and g < n_in):
        raise InputError(f"group size {group_size}: the A8 kernels take a multiple of 32, or one group per row")
    ng = -(-n_in // g)
    if xs.shape != xs_shape:
        raise InputError(f"xs: {n_in} inputs need {-(-n_in // 32)} block scales per token, got shape {xs.shape}")
    if zeros.shape != (ng, n_out) or scales.shape != (ng, n_out):
        raise InputError(f"zeros and scales must be ({ng}, {n_out}), got {zeros.shape} and {scales.shape}")
    if zeros.size and int(zeros.max()) >= 1 << bits:
        raise InputError(f"zeros must lie in 0..{(1 << bits) - 1} for {bits}-bit codes, got {int(zeros.max())}")
    if not 1 <= int(threads) <= 256:
        raise InputError(f"threads must lie in 1..256, got {threads}")
    return g


def _gemm_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, bits) -> np.ndarray:
    xq = _check("xq", xq, 2, (np.dtype(np.int8),))
    _check("qweight", qweight, 2, (np.dtype(np.int32),))
    per = 32 // bits
    n_in, n_out = qweight.shape[0] * per, qweight.shape[1]
    if xq.shape[1] != n_in:
        raise InputError(f"qweight holds {n_in} inputs ({per} per int32 word), the activation rows {xq.shape[1]}")
    if xq.shape[0] < 1:
        raise InputError("the activation has no rows")
    xs = _check("xs", xs, 2, (np.dtype(np.float32),))
    zeros = _check("zeros", zeros, 2, (np.dtype(np.uint8),))
    scales = _check("scales", scales, 2, (np.dtype(np.float32),))
    g = _a8_args(n_in, n_out, xs, zeros, scales, group_size, threads, (xq.shape[0], -(-n_in // 32)), bits)
    b = _resolve(backend)
    if b == "native":
        return _native.gemm_a8(xq, xs, qweight, zeros, scales, g, bits,
                               _isa_code(isa or best_isa_w4a8(), W4A8_ISAS), int(threads))
    if b == "numba":
        from qkit.ext import _numba

        y = np.empty((xq.shape[0], n_out), np.float32)
        for t in range(xq.shape[0]):
            _numba.gemv_w4a8(xq[t], xs[t], qweight, zeros, scales, g, y[t], bits)
        return y
    return np.stack([reference.gemv_w4a8(xq[t], xs[t], qweight, zeros, scales, g, bits=bits)
                     for t in range(xq.shape[0])])


def _gemv_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, bits) -> np.ndarray:
    _check("xq", xq, 1, (np.dtype(np.int8),))
    xs = _check("xs", xs, 1, (np.dtype(np.float32),))
    return _gemm_a8(xq[None], xs[None], qweight, zeros, scales, group_size, threads, backend, isa, bits)[0]


def gemv_w4a8(xq: np.ndarray, xs: np.ndarray, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray,
              group_size: int | None, *, threads: int = 1, backend: str | None = None,
              isa: str | None = None) -> np.ndarray:
    """y = W x for a 4-bit affine W as GPTQ packs it (qweight (in/8, out) int32, codes 0..15; zeros uint8 and
    scales float32 (ceil(in/group), out), the stored zero + 1 of a GPTQ v1 file already added back) against an
    activation quantize_q8 made: sum over groups of scale * sum over blocks of xs * (acc - zero * sum xq).

    group_size: a multiple of 32, or None / >= in for one group per row. Contiguous groups (g_idx = i // g):
    act-order files are permuted once at load (the runtime's job), not here. threads: the native backend's
    pool threads (the caller's included), each on whole 16-output lines; the result does not depend on it."""
    return _gemv_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, 4)


def gemm_w4a8(xq: np.ndarray, xs: np.ndarray, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray,
              group_size: int | None, *, threads: int = 1, backend: str | None = None,
              isa: str | None = None) -> np.ndarray:
    """Y (tokens, out) = X W^T for tokens quantized row by row (quantize_q8 of a matrix): gemv_w4a8 of every
    row, bit for bit, with each weight line read once for all the tokens (prefill)."""
    return _gemm_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, 4)


def gemv_w8a8(xq: np.ndarray, xs: np.ndarray, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray,
              group_size: int | None, *, threads: int = 1, backend: str | None = None,
              isa: str | None = None) -> np.ndarray:
    """gemv_w4a8 for GPTQ's 8-bit layout: qweight (in/4, out) int32, byte j of word [k][o] the code (0..255) of
    input 4k + j; zeros uint8, scales float32 (ceil(in/group), out). A per-channel grid is group_size None."""
    return _gemv_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, 8)


def gemm_w8a8(xq: np.ndarray, xs: np.ndarray, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray,
              group_size: int | None, *, threads: int = 1, backend: str | None = None,
              isa: str | None = None) -> np.ndarray:
    """gemm_w4a8 for GPTQ's 8-bit layout (gemv_w8a8 of every row, bit for bit)."""
    return _gemm_a8(xq, xs, qweight, zeros, scales, group_size, threads, backend, isa, 8)
