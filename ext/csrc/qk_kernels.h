/* qkit compiled kernels: C entry points called from ext/_kernels.pyx.
 *
 * Element types are passed as codes so that one entry point serves every
 * (query, rows) pair of int8/uint8 operands; results are int32.
 * isa: QK_ISA_SCALAR (portable C) or QK_ISA_AVX2 (intrinsics in functions
 * compiled with __attribute__((target("avx2"))), chosen at run time).
 * Callers guarantee d is small enough that no int32 sum can overflow
 * (the Python layer checks d against qkit.ext.max_dim). */
#ifndef QK_KERNELS_H
#define QK_KERNELS_H
#include <stdint.h>

enum { QK_I8 = 0, QK_U8 = 1 };
enum { QK_ISA_SCALAR = 0, QK_ISA_AVX2 = 1, QK_ISA_VNNI = 2 };  /* VNNI: AVX-512 VNNI (the A8 kernels, dot_many) */
enum { QK_OK = 0, QK_ENOMEM = -1, QK_EARG = -2 };

int qk_cpu_has_avx2(void);
int qk_cpu_has_popcnt(void);
int qk_cpu_has_fma(void);
int qk_cpu_has_avx512vnni(void); /* avx512f + avx512bw + avx512vnni */

/* one query against n rows of d elements: out[i] = <q, X[i]> or ||q - X[i]||^2 */
int qk_dot_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa);
int qk_l2_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa);
/* nx queries against ny rows, out is nx x ny row-major, computed in blocks of rows of Y */
int qk_dot_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa);
int qk_l2_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa);
/* the many-against-many pair on AVX-512 VNNI (gemm_i8.c), exact; op 0 = dot, 1 = l2 */
int qk_mxn_vnni(int op, int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d,
                int32_t *out);

/* ---- low-bit kernels (kernels_lowbit.c) ---------------------------------
 * int4: rows of ceil(d/2) bytes, code 2k in the low nibble of byte k, code
 * 2k+1 in the high nibble; is_signed: nibbles are two's complement (-8..7),
 * else unsigned (0..15). A padding nibble (odd d) is ignored. */
int qk_int4_i8(int op, const int8_t *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed,
               int32_t *out, int isa);
int qk_int4_f32(int op, const float *q, const uint8_t *codes, int64_t n, int64_t d, int is_signed,
                float *out, int isa);
/* 1-bit: rows of nbytes bytes (bit i in byte i/8 at position i%8). */
int qk_hamming(const uint8_t *q, const uint8_t *codes, int64_t n, int64_t nbytes, int32_t *out, int isa);
/* sum_j 2^j popcount(code & plane_j) over B query bit planes of nbytes each */
int qk_and_popcount(const uint8_t *planes, int64_t B, const uint8_t *codes, int64_t n, int64_t nbytes,
                    int32_t *out, int isa);
/* FastScan: lut (M, 16) uint8; codes in blocks of 32 vectors, (nblocks, M, 16):
 * byte k of sub-space m of block b = code[32b+k][m] | code[32b+16+k][m] << 4. */
int qk_fastscan(const uint8_t *lut, int64_t M, const uint8_t *codes, int64_t n, int32_t *out, int isa);
enum { QK_OP_DOT = 0, QK_OP_L2 = 1 };

/* ---- W4A8 (kernels_w4a8.c): GPTQ-packed int4 weights (qweight int32 (in/8, out), nibble j of word [k][o] =
 * input 8k+j) against int8 activations quantized per block of QK_A8_BLOCK inputs (q8_0's rule). */
#define QK_A8_BLOCK 32
/* Decode streams: software prefetch of the next block's word rows (4 rows ahead at 4 bits, 8 at 8) while a
 * block is swept. A block's rows lie 4 * out bytes apart and are short for the narrow linears, which the
 * hardware prefetchers follow poorly: on the 2-core Xeon here the W4 decode walk of SmolLM2-135M's decoder
 * (57 MB) went from 4.4 ms to 2.5 ms. Measured at 4, 8, 16 and 32 rows ahead: one block was best. Only when a
 * block's bytes for the part fit in L1 (QK_PF_MAX_BYTES): for the 49152-wide head the next block is 1.5 MB
 * away, the line is evicted before its use, and the prefetches halved its speed (the long rows are what the
 * hardware prefetcher follows well). A prefetch past the end of an array does not fault. */
#define QK_PF_W4 (QK_A8_BLOCK * 4 / 32)
#define QK_PF_W8 (QK_A8_BLOCK * 8 / 32)
#define QK_PF_MAX_BYTES (32 * 1024)
#define QK_PF_ON(rows, o0, o1) ((int64_t)(rows) * ((o1) - (o0)) * 4 <= QK_PF_MAX_BYTES)
/* xq (n), xs (ceil(n/32)): llama.cpp's quantize_row_q8_0_ref with a float32 scale (d = max|x| / 127 per block,
 * q = roundf(x * (1 / d))); the caller checks x is finite */
void qk_quantize_q8(const float *x, int64_t n, int8_t *xq, float *xs);
/* acc (ceil(in/32), out): exact int32 block sums sum_{i in b} q[o][i] * xq[i] */
int qk_w4a8_blocks(const int8_t *xq, const int32_t *qweight, int64_t in, int64_t out, int32_t *acc, int isa);
/* y (out) = sum_g scale[g][o] sum_{b in g} xs[b] (acc[b][o] - zero[g][o] sum_{i in b} xq[i]); zeros uint8 and
 * scales float32 (ceil(in/group), out); group % 32 == 0 or group >= in (one group per row); outputs split
 * over `threads` POSIX threads (the caller is one), each on whole 16-output lines */
int qk_gemv_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, float *y, int isa, int threads);
/* the same for m tokens at once (prefill): xq (m, in), xs (m, ceil(in/32)), y (m, out); each weight line is
 * read once per call and serves every token (tiles of 4 tokens); per token the integers and float order are
 * the GEMV's */
int qk_gemm_w4a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, float *y, int isa,
                 int threads);
/* W8A8 (kernels_w8a8.c): GPTQ's 8-bit qweight int32 (in/4, out), byte j of word [k][o] = input 4k+j; zeros
 * uint8, scales float32 (ceil(in/group), out); the same sums and float order as W4A8 */
int qk_gemm_w8a8(const int8_t *xq, const float *xs, const int32_t *qweight, const uint8_t *zeros,
                 const float *scales, int64_t in, int64_t out, int64_t group, int64_t m, float *y, int isa,
                 int threads);
/* sx[b] = sum of the int8 codes of block b (32 inputs; the last may be shorter) */
void qk_q8_block_sums(const int8_t *xq, int64_t in, int32_t *sx);
#define QK_MAX_THREADS 256

/* ---- the runtime's thread pool (pool.c): fn(ctx, part, parts) for part = 0 .. parts - 1, part 0 on the
 * caller, the others on persistent workers that spin briefly and then sleep (no long busy-wait) */
typedef void (*qk_task_fn)(void *ctx, int part, int parts);
int qk_parallel(qk_task_fn fn, void *ctx, int parts);
int qk_pool_threads(void);
void qk_pool_set_spin_us(long us);  /* how long an idle worker (and a waiting caller) spins before sleeping */
long qk_pool_spin_us(void);
#endif
