"""RaBitQ: 1-bit (Gao & Long, SIGMOD 2024) and extended B-bit (Gao et al., SIGMOD 2025) vector codes.

Paper quantities (SIGMOD 2024, section 3):
    c        centroid of the data (the mean)
    o        (x - c) / ||x - c||, the normalized data vector
    P        a random orthogonal rotation; the code lives in the rotated frame o' = P^-1 o
    o_bar    the quantized unit vector: P y / ||y|| with y the grid point chosen for o'
    <o_bar, o>  stored per vector; the estimator divides by it:
                <o, q> ~= <o_bar, q> / <o_bar, o>           (unbiased, Theorem 3.2)
    error bound |est - <o, q>| <= sqrt((1 - <o_bar,o>^2) / <o_bar,o>^2) * eps0 / sqrt(D - 1)
                with high probability, eps0 = 1.9 (section 3.2, eq. 15)
The query (rotated, q' = P^-1 q) is quantized to B_q bits (default 4) with
randomized rounding (section 3.3.1), so <y, q'> becomes an AND-popcount over
the query's bit planes (qkit.ext.and_popcount) for 1-bit codes.

Extended RaBitQ (SIGMOD 2025): B total bits per dimension = 1 sign bit + B-1
magnitude bits; the grid is y_i = s_i (m_i + 1/2), s_i = +-1, m_i in
0..2^(B-1)-1, and the code is the grid direction nearest to o' (largest
cosine), found over the scaling t with m_i = min(floor(t |o'_i|), 2^(B-1)-1):
for B <= 4 every critical t (where some m_i steps up) is walked exactly
(``_codes_exact``); for B >= 5 a 64-point geometric grid of t locates the best
neighbourhood and the critical t inside it are walked (``_codes_window``,
within ~1e-4 of the best cosine, tests/test_rabitq.py). B = 1 is the
original RaBitQ.

Stored per vector (little-endian, ``bytes_per_vector`` in all):
    sign plane  ceil(D/8) bytes, bit i = [o'_i >= 0] (LSB first, qkit.packing)
    magnitudes  ceil(D(B-1)/8) bytes of (B-1)-bit m_i (absent for B = 1)
    r           float32 ||x - c||
    w           float32 1 / (||y|| <o_bar, o>): est <o, v> = w * <y, P^-1 v>
"""
from __future__ import annotations

import math

import numba
import numpy as np

from qkit import ext
from qkit.errors import FormatError, UsageError
from qkit.packing import pack_bit_planes, pack_bits, packed_length, unpack_bits
from qkit.rotation import from_state as rotation_from_state
from qkit.rotation import make_rotation

EPS0 = 1.9  # the paper's confidence parameter for the error bound


# ------------------------------------------------------------------ choosing the grid point
@numba.njit(cache=True, nogil=True)
def _codes_exact(A, L):
    """For each row a = |o'| (>= 0): magnitudes m maximizing cos(y, a), y_i = m_i + 1/2, m_i <= L-1.

    As t grows, m_i = min(floor(t a_i), L-1) steps up at t = k / a_i (k = 1..L-1); walking the
    steps in order while tracking S1 = <y, a> and S2 = ||y||^2 visits every distinct code. The steps
    of one k, sorted, are the coordinates by decreasing a_i: a merge of L-1 lists of one sort order,
    O(D log D + D (L-1)^2) per row instead of sorting D (L-1) times."""
    n, D = A.shape
    M = np.zeros((n, D), np.uint16)
    cos = np.zeros(n, np.float64)
    ptr = np.zeros(L, np.int64)
    seq = np.empty(D * max(L - 1, 1), np.int64)
    cur = np.zeros(D, np.int64)
    for r in range(n):
        a = A[r]
        desc = np.argsort(-a)
        nz = 0
        for i in range(D):
            if a[i] > 0:
                nz += 1
        S1 = 0.5 * a.sum()
        S2 = 0.25 * D
        best = S1 / math.sqrt(S2)
        best_p = -1
        ptr[:] = 0
        cur[:] = 0
        ne = nz * (L - 1)
        for p in range(ne):
            kb, tb = 0, np.inf
            for k in range(1, L):            # the list whose next step comes first
                if ptr[k] < nz:
                    t = k / a[desc[ptr[k]]]
                    if t < tb:
                        tb, kb = t, k
            i = desc[ptr[kb]]
            ptr[kb] += 1
            seq[p] = i
            cur[i] += 1
            S1 += a[i]
            S2 += 2.0 * cur[i]
            v = S1 / math.sqrt(S2)
            if v > best:
                best = v
                best_p = p
        for p in range(best_p + 1):
            M[r, seq[p]] += 1
        nrm = math.sqrt((a * a).sum())
        cos[r] = best / nrm if nrm > 0 else 1.0
    return M, cos


@numba.njit(cache=True, nogil=True, inline="always")
def _cos_at(a, t, L):
    """<y, a> / ||y|| for y_i = min(floor(t a_i), L - 1) + 1/2 (the cosine up to ||a||)."""
    S1 = 0.0
    S2 = 0.0
    for i in range(a.shape[0]):
        m = min(math.floor(t * a[i]), L - 1)
        S1 += a[i] * (m + 0.5)
        S2 += (m + 0.5) * (m + 0.5)
    return S1 / math.sqrt(S2)


@numba.njit(cache=True, nogil=True)
def _codes_window(A, L, n_t):
    """The same choice, fast: a coarse geometric grid of t finds the best neighbourhood, then every
    critical t inside it is walked exactly (few events per coordinate instead of L - 1)."""
    n, D = A.shape
    M = np.zeros((n, D), np.uint16)
    cos = np.zeros(n, np.float64)
    ts = np.empty(D * L, np.float64)
    ids = np.empty(D * L, np.int64)
    cur = np.zeros(D, np.int64)
    for r in range(n):
        a = A[r]
        amax = a.max()
        nrm = math.sqrt((a * a).sum())
        if amax <= 0:
            cos[r] = 1.0
            continue
        amin = amax
        for i in range(D):
            if 0 < a[i] < amin:
                amin = a[i]
        # every step lies in [1/amax, (L-1)/amin]: a geometric grid over it (capped at 64x where the
        # largest coordinate saturates; steps of tiny coordinates beyond that cannot raise the cosine much)
        t0 = 0.99 / amax
        t1 = min((L - 1) / amin, 64.0 * (L - 0.5) / amax) * 1.01
        ratio = (t1 / t0) ** (1.0 / (n_t - 1))
        best, bj = -1.0, 0
        for j in range(n_t):
            v = _cos_at(a, t0 * ratio ** j, L)
            if v > best:
                best, bj = v, j
        lo = t0 * ratio ** (bj - 2) if bj > 1 else 0.0
        hi = t0 * ratio ** (bj + 2)
        # narrow the window with two finer grids, so the exact walk below sees few steps even for large L
        for _ in range(2):
            if lo <= 0:
                break
            r2 = (hi / lo) ** (1.0 / 15)
            best2, bk = -1.0, 0
            for j in range(16):
                v = _cos_at(a, lo * r2 ** j, L)
                if v > best2:
                    best2, bk = v, j
            lo, hi = lo * r2 ** max(bk - 1, 0), lo * r2 ** min(bk + 1, 15)
        # state just above lo, then every step inside (lo, hi]
        S1 = 0.0
        S2 = 0.0
        ne = 0
        for i in range(D):
            m = min(math.floor(lo * a[i]), L - 1) if lo > 0 else 0
            cur[i] = m
            S1 += a[i] * (m + 0.5)
            S2 += (m + 0.5) * (m + 0.5)
            if a[i] > 0:
                k = m + 1
                while k <= L - 1 and k / a[i] <= hi:
                    ts[ne] = k / a[i]
                    ids[ne] = i
                    ne += 1
                    k += 1
        best = S1 / math.sqrt(S2)
        for i in range(D):
            M[r, i] = cur[i]
        order = np.argsort(ts[:ne])
        best_p = -1
        for p in range(ne):
            i = ids[order[p]]
            cur[i] += 1
            S1 += a[i]
            S2 += 2.0 * cur[i]
            v = S1 / math.sqrt(S2)
            if v > best:
                best = v
                best_p = p
        for p in range(best_p + 1):
            M[r, ids[order[p]]] += 1
        cos[r] = best / nrm
    return M, cos


def choose_codes(Op: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signs bool, magnitudes uint16, <y_hat, o'>) for rotated unit vectors Op (n, D)."""
    L = 2 ** (bits - 1)
    A = np.abs(Op).astype(np.float64)
    if bits == 1:
        M = np.zeros(A.shape, np.uint16)
        nrm = np.sqrt((A * A).sum(1))
        cos = np.where(nrm > 0, A.sum(1) / np.sqrt(A.shape[1]) / np.where(nrm > 0, nrm, 1), 1.0)
    elif bits <= 4:
        M, cos = _codes_exact(np.ascontiguousarray(A), L)
    else:
        M, cos = _codes_window(np.ascontiguousarray(A), L, 64)
    return Op >= 0, M, cos


def grid_vectors(signs: np.ndarray, M: np.ndarray) -> np.ndarray:
    """y = s (m + 1/2) as float32 (n, D)."""
    return np.where(signs, 1.0, -1.0).astype(np.float32) * (M.astype(np.float32) + 0.5)


# ------------------------------------------------------------------ the quantizer
class RaBitQ:
    """RaBitQ with B total bits per dimension (1..9)."""

    def __init__(self, dim: int, bits: int = 1, *, query_bits: int | None = 4, seed: int = 0,
                 rotation: str = "orthogonal"):
        if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 9:
            raise UsageError(f"RaBitQ bits must be in 1..9, got {bits!r}")
        if query_bits is not None and not 1 <= query_bits <= 8:
            raise UsageError(f"query_bits must be in 1..8 or None, got {query_bits!r}")
        self.dim = int(dim)
        self.bits = int(bits)
        self.query_bits = query_bits
        self.rot = make_rotation(rotation, self.dim, seed, **({"pad": True} if rotation == "hadamard" else {}))
        self.D = self.rot.dim_out
        self.centroid: np.ndarray | None = None
        self._sign_bytes = packed_length(self.D, 1)
        self._mag_bytes = packed_length(self.D, self.bits - 1) if self.bits > 1 else 0

    # ---- sizes
    @property
    def bytes_per_vector(self) -> int:
        return self._sign_bytes + self._mag_bytes + 8

    @property
    def is_trained(self) -> bool:
        return self.centroid is not None

    def fit(self, X) -> "RaBitQ":
        self.centroid = np.asarray(X, np.float64).mean(axis=0).astype(np.float32)
        return self

    # ---- encode / decode
    def _need(self):
        if self.centroid is None:
            raise UsageError("RaBitQ is not trained: fit it on the data first")

    def _normalized(self, X):
        V = np.asarray(X, np.float32) - self.centroid
        r = np.linalg.norm(V.astype(np.float64), axis=1)
        O = V / np.where(r > 0, r, 1)[:, None]
        return O, r

    def encode(self, X) -> np.ndarray:
        self._need()
        X = np.asarray(X, np.float32)
        out = np.empty((len(X), self.bytes_per_vector), np.uint8)
        for s in range(0, len(X), 8192):
            O, r = self._normalized(X[s: s + 8192])
            Op = self.rot.apply(O.astype(np.float64))
            signs, M, cos = choose_codes(Op, self.bits)
            ynorm = np.sqrt(((M.astype(np.float64) + 0.5) ** 2).sum(1))
            w = 1.0 / (ynorm * np.maximum(cos, 1e-12))
            blk = out[s: s + 8192]
            blk[:, : self._sign_bytes] = pack_bits(signs.astype(np.uint8), 1)
            if self.bits > 1:
                blk[:, self._sign_bytes: self._sign_bytes + self._mag_bytes] = pack_bits(M, self.bits - 1)
            tail = np.stack([r.astype(np.float32), w.astype(np.float32)], axis=1)
            blk[:, -8:] = tail.view(np.uint8)
        return out

    def split(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """(sign plane bytes, magnitude bytes or None, r, w) views of coded rows."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.bytes_per_vector or codes.dtype != np.uint8:
            raise UsageError(f"RaBitQ codes must be uint8 (n, {self.bytes_per_vector}), got {codes.dtype} {codes.shape}")
        sb, mb = self._sign_bytes, self._mag_bytes
        tail = np.ascontiguousarray(codes[:, -8:]).view(np.float32)
        return codes[:, :sb], (codes[:, sb: sb + mb] if mb else None), tail[:, 0], tail[:, 1]

    def grid(self, codes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y (n, D) float32, r, w) from codes."""
        sp, mp, r, w = self.split(codes)
        signs = unpack_bits(np.ascontiguousarray(sp), 1, self.D).astype(bool)
        M = unpack_bits(np.ascontiguousarray(mp), self.bits - 1, self.D) if mp is not None \
            else np.zeros(signs.shape, np.uint8)
        return grid_vectors(signs, M), r, w

    def decode(self, codes) -> np.ndarray:
        """Reconstruction c + r P y/||y|| (the quantized vector itself; the estimator also divides by <o_bar, o>)."""
        self._need()
        y, r, _ = self.grid(codes)
        ybar = y / np.linalg.norm(y, axis=1, keepdims=True)
        return (self.centroid + r[:, None] * self.rot.inverse(ybar)[:, : self.dim]).astype(np.float32)

    # ---- estimators
    def rotate_query(self, v: np.ndarray) -> np.ndarray:
        return self.rot.apply(np.asarray(v, np.float64)).astype(np.float32)

    def quantize_query(self, vp: np.ndarray, rng: np.random.Generator):
        """B_q-bit query with randomized rounding (section 3.3.1): vp ~= v_l + delta * qu, E[.] exact."""
        B = self.query_bits
        lo, hi = float(vp.min()), float(vp.max())
        delta = (hi - lo) / (2 ** B - 1) if hi > lo else 1.0
        qu = np.floor((vp - lo) / delta + rng.random(vp.shape)).clip(0, 2 ** B - 1).astype(np.uint8)
        return qu, lo, delta

    def estimate_o_dot(self, v: np.ndarray, codes: np.ndarray, *, rng=None) -> np.ndarray:
        """est <o, v> for every coded vector (v not necessarily unit): w * <y, P^-1 v>."""
        self._need()
        vp = self.rotate_query(v)
        sp, mp, r, w = self.split(codes)
        if self.bits == 1 and self.query_bits is not None:
            rng = rng if rng is not None else np.random.default_rng(0)
            qu, lo, delta = self.quantize_query(vp, rng)
            planes = pack_bit_planes(qu, self.query_bits)
            sp = np.ascontiguousarray(sp)
            bq = ext.and_popcount(planes, sp).astype(np.float64)            # <b, qu>
            pop = ext.hamming(np.zeros(self._sign_bytes, np.uint8), sp)    # sum b
            # y = b - 1/2:  <y, vp> = delta <b, qu> + lo sum(b) - 1/2 sum(vp~), with vp~ = lo + delta qu
            s_vq = lo * self.D + delta * float(qu.sum(dtype=np.int64))
            yv = delta * bq + lo * pop - 0.5 * s_vq
        else:
            y, _, _ = self.grid(codes)
            yv = y.astype(np.float64) @ vp.astype(np.float64)
        return (w * yv).astype(np.float32)

    def distances(self, query: np.ndarray, codes: np.ndarray, metric: str = "l2", *, rng=None) -> np.ndarray:
        """Estimated squared L2 (metric "l2") or minus inner product ("ip"): smaller is nearer."""
        self._need()
        q = np.asarray(query, np.float32)
        _, _, r, _ = self.split(codes)
        if metric == "l2":
            v = q - self.centroid
            est = self.estimate_o_dot(v, codes, rng=rng).astype(np.float64)
            return (r.astype(np.float64) ** 2 + float(v @ v) - 2 * r * est).astype(np.float32)
        est = self.estimate_o_dot(q, codes, rng=rng).astype(np.float64)
        return (-(float(self.centroid @ q) + r * est)).astype(np.float32)

    def distances_many(self, Q: np.ndarray, codes: np.ndarray, metric: str = "l2") -> np.ndarray:
        """(nq, n) estimates with an unquantized query: decode y once, one matrix product (brute-force scans)."""
        self._need()
        Q = np.asarray(Q, np.float32)
        y, r, w = self.grid(codes)
        V = Q - self.centroid if metric == "l2" else Q
        Vp = self.rot.apply(V.astype(np.float64)).astype(np.float32)
        est = (Vp @ y.T) * w[None, :]
        if metric == "l2":
            return (r[None, :] ** 2 + (V * V).sum(1)[:, None] - 2 * r[None, :] * est).astype(np.float32)
        return (-(Q @ self.centroid)[:, None] - r[None, :] * est).astype(np.float32)

    def error_bound(self, codes: np.ndarray) -> np.ndarray:
        """Per-vector half-width of the paper's bound on |est <o, q> - <o, q>| for a unit q (eps0 = 1.9)."""
        y, _, w = self.grid(codes)
        cos = 1.0 / (w.astype(np.float64) * np.linalg.norm(y.astype(np.float64), axis=1))
        return np.sqrt((1 - cos ** 2) / cos ** 2) * EPS0 / math.sqrt(self.D - 1)

    # ---- files
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        self._need()
        return ({"bits": self.bits, "query_bits": self.query_bits, "rotation": self.rot.state()},
                {"centroid": self.centroid})

    @classmethod
    def from_state(cls, dim: int, params: dict, arrays: dict) -> "RaBitQ":
        try:
            rot = rotation_from_state(params["rotation"])
            q = cls(dim, int(params["bits"]), query_bits=params.get("query_bits", 4), seed=rot.seed,
                    rotation=rot.kind)
            c = arrays["centroid"]
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise FormatError(f"RaBitQ parameters are corrupt ({e})") from None
        if c.shape != (dim,) or c.dtype != np.float32 or not np.isfinite(c).all():
            raise FormatError("RaBitQ centroid must be float32 of the vector dimension")
        q.centroid = np.ascontiguousarray(c)
        return q


# ------------------------------------------------------------------ plain-numpy reference
def reference_estimate(x: np.ndarray, q: np.ndarray, c: np.ndarray, P: np.ndarray, bits: int = 1) -> float:
    """The paper's estimator for one data vector and one query, float query, from the formulas alone.

    P is the rotation as a matrix with o' = P o (rows of qkit's rotation apply as x R^T). For bits = 1 the
    code is sign(o'); otherwise the grid point of largest cosine, found by brute force over all t steps."""
    o = (x - c) / np.linalg.norm(x - c)
    qr = (q - c) / np.linalg.norm(q - c)
    op = P @ o
    a = np.abs(op)
    L = 2 ** (bits - 1)
    best, best_m = -1.0, None
    ts = sorted({0.0} | {k / ai for ai in a if ai > 0 for k in range(1, L)})
    for j, t in enumerate(ts):
        tt = (t + ts[j + 1]) / 2 if j + 1 < len(ts) else t + 1
        m = np.minimum(np.floor(tt * a), L - 1) if L > 1 else np.zeros_like(a)
        y = m + 0.5
        cs = float(y @ a) / np.linalg.norm(y)
        if cs > best:
            best, best_m = cs, m
    y = np.sign(op + (op == 0)) * (best_m + 0.5)
    obar = P.T @ (y / np.linalg.norm(y))       # the quantized unit vector in the original frame
    return float(obar @ qr) / float(obar @ o)
