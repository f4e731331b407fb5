/* cq_kernels_avx512.c - AVX-512 F/BW/VL + VNNI kernels (Cascade Lake, Ice Lake, Zen 4 and later).
 *
 * vpdpbusd multiplies u8 x s8 in groups of 4 and adds to int32 without saturation. Activations are
 * shifted to u8 (x + 128, a flip of the sign bit), so acc = sum (x+128) w = sum x w + 128 sum w; the
 * compensation 128 * sum w is accumulated by the same instruction from a vector of 0x80 bytes and
 * subtracted. Both sums wrap modulo 2^32, but the true result fits in int32 (nk4 <= CQ_CHUNK4), so
 * the difference is exact. The float kernels other than the tile reuse the AVX2 ones. */
#include "cq_internal.h"

#if defined(CQ_X86) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__clang__) || __GNUC__ >= 8)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#include <immintrin.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE int32_t load4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

ALWAYS_INLINE void s8_tile_mr(const int MR, int64_t nk4, const int8_t *a, int64_t lda,
                              const int8_t *b, int32_t *acc, float *facc, const float *ws)
{
    __m512i c[CQ_MR_S8];
    __m512i comp = _mm512_setzero_si512();
    const __m512i k80 = _mm512_set1_epi32((int32_t)0x80808080u);
    for (int r = 0; r < MR; r++) c[r] = _mm512_setzero_si512();
    for (int64_t t = 0; t < nk4; t++) {
        const __m512i bv = _mm512_loadu_si512((const void *)(b + t * CQ_PANEL_STEP));
        comp = _mm512_dpbusd_epi32(comp, k80, bv);
        for (int r = 0; r < MR; r++) {
            const __m512i xu = _mm512_xor_si512(_mm512_set1_epi32(load4(a + r * lda + 4 * t)), k80);
            c[r] = _mm512_dpbusd_epi32(c[r], xu, bv);
        }
    }
    for (int r = 0; r < MR; r++) {
        const __m512i s = _mm512_sub_epi32(c[r], comp);
        if (facc) {
            float *f = facc + r * CQ_NR;
            _mm512_storeu_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(ws), _mm512_loadu_ps(f)));
        } else {
            _mm512_storeu_si512((void *)(acc + r * CQ_NR), _mm512_add_epi32(s, _mm512_loadu_si512((const void *)(acc + r * CQ_NR))));
        }
    }
}

static void s8_tile_avx512(int mr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                           int32_t *acc, float *facc, const float *ws)
{
    switch (mr) {
    case 1: s8_tile_mr(1, nk4, a, lda, b, acc, facc, ws); break;
    case 2: s8_tile_mr(2, nk4, a, lda, b, acc, facc, ws); break;
    case 3: s8_tile_mr(3, nk4, a, lda, b, acc, facc, ws); break;
    default: s8_tile_mr(4, nk4, a, lda, b, acc, facc, ws); break;
    }
}

/* One row against four panels: the VNNI tile on each (a multi-stream VNNI loop is left for when
 * the path can be measured). */
static void s8_gemv4_avx512(int64_t nk4, const int8_t *a, const int8_t *const *panels, int32_t *acc)
{
    for (int p = 0; p < 4; p++) s8_tile_mr(1, nk4, a, 4 * nk4, panels[p], acc + p * CQ_NR, NULL, NULL);
}

ALWAYS_INLINE void f32_tile_mr(const int MR, int64_t kc, const float *a, int64_t lda,
                               const float *bb, float *c, int64_t ldc)
{
    __m512 cv[CQ_MR_F32];
    for (int r = 0; r < MR; r++) cv[r] = _mm512_loadu_ps(c + r * ldc);
    for (int64_t kk = 0; kk < kc; kk++) {
        const __m512 bv = _mm512_loadu_ps(bb + kk * CQ_NR);
        for (int r = 0; r < MR; r++) cv[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + kk]), bv, cv[r]);
    }
    for (int r = 0; r < MR; r++) _mm512_storeu_ps(c + r * ldc, cv[r]);
}

static void f32_tile_avx512(int mr, int64_t kc, const float *a, int64_t lda, const float *bb, float *c,
                            int64_t ldc)
{
    switch (mr) {
    case 1: f32_tile_mr(1, kc, a, lda, bb, c, ldc); break;
    case 2: f32_tile_mr(2, kc, a, lda, bb, c, ldc); break;
    case 3: f32_tile_mr(3, kc, a, lda, bb, c, ldc); break;
    case 4: f32_tile_mr(4, kc, a, lda, bb, c, ldc); break;
    case 5: f32_tile_mr(5, kc, a, lda, bb, c, ldc); break;
    default: f32_tile_mr(6, kc, a, lda, bb, c, ldc); break;
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const cq_kernels cq_kernels_avx512 = {
    CQ_ISA_AVX512VNNI, cq_absmax_avx2, cq_quantize_avx2, s8_tile_avx512,
    cq_f32_dequant_avx2, f32_tile_avx512, cq_gelu_avx2, cq_dequant_avx2,
    s8_gemv4_avx512, cq_f32_gemv4_avx2,
};
#elif defined(CQ_X86)
const cq_kernels cq_kernels_avx512 = {CQ_ISA_AVX512VNNI, 0, 0, 0, 0, 0, 0, 0, 0, 0};
#endif
