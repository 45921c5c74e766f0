/* Decode attention over a quantized KV cache (fp8, int8, int4), reading the codes where they lie.
 *
 * For n sequences with one query token each, per query head: softmax(scale * q.k) over the keys
 * the sequence's block table holds (its last `window` of them when window > 0), times the values.
 * Every key and value is decoded inside the products from the codes and fp16 params the cache
 * stores (kvcache/cache/quant.py; the layout is storage.py's QuantizedGroup):
 *
 *   int8  keys    k = code x s_tG              per token t, per group G of value_group channels;
 *                                              stored rotated (k @ R), so the caller passes q @ R
 *   fp8   keys    k = e4m3(code) x s_bd + z_bd  per channel d, per block b (KIVI, centred)
 *   int4  keys    k = code x s_bd + z_bd        per channel d, per block b
 *   all   values  v = code x s_tG (+ z_tG, int4) per token t, per group G
 *
 * int4 packs two codes a byte: byte j holds code j (low nibble) and code j + head_dim/2 (high).
 * fp8 codes widen as the PyTorch path widens them: the e4m3 byte shifted into a float16 is the value
 * times 2^-8 (subnormals included), and the scale carries the 2^8 back (the codec's `unit`).
 *
 * The params are folded into the products as kvcache.cache.storage.QuantizedGroup folds them:
 *   per channel  q.k_t = (q x s_b) . code_t + q . z_b
 *   per token    q.k_t = sum_G s_tG (q_G . code_tG)
 *   values       sum_t w_t v_t = sum_t (w_t s_tG) code_tG (+ sum_t w_t z_tG)
 * so both paths compute the same function and differ only in the order of float32 sums.
 *
 * Work: one task per (sequence, kv head), spread over torch's OpenMP team; a task decodes each key
 * and value row once into a head_dim buffer and uses it for every query head of its kv head (GQA).
 */
#include "kernels.h"

#include <stdlib.h>

enum { KVQ_INT8 = 0, KVQ_FP8 = 1, KVQ_INT4 = 2 };

typedef struct {                      /* one layer of a quantized group, as stored */
    int fmt, kv_heads, group, head_dim, num_blocks, block_size, value_group;
    float unit;                       /* value = code x scale x unit (+ zero): 256 for fp8 (see widen) */
    const void *k_codes, *v_codes;    /* [kv_heads, num_blocks, block_size, code_width] int8 / uint8 */
    const uint16_t *k_scale, *k_zero; /* fp16. int8: [kv_heads, num_blocks, block_size, head_dim / value_group],
                                         no zero; fp8, int4: [kv_heads, num_blocks, head_dim] each */
    const uint16_t *v_scale, *v_zero; /* fp16 [kv_heads, num_blocks, block_size, head_dim / value_group];
                                         zero only for int4 (else NULL) */
} kvq_cache;

typedef struct {                      /* one step's decode rows */
    int n, width, window;             /* sequences; columns of tables; window 0 = every key */
    float scale;                      /* the softmax scale */
    const float *q;                   /* [n, kv_heads * group, head_dim] (int8: already times R) */
    const int64_t *tables;            /* [n, width] block ids, from the first block the sequence reads */
    const int32_t *seq_lens;          /* [n] tokens with KV, counted from the table's first block */
    float *out;                       /* [n, kv_heads * group, head_dim] */
} kvq_step;

static inline int code_width(const kvq_cache *c) { return c->fmt == KVQ_INT4 ? c->head_dim / 2 : c->head_dim; }

static inline float fp8_raw(uint8_t b) {  /* s eeee mmm -> float16 s 0eeee mmm0000000 = value x 2^-8 */
    return half_to_float((uint16_t)((int)(int8_t)b * 128) & 0xBFFF);
}

#define KVQ_INLINE static inline __attribute__((always_inline))

/* One stored row of codes -> head_dim floats r (value = r x scale x unit (+ zero)). */
KVQ_INLINE void widen(int fmt, const uint8_t *p, int hd, float *out) {
    int d = 0;
    if (fmt == KVQ_INT4) {
        int half = hd / 2;
#ifdef KV_AVX2
        for (; d + 8 <= half; d += 8) {
            __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + d)));
            _mm256_storeu_ps(out + d, _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(15))));
            _mm256_storeu_ps(out + half + d, _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 4)));
        }
#endif
        for (; d < half; d++) { out[d] = (float)(p[d] & 15); out[half + d] = (float)(p[d] >> 4); }
        return;
    }
#ifdef KV_AVX2
    if (fmt == KVQ_INT8) {
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(out + d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + d)))));
    } else {
        for (; d + 8 <= hd; d += 8) {
            __m128i h = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(p + d))), 7);
            _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_andnot_si128(_mm_set1_epi16(0x4000), h)));
        }
    }
#endif
    for (; d < hd; d++) out[d] = fmt == KVQ_INT8 ? (float)(int8_t)p[d] : fp8_raw(p[d]);
}

/* The visible keys [lo, lo + len) of a table, block by block: block j of the table holds the
 * tokens [from, to) of itself (offsets), which are keys index - lo of the visible run. */
typedef struct { long block; int from, to, index; } run_t;

static inline int runs_of(const int64_t *table, int bs, int lo, int len, int j, run_t *r) {
    int first = lo / bs, last = (lo + len - 1) / bs;
    if (first + j > last) return 0;
    int b = first + j;
    r->block = table[b];
    r->from = b == first ? lo - b * bs : 0;
    r->to = b == last ? lo + len - b * bs : bs;
    r->index = b * bs + r->from - lo;
    return 1;
}

/* The first slot of the table's next block after run j, or -1: its bytes are asked for while run j is
 * read (the blocks lie anywhere, so the hardware prefetcher cannot guess them; a decode step reads
 * each byte once, so without this every new block waits on memory). */
static inline long next_base(const kvq_cache *c, const int64_t *table, int lo, int len, int j, int kh) {
    run_t next;
    return runs_of(table, c->block_size, lo, len, j + 1, &next)
        ? ((long)kh * c->num_blocks + next.block) * c->block_size : -1;
}

static inline void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* Per channel keys of block `block`: qs[g] = q_g x (scale x unit), qz[g] = q_g . zero. */
static void fold_block(const kvq_cache *c, const float *q, int kh, long block, float *qs, float *qz) {
    int hd = c->head_dim;
    const uint16_t *s = c->k_scale + ((long)kh * c->num_blocks + block) * hd;
    const uint16_t *z = c->k_zero + ((long)kh * c->num_blocks + block) * hd;
    for (int g = 0; g < c->group; g++) {
        float total = 0.0f;
        for (int d = 0; d < hd; d++) {
            qs[g * hd + d] = q[g * hd + d] * (half_to_float(s[d]) * c->unit);
            total += q[g * hd + d] * half_to_float(z[d]);
        }
        qz[g] = total;
    }
}

/* scores[g * len + t - lo] = scale * q_g . k_t for the visible keys t in [lo, lo + len). */
KVQ_INLINE void key_scores(const int fmt, const kvq_cache *c, const kvq_step *s, int i, int kh, int lo, int len,
                           float *scores, float *row, float *qs, float *qz) {
    int hd = c->head_dim, vg = c->value_group, groups = hd / vg, bs = c->block_size, cw = code_width(c);
    const int64_t *table = s->tables + (long)i * s->width;
    const float *q = s->q + ((long)i * c->kv_heads + kh) * c->group * hd;
    run_t r;
    for (int j = 0; runs_of(table, bs, lo, len, j, &r); j++) {
        long base = ((long)kh * c->num_blocks + r.block) * bs, next = next_base(c, table, lo, len, j, kh);
        const uint8_t *codes = (const uint8_t *)c->k_codes + base * cw;
        const uint8_t *ahead = next < 0 ? NULL : (const uint8_t *)c->k_codes + next * cw;  /* [bs, cw] */
        if (ahead) {  /* the next block's key params: per channel [hd], or per token [bs, groups] */
            long at = fmt != KVQ_INT8 ? next / bs * hd : next * groups, bytes = 2L * (fmt != KVQ_INT8 ? hd : bs * groups);
            for (long k = 0; k < bytes; k += 64) {
                prefetch((const char *)(c->k_scale + at) + k);
                if (fmt != KVQ_INT8) prefetch((const char *)(c->k_zero + at) + k);
            }
        }
        if (fmt != KVQ_INT8) {  /* per channel per block */
            fold_block(c, q, kh, r.block, qs, qz);
            for (int o = r.from, at = r.index; o < r.to; o++, at++) {
                if (ahead) prefetch(ahead + (long)o * cw), prefetch(ahead + (long)o * cw + cw - 1);
                widen(fmt, codes + (long)o * cw, hd, row);
                for (int g = 0; g < c->group; g++) scores[(long)g * len + at] = (dot(qs + g * hd, row, hd) + qz[g]) * s->scale;
            }
            continue;
        }
        for (int o = r.from, at = r.index; o < r.to; o++, at++) {  /* per token, per group */
            const uint16_t *ks = c->k_scale + (base + o) * groups;
            if (ahead) prefetch(ahead + (long)o * cw), prefetch(ahead + (long)o * cw + cw - 1);
            widen(fmt, codes + (long)o * cw, hd, row);
            for (int g = 0; g < c->group; g++) {
                float total = 0.0f;
                for (int G = 0; G < groups; G++)
                    total += dot(q + g * hd + G * vg, row + G * vg, vg) * (half_to_float(ks[G]) * c->unit);
                scores[(long)g * len + at] = total * s->scale;
            }
        }
    }
}

static void softmax(float *p, int len) {  /* in place, float32: exp(x - max) / sum */
    float top = -INFINITY, total = 0.0f;
    for (int t = 0; t < len; t++) top = p[t] > top ? p[t] : top;
    for (int t = 0; t < len; t++) { p[t] = expf(p[t] - top); total += p[t]; }
    for (int t = 0; t < len; t++) p[t] /= total;
}

/* out[head kh * group + g] = sum_t weights[g * len + t - lo] v_t; zsum: group * head_dim / value_group floats. */
KVQ_INLINE void weighted_values(const int fmt, const kvq_cache *c, const kvq_step *s, int i, int kh, int lo, int len,
                                const float *weights, float *row, float *zsum) {
    int hd = c->head_dim, vg = c->value_group, groups = hd / vg, bs = c->block_size, cw = code_width(c);
    const int64_t *table = s->tables + (long)i * s->width;
    float *out = s->out + ((long)i * c->kv_heads + kh) * c->group * hd;  /* [group, hd] */
    memset(out, 0, (size_t)c->group * hd * sizeof(float));
    memset(zsum, 0, (size_t)c->group * groups * sizeof(float));
    run_t r;
    for (int j = 0; runs_of(table, bs, lo, len, j, &r); j++) {
        long base = ((long)kh * c->num_blocks + r.block) * bs, next = next_base(c, table, lo, len, j, kh);
        if (next >= 0)  /* the next block's value params, [bs, groups] each */
            for (long k = 0; k < 2L * bs * groups; k += 64) {
                prefetch((const char *)(c->v_scale + next * groups) + k);
                if (fmt == KVQ_INT4) prefetch((const char *)(c->v_zero + next * groups) + k);
            }
        for (int o = r.from, at = r.index; o < r.to; o++, at++) {
            if (next >= 0) {
                const uint8_t *ahead = (const uint8_t *)c->v_codes + (next + o) * cw;
                prefetch(ahead), prefetch(ahead + cw - 1);
            }
            widen(fmt, (const uint8_t *)c->v_codes + (base + o) * cw, hd, row);
            const uint16_t *vs = c->v_scale + (base + o) * groups;
            const uint16_t *vz = fmt == KVQ_INT4 ? c->v_zero + (base + o) * groups : NULL;
            for (int G = 0; G < groups; G++) {
                float scale = half_to_float(vs[G]) * c->unit, zero = vz ? half_to_float(vz[G]) : 0.0f;
                for (int g = 0; g < c->group; g++) {
                    float w = weights[(long)g * len + at];
                    axpy(out + g * hd + G * vg, w * scale, row + G * vg, vg);
                    if (vz) zsum[g * groups + G] += w * zero;
                }
            }
        }
    }
    if (fmt == KVQ_INT4)
        for (int g = 0; g < c->group; g++)
            for (int d = 0; d < hd; d++) out[g * hd + d] += zsum[g * groups + d / vg];
}

/* One (sequence, kv head): scores, softmax, weighted values; fmt a constant, so each format gets its own loops. */
KVQ_INLINE void attend(const int fmt, const kvq_cache *c, const kvq_step *s, int i, int kh, int lo, int len,
                       float *scores, float *row, float *qs, float *qz, float *zsum) {
    key_scores(fmt, c, s, i, kh, lo, len, scores, row, qs, qz);
    for (int g = 0; g < c->group; g++) softmax(scores + (long)g * len, len);
    weighted_values(fmt, c, s, i, kh, lo, len, scores, row, zsum);
}

static void visible(const kvq_step *s, int i, int *lo, int *len) {  /* the keys sequence i reads */
    int n = s->seq_lens[i];
    *lo = s->window > 0 && n > s->window ? n - s->window : 0;
    *len = n - *lo;
}

/* Fills s->out. Returns 0, -1 for an unknown format or a bad shape, -2 if out of memory. */
int kv_quant_decode(const kvq_cache *c, const kvq_step *s, int nthreads) {
    if (c->fmt < KVQ_INT8 || c->fmt > KVQ_INT4 || c->value_group < 1 || c->head_dim % c->value_group
        || (c->fmt == KVQ_INT4 && c->head_dim % 2) || (c->fmt != KVQ_INT8 && !c->k_zero) || (c->fmt == KVQ_INT4 && !c->v_zero))
        return -1;
    int hd = c->head_dim, longest = 1;
    for (int i = 0; i < s->n; i++) {
        int lo, len;
        visible(s, i, &lo, &len);
        longest = len > longest ? len : longest;
    }
    if (nthreads < 1) nthreads = 1;
    /* per thread: scores [group, longest], a row [hd], qs [group, hd], qz [group], zsum [group, hd / vg] */
    size_t per_thread = (size_t)c->group * longest + hd + (size_t)c->group * hd + c->group + (size_t)c->group * hd;
    float *work = malloc((size_t)nthreads * per_thread * sizeof(float));
    if (!work) return -2;
    int tasks = s->n * c->kv_heads;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int task = 0; task < tasks; task++) {
#ifdef _OPENMP
        float *mine = work + (size_t)omp_get_thread_num() * per_thread;
#else
        float *mine = work;
#endif
        float *scores = mine, *row = scores + (size_t)c->group * longest, *qs = row + hd;
        float *qz = qs + (size_t)c->group * hd, *zsum = qz + c->group;
        int i = task / c->kv_heads, kh = task % c->kv_heads, lo, len;
        visible(s, i, &lo, &len);
        switch (c->fmt) {
        case KVQ_INT8: attend(KVQ_INT8, c, s, i, kh, lo, len, scores, row, qs, qz, zsum); break;
        case KVQ_FP8: attend(KVQ_FP8, c, s, i, kh, lo, len, scores, row, qs, qz, zsum); break;
        default: attend(KVQ_INT4, c, s, i, kh, lo, len, scores, row, qs, qz, zsum); break;
        }
    }
    free(work);
    return 0;
}
