/* x24-qc4w-gemv-avx512vnni.c - weight-only GEMV (M < 4) of float32 activations x int4 weights on
 * AVX-512 VNNI in exact integer arithmetic: x arrives as 24-bit fixed point (x[k] = xs * v[k] with
 * |v| <= 2^22, the driver's rounding), split into three planes of balanced base-256 digits
 * v = d2 * 65536 + d1 * 256 + d0, each d in [-128, 127] (the s8 operand of vpdpbusd); the int4
 * codes are its u8 operand as q + 8 in [1, 15], got from the packed nibbles (format N64K8I4) with a
 * shift and two vpternlogd ((v & 0x0F) ^ 0x08), so per 64-byte load (16 columns x 8 k) the cost
 * is 3 expansion uops + 6 vpdpbusd (3 digits x low / high nibbles) for 128 multiply-adds: 14 MACs
 * per port-0/5 uop, where the float GEMV (cq_f32_qc4w_gemv4_1x256c8_avx512f: a table lookup and
 * an add per nibble) does 5.6. The + 8 is taken back per digit plane: comp[j] = 8 * sum d_j over
 * the segment, the accumulators start at -comp[j]. The digit sums are exact (int32: 15 * 128 * k
 * per segment, the driver keeps k <= 32768), then per column
 *   f = fma(fma((float)a2, 256, (float)a1), 256, (float)a0),   y = fma(f * xs, ws, y),
 * the reference's order (ref/ref-kernels.c), so this kernel is bit-identical to it.
 * Register tile: 2 panels x 4 vectors x 3 digits = 24 zmm accumulators, one half of the 4 panels
 * at a time (48 would not fit; two passes of 4 panels x 2 vectors, which keep 4 weight streams
 * going, measured slower: (4096, 4096) per channel 0.35 -> 0.44 ms). The x digits are {1to16}
 * broadcast loads. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>

#define TL_LO 0x6A /* ternary logic (a & b) ^ c */

#define X24_DECL(p, V) __m512i a0##p##V = n0, a1##p##V = n1, a2##p##V = n2;
#define X24_VEC(p, V)                                                                             \
    {                                                                                             \
        const __m512i v = _mm512_loadu_si512((const void *)(b##p + 64 * (V)));                    \
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), m0f, m08, TL_LO);    \
        const __m512i lo = _mm512_ternarylogic_epi32(v, m0f, m08, TL_LO);                          \
        a0##p##V = _mm512_dpbusd_epi32(a0##p##V, lo, d0l);                                        \
        a1##p##V = _mm512_dpbusd_epi32(a1##p##V, lo, d1l);                                        \
        a2##p##V = _mm512_dpbusd_epi32(a2##p##V, lo, d2l);                                        \
        a0##p##V = _mm512_dpbusd_epi32(a0##p##V, hi, d0h);                                        \
        a1##p##V = _mm512_dpbusd_epi32(a1##p##V, hi, d1h);                                        \
        a2##p##V = _mm512_dpbusd_epi32(a2##p##V, hi, d2h);                                        \
    }
#define X24_OUT(p, V, P)                                                                          \
    {                                                                                             \
        __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2##p##V), c256, _mm512_cvtepi32_ps(a1##p##V)); \
        f = _mm512_fmadd_ps(f, c256, _mm512_cvtepi32_ps(a0##p##V));                               \
        const int64_t o = 64 * (P) + 16 * (V);                                                    \
        _mm512_storeu_ps(y + o, _mm512_fmadd_ps(_mm512_mul_ps(f, vxs), _mm512_loadu_ps(ws + o), _mm512_loadu_ps(y + o))); \
    }

static inline int32_t ld4(const int8_t *p)
{
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

/* panels 2h and 2h + 1 (h = 0, 1), all 64 columns of each */
static inline void half(int64_t nk8, const int8_t *xd, int64_t xds, const int32_t *comp, float xs,
                        const int8_t *pa, const int8_t *pb, int64_t step, const float *ws, float *y, int h)
{
    const __m512i m0f = _mm512_set1_epi8(0x0F), m08 = _mm512_set1_epi8(0x08);
    const __m512i n0 = _mm512_set1_epi32(-comp[0]), n1 = _mm512_set1_epi32(-comp[1]), n2 = _mm512_set1_epi32(-comp[2]);
    const __m512 c256 = _mm512_set1_ps(256.0f), vxs = _mm512_set1_ps(xs);
    X24_DECL(0, 0) X24_DECL(0, 1) X24_DECL(0, 2) X24_DECL(0, 3)
    X24_DECL(1, 0) X24_DECL(1, 1) X24_DECL(1, 2) X24_DECL(1, 3)
    const int8_t *x0 = xd, *x1 = xd + xds, *x2 = xd + 2 * xds;
    for (int64_t t = 0; t < nk8; t++) {
        const int8_t *b0 = pa + t * step, *b1 = pb + t * step;
        _mm_prefetch((const char *)(b0 + CQ_PF_DIST), _MM_HINT_T0);
        _mm_prefetch((const char *)(b0 + CQ_PF_DIST + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(b1 + CQ_PF_DIST), _MM_HINT_T0);
        _mm_prefetch((const char *)(b1 + CQ_PF_DIST + 128), _MM_HINT_T0);
        const __m512i d0l = _mm512_set1_epi32(ld4(x0 + 8 * t)), d0h = _mm512_set1_epi32(ld4(x0 + 8 * t + 4));
        const __m512i d1l = _mm512_set1_epi32(ld4(x1 + 8 * t)), d1h = _mm512_set1_epi32(ld4(x1 + 8 * t + 4));
        const __m512i d2l = _mm512_set1_epi32(ld4(x2 + 8 * t)), d2h = _mm512_set1_epi32(ld4(x2 + 8 * t + 4));
        X24_VEC(0, 0) X24_VEC(0, 1) X24_VEC(0, 2) X24_VEC(0, 3)
        X24_VEC(1, 0) X24_VEC(1, 1) X24_VEC(1, 2) X24_VEC(1, 3)
    }
    X24_OUT(0, 0, 2 * h) X24_OUT(0, 1, 2 * h) X24_OUT(0, 2, 2 * h) X24_OUT(0, 3, 2 * h)
    X24_OUT(1, 0, 2 * h + 1) X24_OUT(1, 1, 2 * h + 1) X24_OUT(1, 2, 2 * h + 1) X24_OUT(1, 3, 2 * h + 1)
}

void cq_x24_qc4w_gemv4_1x256c8_avx512vnni(int nr, int64_t nk8, const int8_t *xd, int64_t xds, const int32_t *comp,
                                          float xs, const int8_t *const *panels, int64_t step, const float *ws,
                                          float *y)
{
    (void)nr;
    half(nk8, xd, xds, comp, xs, panels[0], panels[1], step, ws, y, 0);
    half(nk8, xd, xds, comp, xs, panels[2], panels[3], step, ws, y, 1);
}
CQ_TARGET_END
#endif
