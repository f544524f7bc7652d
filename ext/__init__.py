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


def _isa_code(isa: str | None) -> int:
    isa = best_isa() if isa is None else isa
    if isa not in ISAS:
        raise UsageError(f"unknown ISA {isa!r}: expected one of {', '.join(ISAS)}")
    if isa == "avx2" and not cpu_flags().get("avx2"):
        raise UsageError("ISA 'avx2' requested but this CPU does not report AVX2")
    return _native.ISA_AVX2 if isa == "avx2" else _native.ISA_SCALAR


def _check(name: str, a, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in _INT8:
        raise InputError(f"{name}: expected dtype int8 or uint8, got {a.dtype}")
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
    if b == "native":
        return _native.scan_many(op, Q, X, _isa_code(isa))
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


__all__ = [
    "BACKENDS", "ISAS", "dot", "l2sq", "dot_many", "l2sq_many", "max_dim",
    "default_backend", "native_available", "cpu_flags", "best_isa", "reference",
]
