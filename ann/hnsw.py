"""The HNSW graph's arrays, owned in numpy, walked in C (ext/csrc/hnsw.c).

Malkov & Yashunin (TPAMI 2018), paper names: each node draws a random level
``floor(-ln(U) * mL)`` with ``mL = 1 / ln(M)`` (section 4.1), links to M
neighbours per layer chosen by ``select_neighbors_heuristic`` and keeps up to
``M0 = 2M`` on layer 0. Insertion and ``search_layer`` run compiled, with the
GIL released; this module only sizes arrays and draws levels.

Layout (also the file format's, qkit.ann.fileformat):
    links0     (n, M0+1) int32   layer 0: [count, neighbour ids...]
    upper      (rows, M+1) int32 layers >= 1, one row per (node, layer)
    upper_off  (n,) int64        node i's layer l is upper row upper_off[i] + l - 1 (-1: none)
    level      (n,) int32        node i's top layer
    state      [entry, max_level] int64 (entry -1: empty)
"""
from __future__ import annotations

import math

import numpy as np

from qkit.errors import FormatError, UsageError
from qkit.ext import cpu_flags

try:  # the graph walks are C only (ext/csrc/hnsw.c); without the build, qkit.ann still imports and says so on use
    from qkit.ext import _hnsw
except ImportError:  # pragma: no cover - exercised by tests/test_layout.py in a subprocess
    _hnsw = None

NOT_BUILT = ("qkit's HNSW graph runs in the compiled extension (ext/csrc/hnsw.c), which this install lacks: "
             "reinstall with a C compiler (./dev setup, or pip install -e . with gcc); the codecs, their "
             "numpy distances and brute-force scans work without it")


def _ops():
    if _hnsw is None:
        raise UsageError(NOT_BUILT)
    return _hnsw

MAX_LEVEL = 32  # a level of 32 needs U < M^-32: never drawn for M >= 2, but a bound for the file check


def isa_code() -> int:
    return 1 if cpu_flags().get("avx2") else 0


def _grow(a: np.ndarray, rows: int) -> np.ndarray:
    """a with at least `rows` rows (capacity doubles, so n adds cost O(n) copies); new rows zero."""
    if len(a) >= rows and a.flags.writeable:
        return a
    cap = max(rows, 2 * len(a), 16) if len(a) < rows else len(a)
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out


class Graph:
    """An HNSW graph over node ids 0..n-1; the codes it walks on are passed in per call."""

    def __init__(self, M: int = 16, *, M0: int | None = None, seed: int = 0):
        if not isinstance(M, (int, np.integer)) or M < 2 or M > 1024:
            raise UsageError(f"M must be an integer in 2..1024, got {M!r}")
        _ops()  # before any data is prepared
        self.M = int(M)
        self.M0 = int(M0) if M0 is not None else 2 * self.M
        if self.M0 < self.M:
            raise UsageError(f"M0 ({self.M0}) must be >= M ({self.M})")
        self.mL = 1.0 / math.log(self.M)
        self.seed = int(seed)
        self.n = 0
        self.links0 = np.zeros((0, self.M0 + 1), np.int32)
        self.upper = np.zeros((0, self.M + 1), np.int32)
        self.upper_off = np.zeros(0, np.int64)
        self.level = np.zeros(0, np.int32)
        self.n_upper = 0
        self.state = np.array([-1, -1], np.int64)

    @property
    def entry(self) -> int:
        return int(self.state[0])

    @property
    def max_level(self) -> int:
        return int(self.state[1])

    def random_levels(self, count: int) -> np.ndarray:
        """floor(-ln U * mL), U uniform in (0, 1]; seeded by (seed, nodes so far) so a build is reproducible."""
        rng = np.random.default_rng([self.seed, self.n])
        u = 1.0 - rng.random(count)
        return np.minimum(np.floor(-np.log(u) * self.mL), MAX_LEVEL).astype(np.int32)

    def reserve(self, count: int) -> tuple[int, int]:
        """Room for `count` new nodes with drawn levels; returns the new id range [first, last)."""
        first, last = self.n, self.n + count
        lv = self.random_levels(count)
        self.links0 = _grow(self.links0, last)
        self.level = _grow(self.level, last)
        self.upper_off = _grow(self.upper_off, last)
        rows = np.where(lv > 0, lv, 0).astype(np.int64)
        off = self.n_upper + np.concatenate([[0], np.cumsum(rows)[:-1]])
        self.upper = _grow(self.upper, self.n_upper + int(rows.sum()))
        self.level[first:last] = lv
        self.upper_off[first:last] = np.where(lv > 0, off, -1)
        self.links0[first:last] = 0
        self.n_upper += int(rows.sum())
        self.n = last
        return first, last

    def insert(self, codec, codes: np.ndarray, first: int, last: int, ef_construction: int, threads: int = 1):
        """Link nodes [first, last) whose codes (under `codec`) are rows first..last-1 of `codes`."""
        p0, p1 = codec.c_params()
        _ops().add(self.n, self.M, self.M0, self.links0, self.upper, self.upper_off, self.level, self.state,
                  codec.c_kind, 0 if codec.metric == "l2" else 1, codec.walk_dim, codes, p0, p1, isa_code(),
                  first, last, int(ef_construction), int(threads))

    def search(self, codec, codes: np.ndarray, queries: np.ndarray, k: int, ef: int, rerank: int = 0,
               store=None, passmask: np.ndarray | None = None, beside: np.ndarray | None = None,
               fastscan: np.ndarray | None = None):
        p0, p1 = codec.c_params()
        return _ops().search(self.n, self.M, self.M0, self.links0, self.upper, self.upper_off, self.level, passmask,
                            self.state, codec.c_kind, 0 if codec.metric == "l2" else 1, codec.walk_dim, codes, p0, p1,
                            isa_code(), queries, int(k), int(ef), int(rerank), store, beside, fastscan)

    def fastscan_blocks(self, codes: np.ndarray, dim: int, chunk: int = 4096) -> np.ndarray:
        """The "fastscan" layout for SQ4 walk codes (ceil(dim/2) nibble bytes, then a float32):
        row i = node i's layer-0 neighbours' 4-bit codes as FastScan blocks of 32 (qkit.packing.pack_fastscan),
        (n, ceil(M0/32) * dim * 16). Slots past a node's count hold node 0's codes (estimated, never read)."""
        from qkit.packing import pack_fastscan

        n, slots = self.n, -(-self.M0 // 32) * 32
        nbytes = (dim + 1) // 2
        out = np.empty((n, slots // 32 * dim * 16), np.uint8)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            ids = np.zeros((b - a, slots), np.int64)
            ids[:, :self.M0] = np.where(np.arange(self.M0)[None, :] < self.links0[a:b, :1], self.links0[a:b, 1:], 0)
            packed = codes[ids.reshape(-1), :nbytes]
            nib = np.stack([packed & 15, packed >> 4], axis=-1).reshape(len(packed), -1)[:, :dim]
            out[a:b] = pack_fastscan(nib).reshape(b - a, -1)
        return out

    def beside_codes(self, codes: np.ndarray) -> np.ndarray:
        """The "beside" layout: row i = the codes of node i's layer-0 neighbours in list order, (n, M0 * bytes).

        Slots past a node's count hold node 0's code (never read: the walk stops at the count)."""
        n = self.n
        ids = np.where(np.arange(self.M0)[None, :] < self.links0[:n, :1], self.links0[:n, 1:], 0)
        return np.ascontiguousarray(codes[:n][ids].reshape(n, -1))

    def repair(self, codec, codes: np.ndarray, dead: np.ndarray, threads: int = 1) -> None:
        """Re-link live nodes away from dead ones (qk_hnsw_repair); the entry point moves to a live node."""
        p0, p1 = codec.c_params()
        _ops().repair(self.n, self.M, self.M0, self.links0, self.upper, self.upper_off, self.level, self.state,
                     codec.c_kind, 0 if codec.metric == "l2" else 1, codec.walk_dim, codes, p0, p1, isa_code(),
                     np.ascontiguousarray(dead, np.uint8), int(threads))

    def make_writeable(self) -> None:
        for name in ("links0", "upper", "upper_off", "level"):
            a = getattr(self, name)
            if not a.flags.writeable:
                setattr(self, name, np.array(a))

    # ---- node order
    def _layer0_adjacency(self):
        from scipy.sparse import csr_matrix

        n = self.n
        cnt = self.links0[:n, 0].astype(np.int64)
        used = np.arange(self.M0)[None, :] < cnt[:, None]
        A = csr_matrix((np.ones(int(cnt.sum()), np.int8), (np.repeat(np.arange(n), cnt), self.links0[:n, 1:][used])),
                       shape=(n, n))
        return (A + A.T).tocsr()

    def locality_order(self, method: str = "bfs", vectors: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        """A node order that puts layer-0 neighbours near each other in memory; perm[new_id] = old_id.

        Graph reordering for HNSW (Coleman et al., "Graph Reordering for Cache-Efficient Near Neighbor
        Search", NeurIPS 2022): a node's neighbours, read right after it, then share cache lines and pages.
          bfs     breadth-first from the entry point on the symmetrised layer-0 graph (scipy.sparse.csgraph),
                  unreached nodes after it in id order;
          rcm     reverse Cuthill-McKee on the same graph (scipy);
          kmeans  nodes grouped by their cell among n/64 k-means centroids of `vectors` (faiss), so each
                  ~64 neighbours in space are ~64 neighbours in memory (on Fashion-MNIST 40% of layer-0 links
                  land within 64 ids, against 11% for bfs/rcm and 1.3% in insertion order).
        """
        from scipy.sparse.csgraph import breadth_first_order, reverse_cuthill_mckee

        n = self.n
        if method == "rcm":
            return np.asarray(reverse_cuthill_mckee(self._layer0_adjacency(), symmetric_mode=True), np.int64)
        if method == "bfs":
            order = np.asarray(breadth_first_order(self._layer0_adjacency(), max(self.entry, 0), directed=False,
                                                   return_predecessors=False), np.int64)
            seen = np.zeros(n, bool)
            seen[order] = True
            return np.concatenate([order, np.flatnonzero(~seen)])
        if method == "kmeans":
            import faiss

            if vectors is None or len(vectors) != n:
                raise UsageError("kmeans reordering needs the index's vectors")
            X = np.ascontiguousarray(vectors, np.float32)
            k = max(1, n // 64)
            km = faiss.Kmeans(X.shape[1], k, niter=10, seed=seed, max_points_per_centroid=64)
            km.train(X)
            _, cell = km.index.search(X, 1)
            return np.argsort(cell[:, 0], kind="stable").astype(np.int64)
        raise UsageError(f"unknown node order {method!r}: expected bfs, rcm or kmeans")

    def permuted(self, perm: np.ndarray) -> "Graph":
        """The same graph with node perm[i] renamed i: neighbour lists keep their order, upper rows are laid
        out node by node in the new order (the layout reserve() writes and from_arrays checks)."""
        n = self.n
        perm = np.asarray(perm, np.int64)
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise UsageError("a node order must be a permutation of the node ids")
        inv = np.empty(n, np.int64)
        inv[perm] = np.arange(n)

        def renamed(block: np.ndarray, width: int) -> np.ndarray:
            out = block.copy()
            used = np.arange(width)[None, :] < out[:, :1]
            out[:, 1:][used] = inv[out[:, 1:][used]]
            return out

        level = self.level[:n][perm]
        lv = np.where(level > 0, level, 0).astype(np.int64)
        old_off = self.upper_off[:n][perm]
        # the upper rows of each node in the new order: its old rows old_off .. old_off + lv - 1
        src = np.repeat(old_off, lv) + (np.arange(int(lv.sum())) - np.repeat(np.cumsum(lv) - lv, lv))
        g = Graph(self.M, M0=self.M0, seed=self.seed)
        g.links0 = renamed(self.links0[:n][perm], self.M0)
        g.upper = renamed(self.upper[src], self.M) if len(src) else np.zeros((0, self.M + 1), np.int32)
        g.upper_off = np.where(level > 0, np.cumsum(lv) - lv, -1).astype(np.int64)
        g.level = level.astype(np.int32)
        g.n, g.n_upper = n, int(lv.sum())
        g.state = np.array([inv[self.entry] if self.entry >= 0 else -1, self.max_level], np.int64)
        return g

    # ---- sizes and checks
    def arrays(self) -> dict[str, np.ndarray]:
        """The graph's arrays trimmed to n nodes (views, no copy)."""
        return {"links0": self.links0[: self.n], "upper": self.upper[: self.n_upper],
                "upper_off": self.upper_off[: self.n], "level": self.level[: self.n]}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def degree_stats(self) -> dict:
        c = self.links0[: self.n, 0]
        return {"mean_degree0": float(c.mean()) if self.n else 0.0, "max_level": self.max_level,
                "upper_rows": self.n_upper}

    @classmethod
    def from_arrays(cls, M: int, M0: int, seed: int, entry: int, max_level: int, links0, upper, upper_off,
                    level) -> "Graph":
        """Rebuild from stored arrays, checking every id the C walk would follow (a bad file must not crash it)."""
        g = cls(M, M0=M0, seed=seed)
        for name, a, dt in (("links0", links0, np.int32), ("upper", upper, np.int32),
                            ("upper_off", upper_off, np.int64), ("level", level, np.int32)):
            if a.dtype != dt:
                raise FormatError(f"graph array {name} has dtype {a.dtype}, expected {np.dtype(dt)}")
        if links0.ndim != 2 or upper_off.ndim != 1:   # a 0-d array has no len()
            raise FormatError("graph arrays have the wrong number of dimensions")
        n = len(links0)
        if links0.shape != (n, g.M0 + 1) or upper.ndim != 2 or upper.shape[1] != g.M + 1:
            raise FormatError("graph arrays have the wrong shape for M/M0")
        if upper_off.shape != (n,) or level.shape != (n,):
            raise FormatError("per-node graph arrays do not match the node count")
        rows = len(upper)
        if n == 0:
            if entry != -1 or rows:
                raise FormatError("empty graph with an entry point or links")
        else:
            if not (0 <= entry < n) or max_level != int(level[entry]):
                raise FormatError("graph entry point is out of range or not on the top layer")
            if (level < 0).any() or (level > MAX_LEVEL).any() or int(level.max()) < max_level:
                raise FormatError("graph levels out of range")
            # the only layout reserve() writes: nodes' upper rows back to back, in id order, no gaps or overlap
            lv = np.where(level > 0, level, 0).astype(np.int64)
            want_off = np.where(level > 0, np.cumsum(lv) - lv, -1)
            if int(lv.sum()) != rows or not np.array_equal(upper_off, want_off):
                raise FormatError("graph upper-layer offsets are not the node-by-node layout")
            _check_links(links0, n, "layer 0")
            if rows:
                _check_links(upper, n, "upper layers")
                # a link on layer l must reach a node that has layer l, or the walk reads a row it does not have
                owner = np.flatnonzero(level > 0)
                row_layer = np.concatenate([np.arange(1, int(level[i]) + 1) for i in owner]) if len(owner) \
                    else np.zeros(0, np.int64)
                used = np.arange(g.M)[None, :] < upper[:, :1]
                tgt = upper[:, 1:][used]
                need = np.broadcast_to(row_layer[:, None], used.shape)[used]
                if tgt.size and (level[tgt] < need).any():
                    raise FormatError("graph upper layers link to nodes below that layer")
        g.links0, g.upper, g.upper_off, g.level = links0, upper, upper_off, level
        g.n, g.n_upper = n, rows
        g.state = np.array([entry, max_level], np.int64)
        return g


def _check_links(links: np.ndarray, n: int, what: str) -> None:
    cnt = links[:, 0]
    width = links.shape[1] - 1
    if (cnt < 0).any() or (cnt > width).any():
        raise FormatError(f"graph {what}: neighbour counts out of range")
    used = np.arange(width)[None, :] < cnt[:, None]
    ids = links[:, 1:][used]
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise FormatError(f"graph {what}: neighbour ids out of range")
