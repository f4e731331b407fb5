/* transpose-avx512.c - the element-wise table's transpose on zmm (internal.h): blocks of 16 rows
 * loaded (masked to cols <= 16 floats), transposed in registers, stored as cols rows of 16. Used by
 * the per-group GEMVs to turn (N, groups) scales into per-group rows of the 4 panels' columns
 * (linear.c, gather_scales), where the scalar loop took as long as the int4 GEMV kernel itself.
 * The 16 x 16 transpose swaps row and column index bits one at a time: for bit b, rows r and
 * r | 2^b (bit b of r clear) become
 *   low'[c]  = (bit b of c ? high : low)[c & ~2^b],   high'[c] = (bit b of c ? high : low)[c | 2^b],
 * one vpermt2ps each: 4 stages x 8 pairs x 2 = 64 permutes per 256 floats (port 5). */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

void cq_transpose_avx512(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd)
{
    __m512i lo[4], hi[4];
    for (int b = 0; b < 4; b++) {
        int il[16], ih[16];
        for (int c = 0; c < 16; c++) {
            const int sel = (c >> b) & 1 ? 16 : 0;
            il[c] = (c & ~(1 << b)) + sel;
            ih[c] = (c | (1 << b)) + sel;
        }
        lo[b] = _mm512_loadu_si512((const void *)il);
        hi[b] = _mm512_loadu_si512((const void *)ih);
    }
    const __mmask16 m = (__mmask16)((1u << cols) - 1u);
    int64_t r0 = 0;
    for (; r0 + 16 <= rows; r0 += 16) {
        __m512 v[16];
        for (int r = 0; r < 16; r++) v[r] = _mm512_maskz_loadu_ps(m, src + (r0 + r) * lds);
        for (int b = 0; b < 4; b++)
            for (int r = 0; r < 16; r++)
                if (!(r & (1 << b))) {
                    const __m512 l = v[r], h = v[r | (1 << b)];
                    v[r] = _mm512_permutex2var_ps(l, lo[b], h);
                    v[r | (1 << b)] = _mm512_permutex2var_ps(l, hi[b], h);
                }
        for (int c = 0; c < cols; c++) _mm512_storeu_ps(dst + c * ldd + r0, v[c]);
    }
    for (; r0 < rows; r0++)
        for (int c = 0; c < cols; c++) dst[c * ldd + r0] = src[r0 * lds + c];
}
CQ_TARGET_END
#endif
