# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython shell over ext/csrc/hnsw.c and codec_dist.c: checks arrays, releases the GIL, calls C.

qkit.ann.hnsw owns the arrays and explains errors; the checks here keep a bad
array from reaching C (a ValueError, never a segfault).
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t

cnp.import_array()

cdef extern from "qk_hnsw.h":
    int QK_H_OK, QK_H_ENOMEM, QK_H_EARG, QK_H_ETHREAD
    ctypedef struct qk_codec:
        int kind
        int metric
        int64_t dim
        int64_t code_size
        const uint8_t *codes
        const float *p0
        const float *p1
        int isa
    ctypedef struct qk_hnsw:
        int64_t n
        int32_t M
        int32_t M0
        int32_t *links0
        int32_t *upper
        const int64_t *upper_off
        const int32_t *level
        const uint8_t *pass_ "pass"
        const uint8_t *nbcodes
        const uint8_t *nbfast
        int64_t entry
        int32_t max_level
    int qk_codec_init(qk_codec *c) nogil
    int64_t qk_codec_qbuf_len(const qk_codec *c) nogil
    void qk_codec_prepare(const qk_codec *c, const float *q, float *qbuf, float *cst) nogil
    float qk_codec_dist(const qk_codec *c, const float *qbuf, float cst, int64_t id) nogil
    void qk_codec_decode(const qk_codec *c, int64_t id, float *out) nogil
    int qk_hnsw_add(qk_hnsw *g, const qk_codec *bc, int64_t first, int64_t last, int32_t ef_construction,
                    int n_threads) nogil
    int qk_hnsw_repair(qk_hnsw *g, const qk_codec *bc, const uint8_t *dead, int n_threads) nogil
    int qk_hnsw_search(const qk_hnsw *g, const qk_codec *sc, const float *queries, int64_t nq, int32_t k,
                       int32_t ef, int32_t rerank, const qk_codec *rc, const float *rqueries, float *out_d,
                       int64_t *out_i) nogil

(CODEC_F32, CODEC_SQ8, CODEC_SQ4, CODEC_SQ8F, CODEC_SQ4F, CODEC_RQ1, CODEC_RQ4, CODEC_RQ8, CODEC_LQ4, CODEC_RQ16,
 CODEC_TQP4, CODEC_TQP8) = range(12)   # ext/csrc/qk_hnsw.h
METRIC_L2, METRIC_IP = 0, 1


cdef int _need(cnp.ndarray a, int ndim, object dtype, str what) except -1:
    if a.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim}-D array, got {a.ndim}-D")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{what}: expected a C-contiguous array")
    if a.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    return 0


cdef _rc(int rc):
    if rc == QK_H_ENOMEM:
        raise MemoryError("HNSW: out of memory for search scratch")
    if rc == QK_H_ETHREAD:
        raise RuntimeError("HNSW: could not start worker threads")
    if rc != QK_H_OK:
        raise ValueError("HNSW: arguments refused by the C layer")


cdef int _codec(qk_codec *c, int kind, int metric, int64_t dim, cnp.ndarray codes, object p0, object p1,
                int isa) except -1:
    _need(codes, 2, np.uint8, "codes")
    c.kind = kind
    c.metric = metric
    c.dim = dim
    c.code_size = codes.shape[1]
    c.codes = <const uint8_t *>cnp.PyArray_DATA(codes)
    c.p0 = NULL
    c.p1 = NULL
    c.isa = isa
    cdef int64_t need, h = dim // 2
    if kind < 0 or kind > CODEC_TQP8:
        raise ValueError(f"unknown codec kind {kind}")
    if (kind == CODEC_TQP4 or kind == CODEC_TQP8) and (dim % 2 or metric != 1):
        raise ValueError("TurboQuant_prod walk codes: inner product, queries of two halves")
    if kind == CODEC_F32:
        need = dim * 4
    elif kind == CODEC_SQ8 or kind == CODEC_SQ8F or kind == CODEC_RQ8:
        need = dim
    elif kind == CODEC_RQ1:
        need = (dim + 7) // 8
    elif kind == CODEC_RQ16:
        need = 2 * dim
    elif kind == CODEC_TQP4:
        need = (h + 1) // 2 + (h + 7) // 8
    elif kind == CODEC_TQP8:
        need = h + (h + 7) // 8
    else:
        need = (dim + 1) // 2
    if kind == CODEC_SQ8 or kind == CODEC_SQ4:
        need += 4   # float32 ||x_hat||^2 after the codes
    elif kind >= CODEC_RQ1:
        need += 8   # float32 r, w
    if c.code_size != need:
        raise ValueError(f"codes: rows of {c.code_size} bytes, codec needs {need}")
    cdef cnp.ndarray a0, a1
    if kind != CODEC_F32:
        a0, a1 = p0, p1
        _need(a0, 1, np.float32, "codec p0")
        _need(a1, 1, np.float32, "codec p1")
        if a0.shape[0] != dim or a1.shape[0] < (17 if kind in (CODEC_LQ4, CODEC_TQP4) else
                                                (1 if kind >= CODEC_RQ1 else dim)):
            raise ValueError("codec parameters must have one value per dimension (17 for a table kind)")
        c.p0 = <const float *>cnp.PyArray_DATA(a0)
        c.p1 = <const float *>cnp.PyArray_DATA(a1)
    _rc(qk_codec_init(c))
    return 0


cdef int _graph(qk_hnsw *g, int64_t n, int M, int M0, cnp.ndarray links0, cnp.ndarray upper, cnp.ndarray upper_off,
                cnp.ndarray level, object passmask, cnp.ndarray state) except -1:
    _need(links0, 2, np.int32, "links0")
    _need(upper, 2, np.int32, "upper")
    _need(upper_off, 1, np.int64, "upper_off")
    _need(level, 1, np.int32, "level")
    _need(state, 1, np.int64, "state")
    if links0.shape[0] < n or links0.shape[1] != M0 + 1 or upper.shape[1] != M + 1:
        raise ValueError("link arrays do not match n, M, M0")
    if upper_off.shape[0] < n or level.shape[0] < n or state.shape[0] != 2:
        raise ValueError("per-node arrays shorter than n")
    g.n = n
    g.M = M
    g.M0 = M0
    g.links0 = <int32_t *>cnp.PyArray_DATA(links0)
    g.upper = <int32_t *>cnp.PyArray_DATA(upper)
    g.upper_off = <const int64_t *>cnp.PyArray_DATA(upper_off)
    g.level = <const int32_t *>cnp.PyArray_DATA(level)
    g.pass_ = NULL
    g.nbcodes = NULL
    g.nbfast = NULL
    cdef cnp.ndarray dl
    if passmask is not None:
        dl = passmask
        _need(dl, 1, np.uint8, "pass mask")
        if dl.shape[0] < n:
            raise ValueError("pass mask shorter than n")
        g.pass_ = <const uint8_t *>cnp.PyArray_DATA(dl)
    g.entry = state[0]
    g.max_level = <int32_t>state[1]
    return 0


def add(int64_t n, int M, int M0, cnp.ndarray links0, cnp.ndarray upper, cnp.ndarray upper_off,
        cnp.ndarray level, cnp.ndarray state, int kind, int metric, int64_t dim, cnp.ndarray codes, p0, p1,
        int isa, int64_t first, int64_t last, int ef_construction, int n_threads):
    """Insert nodes [first, last) into the graph; state = [entry, max_level] is updated in place."""
    cdef qk_hnsw g
    cdef qk_codec c
    _graph(&g, n, M, M0, links0, upper, upper_off, level, None, state)
    _codec(&c, kind, metric, dim, codes, p0, p1, isa)
    if codes.shape[0] < n:
        raise ValueError("fewer codes than nodes")
    if not (0 <= first <= last <= n) or ef_construction < 1 or n_threads < 1:
        raise ValueError("bad insertion range or parameters")
    cdef int rc
    with nogil:
        rc = qk_hnsw_add(&g, &c, first, last, ef_construction, n_threads)
    state[0] = g.entry
    state[1] = g.max_level
    _rc(rc)


def repair(int64_t n, int M, int M0, cnp.ndarray links0, cnp.ndarray upper, cnp.ndarray upper_off,
           cnp.ndarray level, cnp.ndarray state, int kind, int metric, int64_t dim, cnp.ndarray codes, p0, p1,
           int isa, cnp.ndarray dead, int n_threads):
    """Re-link every live node away from dead ones; state = [entry, max_level] is updated in place."""
    cdef qk_hnsw g
    cdef qk_codec c
    _graph(&g, n, M, M0, links0, upper, upper_off, level, None, state)
    _codec(&c, kind, metric, dim, codes, p0, p1, isa)
    _need(dead, 1, np.uint8, "dead flags")
    if dead.shape[0] < n or codes.shape[0] < n or n_threads < 1:
        raise ValueError("dead flags or codes shorter than n")
    cdef const uint8_t *dp = <const uint8_t *>cnp.PyArray_DATA(dead)
    cdef int rc
    with nogil:
        rc = qk_hnsw_repair(&g, &c, dp, n_threads)
    state[0] = g.entry
    state[1] = g.max_level
    _rc(rc)


def search(int64_t n, int M, int M0, cnp.ndarray links0, cnp.ndarray upper, cnp.ndarray upper_off,
           cnp.ndarray level, object passmask, cnp.ndarray state, int kind, int metric, int64_t dim,
           cnp.ndarray codes, p0, p1, int isa, cnp.ndarray queries, int k, int ef, int rerank, object store,
           object nbcodes=None, object nbfast=None):
    """(D, I) of shape (nq, k): codec distances (or exact after re-ranking), smaller is nearer; internal ids."""
    cdef qk_hnsw g
    cdef qk_codec c
    _graph(&g, n, M, M0, links0, upper, upper_off, level, passmask, state)
    _codec(&c, kind, metric, dim, codes, p0, p1, isa)
    cdef cnp.ndarray nb
    if nbcodes is not None:
        nb = nbcodes
        _need(nb, 2, np.uint8, "beside codes")
        if nb.shape[0] < n or nb.shape[1] != M0 * codes.shape[1]:
            raise ValueError("beside codes must be (n, M0 * code bytes)")
        g.nbcodes = <const uint8_t *>cnp.PyArray_DATA(nb)
    cdef cnp.ndarray fb
    if nbfast is not None:
        fb = nbfast
        _need(fb, 2, np.uint8, "fastscan blocks")
        if kind != 2 or fb.shape[0] < n or fb.shape[1] != (M0 + 31) // 32 * dim * 16:
            raise ValueError("fastscan blocks need SQ4 codes and shape (n, ceil(M0 / 32) * dim * 16)")
        g.nbfast = <const uint8_t *>cnp.PyArray_DATA(fb)
    _need(queries, 2, np.float32, "queries")
    if queries.shape[1] != dim:
        raise ValueError(f"queries have {queries.shape[1]} dims, index has {dim}")
    if codes.shape[0] < n:
        raise ValueError("fewer codes than nodes")
    if k < 1 or ef < k or rerank < 0:
        raise ValueError("need k >= 1, ef >= k, rerank >= 0")
    cdef qk_codec rcodec
    cdef const qk_codec *rcp = NULL
    cdef const float *rqp = NULL
    cdef cnp.ndarray rq
    if rerank > 0:
        # store = (kind, codes, p0, p1, raw queries): the re-rank codec (float vectors or a compact store)
        rkind, rcodes, rp0, rp1, rq = store
        _need(rq, 2, np.float32, "re-rank queries")
        if rq.shape[0] != queries.shape[0]:
            raise ValueError("one re-rank query per query")
        _codec(&rcodec, rkind, metric, rq.shape[1], rcodes, rp0, rp1, isa)
        if rcodes.shape[0] < n:
            raise ValueError("re-rank store shorter than the index")
        rcp = &rcodec
        rqp = <const float *>cnp.PyArray_DATA(rq)
    cdef int64_t nq = queries.shape[0]
    cdef cnp.ndarray D = np.empty((nq, k), dtype=np.float32)
    cdef cnp.ndarray I = np.empty((nq, k), dtype=np.int64)
    cdef const float *qp = <const float *>cnp.PyArray_DATA(queries)
    cdef float *dp = <float *>cnp.PyArray_DATA(D)
    cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(I)
    cdef int rc
    with nogil:
        rc = qk_hnsw_search(&g, &c, qp, nq, k, ef, rerank, rcp, rqp, dp, ip)
    _rc(rc)
    return D, I


def codec_distances(int kind, int metric, int64_t dim, cnp.ndarray codes, p0, p1, int isa, cnp.ndarray query):
    """Distance of one float query to every code, through the same C functions the graph uses (for tests)."""
    cdef qk_codec c
    _codec(&c, kind, metric, dim, codes, p0, p1, isa)
    _need(query, 1, np.float32, "query")
    if query.shape[0] != dim:
        raise ValueError("query dimension mismatch")
    cdef int64_t n = codes.shape[0], i
    cdef cnp.ndarray qbuf = np.zeros(qk_codec_qbuf_len(&c), dtype=np.float32)
    cdef cnp.ndarray out = np.empty(n, dtype=np.float32)
    cdef float cst
    cdef float *ob = <float *>cnp.PyArray_DATA(out)
    cdef float *qb = <float *>cnp.PyArray_DATA(qbuf)
    with nogil:
        qk_codec_prepare(&c, <const float *>cnp.PyArray_DATA(query), qb, &cst)
        for i in range(n):
            ob[i] = qk_codec_dist(&c, qb, cst, i)
    return out


def codec_decode(int kind, int metric, int64_t dim, cnp.ndarray codes, p0, p1):
    """Reconstructed float vectors, through the C decoder the graph build uses (for tests)."""
    cdef qk_codec c
    _codec(&c, kind, metric, dim, codes, p0, p1, 0)
    cdef int64_t n = codes.shape[0], i
    cdef cnp.ndarray out = np.empty((n, dim), dtype=np.float32)
    cdef float *ob = <float *>cnp.PyArray_DATA(out)
    with nogil:
        for i in range(n):
            qk_codec_decode(&c, i, ob + i * dim)
    return out
