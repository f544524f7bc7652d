"""The public ANN index: faiss's call shapes, hnswlib's parameter names.

    index = Index(dim, metric="l2", codec="sq8", M=16, ef_construction=200)
    index.add(x)                         # ids 0..n-1, or add(x, ids=...) with int64 ids >= 0
    D, I = index.search(xq, k, ef=64, rerank=32)
    index.save("vecs.qkit")              # one file: graph, codes, and the re-rank store if kept
    index = Index.load("vecs.qkit")      # memory-mapped, checksummed, no pickle

Distances returned by search (float32, shape (nq, k); I int64, -1 where fewer than k were found):
    l2      squared Euclidean distance, smaller is better (faiss IndexFlatL2's convention)
    ip      inner product, larger is better
    cosine  cosine similarity, larger is better (vectors and queries are L2-normalized;
            a zero vector stays zero and has similarity 0 with everything)
Without re-ranking they are the codec's estimates; with ``rerank=R`` the best R
candidates by codec distance are re-scored exactly from the full-precision
vectors and the distances are exact.

A re-rank store (``store``) keeps a second, finer copy of every vector for
two uses: the graph is built on it, so a coarse codec does not coarsen the
graph, and it re-scores the best candidates. Stores:
    "float"  float32 vectors (exact), 4 bytes per dimension
    "u8"     the source's own uint8 values (exact when the data are integers 0..255, as
             Fashion-MNIST's pixels are), 1 byte per dimension
    "sq8"    an 8-bit grid per dimension (near exact), 1 byte per dimension
    "auto"   (default) u8 when the first vectors added are all integers 0..255, else float
    None     no store: the graph is built on the codes, and rerank is refused
The flat codec needs none (its codes are the vectors). On disk the store
is one more array of the index file, memory-mapped like the rest: one file
is renamed into place at once, so a save interrupted at any moment leaves
the previous complete index (files written before 2026-11-23 kept it in
``PATH.vectors``; they still load).

Threads: one index may be searched from many threads at once (the C search
releases the GIL). add() and remove() take the index exclusively through a
reader-writer lock: a search waits for a running add/remove and vice versa, and
a waiting add/remove goes before searches that arrive after it. So every
search runs against the index as it was between two writes: it never returns
an id removed before it started, nor one not yet added. A search with
``threads > 1`` locks per slice of queries, so its slices may see different
states when writes interleave.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qkit.ann import fileformat as ff
from qkit.ann.codecs import (CODECS, METRICS, STORES, Codec, FlatCodec, FloatStore, inner_metric, is_u8_data,
                             make_codec)
from qkit.ann.hnsw import Graph
from qkit.errors import FormatError, InputError, UsageError

log = logging.getLogger("qkit.ann")

DEFAULT_EF = 64


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise UsageError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (computed in float64: no overflow or underflow); zero rows stay zero."""
    x64 = np.asarray(x, np.float64)
    n = np.linalg.norm(x64, axis=1, keepdims=True)
    return np.where(n > 0, x64 / np.where(n > 0, n, 1), 0).astype(np.float32)


class _RWLock:
    """Many searches or one add/remove: the C search reads arrays an add reallocates and writes.

    Writers go first: once one waits, new searches wait behind it, so a steady stream of
    searches from many threads cannot starve an add or a remove."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Index:
    """HNSW over a vector codec, with optional exact re-ranking."""

    def __init__(self, dim: int, metric: str = "l2", codec: str = "sq8", M: int = 16, ef_construction: int = 200,
                 *, store: str | None = "auto", keep_vectors: bool | None = None, seed: int = 0):
        self.dim = _check_int("dim", dim, 1, 1 << 20)
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
        self.metric = metric
        self.codec: Codec = make_codec(codec, self.dim, inner_metric(metric), seed=seed)   # unknown: the list
        if self.codec.c_kind is None:
            raise UsageError(f"codec {codec} estimates inner products: use it with metric ip or cosine, "
                             f"not {metric}")
        if self.codec.c_kind not in (0, 1, 2) and store is None:
            raise UsageError(f"codec {codec} needs a re-rank store (the graph is built on it)")
        self.ef_construction = _check_int("ef_construction", ef_construction, 1)
        self.graph = Graph(_check_int("M", M, 2, 1024), seed=seed)
        if keep_vectors is not None:   # the older switch: True is a float store, False none
            store = "float" if keep_vectors else None
        if codec == "flat":
            store = None
        if store is not None and store != "auto" and store not in STORES:
            raise UsageError(f"unknown re-rank store {store!r}: expected auto, {', '.join(STORES)} or None")
        self.store_mode = store
        self.store: Codec | None = None        # chosen at the first add for "auto"
        self._store_codes: np.ndarray | None = None
        self.ef = DEFAULT_EF
        self._codes = np.zeros((0, self.codec.walk_bytes), np.uint8)
        self._labels = np.zeros(0, np.int64)
        self._dead = np.zeros(0, np.uint8)     # 1: removed (never returned, unlinked from the graph)
        self._lock = _RWLock()
        self._layout, self._beside = "ids", None
        self.path: Path | None = None

    # ---------------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        return self.graph.n

    def __len__(self) -> int:
        return self.ntotal

    @property
    def M(self) -> int:
        return self.graph.M

    @property
    def codec_name(self) -> str:
        return self.codec.name

    @property
    def codes(self) -> np.ndarray:
        return self._codes[: self.ntotal]

    @property
    def keep_vectors(self) -> bool:
        return self.store_mode is not None

    @property
    def store_codes(self) -> np.ndarray | None:
        """The re-rank store's rows (uint8 bytes), or None."""
        return None if self._store_codes is None else self._store_codes[: self.ntotal]

    @property
    def vectors(self) -> np.ndarray | None:
        """The store's vectors as floats (normalized for cosine), or None when there is no store."""
        return None if self.store is None or self._store_codes is None else self.store.decode(self.store_codes)

    @property
    def labels(self) -> np.ndarray:
        return self._labels[: self.ntotal]

    @property
    def removed(self) -> np.ndarray:
        """Per node: 1 when removed."""
        return self._dead[: self.ntotal]

    @property
    def n_live(self) -> int:
        """Vectors search can return (added minus removed)."""
        return self.ntotal - int(self.removed.sum())

    @property
    def is_trained(self) -> bool:
        return self.codec.is_trained

    @property
    def layout(self) -> str:
        """Where the layer-0 walk reads neighbour codes: "ids" (codes contiguous by id, the default) or
        "beside" (each node's neighbours' codes copied after its list, M0 x code bytes per node).

        Both were measured (eval/bench_layout.py, README); "ids" is kept as the default, "beside" stays
        available for search (rebuilt after every add or remove) so the comparison can be re-run."""
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if value not in ("ids", "beside", "fastscan"):
            raise UsageError(f"layout must be 'ids', 'beside' or 'fastscan', got {value!r}")
        if value == "fastscan" and self.codec.name != "sq4":
            raise UsageError(f"the fastscan layout estimates 4-bit per-dimension codes (sq4), not {self.codec.name}")
        with self._lock.write():
            self._layout = value
            self._beside = None

    def reorder(self, method: str = "bfs") -> None:
        """Renumber the nodes inside the index so that layer-0 neighbours sit near each other in memory
        (qkit.ann.hnsw.Graph.locality_order: "bfs", "rcm", or "kmeans" on the store's vectors): codes, graph
        rows, store and id map are permuted together. User ids, results and the file format are unchanged;
        a later add appends."""
        with self._lock.write():
            self._beside = None
            n = self.ntotal
            if n < 2:
                return
            self._make_writeable()
            vec = None
            if method == "kmeans":
                vec = self.codes.view(np.float32) if self.store is None and self.codec.name == "flat" else \
                    (self.store.decode(self.store_codes) if self.store is not None else
                     self.codec.decode(self.codes))
            perm = self.graph.locality_order(method, vec, seed=self.graph.seed)
            self.graph = self.graph.permuted(perm)
            self._codes = np.ascontiguousarray(self._codes[:n][perm])
            self._labels = np.ascontiguousarray(self._labels[:n][perm])
            self._dead = np.ascontiguousarray(self._dead[:n][perm])
            if self._store_codes is not None:
                self._store_codes = np.ascontiguousarray(self._store_codes[:n][perm])

    def _beside_codes(self) -> np.ndarray | None:
        if self._layout != "beside" or self.ntotal == 0:
            return None
        if self._beside is None:
            self._beside = self.graph.beside_codes(self.codes)
        return self._beside

    def _fastscan_blocks(self) -> np.ndarray | None:
        if self._layout != "fastscan" or self.ntotal == 0:
            return None
        if self._beside is None:
            self._beside = self.graph.fastscan_blocks(self.codes, self.codec.walk_dim)
        return self._beside

    def bytes_in_ram(self, rerank: bool = False) -> int:
        """What search reads: codes, graph, id map, and the full-precision vectors when it re-ranks
        (and, in the "beside" layout, the copied neighbour codes)."""
        b = self.codes.nbytes + self.graph.nbytes() + self.labels.nbytes
        if self._layout == "beside":
            b += self.graph.n * self.graph.M0 * self.codes.shape[1]
        elif self._layout == "fastscan":
            b += self.graph.n * (-(-self.graph.M0 // 32)) * self.codec.walk_dim * 16
        if rerank and self.store_codes is not None:
            b += self.store_codes.nbytes
        return b

    def __repr__(self) -> str:
        store = self.store.name if self.store is not None else self.store_mode
        return (f"Index(dim={self.dim}, metric={self.metric!r}, codec={self.codec.name!r}, M={self.M}, "
                f"ef_construction={self.ef_construction}, store={store!r}, ntotal={self.ntotal})")

    # ---------------------------------------------------------------- input checks
    def _as_vectors(self, x, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1 and x.shape[0] == self.dim:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"{what} must have shape (n, {self.dim}), got {tuple(x.shape)}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InputError(f"{what} must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise InputError(f"{what} row {bad} contains NaN or Inf (or overflows float32)")
        if self.metric == "cosine":
            x = normalize_rows(x)
        return x

    # ---------------------------------------------------------------- build
    def train(self, x) -> None:
        """Fit the codec's grid (sq8/sq4 ranges); add() does this on its first call when needed."""
        x = self._as_vectors(x, "training vectors")
        if len(x) == 0:
            raise InputError("training needs at least one vector")
        self.codec.fit(x)

    def add(self, x, ids=None, *, threads: int = 1, progress=None) -> None:
        """Insert vectors (n, dim); ids: int64 >= 0, unique (default: ntotal .. ntotal+n-1).

        threads: worker threads for the insertion (each locks one node's links at a time).
        progress: optional callable(done, total) called between chunks."""
        threads = _check_int("threads", threads, 1, 1024)
        raw = x
        x = self._as_vectors(x, "vectors")
        n = len(x)
        if n == 0:
            return
        if self.ntotal + n >= 2**31 - 1:
            raise UsageError("an index holds fewer than 2^31 vectors (node ids are int32)")
        with self._lock.write():
            self._beside = None   # the graph or the codes change
            labels = self._new_labels(ids, n)
            if not self.codec.is_trained:
                self.codec.fit(x)
            if self.store is None and self.store_mode is not None:
                self.store = self._choose_store(raw, x)
                self._store_codes = np.zeros((0, self.store.bytes_per_vector), np.uint8)
            self._make_writeable()
            first, last = self.graph.reserve(n)
            self._codes = _fit_rows(self._codes, last)
            self._labels = _fit_rows(self._labels, last)
            self._labels[first:last] = labels
            self._dead = _fit_rows(self._dead, last)
            self._dead[first:last] = 0
            if self.store is not None:
                self._store_codes = _fit_rows(self._store_codes, last)
            # encode and link in chunks, so progress can be reported and memory for codes stays bounded
            chunk = max(1024, min(n, 65536))
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                self._codes[first + s: first + e] = self.codec.walk_encode(x[s:e])
                if self.store is not None:
                    self._store_codes[first + s: first + e] = self.store.encode(x[s:e])
                bc, bcodes = self._build_codec()
                self.graph.insert(bc, bcodes, first + s, first + e, max(self.ef_construction, self.M),
                                  min(threads, e - s))
                if progress is not None:
                    progress(e, n)

    def _choose_store(self, raw, x) -> Codec:
        mode = self.store_mode
        if mode == "auto":
            mode = "u8" if self.metric != "cosine" and is_u8_data(x) else "float"
        st = STORES[mode](self.dim, self.codec.metric)
        if mode == "sq8":
            st.fit(x)
        elif mode == "u8":
            st.fit(x)
        return st

    def _build_codec(self) -> tuple[Codec, np.ndarray]:
        """The graph is built on the re-rank store when there is one (exact or near), else on the codes."""
        if self.store is not None:
            return self.store, self._store_codes
        return self.codec, self._codes

    def _new_labels(self, ids, n: int) -> np.ndarray:
        if ids is None:
            start = int(self.labels.max()) + 1 if self.ntotal else 0
            return np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must be {n} integers (one per vector), got shape {ids.shape} of {ids.dtype}")
        ids = ids.astype(np.int64)
        if (ids < 0).any():
            raise InputError("ids must be >= 0 (-1 marks a missing result)")
        if len(np.unique(ids)) != n:
            raise InputError("ids contain duplicates")
        live = self.labels[self.removed == 0]
        if len(live) and np.isin(ids, live).any():
            dup = int(ids[np.isin(ids, live)][0])
            raise InputError(f"id {dup} is already in the index")
        return ids

    def _make_writeable(self) -> None:
        """After a memory-mapped load, adding copies the arrays into memory once."""
        self.graph.make_writeable()
        for name in ("_codes", "_labels", "_store_codes", "_dead"):
            a = getattr(self, name)
            if a is not None and not a.flags.writeable:
                setattr(self, name, np.array(a))

    def remove(self, ids, *, threads: int = 1) -> int:
        """Remove vectors by id: never returned again, and every live node that linked to one re-selects
        its links (from its own and the removed neighbours' links), so recall holds. Storage is not
        reclaimed (the rows stay, marked). Returns how many were removed; unknown ids raise."""
        threads = _check_int("threads", threads, 1, 1024)
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            return 0
        with self._lock.write():
            self._beside = None   # the graph or the codes change
            live = np.flatnonzero(self.removed == 0)
            order = np.argsort(self.labels[live], kind="stable")
            sorted_labels = self.labels[live][order]
            pos = np.searchsorted(sorted_labels, ids)
            ok = (pos < len(sorted_labels)) & (sorted_labels[np.minimum(pos, len(sorted_labels) - 1)] == ids)
            if not ok.all():
                raise InputError(f"id {int(ids[~ok][0])} is not in the index")
            self._make_writeable()
            self._dead[live[order[pos]]] = 1
            bc, bcodes = self._build_codec()
            self.graph.repair(bc, bcodes, self.removed, threads)
        return int(ids.size)

    def _passmask(self, filter) -> np.ndarray | None:
        """uint8 per node: live and allowed by the filter (None when everything passes)."""
        mask = None
        if self.removed.any():
            mask = (self.removed == 0)
        if filter is not None:
            f = np.asarray(filter)
            if f.dtype == bool:
                lab = self.labels
                allowed = np.zeros(self.ntotal, bool)
                inside = lab < len(f)
                allowed[inside] = f[lab[inside]]
            elif np.issubdtype(f.dtype, np.integer):
                allowed = np.isin(self.labels, f.reshape(-1))
            else:
                raise InputError("filter must be ids (integers) or a boolean mask indexed by id")
            mask = allowed if mask is None else (mask & allowed)
        return None if mask is None else np.ascontiguousarray(mask, np.uint8)

    # ---------------------------------------------------------------- search
    def search(self, xq, k: int, ef: int | None = None, rerank: int = 0, *, filter=None, threads: int = 1):
        """D, I = search(xq, k): the k nearest of each query row (see the module docstring for D's meaning).

        ef: the search beam (hnswlib's ef), default index.ef (64), raised to k (and to rerank).
        rerank: re-score the best `rerank` codec candidates exactly (needs kept vectors; >= k).
        filter: ids (integers) or a boolean mask indexed by id: only those are returned. The walk
            still passes through the others, so a filter keeping 10% of the ids costs about 10x the
            distance evaluations for the same recall; with fewer matches than k, I is padded with -1.
        threads: split the queries over this many threads (the C search releases the GIL)."""
        if self.n_live == 0:
            raise UsageError("the index is empty: add vectors before searching")
        k = _check_int("k", k, 1)
        if k > self.n_live:
            raise UsageError(f"k={k} is larger than the index ({self.n_live} vectors)")
        ef = self.ef if ef is None else _check_int("ef", ef, 1)
        rerank = _check_int("rerank", rerank, 0)
        threads = _check_int("threads", threads, 1, 1024)
        if rerank and not isinstance(self.codec, FlatCodec):
            if self.store is None:
                raise UsageError("rerank needs a re-rank store, which this index does not keep")
            rerank = min(max(rerank, k), self.ntotal)
        else:
            rerank = 0
        ef = min(max(ef, k, rerank), max(self.ntotal, k))   # a beam wider than the index finds nothing more
        xq = self._as_vectors(xq, "queries")
        if filter is not None:
            ef = max(ef, k)

        def run(q):
            with self._lock.read():   # arrays are read under the lock: an add may reallocate them
                passmask = self._passmask(filter)
                store = None
                if rerank:
                    p0, p1 = self.store.c_params()
                    store = (self.store.c_kind, self.store_codes, p0, p1, q)
                D, I = self.graph.search(self.codec, self.codes, self.codec.walk_queries(q), k, ef, rerank, store,
                                         passmask, self._beside_codes(), self._fastscan_blocks())
                return D, np.where(I >= 0, self.labels[np.where(I >= 0, I, 0)], -1)

        if threads == 1 or len(xq) < 2 * threads:
            D, I = run(xq)
        else:
            parts = np.array_split(np.arange(len(xq)), threads)
            with cf.ThreadPoolExecutor(threads) as ex:
                res = list(ex.map(lambda p: run(xq[p[0]: p[-1] + 1]), parts))
            D = np.concatenate([r[0] for r in res])
            I = np.concatenate([r[1] for r in res])
        found = I >= 0
        if self.codec.metric == "ip":   # internal distances are -ip: return the similarity
            D = np.where(found, -D, -np.inf).astype(np.float32)
        return D, I

    # ---------------------------------------------------------------- files
    def save(self, path, *, inputs=()) -> int:
        """Write the index to one file (graph, codes, re-rank store); returns bytes on disk.

        The file is written under a temporary name and renamed into place, so a failed or killed
        save leaves the previous index as it was. `inputs` are paths that must not be overwritten
        (the CLI passes the vectors it read)."""
        path = Path(path)
        if self.n_live == 0:
            raise UsageError("refusing to save an empty index")
        with self._lock.read():
            store_code, sarrays = 0, {}
            if self.store is not None:
                store_code = STORE_CODES[self.store.name]
                sarrays = {"store_codes": self.store_codes}
                if self.store.name == "sq8":
                    _, st = self.store.state()
                    sarrays.update({f"store.{k}": v for k, v in st.items()})
            params, carrays = self.codec.state()
            g = self.graph
            fixed = ff.INDEX_FIELDS.pack(self.dim, ff.METRIC_CODES[self.metric], g.M, g.M0, self.ef_construction,
                                         self.ntotal, g.n_upper, g.entry, g.max_level, g.seed,
                                         self.codec.name.encode(), store_code)
            # the store's array last: search without rerank never touches its pages
            arrays = dict(g.arrays(), labels=self.labels, codes=self.codes, removed=self.removed,
                          **{f"codec.{k}": v for k, v in carrays.items()}, **sarrays)
            meta = {"codec_params": params, "ef": self.ef}
            total = ff.write_file(path, ff.MAGIC_INDEX, fixed, meta, arrays, inputs=inputs)
        _drop_legacy_vectors(path)
        self.path = path
        return total

    @classmethod
    def load(cls, path, mmap: bool = True, *, verify: bool = True) -> "Index":
        """Open an index written by save(); memory-mapped read-only when mmap (adding copies it in)."""
        c = ff.read_file(path, ff.MAGIC_INDEX, ff.INDEX_FIELDS.size, mmap=mmap, verify=verify)
        (dim, metric_code, M, M0, efc, ntotal, n_upper, entry, max_level, seed, codec_b,
         store_code) = ff.INDEX_FIELDS.unpack(c.fixed)
        metrics = {v: k for k, v in ff.METRIC_CODES.items()}
        stores = {v: k for k, v in STORE_CODES.items()}
        codec_name = codec_b.rstrip(b"\0").decode("ascii", "replace")
        if metric_code not in metrics or codec_name not in CODECS or not (1 <= dim <= 1 << 20) or \
                not (2 <= M <= 1024) or M0 < M or efc < 1 or (store_code and store_code not in stores):
            raise FormatError(f"{path}: header fields out of range (metric {metric_code}, codec {codec_name!r}, "
                              f"store {store_code})")
        store_name = stores.get(store_code)
        codes = c.arrays.get("codes")
        # every codec spends at least one bit per dimension: a header dim past 8x the stored code width is
        # corrupt, and is refused before building the codec (a rotation costs O(dim^2) memory)
        if codes is None or codes.ndim != 2 or codes.shape[0] != ntotal or dim > 8 * codes.shape[1]:
            raise FormatError(f"{path}: header dim {dim} / count {ntotal} do not match the stored codes "
                              f"{None if codes is None else codes.shape}")
        idx = cls(dim, metrics[metric_code], codec_name, M, efc, store=store_name, seed=seed)
        a = c.arrays
        try:
            carrays = {k[len("codec."):]: v for k, v in a.items() if k.startswith("codec.")}
            idx.codec = type(idx.codec).from_state(dim, idx.codec.metric, c.meta.get("codec_params", {}), carrays)
            codes, labels = a["codes"], a["labels"]
            idx.graph = Graph.from_arrays(M, M0, seed, entry, max_level, a["links0"], a["upper"], a["upper_off"],
                                          a["level"])
            ef = c.meta.get("ef", DEFAULT_EF)
            if isinstance(ef, bool) or not isinstance(ef, int) or not 1 <= ef <= 1 << 20:
                raise FormatError(f"search ef {ef!r} out of range")
            idx.ef = ef
            if store_name is not None:
                sarrays = {k[len("store."):]: v for k, v in a.items() if k.startswith("store.")}
                idx.store = _load_store(store_name, dim, idx.codec.metric, sarrays)
        except KeyError as e:
            raise FormatError(f"{path}: missing array {e.args[0]!r}") from None
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        if idx.graph.n != ntotal or len(idx.graph.upper) != n_upper or codes.shape != (ntotal, idx.codec.walk_bytes) \
                or labels.shape != (ntotal,) or codes.dtype != np.uint8 or labels.dtype != np.int64:
            raise FormatError(f"{path}: array sizes do not match the header")
        idx._codes, idx._labels = codes, labels
        dead = a.get("removed")
        if dead is None or dead.shape != (ntotal,) or dead.dtype != np.uint8 or (np.asarray(dead) > 1).any():
            raise FormatError(f"{path}: removed flags missing or malformed")
        if ntotal and dead[idx.graph.entry]:
            raise FormatError(f"{path}: the entry point is a removed node")
        idx._dead = dead
        if store_name is not None:
            want = (ntotal, idx.store.bytes_per_vector)
            sc = a.get("store_codes")
            where = path
            if sc is None:   # a file from before 2026-11-23: the store in PATH.vectors, tied by the save's CRC
                where = vectors_path(path)
                v = ff.read_file(where, ff.MAGIC_VECTORS, ff.VECTOR_FIELDS.size, mmap=mmap, verify=verify)
                vdim, vkind, vn = ff.VECTOR_FIELDS.unpack(v.fixed)
                sc = v.arrays.get("codes")
                if vdim != dim or vn != ntotal or vkind != store_code:
                    raise FormatError(f"{where}: does not match its index (dim/count/store)")
                if c.meta.get("vectors_crc") != v.data_crc:
                    raise FormatError(f"{where}: belongs to a different save of the index")
            if sc is None or sc.shape != want or sc.dtype != np.uint8:
                raise FormatError(f"{where}: re-rank store does not match the index (dim/count/store)")
            idx._store_codes = sc
        idx.path = Path(path)
        return idx


STORE_CODES = {"float": 1, "u8": 2, "sq8": 3}


def _load_store(name: str, dim: int, metric: str, arrays: dict) -> Codec:
    cls = STORES[name]
    if name == "sq8":
        return cls.from_state(dim, metric, {}, arrays)
    st = cls(dim, metric)
    return st.fit(np.zeros((1, dim), np.float32)) if name == "u8" else st


def vectors_path(path) -> Path:
    """Where files written before 2026-11-23 kept the re-rank store: INDEX.vectors (read, never written)."""
    return Path(str(path) + ".vectors")


def _drop_legacy_vectors(path: Path) -> None:
    """After a save, an older format's PATH.vectors beside it belonged to the index just replaced:
    remove it (only a qkit vectors file: anything else by that name is not ours)."""
    vp = vectors_path(path)
    try:
        with open(vp, "rb") as f:
            ours = f.read(8) == ff.MAGIC_VECTORS
        if ours:
            vp.unlink()
    except OSError:
        pass


def _fit_rows(a: np.ndarray | None, rows: int) -> np.ndarray:
    if a is None:
        raise AssertionError("no array to grow")
    if len(a) >= rows and a.flags.writeable:
        return a
    cap = max(rows, 2 * len(a), 16)
    out = np.zeros((cap,) + a.shape[1:], a.dtype)
    out[: len(a)] = a[: len(a)]
    return out
