/* qd8-f32-qc8w-gemm-4x16c4-avxvnni.c - dynamic int8 micro-kernels for AVX-VNNI (the VEX-encoded
 * 256-bit vpdpbusd of Alder Lake and later, Sapphire Rapids, Zen 5), format N16K4: a 4x16 tile (8
 * ymm accumulators; AVX-VNNI machines without AVX-512 have 16 ymm registers) and a 1x64 GEMV over
 * 4 panels. Activations stay s8 and need no compensation: the u8 operand of vpdpbusd is |w| (taken
 * once per step) and the s8 operand is x carrying w's sign (vpsignb), both in [-127, 127], and
 * vpdpbusd adds the 4 products into int32 without saturating: exact, 2 instructions per 32
 * multiply-adds where the AVX2 recipe needs 4. */
#include "target.h"
#if CQ_CAN_TARGET_AVXVNNI
CQ_TARGET_BEGIN("avx2,fma,avxvnni")
#include <immintrin.h>
#include <string.h>

#define NR 16
#define STEP (NR * 4)
#include "../qd8-out-256.h"

#define DECL(r) __m256i c##r##0 = _mm256_setzero_si256(), c##r##1 = _mm256_setzero_si256();
#define STEPR(r)                                                                                  \
    {                                                                                             \
        const __m256i xb = _mm256_set1_epi32(cq_load4(a + (r) * lda + 4 * t));                       \
        c##r##0 = _mm256_dpbusd_avx_epi32(c##r##0, ab0, _mm256_sign_epi8(xb, b0));                \
        c##r##1 = _mm256_dpbusd_avx_epi32(c##r##1, ab1, _mm256_sign_epi8(xb, b1));                \
    }
#define OUT(r) cq_qd8_out_row16(o, r, c##r##0, c##r##1);
#define TILE(NAME, DECLS, STEPS, OUTS)                                                            \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        int64_t pf_step; /* the driver's next panel, into L2 */                                   \
        const char *pf = cq_qd8_pf_stream(o, b, STEP, &pf_step);                                  \
        DECLS                                                                                     \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            _mm_prefetch(pf + t * pf_step, _MM_HINT_T1);                                          \
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + t * STEP));               \
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + t * STEP + 32));          \
            const __m256i ab0 = _mm256_abs_epi8(b0), ab1 = _mm256_abs_epi8(b1);                   \
            _mm_prefetch((const char *)(b + t * STEP + CQ_PF_DIST), _MM_HINT_T0);                 \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
TILE(gemm_1x16, DECL(0), STEPR(0), OUT(0))
TILE(gemm_2x16, DECL(0) DECL(1), STEPR(0) STEPR(1), OUT(0) OUT(1))
TILE(gemm_3x16, DECL(0) DECL(1) DECL(2), STEPR(0) STEPR(1) STEPR(2), OUT(0) OUT(1) OUT(2))
TILE(gemm_4x16, DECL(0) DECL(1) DECL(2) DECL(3), STEPR(0) STEPR(1) STEPR(2) STEPR(3),
     OUT(0) OUT(1) OUT(2) OUT(3))

void cq_qd8_f32_qc8w_gemm_4x16c4_avxvnni(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda,
                                         const int8_t *b, const cq_qd8_out *o)
{
    (void)nr;
    switch (mr) {
    case 1: gemm_1x16(nk4, a, lda, b, o); break;
    case 2: gemm_2x16(nk4, a, lda, b, o); break;
    case 3: gemm_3x16(nk4, a, lda, b, o); break;
    default: gemm_4x16(nk4, a, lda, b, o); break;
    }
}

/* M = 1 against 4 panels (4 concurrent streams): |x| once per step, w takes x's sign. */
#define GD(p) __m256i g##p##0 = _mm256_setzero_si256(), g##p##1 = _mm256_setzero_si256();
#define GS(p)                                                                                     \
    {                                                                                             \
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(b##p + t * STEP));               \
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(b##p + t * STEP + 32));           \
        _mm_prefetch((const char *)(b##p + t * STEP + CQ_PF_DIST), _MM_HINT_T0);                  \
        g##p##0 = _mm256_dpbusd_avx_epi32(g##p##0, ax, _mm256_sign_epi8(w0, xb));                 \
        g##p##1 = _mm256_dpbusd_avx_epi32(g##p##1, ax, _mm256_sign_epi8(w1, xb));                 \
    }
#define GO(p)                                                                                     \
    _mm256_storeu_si256((__m256i *)(acc + (p) * NR), g##p##0);                                    \
    _mm256_storeu_si256((__m256i *)(acc + (p) * NR + 8), g##p##1);
void cq_qd8_f32_qc8w_gemv4_1x64c4_avxvnni(int nr, int64_t nk4, const int8_t *a, const int8_t *const *panels,
                                          int64_t panel_stride, int32_t *acc)
{
    (void)nr; (void)panel_stride;
    const int8_t *b0 = panels[0], *b1 = panels[1], *b2 = panels[2], *b3 = panels[3];
    GD(0) GD(1) GD(2) GD(3)
    for (int64_t t = 0; t < nk4; t++) {
        const __m256i xb = _mm256_set1_epi32(cq_load4(a + 4 * t));
        const __m256i ax = _mm256_abs_epi8(xb);
        GS(0) GS(1) GS(2) GS(3)
    }
    GO(0) GO(1) GO(2) GO(3)
}
CQ_TARGET_END
#endif
