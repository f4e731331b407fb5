/* f32-qc4w-gemv-avx512f.c - weight-only GEMV (M < 4: float32 activations x int4 weights) for
 * AVX-512F over 4 panels of 64 columns read as 4 concurrent streams, the int4 codes expanded in
 * registers (never to memory). Each int32 lane of a 64-byte load holds one column's 8 codes of a
 * step (format N64K8I4, cquant.h): code of k = 8t + b is the low nibble of byte b, k = 8t + 4 + b
 * the high one; a nibble selects its product from a table (below). 16 zmm accumulators, the 8
 * tables of x shared by the 4 panels. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

/* A code is looked up, not converted: for each k of the step, T_k[u] = x[k] * q(u) for the 16 4-bit
 * values u (q = u for u < 8, u - 16 above), and vpermps picks T_k[nibble] per lane, since it reads
 * only the low 4 bits of each index lane. So a nibble costs a shift (none for the lowest) and a
 * permute (port 5), then an add, where a shift pair and a vcvtdq2ps all on port 0 (Ice Lake /
 * Sapphire Rapids zmm) made the conversion port-0 bound (llvm-mca icelake-server: 307 cycles per
 * step of 4 panels, 21% of the FMA limit). Each product x * q is rounded once, then added. */
#define Q4_VEC(p, V)                                                                              \
    {                                                                                             \
        __m512i v = _mm512_loadu_si512((const void *)(bp + 64 * (V)));                            \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t0));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t4));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t1));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t5));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t2));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t6));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t3));                          \
        v = _mm512_srli_epi32(v, 4);                                                              \
        f##p##V = _mm512_add_ps(f##p##V, _mm512_permutexvar_ps(v, t7));                          \
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
    const __m512 qv = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    Q4_DECL(0) Q4_DECL(1) Q4_DECL(2) Q4_DECL(3)
    for (int64_t t = 0; t < nk8; t++) {
        const float *xt = x + 8 * t;
        const __m512 t0 = _mm512_mul_ps(_mm512_set1_ps(xt[0]), qv), t1 = _mm512_mul_ps(_mm512_set1_ps(xt[1]), qv);
        const __m512 t2 = _mm512_mul_ps(_mm512_set1_ps(xt[2]), qv), t3 = _mm512_mul_ps(_mm512_set1_ps(xt[3]), qv);
        const __m512 t4 = _mm512_mul_ps(_mm512_set1_ps(xt[4]), qv), t5 = _mm512_mul_ps(_mm512_set1_ps(xt[5]), qv);
        const __m512 t6 = _mm512_mul_ps(_mm512_set1_ps(xt[6]), qv), t7 = _mm512_mul_ps(_mm512_set1_ps(xt[7]), qv);
        Q4_STEP(0) Q4_STEP(1) Q4_STEP(2) Q4_STEP(3)
    }
    Q4_OUT(0) Q4_OUT(1) Q4_OUT(2) Q4_OUT(3)
}
CQ_TARGET_END
#endif
