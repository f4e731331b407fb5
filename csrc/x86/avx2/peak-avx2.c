/* peak-avx2.c - register-only loops that measure one core's peak rate of vpmaddubsw ymm (the
 * AVX2 int8 path's multiply: 32 u8 x s8 products) and of float32 FMA ymm. */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
double cq_peak_loop_avx2_int8(int64_t iters)
{
    __m256i a = _mm256_set1_epi8(1), b = _mm256_set1_epi8(2);
#define D(i) __m256i c##i = _mm256_set1_epi16((short)i);
    R12(D)
#undef D
    for (int64_t it = 0; it < iters; it++) {
#define S(i) c##i = _mm256_maddubs_epi16(c##i, b);
        R12(S)
#undef S
        __asm__ volatile("" : "+x"(a), "+x"(b));
    }
    __m256i s = _mm256_setzero_si256();
#define A(i) s = _mm256_add_epi16(s, c##i);
    R12(A)
#undef A
    volatile int sink = _mm256_extract_epi16(s, 0);
    (void)sink; (void)a;
    return (double)iters * 12.0 * 32.0;
}
double cq_peak_loop_avx2_fma(int64_t iters)
{
    __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.999999f);
#define D(i) __m256 c##i = _mm256_set1_ps((float)i);
    R12(D)
#undef D
    for (int64_t it = 0; it < iters; it++) {
#define S(i) c##i = _mm256_fmadd_ps(c##i, a, b);
        R12(S)
#undef S
        __asm__ volatile("" : "+x"(a));
    }
    __m256 s = _mm256_setzero_ps();
#define A(i) s = _mm256_add_ps(s, c##i);
    R12(A)
#undef A
    float t[8];
    _mm256_storeu_ps(t, s);
    volatile float sink = t[0];
    (void)sink;
    return (double)iters * 12.0 * 8.0;
}
CQ_TARGET_END
#endif
