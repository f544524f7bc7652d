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
#endif
