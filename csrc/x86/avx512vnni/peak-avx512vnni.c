/* peak-avx512vnni.c - register-only loops that measure one core's peak rate of vpdpbusd zmm and of
 * float32 FMA zmm (for `make bench`'s "% of peak"): 24 independent accumulators, no memory. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
#define R24(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) \
    X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
/* returns MACs done (iters * 24 instructions * 64 u8 x s8 products) */
double cq_peak_loop_vnni(int64_t iters)
{
    __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01020304);
#define D(i) __m512i c##i = _mm512_set1_epi32(i);
    R24(D)
#undef D
    for (int64_t it = 0; it < iters; it++) {
#define S(i) c##i = _mm512_dpbusd_epi32(c##i, a, b);
        R24(S)
#undef S
        __asm__ volatile("" : "+v"(a));
    }
    __m512i s = _mm512_setzero_si512();
#define A(i) s = _mm512_add_epi32(s, c##i);
    R24(A)
#undef A
    volatile int sink = _mm512_reduce_add_epi32(s);
    (void)sink;
    return (double)iters * 24.0 * 64.0;
}
double cq_peak_loop_fma512(int64_t iters)
{
    __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.999999f);
#define D(i) __m512 c##i = _mm512_set1_ps((float)i);
    R24(D)
#undef D
    for (int64_t it = 0; it < iters; it++) {
#define S(i) c##i = _mm512_fmadd_ps(c##i, a, b);
        R24(S)
#undef S
        __asm__ volatile("" : "+v"(a));
    }
    __m512 s = _mm512_setzero_ps();
#define A(i) s = _mm512_add_ps(s, c##i);
    R24(A)
#undef A
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return (double)iters * 24.0 * 16.0;
}
CQ_TARGET_END
#endif
