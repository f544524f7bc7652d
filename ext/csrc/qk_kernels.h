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
enum { QK_ISA_SCALAR = 0, QK_ISA_AVX2 = 1 };
enum { QK_OK = 0, QK_ENOMEM = -1, QK_EARG = -2 };

int qk_cpu_has_avx2(void);
int qk_cpu_has_popcnt(void);
int qk_cpu_has_fma(void);

/* one query against n rows of d elements: out[i] = <q, X[i]> or ||q - X[i]||^2 */
int qk_dot_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa);
int qk_l2_1xn(int tq, int tr, const void *q, const void *X, int64_t n, int64_t d, int32_t *out, int isa);
/* nx queries against ny rows, out is nx x ny row-major, computed in blocks of rows of Y */
int qk_dot_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa);
int qk_l2_mxn(int tq, int tr, const void *X, int64_t nx, const void *Y, int64_t ny, int64_t d, int32_t *out, int isa);

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
#endif
