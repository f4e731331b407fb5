/* hadamard-avx512.c - the activation quantizer's rotation (cq_linear_ex's x_hadamard) on zmm:
 * out = the unnormalised Walsh-Hadamard transform of each block of b values of x (times mul), and
 * max |out|, in the reference's order of float32 operations (ref/ref-kernels.c, bit-exact).
 * Blocks of 16 to 128 stay in registers (1 to 8 zmm): the stages h = 1, 2, 4, 8 inside each vector
 * (one permute and one FMA each: fma(v, +-1, swapped) rounds once from an exact product, so it is
 * the reference's a + c / a - c), then h = 16 .. b / 2 between vectors (add / sub). Larger blocks add
 * passes over out (in L1); blocks below 16 go to the AVX2 kernel.
 * Measured on the Sapphire Rapids-class Xeon (2 vCPUs), (384, 1536) M = 640 dynamic with b = 64:
 * see README "Rotation". */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <string.h>

CQ_INLINE __m512 fwht_in16(__m512 v)
{
    const __m512 one = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-1.0f);
    v = _mm512_fmadd_ps(v, _mm512_mask_blend_ps(0xAAAA, one, neg), _mm512_shuffle_ps(v, v, 0xB1));
    v = _mm512_fmadd_ps(v, _mm512_mask_blend_ps(0xCCCC, one, neg), _mm512_shuffle_ps(v, v, 0x4E));
    v = _mm512_fmadd_ps(v, _mm512_mask_blend_ps(0xF0F0, one, neg), _mm512_shuffle_f32x4(v, v, 0xB1));
    v = _mm512_fmadd_ps(v, _mm512_mask_blend_ps(0xFF00, one, neg), _mm512_shuffle_f32x4(v, v, 0x4E));
    return v;
}

/* |v| bit patterns: their int32 max is the float max, and >= 0x7f800000 means NaN / Inf */
CQ_INLINE __m512i absmax_bits(__m512i mx, __m512 v)
{
    return _mm512_max_epi32(mx, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

CQ_INLINE __m512i fwht_regs(const float *x, const float *mul, float *out, int nv, __m512i mx)
{
    __m512 r[8];
    for (int j = 0; j < nv; j++) {
        __m512 v = _mm512_loadu_ps(x + 16 * j);
        if (mul) v = _mm512_mul_ps(v, _mm512_loadu_ps(mul + 16 * j));
        r[j] = fwht_in16(v);
    }
    for (int h = 1; h < nv; h *= 2)
        for (int j = 0; j < nv; j++)
            if (!(j & h)) {
                const __m512 a = r[j], c = r[j + h];
                r[j] = _mm512_add_ps(a, c);
                r[j + h] = _mm512_sub_ps(a, c);
            }
    for (int j = 0; j < nv; j++) {
        _mm512_storeu_ps(out + 16 * j, r[j]);
        mx = absmax_bits(mx, r[j]);
    }
    return mx;
}

CQ_INLINE __m512i fwht_blocks(const float *x, const float *mul, int64_t n, int nv, float *out, __m512i mx)
{
    if (mul) {
        for (int64_t i = 0; i < n; i += 16 * nv) mx = fwht_regs(x + i, mul + i, out + i, nv, mx);
    } else {
        for (int64_t i = 0; i < n; i += 16 * nv) mx = fwht_regs(x + i, NULL, out + i, nv, mx);
    }
    return mx;
}

int cq_hadamard_absmax_avx512(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax)
{
    if (b < 16) return cq_hadamard_absmax_avx2(x, mul, n, b, out, amax);
    __m512i mx = _mm512_setzero_si512();
    if (b == 16) mx = fwht_blocks(x, mul, n, 1, out, mx);
    else if (b == 32) mx = fwht_blocks(x, mul, n, 2, out, mx);
    else if (b == 64) mx = fwht_blocks(x, mul, n, 4, out, mx);
    else mx = fwht_blocks(x, mul, n, 8, out, mx);
    if (b > 128) { /* the remaining stages as passes over out, then the max again */
        for (int64_t h = 128; h < b; h *= 2)
            for (int64_t i0 = 0; i0 < n; i0 += 2 * h)
                for (int64_t t = i0; t < i0 + h; t += 16) {
                    const __m512 a = _mm512_loadu_ps(out + t), c = _mm512_loadu_ps(out + t + h);
                    _mm512_storeu_ps(out + t, _mm512_add_ps(a, c));
                    _mm512_storeu_ps(out + t + h, _mm512_sub_ps(a, c));
                }
        mx = _mm512_setzero_si512();
        for (int64_t t = 0; t < n; t += 16) mx = absmax_bits(mx, _mm512_loadu_ps(out + t));
    }
    int32_t tmp[16], m = 0;
    _mm512_storeu_si512((void *)tmp, mx);
    for (int j = 0; j < 16; j++) m = tmp[j] > m ? tmp[j] : m;
    if (m >= 0x7f800000) {
        *amax = 0.0f;
        return 0;
    }
    memcpy(amax, &m, sizeof m);
    return 1;
}
CQ_TARGET_END
#endif
