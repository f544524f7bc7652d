/* qkit HNSW graph and codec distances (hnsw.c, codec_dist.c), called from ext/_hnsw.pyx.
 *
 * The graph (Malkov & Yashunin, "Efficient and robust approximate nearest
 * neighbor search using Hierarchical Navigable Small World graphs", TPAMI 2018)
 * walks on distances a codec computes between a prepared query and a stored
 * code. A codec is a small table: its kind picks the distance function, its
 * arrays are the codes and the per-dimension parameters. Adding a codec means
 * adding a kind here and its functions in codec_dist.c; the graph code does not
 * change.
 *
 * Every distance is "smaller is nearer": squared L2, or minus the inner
 * product (cosine is inner product over unit vectors, normalized by the caller).
 *
 * Memory is owned by the caller (numpy arrays in qkit.ann.hnsw); C only
 * reads and writes through the pointers it is given, and allocates scratch.
 */
#ifndef QK_HNSW_H
#define QK_HNSW_H
#include <stdint.h>

enum { QK_METRIC_L2 = 0, QK_METRIC_IP = 1 };
/* F32: float vectors. SQ8/SQ4: per-dimension affine codes followed by float32 ||x_hat||^2, walked with
 * an 8-bit quantized query and integer dot products. SQ8F/SQ4F: the same codes without the norm,
 * float query (re-rank stores; with vmin = 0, step = 1, SQ8F is an exact uint8 store). */
enum { QK_CODEC_F32 = 0, QK_CODEC_SQ8 = 1, QK_CODEC_SQ4 = 2, QK_CODEC_SQ8F = 3, QK_CODEC_SQ4F = 4,
       /* RaBitQ walk codes (qkit.rabitq): unsigned grid codes u (bits / nibbles / bytes), then float32 r, w.
        * The query handed to the walk is already centred (l2) and rotated: v' = P^-1 v; p0 is the rotated
        * centroid (ip), p1[0] = (2^B - 1) / 2. est <o, v> = w (<u, v'> - p1[0] sum v'). */
       QK_CODEC_RQ1 = 5, QK_CODEC_RQ4 = 6, QK_CODEC_RQ8 = 7,
       /* The same estimate over other codes. LQ4: nibble indices into a 16-entry table of uint8 grid values
        * (p1[1..16], TurboQuant's Lloyd-Max centroids on a uniform 8-bit grid). RQ16: uint16 codes (RaBitQ
        * with 9 bits). TQP4/TQP8: inner product only, TurboQuant_prod: dim = 2h, the query holds the rotated
        * query (h) then its QJL projection (h); codes are h LQ4 nibbles (TQP4) or h uint8 grid values (TQP8),
        * then h sign bits, then float32 w1, w2: est = w1 (<u, v1> - p1[0] sum v1) + w2 (<s, v2> - sum v2 / 2). */
       QK_CODEC_LQ4 = 8, QK_CODEC_RQ16 = 9, QK_CODEC_TQP4 = 10, QK_CODEC_TQP8 = 11, QK_CODEC_NKINDS = 12 };
enum { QK_H_OK = 0, QK_H_ENOMEM = -1, QK_H_EARG = -2, QK_H_ETHREAD = -3 };

typedef struct qk_codec qk_codec;
/* distance between a prepared query (qbuf, cst) and one stored code */
typedef float (*qk_dist_fn)(const qk_codec *c, const float *qbuf, float cst, const uint8_t *code);

struct qk_codec {
    int kind;               /* QK_CODEC_* */
    int metric;             /* QK_METRIC_* */
    int64_t dim;
    int64_t code_size;      /* bytes per stored vector */
    const uint8_t *codes;   /* n x code_size */
    const float *p0;        /* sq8/sq4: vmin[dim] (the grid's zero point per dimension) */
    const float *p1;        /* sq8/sq4: step[dim] (the grid's scale per dimension) */
    int isa;                /* 0 scalar, 1 AVX2+FMA */
    qk_dist_fn dist;        /* set by qk_codec_init */
};

/* fills c->dist from kind, metric and isa; QK_H_EARG for an unknown combination */
int qk_codec_init(qk_codec *c);
/* floats of query buffer a prepared query needs (dim, rounded up to a multiple of 8) */
int64_t qk_codec_qbuf_len(const qk_codec *c);
/* prepare a float query: qbuf (qk_codec_qbuf_len floats) and the constant term */
void qk_codec_prepare(const qk_codec *c, const float *q, float *qbuf, float *cst);
/* reconstruct stored vector id as floats (dim) */
void qk_codec_decode(const qk_codec *c, int64_t id, float *out);
static inline float qk_codec_dist(const qk_codec *c, const float *qbuf, float cst, int64_t id) {
    return c->dist(c, qbuf, cst, c->codes + id * c->code_size);
}

/* The graph. Layer 0: links0[i*(M0+1)] is node i's neighbour count, the next
 * M0 entries its neighbours. Layers l >= 1 of node i (1 <= l <= level[i]) live
 * in upper row upper_off[i] + l - 1, each M+1 int32 laid out the same way. */
typedef struct {
    int64_t n;              /* nodes present */
    int32_t M, M0;
    int32_t *links0;        /* n x (M0+1) */
    int32_t *upper;         /* rows x (M+1) */
    const int64_t *upper_off;
    const int32_t *level;
    const uint8_t *pass;    /* NULL, or n flags: search returns only nodes whose flag is set (a filter,
                             * removed nodes cleared); others are still walked through at layer 0 */
    const uint8_t *nbcodes; /* NULL, or the "beside" layout (search only): n x M0 codes, row i holding the
                             * walk codes of links0[i]'s neighbours in list order, so expanding a node at
                             * layer 0 reads one contiguous block instead of M0 scattered codes */
    const uint8_t *nbfast;  /* NULL, or the "fastscan" layout (search only, SQ4 walk codes): row i holds the
                             * 4-bit codes of links0[i]'s neighbours as FastScan blocks of 32 (qk_fastscan's
                             * layout, ceil(M0 / 32) blocks of dim x 16 bytes), so expanding a node estimates
                             * all its neighbours with one 16-entry-table pass per dimension (SymphonyQG) */
    int64_t entry;          /* -1 when empty */
    int32_t max_level;
} qk_hnsw;

/* Insert nodes [first, last) (their codes are already in bc->codes, their
 * levels and upper rows assigned, their link rows zeroed). bc is the codec the
 * graph is built on. n_threads >= 1 worker threads with per-node locks.
 * g->n must already be >= last. */
int qk_hnsw_add(qk_hnsw *g, const qk_codec *bc, int64_t first, int64_t last, int32_t ef_construction,
                int n_threads);

/* After nodes are marked dead: every live node that links to a dead one re-selects its links (per
 * layer) with the heuristic from its live links and the dead neighbours' live links (hnswlib's
 * repairConnectionsForUpdate idea), so no live list points at a dead node afterwards. The entry
 * point moves to a live node of the highest level. bc: the codec the graph is built on. */
int qk_hnsw_repair(qk_hnsw *g, const qk_codec *bc, const uint8_t *dead, int n_threads);

/* Search nq queries (float, dim each, already normalized for cosine). ef >= k.
 * rqueries: the queries the re-rank codec sees (rc->dim each; may equal queries).
 * rerank > 0: the best `rerank` candidates by codec distance are re-scored
 * with the re-rank codec rc (float vectors, or a compact store) before the top k are kept.
 * Writes out_d (nq x k, smaller is nearer) and out_i (nq x k internal ids, -1 padded).
 * Thread safe: any number of concurrent calls on a graph no one is adding to. */
int qk_hnsw_search(const qk_hnsw *g, const qk_codec *sc, const float *queries, int64_t nq, int32_t k,
                   int32_t ef, int32_t rerank, const qk_codec *rc, const float *rqueries, float *out_d,
                   int64_t *out_i);
#endif
