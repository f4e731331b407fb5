/* f32-qc4w-gemv-avx2.c - weight-only GEMV (M < 4: float32 activations x int4 weights) for AVX2 +
 * FMA over 4 panels of 16 columns (slices of N16K8I4 or N64K8I4 panels: `step` bytes apart per k
 * step of 8), the int4 codes expanded in registers (never to memory). Each int32 lane holds one
 * column's 8 codes of a step (cquant.h); a nibble becomes a signed int32 by a shift pair, then a
 * float. 8 ymm accumulators; the step is done in two halves of 4 broadcasts of x (low nibbles:
 * k = 8t..8t+3, high: 8t+4..8t+7) so that 16 registers suffice. */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>

CQ_INLINE __m256 nib_f(__m256i v, const int n)
{
    if (n == 7) return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 28));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28 - 4 * n), 28));
}

#define H_VEC(p, V, H)                                                                            \
    {                                                                                             \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(panels[p] + t * step + 32 * (V))); \
        f##p##V = _mm256_fmadd_ps(nib_f(v, 0 + (H)), x0, f##p##V);                               \
        f##p##V = _mm256_fmadd_ps(nib_f(v, 2 + (H)), x1, f##p##V);                               \
        f##p##V = _mm256_fmadd_ps(nib_f(v, 4 + (H)), x2, f##p##V);                               \
        f##p##V = _mm256_fmadd_ps(nib_f(v, 6 + (H)), x3, f##p##V);                               \
    }
#define H_ALL(H) H_VEC(0, 0, H) H_VEC(0, 1, H) H_VEC(1, 0, H) H_VEC(1, 1, H) \
                 H_VEC(2, 0, H) H_VEC(2, 1, H) H_VEC(3, 0, H) H_VEC(3, 1, H)

void cq_f32_qc4w_gemv4_1x64c8_avx2(int nr, int64_t nk8, const float *x, const int8_t *const *panels,
                                   int64_t step, const float *ws, float *y)
{
    (void)nr;
    __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00, f30 = f00, f31 = f00;
    for (int64_t t = 0; t < nk8; t++) {
        for (int p = 0; p < 4; p++) _mm_prefetch((const char *)(panels[p] + t * step + CQ_PF_DIST), _MM_HINT_T0);
        {
            const __m256 x0 = _mm256_broadcast_ss(x + 8 * t), x1 = _mm256_broadcast_ss(x + 8 * t + 1);
            const __m256 x2 = _mm256_broadcast_ss(x + 8 * t + 2), x3 = _mm256_broadcast_ss(x + 8 * t + 3);
            H_ALL(0)
        }
        {
            const __m256 x0 = _mm256_broadcast_ss(x + 8 * t + 4), x1 = _mm256_broadcast_ss(x + 8 * t + 5);
            const __m256 x2 = _mm256_broadcast_ss(x + 8 * t + 6), x3 = _mm256_broadcast_ss(x + 8 * t + 7);
            H_ALL(1)
        }
    }
#define H_OUT(p)                                                                                  \
    _mm256_storeu_ps(y + 16 * (p), _mm256_fmadd_ps(f##p##0, _mm256_loadu_ps(ws + 16 * (p)), _mm256_loadu_ps(y + 16 * (p)))); \
    _mm256_storeu_ps(y + 16 * (p) + 8, _mm256_fmadd_ps(f##p##1, _mm256_loadu_ps(ws + 16 * (p) + 8), _mm256_loadu_ps(y + 16 * (p) + 8)));
    H_OUT(0) H_OUT(1) H_OUT(2) H_OUT(3)
#undef H_OUT
}
CQ_TARGET_END
#endif
