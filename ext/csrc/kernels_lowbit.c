/* Low-bit scans: packed int4 against int8/float32 queries, 1-bit Hamming and
 * AND-popcount (RaBitQ's estimator core), and the FastScan 4-bit LUT scan.
 * Layouts are in qk_kernels.h and qkit/packing.py. */
#include <stdlib.h>
#include <string.h>
#include "qk_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_HAVE_X86 1
#endif

/* ------------------------------------------------------------------ int4 */
/* nibble h (0 = low, 1 = high) of byte b; signed: two's complement (v ^ 8) - 8 */
static inline int32_t qk_nib(uint8_t b, int h, int sg) {
    int32_t v = h ? (b >> 4) : (b & 15);
    return sg ? ((v ^ 8) - 8) : v;
}

/* Exact int8 sum over the elements from 2*k0 to d of one row (the scalar
 * kernel with k0 = 0, and the tail of the SIMD kernel). */
static inline int32_t int4_i8_row(int op, const int8_t *q, const uint8_t *c, int64_t k0, int64_t d, int sg) {
    int32_t acc = 0;
    const int64_t full = d / 2;
    for (int64_t k = k0; k < full; k++) {
        int32_t a = qk_nib(c[k], 0, sg), b = qk_nib(c[k], 1, sg);
        if (op == QK_OP_DOT) {
            acc += a * q[2 * k] + b * q[2 * k + 1];
        } else {
            int32_t t0 = q[2 * k] - a, t1 = q[2 * k + 1] - b;
            acc += t0 * t0 + t1 * t1;
        }
    }
    if (d & 1) {
        int32_t a = qk_nib(c[full], 0, sg);
        if (op == QK_OP_DOT) {
            acc += a * q[d - 1];
        } else {
            int32_t t = q[d - 1] - a;
            acc += t * t;
        }
    }
    return acc;
}

static inline float int4_f32_row(int op, const float *q, const uint8_t *c, int64_t k0, int64_t d, int sg) {
    float acc = 0.0f;
    for (int64_t j = 2 * k0; j < d; j++) {
        float v = (float)qk_nib(c[j >> 1], (int)(j & 1), sg);
        if (op == QK_OP_DOT) {
            acc += v * q[j];
        } else {
            float t = q[j] - v;
            acc += t * t;
        }
    }
    return acc;
}

static void int4_i8_scalar(int op, const int8_t *q, const uint8_t *codes, int64_t n, int64_t d, int sg,
                           int32_t *out) {
    const int64_t nb = (d + 1) / 2;
    for (int64_t i = 0; i < n; i++) out[i] = int4_i8_row(op, q, codes + i * nb, 0, d, sg);
}

static void int4_f32_scalar(int op, const float *q, const uint8_t *codes, int64_t n, int64_t d, int sg,
                            float *out) {
    const int64_t nb = (d + 1) / 2;
    for (int64_t i = 0; i < n; i++) out[i] = int4_f32_row(op, q, codes + i * nb, 0, d, sg);
}

#ifdef QK_HAVE_X86
__attribute__((target("avx2"))) static inline int32_t lb_hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) static inline float lb_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int4 x int8 with vpmaddubsw, exactly: the unsigned operand is the nibble
 * u in [0, 15] (for signed codes u = n ^ 8 = s + 8, and <q, s> = <q, u> - 8 sum q),
 * so a pair sum is at most 2 * 15 * 128 = 3840 and never saturates int16.
 * The query is split once into even/odd elements, matching low/high nibbles.
 * L2 = |q|^2 - 2<q, s> + |s|^2, with |s|^2 from vpmaddubsw(|s|, |s|). */
__attribute__((target("avx2"))) static int int4_i8_avx2(int op, const int8_t *q, const uint8_t *codes, int64_t n,
                                                        int64_t d, int sg, int32_t *out) {
    const int64_t nb = (d + 1) / 2, full = d / 2, body = full & ~(int64_t)31;
    int8_t *qs = (int8_t *)malloc((size_t)(2 * body + 64));
    if (!qs) return QK_ENOMEM;
    int8_t *qe = qs, *qo = qs + body;
    int32_t sumq = 0, sumq2 = 0;
    for (int64_t k = 0; k < body; k++) {
        qe[k] = q[2 * k];
        qo[k] = q[2 * k + 1];
        sumq += q[2 * k] + q[2 * k + 1];
        sumq2 += q[2 * k] * q[2 * k] + q[2 * k + 1] * q[2 * k + 1];
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F), x88 = _mm256_set1_epi8((char)0x88);
    const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *c = codes + i * nb;
        __m256i accd = _mm256_setzero_si256(), accs = _mm256_setzero_si256();
        for (int64_t k = 0; k < body; k += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(c + k));
            if (sg) v = _mm256_xor_si256(v, x88);
            __m256i lo = _mm256_and_si256(v, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(qe + k))),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(qo + k))));
            accd = _mm256_add_epi32(accd, _mm256_madd_epi16(p, ones));
            if (op == QK_OP_L2) {
                if (sg) {
                    lo = _mm256_abs_epi8(_mm256_sub_epi8(lo, eight));
                    hi = _mm256_abs_epi8(_mm256_sub_epi8(hi, eight));
                }
                __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, lo), _mm256_maddubs_epi16(hi, hi));
                accs = _mm256_add_epi32(accs, _mm256_madd_epi16(s2, ones));
            }
        }
        int32_t dot = lb_hsum_epi32(accd) - (sg ? 8 * sumq : 0);
        int32_t r = op == QK_OP_DOT ? dot : sumq2 - 2 * dot + lb_hsum_epi32(accs);
        out[i] = r + int4_i8_row(op, q, c, body, d, sg);
    }
    free(qs);
    return QK_OK;
}

/* int4 x float32: 8 bytes (16 codes) per step, nibbles widened to int32 and
 * converted, FMA into two accumulators (even and odd elements). */
__attribute__((target("avx2,fma"))) static int int4_f32_avx2(int op, const float *q, const uint8_t *codes,
                                                             int64_t n, int64_t d, int sg, float *out) {
    const int64_t nb = (d + 1) / 2, full = d / 2, body = full & ~(int64_t)7;
    float *qs = (float *)malloc(sizeof(float) * (size_t)(2 * body + 16));
    if (!qs) return QK_ENOMEM;
    float *qe = qs, *qo = qs + body;
    for (int64_t k = 0; k < body; k++) {
        qe[k] = q[2 * k];
        qo[k] = q[2 * k + 1];
    }
    const __m256i m4 = _mm256_set1_epi32(15), e8 = _mm256_set1_epi32(8);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *c = codes + i * nb;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t k = 0; k < body; k += 8) {
            __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + k)));
            __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_srli_epi32(b, 4);
            if (sg) {
                lo = _mm256_sub_epi32(_mm256_xor_si256(lo, e8), e8);
                hi = _mm256_sub_epi32(_mm256_xor_si256(hi, e8), e8);
            }
            __m256 fl = _mm256_cvtepi32_ps(lo), fh = _mm256_cvtepi32_ps(hi);
            __m256 ve = _mm256_loadu_ps(qe + k), vo = _mm256_loadu_ps(qo + k);
            if (op == QK_OP_DOT) {
                a0 = _mm256_fmadd_ps(fl, ve, a0);
                a1 = _mm256_fmadd_ps(fh, vo, a1);
            } else {
                __m256 t0 = _mm256_sub_ps(ve, fl), t1 = _mm256_sub_ps(vo, fh);
                a0 = _mm256_fmadd_ps(t0, t0, a0);
                a1 = _mm256_fmadd_ps(t1, t1, a1);
            }
        }
        out[i] = lb_hsum_ps(_mm256_add_ps(a0, a1)) + int4_f32_row(op, q, c, body, d, sg);
    }
    free(qs);
    return QK_OK;
}
#endif

int qk_int4_i8(int op, const int8_t *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed, int32_t *out,
               int isa) {
    if (n < 0 || d < 0 || (op != QK_OP_DOT && op != QK_OP_L2)) return QK_EARG;
    if (isa == QK_ISA_SCALAR) {
        int4_i8_scalar(op, q, codes, n, d, is_signed, out);
        return QK_OK;
    }
#ifdef QK_HAVE_X86
    if (isa == QK_ISA_AVX2 && qk_cpu_has_avx2()) return int4_i8_avx2(op, q, codes, n, d, is_signed, out);
#endif
    return QK_EARG;
}

int qk_int4_f32(int op, const float *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed, float *out,
                int isa) {
    if (n < 0 || d < 0 || (op != QK_OP_DOT && op != QK_OP_L2)) return QK_EARG;
    if (isa == QK_ISA_SCALAR) {
        int4_f32_scalar(op, q, codes, n, d, is_signed, out);
        return QK_OK;
    }
#ifdef QK_HAVE_X86
    if (isa == QK_ISA_AVX2 && qk_cpu_has_avx2()) return int4_f32_avx2(op, q, codes, n, d, is_signed, out);
#endif
    return QK_EARG;
}

/* ------------------------------------------------------------------ 1-bit */
static inline uint64_t lb_word(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8); /* unaligned little-endian load */
    return w;
}

/* The same loops twice: once for the baseline ISA (popcount by libgcc or
 * SWAR), once compiled for POPCNT. Whole 64-bit words, then the tail bytes. */
#define QK_BITS_KERNELS(SUF, ATTR)                                                                 \
    ATTR static void hamming_##SUF(const uint8_t *q, const uint8_t *codes, int64_t n, int64_t nbytes, \
                                   int32_t *out) {                                                \
        const int64_t nw = nbytes / 8;                                                            \
        uint64_t qw[8];                                                                           \
        int pre = nw <= 8;                                                                        \
        if (pre)                                                                                  \
            for (int64_t k = 0; k < nw; k++) qw[k] = lb_word(q + 8 * k);                          \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const uint8_t *c = codes + i * nbytes;                                                \
            int32_t acc = 0;                                                                      \
            for (int64_t k = 0; k < nw; k++)                                                      \
                acc += __builtin_popcountll((pre ? qw[k] : lb_word(q + 8 * k)) ^ lb_word(c + 8 * k)); \
            for (int64_t k = 8 * nw; k < nbytes; k++) acc += __builtin_popcount((unsigned)(q[k] ^ c[k])); \
            out[i] = acc;                                                                         \
        }                                                                                         \
    }                                                                                             \
    ATTR static void andpop_##SUF(const uint8_t *planes, int64_t B, const uint8_t *codes, int64_t n, \
                                  int64_t nbytes, int32_t *out) {                                 \
        const int64_t nw = nbytes / 8;                                                            \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const uint8_t *c = codes + i * nbytes;                                                \
            int32_t acc = 0;                                                                      \
            for (int64_t k = 0; k < nw; k++) {                                                    \
                const uint64_t w = lb_word(c + 8 * k);                                            \
                for (int64_t j = 0; j < B; j++)                                                   \
                    acc += __builtin_popcountll(w & lb_word(planes + j * nbytes + 8 * k)) << j;   \
            }                                                                                     \
            for (int64_t k = 8 * nw; k < nbytes; k++)                                             \
                for (int64_t j = 0; j < B; j++)                                                   \
                    acc += __builtin_popcount((unsigned)(c[k] & planes[j * nbytes + k])) << j;    \
            out[i] = acc;                                                                         \
        }                                                                                         \
    }

QK_BITS_KERNELS(scalar, )
#ifdef QK_HAVE_X86
QK_BITS_KERNELS(popcnt, __attribute__((target("popcnt"))))

/* AND-popcount for 128-bit codes with the plane count B fixed at compile time,
 * so all 2B query words live in registers and the j loop unrolls; the
 * weighted sum is formed per vector as sum_j popcnt(.) << j. */
#define QK_ANDPOP16(B)                                                                              \
    __attribute__((target("popcnt"))) static void andpop16_b##B(const uint8_t *planes, const uint8_t *codes, \
                                                                 int64_t n, int32_t *out) {         \
        uint64_t p0[B], p1[B];                                                                      \
        for (int j = 0; j < B; j++) {                                                               \
            p0[j] = lb_word(planes + 16 * j);                                                       \
            p1[j] = lb_word(planes + 16 * j + 8);                                                   \
        }                                                                                           \
        int64_t i = 0;                                                                              \
        for (; i + 2 <= n; i += 2) {                                                                \
            const uint64_t a0 = lb_word(codes + i * 16), a1 = lb_word(codes + i * 16 + 8);          \
            const uint64_t b0 = lb_word(codes + i * 16 + 16), b1 = lb_word(codes + i * 16 + 24);    \
            int32_t sa = 0, sb = 0;                                                                 \
            for (int j = 0; j < B; j++) {                                                           \
                sa += (int32_t)(__builtin_popcountll(a0 & p0[j]) + __builtin_popcountll(a1 & p1[j])) << j; \
                sb += (int32_t)(__builtin_popcountll(b0 & p0[j]) + __builtin_popcountll(b1 & p1[j])) << j; \
            }                                                                                       \
            out[i] = sa;                                                                            \
            out[i + 1] = sb;                                                                        \
        }                                                                                           \
        for (; i < n; i++) {                                                                        \
            const uint64_t a0 = lb_word(codes + i * 16), a1 = lb_word(codes + i * 16 + 8);          \
            int32_t sa = 0;                                                                         \
            for (int j = 0; j < B; j++)                                                             \
                sa += (int32_t)(__builtin_popcountll(a0 & p0[j]) + __builtin_popcountll(a1 & p1[j])) << j; \
            out[i] = sa;                                                                            \
        }                                                                                           \
    }
/* B <= 5 takes the AVX2 kernel below; 6..8 planes overflow its byte accumulator */
QK_ANDPOP16(6)
QK_ANDPOP16(7)
QK_ANDPOP16(8)

/* AND-popcount for 128-bit codes with AVX2, two vectors per 256-bit register:
 * per plane j, byte popcounts of (code & plane_j) by two vpshufb nibble
 * look-ups (Mula's method), folded Horner-style into one byte accumulator,
 * acc = 2 * acc + count_j (planes taken from B-1 down to 0). A byte then holds
 * sum_j 2^j popcount(byte & plane_j byte) <= 8 * (2^B - 1), which fits a byte
 * for B <= 5; vpsadbw sums the 8-byte halves, two per vector. */
__attribute__((target("avx2"))) static void andpop16_avx2(const uint8_t *planes, int64_t B, const uint8_t *codes,
                                                          int64_t n, int32_t *out) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i P[5];
    for (int64_t j = 0; j < B; j++) P[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(planes + 16 * j)));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256i c0 = _mm256_loadu_si256((const __m256i *)(codes + i * 16));
        const __m256i c1 = _mm256_loadu_si256((const __m256i *)(codes + i * 16 + 32));
        __m256i a0 = zero, a1 = zero;
        for (int64_t j = B - 1; j >= 0; j--) {
            __m256i x0 = _mm256_and_si256(c0, P[j]), x1 = _mm256_and_si256(c1, P[j]);
            __m256i n0 = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x0, m4)),
                                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), m4)));
            __m256i n1 = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x1, m4)),
                                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), m4)));
            a0 = _mm256_add_epi8(_mm256_add_epi8(a0, a0), n0);
            a1 = _mm256_add_epi8(_mm256_add_epi8(a1, a1), n1);
        }
        /* vpsadbw: u64 lanes [v_i low half, v_i high half, v_i+1 low, v_i+1 high] */
        __m256i s0 = _mm256_sad_epu8(a0, zero), s1 = _mm256_sad_epu8(a1, zero);
        /* add each lane's pair: shuffle the high u64 of every 128-bit lane down */
        s0 = _mm256_add_epi64(s0, _mm256_shuffle_epi32(s0, 0x4E));
        s1 = _mm256_add_epi64(s1, _mm256_shuffle_epi32(s1, 0x4E));
        out[i] = _mm256_extract_epi32(s0, 0);
        out[i + 1] = _mm256_extract_epi32(s0, 4);
        out[i + 2] = _mm256_extract_epi32(s1, 0);
        out[i + 3] = _mm256_extract_epi32(s1, 4);
    }
    if (i < n) {
        int32_t tmp[4];
        uint8_t buf[64] = {0};
        memcpy(buf, codes + i * 16, (size_t)(n - i) * 16);
        andpop16_avx2(planes, B, buf, 4, tmp);
        memcpy(out + i, tmp, sizeof(int32_t) * (size_t)(n - i));
    }
}

/* Hamming for 128-bit codes with AVX2: four vectors per pass, byte popcounts
 * of (code ^ query) by vpshufb nibble look-ups, summed by vpsadbw. */
__attribute__((target("avx2"))) static void hamming16_avx2(const uint8_t *q, const uint8_t *codes, int64_t n,
                                                           int32_t *out) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const __m256i Q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256i x0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + i * 16)), Q);
        __m256i x1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + i * 16 + 32)), Q);
        __m256i n0 = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x0, m4)),
                                     _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), m4)));
        __m256i n1 = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x1, m4)),
                                     _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), m4)));
        __m256i s0 = _mm256_sad_epu8(n0, zero), s1 = _mm256_sad_epu8(n1, zero);
        /* u64 lanes [v0 lo, v0 hi, v1 lo, v1 hi] and [v2 lo, v2 hi, v3 lo, v3 hi]: pack the four
         * halves' sums of each vector side by side, then one add gives four int32 results */
        __m256i lo = _mm256_unpacklo_epi64(s0, s1); /* v0 lo, v2 lo | v1 lo, v3 lo */
        __m256i hi = _mm256_unpackhi_epi64(s0, s1); /* v0 hi, v2 hi | v1 hi, v3 hi */
        __m256i t = _mm256_add_epi64(lo, hi);       /* v0, v2 | v1, v3 as u64 */
        __m128i a = _mm256_castsi256_si128(t), b = _mm256_extracti128_si256(t, 1);
        /* int32 order v0, v1, v2, v3 from the low dwords of (v0, v2) and (v1, v3) */
        __m128i r = _mm_unpacklo_epi32(_mm_shuffle_epi32(a, 0x08), _mm_shuffle_epi32(b, 0x08));
        _mm_storeu_si128((__m128i *)(out + i), r);
    }
    for (; i < n; i++) {
        int32_t acc = 0;
        for (int k = 0; k < 16; k++) acc += __builtin_popcount((unsigned)(q[k] ^ codes[i * 16 + k]));
        out[i] = acc;
    }
}

typedef void (*qk_andpop16)(const uint8_t *, const uint8_t *, int64_t, int32_t *);
static const qk_andpop16 andpop16_by_b[9] = {NULL, NULL, NULL, NULL, NULL, NULL, andpop16_b6, andpop16_b7, andpop16_b8};
#endif

static int has_popcnt_path(void) {
#ifdef QK_HAVE_X86
    return qk_cpu_has_avx2() && qk_cpu_has_popcnt();
#else
    return 0;
#endif
}

int qk_hamming(const uint8_t *q, const uint8_t *codes, int64_t n, int64_t nbytes, int32_t *out, int isa) {
    if (n < 0 || nbytes < 0) return QK_EARG;
    if (isa == QK_ISA_SCALAR) {
        hamming_scalar(q, codes, n, nbytes, out);
        return QK_OK;
    }
#ifdef QK_HAVE_X86
    if (isa == QK_ISA_AVX2 && has_popcnt_path()) {
        if (nbytes == 16)
            hamming16_avx2(q, codes, n, out);
        else
            hamming_popcnt(q, codes, n, nbytes, out);
        return QK_OK;
    }
#endif
    return QK_EARG;
}

int qk_and_popcount(const uint8_t *planes, int64_t B, const uint8_t *codes, int64_t n, int64_t nbytes,
                    int32_t *out, int isa) {
    if (n < 0 || nbytes < 0 || B < 1 || B > 16) return QK_EARG;
    if (isa == QK_ISA_SCALAR) {
        andpop_scalar(planes, B, codes, n, nbytes, out);
        return QK_OK;
    }
#ifdef QK_HAVE_X86
    if (isa == QK_ISA_AVX2 && has_popcnt_path()) {
        if (nbytes == 16 && B <= 5)
            andpop16_avx2(planes, B, codes, n, out);
        else if (nbytes == 16 && B <= 8)
            andpop16_by_b[B](planes, codes, n, out);
        else
            andpop_popcnt(planes, B, codes, n, nbytes, out);
        return QK_OK;
    }
#endif
    return QK_EARG;
}

/* ------------------------------------------------------------------ FastScan */
static void fastscan_scalar(const uint8_t *lut, int64_t M, const uint8_t *codes, int64_t n, int32_t *out) {
    const int64_t nblk = (n + 31) / 32;
    for (int64_t b = 0; b < nblk; b++) {
        int32_t acc[32] = {0};
        const uint8_t *blk = codes + b * M * 16;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *t = lut + m * 16, *c = blk + m * 16;
            for (int k = 0; k < 16; k++) {
                acc[k] += t[c[k] & 15];
                acc[k + 16] += t[c[k] >> 4];
            }
        }
        int64_t nv = n - 32 * b < 32 ? n - 32 * b : 32;
        for (int64_t v = 0; v < nv; v++) out[32 * b + v] = acc[v];
    }
}

#ifdef QK_HAVE_X86
/* Two sub-spaces per 256-bit step: lane 0 holds sub-space m, lane 1 sub-space
 * m+1, for both the 16 code bytes and the 16-entry tables, so one vpshufb
 * looks up 16 vectors in two tables. Results are accumulated in uint16 as
 * even bytes (x & 0xFF) and odd bytes (x >> 8) of each 16-bit lane.
 * Overflow: a uint16 lane gains at most 255 per step, so it is exact for 257
 * steps; every 256 steps (512 sub-spaces) the lanes are flushed into int32,
 * so any M is exact. */
__attribute__((target("avx2"))) static void fastscan_flush(__m256i le, __m256i lo, __m256i he, __m256i ho,
                                                           int32_t *acc) {
    uint16_t a[4][16];
    _mm256_storeu_si256((__m256i *)a[0], le);
    _mm256_storeu_si256((__m256i *)a[1], lo);
    _mm256_storeu_si256((__m256i *)a[2], he);
    _mm256_storeu_si256((__m256i *)a[3], ho);
    for (int k = 0; k < 8; k++) {
        /* element k of a lane is byte 2k (even) or 2k+1 (odd) of that lane's lookup */
        acc[2 * k] += a[0][k] + a[0][k + 8];
        acc[2 * k + 1] += a[1][k] + a[1][k + 8];
        acc[16 + 2 * k] += a[2][k] + a[2][k + 8];
        acc[16 + 2 * k + 1] += a[3][k] + a[3][k + 8];
    }
}

__attribute__((target("avx2"))) static void fastscan_avx2(const uint8_t *lut, int64_t M, const uint8_t *codes,
                                                          int64_t n, int32_t *out) {
    const int64_t nblk = (n + 31) / 32, M2 = M & ~(int64_t)1;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m8 = _mm256_set1_epi16(0x00FF);
    for (int64_t b = 0; b < nblk; b++) {
        int32_t acc[32] = {0};
        const uint8_t *blk = codes + b * M * 16;
        __m256i le = _mm256_setzero_si256(), lo = le, he = le, ho = le;
        int steps = 0;
        for (int64_t m = 0; m < M; m += 2) {
            __m256i c, t;
            if (m < M2) {
                c = _mm256_loadu_si256((const __m256i *)(blk + m * 16));
                t = _mm256_loadu_si256((const __m256i *)(lut + m * 16));
            } else { /* odd M: the last sub-space alone, upper lane zero (table of zeros adds 0) */
                c = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(blk + m * 16)));
                t = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(lut + m * 16)));
            }
            __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(c, m4));
            __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), m4));
            le = _mm256_add_epi16(le, _mm256_and_si256(rl, m8));
            lo = _mm256_add_epi16(lo, _mm256_srli_epi16(rl, 8));
            he = _mm256_add_epi16(he, _mm256_and_si256(rh, m8));
            ho = _mm256_add_epi16(ho, _mm256_srli_epi16(rh, 8));
            if (++steps == 256) {
                fastscan_flush(le, lo, he, ho, acc);
                le = lo = he = ho = _mm256_setzero_si256();
                steps = 0;
            }
        }
        fastscan_flush(le, lo, he, ho, acc);
        int64_t nv = n - 32 * b < 32 ? n - 32 * b : 32;
        memcpy(out + 32 * b, acc, sizeof(int32_t) * (size_t)nv);
    }
}
#endif

int qk_fastscan(const uint8_t *lut, int64_t M, const uint8_t *codes, int64_t n, int32_t *out, int isa) {
    if (n < 0 || M < 0) return QK_EARG;
    if (isa == QK_ISA_SCALAR) {
        fastscan_scalar(lut, M, codes, n, out);
        return QK_OK;
    }
#ifdef QK_HAVE_X86
    if (isa == QK_ISA_AVX2 && qk_cpu_has_avx2()) {
        fastscan_avx2(lut, M, codes, n, out);
        return QK_OK;
    }
#endif
    return QK_EARG;
}
