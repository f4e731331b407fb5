/* quantize-avx512.c - the activation quantizer's row maximum and code pass on zmm (the AVX-512
 * paths' element-wise table, x86/avx2/elementwise-avx2.c): q = clamp(round_half_even(v / s),
 * -127, 127) ^ flip for v = x or the float32 product x * mul, bit-exact with ref/. As the AVX2
 * pass: v * (1 / s) where that provably rounds to the same integer (within 2^-15 of no
 * half-integer, |q0| <= 128, a normal reciprocal), the true division otherwise; 16 lanes, the codes
 * narrowed by vpmovsdb. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <math.h>
#include <string.h>

/* A vector q16's test refused (a lane near a half-integer; rare): the true division. */
static __m128i q16_div(__m512 v, __m512 s, __m128i flip)
{
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    return _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(t)) /* t is integral */, flip);
}

/* The common vector, in 10 zmm operations (14 before 2026-11-30): ti = round_half_even(v * r) as
 * int32 (embedded rounding, whatever MXCSR says), t its float. When every lane is 2^-15 from a
 * half-integer (d, exact by Sterbenz), ti is v / s rounded (the bound in the head comment) for |q0| <=
 * 128, and for 128 < |q0| < 2^31 its sign and |ti| >= 128 are right, which is all the clamp needs:
 * vpmaxsd -127 and vpmovsdb's saturation at 127 give clamp(ti, -127, 127). A NaN / Inf or |q0| >=
 * 2^31 lane (ti = INT_MIN, far from q0) fails the test; only q0 = -2^31 passes it, and clamps to
 * -127 as it should. Any other vector is divided (q16_div: the same codes, slower).
 * SIMDe (CQ_EMU) has no embedded-rounding convert: there t = vrndscaleps(q0) and ti = (int32) of t
 * clamped to <= 127 first (a finite |q0| >= 2^31 passes the test with d = 0 in that form). */
CQ_INLINE __m128i q16(__m512 v, __m512 s, __m512 r, __m128i flip)
{
    const __m512 q0 = _mm512_mul_ps(v, r);
#ifdef CQ_EMU
    const __m512 t = _mm512_roundscale_ps(q0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 d = _mm512_abs_ps(_mm512_sub_ps(q0, t));
#else
    const __m512i ti = _mm512_cvt_roundps_epi32(q0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 d = _mm512_abs_ps(_mm512_sub_ps(q0, _mm512_cvtepi32_ps(ti)));
#endif
    if (_mm512_cmp_ps_mask(d, _mm512_set1_ps(0.5f - 0x1p-15f), _CMP_LT_OQ) != 0xFFFF)
        return q16_div(v, s, flip);
#ifdef CQ_EMU
    const __m512i ti = _mm512_cvttps_epi32(_mm512_min_ps(t, _mm512_set1_ps(127.0f)));
#endif
    return _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_max_epi32(ti, _mm512_set1_epi32(-127))), flip);
}

/* max |v| over n floats and whether all are finite (v = x, or x * mul, stored into prod unless NULL),
 * as absmax_core in x86/avx2/elementwise-avx2.c: the max of the int32 bit patterns of |v| (NaN / Inf
 * patterns above every finite one), here on zmm, four chains of 16 lanes, the tail masked. For rows
 * in L1 / L2 it does the AVX2 pass's work in half the instructions. */
CQ_INLINE int absmax512(const float *x, const float *mul, float *prod, int64_t n, float *amax)
{
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
#define CQ_ABS16(acc, off, msk)                                                                      \
    do {                                                                                           \
        __m512 v = _mm512_maskz_loadu_ps((msk), x + i + (off));                                    \
        if (mul) {                                                                                 \
            v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps((msk), mul + i + (off)));                   \
            if (prod) _mm512_mask_storeu_ps(prod + i + (off), (msk), v);                           \
        }                                                                                          \
        acc = _mm512_max_epi32(acc, _mm512_and_si512(_mm512_castps_si512(v), absmask));            \
    } while (0)
    for (; i + 64 <= n; i += 64) {
        CQ_ABS16(m0, 0, 0xFFFF);
        CQ_ABS16(m1, 16, 0xFFFF);
        CQ_ABS16(m2, 32, 0xFFFF);
        CQ_ABS16(m3, 48, 0xFFFF);
    }
    for (; i + 16 <= n; i += 16) CQ_ABS16(m0, 0, 0xFFFF);
    if (i < n) CQ_ABS16(m1, 0, (__mmask16)((1u << (n - i)) - 1u)); /* masked-off lanes read as 0 */
#undef CQ_ABS16
    /* the 16 lanes' maximum in registers (SIMDe, which tests this file, has no reduce_max; and a
     * zmm store into a local array became an aligned store GCC -O1 made of it, which faults on
     * ASan's 32-byte aligned fake stack) */
    const __m512i mz = _mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3));
    const __m256i my = _mm256_max_epi32(_mm512_castsi512_si256(mz), _mm512_extracti64x4_epi64(mz, 1));
    __m128i mx = _mm_max_epi32(_mm256_castsi256_si128(my), _mm256_extracti128_si256(my, 1));
    mx = _mm_max_epi32(mx, _mm_shuffle_epi32(mx, 0x4E));
    mx = _mm_max_epi32(mx, _mm_shuffle_epi32(mx, 0xB1));
    const int32_t m = _mm_cvtsi128_si32(mx);
    if (m >= 0x7f800000) {
        *amax = 0.0f;
        return 0;
    }
    memcpy(amax, &m, sizeof m);
    return 1;
}

int cq_absmax_avx512(const float *x, int64_t n, float *amax) { return absmax512(x, NULL, NULL, n, amax); }

int cq_absmax_mul_avx512(const float *x, const float *mul, int64_t n, float *prod, float *amax)
{
    return prod ? absmax512(x, mul, prod, n, amax) : absmax512(x, mul, NULL, n, amax);
}

CQ_INLINE __m512 recip_or_nan(float scale)
{
    const float r = 1.0f / scale;
    return _mm512_set1_ps(r >= 1.17549435e-38f && r <= 3.402823466e38f ? r : NAN);
}

static void tail(const float *x, const float *mul, int64_t i, int64_t n, float scale, int8_t *q, int flip)
{
    for (; i < n; i++) {
        float r = nearbyintf((mul ? x[i] * mul[i] : x[i]) / scale);
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[i] = (int8_t)((uint8_t)(int8_t)r ^ (uint8_t)flip);
    }
}

void cq_quantize_avx512(const float *x, int64_t n, float scale, int8_t *q, int flip)
{
    const __m512 s = _mm512_set1_ps(scale), r = recip_or_nan(scale);
    const __m128i f = _mm_set1_epi8((char)flip);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        _mm_storeu_si128((__m128i *)(q + i), q16(_mm512_loadu_ps(x + i), s, r, f));
        _mm_storeu_si128((__m128i *)(q + i + 16), q16(_mm512_loadu_ps(x + i + 16), s, r, f));
    }
    for (; i + 16 <= n; i += 16) _mm_storeu_si128((__m128i *)(q + i), q16(_mm512_loadu_ps(x + i), s, r, f));
    tail(x, NULL, i, n, scale, q, flip);
}

void cq_quantize_mul_avx512(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip)
{
    const __m512 s = _mm512_set1_ps(scale), r = recip_or_nan(scale);
    const __m128i f = _mm_set1_epi8((char)flip);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm_storeu_si128((__m128i *)(q + i),
                         q16(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(mul + i)), s, r, f));
    tail(x, mul, i, n, scale, q, flip);
}
CQ_TARGET_END
#endif
