"""Vector codecs: how an index stores each vector, and the distance it estimates from a query.

A codec wraps a grid for one vector set:
``fit(X)``, ``encode(X) -> codes`` (uint8 rows of ``bytes_per_vector``),
``decode(codes)``, and the asymmetric estimator ``distances(query, codes)``
(float query, coded rows). The graph only sees a codec through its kind and
parameter arrays (``c_kind``, ``c_params``), which select the compiled
distance in ext/csrc/codec_dist.c, so a new codec plugs in without touching
the graph.

Distances here are "smaller is nearer": squared L2, or minus the inner
product for "ip" (cosine is inner product on unit vectors; the index
normalizes). The Index turns them into what users expect.

Codecs in this module (names used everywhere: CLI, files, JSON):
    flat           float32 as is (4 bytes per dimension)
    sq8            affine grid per dimension, 8 bits: x ~ vmin + step * c, c in 0..255
    sq4            the same with 4 bits, two dimensions per byte (low nibble first)
    rabitq1..9     RaBitQ with 1..9 total bits per dimension (qkit.rabitq)
    tq1..8         TurboQuant, MSE variant, b bits per coordinate (qkit.turboquant)
    tqp2..8        TurboQuant, inner-product variant (b-1 MSE bits + 1-bit QJL residual)
    qjl            1-bit quantized JL sketch, m = dim, inner products (qkit.qjl)
Every codec walks the graph through a compiled distance (``GRAPH_CODECS``);
qjl and tqp* estimate inner products, so they walk ip/cosine indexes only.
Graph walk codes (``walk_encode``) are the codec's own codes re-laid for the
kernels: see each class, and ext/csrc/qk_hnsw.h for the estimates.
The per-dimension grid is qkit.affine's (block = one whole column, float zero),
fitted on the vectors the index is trained on; later vectors outside that
range are clipped to it, as faiss's ScalarQuantizer does.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from qkit import affine
from qkit.errors import FormatError, UsageError
from qkit.packing import pack_nibbles, unpack_nibbles

METRICS = ("l2", "ip", "cosine")

# kinds shared with ext/csrc/qk_hnsw.h
(KIND_F32, KIND_SQ8, KIND_SQ4, KIND_SQ8F, KIND_SQ4F, KIND_RQ1, KIND_RQ4, KIND_RQ8, KIND_LQ4, KIND_RQ16, KIND_TQP4,
 KIND_TQP8) = range(12)


def inner_metric(metric: str) -> str:
    """The metric the codec computes: cosine is inner product on normalized vectors."""
    return "l2" if metric == "l2" else "ip"


class Codec(ABC):
    """A vector encoding with an asymmetric distance estimator."""

    name: ClassVar[str]
    c_kind: ClassVar[int]
    trained_by_fit: ClassVar[bool] = True

    def __init__(self, dim: int, metric: str = "l2"):
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
        self.dim = int(dim)
        self.metric = metric

    # ---- what every codec gives
    @property
    @abstractmethod
    def bytes_per_vector(self) -> int: ...

    @property
    def is_trained(self) -> bool:
        return True

    def fit(self, X: np.ndarray) -> "Codec":
        return self

    @abstractmethod
    def encode(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray: ...

    def distances(self, query: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Estimated distance (smaller is nearer) of one float query to every coded row: decode, then exact.

        Plain numpy; the compiled graph computes the same numbers (tests hold it to this)."""
        X = self.decode(codes).astype(np.float64)
        q = np.asarray(query, np.float64)
        if inner_metric(self.metric) == "l2":
            return ((X - q) ** 2).sum(axis=1).astype(np.float32)
        return (-(X @ q)).astype(np.float32)

    def distances_many(self, Q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """(nq, n) estimates for many queries: decode once, one matrix product (brute-force scans)."""
        X = self.decode(codes).astype(np.float32)
        Q = np.asarray(Q, np.float32)
        if inner_metric(self.metric) == "l2":
            return ((X * X).sum(1)[None, :] - 2 * Q @ X.T + (Q * Q).sum(1)[:, None]).astype(np.float32)
        return (-(Q @ X.T)).astype(np.float32)

    # ---- what the compiled graph and the file format need
    @property
    def walk_dim(self) -> int:
        """Length of the query the compiled walk sees (the rotated dimension for RaBitQ)."""
        return self.dim

    @property
    def walk_bytes(self) -> int:
        """Bytes per vector of the codes the graph stores (walk_encode)."""
        return self.bytes_per_vector

    def walk_encode(self, X) -> np.ndarray:
        return self.encode(X)

    def walk_queries(self, Q: np.ndarray) -> np.ndarray:
        """Queries as the compiled walk takes them (float32, walk_dim each)."""
        return np.ascontiguousarray(Q, np.float32)

    def c_params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The two float32 per-dimension arrays the C distance reads (None for flat)."""
        return None, None

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able parameters, named arrays) that rebuild this codec with ``from_state``."""
        return {}, {}

    @classmethod
    def from_state(cls, dim: int, metric: str, params: dict, arrays: dict[str, np.ndarray]) -> "Codec":
        return cls(dim, metric)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r})"


class FlatCodec(Codec):
    """float32 vectors as they are: exact distances, 4 bytes per dimension."""

    name = "flat"
    c_kind = KIND_F32

    @property
    def bytes_per_vector(self) -> int:
        return 4 * self.dim

    def encode(self, X):
        return np.ascontiguousarray(X, dtype=np.float32).view(np.uint8).reshape(len(X), 4 * self.dim)

    def decode(self, codes):
        return np.ascontiguousarray(codes).view(np.float32).reshape(len(codes), self.dim)


class SQCodec(Codec):
    """Scalar quantizer: an affine grid per dimension (qkit.affine, one block per column, float zero)."""

    bits: ClassVar[int]

    def __init__(self, dim: int, metric: str = "l2"):
        super().__init__(dim, metric)
        self.vmin: np.ndarray | None = None  # per-dimension zero point of the grid, float32
        self.step: np.ndarray | None = None  # per-dimension scale, float32

    @property
    def is_trained(self) -> bool:
        return self.step is not None

    def fit(self, X):
        X = np.asarray(X, np.float32)
        lo, hi = X.min(axis=0), X.max(axis=0)
        # qkit.affine widens a block's range to include 0 (a weight-grid convention); a vector set's
        # dimension need not, so the grid is placed on [min, max] shifted to start at 0.
        scale, zero = affine.qparams_from_range(np.zeros_like(lo), hi - lo, self.bits, zero_domain="float")
        self.step = np.ascontiguousarray(scale, np.float32)
        self.vmin = np.ascontiguousarray(lo - scale * zero, np.float32)  # zero is 0 here: vmin = lo
        return self

    def _need_trained(self):
        if not self.is_trained:
            raise UsageError(f"codec {self.name} is not trained: add or train vectors first")

    def quantize(self, X) -> np.ndarray:
        """Per-dimension codes 0..2^bits-1 (uint8, one per dimension), before packing."""
        self._need_trained()
        X = np.asarray(X, np.float32) - self.vmin
        return affine.quantize(X, self.step[None, :], np.zeros((1, self.dim), np.float32), self.bits,
                               (len(X) or 1, 1)) if len(X) else np.zeros((0, self.dim), np.uint8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (self.vmin + self.step * q.astype(np.float32)).astype(np.float32)

    def c_params(self):
        self._need_trained()
        return self.vmin, self.step

    def state(self):
        self._need_trained()
        return {"bits": self.bits}, {"vmin": self.vmin, "step": self.step}

    @classmethod
    def from_state(cls, dim, metric, params, arrays):
        c = cls(dim, metric)
        try:
            vmin, step = arrays["vmin"], arrays["step"]
        except KeyError as e:
            raise FormatError(f"codec {cls.name}: missing array {e.args[0]!r}") from None
        if vmin.shape != (dim,) or step.shape != (dim,) or vmin.dtype != np.float32 or step.dtype != np.float32:
            raise FormatError(f"codec {cls.name}: parameter arrays must be float32 of length {dim}")
        if not (np.isfinite(vmin).all() and np.isfinite(step).all() and (step > 0).all()):
            raise FormatError(f"codec {cls.name}: parameters are not finite positive steps")
        c.vmin, c.step = np.ascontiguousarray(vmin), np.ascontiguousarray(step)
        return c


def quantize_query(w: np.ndarray) -> tuple[np.ndarray, float]:
    """w on a symmetric int8 grid of one scale: (int8 codes, delta), w ~= delta * codes."""
    wmax = float(np.abs(w).max()) if w.size else 0.0
    delta = np.float32(wmax / 127.0) if wmax > 0 else np.float32(1.0)
    qi = np.clip(np.rint(w.astype(np.float32) / delta), -127, 127).astype(np.int8)
    return qi, float(delta)


class _SQWalk(SQCodec):
    """SQ codes as the graph walks them: codes, then float32 ||x_hat||^2, and an 8-bit query.

    <q, x_hat> = <q, vmin> + sum_j (q_j step_j) c_j with w = q * step rounded to int8 (one scale per
    query), so the sum is an integer dot product (ext/csrc/codec_dist.c); l2 adds the stored norm."""

    @abstractmethod
    def _packed(self, X) -> np.ndarray:
        """Codes of X as stored (before the norm)."""

    @abstractmethod
    def _codes_of(self, codes) -> np.ndarray:
        """Per-dimension codes (uint8) from stored code bytes."""

    @property
    @abstractmethod
    def _cb(self) -> int:
        """Bytes of codes per vector (before the norm)."""

    @property
    def bytes_per_vector(self) -> int:
        return self._cb + 4

    def encode(self, X):
        packed = self._packed(X)
        xh = self.dequantize(self._codes_of(packed)).astype(np.float64)
        n2 = (xh * xh).sum(1).astype(np.float32)
        return np.ascontiguousarray(np.concatenate([packed, n2[:, None].view(np.uint8)], axis=1))

    def decode(self, codes):
        return self.dequantize(self._codes_of(np.asarray(codes)[:, : self._cb]))

    def distances(self, query, codes):
        """The walk's estimate, in numpy (the compiled distance equals it)."""
        codes = np.asarray(codes)
        q = np.asarray(query, np.float32)
        qi, delta = quantize_query(q * self.step)
        c = self._codes_of(codes[:, : self._cb]).astype(np.int64)
        ip = float(q.astype(np.float64) @ self.vmin) + delta * (c @ qi.astype(np.int64)).astype(np.float64)
        if inner_metric(self.metric) == "l2":
            n2 = np.ascontiguousarray(codes[:, self._cb:]).view(np.float32)[:, 0]
            return (float(q.astype(np.float64) @ q) + n2 - 2 * ip).astype(np.float32)
        return (-ip).astype(np.float32)

    def distances_many(self, Q, codes):
        return np.stack([self.distances(q, codes) for q in np.asarray(Q, np.float32)])


class SQ8Codec(_SQWalk):
    name = "sq8"
    bits = 8
    c_kind = KIND_SQ8

    @property
    def _cb(self) -> int:
        return self.dim

    def _packed(self, X):
        return self.quantize(X)

    def _codes_of(self, codes):
        return np.asarray(codes)


class SQ4Codec(_SQWalk):
    name = "sq4"
    bits = 4
    c_kind = KIND_SQ4

    @property
    def _cb(self) -> int:
        return (self.dim + 1) // 2

    def _packed(self, X):
        return pack_nibbles(self.quantize(X))

    def _codes_of(self, codes):
        return unpack_nibbles(np.ascontiguousarray(codes), self.dim)


# ------------------------------------------------------------------ re-rank stores
class SQ8Store(SQCodec):
    """An 8-bit per-dimension store for re-ranking: float query, no rounding (kind SQ8F)."""

    name = "sq8"
    bits = 8
    c_kind = KIND_SQ8F

    @property
    def bytes_per_vector(self) -> int:
        return self.dim

    def encode(self, X):
        return np.ascontiguousarray(self.quantize(X))

    def decode(self, codes):
        return self.dequantize(np.asarray(codes))


class U8Store(SQ8Store):
    """The source's own uint8 values (e.g. Fashion-MNIST pixels): exact, one byte per dimension."""

    name = "u8"

    def fit(self, X):
        self.vmin = np.zeros(self.dim, np.float32)
        self.step = np.ones(self.dim, np.float32)
        return self

    def encode(self, X):
        X = np.asarray(X, np.float32)
        if X.size and (X.min() < 0 or X.max() > 255 or not np.array_equal(X, np.rint(X))):
            raise UsageError("the u8 re-rank store holds integers 0..255 only; these vectors are not")
        return np.ascontiguousarray(X.astype(np.uint8))


class FloatStore(FlatCodec):
    """float32 vectors: exact re-ranking, 4 bytes per dimension."""

    name = "float"


STORES: dict[str, type[Codec]] = {"float": FloatStore, "u8": U8Store, "sq8": SQ8Store}


def is_u8_data(X: np.ndarray) -> bool:
    """All values integers in 0..255 (the data's own bytes can serve as an exact store)."""
    X = np.asarray(X)
    return X.size > 0 and bool(X.min() >= 0 and X.max() <= 255 and np.array_equal(X, np.rint(X)))


class WrappedCodec(Codec):
    """A quantizer from qkit (RaBitQ, TurboQuant, QJL) seen through the codec interface (no graph kernel yet)."""

    c_kind = None
    family: ClassVar[str]

    def __init__(self, dim: int, metric: str = "l2", bits: int = 1, *, seed: int = 0):
        super().__init__(dim, metric)
        self.bits = int(bits)
        self.seed = int(seed)
        self.q = self._make()

    @abstractmethod
    def _make(self):
        """The wrapped quantizer (qkit.rabitq, qkit.turboquant, qkit.qjl)."""

    @property
    def name(self) -> str:
        return f"{self.family}{self.bits}" if self.family != "qjl" else "qjl"

    @property
    def bytes_per_vector(self) -> int:
        return self.q.bytes_per_vector

    @property
    def is_trained(self) -> bool:
        return self.q.is_trained

    def fit(self, X):
        self.q.fit(np.asarray(X, np.float32))
        return self

    def encode(self, X):
        return self.q.encode(np.asarray(X, np.float32))

    def decode(self, codes):
        return self.q.decode(codes)

    def distances(self, query, codes):
        return self.q.distances(query, codes, inner_metric(self.metric))

    def c_params(self):
        raise UsageError(f"codec {self.name} estimates inner products: it walks the graph of ip and cosine "
                         "indexes only")

    def state(self):
        params, arrays = self.q.state()
        return dict(params, seed=self.seed), arrays


class RaBitQCodec(WrappedCodec):
    """rabitq{B}. The graph walks B <= 8 on unsigned grid codes u = y + (2^B - 1)/2 (bits for B = 1,
    nibbles for 2..4, bytes for 5..8) followed by r and w, with the centred, rotated query on an
    int8 grid (ext/csrc/codec_dist.c, kinds RQ1/RQ4/RQ8); B = 9 walks uint16 codes (RQ16)."""

    family = "rabitq"

    @property
    def c_kind(self):
        if self.bits == 1:
            return KIND_RQ1
        return KIND_RQ4 if self.bits <= 4 else (KIND_RQ8 if self.bits <= 8 else KIND_RQ16)

    @property
    def walk_dim(self) -> int:
        return self.q.D

    @property
    def _walk_code_bytes(self) -> int:
        D = self.q.D
        return (D + 7) // 8 if self.bits == 1 else ((D + 1) // 2 if self.bits <= 4 else D * (1 + (self.bits > 8)))

    @property
    def walk_bytes(self) -> int:
        return self._walk_code_bytes + 8

    def walk_encode(self, X) -> np.ndarray:
        from qkit.packing import pack_bits, unpack_bits

        codes = self.encode(X)
        sp, mp, _, _ = self.q.split(codes)
        D, B = self.q.D, self.bits
        L = 2 ** (B - 1)
        signs = unpack_bits(np.ascontiguousarray(sp), 1, D).astype(bool)
        m = unpack_bits(np.ascontiguousarray(mp), B - 1, D).astype(np.int32) if mp is not None else 0
        u = np.where(signs, L + m, L - 1 - m)
        if B <= 8:
            u = u.astype(np.uint8)
            packed = pack_bits(u, 1) if B == 1 else (pack_bits(u, 4) if B <= 4 else u)
        else:   # little-endian uint16 per dimension
            packed = u.astype("<u2").view(np.uint8).reshape(len(u), -1)
        return np.ascontiguousarray(np.concatenate([packed, codes[:, -8:]], axis=1))

    def walk_queries(self, Q):
        Q = np.asarray(Q, np.float32)
        V = Q - self.q.centroid if inner_metric(self.metric) == "l2" else Q
        return np.ascontiguousarray(self.q.rotate_query(V), np.float32)

    def c_params(self):
        c_rot = self.q.rotate_query(self.q.centroid.astype(np.float64)).astype(np.float32)
        return np.ascontiguousarray(c_rot), np.array([(2 ** self.bits - 1) / 2], np.float32)

    def _make(self):
        from qkit.rabitq import RaBitQ

        return RaBitQ(self.dim, self.bits, query_bits=4 if self.bits == 1 else None, seed=self.seed)

    def distances_many(self, Q, codes):
        """(nq, n) estimates with float queries, for brute-force scans."""
        return self.q.distances_many(Q, codes, inner_metric(self.metric))

    @classmethod
    def from_state(cls, dim, metric, params, arrays):
        from qkit.rabitq import RaBitQ

        c = cls.__new__(cls)
        Codec.__init__(c, dim, metric)
        c.q = RaBitQ.from_state(dim, params, arrays)
        c.bits, c.seed = c.q.bits, c.q.rot.seed
        return c


def u8_grid(centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroids on a uniform 8-bit grid over [-max|c|, max|c|]: (uint8 values T, step alpha), c ~ alpha (T - 127.5).

    The walk kernels take integer codes against an int8 query; TurboQuant's Lloyd-Max centroids are not
    uniformly spaced, so each is replaced by its nearest point of this 255-step grid (an error of at most
    max|c| / 255, far below the spacing of a 1..7-bit codebook; at 8 bits neighbouring centroids near zero
    may share a value). Symmetric codebooks map +-c to T and 255 - T.
    """
    cmax = float(np.abs(centroids).max())
    alpha = 2.0 * cmax / 255.0 if cmax > 0 else 1.0
    return np.clip(np.rint(np.asarray(centroids, np.float64) / alpha + 127.5), 0, 255).astype(np.uint8), alpha


def _tail(*cols) -> np.ndarray:
    """float32 columns as the little-endian bytes that follow a walk code."""
    return np.stack(cols, 1).astype("<f4").view(np.uint8)


class QJLCodec(WrappedCodec):
    """qjl: sign bits of S x and ||x||. The graph walks it (ip/cosine) as 1-bit codes against S q (kind RQ1):
    est = w (<s, v> - sum v / 2) with w = 2 sqrt(pi/2) / m ||x||, i.e. sqrt(pi/2) / m ||x|| <2 s - 1, S q>."""

    family = "qjl"

    @property
    def c_kind(self):
        return KIND_RQ1 if inner_metric(self.metric) == "ip" else None

    @property
    def walk_dim(self) -> int:
        return self.q.m

    @property
    def walk_bytes(self) -> int:
        return (self.q.m + 7) // 8 + 8

    def walk_encode(self, X) -> np.ndarray:
        from qkit.qjl import SQRT_HALF_PI, code_norms

        codes = self.encode(X)
        m = self.q.m
        w = 2.0 * SQRT_HALF_PI / m * code_norms(codes, m)
        return np.ascontiguousarray(np.concatenate([codes[:, : (m + 7) // 8], _tail(np.ones_like(w), w)], axis=1))

    def walk_queries(self, Q):
        return np.ascontiguousarray(np.asarray(Q, np.float64) @ self.q.S.T, np.float32)

    def c_params(self):
        if self.c_kind is None:
            return super().c_params()
        return np.zeros(self.q.m, np.float32), np.array([0.5], np.float32)

    def _make(self):
        from qkit.qjl import QJL

        return QJL(self.dim, seed=self.seed, metric=self.metric)

    def distances(self, query, codes):
        return self.q.distances(query, codes)

    def distances_many(self, Q, codes):
        # QJL's l2 uses the stored norm (not the decoded vector's): one query at a time
        return np.stack([self.q.distances(q, codes) for q in np.asarray(Q, np.float32)])

    @classmethod
    def from_state(cls, dim, metric, params, arrays):
        from qkit.qjl import QJL

        c = cls.__new__(cls)
        Codec.__init__(c, dim, metric)
        c.q = QJL.from_state(dim, metric, params, arrays)
        c.bits, c.seed = 1, int(params.get("seed", 0))
        return c


class TurboQuantCodec(WrappedCodec):
    """tq{b}: TurboQuant MSE; tqp{b}: TurboQuant inner product (qkit.turboquant).

    The graph walks the rotated query v = Pi q against the codes re-laid for the kernels:
      tq1      sign bits (RQ1), c = c1 (2 u - 1) exactly;
      tq2..4   nibble indices into the 16-entry table T of u8_grid (LQ4; 4 bits per dimension in memory,
               so tq2/tq3 take as much as tq4 in the graph);
      tq5..8   the grid values T[idx] as bytes (RQ8).
    Each is x_hat' = ||x|| alpha (g - p) in rotated coordinates, with r = ||x_hat'|| and w = ||x|| alpha / r,
    so the kernel's l2 (r^2 + ||v||^2 - 2 r est) is the distance to the decoded vector, as the scan's is.
      tqp{b}   (ip/cosine) the query is [Pi q, S Pi q]; codes: the (b-1)-bit part as LQ4 nibbles (b <= 5) or
               T[idx] bytes, then the QJL sign bits; est = ||x|| alpha <T[idx] - 127.5, v1>
               + ||x|| gamma sqrt(pi/2) / d <2 s - 1, v2>, the paper's estimator (kinds TQP4/TQP8).
    """

    family = "tq"

    @property
    def _mse_bits(self) -> int:
        return self.bits - (self.family == "tqp")

    @property
    def c_kind(self):
        b = self._mse_bits
        if self.family == "tqp":
            return None if inner_metric(self.metric) == "l2" else (KIND_TQP4 if b <= 4 else KIND_TQP8)
        return KIND_RQ1 if b == 1 else (KIND_LQ4 if b <= 4 else KIND_RQ8)

    @property
    def walk_dim(self) -> int:
        return self.q.d * (2 if self.family == "tqp" else 1)

    def _part1_bytes(self) -> int:
        d, kind = self.q.d, self.c_kind
        return (d + 7) // 8 if kind == KIND_RQ1 else ((d + 1) // 2 if kind in (KIND_LQ4, KIND_TQP4) else d)

    @property
    def walk_bytes(self) -> int:
        return self._part1_bytes() + ((self.q.d + 7) // 8 if self.family == "tqp" else 0) + 8

    def walk_encode(self, X) -> np.ndarray:
        from qkit.packing import pack_bits
        from qkit.turboquant import SQRT_HALF_PI, packed_length

        if self.c_kind is None:
            self.c_params()   # the error
        q, kind = self.q, self.c_kind
        codes = self.encode(X)
        idx = q._idx(codes)
        norms = q._floats(codes, 0)
        T, alpha = u8_grid(q.centroids)
        if kind == KIND_RQ1:
            part1 = pack_bits(idx.astype(np.uint8), 1)
        elif kind in (KIND_LQ4, KIND_TQP4):
            part1 = pack_bits(idx.astype(np.uint8), 4)
        else:
            part1 = T[idx]
        if self.family == "tqp":
            nb = q._nb_idx()
            signs = codes[:, nb: nb + packed_length(q.d, 1)]
            w2 = 2.0 * SQRT_HALF_PI / q.d * norms * q._floats(codes, 1)
            parts = [part1, signs, _tail(norms * alpha, w2)]
        else:
            if kind == KIND_RQ1:
                dev = idx - 0.5
                alpha = 2.0 * float(np.abs(q.centroids).max())
            else:
                dev = T[idx].astype(np.float64) - 127.5
            nrm = np.sqrt(np.einsum("ij,ij->i", dev, dev))
            parts = [part1, _tail(norms * alpha * nrm, 1.0 / nrm)]
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def walk_queries(self, Q):
        Qr = self.q.rot.apply(np.asarray(Q, np.float64))
        if self.family == "tqp":
            Qr = np.concatenate([Qr, Qr @ self.q.S.T], axis=1)
        return np.ascontiguousarray(Qr, np.float32)

    def c_params(self):
        kind = self.c_kind
        if kind is None:
            return super().c_params()
        p1 = [0.5] if kind == KIND_RQ1 else [127.5]
        if kind in (KIND_LQ4, KIND_TQP4):
            T, _ = u8_grid(self.q.centroids)
            p1 += list(T) + [0] * (16 - len(T))
        return np.zeros(self.walk_dim, np.float32), np.array(p1, np.float32)

    def _make(self):
        from qkit import turboquant

        return turboquant.make(f"{self.family}{self.bits}", self.dim, self.metric, seed=self.seed)

    def distances(self, query, codes):
        return self.q.distances(query, codes)

    def distances_many(self, Q, codes):
        return self.q.distances(np.asarray(Q, np.float32), codes)

    @classmethod
    def from_state(cls, dim, metric, params, arrays):
        from qkit import turboquant

        c = cls.__new__(cls)
        Codec.__init__(c, dim, metric)
        kind = turboquant.TurboQuantProd if cls.family == "tqp" else turboquant.TurboQuantMSE
        c.q = kind.from_state(dim, metric, params, arrays)
        c.bits, c.seed = int(params.get("bits", 0)), int(params.get("seed", 0))
        return c


class TurboQuantProdCodec(TurboQuantCodec):
    family = "tqp"


_FAMILIES: dict[str, tuple[type[WrappedCodec], range]] = {"rabitq": (RaBitQCodec, range(1, 10)),
                                                          "tq": (TurboQuantCodec, range(1, 9)),
                                                          "tqp": (TurboQuantProdCodec, range(2, 9)),
                                                          "qjl": (QJLCodec, range(1, 2))}


def codec_names() -> list[str]:
    names = ["flat", "sq8", "sq4"]
    for fam, (_, bits) in _FAMILIES.items():
        names += ["qjl"] if fam == "qjl" else [f"{fam}{b}" for b in bits]
    return names


def _parse(name: str) -> tuple[type[Codec], int | None]:
    if name in ("flat", "sq8", "sq4"):
        return {"flat": FlatCodec, "sq8": SQ8Codec, "sq4": SQ4Codec}[name], None
    for fam in sorted(_FAMILIES, key=len, reverse=True):   # "tqp" before "tq"
        cls, bits = _FAMILIES[fam]
        rest = name[len(fam):]
        if name.startswith(fam) and (fam == "qjl" and rest == "" or rest.isdigit() and int(rest) in bits):
            return cls, (1 if fam == "qjl" else int(rest))
    raise UsageError(f"unknown codec {name!r}: expected one of {', '.join(codec_names())}")


def codec_class(name: str) -> type[Codec]:
    return _parse(name)[0]


def make_codec(name: str, dim: int, metric: str = "l2", *, seed: int = 0) -> Codec:
    cls, bits = _parse(name)
    if bits is None:
        return cls(dim, metric)
    return cls(dim, metric, bits, seed=seed)


GRAPH_CODECS: dict[str, type[Codec]] = {n: codec_class(n) for n in codec_names()}
CODECS = GRAPH_CODECS   # what an Index can hold (qjl and tqp*: ip and cosine only)
