/* i4-expand-avx2.c - steps of int4 panel rows to int8 (pack.c, cq_i4_expand): 32 bytes of
 * packed nibbles become 32 low codes and 32 high codes per iteration (mask / shift, then
 * (v ^ 8) - 8 sign-extends a 4-bit two's complement code). nb is a multiple of 32. */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2")
#include <immintrin.h>

void cq_i4_rows_avx2(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out)
{
    const __m256i m = _mm256_set1_epi8(15), e = _mm256_set1_epi8(8);
    for (int64_t j = 0; j < n; j++, src += stride, out += 2 * (int64_t)nb)
        for (int i = 0; i < nb; i += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
            const __m256i l = _mm256_and_si256(v, m), h = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
            _mm256_storeu_si256((__m256i *)(out + i), _mm256_sub_epi8(_mm256_xor_si256(l, e), e));
            _mm256_storeu_si256((__m256i *)(out + nb + i), _mm256_sub_epi8(_mm256_xor_si256(h, e), e));
        }
}
CQ_TARGET_END
#endif
