/* HNSW: insertion and search (Malkov & Yashunin, TPAMI 2018).
 *
 * Paper names: INSERT (Alg. 1), SEARCH-LAYER (Alg. 2), SELECT-NEIGHBORS-
 * HEURISTIC (Alg. 4, without extendCandidates and with keepPrunedConnections
 * off, the settings the paper recommends for most data), K-NN-SEARCH (Alg. 5).
 * M neighbours are selected per layer; layer 0 keeps up to M0 = 2M links, the
 * upper layers up to M (paper section 4.1).
 *
 * Parallel insertion: worker threads take the next node from an atomic counter
 * and lock one node's link list at a time (one mutex per node), copying a list
 * out under its lock before walking it; a node that raises the top level holds
 * a global lock for its whole insertion (so two new tops never race). Search
 * takes no lock and must not run while the graph is being added to.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "qk_hnsw.h"
#include "qk_kernels.h"

typedef struct { float d; int32_t id; } cand;

/* ---------------- binary heaps of (distance, id) ---------------- */
/* max-heap: the root is the farthest; holds the ef best so far (W in the paper) */
static inline void maxh_push(cand *h, int *n, cand x) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) >> 1;
        if (h[p].d >= x.d) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}
static inline void maxh_pop(cand *h, int *n) {
    cand x = h[--(*n)];
    int i = 0, m = *n;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, b = i;
        float bd = x.d;
        if (l < m && h[l].d > bd) { b = l; bd = h[l].d; }
        if (r < m && h[r].d > bd) b = r;
        if (b == i) break;
        h[i] = h[b];
        i = b;
    }
    if (m > 0) h[i] = x;
}
/* min-heap: the root is the nearest unexpanded candidate (C in the paper) */
static inline void minh_push(cand *h, int *n, cand x) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) >> 1;
        if (h[p].d <= x.d) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}
static inline void minh_pop(cand *h, int *n) {
    cand x = h[--(*n)];
    int i = 0, m = *n;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, b = i;
        float bd = x.d;
        if (l < m && h[l].d < bd) { b = l; bd = h[l].d; }
        if (r < m && h[r].d < bd) b = r;
        if (b == i) break;
        h[i] = h[b];
        i = b;
    }
    if (m > 0) h[i] = x;
}
static int cmp_cand(const void *a, const void *b) {
    float x = ((const cand *)a)->d, y = ((const cand *)b)->d;
    if (x < y) return -1;
    if (x > y) return 1;
    int32_t i = ((const cand *)a)->id, j = ((const cand *)b)->id;
    return (i > j) - (i < j);
}

/* ---------------- scratch per thread ---------------- */
typedef struct {
    uint32_t *visited;  /* visited[i] == tag: seen in the current SEARCH-LAYER */
    uint32_t tag;
    int64_t n_visited;
    cand *cands, *res;  /* C and W */
    int cands_cap, res_cap;
    int32_t *nbr;       /* a copied neighbour list */
    float *qbuf, *qbuf2, *vec, *vec2;
    cand *sel;
    uint8_t *lut;       /* "fastscan" layout: the query's table, dim x 16 uint8 ... */
    float lut_scale, lut_bias;   /* ... estimate = lut_scale * (sum of table entries) + lut_bias */
    int32_t *est;       /* one FastScan pass: a node's neighbours (ceil(M0/32) * 32) */
} scratch;

static void scratch_free(scratch *s) {
    free(s->visited); free(s->cands); free(s->res); free(s->nbr);
    free(s->qbuf); free(s->qbuf2); free(s->vec); free(s->vec2); free(s->sel); free(s->lut); free(s->est);
    memset(s, 0, sizeof(*s));
}
static int scratch_init(scratch *s, const qk_hnsw *g, const qk_codec *c, int ef) {
    memset(s, 0, sizeof(*s));
    int64_t ql = qk_codec_qbuf_len(c);
    s->n_visited = g->n;
    s->visited = calloc((size_t)(g->n > 0 ? g->n : 1), sizeof(uint32_t));
    s->res_cap = ef + 1;
    s->cands_cap = ef + 1 + g->M0;
    s->cands = malloc(sizeof(cand) * (size_t)s->cands_cap);
    s->res = malloc(sizeof(cand) * (size_t)s->res_cap);
    s->nbr = malloc(sizeof(int32_t) * (size_t)(g->M0 + 1));
    s->sel = malloc(sizeof(cand) * (size_t)(ef + g->M0 + 2));
    s->qbuf = aligned_alloc(32, sizeof(float) * (size_t)ql);
    s->qbuf2 = aligned_alloc(32, sizeof(float) * (size_t)ql);
    s->vec = malloc(sizeof(float) * (size_t)c->dim);
    s->vec2 = malloc(sizeof(float) * (size_t)c->dim);
    if (g->nbfast) {
        s->lut = malloc((size_t)c->dim * 16);
        s->est = malloc(sizeof(int32_t) * (size_t)((g->M0 + 31) / 32 * 32));
        if (!s->lut || !s->est) { scratch_free(s); return QK_H_ENOMEM; }
    }
    if (!s->visited || !s->cands || !s->res || !s->nbr || !s->sel || !s->qbuf || !s->qbuf2 || !s->vec || !s->vec2) {
        scratch_free(s);
        return QK_H_ENOMEM;
    }
    return QK_H_OK;
}
static inline void new_tag(scratch *s) {
    if (++s->tag == 0) {  /* wrapped: clear once every 2^32 searches */
        memset(s->visited, 0, sizeof(uint32_t) * (size_t)s->n_visited);
        s->tag = 1;
    }
}
static int grow_cands(scratch *s) {
    int cap = s->cands_cap * 2;
    cand *p = realloc(s->cands, sizeof(cand) * (size_t)cap);
    if (!p) return QK_H_ENOMEM;
    s->cands = p;
    s->cands_cap = cap;
    return QK_H_OK;
}

static inline int32_t *links_at(const qk_hnsw *g, int64_t i, int l) {
    if (l == 0) return g->links0 + i * (g->M0 + 1);
    return g->upper + (g->upper_off[i] + l - 1) * (int64_t)(g->M + 1);
}

/* Neighbour list of i at layer l into out (count returned): under i's lock while building. */
static inline int read_links(const qk_hnsw *g, pthread_mutex_t *locks, int64_t i, int l, int32_t *out) {
    const int32_t *p = links_at(g, i, l);
    const int width = l == 0 ? g->M0 : g->M;
    if (locks) pthread_mutex_lock(&locks[i]);
    int cnt = p[0];
    if (cnt < 0) cnt = 0;
    if (cnt > width) cnt = width;   /* defence in depth: loaders check counts, the walk never trusts them */
    memcpy(out, p + 1, sizeof(int32_t) * (size_t)cnt);
    if (locks) pthread_mutex_unlock(&locks[i]);
    return cnt;
}

/* Greedy descent through one upper layer: the nearest node reachable from ep (K-NN-SEARCH, ef = 1). */
static void greedy(const qk_hnsw *g, const qk_codec *c, pthread_mutex_t *locks, scratch *s, float cst, int l,
                   int64_t *ep, float *dep) {
    int changed = 1;
    while (changed) {
        changed = 0;
        int cnt = read_links(g, locks, *ep, l, s->nbr);
        for (int j = 0; j < cnt; j++) {
            int32_t e = s->nbr[j];
            float d = qk_codec_dist(c, s->qbuf, cst, e);
            if (d < *dep) { *dep = d; *ep = e; changed = 1; }
        }
    }
}

/* A neighbour at distance d enters the candidates when the results are not full or it beats the worst;
 * it enters the results only if it passes the filter. */
static inline int admit(scratch *s, int *nc, int *nr, int ef, const uint8_t *pass, float d, int32_t e) {
    if (*nr < ef || d < s->res[0].d) {
        if (*nc + 1 > s->cands_cap && grow_cands(s) != QK_H_OK) return QK_H_ENOMEM;
        cand y = {d, e};
        minh_push(s->cands, nc, y);
        if (!pass || pass[e]) {
            maxh_push(s->res, nr, y);
            if (*nr > ef) maxh_pop(s->res, nr);
        }
    }
    return QK_H_OK;
}

/* SEARCH-LAYER (Alg. 2): the ef nearest found from ep at layer l, left in s->res (a max-heap of *nres). */
/* pass (NULL: all): only passing nodes enter the results; the others are still expanded, so a
 * selective filter costs more distance evaluations, not recall. */
static int search_layer(const qk_hnsw *g, const qk_codec *c, pthread_mutex_t *locks, scratch *s, float cst,
                        int64_t ep, float dep, int ef, int l, const uint8_t *pass, int *nres) {
    int nc = 0, nr = 0;
    new_tag(s);
    s->visited[ep] = s->tag;
    cand x = {dep, (int32_t)ep};
    minh_push(s->cands, &nc, x);
    if (!pass || pass[ep]) maxh_push(s->res, &nr, x);
    while (nc > 0) {
        cand cur = s->cands[0];
        if (nr >= ef && cur.d > s->res[0].d) break;   /* nearest candidate farther than the worst result */
        minh_pop(s->cands, &nc);
        if (nc > 0) __builtin_prefetch(links_at(g, s->cands[0].id, l));   /* the next expansion's list */
        int cnt = read_links(g, locks, cur.id, l, s->nbr);
        if (l == 0 && g->nbfast && !locks) {
            /* "fastscan" layout: every neighbour of cur estimated in one pass over its block */
            const int64_t row = (int64_t)((g->M0 + 31) / 32) * c->dim * 16;
            const uint8_t *blk = g->nbfast + cur.id * row;
            if (nc > 0) {
                const char *nx = (const char *)(g->nbfast + s->cands[0].id * row);
                for (int t = 0; t < 4; t++) __builtin_prefetch(nx + 64 * t);
            }
            qk_fastscan(s->lut, c->dim, blk, cnt, s->est, c->isa);
            for (int j = 0; j < cnt; j++) {
                int32_t e = s->nbr[j];
                if (s->visited[e] == s->tag) continue;
                s->visited[e] = s->tag;
                float d = s->lut_scale * (float)s->est[j] + s->lut_bias;
                if (admit(s, &nc, &nr, ef, pass, d, e) != QK_H_OK) return QK_H_ENOMEM;
            }
            continue;
        }
        if (l == 0 && g->nbcodes && !locks) {
            /* "beside" layout: the neighbours' codes are one block after the list (glass, SymphonyQG) */
            const int64_t cs = c->code_size;
            const uint8_t *blk = g->nbcodes + cur.id * (int64_t)g->M0 * cs;
            if (nc > 0) __builtin_prefetch(g->nbcodes + s->cands[0].id * (int64_t)g->M0 * cs);
            for (int j = 0; j < cnt; j++) {
                int32_t e = s->nbr[j];
                if (s->visited[e] == s->tag) continue;
                s->visited[e] = s->tag;
                float d = c->dist(c, s->qbuf, cst, blk + j * cs);
                if (admit(s, &nc, &nr, ef, pass, d, e) != QK_H_OK) return QK_H_ENOMEM;
            }
            continue;
        }
        /* first the unvisited neighbours, with their codes prefetched, then their distances: the
         * memory loads overlap instead of queueing one after another */
        int u = 0;
        for (int j = 0; j < cnt; j++) {
            int32_t e = s->nbr[j];
            if (s->visited[e] == s->tag) continue;
            s->visited[e] = s->tag;
            const char *cp = (const char *)(c->codes + (int64_t)e * c->code_size);
            __builtin_prefetch(cp);
            if (c->code_size > 64) __builtin_prefetch(cp + 64);
            if (c->code_size > 128) __builtin_prefetch(cp + 128);
            /* a code that is not a multiple of 64 bytes straddles a cache line at most ids (54 bytes for
             * GloVe-50 SQ8): its last line too, or the distance waits for it */
            __builtin_prefetch(cp + c->code_size - 1);
            s->nbr[u++] = e;
        }
        for (int j = 0; j < u; j++) {
            int32_t e = s->nbr[j];
            float d = qk_codec_dist(c, s->qbuf, cst, e);
            if (admit(s, &nc, &nr, ef, pass, d, e) != QK_H_OK) return QK_H_ENOMEM;
        }
    }
    *nres = nr;
    return QK_H_OK;
}

/* SELECT-NEIGHBORS-HEURISTIC (Alg. 4): from candidates sorted nearest first
 * (distances to the base element), keep e only if it is nearer to the base
 * than to every neighbour already kept; at most m. Candidate-to-kept distances
 * are codec distances with the candidate decoded and prepared as a query. */
static int select_heuristic(const qk_codec *c, scratch *s, cand *sorted, int n, int m, cand *out) {
    int k = 0;
    for (int i = 0; i < n && k < m; i++) {
        float cst;
        qk_codec_decode(c, sorted[i].id, s->vec2);
        qk_codec_prepare(c, s->vec2, s->qbuf2, &cst);
        int keep = 1;
        for (int j = 0; j < k; j++) {
            if (qk_codec_dist(c, s->qbuf2, cst, out[j].id) < sorted[i].d) { keep = 0; break; }
        }
        if (keep) out[k++] = sorted[i];
    }
    return k;
}

typedef struct {
    qk_hnsw *g;
    const qk_codec *c;
    int64_t last;
    int ef;
    int64_t next;              /* atomic work counter */
    pthread_mutex_t *locks;
    pthread_mutex_t top_lock;  /* held by a node that raises max_level, for its whole insertion */
    pthread_mutex_t ep_lock;   /* guards entry/max_level reads and writes */
    int err;
} build_ctx;

/* Add the link i -> e at layer l to e's list, shrinking it with the heuristic when full. */
static int connect_back(build_ctx *b, scratch *s, int64_t e, int64_t i, float d_ei, int l) {
    qk_hnsw *g = b->g;
    const qk_codec *c = b->c;
    int mmax = l == 0 ? g->M0 : g->M;
    pthread_mutex_lock(&b->locks[e]);
    int32_t *p = links_at(g, e, l);
    int cnt = p[0];
    for (int j = 0; j < cnt; j++)
        if (p[j + 1] == (int32_t)i) { pthread_mutex_unlock(&b->locks[e]); return QK_H_OK; }
    if (cnt < mmax) {
        p[1 + cnt] = (int32_t)i;
        p[0] = cnt + 1;
        pthread_mutex_unlock(&b->locks[e]);
        return QK_H_OK;
    }
    /* full: re-select among the old links and i, distances measured from e */
    float cst;
    qk_codec_decode(c, e, s->vec);
    qk_codec_prepare(c, s->vec, s->qbuf2, &cst);
    cand *pool = s->sel;   /* mmax + 1 <= ef + M0 + 2 entries */
    for (int j = 0; j < cnt; j++) pool[j] = (cand){qk_codec_dist(c, s->qbuf2, cst, p[j + 1]), p[j + 1]};
    pool[cnt] = (cand){d_ei, (int32_t)i};
    qsort(pool, (size_t)cnt + 1, sizeof(cand), cmp_cand);
    cand kept[cnt + 1];
    /* select_heuristic reuses qbuf2 for each candidate: it only needs the sorted pool */
    int k = select_heuristic(c, s, pool, cnt + 1, mmax, kept);
    for (int j = 0; j < k; j++) p[1 + j] = kept[j].id;
    p[0] = k;
    pthread_mutex_unlock(&b->locks[e]);
    return QK_H_OK;
}

/* INSERT (Alg. 1) of node i */
static int insert(build_ctx *b, scratch *s, int64_t i) {
    qk_hnsw *g = b->g;
    const qk_codec *c = b->c;
    int L = g->level[i];
    pthread_mutex_lock(&b->ep_lock);
    int top = L > g->max_level;
    pthread_mutex_unlock(&b->ep_lock);
    if (top) pthread_mutex_lock(&b->top_lock);
    pthread_mutex_lock(&b->ep_lock);
    int64_t ep = g->entry;
    int Lmax = g->max_level;
    if (ep < 0) {   /* the first node */
        g->entry = i;
        g->max_level = L;
        pthread_mutex_unlock(&b->ep_lock);
        if (top) pthread_mutex_unlock(&b->top_lock);
        return QK_H_OK;
    }
    pthread_mutex_unlock(&b->ep_lock);

    float cst;
    qk_codec_decode(c, i, s->vec);
    qk_codec_prepare(c, s->vec, s->qbuf, &cst);
    float dep = qk_codec_dist(c, s->qbuf, cst, ep);
    for (int l = Lmax; l > L; l--) greedy(g, c, b->locks, s, cst, l, &ep, &dep);
    int rc = QK_H_OK;
    for (int l = (L < Lmax ? L : Lmax); l >= 0; l--) {
        int nr;
        rc = search_layer(g, c, b->locks, s, cst, ep, dep, b->ef, l, NULL, &nr);
        if (rc != QK_H_OK) break;
        /* W sorted nearest first (drop i itself should it be there) */
        int m = 0;
        for (int j = 0; j < nr; j++) if (s->res[j].id != (int32_t)i) s->res[m++] = s->res[j];
        qsort(s->res, (size_t)m, sizeof(cand), cmp_cand);
        cand chosen[g->M0 + 1];
        int k = select_heuristic(c, s, s->res, m, g->M, chosen);
        int32_t *p = links_at(g, i, l);
        int width = l == 0 ? g->M0 : g->M;
        pthread_mutex_lock(&b->locks[i]);
        /* another thread may already have linked back to i at this layer (it found i through a lower
         * layer's fresh links): keep those links after i's own choice, as room allows */
        int old = p[0], nk = k;
        int32_t prev[width > 0 ? width : 1];
        memcpy(prev, p + 1, sizeof(int32_t) * (size_t)old);
        for (int j = 0; j < k; j++) p[1 + j] = chosen[j].id;
        for (int j = 0; j < old && nk < width; j++) {
            int dup = 0;
            for (int t = 0; t < k; t++) dup |= chosen[t].id == prev[j];
            if (!dup) p[1 + nk++] = prev[j];
        }
        p[0] = nk;
        pthread_mutex_unlock(&b->locks[i]);
        for (int j = 0; j < k; j++) {
            rc = connect_back(b, s, chosen[j].id, i, chosen[j].d, l);
            if (rc != QK_H_OK) break;
        }
        if (m > 0) { ep = s->res[0].id; dep = s->res[0].d; }
        /* qbuf was overwritten by nothing (connect_back uses qbuf2): the query stays prepared */
    }
    if (top) {
        pthread_mutex_lock(&b->ep_lock);
        if (L > g->max_level) { g->entry = i; g->max_level = L; }
        pthread_mutex_unlock(&b->ep_lock);
        pthread_mutex_unlock(&b->top_lock);
    }
    return rc;
}

static void *worker(void *arg) {
    build_ctx *b = arg;
    scratch s;
    if (scratch_init(&s, b->g, b->c, b->ef) != QK_H_OK) {
        __atomic_store_n(&b->err, QK_H_ENOMEM, __ATOMIC_SEQ_CST);
        return NULL;
    }
    for (;;) {
        if (__atomic_load_n(&b->err, __ATOMIC_SEQ_CST)) break;
        int64_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_SEQ_CST);
        if (i >= b->last) break;
        int rc = insert(b, &s, i);
        if (rc != QK_H_OK) { __atomic_store_n(&b->err, rc, __ATOMIC_SEQ_CST); break; }
    }
    scratch_free(&s);
    return NULL;
}

int qk_hnsw_add(qk_hnsw *g, const qk_codec *bc, int64_t first, int64_t last, int32_t ef_construction,
                int n_threads) {
    if (first < 0 || last > g->n || first > last || ef_construction < 1 || n_threads < 1 || g->M < 2 ||
        g->M0 < g->M)
        return QK_H_EARG;
    if (first == last) return QK_H_OK;
    build_ctx b = {.g = g, .c = bc, .last = last, .ef = ef_construction, .next = first, .err = 0};
    b.locks = malloc(sizeof(pthread_mutex_t) * (size_t)g->n);
    if (!b.locks) return QK_H_ENOMEM;
    for (int64_t i = 0; i < g->n; i++) pthread_mutex_init(&b.locks[i], NULL);
    pthread_mutex_init(&b.top_lock, NULL);
    pthread_mutex_init(&b.ep_lock, NULL);
    /* the first node of an empty graph goes in alone, so every worker finds an entry point */
    if (g->entry < 0) {
        g->entry = first;
        g->max_level = g->level[first];
        b.next = first + 1;
    }
    int rc = QK_H_OK;
    if (n_threads == 1 || last - b.next < 2) {
        worker(&b);
    } else {
        pthread_t th[n_threads];
        int started = 0;
        for (int t = 0; t < n_threads; t++) {
            if (pthread_create(&th[t], NULL, worker, &b) != 0) break;
            started++;
        }
        if (started == 0) rc = QK_H_ETHREAD;
        for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    }
    if (rc == QK_H_OK) rc = b.err;
    for (int64_t i = 0; i < g->n; i++) pthread_mutex_destroy(&b.locks[i]);
    pthread_mutex_destroy(&b.top_lock);
    pthread_mutex_destroy(&b.ep_lock);
    free(b.locks);
    return rc;
}

typedef struct {
    qk_hnsw *g;
    const qk_codec *c;
    const uint8_t *dead;
    pthread_mutex_t *locks;
    int64_t next;
    int err;
} repair_ctx;

/* re-select node u's links at layer l when one of them is dead */
static int repair_node(repair_ctx *r, scratch *s, int64_t u, int l) {
    qk_hnsw *g = r->g;
    const qk_codec *c = r->c;
    int width = l == 0 ? g->M0 : g->M;
    int32_t own[width > 0 ? width : 1];
    int cnt = read_links(g, r->locks, u, l, own), any = 0;
    for (int j = 0; j < cnt; j++) any |= r->dead[own[j]];
    if (!any) return QK_H_OK;
    float cst;
    qk_codec_decode(c, u, s->vec);
    qk_codec_prepare(c, s->vec, s->qbuf, &cst);
    new_tag(s);
    s->visited[u] = s->tag;
    int n = 0;
    /* candidates: u's live links, and the live links of its dead neighbours (two hops) */
    for (int j = 0; j < cnt; j++) {
        int32_t e = own[j];
        if (r->dead[e]) {
            int c2 = read_links(g, r->locks, e, l, s->nbr);
            for (int t = 0; t < c2; t++) {
                int32_t f = s->nbr[t];
                if (r->dead[f] || s->visited[f] == s->tag) continue;
                s->visited[f] = s->tag;
                if (n + 1 > s->cands_cap && grow_cands(s) != QK_H_OK) return QK_H_ENOMEM;
                s->cands[n++] = (cand){qk_codec_dist(c, s->qbuf, cst, f), f};
            }
        } else if (s->visited[e] != s->tag) {
            s->visited[e] = s->tag;
            if (n + 1 > s->cands_cap && grow_cands(s) != QK_H_OK) return QK_H_ENOMEM;
            s->cands[n++] = (cand){qk_codec_dist(c, s->qbuf, cst, e), e};
        }
    }
    qsort(s->cands, (size_t)n, sizeof(cand), cmp_cand);
    if (n > 2 * width) n = 2 * width;   /* the heuristic keeps near ones first: the far tail never wins */
    cand kept[width > 0 ? width : 1];
    int k = select_heuristic(c, s, s->cands, n, width, kept);
    int32_t *p = links_at(g, u, l);
    pthread_mutex_lock(&r->locks[u]);
    for (int j = 0; j < k; j++) p[1 + j] = kept[j].id;
    p[0] = k;
    pthread_mutex_unlock(&r->locks[u]);
    return QK_H_OK;
}

static void *repair_worker(void *arg) {
    repair_ctx *r = arg;
    scratch s;
    if (scratch_init(&s, r->g, r->c, r->g->M0 * (r->g->M0 + 1)) != QK_H_OK) {
        __atomic_store_n(&r->err, QK_H_ENOMEM, __ATOMIC_SEQ_CST);
        return NULL;
    }
    for (;;) {
        int64_t u = __atomic_fetch_add(&r->next, 1, __ATOMIC_SEQ_CST);
        if (u >= r->g->n || __atomic_load_n(&r->err, __ATOMIC_SEQ_CST)) break;
        if (r->dead[u]) continue;
        for (int l = 0; l <= r->g->level[u]; l++) {
            int rc = repair_node(r, &s, u, l);
            if (rc != QK_H_OK) { __atomic_store_n(&r->err, rc, __ATOMIC_SEQ_CST); break; }
        }
    }
    scratch_free(&s);
    return NULL;
}

int qk_hnsw_repair(qk_hnsw *g, const qk_codec *bc, const uint8_t *dead, int n_threads) {
    if (n_threads < 1 || !dead) return QK_H_EARG;
    repair_ctx r = {.g = g, .c = bc, .dead = dead, .next = 0, .err = 0};
    r.locks = malloc(sizeof(pthread_mutex_t) * (size_t)(g->n > 0 ? g->n : 1));
    if (!r.locks) return QK_H_ENOMEM;
    for (int64_t i = 0; i < g->n; i++) pthread_mutex_init(&r.locks[i], NULL);
    int rc = QK_H_OK;
    if (n_threads == 1) {
        repair_worker(&r);
    } else {
        pthread_t th[n_threads];
        int started = 0;
        for (int t = 0; t < n_threads; t++) {
            if (pthread_create(&th[t], NULL, repair_worker, &r) != 0) break;
            started++;
        }
        if (started == 0) rc = QK_H_ETHREAD;
        for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    }
    if (rc == QK_H_OK) rc = r.err;
    for (int64_t i = 0; i < g->n; i++) pthread_mutex_destroy(&r.locks[i]);
    free(r.locks);
    if (rc != QK_H_OK) return rc;
    /* a live entry point on the highest level any live node has */
    int64_t best = -1;
    for (int64_t i = 0; i < g->n; i++)
        if (!dead[i] && (best < 0 || g->level[i] > g->level[best])) best = i;
    g->entry = best;
    g->max_level = best >= 0 ? g->level[best] : -1;
    return QK_H_OK;
}

/* The query's FastScan table for SQ4 codes (x_j = vmin_j + step_j c): T_j[c] = (q_j - x_j)^2 (l2) or
 * -q_j x_j (ip), so sum_j T_j[c_j] is the codec's distance to the decoded vector. Each T_j is stored as
 * uint8 after subtracting its minimum, with one scale for all j (the sum must share it):
 * scale = max_j range(T_j) / 255, estimate = scale * sum + sum_j min T_j. The rounding error per
 * dimension is at most scale / 2 (Andre et al., "Cache locality is not enough", VLDB 2015, sec. 4.3). */
static void fastscan_lut(const qk_codec *c, const float *q, scratch *s) {
    float span = 0.f, bias = 0.f;
    for (int64_t j = 0; j < c->dim; j++) {
        float lo = INFINITY, hi = -INFINITY;
        for (int v = 0; v < 16; v++) {
            float x = c->p0[j] + c->p1[j] * (float)v;
            float t = c->metric == QK_METRIC_L2 ? (q[j] - x) * (q[j] - x) : -q[j] * x;
            lo = t < lo ? t : lo;
            hi = t > hi ? t : hi;
        }
        span = hi - lo > span ? hi - lo : span;
        bias += lo;
    }
    float scale = span > 0.f ? span / 255.f : 1.f;
    for (int64_t j = 0; j < c->dim; j++) {
        float lo = INFINITY, t[16];
        for (int v = 0; v < 16; v++) {
            float x = c->p0[j] + c->p1[j] * (float)v;
            t[v] = c->metric == QK_METRIC_L2 ? (q[j] - x) * (q[j] - x) : -q[j] * x;
            lo = t[v] < lo ? t[v] : lo;
        }
        for (int v = 0; v < 16; v++) {
            float u = nearbyintf((t[v] - lo) / scale);
            s->lut[j * 16 + v] = (uint8_t)(u > 255.f ? 255.f : u);
        }
    }
    s->lut_scale = scale;
    s->lut_bias = bias;
}

/* K-NN-SEARCH (Alg. 5) for a batch of queries, then optional exact re-ranking. */
int qk_hnsw_search(const qk_hnsw *g, const qk_codec *sc, const float *queries, int64_t nq, int32_t k,
                   int32_t ef, int32_t rerank, const qk_codec *rc, const float *rqueries, float *out_d,
                   int64_t *out_i) {
    if (k < 1 || ef < k || rerank < 0 || (rerank > 0 && (!rc || !rqueries))) return QK_H_EARG;
    if (g->nbfast && sc->kind != QK_CODEC_SQ4) return QK_H_EARG;
    if (rerank > ef) ef = rerank;
    for (int64_t i = 0; i < nq * k; i++) { out_d[i] = INFINITY; out_i[i] = -1; }
    if (g->entry < 0 || nq == 0) return QK_H_OK;
    scratch s;
    if (scratch_init(&s, g, sc, ef) != QK_H_OK) return QK_H_ENOMEM;
    float *rbuf = NULL;
    if (rerank > 0 && !(rbuf = aligned_alloc(32, sizeof(float) * (size_t)qk_codec_qbuf_len(rc)))) {
        scratch_free(&s);
        return QK_H_ENOMEM;
    }
    int rc_ = QK_H_OK;
    cand *out = s.sel;
    for (int64_t qi = 0; qi < nq; qi++) {
        const float *q = queries + qi * sc->dim;
        float cst;
        qk_codec_prepare(sc, q, s.qbuf, &cst);
        if (g->nbfast) fastscan_lut(sc, q, &s);
        int64_t ep = g->entry;
        float dep = qk_codec_dist(sc, s.qbuf, cst, ep);
        for (int l = g->max_level; l > 0; l--) greedy(g, sc, NULL, &s, cst, l, &ep, &dep);
        int nr;
        rc_ = search_layer(g, sc, NULL, &s, cst, ep, dep, ef, 0, g->pass, &nr);
        if (rc_ != QK_H_OK) break;
        int m = 0;
        for (int j = 0; j < nr; j++)
            if (!g->pass || g->pass[s.res[j].id]) out[m++] = s.res[j];
        qsort(out, (size_t)m, sizeof(cand), cmp_cand);
        if (rerank > 0) {
            float rcst;
            if (m > rerank) m = rerank;
            qk_codec_prepare(rc, rqueries + qi * rc->dim, rbuf, &rcst);
            for (int j = 0; j < m; j++) out[j].d = qk_codec_dist(rc, rbuf, rcst, out[j].id);
            qsort(out, (size_t)m, sizeof(cand), cmp_cand);
        }
        int kk = m < k ? m : k;
        for (int j = 0; j < kk; j++) { out_d[qi * k + j] = out[j].d; out_i[qi * k + j] = out[j].id; }
    }
    free(rbuf);
    scratch_free(&s);
    return rc_;
}
