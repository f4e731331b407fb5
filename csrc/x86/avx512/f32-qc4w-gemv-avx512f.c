/* f32-qc4w-gemv-avx512f.c - weight-only GEMV (M < 4: float32 activations x int4 weights) for
 * AVX-512F over 4 panels of 64 columns read as 4 concurrent streams, the int4 codes expanded in
 * registers (never to memory). Each int32 lane of a 64-byte load holds one column's 8 codes of a
 * step (format N64K8I4, cquant.h): code of k = 8t + b is the low nibble of byte b, k = 8t + 4 + b
 * the high one; a nibble becomes a signed int32 by a shift pair (vpslld, vpsrad 28), then a float.
 * 16 zmm accumulators, the 8 broadcasts of x shared by the 4 panels. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

/* nibble n (0..7: bits 4n..4n+3) of each lane as a float */
CQ_INLINE __m512 nib_f(__m512i v, const int n)
{
    if (n == 7) return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 28));
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28 - 4 * n), 28));
}

/* k = 8t + kk lives in nibble 2 * kk (kk < 4: low nibble of byte kk) or 2 * (kk - 4) + 1 */
#define Q4_VEC(p, V)                                                                              \
    {                                                                                             \
        const __m512i v = _mm512_loadu_si512((const void *)(bp + 64 * (V)));                      \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 0), x0, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 2), x1, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 4), x2, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 6), x3, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 1), x4, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 3), x5, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 5), x6, f##p##V);                                     \
        f##p##V = _mm512_fmadd_ps(nib_f(v, 7), x7, f##p##V);                                     \
    }
#define Q4_STEP(p)                                                                                \
    {                                                                                             \
        const int8_t *bp = panels[p] + t * step;                                                  \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST + 128), _MM_HINT_T0);                         \
        Q4_VEC(p, 0) Q4_VEC(p, 1) Q4_VEC(p, 2) Q4_VEC(p, 3)                                       \
    }
#define Q4_DECL(p) __m512 f##p##0 = _mm512_setzero_ps(), f##p##1 = f##p##0, f##p##2 = f##p##0, f##p##3 = f##p##0;
#define Q4_OUT1(p, V) _mm512_storeu_ps(y + 64 * (p) + 16 * (V), _mm512_fmadd_ps(f##p##V, \
    _mm512_loadu_ps(ws + 64 * (p) + 16 * (V)), _mm512_loadu_ps(y + 64 * (p) + 16 * (V))));
#define Q4_OUT(p) Q4_OUT1(p, 0) Q4_OUT1(p, 1) Q4_OUT1(p, 2) Q4_OUT1(p, 3)

void cq_f32_qc4w_gemv4_1x256c8_avx512f(int nr, int64_t nk8, const float *x, const int8_t *const *panels,
                                       int64_t step, const float *ws, float *y)
{
    (void)nr;
    Q4_DECL(0) Q4_DECL(1) Q4_DECL(2) Q4_DECL(3)
    for (int64_t t = 0; t < nk8; t++) {
        const float *xt = x + 8 * t;
        const __m512 x0 = _mm512_set1_ps(xt[0]), x1 = _mm512_set1_ps(xt[1]), x2 = _mm512_set1_ps(xt[2]);
        const __m512 x3 = _mm512_set1_ps(xt[3]), x4 = _mm512_set1_ps(xt[4]), x5 = _mm512_set1_ps(xt[5]);
        const __m512 x6 = _mm512_set1_ps(xt[6]), x7 = _mm512_set1_ps(xt[7]);
        Q4_STEP(0) Q4_STEP(1) Q4_STEP(2) Q4_STEP(3)
    }
    Q4_OUT(0) Q4_OUT(1) Q4_OUT(2) Q4_OUT(3)
}
CQ_TARGET_END
#endif
