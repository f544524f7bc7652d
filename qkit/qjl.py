"""QJL: the 1-bit quantized Johnson-Lindenstrauss transform and its unbiased inner-product estimator.

Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache
Quantization with Zero Overhead" (arXiv:2406.03482, 2024), Section 3:

    S in R^{m x d}, S_ij ~ N(0, 1) i.i.d.             (the JL matrix)
    H_S(k) = sign(S k) in {-1, +1}^m                  (the QJL transform)
    ProdQJL(q, k) = sqrt(pi/2) / m * ||k|| * <S q, H_S(k)>

Only the stored vector k is quantized; the query q stays in floating point
(asymmetric). Lemma 3.2: E_S[ProdQJL(q, k)] = <q, k> (unbiased). Lemma 3.5:
|ProdQJL - <q, k>| <= eps ||q|| ||k|| with probability 1 - delta once
m >= 4/3 (1 + eps) / eps^2 log(2 / delta). (Lemma numbers of the arXiv version as
quoted in reading notes, not checked against the PDF here; the constant and the
variance are derived below from first principles, and tests/test_qjl.py checks both.)

Why sqrt(pi/2), and the variance, for one row s ~ N(0, I_d) and u = k / ||k||:
<s, q> = <q, u> <s, u> + <s, q_perp> with q_perp orthogonal to u, and <s, q_perp>
is independent of <s, u>, so E[<s, q> sign(<s, u>)] = <q, u> E|<s, u>| =
sqrt(2/pi) <q, u> (half-normal mean); and (<s, q> sign(.))^2 = <s, q>^2 has
mean ||q||^2. The m rows are i.i.d., hence

    E[ProdQJL]   = sqrt(pi/2) ||k|| sqrt(2/pi) <q, u> = <q, k>
    Var[ProdQJL] = (pi/2) ||k||^2 (||q||^2 - (2/pi) <q, u>^2) / m
                 = (pi/2 ||q||^2 ||k||^2 - <q, k>^2) / m         (prod_qjl_variance(), exact for Gaussian S)

QJL estimates inner products. The "l2" metric is derived from it:
||q - x||^2 ~ ||q||^2 + ||x||^2 - 2 ProdQJL(q, x), with ||x|| the stored norm,
which is unbiased too and has four times the inner product's variance.

decode() returns the vector the estimator implies, x_hat = sqrt(pi/2) / m *
||x|| * S^T sign(S x), so that <q, x_hat> = ProdQJL(q, x) for every q: unbiased
for inner products, but a poor reconstruction: coordinate i is ProdQJL(e_i, x),
so E||x_hat - x||^2 = sum_i Var = (pi/2 d - 1) ||x||^2 / m, about 1.57 ||x||^2
at m = d. It is not a low-MSE decoder.

Code layout, one row of bytes_per_vector = ceil(m / 8) + 4 bytes:

    bytes [0, ceil(m/8))        sign bits of S x, bit i = 1 iff (S x)_i >= 0 (sign(0) = +1),
                                LSB first (qkit.packing, 1-bit codes); padding bits are 0
    bytes [ceil(m/8), +4)       ||x||_2 as little-endian float32

S is a function of (dim, seed): rows are drawn in order from one stream, so
the S of a smaller m is the first rows of the S of a larger m. Files store the
seed (and a few probe values of S to detect a changed random stream), never S.

Distances for many codes use <S q, sign> = 2 <S q, bits> - sum(S q) with bits
in {0, 1}: exactly (float64) through a 256-entry table per code byte (the
default), or, with ``query_bits=B``, through the AND-popcount kernel on a
B-bit affine grid of S q (RaBitQ's bit-sliced query), about 1.5x faster at
d = m = 128 and slightly noisier (see QJL).
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from qkit import ext
from qkit.errors import FormatError, InputError, UsageError
from qkit.packing import pack_bit_planes, pack_bits, packed_length

METRICS = ("l2", "ip", "cosine")  # as qkit.ann.codecs; cosine is "ip" on vectors the index normalizes
SQRT_HALF_PI = math.sqrt(math.pi / 2)
_SEED_TAG = 0x0471   # keeps this stream apart from qkit.rotation's
_PROBES = 4          # values of S recorded in state() to notice a changed random stream
_CHUNK_VALUES = 1 << 22  # projections per block in encode/decode (32 MiB of float64)


# ---------------------------------------------------------------- pure functions
def jl_matrix(dim: int, m: int, seed: int = 0) -> np.ndarray:
    """S (m, dim) float64 with i.i.d. N(0, 1) entries; row i does not depend on m (prefix property)."""
    rng = np.random.default_rng([_SEED_TAG, int(seed), int(dim)])
    return rng.standard_normal((int(m), int(dim)))


def prod_qjl_reference(q: np.ndarray, k: np.ndarray, S: np.ndarray) -> float:
    """ProdQJL(q, k) = sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>, a plain transcription of the paper (Sec. 3)."""
    q, k, S = (np.asarray(a, np.float64) for a in (q, k, S))
    h = np.where(S @ k >= 0, 1.0, -1.0)
    return SQRT_HALF_PI / S.shape[0] * float(np.linalg.norm(k)) * float((S @ q) @ h)


def prod_qjl_variance(q: np.ndarray, k: np.ndarray, m: int) -> float:
    """Var_S[ProdQJL(q, k)] = (pi/2 ||q||^2 ||k||^2 - <q, k>^2) / m (derivation in the module docstring)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    return (math.pi / 2 * float(q @ q) * float(k @ k) - float(q @ k) ** 2) / m


def encode_rows(S: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Rows X (n, d) -> codes (n, ceil(m/8) + 4) uint8: packed sign bits of S x, then ||x|| as float32."""
    m = S.shape[0]
    nb = packed_length(m, 1)
    out = np.empty((len(X), nb + 4), np.uint8)
    step = max(1, _CHUNK_VALUES // m)
    for i in range(0, len(X), step):
        x = np.asarray(X[i: i + step], np.float64)
        out[i: i + step, :nb] = pack_bits((x @ S.T >= 0).astype(np.uint8), 1, axis=-1)
        out[i: i + step, nb:] = np.linalg.norm(x, axis=1).astype("<f4")[:, None].view(np.uint8)
    return out


def code_norms(codes: np.ndarray, m: int) -> np.ndarray:
    """The stored ||x|| of each code row (float32 in the code), as float64 (n,)."""
    codes = np.ascontiguousarray(codes)
    if len(codes) == 0:
        return np.zeros(0)
    # a strided float32 view of bytes [nb, nb + 4) of every row: 8x faster than copying them out
    view = np.ndarray((len(codes),), "<f4", codes, packed_length(m, 1), (codes.strides[0],))
    return view.astype(np.float64)


def code_signs(codes: np.ndarray, m: int) -> np.ndarray:
    """sign(S x) of each code row, float64 (n, m) in {-1, +1}."""
    nb = packed_length(m, 1)
    bits = np.unpackbits(codes[:, :nb], axis=1, count=m, bitorder="little")
    return 2.0 * bits - 1.0


def byte_tables(Sq: np.ndarray) -> np.ndarray:
    """T (ceil(m/8), 256): T[j, b] = sum_i bit_i(b) * Sq[8j + i], built by doubling (no BLAS call)."""
    nb = packed_length(len(Sq), 1)
    sq = np.zeros((nb, 8))
    sq.reshape(-1)[: len(Sq)] = Sq
    T = np.zeros((nb, 256))
    for i in range(8):   # bytes with bit i set are the bytes below 2^i, plus Sq[8j + i]
        T[:, 1 << i: 2 << i] = T[:, : 1 << i] + sq[:, i: i + 1]
    return T


def sign_dot(Sq: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """<S q, sign(S x)> for every code row, exactly in float64 (n,).

    <S q, bits> is a sum of ceil(m/8) lookups per row in byte_tables(S q);
    then <S q, sign> = 2 <S q, bits> - sum(S q)."""
    T = byte_tables(Sq)
    nb = len(T)
    if len(codes) < 1024:   # few rows: one gather beats a Python loop over the bytes
        acc = T.reshape(-1)[codes[:, :nb] + 256 * np.arange(nb)].sum(axis=1)
    else:
        acc = np.zeros(len(codes))
        for j in range(nb):
            acc += np.take(T[j], codes[:, j])
    return 2.0 * acc - float(np.sum(Sq))


def sign_dot_quantized(Sq: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    """<S q~, sign(S x)> (n,) float64 with S q~ = lo + step * c, c in [0, 2^bits) (nearest point of the grid).

    The sign bytes are copied to contiguous rows (the kernels run slowly on rows whose length is
    not a multiple of 8 bytes), then <S q~, bits> = lo * popcount(bits) + step * <c, bits>, with
    popcount as the Hamming distance to zero and <c, bits> from AND-popcount over c's bit planes."""
    m = len(Sq)
    lo, hi = float(Sq.min()), float(Sq.max())
    step = (hi - lo) / (2**bits - 1) if hi > lo else 1.0
    c = np.clip(np.rint((Sq - lo) / step), 0, 2**bits - 1).astype(np.uint8)
    nb = packed_length(m, 1)
    rows = np.ascontiguousarray(codes[:, :nb])
    popcount = ext.hamming(np.zeros(nb, np.uint8), rows)
    dot_bits = lo * popcount + step * ext.and_popcount(pack_bit_planes(c, bits), rows).astype(np.float64)
    return 2.0 * dot_bits - (m * lo + step * float(c.sum(dtype=np.int64)))


# ---------------------------------------------------------------- the codec
class QJL:
    """QJL codes for vectors of length dim, with the asymmetric estimator of ``distances``.

    m: rows of S, i.e. sign bits per vector; default m = dim (1 bit per coordinate plus the 32-bit norm,
       the square S of TurboQuant's inner-product stage). The estimator's standard deviation is
       about sqrt(pi/2 / m) ||q|| ||x||, whatever dim is.
    seed: S = jl_matrix(dim, m, seed); S is regenerated, never stored.
    metric: "ip" (distance = minus the estimate), "cosine" (the same, on normalized vectors) or
       "l2" (||q||^2 + ||x||^2 - 2 estimate; derived, QJL itself is an inner-product method).
    query_bits: None (exact float64 table path) or 1..8: S q on a query_bits affine grid through
       qkit.ext.and_popcount. The rounding error adds about m step^2 / 12 to <S q, sign>'s variance,
       against m ||q||^2 (1 - 2/pi cos^2) from QJL itself; measured on the estimator's standard
       deviation: +0.3..1% at 4 bits, below 0.1% at 8 bits. No longer exactly unbiased (the grid is
       deterministic), though no bias showed in tests.

    The interface mirrors qkit.ann.codecs.Codec (fit/encode/decode/distances/state/from_state) so
    that a codec class can wrap it without this module importing qkit.ann.
    """

    name: ClassVar[str] = "qjl"
    trained_by_fit: ClassVar[bool] = False  # data-oblivious: S depends only on (dim, m, seed)

    def __init__(self, dim: int, m: int | None = None, seed: int = 0, *, metric: str = "ip",
                 query_bits: int | None = None):
        for what, v, lo in (("dim", dim, 1), ("m", dim if m is None else m, 1), ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise UsageError(f"QJL {what} must be an integer >= {lo}, got {v!r}")
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
        if query_bits is not None and (isinstance(query_bits, bool) or query_bits not in range(1, 9)):
            raise UsageError(f"query_bits must be None or an integer in 1..8, got {query_bits!r}")
        self.dim, self.m, self.seed = int(dim), int(dim if m is None else m), int(seed)
        self.metric = metric
        self.query_bits = None if query_bits is None else int(query_bits)
        if self.query_bits is not None and 8 * packed_length(self.m, 1) > ext.AND_POPCOUNT_MAX_BITS:
            raise UsageError(f"query_bits needs rows of at most {ext.AND_POPCOUNT_MAX_BITS} bits, "
                             f"m={self.m} is too long")
        self.S = jl_matrix(self.dim, self.m, self.seed)

    @property
    def bytes_per_vector(self) -> int:
        return packed_length(self.m, 1) + 4

    @property
    def is_trained(self) -> bool:
        return True

    def fit(self, X: np.ndarray) -> "QJL":
        return self

    # ---- checks
    def _rows(self, X, what: str) -> tuple[np.ndarray, bool]:
        X = np.asarray(X)
        one = X.ndim == 1
        X2 = X[None, :] if one else X
        if X2.ndim != 2 or X2.shape[1] != self.dim or X2.dtype.kind not in "fiu":
            raise InputError(f"QJL expects {what} of {self.dim} real values, got {X.dtype} {X.shape}")
        if not np.isfinite(X2).all():
            raise InputError(f"QJL {what} contain NaN or infinity")
        return X2, one

    def _codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.bytes_per_vector:
            raise InputError(f"QJL codes must be uint8 of shape (n, {self.bytes_per_vector}), "
                             f"got {codes.dtype} {codes.shape}")
        return codes

    # ---- codec
    def encode(self, X: np.ndarray) -> np.ndarray:
        """Rows (n, dim) -> codes (n, bytes_per_vector) uint8; one row (dim,) -> one code (bytes_per_vector,)."""
        X2, one = self._rows(X, "rows")
        codes = encode_rows(self.S, X2)
        if not np.isfinite(code_norms(codes, self.m)).all():
            raise InputError("QJL: a vector norm overflows float32")
        return codes[0] if one else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """x_hat = sqrt(pi/2) / m * ||x|| * S^T sign(S x): unbiased for inner products, not a low-MSE vector."""
        codes = self._codes(codes)
        out = np.empty((len(codes), self.dim), np.float32)
        step = max(1, _CHUNK_VALUES // self.m)
        for i in range(0, len(codes), step):
            c = codes[i: i + step]
            scale = SQRT_HALF_PI / self.m * code_norms(c, self.m)
            out[i: i + step] = scale[:, None] * (code_signs(c, self.m) @ self.S)
        return out

    def inner_products(self, query: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """ProdQJL(query, x) for every coded x, float64 (n,)."""
        q, _ = self._rows(query, "a query")
        if len(q) != 1:
            raise InputError(f"QJL expects one query of {self.dim} values, got shape {np.shape(query)}")
        codes = self._codes(codes)
        Sq = self.S @ q[0].astype(np.float64)
        if self.query_bits is None:
            dots = sign_dot(Sq, codes)
        else:
            dots = sign_dot_quantized(Sq, codes, self.query_bits)
        return SQRT_HALF_PI / self.m * code_norms(codes, self.m) * dots

    def distances(self, query: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Estimated distances, smaller is nearer, float32 (n,): -ProdQJL for ip/cosine, derived squared L2 for l2."""
        est = self.inner_products(query, codes)
        if self.metric != "l2":
            return (-est).astype(np.float32)
        q = np.asarray(query, np.float64).reshape(-1)
        x2 = code_norms(codes, self.m) ** 2
        return (float(q @ q) + x2 - 2.0 * est).astype(np.float32)

    # ---- files
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able parameters, arrays): S is regenerated from the seed, so there are no arrays."""
        params = {"m": self.m, "seed": self.seed, "probe": [float(v) for v in self.S.ravel()[:_PROBES]]}
        if self.query_bits is not None:
            params["query_bits"] = self.query_bits
        return params, {}

    @classmethod
    def from_state(cls, dim: int, metric: str, params: dict, arrays: dict[str, np.ndarray]) -> "QJL":
        try:
            m, seed, qb = int(params["m"]), int(params["seed"]), params.get("query_bits")
            c = cls(dim, m, seed, metric=metric, query_bits=None if qb is None else int(qb))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"codec qjl: bad parameters {params!r} ({e})") from None
        try:
            probe = np.asarray(params.get("probe", []), np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise FormatError(f"codec qjl: bad probe {params.get('probe')!r}") from None
        if len(probe) > c.S.size or not np.allclose(probe, c.S.ravel()[:len(probe)], rtol=1e-9, atol=0):
            raise FormatError("codec qjl: the JL matrix regenerated from the seed differs from the one the "
                              "codes were made with (numpy's random stream changed?)")
        return c

    def __repr__(self) -> str:
        qb = "" if self.query_bits is None else f", query_bits={self.query_bits}"
        return f"QJL(dim={self.dim}, m={self.m}, seed={self.seed}, metric={self.metric!r}{qb})"
