/* qd8-f32-qc8w-gemm-4x64c4-avx512bw.c - dynamic int8 micro-kernel for AVX-512BW without VNNI
 * (Skylake-SP), format N64K4: a 4x64 tile (16 zmm accumulators). The AVX2 recipe on zmm: |w| is the
 * u8 operand of vpmaddubsw and x takes w's sign (AVX-512 has no vpsignb: a masked byte negate with
 * the mask of w's sign bits), so a pair sum is at most 2 * 127 * 127 = 32258 and never saturates;
 * vpmaddwd with ones widens to int32. Activations are s8: no compensation. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <string.h>

#define NR 64
#define STEP (NR * 4)
#include "../qd8-out-512.h"

#define DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define MAC(r, v) c##r##v = _mm512_add_epi32(c##r##v, _mm512_madd_epi16(_mm512_maddubs_epi16(ab##v, \
    _mm512_mask_sub_epi8(xb, n##v, zero, xb)), ones));
#define STEPR(r) { const __m512i xb = _mm512_set1_epi32(cq_load4(a + (r) * lda + 4 * t)); \
    MAC(r, 0) MAC(r, 1) MAC(r, 2) MAC(r, 3) }
#define OUT(r)                                                                                    \
    cq_qd8_out_vec64(o, r, 0, c##r##0, o->acc_in); cq_qd8_out_vec64(o, r, 1, c##r##1, o->acc_in);   \
    cq_qd8_out_vec64(o, r, 2, c##r##2, o->acc_in); cq_qd8_out_vec64(o, r, 3, c##r##3, o->acc_in);
#define LOADB(v) const __m512i b##v = _mm512_loadu_si512((const void *)(b + t * STEP + 64 * (v))); \
    const __m512i ab##v = _mm512_abs_epi8(b##v); const __mmask64 n##v = _mm512_movepi8_mask(b##v);
#define TILE(NAME, DECLS, STEPS, OUTS)                                                            \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();                 \
        DECLS                                                                                     \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            LOADB(0) LOADB(1) LOADB(2) LOADB(3)                                                   \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
TILE(gemm_1x64, DECL(0), STEPR(0), OUT(0))
TILE(gemm_2x64, DECL(0) DECL(1), STEPR(0) STEPR(1), OUT(0) OUT(1))
TILE(gemm_3x64, DECL(0) DECL(1) DECL(2), STEPR(0) STEPR(1) STEPR(2), OUT(0) OUT(1) OUT(2))
TILE(gemm_4x64, DECL(0) DECL(1) DECL(2) DECL(3), STEPR(0) STEPR(1) STEPR(2) STEPR(3),
     OUT(0) OUT(1) OUT(2) OUT(3))

void cq_qd8_f32_qc8w_gemm_4x64c4_avx512bw(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda,
                                          const int8_t *b, const cq_qd8_out *o)
{
    (void)nr;
    switch (mr) {
    case 1: gemm_1x64(nk4, a, lda, b, o); break;
    case 2: gemm_2x64(nk4, a, lda, b, o); break;
    case 3: gemm_3x64(nk4, a, lda, b, o); break;
    default: gemm_4x64(nk4, a, lda, b, o); break;
    }
}
CQ_TARGET_END
#endif
