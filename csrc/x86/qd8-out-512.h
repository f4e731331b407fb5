/* qd8-out-512.h - the int8 kernels' epilogue on zmm (cq_qd8_out modes, internal.h), shared by the
 * 64-column AVX-512BW, AVX-512 VNNI and AMX kernels. Included inside a file's CQ_TARGET_BEGIN
 * region (AVX-512 F/BW/DQ/VL at least), after <immintrin.h>, so these inline functions take that
 * file's target. */
#ifndef CQ_QD8_OUT_512_H
#define CQ_QD8_OUT_512_H
#include <string.h>

/* One k step of a 64-column panel (256 bytes, 4 lines) CQ_PF_DIST ahead into L1: at small M the
 * panel streams from memory once (at large M it is in L1/L2 and the 4 prefetches cost little). */
#define CQ_PF_STEP64(p)                                                                           \
    _mm_prefetch((const char *)(p) + CQ_PF_DIST, _MM_HINT_T0);                                    \
    _mm_prefetch((const char *)(p) + CQ_PF_DIST + 64, _MM_HINT_T0);                               \
    _mm_prefetch((const char *)(p) + CQ_PF_DIST + 128, _MM_HINT_T0);                              \
    _mm_prefetch((const char *)(p) + CQ_PF_DIST + 192, _MM_HINT_T0);

/* 4 consecutive int8 codes as one int32 (for a broadcast). */
CQ_INLINE int32_t cq_load4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Epilogue of vector v (columns 16v .. 16v+15) of row r of a 64-column tile, as cq_qd8_out says;
 * acc_in: add the caller's int32 sums first (o->acc_in, or 0 where the kernel did it itself). */
CQ_INLINE void cq_qd8_out_vec64(const cq_qd8_out *o, int r, int v, __m512i c, int acc_in)
{
    const int col = 16 * v;
    if (acc_in) c = _mm512_add_epi32(c, _mm512_loadu_si512((const void *)(o->acc + r * 64 + col)));
    if (o->mode == CQ_OUT_I32) { _mm512_storeu_si512((void *)(o->acc + r * 64 + col), c); return; }
    if (o->comp) c = _mm512_sub_epi32(c, _mm512_loadu_si512((const void *)(o->comp + col)));
    const __m512 f = _mm512_cvtepi32_ps(c);
    if (o->mode == CQ_OUT_FACC) {
        /* facc += acc_g * (sx * sw_g), the product capped at FLT_MAX as below */
        float *p = o->facc + r * 64 + col;
        const __m512 s = _mm512_min_ps(_mm512_set1_ps(3.402823466e38f),
                                       _mm512_mul_ps(_mm512_set1_ps(o->sx[r]), _mm512_loadu_ps(o->sw + col)));
        _mm512_storeu_ps(p, _mm512_fmadd_ps(f, s, _mm512_loadu_ps(p)));
        return;
    }
    int left = o->nc - col;
    if (left <= 0) return;
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    /* sx * sw, capped at FLT_MAX: an Inf would turn acc = 0 into NaN (NaN stays NaN: min's 2nd) */
    const __m512 s = _mm512_min_ps(_mm512_set1_ps(3.402823466e38f),
                                   _mm512_mul_ps(_mm512_set1_ps(o->sx[r]), _mm512_maskz_loadu_ps(m, o->sw + col)));
    const __m512 b = o->bias ? _mm512_maskz_loadu_ps(m, o->bias + col) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(o->y + r * o->ldy + col, m, _mm512_add_ps(_mm512_mul_ps(f, s), b));
}
#endif
