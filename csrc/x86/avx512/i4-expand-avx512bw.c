/* i4-expand-avx512bw.c - steps of int4 panel rows to int8 (pack.c, cq_i4_expand) on zmm: 64
 * bytes of packed nibbles become 64 low codes and 64 high codes per iteration, as the AVX2 step
 * does 32 (mask / shift, then (v ^ 8) - 8 sign-extends a 4-bit two's complement code). nb is a
 * multiple of 64 (4 * the output panel width: 64 or 256). */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

void cq_i4_rows_avx512bw(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out)
{
    const __m512i m = _mm512_set1_epi8(15), e = _mm512_set1_epi8(8);
    for (int64_t j = 0; j < n; j++, src += stride, out += 2 * (int64_t)nb)
        for (int i = 0; i < nb; i += 64) {
            const __m512i v = _mm512_loadu_si512((const void *)(src + i));
            const __m512i l = _mm512_and_si512(v, m), h = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
            _mm512_storeu_si512((void *)(out + i), _mm512_sub_epi8(_mm512_xor_si512(l, e), e));
            _mm512_storeu_si512((void *)(out + nb + i), _mm512_sub_epi8(_mm512_xor_si512(h, e), e));
        }
}
CQ_TARGET_END
#endif
