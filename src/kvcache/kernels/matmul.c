/* kvcache's CPU matmul: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W kept in its storage format.
 *
 * Formats of W (row-major, K contiguous; "block" = 32 consecutive values of a row):
 *   F32   w float32 [N, K]
 *   BF16  w uint16  [N, K]                      (the upper half of a float32)
 *   Q8_0  w int8    [N, K],   d fp16 [N, K/32]  value = d * q
 *   Q4_1  w uint8   [N, K/2], d, m fp16 [N, K/32]; a block's 16 bytes hold values 0..15 in their
 *         low nibbles and 16..31 in their high nibbles (GGUF's order); value = d * q + m
 *
 * Activations stay float32 for every format: a quantized block is widened in registers and
 * multiplied in float32, y += d * sum(q * x) + m * sum(x). (llama.cpp instead rounds activations
 * to int8 per block and takes integer dot products, which is cheaper, but one rounding step
 * flipped by float noise moved SmolLM2's logits by up to 1.0, so a decode step and a prefill of
 * the same tokens no longer agreed and cached generation stopped matching recomputation.)
 * This equals PyTorch's float32 product with the dequantized matrix to float32 rounding.
 *
 * Work is split over output rows on torch's OpenMP team (see parallel_for). Built by
 * kvcache.kernels with the machine's C compiler at first use; never required.
 */
#include "kernels.h"


static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f;
}

/* ---------------------------------------------------------------------------------------------
 * Threads: OpenMP. Loaded into a process that has imported torch, this library shares torch's own
 * OpenMP runtime (the same libgomp.so.1), so its parallel regions run on torch's thread team with
 * torch's wait policy: no second team competing for the cores. (A pool of our own, tried first,
 * lost whole scheduler time slices whenever its threads and torch's met on one core.)
 */
/* Run fn over [0, total) split into nthreads shares aligned to `align`. */
static void parallel_for(range_fn fn, const void *job, int total, int align, int nthreads) {
#ifdef _OPENMP
    if (nthreads > 1 && total > align) {
        #pragma omp parallel num_threads(nthreads)
        {
            int begin, end;
            kv_share(omp_get_thread_num(), omp_get_num_threads(), total, align, &begin, &end);
            if (begin < end) fn(job, begin, end);
        }
        return;
    }
#endif
    (void)nthreads; (void)align;
    fn(job, 0, total);
}

/* ---------------------------------------------------------------------------------------------
 * The job: one matmul. Each range function computes y[:, begin:end].
 */

static inline void store(const job_t *j, int m, int n, float v) {
    j->y[(long)m * j->N + n] = v + (j->bias ? j->bias[n] : 0.0f);
}

static inline void prefetch(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#endif
}

/* One activation row (decode). A thread's weight rows lie in one contiguous share; read front to
 * back as one stream, a core keeps too few reads in flight to fill its share of the memory
 * bandwidth (the hardware prefetcher runs only so far ahead of a stream). So the share is cut into
 * STREAMS parts read side by side: rows i, i + q, i + 2q, i + 3q of it at once (q a quarter of it),
 * the rows left over one at a time. On an AVX2 EPYC this read 425 MB of SmolLM2 layer weights at
 * 1.13-1.3x the rate of one stream per thread, and faster than a one-stream sum of the same bytes.
 * A software prefetch a kilobyte ahead made float32 steps 9% slower there and is not used.
 * Every row's dot product is the same arithmetic however the rows are grouped (see float_rows and
 * quant_rows), so results do not depend on the split. With AVX-512 the rows take vectors of 16
 * floats: bfloat16 and quantized weights are widened to floats in half the instructions (on a
 * 2-core AVX-512 Xeon, decode steps 1.03-1.07x faster on float32, Q8_0 and Q4_1 weights). A row
 * computed alone (M = 1) and among others (the tiles below, 8 floats wide) are not the same
 * arithmetic, so they may differ in the last bits. */
#define STREAMS 4

static inline __attribute__((always_inline)) float weight_at(const void *w, long i, const int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* The vectors of a decode row: 16 floats with AVX-512, else 8. */
#if defined(KV_AVX512)
typedef __m512 rowvec_t;
#define RV 16
#define RV_ZERO _mm512_setzero_ps
#define RV_LOAD _mm512_loadu_ps
#define RV_FMA _mm512_fmadd_ps
#define RV_SUM(v) _mm512_reduce_add_ps(v)
#define RV_ADD _mm512_add_ps
#define row_weights kv_load16
#elif defined(KV_AVX2)
typedef __m256 rowvec_t;
#define RV 8
#define RV_ZERO _mm256_setzero_ps
#define RV_LOAD _mm256_loadu_ps
#define RV_FMA _mm256_fmadd_ps
#define RV_SUM(v) kv_hsum(v)
#define RV_ADD _mm256_add_ps
#define row_weights kv_load8
#endif

/* y[0, n + s * q] for s < S (S a constant 1..4). Two accumulators over 2 * RV values at a time,
 * then the tail. */
static inline __attribute__((always_inline))
void float_rows(const job_t *j, int n, long q, const int S, const int bf16) {
    int K = j->K;
    const float *x = j->x;
    long size = bf16 ? 2 : 4;
    const char *w0 = (const char *)j->w + (long)n * K * size, *w1 = w0 + q * K * size;
    const char *w2 = w1 + q * K * size, *w3 = w2 + q * K * size;
    float sums[4] = {0};
    int k = 0;
#ifdef KV_AVX2
    rowvec_t a0 = RV_ZERO(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; k + 2 * RV <= K; k += 2 * RV) {
        rowvec_t lo = RV_LOAD(x + k), hi = RV_LOAD(x + k + RV);
#define STREAM(s) if (S > s) { a##s = RV_FMA(row_weights(w##s, k, bf16), lo, a##s);  \
                               b##s = RV_FMA(row_weights(w##s, k + RV, bf16), hi, b##s); }
        STREAM(0) STREAM(1) STREAM(2) STREAM(3)
#undef STREAM
    }
#define SUM(s) if (S > s) sums[s] = RV_SUM(RV_ADD(a##s, b##s));
    SUM(0) SUM(1) SUM(2) SUM(3)
#undef SUM
#endif
    const char *w[4] = {w0, w1, w2, w3};
    for (int s = 0; s < S; s++) {
        float tail = 0.0f;
        for (int t = k; t < K; t++) tail += weight_at(w[s], t, bf16) * x[t];
        store(j, 0, n + s * (int)q, sums[s] + tail);
    }
}

static inline __attribute__((always_inline)) void float_row_range(const job_t *j, int begin, int end, const int bf16) {
    int q = (end - begin) / STREAMS;
    for (int i = 0; i < q; i++) float_rows(j, begin + i, q, STREAMS, bf16);
    for (int n = begin + STREAMS * q; n < end; n++) float_rows(j, n, 0, 1, bf16);
}

/* Several activation rows (speculative verification, short prefill): two weight rows times up to
 * six activation rows per register block, each weight vector loaded once for all of them (12
 * accumulators, two weight vectors and one activation vector: 15 of AVX2's 16 registers; named
 * variables, as arrays of vectors were kept in memory by the compiler). The two weight rows come
 * from the two halves of the thread's share, two streams read side by side (see STREAMS). More
 * than six rows take passes of six over the two weight rows, which then come from L1; each pass
 * prefetches its share of each stream's next row, so memory keeps streaming while the passes
 * compute. A share of odd length ends with a block of one weight row (the second repeats it,
 * computed, not stored). */

/* Rows m0 .. m0 + MR - 1 of y[:, n0] and, unless n1 < 0, y[:, n1] (MR a constant 1..6); pass
 * `pass` of `passes`. */
static inline __attribute__((always_inline))
void float_block(const job_t *j, int n0, int n1, int m0, int pass, int passes, const int MR, const int bf16) {
    int K = j->K;
    long size = bf16 ? 2 : 4, row = (long)K * size;
    const char *w0 = (const char *)j->w + n0 * row;
    const char *w1 = n1 >= 0 ? (const char *)j->w + n1 * row : w0;
    const char *next0 = n0 + 1 < j->N ? w0 + row : w0, *next1 = n1 >= 0 && n1 + 1 < j->N ? w1 + row : w0;
    const float *x[6];
    for (int m = 0; m < 6; m++) x[m] = j->x + (long)(m0 + (m < MR ? m : 0)) * K;
    float sums[2][6] = {{0}};
    int k = 0;
#ifdef KV_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    long ahead = (long)pass * row / passes, step = 8 * size / passes;  /* this pass's share of each next row */
    for (; k + 8 <= K; k += 8, ahead += step) {
        prefetch(next0 + ahead);
        prefetch(next1 + ahead);
        __m256 u = kv_load8(w0, k, bf16), v = kv_load8(w1, k, bf16), xv;
/* (the empty asm keeps xv in a register: folded into both multiply-adds as a memory operand, the
 * activation was loaded twice, and AMD's two vector loads a cycle, not its multiply-adds, set the pace) */
#define ROW(i) if (MR > i) { xv = _mm256_loadu_ps(x[i] + k); __asm__("" : "+x"(xv));                    \
                             a##i = _mm256_fmadd_ps(u, xv, a##i); b##i = _mm256_fmadd_ps(v, xv, b##i); }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define SUM(i) if (MR > i) { sums[0][i] = kv_hsum(a##i); sums[1][i] = kv_hsum(b##i); }
    SUM(0) SUM(1) SUM(2) SUM(3) SUM(4) SUM(5)
#undef SUM
#else
    (void)pass; (void)passes; (void)next0; (void)next1;
#endif
    for (; k < K; k++)
        for (int m = 0; m < MR; m++) {
            sums[0][m] += weight_at(w0, k, bf16) * x[m][k];
            sums[1][m] += weight_at(w1, k, bf16) * x[m][k];
        }
    for (int m = 0; m < MR; m++) {
        store(j, m0 + m, n0, sums[0][m]);
        if (n1 >= 0) store(j, m0 + m, n1, sums[1][m]);
    }
}

static inline __attribute__((always_inline)) void float_tile(const job_t *j, int begin, int end, const int bf16) {
    int passes = (j->M + 5) / 6, half = (end - begin) / 2;
    for (int i = 0; i < half + (end - begin) % 2; i++) {
        int n0 = i < half ? begin + i : end - 1, n1 = i < half ? begin + half + i : -1;
        for (int pass = 0; pass < passes; pass++) {
            int m0 = 6 * pass, rows = j->M - m0 < 6 ? j->M - m0 : 6;
            switch (rows) {
            case 1: float_block(j, n0, n1, m0, pass, passes, 1, bf16); break;
            case 2: float_block(j, n0, n1, m0, pass, passes, 2, bf16); break;
            case 3: float_block(j, n0, n1, m0, pass, passes, 3, bf16); break;
            case 4: float_block(j, n0, n1, m0, pass, passes, 4, bf16); break;
            case 5: float_block(j, n0, n1, m0, pass, passes, 5, bf16); break;
            default: float_block(j, n0, n1, m0, pass, passes, 6, bf16); break;
            }
        }
    }
}

static void f32_range(const void *arg, int begin, int end) {
    const job_t *j = arg;
    if (j->M == 1) float_row_range(j, begin, end, 0); else float_tile(j, begin, end, 0);
}

static void bf16_range(const void *arg, int begin, int end) {
    const job_t *j = arg;
    if (j->M == 1) float_row_range(j, begin, end, 1); else float_tile(j, begin, end, 1);
}

/* Quantized rows. A block's 32 values are widened to four vectors of 8 floats. */
#ifdef KV_AVX2
static inline void widen_q8(const uint8_t *q, __m256 v[4]) {
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}

static inline void widen_q4(const uint8_t *q, __m256 v[4]) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

static inline float quant_value(const uint8_t *q, int q4, int i) {  /* block value i, before scaling */
    if (!q4) return (float)(int8_t)q[i];
    return (float)(i < 16 ? q[i] & 15 : q[i - 16] >> 4);
}

#ifdef KV_AVX2
/* A block's 32 weights (before scaling) times its 32 activations: 8 partial sums. */
static inline __attribute__((always_inline)) __m256 block_dot(const uint8_t *q, const float *x, const int q4) {
    __m256 v[4];
    if (q4) widen_q4(q, v); else widen_q8(q, v);
    __m256 a = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(v[0], _mm256_loadu_ps(x)));
    __m256 b = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(v[2], _mm256_loadu_ps(x + 16)));
    return _mm256_add_ps(a, b);
}
#endif

#ifdef KV_AVX512
/* The same with 16-float vectors, the block's scale d folded in: 16 partial sums of d * q * x.
 * Q8_0's bytes are widened to floats, their products summed and scaled; Q4_1's nibbles index a
 * table of d * 0 .. d * 15 (vpermps takes the low 4 bits of each index, so a byte's low nibble needs
 * no mask), which skips the int-to-float conversions and the scaling. */
static inline __attribute__((always_inline))
__m512 block_dot16(const uint8_t *q, const float *x, const int q4, float d, __m512 acc) {
    if (q4) {
        const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512 table = _mm512_mul_ps(_mm512_set1_ps(d), levels);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        __m512 v0 = _mm512_permutexvar_ps(bytes, table);
        __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        return _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + 16), _mm512_fmadd_ps(v0, _mm512_loadu_ps(x), acc));
    }
    __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    __m512 v1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    __m512 dot = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(v0, _mm512_loadu_ps(x)));
    return _mm512_fmadd_ps(dot, _mm512_set1_ps(d), acc);
}
#endif

/* One activation row: y[0, n + s * q] = sum_b d_b * (q_b . x_b) + m_b * xsum_b for s < S (S a
 * constant 1..4), the S rows' bytes read side by side as float_rows reads them (see STREAMS).
 * Inlined into one copy per format, so the inner loop has no format test. */
static inline __attribute__((always_inline)) void quant_rows(const job_t *j, int n, long q, const int S, const int q4) {
    int K = j->K, blocks = K / QBLOCK, bb = q4 ? 16 : 32;
    const float *x = j->x, *xsum = j->xsum;
#ifdef KV_AVX2
    const uint8_t *w0 = (const uint8_t *)j->w + (long)n * blocks * bb, *w1 = w0 + q * blocks * bb;
    const uint8_t *w2 = w1 + q * blocks * bb, *w3 = w2 + q * blocks * bb;
    const uint16_t *d0 = j->d + (long)n * blocks, *d1 = d0 + q * blocks, *d2 = d1 + q * blocks, *d3 = d2 + q * blocks;
    const uint16_t *m0 = q4 ? j->mn + (long)n * blocks : NULL, *m1 = q4 ? m0 + q * blocks : NULL;
    const uint16_t *m2 = q4 ? m1 + q * blocks : NULL, *m3 = q4 ? m2 + q * blocks : NULL;
#ifdef KV_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define DOT_SCALED(w, x, s, acc) block_dot16(w, x, q4, s, acc)
#define FOLD(a) kv_fold16(a)
#else
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define DOT_SCALED(w, x, s, acc) _mm256_fmadd_ps(block_dot(w, x, q4), _mm256_set1_ps(s), acc)
#define FOLD(a) (a)
#endif
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
    int b = 0;
    for (; b + 8 <= blocks; b += 8) {
        float scale[4][8];
        __m256 xs = q4 ? _mm256_loadu_ps(xsum + b) : c0;
#define SCALES(s) if (S > s) {                                                                       \
            _mm256_storeu_ps(scale[s], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d##s + b)))); \
            if (q4) c##s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m##s + b))), xs, c##s); }
        SCALES(0) SCALES(1) SCALES(2) SCALES(3)
#undef SCALES
        for (int i = 0; i < 8; i++) {
#define BLOCK(s) if (S > s) a##s = DOT_SCALED(w##s + (long)(b + i) * bb, x + (b + i) * QBLOCK, scale[s][i], a##s);
            BLOCK(0) BLOCK(1) BLOCK(2) BLOCK(3)
#undef BLOCK
        }
    }
    for (; b < blocks; b++) {
#define BLOCK(s) if (S > s) {                                                                        \
            a##s = DOT_SCALED(w##s + (long)b * bb, x + b * QBLOCK, half_to_float(d##s[b]), a##s);   \
            if (q4) t##s += half_to_float(m##s[b]) * xsum[b]; }
        BLOCK(0) BLOCK(1) BLOCK(2) BLOCK(3)
#undef BLOCK
    }
#undef DOT_SCALED
#define STORE(s) if (S > s) store(j, 0, n + s * (int)q, t##s + kv_hsum(_mm256_add_ps(FOLD(a##s), c##s)));
    STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
#undef FOLD
#else
    for (int s = 0; s < S; s++) {
        long row = n + s * q;
        const uint8_t *w = (const uint8_t *)j->w + row * blocks * bb;
        const uint16_t *d = j->d + row * blocks, *mn = q4 ? j->mn + row * blocks : NULL;
        float total = 0.0f;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *qb = w + (long)b * bb;
            float dot = 0.0f;
            for (int i = 0; i < QBLOCK; i++) dot += quant_value(qb, q4, i) * x[b * QBLOCK + i];
            total += half_to_float(d[b]) * dot + (q4 ? half_to_float(mn[b]) * xsum[b] : 0.0f);
        }
        store(j, 0, (int)row, total);
    }
#endif
}

/* One weight row against activation rows m0 .. m0 + count - 1 (count <= 8): each block is widened
 * once and multiplied into every row (a verification of drafts, a short prefill), where
 * quant_row would widen it once per row. */
#define MAX_ROWS_AT_ONCE 8
static inline __attribute__((always_inline)) void quant_row_many(const job_t *j, int n, int m0, int count, const int q4) {
    int K = j->K, blocks = K / QBLOCK, bb = q4 ? 16 : 32;
    const uint8_t *w = (const uint8_t *)j->w + (long)n * blocks * bb;
    const uint16_t *d = j->d + (long)n * blocks, *mn = q4 ? j->mn + (long)n * blocks : NULL;
    float total[MAX_ROWS_AT_ONCE] = {0};
#ifdef KV_AVX2
    __m256 acc[MAX_ROWS_AT_ONCE];
    for (int i = 0; i < count; i++) acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256 v[4];
        if (q4) widen_q4(w + (long)b * bb, v); else widen_q8(w + (long)b * bb, v);
        __m256 scale = _mm256_set1_ps(half_to_float(d[b]));
        float minimum = q4 ? half_to_float(mn[b]) : 0.0f;
        for (int i = 0; i < count; i++) {
            const float *x = j->x + (long)(m0 + i) * K + b * QBLOCK;
            __m256 lo = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(v[0], _mm256_loadu_ps(x)));
            __m256 hi = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(v[2], _mm256_loadu_ps(x + 16)));
            acc[i] = _mm256_fmadd_ps(_mm256_add_ps(lo, hi), scale, acc[i]);
            if (q4) total[i] += minimum * j->xsum[(long)(m0 + i) * blocks + b];
        }
    }
    for (int i = 0; i < count; i++) store(j, m0 + i, n, total[i] + kv_hsum(acc[i]));
#else
    for (int i = 0; i < count; i++) {
        const float *x = j->x + (long)(m0 + i) * K;
        for (int b = 0; b < blocks; b++) {
            float dot = 0.0f;
            for (int k = 0; k < QBLOCK; k++) dot += quant_value(w + (long)b * bb, q4, k) * x[b * QBLOCK + k];
            total[i] += half_to_float(d[b]) * dot + (q4 ? half_to_float(mn[b]) * j->xsum[(long)(m0 + i) * blocks + b] : 0.0f);
        }
        store(j, m0 + i, n, total[i]);
    }
#endif
}

static inline __attribute__((always_inline)) void quant_range(const job_t *j, int begin, int end, const int q4) {
    if (j->M == 1) {
        int q = (end - begin) / STREAMS;
        for (int i = 0; i < q; i++) quant_rows(j, begin + i, q, STREAMS, q4);
        for (int n = begin + STREAMS * q; n < end; n++) quant_rows(j, n, 0, 1, q4);
        return;
    }
    for (int n = begin; n < end; n++) {
        for (int m0 = 0; m0 < j->M; m0 += MAX_ROWS_AT_ONCE)
            quant_row_many(j, n, m0, j->M - m0 < MAX_ROWS_AT_ONCE ? j->M - m0 : MAX_ROWS_AT_ONCE, q4);
    }
}

static void q8_range(const void *arg, int begin, int end) { quant_range(arg, begin, end, 0); }

static void q4_range(const void *arg, int begin, int end) { quant_range(arg, begin, end, 1); }

/* Widen a packed [N, K] matrix to float32 (for PyTorch's GEMM on many rows, and an embedding's rows
 * in the fused decode step); exactly d * q (+ m) per value, as the products above use it. */
void kv_widen_row(int fmt, int K, const void *w, const uint16_t *d, const uint16_t *mn, long n, float *out) {
    int blocks = K / QBLOCK, q4 = fmt == FMT_Q4_1, bb = q4 ? 16 : 32;
    if (fmt == FMT_F32) {
        memcpy(out, (const float *)w + n * K, (size_t)K * sizeof(float));
        return;
    }
    if (fmt == FMT_BF16) {
        const uint16_t *row = (const uint16_t *)w + n * K;
        int k = 0;
#ifdef KV_AVX2
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, kv_load_bf16(row + k));
#endif
        for (; k < K; k++) out[k] = bf16_to_float(row[k]);
        return;
    }
    const uint8_t *row = (const uint8_t *)w + n * blocks * bb;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *q = row + (long)b * bb;
        float scale = half_to_float(d[n * blocks + b]);
        float minimum = q4 ? half_to_float(mn[n * blocks + b]) : 0.0f;
#ifdef KV_AVX2
        __m256 v[4], s = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
        if (q4) widen_q4(q, v); else widen_q8(q, v);
        for (int i = 0; i < 4; i++)  /* q * scale + minimum, rounded twice as PyTorch's dequantize */
            _mm256_storeu_ps(out + b * QBLOCK + 8 * i, _mm256_add_ps(_mm256_mul_ps(v[i], s), m));
#else
        for (int i = 0; i < QBLOCK; i++) out[b * QBLOCK + i] = quant_value(q, q4, i) * scale + minimum;
#endif
    }
}

typedef struct { int fmt, K; const void *w; const uint16_t *d, *mn; float *out; } widen_t;

static void widen_range(const void *arg, int begin, int end) {
    const widen_t *j = arg;
    for (int n = begin; n < end; n++) kv_widen_row(j->fmt, j->K, j->w, j->d, j->mn, n, j->out + (long)n * j->K);
}

int kv_widen(int fmt, int N, int K, const void *w, const uint16_t *d, const uint16_t *mn, float *out,
             int nthreads) {
    if (fmt != FMT_BF16 && fmt != FMT_Q8_0 && fmt != FMT_Q4_1) return -1;
    widen_t job = {fmt, K, w, d, mn, out};
    parallel_for(widen_range, &job, N, 16, nthreads);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The entry point. x is float32 [M, K] (K a multiple of 32 for Q8_0/Q4_1), y float32 [M, N].
 * Returns 0, or -1 for an unknown format.
 */
range_fn kv_range_fn(int fmt) {
    switch (fmt) {
    case FMT_F32: return f32_range;
    case FMT_BF16: return bf16_range;
    case FMT_Q8_0: return q8_range;
    case FMT_Q4_1: return q4_range;
    default: return NULL;
    }
}

void kv_block_sums(const float *x, int M, int K, float *out) {
    int blocks = K / QBLOCK;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < blocks; b++) {
            float s = 0.0f;
            for (int i = 0; i < QBLOCK; i++) s += x[(long)m * K + b * QBLOCK + i];
            out[m * blocks + b] = s;
        }
}

int kv_matmul(int fmt, int M, int N, int K, const float *x, const void *w, const uint16_t *d,
              const uint16_t *mn, const float *bias, float *y, int nthreads) {
    range_fn fn = kv_range_fn(fmt);
    if (fn == NULL) return -1;
    float xsum[fmt == FMT_Q4_1 ? M * (K / QBLOCK) + 1 : 1];
    if (fmt == FMT_Q4_1) kv_block_sums(x, M, K, xsum);
    job_t job = {fmt, M, N, K, x, xsum, w, d, mn, bias, y};
    /* below ~64k multiply-adds a second thread costs more than it saves */
    if ((long)M * N * K < 65536) nthreads = 1;
    parallel_for(fn, &job, N, 16, nthreads);
    return 0;
}
