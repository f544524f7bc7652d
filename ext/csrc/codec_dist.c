/* Codec distances for the HNSW graph: a float query against one stored code.
 *
 * flat: code = dim float32.                     l2: sum (q - x)^2      ip: -<q, x>
 * sq8:  code = dim uint8, x = vmin + step * c   (affine grid per dimension, qkit.affine)
 * sq4:  code = ceil(dim/2) bytes, c_{2k} in the low nibble of byte k, c_{2k+1} in the high one.
 *
 * The graph walks SQ8/SQ4 with integers (the glass / faiss SQ-with-quantized-query idea):
 *   <q, x> = <q, vmin> + sum_j (q_j step_j) c_j,   w = q * step quantized to int8 with one scale
 *   delta = max|w| / 127, so the sum is delta * (int8 . uint8/uint4 dot) on AVX2 integer lanes;
 *   l2 = ||q||^2 + ||x||^2 - 2 <q, x> with ||x||^2 stored after the codes (float32).
 * Re-rank stores use the float-query kinds SQ8F/SQ4F below (no query rounding).
 *
 * For SQ8F/SQ4F the query is prepared once so the inner loop has no divisions:
 *   l2: qbuf = [q - vmin | step],  dist = sum (qm - step * c)^2          (2 FMA per dim)
 *   ip: qbuf = q * step, cst = -<q, vmin>,  dist = cst - sum qbuf * c     (1 FMA per dim)
 * The AVX2 versions live in functions compiled for AVX2+FMA and are picked at
 * run time through c->isa (qkit.ext checks the CPU); the scalar ones are the
 * portable fallback and the tests hold both to a numpy reference.
 */
#include <math.h>
#include <string.h>
#include <immintrin.h>
#include "qk_hnsw.h"

#define AVX2 __attribute__((target("avx2,fma")))

static inline int64_t pad8(int64_t d) { return (d + 7) & ~(int64_t)7; }
static inline int64_t pad32(int64_t d) { return (d + 31) & ~(int64_t)31; }
/* bytes of a code before its float tail */
static inline int64_t sq_bytes(const qk_codec *c) {
    const int64_t h = c->dim / 2;   /* TQP: codes of h dimensions, queries of 2h */
    switch (c->kind) {
    case QK_CODEC_SQ8: case QK_CODEC_SQ8F: case QK_CODEC_RQ8: return c->dim;
    case QK_CODEC_RQ1: return (c->dim + 7) / 8;
    case QK_CODEC_RQ16: return 2 * c->dim;
    case QK_CODEC_TQP4: return (h + 1) / 2 + (h + 7) / 8;
    case QK_CODEC_TQP8: return h + (h + 7) / 8;
    default: return (c->dim + 1) / 2;   /* SQ4, SQ4F, RQ4, LQ4 */
    }
}
/* RaBitQ query constants after the int8 query: delta, sum v', ||v'||^2, <c', v'> */
static inline const float *rq_consts(const qk_codec *c, const float *qbuf) { return qbuf + pad32(c->dim) / 4; }
static inline void rq_tail(const qk_codec *c, const uint8_t *code, float *r, float *w) {
    memcpy(r, code + sq_bytes(c), 4);
    memcpy(w, code + sq_bytes(c) + 4, 4);
}
static inline float rq_dist(const qk_codec *c, const float *q, int32_t S, const uint8_t *code) {
    const float *k = rq_consts(c, q);
    float r, w;
    rq_tail(c, code, &r, &w);
    float est = w * (k[0] * (float)S - c->p1[0] * k[1]);
    return c->metric == QK_METRIC_L2 ? r * r + k[2] - 2.f * r * est : -(k[3] + r * est);
}
/* LQ4's 16 uint8 grid values follow the four query constants */
static inline const uint8_t *lut_of(const float *k) { return (const uint8_t *)(k + 4); }
/* TQP: int8 v1 (pad32(h) bytes), int8 v2 (pad32(h)), then delta1, sum v1, delta2, sum v2, the table */
static inline const float *tqp_consts(const qk_codec *c, const float *qbuf) {
    return qbuf + 2 * pad32(c->dim / 2) / 4;
}
static inline float tqp_dist(const qk_codec *c, const float *q, int32_t S1, int32_t S2, const uint8_t *code) {
    const float *k = tqp_consts(c, q);
    float w1, w2;
    memcpy(&w1, code + sq_bytes(c), 4);
    memcpy(&w2, code + sq_bytes(c) + 4, 4);
    return -(w1 * (k[0] * (float)S1 - c->p1[0] * k[1]) + w2 * (k[2] * (float)S2 - 0.5f * k[3]));
}
/* integer-query layout inside qbuf: int8 query (pad32(d) bytes, zero padded), then delta (float) */
static inline const int8_t *qi8(const float *qbuf) { return (const int8_t *)qbuf; }
static inline float qdelta(const qk_codec *c, const float *qbuf) { return qbuf[pad32(c->dim) / 4]; }
static inline float tail_norm(const qk_codec *c, const uint8_t *code) {
    float n2;
    memcpy(&n2, code + sq_bytes(c), 4);
    return n2;
}

/* room for the float kinds' two rows, or an int8 query (two for TQP), constants and a table */
int64_t qk_codec_qbuf_len(const qk_codec *c) { return 2 * pad8(c->dim) + 32; }

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

static int32_t dot_u8_i8(const uint8_t *c, const int8_t *q, int64_t d) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; j++) s += (int32_t)c[j] * q[j];
    return s;
}
static int32_t dot_u4_i8(const uint8_t *c, const int8_t *q, int64_t d) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; j++) s += (int32_t)((c[j >> 1] >> ((j & 1) * 4)) & 15) * q[j];
    return s;
}
static float sq8i_l2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst + tail_norm(c, code) - 2.f * qdelta(c, q) * (float)dot_u8_i8(code, qi8(q), c->dim);
}
static float sq8i_ip(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst - qdelta(c, q) * (float)dot_u8_i8(code, qi8(q), c->dim);
}
static float sq4i_l2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst + tail_norm(c, code) - 2.f * qdelta(c, q) * (float)dot_u4_i8(code, qi8(q), c->dim);
}
static float sq4i_ip(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst - qdelta(c, q) * (float)dot_u4_i8(code, qi8(q), c->dim);
}

static int32_t dot_b1_i8(const uint8_t *c, const int8_t *q, int64_t d) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; j++) s += ((c[j >> 3] >> (j & 7)) & 1) ? q[j] : 0;
    return s;
}
static float rq1_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_b1_i8(code, qi8(q), c->dim), code);
}
static float rq4_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u4_i8(code, qi8(q), c->dim), code);
}
static float rq8_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u8_i8(code, qi8(q), c->dim), code);
}
static int32_t dot_l4_i8(const uint8_t *c, const uint8_t *t, const int8_t *q, int64_t d) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; j++) s += (int32_t)t[(c[j >> 1] >> ((j & 1) * 4)) & 15] * q[j];
    return s;
}
static int32_t dot_u16_i8(const uint8_t *c, const int8_t *q, int64_t d) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; j++) {
        uint16_t v;
        memcpy(&v, c + 2 * j, 2);
        s += (int32_t)v * q[j];
    }
    return s;
}
static float lq4_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_l4_i8(code, lut_of(rq_consts(c, q)), qi8(q), c->dim), code);
}
static float rq16_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u16_i8(code, qi8(q), c->dim), code);
}
static float tqp4_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t h = c->dim / 2;
    const int32_t S1 = dot_l4_i8(code, lut_of(tqp_consts(c, q)), qi8(q), h);
    return tqp_dist(c, q, S1, dot_b1_i8(code + (h + 1) / 2, qi8(q) + pad32(h), h), code);
}
static float tqp8_dist(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t h = c->dim / 2;
    return tqp_dist(c, q, dot_u8_i8(code, qi8(q), h), dot_b1_i8(code + h, qi8(q) + pad32(h), h), code);
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

AVX2 static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
/* uint8 codes x int8 query: widen both to int16 and madd (no saturation: 2 * 255 * 127 < 2^31) */
AVX2 static int32_t dot_u8_i8_avx2(const uint8_t *c, const int8_t *q, int64_t d) {
    __m256i acc = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256i cw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + j)));
        __m256i qw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(cw, qw));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) s += (int32_t)c[j] * q[j];
    return s;
}
/* 4-bit codes x int8 query: 32 codes per step, maddubs is safe (2 * 15 * 127 < 2^15) */
AVX2 static int32_t dot_u4_i8_avx2(const uint8_t *c, const int8_t *q, int64_t d) {
    __m256i acc = _mm256_setzero_si256();
    const __m128i m = _mm_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        __m128i b = _mm_loadu_si128((const __m128i *)(c + j / 2));
        __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
        __m256i p = _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i *)(q + j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) s += (int32_t)((c[j >> 1] >> ((j & 1) * 4)) & 15) * q[j];
    return s;
}
AVX2 static float sq8i_l2_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst + tail_norm(c, code) - 2.f * qdelta(c, q) * (float)dot_u8_i8_avx2(code, qi8(q), c->dim);
}
AVX2 static float sq8i_ip_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst - qdelta(c, q) * (float)dot_u8_i8_avx2(code, qi8(q), c->dim);
}
AVX2 static float sq4i_l2_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst + tail_norm(c, code) - 2.f * qdelta(c, q) * (float)dot_u4_i8_avx2(code, qi8(q), c->dim);
}
AVX2 static float sq4i_ip_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    return cst - qdelta(c, q) * (float)dot_u4_i8_avx2(code, qi8(q), c->dim);
}

/* 1-bit codes x int8 query: 32 bits -> 32 byte masks (shuffle each code byte to its 8 lanes, test its bit) */
AVX2 static int32_t dot_b1_i8_avx2(const uint8_t *c, const int8_t *q, int64_t d) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        uint32_t w;
        memcpy(&w, c + j / 8, 4);
        __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
        __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(b, bits), bits);
        __m256i qv = _mm256_and_si256(m, _mm256_loadu_si256((const __m256i *)(q + j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qv), ones16));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) s += ((c[j >> 3] >> (j & 7)) & 1) ? q[j] : 0;
    return s;
}
AVX2 static float rq1_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_b1_i8_avx2(code, qi8(q), c->dim), code);
}
AVX2 static float rq4_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u4_i8_avx2(code, qi8(q), c->dim), code);
}
AVX2 static float rq8_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u8_i8_avx2(code, qi8(q), c->dim), code);
}
/* nibble indices -> uint8 grid values by one byte shuffle per 16 (the table fits one register), then the
 * uint8 x int8 products widened to int16 pairs as in dot_u8_i8_avx2 (255 * 127 does not fit maddubs) */
AVX2 static int32_t dot_l4_i8_avx2(const uint8_t *c, const uint8_t *t, const int8_t *q, int64_t d) {
    __m256i acc = _mm256_setzero_si256();
    const __m128i m = _mm_set1_epi8(15), tab = _mm_loadu_si128((const __m128i *)t);
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        __m128i b = _mm_loadu_si128((const __m128i *)(c + j / 2));
        __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        __m128i v0 = _mm_shuffle_epi8(tab, _mm_unpacklo_epi8(lo, hi));   /* dims j .. j+15 */
        __m128i v1 = _mm_shuffle_epi8(tab, _mm_unpackhi_epi8(lo, hi));   /* dims j+16 .. j+31 */
        __m256i q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
        __m256i q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j + 16)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(v0), q0));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(v1), q1));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) s += (int32_t)t[(c[j >> 1] >> ((j & 1) * 4)) & 15] * q[j];
    return s;
}
/* uint16 codes (< 2^15) x int8 query widened: madd on int16 pairs */
AVX2 static int32_t dot_u16_i8_avx2(const uint8_t *c, const int8_t *q, int64_t d) {
    __m256i acc = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256i cw = _mm256_loadu_si256((const __m256i *)(c + 2 * j));
        __m256i qw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(cw, qw));
    }
    int32_t s = hsum_epi32(acc);
    for (; j < d; j++) {
        uint16_t v;
        memcpy(&v, c + 2 * j, 2);
        s += (int32_t)v * q[j];
    }
    return s;
}
AVX2 static float lq4_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_l4_i8_avx2(code, lut_of(rq_consts(c, q)), qi8(q), c->dim), code);
}
AVX2 static float rq16_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    return rq_dist(c, q, dot_u16_i8_avx2(code, qi8(q), c->dim), code);
}
AVX2 static float tqp4_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t h = c->dim / 2;
    const int32_t S1 = dot_l4_i8_avx2(code, lut_of(tqp_consts(c, q)), qi8(q), h);
    return tqp_dist(c, q, S1, dot_b1_i8_avx2(code + (h + 1) / 2, qi8(q) + pad32(h), h), code);
}
AVX2 static float tqp8_dist_avx2(const qk_codec *c, const float *q, float cst, const uint8_t *code) {
    (void)cst;
    const int64_t h = c->dim / 2;
    return tqp_dist(c, q, dot_u8_i8_avx2(code, qi8(q), h), dot_b1_i8_avx2(code + h, qi8(q) + pad32(h), h), code);
}

/* ---------------- dispatch ---------------- */
int qk_codec_init(qk_codec *c) {
    static const qk_dist_fn scalar[QK_CODEC_NKINDS][2] = {
        {f32_l2, f32_ip}, {sq8i_l2, sq8i_ip}, {sq4i_l2, sq4i_ip}, {sq8_l2, sq8_ip}, {sq4_l2, sq4_ip},
        {rq1_dist, rq1_dist}, {rq4_dist, rq4_dist}, {rq8_dist, rq8_dist}, {lq4_dist, lq4_dist},
        {rq16_dist, rq16_dist}, {NULL, tqp4_dist}, {NULL, tqp8_dist}};
    static const qk_dist_fn avx2[QK_CODEC_NKINDS][2] = {
        {f32_l2_avx2, f32_ip_avx2}, {sq8i_l2_avx2, sq8i_ip_avx2}, {sq4i_l2_avx2, sq4i_ip_avx2},
        {sq8_l2_avx2, sq8_ip_avx2}, {sq4_l2_avx2, sq4_ip_avx2}, {rq1_dist_avx2, rq1_dist_avx2},
        {rq4_dist_avx2, rq4_dist_avx2}, {rq8_dist_avx2, rq8_dist_avx2}, {lq4_dist_avx2, lq4_dist_avx2},
        {rq16_dist_avx2, rq16_dist_avx2}, {NULL, tqp4_dist_avx2}, {NULL, tqp8_dist_avx2}};
    if (c->kind < 0 || c->kind >= QK_CODEC_NKINDS || c->metric < 0 || c->metric > 1 || c->dim <= 0) return QK_H_EARG;
    if (c->kind != QK_CODEC_F32 && (!c->p0 || !c->p1)) return QK_H_EARG;
    if ((c->kind == QK_CODEC_TQP4 || c->kind == QK_CODEC_TQP8) && (c->dim % 2 || c->metric != QK_METRIC_IP))
        return QK_H_EARG;   /* two halves; the QJL estimator is an inner product */
    c->dist = (c->isa ? avx2 : scalar)[c->kind][c->metric];
    return c->dist ? QK_H_OK : QK_H_EARG;
}

/* v' on a symmetric int8 grid; k = delta, sum v', ||v'||^2, <c', v'> (c' = p0, or none) */
static void rq_prepare(const float *q, const float *p0, int64_t d, int8_t *qi, float *k) {
    float vmax = 0.f, sv = 0.f, vv = 0.f, cv = 0.f;
    for (int64_t j = 0; j < d; j++) {
        vmax = fmaxf(vmax, fabsf(q[j]));
        sv += q[j];
        vv += q[j] * q[j];
        if (p0) cv += q[j] * p0[j];
    }
    float delta = vmax > 0.f ? vmax / 127.f : 1.f;
    for (int64_t j = 0; j < d; j++) qi[j] = (int8_t)nearbyintf(q[j] / delta);
    k[0] = delta; k[1] = sv; k[2] = vv; k[3] = cv;
}
static void put_lut(const qk_codec *c, float *k) {
    uint8_t *t = (uint8_t *)(k + 4);
    for (int i = 0; i < 16; i++) t[i] = (uint8_t)c->p1[1 + i];
}

void qk_codec_prepare(const qk_codec *c, const float *q, float *qbuf, float *cst) {
    const int64_t d = c->dim, dp = pad8(d);
    memset(qbuf, 0, sizeof(float) * (size_t)qk_codec_qbuf_len(c));
    *cst = 0.f;
    if (c->kind == QK_CODEC_F32) {
        memcpy(qbuf, q, sizeof(float) * d);
        return;
    }
    if (c->kind == QK_CODEC_TQP4 || c->kind == QK_CODEC_TQP8) {
        const int64_t h = d / 2;
        float a[4], b[4];
        int8_t *qi = (int8_t *)qbuf;
        rq_prepare(q, NULL, h, qi, a);
        rq_prepare(q + h, NULL, h, qi + pad32(h), b);
        float *k = qbuf + 2 * pad32(h) / 4;
        k[0] = a[0]; k[1] = a[1]; k[2] = b[0]; k[3] = b[1];
        if (c->kind == QK_CODEC_TQP4) put_lut(c, k);
        return;
    }
    if (c->kind >= QK_CODEC_RQ1) {
        float *k = qbuf + pad32(d) / 4;
        rq_prepare(q, c->p0, d, (int8_t *)qbuf, k);
        if (c->kind == QK_CODEC_LQ4) put_lut(c, k);
        return;
    }
    if (c->kind == QK_CODEC_SQ8 || c->kind == QK_CODEC_SQ4) {
        /* w = q * step on an int8 grid of one scale; the constant holds what does not depend on x */
        float wmax = 0.f, qq = 0.f, qv = 0.f;
        for (int64_t j = 0; j < d; j++) {
            float w = q[j] * c->p1[j];
            wmax = fmaxf(wmax, fabsf(w));
            qq += q[j] * q[j];
            qv += q[j] * c->p0[j];
        }
        float delta = wmax > 0.f ? wmax / 127.f : 1.f;
        int8_t *qi = (int8_t *)qbuf;
        for (int64_t j = 0; j < d; j++) {
            float r = nearbyintf(q[j] * c->p1[j] / delta);
            qi[j] = (int8_t)(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
        }
        qbuf[pad32(d) / 4] = delta;
        *cst = c->metric == QK_METRIC_L2 ? qq - 2.f * qv : -qv;
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
    if (c->kind >= QK_CODEC_RQ1) { memset(out, 0, sizeof(float) * d); return; }  /* graphs build on a store */
    int byte_codes = c->kind == QK_CODEC_SQ8 || c->kind == QK_CODEC_SQ8F;
    for (int64_t j = 0; j < d; j++) {
        float v = byte_codes ? (float)code[j] : nib(code, j);
        out[j] = c->p0[j] + c->p1[j] * v;
    }
}
