/* qd8-out-256.h - the int8 kernels' epilogue on ymm (cq_qd8_out modes, internal.h), shared by the
 * 16-column AVX2 and AVX-VNNI tiles. Included inside a file's CQ_TARGET_BEGIN("avx2,fma"...)
 * region, after <immintrin.h>, so these inline functions take that file's target. */
#ifndef CQ_QD8_OUT_256_H
#define CQ_QD8_OUT_256_H
#include <string.h>

/* 4 consecutive int8 codes as one int32 (for a broadcast). */
CQ_INLINE int32_t cq_load4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Epilogue of one row's two int32 vectors (columns 0-7, 8-15), as cq_qd8_out says. */
CQ_INLINE void cq_qd8_out_row16(const cq_qd8_out *o, int r, __m256i c0, __m256i c1)
{
    if (o->acc_in) {
        c0 = _mm256_add_epi32(c0, _mm256_loadu_si256((const __m256i *)(o->acc + r * 16)));
        c1 = _mm256_add_epi32(c1, _mm256_loadu_si256((const __m256i *)(o->acc + r * 16 + 8)));
    }
    if (o->mode == CQ_OUT_I32) {
        _mm256_storeu_si256((__m256i *)(o->acc + r * 16), c0);
        _mm256_storeu_si256((__m256i *)(o->acc + r * 16 + 8), c1);
        return;
    }
    if (o->comp) {
        c0 = _mm256_sub_epi32(c0, _mm256_loadu_si256((const __m256i *)o->comp));
        c1 = _mm256_sub_epi32(c1, _mm256_loadu_si256((const __m256i *)(o->comp + 8)));
    }
    const __m256 f0 = _mm256_cvtepi32_ps(c0), f1 = _mm256_cvtepi32_ps(c1);
    if (o->mode == CQ_OUT_FACC) {
        /* facc += acc_g * (sx * sw_g), the product capped at FLT_MAX as below */
        float *f = o->facc + r * 16;
        const __m256 sxg = _mm256_set1_ps(o->sx[r]), big = _mm256_set1_ps(3.402823466e38f);
        const __m256 s0 = _mm256_min_ps(big, _mm256_mul_ps(sxg, _mm256_loadu_ps(o->sw)));
        const __m256 s1 = _mm256_min_ps(big, _mm256_mul_ps(sxg, _mm256_loadu_ps(o->sw + 8)));
        _mm256_storeu_ps(f, _mm256_fmadd_ps(f0, s0, _mm256_loadu_ps(f)));
        _mm256_storeu_ps(f + 8, _mm256_fmadd_ps(f1, s1, _mm256_loadu_ps(f + 8)));
        return;
    }
    /* y = acc * (sx * sw) + b: the contract's order (sx * sw first) */
    const __m256 sx = _mm256_set1_ps(o->sx[r]);
    const __m256 b0 = o->bias ? _mm256_loadu_ps(o->bias) : _mm256_setzero_ps();
    const __m256 b1 = o->bias ? _mm256_loadu_ps(o->bias + 8) : _mm256_setzero_ps();
    float tmp[NR];
    /* sx * sw, capped at FLT_MAX: an Inf would turn acc = 0 into NaN (NaN stays NaN: min's 2nd) */
    const __m256 big = _mm256_set1_ps(3.402823466e38f);
    const __m256 s0 = _mm256_min_ps(big, _mm256_mul_ps(sx, _mm256_loadu_ps(o->sw)));
    const __m256 s1 = _mm256_min_ps(big, _mm256_mul_ps(sx, _mm256_loadu_ps(o->sw + 8)));
    _mm256_storeu_ps(tmp, _mm256_add_ps(_mm256_mul_ps(f0, s0), b0));
    _mm256_storeu_ps(tmp + 8, _mm256_add_ps(_mm256_mul_ps(f1, s1), b1));
    memcpy(o->y + r * o->ldy, tmp, sizeof(float) * (size_t)o->nc);
}
#endif
