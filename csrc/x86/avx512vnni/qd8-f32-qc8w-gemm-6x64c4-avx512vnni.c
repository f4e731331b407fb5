/* qd8-f32-qc8w-gemm-6x64c4-avx512vnni.c - dynamic int8 micro-kernels for AVX-512 VNNI, format
 * N64K4: a 6x64 tile (24 zmm accumulators, 4 zmm of weights per k step, one vpbroadcastd load per
 * row) and a 1x256 GEMV over 4 panels (16 accumulators, 4 concurrent weight streams).
 *
 * vpdpbusd multiplies u8 x s8 in groups of 4 and adds to int32 without saturation. Its u8 operand
 * is the activations, quantized straight to u8 (x + 128) by the activation quantizer, so
 *   sum (x + 128) w = sum x w + 128 sum w,
 * and the compensation 128 * sum w comes from the column sums stored in the packed weight (pack.c):
 * nothing is spent on it in the k loop. The sums wrap modulo 2^32, but the true result fits in
 * int32 (k <= 131072 per int32 chunk), so the difference is exact.
 * Why 6x64 (see README "Measured performance" for the numbers): 24 accumulators + 4 weight vectors
 * + 1 broadcast fit in 32 zmm; per k step 24 vpdpbusd against 10 loads (4 weight vectors, 6
 * broadcasts), which keeps the two load ports below the multiply ports on Ice Lake / Cascade Lake;
 * embedding the broadcast in vpdpbusd ({1to16}) is only possible for its s8 operand, which would
 * turn the 4 weight loads into 24 broadcast loads. 64 columns divide 768, 4096, 11008. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>
#include <string.h>

#define NR 64
#define STEP (NR * 4)
#include "../qd8-out-512.h"

#define DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define STEPR(r)                                                                                  \
    {                                                                                             \
        const __m512i xb = _mm512_set1_epi32(cq_load4(a + (r) * lda + 4 * t));                       \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, xb, b0);                                           \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, xb, b1);                                           \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, xb, b2);                                           \
        c##r##3 = _mm512_dpbusd_epi32(c##r##3, xb, b3);                                           \
    }
#define OUT(r)                                                                                    \
    cq_qd8_out_vec64(o, r, 0, c##r##0, o->acc_in); cq_qd8_out_vec64(o, r, 1, c##r##1, o->acc_in);   \
    cq_qd8_out_vec64(o, r, 2, c##r##2, o->acc_in); cq_qd8_out_vec64(o, r, 3, c##r##3, o->acc_in);
/* Per k step: the panel's lines CQ_PF_DIST ahead into L1 (CQ_PF_STEP64) and a line of the
 * driver's next panel into L2 (cq_qd8_pf_stream). */
#define TILE(NAME, DECLS, STEPS, OUTS)                                                            \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        DECLS                                                                                     \
        int64_t pf_step;                                                                          \
        const char *pf = cq_qd8_pf_stream(o, b, STEP, &pf_step);                                  \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            _mm_prefetch(pf + t * pf_step, _MM_HINT_T1);                                          \
            const __m512i b0 = _mm512_loadu_si512((const void *)(b + t * STEP));                  \
            const __m512i b1 = _mm512_loadu_si512((const void *)(b + t * STEP + 64));             \
            const __m512i b2 = _mm512_loadu_si512((const void *)(b + t * STEP + 128));            \
            const __m512i b3 = _mm512_loadu_si512((const void *)(b + t * STEP + 192));            \
            CQ_PF_STEP64(b + t * STEP)                                                            \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
TILE(gemm_1x64, DECL(0), STEPR(0), OUT(0))
TILE(gemm_2x64, DECL(0) DECL(1), STEPR(0) STEPR(1), OUT(0) OUT(1))
TILE(gemm_3x64, DECL(0) DECL(1) DECL(2), STEPR(0) STEPR(1) STEPR(2), OUT(0) OUT(1) OUT(2))
TILE(gemm_4x64, DECL(0) DECL(1) DECL(2) DECL(3), STEPR(0) STEPR(1) STEPR(2) STEPR(3),
     OUT(0) OUT(1) OUT(2) OUT(3))
TILE(gemm_5x64, DECL(0) DECL(1) DECL(2) DECL(3) DECL(4), STEPR(0) STEPR(1) STEPR(2) STEPR(3) STEPR(4),
     OUT(0) OUT(1) OUT(2) OUT(3) OUT(4))
TILE(gemm_6x64, DECL(0) DECL(1) DECL(2) DECL(3) DECL(4) DECL(5),
     STEPR(0) STEPR(1) STEPR(2) STEPR(3) STEPR(4) STEPR(5),
     OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5))

void cq_qd8_f32_qc8w_gemm_6x64c4_avx512vnni(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda,
                                            const int8_t *b, const cq_qd8_out *o)
{
    (void)nr;
    switch (mr) {
    case 1: gemm_1x64(nk4, a, lda, b, o); break;
    case 2: gemm_2x64(nk4, a, lda, b, o); break;
    case 3: gemm_3x64(nk4, a, lda, b, o); break;
    case 4: gemm_4x64(nk4, a, lda, b, o); break;
    case 5: gemm_5x64(nk4, a, lda, b, o); break;
    default: gemm_6x64(nk4, a, lda, b, o); break;
    }
}

/* M = 1: one u8 row against 4 panels (4 concurrent streams, 16 accumulators); raw sums. */
#define GV(p, v) g##p##v = _mm512_dpbusd_epi32(g##p##v, xb, _mm512_loadu_si512((const void *)(b##p + t * STEP + 64 * (v))));
#define GP(p)                                                                                     \
    _mm_prefetch((const char *)(b##p + t * STEP + CQ_PF_DIST), _MM_HINT_T0);                      \
    _mm_prefetch((const char *)(b##p + t * STEP + CQ_PF_DIST + 128), _MM_HINT_T0);                \
    GV(p, 0) GV(p, 1) GV(p, 2) GV(p, 3)
#define GD(p) __m512i g##p##0 = _mm512_setzero_si512(), g##p##1 = g##p##0, g##p##2 = g##p##0, g##p##3 = g##p##0;
#define GO(p)                                                                                     \
    _mm512_storeu_si512((void *)(acc + (p) * NR), g##p##0);                                       \
    _mm512_storeu_si512((void *)(acc + (p) * NR + 16), g##p##1);                                  \
    _mm512_storeu_si512((void *)(acc + (p) * NR + 32), g##p##2);                                  \
    _mm512_storeu_si512((void *)(acc + (p) * NR + 48), g##p##3);
void cq_qd8_f32_qc8w_gemv4_1x256c4_avx512vnni(int nr, int64_t nk4, const int8_t *a,
                                              const int8_t *const *panels, int64_t panel_stride,
                                              int32_t *acc)
{
    (void)nr; (void)panel_stride;
    const int8_t *b0 = panels[0], *b1 = panels[1], *b2 = panels[2], *b3 = panels[3];
    GD(0) GD(1) GD(2) GD(3)
    for (int64_t t = 0; t < nk4; t++) {
        const __m512i xb = _mm512_set1_epi32(cq_load4(a + 4 * t));
        GP(0) GP(1) GP(2) GP(3)
    }
    GO(0) GO(1) GO(2) GO(3)
}
CQ_TARGET_END
#endif
