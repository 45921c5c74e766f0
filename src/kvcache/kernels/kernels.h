/* What matmul.c and decode.c share. */
#ifndef KVCACHE_KERNELS_H
#define KVCACHE_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KV_AVX2 1
#endif

#define KV_HIDDEN __attribute__((visibility("hidden")))

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_Q8_0 = 2, FMT_Q4_1 = 3 };
#define QBLOCK 32

/* One matmul: y[M, N] = x[M, K] @ W^T (+ bias); the range functions compute y[:, begin:end]. */
typedef struct {
    int fmt, M, N, K;
    const float *x;        /* [M, K] float32 */
    const float *xsum;     /* [M, K/32]: each block's sum of x (Q4_1's minimum term) */
    const void *w;
    const uint16_t *d, *mn;
    const float *bias;     /* [N] or NULL */
    float *y;              /* [M, N] */
} job_t;

typedef void (*range_fn)(const void *job, int begin, int end);

KV_HIDDEN range_fn kv_range_fn(int fmt);                               /* NULL for an unknown format */
KV_HIDDEN void kv_block_sums(const float *x, int M, int K, float *out); /* [M, K/32] */

#endif
