/* int8 / uint8 dot products and squared L2 distances, one query against many
 * rows and blocked many-against-many.
 *
 * Exactness: every product is formed in int16 x int16 -> int32 (vpmaddwd), never
 * with vpmaddubsw, whose int16 saturation (255*127*2 > 32767) would silently
 * clip uint8 x int8 pairs. Sums are int32; the caller bounds d so that
 * d * max|term| < 2^31, hence no partial sum can overflow either.
 *
 * Layout: rows are C-contiguous, row i starts at X + i*d. One element is one
 * byte for both types, so int8 and uint8 share the pointer arithmetic.
 */
#include <stddef.h>
#include "qk_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_HAVE_X86 1
#endif

typedef void (*qk_kern)(const void *q, const void *X, int64_t n, int64_t d, int32_t *out);

/* ------------------------------------------------------------------ scalar */
/* The portable twin: plain loops the compiler may vectorise for the baseline ISA. */
#define QK_SCALAR(TQ, TR, SUF)                                                           \
    static void dot_scalar_##SUF(const void *qv, const void *Xv, int64_t n, int64_t d,   \
                                 int32_t *out) {                                        \
        const TQ *q = (const TQ *)qv;                                                   \
        const TR *X = (const TR *)Xv;                                                   \
        for (int64_t i = 0; i < n; i++) {                                               \
            const TR *x = X + i * d;                                                    \
            int32_t acc = 0;                                                            \
            for (int64_t j = 0; j < d; j++) acc += (int32_t)q[j] * (int32_t)x[j];       \
            out[i] = acc;                                                               \
        }                                                                               \
    }                                                                                   \
    static void l2_scalar_##SUF(const void *qv, const void *Xv, int64_t n, int64_t d,    \
                                int32_t *out) {                                         \
        const TQ *q = (const TQ *)qv;                                                   \
        const TR *X = (const TR *)Xv;                                                   \
        for (int64_t i = 0; i < n; i++) {                                               \
            const TR *x = X + i * d;                                                    \
            int32_t acc = 0;                                                            \
            for (int64_t j = 0; j < d; j++) {                                           \
                int32_t t = (int32_t)q[j] - (int32_t)x[j];                              \
                acc += t * t;                                                           \
            }                                                                           \
            out[i] = acc;                                                               \
        }                                                                               \
    }

QK_SCALAR(int8_t, int8_t, ii)
QK_SCALAR(int8_t, uint8_t, iu)
QK_SCALAR(uint8_t, int8_t, ui)
QK_SCALAR(uint8_t, uint8_t, uu)

/* -------------------------------------------------------------------- AVX2 */
#ifdef QK_HAVE_X86
/* 16 bytes -> 16 int16 lanes, sign- or zero-extended by element type */
#define QK_W_int8_t(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define QK_W_uint8_t(p) _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p)))

__attribute__((target("avx2"))) static inline int32_t qk_hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* TERM(qv, xv): int32x8 contribution of 16 widened lanes.
 * dot: vpmaddwd(q, x) = pairwise q*x sums; l2: t = q - x (fits int16: at most
 * 255 - (-128) = 383), then vpmaddwd(t, t). */
#define QK_TERM_dot(qv, xv) _mm256_madd_epi16((qv), (xv))
#define QK_TERM_l2(qv, xv) \
    __extension__({ __m256i t_ = _mm256_sub_epi16((qv), (xv)); _mm256_madd_epi16(t_, t_); })
#define QK_TAIL_dot(a, b) ((int32_t)(a) * (int32_t)(b))
#define QK_TAIL_l2(a, b) \
    __extension__({ int32_t t_ = (int32_t)(a) - (int32_t)(b); t_ * t_; })

/* Four rows per pass share each widened query chunk and give four independent
 * accumulator chains; the scan is memory-bound, so this mostly hides latency. */
#define QK_AVX2(OP, TQ, TR, SUF)                                                         \
    __attribute__((target("avx2"))) static void OP##_avx2_##SUF(                         \
        const void *qv, const void *Xv, int64_t n, int64_t d, int32_t *out) {           \
        const TQ *q = (const TQ *)qv;                                                   \
        const TR *X = (const TR *)Xv;                                                   \
        const int64_t d16 = d & ~(int64_t)15;                                           \
        int64_t i = 0;                                                                  \
        for (; i + 4 <= n; i += 4) {                                                    \
            const TR *x0 = X + i * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;         \
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;             \
            for (int64_t j = 0; j < d16; j += 16) {                                     \
                __m256i w = QK_W_##TQ(q + j);                                           \
                a0 = _mm256_add_epi32(a0, QK_TERM_##OP(w, QK_W_##TR(x0 + j)));          \
                a1 = _mm256_add_epi32(a1, QK_TERM_##OP(w, QK_W_##TR(x1 + j)));          \
                a2 = _mm256_add_epi32(a2, QK_TERM_##OP(w, QK_W_##TR(x2 + j)));          \
                a3 = _mm256_add_epi32(a3, QK_TERM_##OP(w, QK_W_##TR(x3 + j)));          \
            }                                                                           \
            int32_t s0 = qk_hsum_epi32(a0), s1 = qk_hsum_epi32(a1);                     \
            int32_t s2 = qk_hsum_epi32(a2), s3 = qk_hsum_epi32(a3);                     \
            for (int64_t j = d16; j < d; j++) {                                         \
                s0 += QK_TAIL_##OP(q[j], x0[j]);                                        \
                s1 += QK_TAIL_##OP(q[j], x1[j]);                                        \
                s2 += QK_TAIL_##OP(q[j], x2[j]);                                        \
                s3 += QK_TAIL_##OP(q[j], x3[j]);                                        \
            }                                                                           \
            out[i] = s0;                                                                \
            out[i + 1] = s1;                                                            \
            out[i + 2] = s2;                                                            \
            out[i + 3] = s3;                                                            \
        }                                                                               \
        for (; i < n; i++) {                                                            \
            const TR *x0 = X + i * d;                                                   \
            __m256i a0 = _mm256_setzero_si256();                                        \
            for (int64_t j = 0; j < d16; j += 16)                                       \
                a0 = _mm256_add_epi32(a0, QK_TERM_##OP(QK_W_##TQ(q + j), QK_W_##TR(x0 + j))); \
            int32_t s0 = qk_hsum_epi32(a0);                                             \
            for (int64_t j = d16; j < d; j++) s0 += QK_TAIL_##OP(q[j], x0[j]);          \
            out[i] = s0;                                                                \
        }                                                                               \
    }

QK_AVX2(dot, int8_t, int8_t, ii)
QK_AVX2(dot, int8_t, uint8_t, iu)
QK_AVX2(dot, uint8_t, int8_t, ui)
QK_AVX2(dot, uint8_t, uint8_t, uu)
QK_AVX2(l2, int8_t, int8_t, ii)
QK_AVX2(l2, int8_t, uint8_t, iu)
QK_AVX2(l2, uint8_t, int8_t, ui)
QK_AVX2(l2, uint8_t, uint8_t, uu)
#endif /* QK_HAVE_X86 */

/* ---------------------------------------------------------------- dispatch */
static qk_kern pick(int op, int tq, int tr, int isa) {
    /* op 0 = dot, 1 = l2; index [tq][tr] */
    static const qk_kern scalar[2][2][2] = {
        {{dot_scalar_ii, dot_scalar_iu}, {dot_scalar_ui, dot_scalar_uu}},
        {{l2_scalar_ii, l2_scalar_iu}, {l2_scalar_ui, l2_scalar_uu}},
    };
    if ((tq != QK_I8 && tq != QK_U8) || (tr != QK_I8 && tr != QK_U8)) return NULL;
#ifdef QK_HAVE_X86
    static const qk_kern avx2[2][2][2] = {
        {{dot_avx2_ii, dot_avx2_iu}, {dot_avx2_ui, dot_avx2_uu}},
        {{l2_avx2_ii, l2_avx2_iu}, {l2_avx2_ui, l2_avx2_uu}},
    };
    if (isa == QK_ISA_AVX2) return qk_cpu_has_avx2() ? avx2[op][tq][tr] : NULL;
#else
    if (isa == QK_ISA_AVX2) return NULL;
#endif
    if (isa == QK_ISA_SCALAR) return scalar[op][tq][tr];
    return NULL;
}

static int run_1xn(int op, int tq, int tr, const void *q, const void *X, int64_t n, int64_t d,
                   int32_t *out, int isa) {
    qk_kern f = pick(op, tq, tr, isa);
    if (!f || n < 0 || d < 0) return QK_EARG;
    f(q, X, n, d, out);
    return QK_OK;
}

/* Many-against-many: Y is cut into blocks of rows that stay in L2 (~256 KB);
 * every row of X then scans one block, so row i of the output, being
 * contiguous in j, is filled by the same 1xn kernel a block at a time. */
static int run_mxn(int op, int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny,
                   int64_t d, int32_t *out, int isa) {
    if (isa == QK_ISA_VNNI) return qk_mxn_vnni(op, tq, tr, X, nx, Y, ny, d, out);  /* gemm_i8.c */
    qk_kern f = pick(op, tq, tr, isa);
    if (!f || nx < 0 || ny < 0 || d < 0) return QK_EARG;
    int64_t bj = d > 0 ? (int64_t)(256 * 1024) / d : ny;
    if (bj < 16) bj = 16;
    const char *xb = (const char *)X, *yb = (const char *)Y;
    for (int64_t j0 = 0; j0 < ny; j0 += bj) {
        int64_t nb = ny - j0 < bj ? ny - j0 : bj;
        for (int64_t i = 0; i < nx; i++) f(xb + i * d, yb + j0 * d, nb, d, out + i * ny + j0);
    }
    return QK_OK;
}

int qk_dot_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) {
    return run_1xn(0, tq, tr, q, X, n, d, out, isa);
}
int qk_l2_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa) {
    return run_1xn(1, tq, tr, q, X, n, d, out, isa);
}
int qk_dot_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d,
               int32_t *out, int isa) {
    return run_mxn(0, tq, tr, X, nx, Y, ny, d, out, isa);
}
int qk_l2_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d,
              int32_t *out, int isa) {
    return run_mxn(1, tq, tr, X, nx, Y, ny, d, out, isa);
}
