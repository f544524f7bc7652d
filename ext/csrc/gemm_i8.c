/* Many-against-many int8 / uint8 dot products and squared L2 distances on AVX-512 VNNI (vpdpbusd), exact.
 *
 * vpdpbusd multiplies unsigned bytes by signed bytes, four pairs per int32 lane, 64 pairs per instruction,
 * two instructions per cycle: 128 byte products per cycle against 32 float32 FMAs for a float GEMM. Every
 * operand pair is brought to (unsigned, signed) by an offset of 128 and the offsets are taken back out
 * exactly, with per-row sums (the identity below); the sums are formed in wrapping 32-bit arithmetic, so an
 * intermediate that passes 2^31 still yields the exact result whenever the result fits in int32, which the
 * caller's bound on d guarantees (qkit.ext.max_dim).
 *
 *   x = a - 128 sx   (a = x + 128 when X is int8, sx = 1; a = x when X is uint8, sx = 0)
 *   y = b + 128 uy   (b = y - 128 when Y is uint8, uy = 1; b = y when Y is int8, uy = 0)
 *   x . y = a . b + 128 uy sum(a) - 128 sx sum(b) - 128^2 sx uy d
 *   |x - y|^2 = |x|^2 + |y|^2 - 2 x . y
 *
 * Layout: X rows are turned into a (padded to whole quadruples with zeros, which add nothing); Y is taken 32
 * rows at a time into a panel of (d4, 32, 4) bytes of b, the four consecutive bytes of each row that one
 * vpdpbusd lane needs, and the panel (4 KB at d = 128) stays in L1 while every tile of 4 X rows runs
 * against it: 8 accumulators of 16 outputs, one broadcast of 4 bytes of a row per 2 vpdpbusd. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qk_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define QK_PANEL 32  /* Y rows per panel: two zmm of int32 outputs */
#define QK_TILE 4    /* X rows per tile */

/* 16 consecutive outputs of one X row; `mask` keeps the ones that exist */
typedef struct {
    const int32_t *sa;  /* per X row: sum(a) */
    const int32_t *sb;  /* per Y row: sum(b) */
    const int32_t *nx2, *ny2; /* l2: per row |x|^2, |y|^2 */
    int sx, uy, l2;
    int64_t d;
} epi_t;

__attribute__((target("avx512f"))) static inline void store16(int32_t *out, __m512i acc, int64_t i, int64_t j,
                                                              const epi_t *e, __mmask16 mask) {
    /* wrapping int32: _mm512_add/sub/slli wrap, as the identity needs */
    __m512i v = acc;
    if (e->uy) v = _mm512_add_epi32(v, _mm512_slli_epi32(_mm512_set1_epi32(e->sa[i]), 7));
    if (e->sx) {
        __m512i sb = _mm512_maskz_loadu_epi32(mask, e->sb + j);
        v = _mm512_sub_epi32(v, _mm512_slli_epi32(sb, 7));
    }
    if (e->sx && e->uy) v = _mm512_sub_epi32(v, _mm512_set1_epi32((int32_t)((uint32_t)e->d * 16384u)));
    if (e->l2) {
        __m512i y2 = _mm512_maskz_loadu_epi32(mask, e->ny2 + j);
        v = _mm512_sub_epi32(_mm512_add_epi32(_mm512_set1_epi32(e->nx2[i]), y2), _mm512_slli_epi32(v, 1));
    }
    _mm512_mask_storeu_epi32(out, mask, v);
}

/* rows i0 .. i0 + T - 1 of A (u8, d4 quadruples each) against one panel: out[i, j0 .. j0 + nj - 1] */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void tile(
    const int T, const uint8_t *A, int64_t i0, int64_t d4, const uint8_t *panel, int64_t j0, int64_t nj,
    int32_t *out, int64_t ny, const epi_t *e) {
    __m512i acc[QK_TILE][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    const uint8_t *a = A + i0 * d4 * 4;
    for (int64_t k = 0; k < d4; k++) {
        __m512i b0 = _mm512_loadu_si512((const void *)(panel + k * QK_PANEL * 4));
        __m512i b1 = _mm512_loadu_si512((const void *)(panel + k * QK_PANEL * 4 + 64));
        for (int t = 0; t < T; t++) {
            int32_t q;
            memcpy(&q, a + (t * d4 + k) * 4, 4);
            __m512i x = _mm512_set1_epi32(q);
            acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], x, b0);
            acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], x, b1);
        }
    }
    __mmask16 m0 = nj >= 16 ? 0xFFFF : (__mmask16)((1u << nj) - 1);
    __mmask16 m1 = nj >= 32 ? 0xFFFF : nj > 16 ? (__mmask16)((1u << (nj - 16)) - 1) : 0;
    for (int t = 0; t < T; t++) {
        int32_t *o = out + (i0 + t) * ny + j0;
        store16(o, acc[t][0], i0 + t, j0, e, m0);
        if (m1) store16(o + 16, acc[t][1], i0 + t, j0 + 16, e, m1);
    }
}

/* rows of n vectors of d bytes -> n * d4 quadruples of bytes, each byte xor `flip` (0x80 turns int8 into
 * int8 + 128 as uint8), zero padding; the sums of the new bytes as unsigned */
static void prepare(const uint8_t *src, int64_t n, int64_t d, int64_t d4, uint8_t flip, uint8_t *dst,
                    int32_t *sums) {
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *s = src + i * d;
        uint8_t *o = dst + i * d4 * 4;
        uint32_t sum = 0;
        for (int64_t k = 0; k < d; k++) {
            uint8_t v = s[k] ^ flip;
            o[k] = v;
            sum += (uint32_t)v;
        }
        memset(o + d, 0, (size_t)(d4 * 4 - d));
        sums[i] = (int32_t)sum;
    }
}

/* sums of the rows' bytes after the flip, read as int8 (the b operand) */
static void row_sums(const uint8_t *src, int64_t n, int64_t d, uint8_t flip, int32_t *sums) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t sum = 0;
        for (int64_t k = 0; k < d; k++) sum += (uint32_t)(int32_t)(int8_t)(src[i * d + k] ^ flip);
        sums[i] = (int32_t)sum;
    }
}

static void squares(const uint8_t *src, int64_t n, int64_t d, int is_signed, int32_t *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t s = 0;
        for (int64_t k = 0; k < d; k++) {
            int32_t v = is_signed ? (int32_t)(int8_t)src[i * d + k] : (int32_t)src[i * d + k];
            s += (uint32_t)(v * v);
        }
        out[i] = (int32_t)s;
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void run(
    const uint8_t *A, int64_t nx, const uint8_t *Y, int64_t ny, int64_t d, int64_t d4, uint8_t flip,
    int32_t *out, const epi_t *e, uint8_t *panel) {
    const uint32_t flip4 = 0x01010101u * flip;
    for (int64_t j0 = 0; j0 < ny; j0 += QK_PANEL) {
        int64_t nj = ny - j0 < QK_PANEL ? ny - j0 : QK_PANEL;
        /* panel[k][r][0..3] = bytes 4k..4k+3 of Y row j0 + r, flipped; missing rows and bytes are zeros */
        memset(panel, 0, (size_t)(d4 * QK_PANEL * 4));
        for (int64_t r = 0; r < nj; r++) {
            const uint8_t *row = Y + (j0 + r) * d;
            int64_t k = 0;
            for (; 4 * k + 4 <= d; k++) {
                uint32_t w;
                memcpy(&w, row + 4 * k, 4);
                w ^= flip4;
                memcpy(panel + (k * QK_PANEL + r) * 4, &w, 4);
            }
            for (int64_t c = 4 * k; c < d; c++) panel[(k * QK_PANEL + r) * 4 + (c - 4 * k)] = row[c] ^ flip;
        }
        int64_t i = 0;
        for (; i + QK_TILE <= nx; i += QK_TILE) tile(QK_TILE, A, i, d4, panel, j0, nj, out, ny, e);
        switch (nx - i) {
            case 3: tile(3, A, i, d4, panel, j0, nj, out, ny, e); break;
            case 2: tile(2, A, i, d4, panel, j0, nj, out, ny, e); break;
            case 1: tile(1, A, i, d4, panel, j0, nj, out, ny, e); break;
            default: break;
        }
    }
}

int qk_mxn_vnni(int op, int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d,
                int32_t *out) {
    if (!qk_cpu_has_avx512vnni() || (op != 0 && op != 1) || (tq != QK_I8 && tq != QK_U8) ||
        (tr != QK_I8 && tr != QK_U8) || nx < 0 || ny < 0 || d < 0)
        return QK_EARG;
    if (nx == 0 || ny == 0) return QK_OK;
    int64_t d4 = (d + 3) / 4;
    epi_t e = {0};
    e.sx = tq == QK_I8;
    e.uy = tr == QK_U8;
    e.l2 = op == 1;
    e.d = d;
    uint8_t *A = (uint8_t *)malloc((size_t)(nx * d4 * 4) + 1);
    uint8_t *panel = (uint8_t *)malloc((size_t)(d4 * QK_PANEL * 4) + 64);
    int32_t *sums = (int32_t *)malloc((size_t)(nx + ny) * sizeof(int32_t) * (e.l2 ? 2 : 1) + 4);
    int rc = QK_OK;
    if (!A || !panel || !sums) {
        rc = QK_ENOMEM;
    } else {
        int32_t *sa = sums, *sb = sums + nx;
        prepare((const uint8_t *)X, nx, d, d4, e.sx ? 0x80 : 0, A, sa);
        row_sums((const uint8_t *)Y, ny, d, e.uy ? 0x80 : 0, sb);
        e.sa = sa;
        e.sb = sb;
        if (e.l2) {
            int32_t *nx2 = sums + nx + ny, *ny2 = nx2 + nx;
            squares((const uint8_t *)X, nx, d, tq == QK_I8, nx2);
            squares((const uint8_t *)Y, ny, d, tr == QK_I8, ny2);
            e.nx2 = nx2;
            e.ny2 = ny2;
        }
        run(A, nx, (const uint8_t *)Y, ny, d, d4, e.uy ? 0x80 : 0, out, &e, panel);
    }
    free(A);
    free(panel);
    free(sums);
    return rc;
}
#else
int qk_mxn_vnni(int op, int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d,
                int32_t *out) {
    (void)op; (void)tq; (void)tr; (void)X; (void)nx; (void)Y; (void)ny; (void)d; (void)out;
    return QK_EARG;
}
#endif
