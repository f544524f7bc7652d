/* W4A8: a 4-bit affine weight matrix as GPTQ packs it, against an activation quantized to int8 per block.
 *
 * Weights, as on disk (AutoGPTQ / GPTQModel `qweight`): int32 words (in / 8, out); input 8k + j of output o is
 * nibble j (bits 4j .. 4j + 3) of word [k][o]; codes 0..15. Zero points and scales per (group, output) are
 * handed over unpacked (uint8 zeros, float32 scales: 2-6% of the weight bytes, converted once at load).
 * Activations as llama.cpp's q8_0 quantizes them: blocks of QK_A8_BLOCK = 32 inputs, xq = round(x / xs) in
 * -127..127, xs = max|x| / 127 per block; a block never straddles a weight group (group % 32 == 0, or one
 * group per row), the last block of a ragged group is shorter.
 *
 *   acc[b][o] = sum_{i in b} q[o][i] * xq[i]                  (int32, exact: |acc| <= 32 * 15 * 127)
 *   y[o]      = sum_g scale[g][o] * sum_{b in g} xs[b] * (acc[b][o] - zero[g][o] * sum_{i in b} xq[i])
 *
 * The float part runs in float32 in the same order on every path (groups, then blocks, ascending), lanes of
 * the AVX2 path being outputs, so paths differ only by the compiler's contraction of a * b + c. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "qk_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

static inline int32_t nib(uint32_t w, int j) { return (int32_t)((w >> (4 * j)) & 0xFu); }

/* integer block sums for outputs [o0, o1): acc (nb, out) */
static void blocks_scalar(const int8_t *xq, const int32_t *qw, int64_t in, int64_t out, int64_t o0, int64_t o1,
                          int32_t *acc) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    for (int64_t b = 0; b < nb; b++) {
        int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
        if (k1 > in / 8) k1 = in / 8;
        for (int64_t o = o0; o < o1; o++) {
            int32_t s = 0;
            for (int64_t k = k0; k < k1; k++) {
                uint32_t w = (uint32_t)qw[k * out + o];
                const int8_t *x = xq + 8 * k;
                for (int j = 0; j < 8; j++) s += nib(w, j) * (int32_t)x[j];
            }
            acc[b * out + o] = s;
        }
    }
}

#ifdef QK_X86
/* The activation as maddubs operands, once per call: for word row k, xv[2k] broadcasts the bytes
 * (x[8k], x[8k+2], x[8k+4], x[8k+6]) and xv[2k+1] (x[8k+1], x[8k+3], x[8k+5], x[8k+7]); 8 * in bytes. */
__attribute__((target("avx2"))) static __m256i *pairs_avx2(const int8_t *xq, int64_t in) {
    __m256i *xv = (__m256i *)aligned_alloc(32, (size_t)(in / 8) * 2 * sizeof(__m256i) + 32);
    if (!xv) return NULL;
    for (int64_t k = 0; k < in / 8; k++) {
        const uint8_t *x = (const uint8_t *)(xq + 8 * k);
        uint32_t lo = x[0] | (uint32_t)x[2] << 8 | (uint32_t)x[4] << 16 | (uint32_t)x[6] << 24;
        uint32_t hi = x[1] | (uint32_t)x[3] << 8 | (uint32_t)x[5] << 16 | (uint32_t)x[7] << 24;
        xv[2 * k] = _mm256_set1_epi32((int32_t)lo);
        xv[2 * k + 1] = _mm256_set1_epi32((int32_t)hi);
    }
    return xv;
}

/* 8 outputs, word rows [k0, k1) (one block): w & 0x0F0F0F0F holds nibbles 0, 2, 4, 6 of each word as bytes,
 * (w >> 4) & 0x0F0F0F0F nibbles 1, 3, 5, 7; maddubs multiplies them by the matching activation bytes and adds
 * pairs into int16 (|sum| <= 8 * 2 * 15 * 127 = 30480 over a block: no saturation); one madd by ones per block
 * widens to int32. */
__attribute__((target("avx2"))) static inline __m256i block8_avx2(const __m256i *xv, const int32_t *qw, int64_t out,
                                                                  int64_t o, int64_t k0, int64_t k1, int pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(qw + k * out + o));
        if (pf) _mm_prefetch((const char *)(qw + (k + QK_PF_W4) * out + o), _MM_HINT_T0);
        __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(lo, xv[2 * k]));
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(hi, xv[2 * k + 1]));
    }
    return _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
}

__attribute__((target("avx2"))) static int blocks_avx2(const int8_t *xq, const int32_t *qw, int64_t in,
                                                       int64_t out, int32_t *acc) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK, o8 = out & ~(int64_t)7;
    __m256i *xv = pairs_avx2(xq, in);
    if (!xv) return QK_ENOMEM;
    for (int64_t b = 0; b < nb; b++) {
        int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
        if (k1 > in / 8) k1 = in / 8;
        for (int64_t o = 0; o < o8; o += 8)
            _mm256_storeu_si256((__m256i *)(acc + b * out + o), block8_avx2(xv, qw, out, o, k0, k1, 0));
    }
    free(xv);
    if (o8 < out) blocks_scalar(xq, qw, in, out, o8, out, acc);
    return QK_OK;
}
#endif

int qk_w4a8_blocks(const int8_t *xq, const int32_t *qweight, int64_t in, int64_t out, int32_t *acc, int isa) {
    if (in <= 0 || out <= 0 || in % 8) return QK_EARG;
    if (isa == QK_ISA_VNNI) isa = QK_ISA_AVX2;  /* the block sums' AVX2 code serves a VNNI request (same integers) */
#ifdef QK_X86
    if (isa == QK_ISA_AVX2) {
        if (!qk_cpu_has_avx2()) return QK_EARG;
        return blocks_avx2(xq, qweight, in, out, acc);
    }
#else
    if (isa == QK_ISA_AVX2) return QK_EARG;
#endif
    blocks_scalar(xq, qweight, in, out, 0, out, acc);
    return QK_OK;
}

static void quantize_q8_scalar(const float *x, int64_t n, int8_t *xq, float *xs) {
    for (int64_t b = 0; b * QK_A8_BLOCK < n; b++) {
        int64_t i0 = b * QK_A8_BLOCK, i1 = i0 + QK_A8_BLOCK < n ? i0 + QK_A8_BLOCK : n;
        float amax = 0.0f;
        for (int64_t i = i0; i < i1; i++) {
            float a = x[i] < 0 ? -x[i] : x[i];
            if (a > amax) amax = a;
        }
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        for (int64_t i = i0; i < i1; i++) {
            float v = x[i] * id;
            float t = (float)(int32_t)v;  /* roundf, exactly: trunc, then a step away from zero at |frac| >= 0.5 */
            float f = v - t;
            xq[i] = (int8_t)(t + (f >= 0.5f ? 1.0f : 0.0f) - (f <= -0.5f ? 1.0f : 0.0f));
        }
    }
}

#ifdef QK_X86
/* the same arithmetic 8 lanes at a time (whole blocks of 32; a ragged last block goes to the scalar code):
 * max|x| is order-free, and x * id, trunc and the half step are the scalar code's IEEE operations, so the
 * bytes are identical */
__attribute__((target("avx2"))) static void quantize_q8_avx2(const float *x, int64_t n, int8_t *xq, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f), mhalf = _mm256_set1_ps(-0.5f);
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t full = n / QK_A8_BLOCK;
    for (int64_t b = 0; b < full; b++) {
        const float *p = x + b * QK_A8_BLOCK;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int r = 0; r < 4; r++) {
            v[r] = _mm256_loadu_ps(p + 8 * r);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[r]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int r = 0; r < 4; r++) {
            __m256 a = _mm256_mul_ps(v[r], vid);
            __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256 f = _mm256_sub_ps(a, t);
            t = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(f, half, _CMP_GE_OQ), one));
            t = _mm256_sub_ps(t, _mm256_and_ps(_mm256_cmp_ps(f, mhalf, _CMP_LE_OQ), one));
            q[r] = _mm256_cvttps_epi32(t);
        }
        /* int32 -> int8 in order: packs work per 128-bit lane, the permute puts the lanes back */
        __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i bytes = _mm256_packs_epi16(w01, w23);
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + b * QK_A8_BLOCK), bytes);
    }
    if (full * QK_A8_BLOCK < n)
        quantize_q8_scalar(x + full * QK_A8_BLOCK, n - full * QK_A8_BLOCK, xq + full * QK_A8_BLOCK, xs + full);
}
#endif

void qk_quantize_q8(const float *x, int64_t n, int8_t *xq, float *xs) {
#ifdef QK_X86
    if (qk_cpu_has_avx2()) {
        quantize_q8_avx2(x, n, xq, xs);
        return;
    }
#endif
    quantize_q8_scalar(x, n, xq, xs);
}

void qk_q8_block_sums(const int8_t *xq, int64_t in, int32_t *sx) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        int64_t e = (b + 1) * QK_A8_BLOCK < in ? (b + 1) * QK_A8_BLOCK : in;
        for (int64_t i = b * QK_A8_BLOCK; i < e; i++) s += xq[i];
        sx[b] = s;
    }
}

static void gemv_scalar(const int8_t *xq, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
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
                int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
                if (k1 > in / 8) k1 = in / 8;
                int32_t s = 0;
                for (int64_t k = k0; k < k1; k++) {
                    uint32_t w = (uint32_t)qw[k * out + o];
                    const int8_t *x = xq + 8 * k;
                    for (int j = 0; j < 8; j++) s += nib(w, j) * (int32_t)x[j];
                }
                t += xs[b] * (float)(s - z * sx[b]);
            }
            yo += scales[g * out + o] * t;
        }
        y[o] = yo;
    }
}

#ifdef QK_X86
/* Decode (one token): the weight bytes are streamed in file order. A block of 32 inputs is 4 word rows, each
 * `out` words long and contiguous, so one block's rows are read front to back for all outputs of this part
 * before the next block; the per-output partial sums (t) and results (y) stay in L1/L2. Walking one 16-output
 * line down all rows instead (as the prefill tile does) jumps 4 * out bytes per row: a new page every row
 * for the wider linears, which the hardware prefetchers do not follow (measured: 3-4x slower from DRAM).
 * The float order per output is the tile's: groups, then blocks, ascending. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void stream_vnni(
    const uint32_t *xp, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o0, int64_t o1, float *y, float *t) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    const int pf = QK_PF_ON(QK_PF_W4, o0, o1);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int64_t o = o0; o < o1; o += 16) _mm512_storeu_ps(y + o, _mm512_setzero_ps());
    for (int64_t g = 0; g < ng; g++) {
        for (int64_t o = o0; o < o1; o += 16) _mm512_storeu_ps(t + (o - o0), _mm512_setzero_ps());
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
            if (k1 > in / 8) k1 = in / 8;
            __m512i sxb = _mm512_set1_epi32(sx[b]);
            __m512 xsb = _mm512_set1_ps(xs[b]);
            for (int64_t o = o0; o < o1; o += 16) {
                __m512i acc = _mm512_setzero_si512();
                for (int64_t k = k0; k < k1; k++) {
                    __m512i w = _mm512_loadu_si512((const void *)(qw + k * out + o));
                    if (pf) _mm_prefetch((const char *)(qw + (k + QK_PF_W4) * out + o), _MM_HINT_T0);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(w, m4), _mm512_set1_epi32((int32_t)xp[2 * k]));
                    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4),
                                              _mm512_set1_epi32((int32_t)xp[2 * k + 1]));
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

/* the same on AVX2, 8 outputs per step, maddubs into int16 per block (block8_avx2) */
__attribute__((target("avx2"))) static void stream_avx2(
    const __m256i *xv, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o0, int64_t o1, float *y, float *t) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    const int pf = QK_PF_ON(QK_PF_W4, o0, o1);
    for (int64_t o = o0; o < o1; o += 8) _mm256_storeu_ps(y + o, _mm256_setzero_ps());
    for (int64_t g = 0; g < ng; g++) {
        for (int64_t o = o0; o < o1; o += 8) _mm256_storeu_ps(t + (o - o0), _mm256_setzero_ps());
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
            if (k1 > in / 8) k1 = in / 8;
            __m256i sxb = _mm256_set1_epi32(sx[b]);
            __m256 xsb = _mm256_set1_ps(xs[b]);
            for (int64_t o = o0; o < o1; o += 8) {
                __m256i acc = block8_avx2(xv, qw, out, o, k0, k1, pf);
                __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g * out + o)));
                __m256i c = _mm256_sub_epi32(acc, _mm256_mullo_epi32(z, sxb));
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

/* the activation's bytes as dpbusd operands, once per call: (x[8k], x[8k+2], x[8k+4], x[8k+6]) and the odd ones */
static void quads_into(const int8_t *xq, int64_t in, uint32_t *xp) {
    for (int64_t k = 0; k < in / 8; k++) {
        const uint8_t *x = (const uint8_t *)(xq + 8 * k);
        xp[2 * k] = x[0] | (uint32_t)x[2] << 8 | (uint32_t)x[4] << 16 | (uint32_t)x[6] << 24;
        xp[2 * k + 1] = x[1] | (uint32_t)x[3] << 8 | (uint32_t)x[5] << 16 | (uint32_t)x[7] << 24;
    }
}

#ifdef QK_X86
/* Prefill: T tokens against one 16-output line. Each word row of the line is loaded and split into nibbles
 * once and used by the T tokens (the line, in / 8 rows of 64 bytes, then stays in L1 for the next tile), so
 * the weight bytes are read from memory once per call, not once per token. The integers and the float order
 * per token are the GEMV's exactly. xp: the tokens' quads, 2 * (in / 8) words per token. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void tile_vnni(
    const int T, const uint32_t *xp, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o, float *y) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    int64_t words = 2 * (in / 8);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 yo[4];
    for (int t = 0; t < T; t++) yo[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + g * out + o)));
        __m512 tg[4];
        for (int t = 0; t < T; t++) tg[t] = _mm512_setzero_ps();
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
            if (k1 > in / 8) k1 = in / 8;
            __m512i s[4];
            for (int t = 0; t < T; t++) s[t] = _mm512_setzero_si512();
            for (int64_t k = k0; k < k1; k++) {
                __m512i w = _mm512_loadu_si512((const void *)(qw + k * out + o));
                __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                for (int t = 0; t < T; t++) {
                    const uint32_t *x = xp + t * words + 2 * k;
                    s[t] = _mm512_dpbusd_epi32(s[t], lo, _mm512_set1_epi32((int32_t)x[0]));
                    s[t] = _mm512_dpbusd_epi32(s[t], hi, _mm512_set1_epi32((int32_t)x[1]));
                }
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

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void gemm_vnni(
    const uint32_t *xp, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, int64_t o0, int64_t o1, float *y) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK, words = 2 * (in / 8);
    for (int64_t o = o0; o + 16 <= o1; o += 16) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4)
            tile_vnni(4, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o, y + t * out);
        switch (m - t) {
            case 3: tile_vnni(3, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            case 2: tile_vnni(2, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            case 1: tile_vnni(1, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            default: break;
        }
    }
}

/* the same tile on AVX2: 8 outputs per ymm (half a line), maddubs into int16 per block as block8_avx2 does */
__attribute__((target("avx2"), always_inline)) static inline void tile_avx2(
    const int T, const uint32_t *xp, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t o, float *y) {
    int64_t ng = (in + group - 1) / group, bpg = group / QK_A8_BLOCK, nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
    int64_t words = 2 * (in / 8);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 yo[4];
    for (int t = 0; t < T; t++) yo[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g * out + o)));
        __m256 tg[4];
        for (int t = 0; t < T; t++) tg[t] = _mm256_setzero_ps();
        int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            int64_t k0 = b * QK_A8_BLOCK / 8, k1 = (b + 1) * QK_A8_BLOCK / 8;
            if (k1 > in / 8) k1 = in / 8;
            __m256i a[4];
            for (int t = 0; t < T; t++) a[t] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k1; k++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(qw + k * out + o));
                __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
                for (int t = 0; t < T; t++) {
                    const uint32_t *x = xp + t * words + 2 * k;
                    a[t] = _mm256_add_epi16(a[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32((int32_t)x[0])));
                    a[t] = _mm256_add_epi16(a[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32((int32_t)x[1])));
                }
            }
            for (int t = 0; t < T; t++) {
                __m256i c = _mm256_sub_epi32(_mm256_madd_epi16(a[t], ones),
                                             _mm256_mullo_epi32(z, _mm256_set1_epi32(sx[t * nb + b])));
                tg[t] = _mm256_add_ps(tg[t], _mm256_mul_ps(_mm256_set1_ps(xs[t * nb + b]), _mm256_cvtepi32_ps(c)));
            }
        }
        __m256 sc = _mm256_loadu_ps(scales + g * out + o);
        for (int t = 0; t < T; t++) yo[t] = _mm256_add_ps(yo[t], _mm256_mul_ps(sc, tg[t]));
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + t * out + o, yo[t]);
}

__attribute__((target("avx2"))) static void gemm_avx2(
    const uint32_t *xp, const float *xs, const int32_t *sx, const int32_t *qw, const uint8_t *zeros,
    const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, int64_t o0, int64_t o1, float *y) {
    int64_t nb = (in + QK_A8_BLOCK - 1) / QK_A8_BLOCK, words = 2 * (in / 8);
    for (int64_t o = o0; o + 8 <= o1; o += 8) {
        int64_t t = 0;
        for (; t + 4 <= m; t += 4)
            tile_avx2(4, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o, y + t * out);
        switch (m - t) {
            case 3: tile_avx2(3, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            case 2: tile_avx2(2, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            case 1: tile_avx2(1, xp + t * words, xs + t * nb, sx + t * nb, qw, zeros, scales, in, out, group, o,
                              y + t * out); break;
            default: break;
        }
    }
}
#endif

/* one call's work: m tokens, outputs split over the pool's parts in whole 16-output lines */
typedef struct {
    const void *xv;      /* GEMV on AVX2: the activation's maddubs pairs */
    const uint32_t *xp;  /* the tokens' quads (VNNI GEMV, every GEMM path) */
    const int8_t *xq;
    const float *xs;
    const int32_t *sx, *qw;
    const uint8_t *zeros;
    const float *scales;
    int64_t in, out, group, m;
    float *y;
    int isa;
} w4a8_job;

static void w4a8_part(void *arg, int part, int parts) {
    const w4a8_job *j = (const w4a8_job *)arg;
    int64_t chunk = ((j->out + parts - 1) / parts + 15) & ~(int64_t)15;
    int64_t o0 = part * chunk, o1 = o0 + chunk < j->out ? o0 + chunk : j->out;
    if (o0 >= o1) return;
    int64_t nb = (j->in + QK_A8_BLOCK - 1) / QK_A8_BLOCK;
#ifdef QK_X86
    if (j->m == 1 && j->isa != QK_ISA_SCALAR) {
        int64_t lane = j->isa == QK_ISA_VNNI ? 16 : 8, oe = o0 + ((o1 - o0) / lane) * lane;
        float *t = oe > o0 ? (float *)malloc((size_t)(oe - o0) * sizeof(float)) : NULL;
        if (t) {  /* out of memory: the scalar code below does all of it */
            if (j->isa == QK_ISA_VNNI)
                stream_vnni(j->xp, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, o0, oe, j->y, t);
            else
                stream_avx2((const __m256i *)j->xv, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out,
                            j->group, o0, oe, j->y, t);
            free(t);
            o0 = oe;
        }
        if (o0 >= o1) return;
    } else if (j->isa != QK_ISA_SCALAR) {
        int64_t lane = j->isa == QK_ISA_VNNI ? 16 : 8, oe = o0 + ((o1 - o0) / lane) * lane;
        if (j->isa == QK_ISA_VNNI)
            gemm_vnni(j->xp, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, j->m, o0, oe, j->y);
        else
            gemm_avx2(j->xp, j->xs, j->sx, j->qw, j->zeros, j->scales, j->in, j->out, j->group, j->m, o0, oe, j->y);
        o0 = oe;
        if (o0 >= o1) return;
    }
#endif
    for (int64_t t = 0; t < j->m; t++)
        gemv_scalar(j->xq + t * j->in, j->xs + t * nb, j->sx + t * nb, j->qw, j->zeros, j->scales, j->in, j->out,
                    j->group, o0, o1, j->y + t * j->out);
}

int qk_gemm_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, float *y, int isa,
                 int threads) {
    if (in <= 0 || out <= 0 || m <= 0 || in % 8 || group <= 0 || (group % QK_A8_BLOCK && group < in) ||
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
    /* one group per row that is not a multiple of 32: its blocks still start at 0, 32, ...; bpg counts them */
    int64_t g_eff = group % QK_A8_BLOCK ? nb * QK_A8_BLOCK : group;
    int32_t *sx = (int32_t *)malloc((size_t)(m * nb) * sizeof(int32_t));
    if (!sx) return QK_ENOMEM;
    for (int64_t t = 0; t < m; t++) qk_q8_block_sums(xq + t * in, in, sx + t * nb);
    void *xv = NULL;
    uint32_t *xp = NULL;
    int rc = QK_OK;
#ifdef QK_X86
    if (isa == QK_ISA_AVX2 && m == 1 && !(xv = pairs_avx2(xq, in))) rc = QK_ENOMEM;
#endif
    if (rc == QK_OK && isa != QK_ISA_SCALAR && !(isa == QK_ISA_AVX2 && m == 1)) {
        int64_t words = 2 * (in / 8);
        xp = (uint32_t *)malloc((size_t)(m * words) * sizeof(uint32_t) + 8);
        if (!xp) rc = QK_ENOMEM;
        for (int64_t t = 0; xp && t < m; t++) quads_into(xq + t * in, in, xp + t * words);
    }
    if (rc == QK_OK) {
        w4a8_job job = {xv, xp, xq, xs, sx, qweight, zeros, scales, in, out, g_eff, m, y, isa};
        int64_t lines = (out + 15) / 16;
        int parts = threads < lines ? threads : (int)lines;
        rc = qk_parallel(w4a8_part, &job, parts);
    }
    free(xv);
    free(xp);
    free(sx);
    return rc;
}

int qk_gemv_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, float *y, int isa, int threads) {
    return qk_gemm_w4a8(xq, xs, qweight, zeros, scales, in, out, group, 1, y, isa, threads);
}
