/* W8A8: an 8-bit affine weight matrix as GPTQ packs it (bits = 8), against activations quantized to int8 per
 * block of 32 (qk_quantize_q8, llama.cpp's q8_0 rule).
 *
 * Weights, as on disk: int32 words (in / 4, out); byte j of word [k][o] (bits 8j .. 8j + 7, little-endian) is
 * the code of input 4k + j for output o, 0..255. Zeros uint8 and scales float32 per (group, output), as the
 * W4A8 kernels take them; a per-channel grid is one group per row. The same sums as W4A8:
 *
 *   y[o] = sum_g scale[g][o] * sum_{b in g} xs[b] * (acc[b][o] - zero[g][o] * sum_{i in b} xq[i])
 *
 * The byte layout is vpdpbusd's operand as it stands: a 64-byte line of a word row is 16 outputs x 4 inputs,
 * u8 codes against the 4 activation bytes broadcast, summed into each output's int32 lane. AVX2's maddubs would
 * saturate on 255 * 127 * 2, so the AVX2 path splits each code byte into two nibbles (as the W4 path reads
 * them), and adds 16 * (high sums) + (low sums) in int32: exact. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qk_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

static inline int32_t x4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

static void w8_scalar(const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
                      const float *scales, int64_t in, int64_t out, int64_t group, int64_t o0, int64_t o1,
                      float *y) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    for (int64_t o = o0; o < o1; o++) {
        float yo = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            int32_t z = zeros[g * out + o];
            float t = 0.0f;
            int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
            for (int64_t b = g * bpg; b < b1; b++) {
                int64_t k0 = b * QK_A8_BLOCK / 4, k1 = (b + 1) * QK_A8_BLOCK / 4;
                if (k1 > in / 4) k1 = in / 4;
                int32_t s = 0;
                for (int64_t k = k0; k < k1; k++) {
                    uint32_t w = (uint32_t)qw[k * out + o];
                    for (int j = 0; j < 4; j++) s += (int32_t)((w >> (8 * j)) & 0xFFu) * (int32_t)xq[4 * k + j];
                }
                t += xs[b] * (float)(s - z * sx[b]);
            }
            yo += scales[g * out + o] * t;
        }
        y[o] = yo;
    }
}

#ifdef QK_X86
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void w8_tile_vnni(
    const int T, const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o, float *y) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    __m512 yo[4];
    for (int t = 0; t < T; t++) yo[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + g * out + o)));
        __m512 tg[4];
        for (int t = 0; t < T; t++) tg[t] = _mm512_setzero_ps();
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 4, k1 = (b + 1) * QK_A8_BLOCK / 4;
            if (k1 > in / 4) k1 = in / 4;
            __m512i s[4];
            for (int t = 0; t < T; t++) s[t] = _mm512_setzero_si512();
            for (int64_t k = k0; k < k1; k++) {
                __m512i w = _mm512_loadu_si512((const void *)(qw + k * out + o));
                for (int t = 0; t < T; t++)
                    s[t] = _mm512_dpbusd_epi32(s[t], w, _mm512_set1_epi32(x4(xq + t * in + 4 * k)));
            }
            for (int t = 0; t < T; t++) {
                __m512i c = _mm512_sub_epi32(s[t], _mm512_mullo_epi32(z, _mm512_set1_epi32(sx[t * nb + b])));
                tg[t] = _mm512_add_ps(tg[t], _mm512_mul_ps(_mm512_set1_ps(xs[t * nb + b]), _mm512_cvtepi32_ps(c)));
            }
        }
        __m512 sc = _mm512_loadu_ps(scales + g * out + o);
        for (int t = 0; t < T; t++) yo[t] = _mm512_add_ps(yo[t], _mm512_mul_ps(sc, tg[t]));
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * out + o, yo[t]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void w8_vnni(
    const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros, const float *scales,
    int64_t in, int64_t out, int64_t group, int64_t m, int64_t o0, int64_t o1, float *y) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    for (int64_t o = o0; o + 16 <= o1; o += 16) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4)
            w8_tile_vnni(4, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o, y + t * out);
        switch (m - t) {
            case 3: w8_tile_vnni(3, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                                 y + t * out); break;
            case 2: w8_tile_vnni(2, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                                 y + t * out); break;
            case 1: w8_tile_vnni(1, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                                 y + t * out); break;
            default: break;
        }
    }
}

__attribute__((target("avx2"), always_inline)) static inline void w8_tile_avx2(
    const int T, const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o, float *y) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 yo[2];
    for (int t = 0; t < T; t++) yo[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g * out + o)));
        __m256 tg[2];
        for (int t = 0; t < T; t++) tg[t] = _mm256_setzero_ps();
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 4, k1 = (b + 1) * QK_A8_BLOCK / 4;
            if (k1 > in / 4) k1 = in / 4;
            __m256i al[2], ah[2];
            for (int t = 0; t < T; t++) al[t] = ah[t] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k1; k++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(qw + k * out + o));
                __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
                for (int t = 0; t < T; t++) {
                    __m256i xb = _mm256_set1_epi32(x4(xq + t * in + 4 * k));
                    al[t] = _mm256_add_epi16(al[t], _mm256_maddubs_epi16(lo, xb));
                    ah[t] = _mm256_add_epi16(ah[t], _mm256_maddubs_epi16(hi, xb));
                }
            }
            for (int t = 0; t < T; t++) {
                __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(al[t], ones),
                                               _mm256_slli_epi32(_mm256_madd_epi16(ah[t], ones), 4));
                __m256i c = _mm256_sub_epi32(sum, _mm256_mullo_epi32(z, _mm256_set1_epi32(sx[t * nb + b])));
                tg[t] = _mm256_add_ps(tg[t], _mm256_mul_ps(_mm256_set1_ps(xs[t * nb + b]), _mm256_cvtepi32_ps(c)));
            }
        }
        __m256 sc = _mm256_loadu_ps(scales + g * out + o);
        for (int t = 0; t < T; t++) yo[t] = _mm256_add_ps(yo[t], _mm256_mul_ps(sc, tg[t]));
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + t * out + o, yo[t]);
}

__attribute__((target("avx2"))) static void w8_avx2(
    const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros, const float *scales,
    int64_t in, int64_t out, int64_t group, int64_t m, int64_t o0, int64_t o1, float *y) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    for (int64_t o = o0; o + 8 <= o1; o += 8) {
        int64_t t = 0;
        for (; t + 2 <= m; t += 2)
            w8_tile_avx2(2, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o, y + t * out);
        if (t < m)
            w8_tile_avx2(1, xq + t * in, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o, y + t * out);
    }
}
/* Decode (one token): the weight rows streamed in file order, as kernels_w4a8.c's stream_vnni explains; a
 * block of 32 inputs is 8 word rows here. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void w8_stream_vnni(
    const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o0, int64_t o1, float *y, float *t) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    const int pf = QK_PF_ON(QK_PF_W8, o0, o1);
    for (int64_t o = o0; o < o1; o += 16) _mm512_storeu_ps(y + o, _mm512_setzero_ps());
    for (int64_t g = 0; g < ng; g++) {
        for (int64_t o = o0; o < o1; o += 16) _mm512_storeu_ps(t + (o - o0), _mm512_setzero_ps());
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 4, k1 = (b + 1) * QK_A8_BLOCK / 4;
            if (k1 > in / 4) k1 = in / 4;
            __m512i sxb = _mm512_set1_epi32(sx[b]);
            __m512 xsb = _mm512_set1_ps(xs[b]);
            for (int64_t o = o0; o < o1; o += 16) {
                __m512i acc = _mm512_setzero_si512();
                for (int64_t k = k0; k < k1; k++) {
                    if (pf) _mm_prefetch((const char *)(qw + (k + QK_PF_W8) * out + o), _MM_HINT_T0);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512((const void *)(qw + k * out + o)),
                                              _mm512_set1_epi32(x4(xq + 4 * k)));
                }
                __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + g * out + o)));
                __m512i c = _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, sxb));
                float *tp = t + (o - o0);
                _mm512_storeu_ps(tp, _mm512_add_ps(_mm512_loadu_ps(tp), _mm512_mul_ps(xsb, _mm512_cvtepi32_ps(c))));
            }
        }
        for (int64_t o = o0; o < o1; o += 16)
            _mm512_storeu_ps(y + o, _mm512_add_ps(_mm512_loadu_ps(y + o), _mm512_mul_ps(
                _mm512_loadu_ps(scales + g * out + o), _mm512_loadu_ps(t + (o - o0)))));
    }
}

__attribute__((target("avx2"))) static void w8_stream_avx2(
    const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o0, int64_t o1, float *y, float *t) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    const int pf = QK_PF_ON(QK_PF_W8, o0, o1);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t o = o0; o < o1; o += 8) _mm256_storeu_ps(y + o, _mm256_setzero_ps());
    for (int64_t g = 0; g < ng; g++) {
        for (int64_t o = o0; o < o1; o += 8) _mm256_storeu_ps(t + (o - o0), _mm256_setzero_ps());
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 4, k1 = (b + 1) * QK_A8_BLOCK / 4;
            if (k1 > in / 4) k1 = in / 4;
            __m256i sxb = _mm256_set1_epi32(sx[b]);
            __m256 xsb = _mm256_set1_ps(xs[b]);
            for (int64_t o = o0; o < o1; o += 8) {
                __m256i al = _mm256_setzero_si256(), ah = _mm256_setzero_si256();
                for (int64_t k = k0; k < k1; k++) {
                    __m256i w = _mm256_loadu_si256((const __m256i *)(qw + k * out + o));
                    __m256i xb = _mm256_set1_epi32(x4(xq + 4 * k));
                    if (pf) _mm_prefetch((const char *)(qw + (k + QK_PF_W8) * out + o), _MM_HINT_T0);
                    al = _mm256_add_epi16(al, _mm256_maddubs_epi16(_mm256_and_si256(w, m4), xb));
                    ah = _mm256_add_epi16(ah, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m4), xb));
                }
                __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(al, ones),
                                               _mm256_slli_epi32(_mm256_madd_epi16(ah, ones), 4));
                __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g * out + o)));
                __m256i c = _mm256_sub_epi32(sum, _mm256_mullo_epi32(z, sxb));
                float *tp = t + (o - o0);
                _mm256_storeu_ps(tp, _mm256_add_ps(_mm256_loadu_ps(tp), _mm256_mul_ps(xsb, _mm256_cvtepi32_ps(c))));
            }
        }
        for (int64_t o = o0; o < o1; o += 8)
            _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_mul_ps(
                _mm256_loadu_ps(scales + g * out + o), _mm256_loadu_ps(t + (o - o0)))));
    }
}
#endif

typedef struct {
    const int8_t *xq;
    const float *xs;
    const int32_t *sx, *qw;
    const uint8_t *zeros;
    const float *scales;
    int64_t in, out, group, m;
    float *y;
    int isa;
} w8_job;

static void w8_part(void *arg, int part, int parts) {
    const w8_job *j = (const w8_job *)arg;
    int64_t chunk = ((j->out + parts - 1) / parts + 15) & ~(int64_t)15;
    int64_t o0 = part * chunk, o1 = o0 + chunk < j->out ? o0 + chunk : j->out;
    if (o0 >= o1) return;
    int64_t nb = (j->in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
#ifdef QK_X86
    if (j->m == 1 && j->isa != QK_ISA_SCALAR) {
        int64_t lane = j->isa == QK_ISA_VNNI ? 16 : 8, oe = o0 + ((o1 - o0) / lane) * lane;
        float *t = oe > o0 ? (float *)malloc((size_t)(oe - o0) * sizeof(float)) : NULL;
        if (t) {
            if (j->isa == QK_ISA_VNNI)
                w8_stream_vnni(j->xq, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, o0, oe,
                               j->y, t);
            else
                w8_stream_avx2(j->xq, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, o0, oe,
                               j->y, t);
            free(t);
            o0 = oe;
        }
        if (o0 >= o1) return;
    } else if (j->isa != QK_ISA_SCALAR) {
        int64_t lane = j->isa == QK_ISA_VNNI ? 16 : 8, oe = o0 + ((o1 - o0) / lane) * lane;
        if (j->isa == QK_ISA_VNNI)
            w8_vnni(j->xq, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, j->m, o0, oe, j->y);
        else
            w8_avx2(j->xq, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, j->m, o0, oe, j->y);
        o0 = oe;
        if (o0 >= o1) return;
    }
#endif
    for (int64_t t = 0; t < j->m; t++)
        w8_scalar(j->xq + t * j->in, j->xs + t * nb, j->sx + t * nb, j->qw, j->zeros, j->scales, j->in, j->out,
                  j->group, o0, o1, j->y + t * j->out);
}

int qk_gemm_w8a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, float *y, int isa,
                 int threads) {
    if (in <= 0 || out <= 0 || m <= 0 || in % 4 || group <= 0 || (group % QK_A8_BLOCK && group < in) ||
        threads < 1 || threads > QK_MAX_THREADS)
        return QK_EARG;
    if (group > in) group = in;
#ifdef QK_X86
    if (isa == QK_ISA_AVX2 && !qk_cpu_has_avx2()) return QK_EARG;
    if (isa == QK_ISA_VNNI && !qk_cpu_has_avx512vnni()) return QK_EARG;
#else
    if (isa != QK_ISA_SCALAR) return QK_EARG;
#endif
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    int64_t g_eff = group % QK_A8_BLOCK ? nb * QK_A8_BLOCK : group;
    int32_t *sx = (int32_t *)malloc((size_t)(m * nb) * sizeof(int32_t));
    if (!sx) return QK_ENOMEM;
    for (int64_t t = 0; t < m; t++) qk_q8_block_sums(xq + t * in, in, sx + t * nb);
    w8_job job = {xq, xs, sx, qweight, zeros, scales, in, out, g_eff, m, y, isa};
    int64_t lines = (out + 15) / 16;
    int rc = qk_parallel(w8_part, &job, threads < lines ? threads : (int)lines);
    free(sx);
    return rc;
}
