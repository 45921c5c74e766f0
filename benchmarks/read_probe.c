/* The read bandwidth the roofline is measured against: each thread sums its share of a buffer,
 * cut into `streams` parts read side by side (one stream per thread is what a plain sum does; a
 * core keeps more reads in flight with a few). Benchmarks only: common.memory_read_bandwidth
 * compiles it with the machine's compiler and takes the best of a torch sum and these. */
#include <immintrin.h>
#include <omp.h>

float kv_read_probe(const float *x, long n, int streams, int nthreads) {
    float total = 0.0f;
    #pragma omp parallel num_threads(nthreads) reduction(+:total)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        long begin = n * tid / nt, end = n * (tid + 1) / nt, part = (end - begin) / streams / 16 * 16;
        __m256 a = _mm256_setzero_ps(), b = a;
        for (long i = 0; i < part; i += 16)
            for (int s = 0; s < streams; s++) {
                const float *p = x + begin + s * part + i;
                a = _mm256_add_ps(a, _mm256_loadu_ps(p));
                b = _mm256_add_ps(b, _mm256_loadu_ps(p + 8));
            }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(a, b));
        for (int k = 0; k < 8; k++) total += lanes[k];
    }
    return total;
}
