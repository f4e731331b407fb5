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

/* vpermt2ps indices of stage b: IDX[2b][c] = (c & ~2^b) + (bit b of c ? 16 : 0) for low', IDX[2b+1][c]
 * = (c | 2^b) + (bit b of c ? 16 : 0) for high' (16 + i picks lane i of the second operand) */
static const int32_t IDX[8][16] __attribute__((aligned(64))) = {
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
};

void cq_transpose_avx512(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd)
{
    __m512i lo[4], hi[4];
    for (int b = 0; b < 4; b++) {
        lo[b] = _mm512_load_si512((const void *)IDX[2 * b]);
        hi[b] = _mm512_load_si512((const void *)IDX[2 * b + 1]);
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
