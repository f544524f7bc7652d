/* Codec distances for the HNSW graph: a float query against one stored code.
 *
 * flat: code = dim float32.                     l2: sum (q - x)^2      ip: -<q, x>
 * sq8:  code = dim uint8, x = vmin + step * c   (affine grid per dimension, qkit.affine)
 * sq4:  code = ceil(dim/2) bytes, c_{2k} in the low nibble of byte k, c_{2k+1} in the high one.
 *
 * For sq the query is prepared once so the inner loop has no divisions:
 *   l2: qbuf = [q - vmin | step],  dist = sum (qm - step * c)^2          (2 FMA per dim)
 *   ip: qbuf = q * step, cst = -<q, vmin>,  dist = cst - sum qbuf * c     (1 FMA per dim)
 * The AVX2 versions live in functions compiled for AVX2+FMA and are picked at
 * run time through c->isa (qkit.ext checks the CPU); the scalar ones are the
 * portable fallback and the tests hold both to a numpy reference.
 */
#include <string.h>
#include <immintrin.h>
#include "qk_hnsw.h"

#define AVX2 __attribute__((target("avx2,fma")))

static inline int64_t pad8(int64_t d) { return (d + 7) & ~(int64_t)7; }

int64_t qk_codec_qbuf_len(const qk_codec *c) { return 2 * pad8(c->dim); }

/* ---------------- scalar ---------------- */
static float f32_l2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *x = (const float *)code;
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) { float t = q[j] - x[j]; s += t * t; }
    return s;
}
static float f32_ip(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *x = (const float *)code;
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) s += q[j] * x[j];
    return -s;
}
static float sq8_l2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *step = q + pad8(c->dim);
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) { float t = q[j] - step[j] * (float)code[j]; s += t * t; }
    return s;
}
static float sq8_ip(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) s += q[j] * (float)code[j];
    return cst - s;
}
static inline float nib(const uint8_t *code, int64_t j) { return (float)((code[j >> 1] >> ((j & 1) * 4)) & 15); }
static float sq4_l2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *step = q + pad8(c->dim);
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) { float t = q[j] - step[j] * nib(code, j); s += t * t; }
    return s;
}
static float sq4_ip(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    float s = 0.f;
    for (int64_t j = 0; j < c->dim; j++) s += q[j] * nib(code, j);
    return cst - s;
}

/* ---------------- AVX2 + FMA ---------------- */
AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* mask of the first r (0..7) lanes, for the tail of a row */
AVX2 static inline __m256i tailmask(int64_t r) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), idx);
}
AVX2 static float f32_l2_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *x = (const float *)code;
    const int64_t d = c->dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j));
        __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(q + j + 8), _mm256_loadu_ps(x + j + 8));
        a0 = _mm256_fmadd_ps(t0, t0, a0);
        a1 = _mm256_fmadd_ps(t1, t1, a1);
    }
    for (; j + 8 <= d; j += 8) {
        __m256 t = _mm256_sub_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j));
        a0 = _mm256_fmadd_ps(t, t, a0);
    }
    if (j < d) {
        __m256i m = tailmask(d - j);
        __m256 t = _mm256_sub_ps(_mm256_maskload_ps(q + j, m), _mm256_maskload_ps(x + j, m));
        a1 = _mm256_fmadd_ps(t, t, a1);
    }
    return hsum8(_mm256_add_ps(a0, a1));
}
AVX2 static float f32_ip_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const float *x = (const float *)code;
    const int64_t d = c->dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    for (; j + 8 <= d; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j), a0);
    if (j < d) {
        __m256i m = tailmask(d - j);
        a1 = _mm256_fmadd_ps(_mm256_maskload_ps(q + j, m), _mm256_maskload_ps(x + j, m), a1);
    }
    return -hsum8(_mm256_add_ps(a0, a1));
}
/* 8 uint8 codes -> 8 floats */
AVX2 static inline __m256 u8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
AVX2 static inline __m256 u8x8_tail(const uint8_t *p, int64_t r) {
    uint8_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)r);
    return u8x8(tmp);
}
AVX2 static float sq8_l2_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t d = c->dim;
    const float *step = q + pad8(d);   /* padded lanes of q and step are zero */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256 t0 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j), u8x8(code + j), _mm256_loadu_ps(q + j));
        __m256 t1 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j + 8), u8x8(code + j + 8), _mm256_loadu_ps(q + j + 8));
        a0 = _mm256_fmadd_ps(t0, t0, a0);
        a1 = _mm256_fmadd_ps(t1, t1, a1);
    }
    for (; j + 8 <= d; j += 8) {
        __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j), u8x8(code + j), _mm256_loadu_ps(q + j));
        a0 = _mm256_fmadd_ps(t, t, a0);
    }
    if (j < d) {
        __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j), u8x8_tail(code + j, d - j), _mm256_loadu_ps(q + j));
        a1 = _mm256_fmadd_ps(t, t, a1);
    }
    return hsum8(_mm256_add_ps(a0, a1));
}
AVX2 static float sq8_ip_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    const int64_t d = c->dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), u8x8(code + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), u8x8(code + j + 8), a1);
    }
    for (; j + 8 <= d; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), u8x8(code + j), a0);
    if (j < d) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), u8x8_tail(code + j, d - j), a1);
    return cst - hsum8(_mm256_add_ps(a0, a1));
}
/* 8 packed bytes = 16 nibble codes in dimension order -> two vectors of 8 floats */
AVX2 static inline void nib16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m128i m = _mm_set1_epi8(15);
    __m128i l = _mm_and_si128(b, m), h = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    __m128i v = _mm_unpacklo_epi8(l, h);   /* c0 c1 c2 ... c15 */
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}
AVX2 static inline void nib16_tail(const uint8_t *p, int64_t ndims, __m256 *lo, __m256 *hi) {
    uint8_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)((ndims + 1) / 2));
    nib16(tmp, lo, hi);   /* padded lanes meet zero query lanes, and the odd-d padding nibble is zero by contract */
}
AVX2 static float sq4_l2_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t d = c->dim;
    const float *step = q + pad8(d);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), x0, x1;
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        nib16(code + j / 2, &x0, &x1);
        __m256 t0 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j), x0, _mm256_loadu_ps(q + j));
        __m256 t1 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j + 8), x1, _mm256_loadu_ps(q + j + 8));
        a0 = _mm256_fmadd_ps(t0, t0, a0);
        a1 = _mm256_fmadd_ps(t1, t1, a1);
    }
    if (j < d) {
        nib16_tail(code + j / 2, d - j, &x0, &x1);
        __m256 t0 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j), x0, _mm256_loadu_ps(q + j));
        a0 = _mm256_fmadd_ps(t0, t0, a0);
        if (d - j > 8) {
            __m256 t1 = _mm256_fnmadd_ps(_mm256_loadu_ps(step + j + 8), x1, _mm256_loadu_ps(q + j + 8));
            a1 = _mm256_fmadd_ps(t1, t1, a1);
        }
    }
    return hsum8(_mm256_add_ps(a0, a1));
}
AVX2 static float sq4_ip_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    const int64_t d = c->dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), x0, x1;
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        nib16(code + j / 2, &x0, &x1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), x1, a1);
    }
    if (j < d) {
        nib16_tail(code + j / 2, d - j, &x0, &x1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), x0, a0);
        if (d - j > 8) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), x1, a1);
    }
    return cst - hsum8(_mm256_add_ps(a0, a1));
}

/* ---------------- dispatch ---------------- */
int qk_codec_init(qk_codec *c) {
    static const qk_dist_fn scalar[3][2] = {{f32_l2, f32_ip}, {sq8_l2, sq8_ip}, {sq4_l2, sq4_ip}};
    static const qk_dist_fn avx2[3][2] = {{f32_l2_avx2, f32_ip_avx2}, {sq8_l2_avx2, sq8_ip_avx2},
                                          {sq4_l2_avx2, sq4_ip_avx2}};
    if (c->kind < 0 || c->kind > 2 || c->metric < 0 || c->metric > 1 || c->dim <= 0) return QK_H_EARG;
    if (c->kind != QK_CODEC_F32 && (!c->p0 || !c->p1)) return QK_H_EARG;
    c->dist = (c->isa ? avx2 : scalar)[c->kind][c->metric];
    return QK_H_OK;
}

void qk_codec_prepare(const qk_codec *c, const float *q, float *qbuf, float *cst) {
    const int64_t d = c->dim, dp = pad8(d);
    memset(qbuf, 0, sizeof(float) * 2 * dp);
    *cst = 0.f;
    if (c->kind == QK_CODEC_F32) {
        memcpy(qbuf, q, sizeof(float) * d);
        return;
    }
    if (c->metric == QK_METRIC_L2) {
        for (int64_t j = 0; j < d; j++) { qbuf[j] = q[j] - c->p0[j]; qbuf[dp + j] = c->p1[j]; }
    } else {
        float s = 0.f;
        for (int64_t j = 0; j < d; j++) { qbuf[j] = q[j] * c->p1[j]; s += q[j] * c->p0[j]; }
        *cst = -s;
    }
}

void qk_codec_decode(const qk_codec *c, int64_t id, float *out) {
    const uint8_t *code = c->codes + id * c->code_size;
    const int64_t d = c->dim;
    if (c->kind == QK_CODEC_F32) { memcpy(out, code, sizeof(float) * d); return; }
    for (int64_t j = 0; j < d; j++) {
        float v = c->kind == QK_CODEC_SQ8 ? (float)code[j] : nib(code, j);
        out[j] = c->p0[j] + c->p1[j] * v;
    }
}

float qk_exact_dist(int metric, const float *a, const float *b, int64_t dim, int isa) {
    qk_codec c = {.kind = QK_CODEC_F32, .metric = metric, .dim = dim, .code_size = dim * 4, .isa = isa};
    return isa ? (metric == QK_METRIC_L2 ? f32_l2_avx2 : f32_ip_avx2)(&c, a, 0.f, (const uint8_t *)b)
               : (metric == QK_METRIC_L2 ? f32_l2 : f32_ip)(&c, a, 0.f, (const uint8_t *)b);
}
