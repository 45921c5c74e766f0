/* A llama-family decode step in one call: for n single-token queries, every layer's RMSNorm, fused
 * QKV projection, RoPE, KV write, paged attention, output projection, residual, RMSNorm, gated SiLU
 * MLP and residual, in float32, with the weights in their storage format (matmul.c).
 *
 * Why: PyTorch spends 5-10 us per operator and a layer of this model is ~40 of them, so a decode
 * step of SmolLM2 paid ~20 ms of dispatch for ~20 ms of weight reads. Here one OpenMP team stays
 * in one parallel region for the whole step and meets at a spin barrier between phases.
 *
 * The arithmetic is the PyTorch path's (kvcache.models.llama with paged_attention), so the two
 * agree to float32 rounding and cached generation stays equal to recomputation:
 *   RMSNorm     w * (x * 1/sqrt(mean(x^2) + eps))
 *   RoPE        x * cos + rotate_half(x) * sin, the tables (one row per position) computed by the caller
 *   attention   softmax(scale * q.k) over the keys the sequence's table holds (a sliding window
 *               keeps its last `window` of them), weights times values
 *   MLP         down(silu(gate) * up)
 */
#include "kernels.h"

#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

typedef struct {  /* a weight [rows, cols] in its storage format (see matmul.c) */
    int fmt, rows, cols;
    const void *data;
    const uint16_t *scale, *minimum;
    const float *bias;  /* [rows] or NULL */
} kv_weight;

typedef struct {
    const float *input_norm, *post_norm;  /* [hidden] */
    kv_weight qkv, o, gate_up, down;
    void *k, *v;                          /* this layer's cache, each [kv_heads, num_blocks, block_size, head_dim] */
    int group, window;                    /* the cache group whose plan addresses it; window 0 = full */
} kv_layer;

typedef struct {
    int num_layers, hidden, heads, kv_heads, head_dim, intermediate;
    int kv_bf16, num_blocks, block_size;  /* the cache's element type (float32 or bfloat16) and shape */
    float eps, scale;
    const kv_layer *layers;
    const float *final_norm;  /* [hidden] */
    kv_weight head;           /* [vocab, hidden]: the output head, for a step that asks for logits */
    kv_weight embed;          /* [vocab, hidden]: the embedding, for a step given token ids (data NULL: not here) */
} kv_model;

typedef struct {            /* one cache group's share of the step's plan, for its n tokens */
    const int64_t *slots;      /* [n] where each token's key and value go */
    const int64_t *tables;     /* [sequences, width] block ids, from the first block attention reads */
    const int32_t *token_seq;  /* [n] the sequence (row of tables) each token belongs to */
    const int32_t *token_keys; /* [n] keys each token sees, counted from its table's first block
                                  (itself and the tokens before it; causal within a sequence) */
    int width;
} kv_group_plan;

/* --- a spin barrier: the team meets here between phases; a waiting thread yields now and then,
 *     so a thread that lost its core to another process gets it back ---------------------------- */
typedef struct { atomic_int count; atomic_int sense; } barrier_t;

static void meet(barrier_t *b, int *sense, int nt) {
    if (nt == 1) return;
    int s = !*sense;
    *sense = s;
    if (atomic_fetch_add(&b->count, 1) == nt - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->sense, s);
        return;
    }
    for (long i = 1; atomic_load(&b->sense) != s; i++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if ((i & 255) == 0) sched_yield();
    }
}

/* --- the pieces ------------------------------------------------------------------------------ */

static void rmsnorm(const float *x, const float *w, float *out, int n, int size, float eps) {
    for (int i = 0; i < n; i++) {
        const float *row = x + (long)i * size;
        float sum = 0.0f;
        for (int k = 0; k < size; k++) sum += row[k] * row[k];
        float inv = 1.0f / sqrtf(sum / (float)size + eps);
        for (int k = 0; k < size; k++) out[(long)i * size + k] = w[k] * (row[k] * inv);
    }
}

/* This thread's rows of y = x @ W^T (+ bias). */
static void matmul_share(const kv_weight *w, int n, const float *x, const float *xsum, float *y, int tid, int nt) {
    job_t job = {w->fmt, n, w->rows, w->cols, x, xsum, w->data, w->scale, w->minimum, w->bias, y};
    int begin, end;
    kv_share(tid, nt, w->rows, 16, &begin, &end);
    if (begin < end) kv_range_fn(w->fmt)(&job, begin, end);
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static inline float cache_value(const kv_model *m, const void *cache, long index) {
    if (m->kv_bf16) {
        uint32_t bits = (uint32_t)((const uint16_t *)cache)[index] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)cache)[index];
}

static inline long cache_index(const kv_model *m, int kv_head, long slot) {  /* first value of a slot */
    return ((long)kv_head * m->num_blocks * m->block_size + slot) * m->head_dim;
}

/* RoPE on each query and key head in place (rotate_half), then the keys and values into the cache. */
static void rope_and_store(const kv_model *m, const kv_layer *ly, const kv_group_plan *plan, float *qkv, int n,
                           const int64_t *positions, const float *cos, const float *sin) {
    int hd = m->head_dim, half = hd / 2, width = (m->heads + 2 * m->kv_heads) * hd;
    float rotated[hd];
    for (int i = 0; i < n; i++) {
        float *row = qkv + (long)i * width;
        const float *c = cos + positions[i] * hd, *s = sin + positions[i] * hd;
        for (int head = 0; head < m->heads + m->kv_heads; head++) {
            float *x = row + head * hd;
            for (int d = 0; d < half; d++) { rotated[d] = -x[d + half]; rotated[d + half] = x[d]; }
            for (int d = 0; d < hd; d++) x[d] = x[d] * c[d] + rotated[d] * s[d];
        }
        const float *k = row + m->heads * hd, *v = k + m->kv_heads * hd;
        for (int kh = 0; kh < m->kv_heads; kh++) {
            long at = cache_index(m, kh, plan->slots[i]);
            for (int d = 0; d < hd; d++) {
                if (m->kv_bf16) {
                    ((uint16_t *)ly->k)[at + d] = float_to_bf16(k[kh * hd + d]);
                    ((uint16_t *)ly->v)[at + d] = float_to_bf16(v[kh * hd + d]);
                } else {
                    ((float *)ly->k)[at + d] = k[kh * hd + d];
                    ((float *)ly->v)[at + d] = v[kh * hd + d];
                }
            }
        }
    }
}

#define KEYS_AHEAD 8  /* how many keys ahead of the one read a row is asked for (rows sit in scattered blocks) */

static inline void prefetch_row(const kv_model *m, const void *cache, long index) {
#if defined(__GNUC__)
    const char *row = (const char *)cache + index * (m->kv_bf16 ? 2 : 4);
    for (int at = 0; at < m->head_dim * (m->kv_bf16 ? 2 : 4); at += 64) __builtin_prefetch(row + at, 0, 3);
#endif
}

/* For H (1 to 3) query heads q[h * hd ..] of one kv head: scores[h * count + t] = scale * q_h . key t,
 * for the keys at cache indices where[0 .. count). Four keys at a time (independent sums, where one
 * key at a time waits on each multiply-add's latency), each key vector loaded and widened once for
 * all H heads: 12 accumulators, 3 query vectors and a key vector (AVX2's 16 registers), in vectors of
 * 16 floats where the CPU has AVX-512 (half the loads, widenings and multiply-adds of 8); each head's
 * four sums are reduced together (kv_hsum4). Attention at long contexts is bound by these
 * instructions more than by its reads: with the keys held in L1 a step at 2,048 tokens is only ~4%
 * faster. */
static inline __attribute__((always_inline))
void key_scores(const kv_model *m, const void *keys, const long *where, int count, const float *q, float *scores,
                const int H) {
    int hd = m->head_dim, t = 0;
#ifdef KV_AVX2
    const __m128 scale = _mm_set1_ps(m->scale);
#define SCORES(h) _mm_storeu_ps(scores + h * count + t, _mm_mul_ps(kv_hsum4(F(a##h##0), F(a##h##1), F(a##h##2), F(a##h##3)), scale));
#define ALL_SCORES SCORES(0) if (H > 1) { SCORES(1) } if (H > 2) { SCORES(2) }
#define KEY(j) k = LOAD(m, keys, where[t + j] + d); a0##j = FMA(q0, k, a0##j);                                   \
               if (H > 1) a1##j = FMA(q1, k, a1##j);                                                         \
               if (H > 2) a2##j = FMA(q2, k, a2##j);
#define FOUR_KEYS(VEC, ZERO, QLOAD, STEP)                                                                    \
    for (int ahead = t + KEYS_AHEAD; ahead < t + KEYS_AHEAD + 4 && ahead < count; ahead++)                 \
        prefetch_row(m, keys, where[ahead]);                                                                \
    VEC z = ZERO(), a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;                 \
    VEC a20 = z, a21 = z, a22 = z, a23 = z, q0, q1 = z, q2 = z, k;                                          \
    for (int d = 0; d < hd; d += STEP) {                                                                    \
        q0 = QLOAD(q + d);                                                                                  \
        if (H > 1) q1 = QLOAD(q + hd + d);                                                                  \
        if (H > 2) q2 = QLOAD(q + 2 * hd + d);                                                              \
        KEY(0) KEY(1) KEY(2) KEY(3)                                                                         \
    }                                                                                                       \
    ALL_SCORES
#ifdef KV_AVX512
#define LOAD(m, cache, index) kv_load16(cache, index, (m)->kv_bf16)
#define FMA _mm512_fmadd_ps
#define F kv_fold16
    if (hd % 16 == 0)
        for (; t + 4 <= count; t += 4) { FOUR_KEYS(__m512, _mm512_setzero_ps, _mm512_loadu_ps, 16) }
#undef LOAD
#undef FMA
#undef F
#endif
#define LOAD(m, cache, index) kv_load8(cache, index, (m)->kv_bf16)
#define FMA _mm256_fmadd_ps
#define F(a) (a)
    if (hd % 8 == 0)
        for (; t + 4 <= count; t += 4) { FOUR_KEYS(__m256, _mm256_setzero_ps, _mm256_loadu_ps, 8) }
#undef LOAD
#undef FMA
#undef F
#undef FOUR_KEYS
#undef KEY
#undef ALL_SCORES
#undef SCORES
#endif
    for (; t < count; t++)
        for (int h = 0; h < H; h++) {
            float sum = 0.0f;
            for (int d = 0; d < hd; d++) sum += q[h * hd + d] * cache_value(m, keys, where[t] + d);
            scores[h * count + t] = sum * m->scale;
        }
}

/* For H (1 to 3) query heads: out[h * stride + d] = sum over t of p[h * count + t] * value t (values at
 * cache indices where[0 .. count)), 64 (AVX-512), 32 or 8 values of each head's output at a time held
 * in registers across all the keys, each value vector loaded and widened once for all H heads. */
static inline __attribute__((always_inline))
void weighted_values(const kv_model *m, const void *values, const long *where, int count, const float *p,
                     float *out, long stride, const int H) {
    int hd = m->head_dim, d = 0;
#ifdef KV_AVX2
#define VALUE(i) v = LOAD(m, values, where[t] + d + LANES * i); a0##i = FMA(w0, v, a0##i);                 \
                 if (H > 1) a1##i = FMA(w1, v, a1##i);                                                      \
                 if (H > 2) a2##i = FMA(w2, v, a2##i);
#define STORE(h, i) STOREU(out + h * stride + d + LANES * i, a##h##i);
#define FOUR_VECTORS(VEC, ZERO, SET1)  /* out[h, d .. d + 4 * LANES) */                                 \
    VEC z = ZERO(), a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;             \
    VEC a20 = z, a21 = z, a22 = z, a23 = z, w0, w1 = z, w2 = z, v;                                      \
    for (int t = 0; t < count; t++) {                                                                   \
        if (d == 0 && t + KEYS_AHEAD < count) prefetch_row(m, values, where[t + KEYS_AHEAD]);         \
        w0 = SET1(p[t]);                                                                                \
        if (H > 1) w1 = SET1(p[count + t]);                                                             \
        if (H > 2) w2 = SET1(p[2 * count + t]);                                                         \
        VALUE(0) VALUE(1) VALUE(2) VALUE(3)                                                             \
    }                                                                                                   \
    STORE(0, 0) STORE(0, 1) STORE(0, 2) STORE(0, 3)                                                     \
    if (H > 1) { STORE(1, 0) STORE(1, 1) STORE(1, 2) STORE(1, 3) }                                      \
    if (H > 2) { STORE(2, 0) STORE(2, 1) STORE(2, 2) STORE(2, 3) }
#ifdef KV_AVX512
#define LANES 16
#define LOAD(m, cache, index) kv_load16(cache, index, (m)->kv_bf16)
#define FMA _mm512_fmadd_ps
#define STOREU _mm512_storeu_ps
    for (; d + 4 * LANES <= hd; d += 4 * LANES) { FOUR_VECTORS(__m512, _mm512_setzero_ps, _mm512_set1_ps) }
#undef LANES
#undef LOAD
#undef FMA
#undef STOREU
#endif
#define LANES 8
#define LOAD(m, cache, index) kv_load8(cache, index, (m)->kv_bf16)
#define FMA _mm256_fmadd_ps
#define STOREU _mm256_storeu_ps
    for (; d + 4 * LANES <= hd; d += 4 * LANES) { FOUR_VECTORS(__m256, _mm256_setzero_ps, _mm256_set1_ps) }
#undef LANES
#undef LOAD
#undef FMA
#undef STOREU
#undef FOUR_VECTORS
#undef STORE
#undef VALUE
    for (; d + 8 <= hd; d += 8)
        for (int h = 0; h < H; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int t = 0; t < count; t++)
                a = _mm256_fmadd_ps(_mm256_set1_ps(p[h * count + t]), kv_load8(values, where[t] + d, m->kv_bf16), a);
            _mm256_storeu_ps(out + h * stride + d, a);
        }
#endif
    for (; d < hd; d++)
        for (int h = 0; h < H; h++) {
            float sum = 0.0f;
            for (int t = 0; t < count; t++) sum += p[h * count + t] * cache_value(m, values, where[t] + d);
            out[h * stride + d] = sum;
        }
}

/* softmax of each of H heads' scores in place (exp(score - largest)); per head h, its largest score
 * and the sum of the exponentials go to stats[h * stride] and stats[h * stride + 1]. */
static void softmax_parts(float *scores, int count, int H, float *stats, long stride) {
    for (int h = 0; h < H; h++) {
        float *p = scores + (long)h * count, top = -INFINITY, total = 0.0f;
        int t = 0;
#ifdef KV_AVX2
        __m256 high = _mm256_set1_ps(-INFINITY);
        /* a NaN score is passed over, as the scalar loop below does (maxps returns its second operand
         * when either is NaN) */
        for (; t + 8 <= count; t += 8) high = _mm256_max_ps(_mm256_loadu_ps(p + t), high);
        __m128 half = _mm_max_ps(_mm256_castps256_ps128(high), _mm256_extractf128_ps(high, 1));
        half = _mm_max_ps(half, _mm_movehl_ps(half, half));
        top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#endif
        for (; t < count; t++) top = p[t] > top ? p[t] : top;
        t = 0;
#ifdef KV_AVX2
        __m256 sum = _mm256_setzero_ps();
        for (; t + 8 <= count; t += 8) {
            __m256 e = kv_exp(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
            _mm256_storeu_ps(p + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        total = kv_hsum(sum);
#endif
        for (; t < count; t++) { p[t] = expf(p[t] - top); total += p[t]; }
        stats[h * stride] = top;
        stats[h * stride + 1] = total;
    }
}

/* Up to three query heads of a group over one run of keys: scores, softmax, weighted values. */
static void attend_heads(const kv_model *m, const kv_layer *ly, const long *where, int count, const float *q,
                         int H, float *scores, float *partial) {
    long stride = m->head_dim + 2;
    switch (H) {
    case 1: key_scores(m, ly->k, where, count, q, scores, 1); break;
    case 2: key_scores(m, ly->k, where, count, q, scores, 2); break;
    default: key_scores(m, ly->k, where, count, q, scores, 3); break;
    }
    softmax_parts(scores, count, H, partial, stride);
    switch (H) {
    case 1: weighted_values(m, ly->v, where, count, scores, partial + 2, stride, 1); break;
    case 2: weighted_values(m, ly->v, where, count, scores, partial + 2, stride, 2); break;
    default: weighted_values(m, ly->v, where, count, scores, partial + 2, stride, 3); break;
    }
}

/* Attention is split into parts: (query token, kv head, a run of its keys). A part leaves, per query
 * head of the kv head's group, its largest score, the sum of exp(score - largest) and the values
 * weighted by those exponentials; `merge` combines a (token, kv head)'s parts. Long contexts
 * thus spread over every thread even for one sequence with three kv heads. */
typedef struct { int first, len, parts; } key_range;

static key_range keys_of(const kv_model *m, const kv_layer *ly, const kv_group_plan *plan, int i, int nt) {
    key_range r = {0, plan->token_keys[i], 1};
    if (ly->window > 0 && r.len > ly->window) r.first = r.len - ly->window;
    int count = r.len - r.first, per_part = 128;
    r.parts = (count + per_part - 1) / per_part;
    if (r.parts > nt) r.parts = nt;
    if (r.parts < 1) r.parts = 1;
    (void)m;
    return r;
}

/* A part's keys are visited as KEY_STREAMS interleaved runs (the 1st key of each quarter, then the
 * 2nd of each, ...), so each thread reads its keys and values as four streams side by side, as the
 * matmul reads weights (one stream keeps too few reads in flight). The order only changes the
 * rounding of the sums. On the AVX-512 Xeon, against one stream: Q4_1 decode steps at 2,048 tokens
 * 1.12x faster, float32 1.04x (8 and 16 streams: a little slower than 4), 128 tokens unchanged. */
#ifndef KEY_STREAMS
#define KEY_STREAMS 4
#endif

/* out[k * stride] = the cache index of key first + k of kv head kh, for k < count: a block's keys
 * at a time (table[b] holds keys b * block_size ..), without a division per key. */
static void key_indices(const kv_model *m, int kh, const int64_t *table, int first, int count, long *out, int stride) {
    int bs = m->block_size, b = first / bs, j = first % bs;
    for (; count > 0; b++, j = 0) {
        int take = bs - j < count ? bs - j : count;
        long index = cache_index(m, kh, table[b] * bs + j);
        for (int k = 0; k < take; k++, index += m->head_dim, out += stride) *out = index;
        count -= take;
    }
}

/* Part `part` of (token i, kv head kh). partial: per query head g, [max, sum, hd weighted values].
 * scores: room for one score per key of the part per query head; where: one index per key. */
static void attend_part(const kv_model *m, const kv_layer *ly, const kv_group_plan *plan, const float *qkv,
                        int i, int kh, key_range r, int part, float *partial, float *scores, long *where) {
    int hd = m->head_dim, group = m->heads / m->kv_heads;
    int count = r.len - r.first;
    int lo = r.first + (int)((long)count * part / r.parts), hi = r.first + (int)((long)count * (part + 1) / r.parts);
    const int64_t *table = plan->tables + (long)plan->token_seq[i] * plan->width;
    const float *q = qkv + (long)i * (m->heads + 2 * m->kv_heads) * hd + (long)kh * group * hd;
    int run = (hi - lo) / KEY_STREAMS;  /* key `step` of run s goes to where[step * KEY_STREAMS + s] */
    for (int s = 0; s < KEY_STREAMS; s++) key_indices(m, kh, table, lo + s * run, run, where + s, KEY_STREAMS);
    key_indices(m, kh, table, lo + KEY_STREAMS * run, hi - lo - KEY_STREAMS * run, where + KEY_STREAMS * run, 1);
    for (int g = 0; g < group; g += 3)  /* three query heads per pass over the keys */
        attend_heads(m, ly, where, hi - lo, q + (long)g * hd, group - g < 3 ? group - g : 3, scores,
                     partial + (long)g * (hd + 2));
}

/* softmax(all parts) . values for (token i, kv head kh): out[i, head g of the group]. */
static void merge(const kv_model *m, int i, int kh, int parts, const float *partials, float *out) {
    int hd = m->head_dim, group = m->heads / m->kv_heads;
    long stride = (long)group * (hd + 2);
    for (int g = 0; g < group; g++) {
        float top = -INFINITY, total = 0.0f;
        for (int p = 0; p < parts; p++) top = partials[p * stride + g * (hd + 2)] > top ? partials[p * stride + g * (hd + 2)] : top;
        float *o = out + (long)i * m->heads * hd + (long)(kh * group + g) * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int p = 0; p < parts; p++) {
            const float *part = partials + p * stride + g * (hd + 2);
            float w = expf(part[0] - top);
            total += part[1] * w;
            axpy(o, w, part + 2, hd);
        }
        for (int d = 0; d < hd; d++) o[d] /= total;
    }
}

/* This thread's share of act[n, I] = silu(gate) * up, gu = [gate | up] per token, and of Q4_1's block
 * sums of act when `sums` (the share is whole blocks of 32: I is a multiple of 32 for Q4_1). */
static void silu_mul_share(const float *gu, int n, int I, int sums, float *act, float *xsum, int tid, int nt) {
    int begin, end;
    kv_share(tid, nt, n * I, 2 * QBLOCK, &begin, &end);
    for (int e = begin; e < end;) {  /* a run of one token's row at a time */
        int i = e / I, k = e % I, stop = end - e < I - k ? k + end - e : I;
        const float *gate = gu + (long)i * 2 * I, *up = gate + I;
        float *out = act + (long)i * I;
#ifdef KV_AVX2
        for (; k + 8 <= stop; k += 8) {
            __m256 g = _mm256_loadu_ps(gate + k), one = _mm256_set1_ps(1.0f);
            __m256 sig = _mm256_add_ps(one, kv_exp(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(up + k)));
        }
#endif
        for (; k < stop; k++) out[k] = gate[k] / (1.0f + expf(-gate[k])) * up[k];
        e = i * I + stop;
    }
    if (sums && begin < end)  /* this share's blocks, as one row of (end - begin) values */
        kv_block_sums(act + begin, 1, end - begin, xsum + begin / QBLOCK);
}

/* The most likely token of each row as torch.argmax picks it: the first NaN if there is one, else
 * the first of the largest. */
typedef struct { float value; int index; } best_t;

static inline void consider(best_t *best, float value, int index) {  /* candidates come in index order */
    if (best->index < 0 || value > best->value || (value != value && best->value == best->value))
        *best = (best_t){value, index};
}

/* This thread's share of the head's rows (as matmul_share splits them): its best of each of the n rows
 * of logits [n, vocab] into mine[i], read while they are still in this core's caches. */
static void argmax_share(const float *logits, int n, int vocab, best_t *mine, int tid, int nt) {
    int begin, end;
    kv_share(tid, nt, vocab, 16, &begin, &end);
    for (int i = 0; i < n; i++) {
        best_t b = {0.0f, -1};
        const float *row = logits + (long)i * vocab;
        for (int k = begin; k < end; k++) consider(&b, row[k], k);
        mine[i] = b;
    }
}

/* --- the step ---------------------------------------------------------------------------------- */

/* The step's n tokens (one per decoding sequence, or a sequence's drafts and a short prompt's tokens,
 * each seeing the keys its plan says): tokens [n] their ids, or NULL when h [n, hidden] float32 holds
 * their embeddings already (else the embedding's rows are widened into h here); the last layer's
 * output on return. positions [n]; cos, sin [table_rows, head_dim]: row p is position p's.
 * plans[g] is cache group g's share of the plan. logits [n, vocab], or NULL: the final norm and the
 * output head of the last layer's output, in the same call (the head's weights stream right after
 * the layers', without a return to Python between them, whose first operators would run with cold
 * caches). best [n], or NULL (only with logits): each row's argmax, as torch.argmax gives it, taken
 * by each thread over the logits it just computed (a later argmax in PyTorch read them cold: 0.1-0.2 ms
 * a step). Returns 0, -1 for an unknown weight format (or token ids with no usable embedding), -2 if
 * out of memory, -3 for a token id outside the embedding, -4 for a position outside the RoPE table;
 * nothing is computed or written unless it returns 0. */
int kv_llama_decode(const kv_model *m, int n, const int64_t *tokens, float *h, const int64_t *positions,
                    long table_rows, const float *cos, const float *sin, const kv_group_plan *plans, float *logits,
                    int64_t *best, int nthreads) {
    for (int l = 0; l < m->num_layers; l++) {
        const kv_layer *ly = &m->layers[l];
        if (!kv_range_fn(ly->qkv.fmt) || !kv_range_fn(ly->o.fmt) || !kv_range_fn(ly->gate_up.fmt) || !kv_range_fn(ly->down.fmt))
            return -1;
    }
    if (logits && (!m->head.data || !m->final_norm || !kv_range_fn(m->head.fmt))) return -1;
    for (int i = 0; i < n; i++)
        if (positions[i] < 0 || positions[i] >= table_rows) return -4;
    if (tokens) {
        if (!m->embed.data || m->embed.cols != m->hidden || !kv_range_fn(m->embed.fmt)) return -1;
        for (int i = 0; i < n; i++)
            if (tokens[i] < 0 || tokens[i] >= m->embed.rows) return -3;
        for (int i = 0; i < n; i++)
            kv_widen_row(m->embed.fmt, m->hidden, m->embed.data, m->embed.scale, m->embed.minimum, tokens[i],
                         h + (long)i * m->hidden);
    }
    int H = m->hidden, hd = m->head_dim, I = m->intermediate, group = m->heads / m->kv_heads;
    int width = (m->heads + 2 * m->kv_heads) * hd, longest = 1, widest = H > I ? H : I;
    for (int l = 0; l < m->num_layers; l++)
        for (int i = 0; i < n; i++) {
            int len = plans[m->layers[l].group].token_keys[i];
            longest = len > longest ? len : longest;
        }
    if (nthreads < 1) nthreads = 1;
    long part_floats = (long)group * (hd + 2);  /* one attention part's result */
    size_t floats = (size_t)n * (H + width + m->heads * hd + H + 2 * I + I + widest / QBLOCK + 1)
                  + (size_t)n * m->kv_heads * nthreads * part_floats
                  + (size_t)nthreads * group * longest;
    float *buf = malloc(floats * sizeof(float));
    long *where_all = malloc((size_t)nthreads * longest * sizeof(long));
    best_t *candidates = malloc((size_t)nthreads * n * sizeof(best_t));  /* [thread, row] */
    if (!buf || !where_all || !candidates) { free(buf); free(where_all); free(candidates); return -2; }
    float *x = buf, *qkv = x + (size_t)n * H, *attn = qkv + (size_t)n * width, *tmp = attn + (size_t)n * m->heads * hd;
    float *gu = tmp + (size_t)n * H, *act = gu + (size_t)n * 2 * I, *xsum = act + (size_t)n * I;
    float *partials = xsum + (size_t)n * (widest / QBLOCK + 1);
    float *scratch = partials + (size_t)n * m->kv_heads * nthreads * part_floats;
    barrier_t bar = {0, 0};

    #pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int tid = 0, nt = 1;
#endif
        int sense = 0;
        float *scores = scratch + (size_t)tid * group * longest;
        long *where = where_all + (size_t)tid * longest;
        for (int l = 0; l < m->num_layers; l++) {
            const kv_layer *ly = &m->layers[l];
            const kv_group_plan *plan = &plans[ly->group];
            if (tid == 0) {
                rmsnorm(h, ly->input_norm, x, n, H, m->eps);
                if (ly->qkv.fmt == FMT_Q4_1) kv_block_sums(x, n, H, xsum);
            }
            meet(&bar, &sense, nt);
            matmul_share(&ly->qkv, n, x, xsum, qkv, tid, nt);
            meet(&bar, &sense, nt);
            if (tid == 0) rope_and_store(m, ly, plan, qkv, n, positions, cos, sin);
            meet(&bar, &sense, nt);
            /* attention: every (token, kv head, part) task, then each pair's parts merged */
            int tasks = 0;
            for (int i = 0; i < n; i++) tasks += keys_of(m, ly, plan, i, nt).parts * m->kv_heads;
            for (int task = tid; task < tasks; task += nt) {
                int i = 0, t = task, parts;
                while (t >= (parts = keys_of(m, ly, plan, i, nt).parts) * m->kv_heads) { t -= parts * m->kv_heads; i++; }
                key_range r = keys_of(m, ly, plan, i, nt);
                attend_part(m, ly, plan, qkv, i, t / parts, r, t % parts, partials + (long)task * part_floats, scores, where);
            }
            meet(&bar, &sense, nt);
            for (int pair = tid, base = 0; pair < n * m->kv_heads; pair += nt) {
                int i = pair / m->kv_heads, kh = pair % m->kv_heads;
                base = 0;
                for (int k = 0; k < i; k++) base += keys_of(m, ly, plan, k, nt).parts * m->kv_heads;
                int parts = keys_of(m, ly, plan, i, nt).parts;
                merge(m, i, kh, parts, partials + (long)(base + kh * parts) * part_floats, attn);
            }
            meet(&bar, &sense, nt);
            if (ly->o.fmt == FMT_Q4_1) {
                if (tid == 0) kv_block_sums(attn, n, m->heads * hd, xsum);
                meet(&bar, &sense, nt);
            }
            matmul_share(&ly->o, n, attn, xsum, tmp, tid, nt);
            meet(&bar, &sense, nt);
            if (tid == 0) {
                for (long k = 0; k < (long)n * H; k++) h[k] += tmp[k];
                rmsnorm(h, ly->post_norm, x, n, H, m->eps);
                if (ly->gate_up.fmt == FMT_Q4_1) kv_block_sums(x, n, H, xsum);
            }
            meet(&bar, &sense, nt);
            matmul_share(&ly->gate_up, n, x, xsum, gu, tid, nt);
            meet(&bar, &sense, nt);
            silu_mul_share(gu, n, I, ly->down.fmt == FMT_Q4_1, act, xsum, tid, nt);
            meet(&bar, &sense, nt);
            matmul_share(&ly->down, n, act, xsum, tmp, tid, nt);
            meet(&bar, &sense, nt);
            if (tid == 0)
                for (long k = 0; k < (long)n * H; k++) h[k] += tmp[k];
        }
        if (logits) {
            if (tid == 0) {
                rmsnorm(h, m->final_norm, x, n, H, m->eps);
                if (m->head.fmt == FMT_Q4_1) kv_block_sums(x, n, H, xsum);
            }
            meet(&bar, &sense, nt);
            matmul_share(&m->head, n, x, xsum, logits, tid, nt);
            if (best) {
                argmax_share(logits, n, m->head.rows, candidates + (size_t)tid * n, tid, nt);
                meet(&bar, &sense, nt);
                if (tid == 0)
                    for (int i = 0; i < n; i++) {
                        best_t b = {0.0f, -1};
                        for (int t = 0; t < nt; t++)  /* in thread order: their shares are in index order */
                            if (candidates[(size_t)t * n + i].index >= 0)
                                consider(&b, candidates[(size_t)t * n + i].value, candidates[(size_t)t * n + i].index);
                        best[i] = b.index;
                    }
            }
        }
    }
    free(buf);
    free(where_all);
    free(candidates);
    return 0;
}
