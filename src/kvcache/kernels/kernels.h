/* What the kernels (matmul.c, decode.c, kvquant.c) share. */
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
#if defined(__AVX512F__)
/* 16-float vectors for the one-row (decode) matmuls: quantized weights are widened to floats in half
 * the instructions (widening, not memory, sets their pace) */
#define KV_AVX512 1
#endif
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

/* Share `id` of `n` of [0, total), in runs aligned to `align`. */
static inline void kv_share(int id, int n, int total, int align, int *begin, int *end) {
    long units = (total + align - 1) / align;
    long b = units * id / n * align, e = units * (id + 1) / n * align;
    *begin = (int)(b < total ? b : total);
    *end = (int)(e < total ? e : total);
}

#ifdef KV_AVX2
static inline float kv_hsum(__m256 v) {  /* the sum of the 8 lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [sum of a's lanes, of b's, of c's, of d's]: four horizontal sums in three hadds, not four
 * shuffle-and-add chains */
static inline __m128 kv_hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  /* per 128-bit half: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* exp of 8 floats to within about 1 ulp of expf (x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor
 * polynomial to r^7 whose error is below 1e-8 relative, 2^n put into the exponent); inputs are
 * clamped to [-87.3, 88.3], so the results stay normal (exp of less than -87.3 gives 1.2e-38, not a
 * smaller or zero value). */
static inline __m256 kv_exp(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts (Cody-Waite) */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline __m256 kv_load_bf16(const uint16_t *p) {  /* 8 bfloat16 values widened to float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* values p[i .. i + 8) of a float32 or (bf16) bfloat16 array, as float32 */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *p, long i, const int bf16) {
    return bf16 ? kv_load_bf16((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}
#endif

#ifdef KV_AVX512
static inline __m256 kv_fold16(__m512 v) {  /* 16 lanes folded to 8: the two halves added */
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

static inline __m512 kv_load_bf16_16(const uint16_t *p) {  /* 16 bfloat16 values widened to float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* values p[i .. i + 16) of a float32 or (bf16) bfloat16 array, as float32 */
static inline __attribute__((always_inline)) __m512 kv_load16(const void *p, long i, const int bf16) {
    return bf16 ? kv_load_bf16_16((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}
#endif

/* fp16 -> float32, as torch's .float() */
static inline float half_to_float(uint16_t h) {
#ifdef KV_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

static inline float dot(const float *a, const float *b, int size) {  /* a . b */
    float sum = 0.0f;
    int k = 0;
#ifdef KV_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= size; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    sum = kv_hsum(acc);
#endif
    for (; k < size; k++) sum += a[k] * b[k];
    return sum;
}

static inline void axpy(float *y, float a, const float *x, int size) {  /* y += a * x */
    int k = 0;
#ifdef KV_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; k + 8 <= size; k += 8)
        _mm256_storeu_ps(y + k, _mm256_add_ps(_mm256_loadu_ps(y + k), _mm256_mul_ps(va, _mm256_loadu_ps(x + k))));
#endif
    for (; k < size; k++) y[k] += a * x[k];
}

KV_HIDDEN range_fn kv_range_fn(int fmt);                               /* NULL for an unknown format */
KV_HIDDEN void kv_block_sums(const float *x, int M, int K, float *out); /* [M, K/32] */
/* row n of a [N, K] weight in any format above, as float32 values (out [K]; K a multiple of 32 for
 * Q8_0 and Q4_1, as the formats themselves require) */
KV_HIDDEN void kv_widen_row(int fmt, int K, const void *w, const uint16_t *d, const uint16_t *mn, long n, float *out);

#endif
