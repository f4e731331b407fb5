/* float-ops-avx2.c - AVX2 + FMA float32 kernels for float_ops.c: row softmax (scale + additive
 * bias), LayerNorm with a fused residual add, one (batch, head) pair of attention. Tails use
 * vmaskmov loads and stores. (GELU on this path is elementwise-avx2.c's.) */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>
#include <math.h>

/* prototypes: internal.h */

/* lanes [0, n) set (n clamped to [0, 8]) */
CQ_INLINE __m256i tail8(int64_t n)
{
    const int c = n >= 8 ? 8 : (n <= 0 ? 0 : (int)n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* e^v for v <= 0 (or NaN), as in the AVX-512 file: Cephes' expf reduction and polynomial, 2^n in
 * the exponent bits (n in [-126, 0] after clamping v to -87, where 2^n e^r is still normal: no
 * subnormal, no microcode assist); below -87 the result is 0, NaN stays NaN. */
CQ_INLINE __m256 exp_nonpos(__m256 v)
{
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 keep = _mm256_cmp_ps(v, lo, _CMP_NLT_UQ); /* v >= lo, or NaN */
    v = _mm256_max_ps(lo, v);                              /* a NaN v is returned */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i b = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(keep, _mm256_mul_ps(e, _mm256_castsi256_ps(b)));
}

CQ_INLINE float hmax8(__m256 a)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* sum of the 8 lanes of a in double (a tree: no long dependency chain) */
CQ_INLINE double hsum8d(__m256 a)
{
    __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    __m128d e = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    return _mm_cvtsd_f64(_mm_add_sd(e, _mm_unpackhi_pd(e, e)));
}

static float softmax_exp_row(float *x, int64_t k, const float *bias, float scale)
{
    const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        v = bias ? _mm256_fmadd_ps(v, sc, _mm256_loadu_ps(bias + j)) : _mm256_mul_ps(v, sc);
        _mm256_storeu_ps(x + j, v);
        mx = _mm256_max_ps(mx, v);
    }
    if (j < k) {
        const __m256i m = tail8(k - j);
        __m256 v = _mm256_maskload_ps(x + j, m);
        v = bias ? _mm256_fmadd_ps(v, sc, _mm256_maskload_ps(bias + j, m)) : _mm256_mul_ps(v, sc);
        _mm256_maskstore_ps(x + j, m, v);
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(m)));
    }
    const __m256 vmax = _mm256_set1_ps(hmax8(mx));
    __m256 s0 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= k; j += 8) {
        const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmax));
        _mm256_storeu_ps(x + j, e);
        s0 = _mm256_add_ps(s0, e);
    }
    if (j < k) {
        const __m256i m = tail8(k - j);
        const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_maskload_ps(x + j, m), vmax));
        _mm256_maskstore_ps(x + j, m, e);
        s0 = _mm256_add_ps(s0, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
    }
    return (float)hsum8d(s0);
}

void cq_softmax_row_avx2(float *x, int64_t k, const float *bias, float scale)
{
    const __m256 inv = _mm256_set1_ps(1.0f / softmax_exp_row(x, k, bias, scale));
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    if (j < k) {
        const __m256i m = tail8(k - j);
        _mm256_maskstore_ps(x + j, m, _mm256_mul_ps(_mm256_maskload_ps(x + j, m), inv));
    }
}

/* 8 values of the residual from j (all, or lanes m), times rmul's where rmul is given (the float32
 * product) */
CQ_INLINE __m256 res8u(const float *res, const float *rmul, int64_t j)
{
    const __m256 r = _mm256_loadu_ps(res + j);
    return rmul ? _mm256_mul_ps(r, _mm256_loadu_ps(rmul + j)) : r;
}
CQ_INLINE __m256 res8(const float *res, const float *rmul, int64_t j, __m256i m)
{
    const __m256 r = _mm256_maskload_ps(res + j, m);
    return rmul ? _mm256_mul_ps(r, _mm256_maskload_ps(rmul + j, m)) : r;
}

void cq_add_ln_row_avx2(const float *x, const float *res, const float *rmul, int64_t k, const float *gamma,
                        const float *beta, float eps, float *y)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    if (res) { /* x + res, or x + (res * rmul rounded): a residual whose channels were divided by rmul */
        for (; j + 16 <= k; j += 16) {
            const __m256 a = _mm256_add_ps(_mm256_loadu_ps(x + j), res8u(res, rmul, j));
            const __m256 b = _mm256_add_ps(_mm256_loadu_ps(x + j + 8), res8u(res, rmul, j + 8));
            _mm256_storeu_ps(y + j, a);
            _mm256_storeu_ps(y + j + 8, b);
            s0 = _mm256_add_ps(s0, a);
            s1 = _mm256_add_ps(s1, b);
        }
        for (; j < k; j += 8) {
            const __m256i m = tail8(k - j);
            const __m256 a = _mm256_add_ps(_mm256_maskload_ps(x + j, m), res8(res, rmul, j, m));
            _mm256_maskstore_ps(y + j, m, a);
            s0 = _mm256_add_ps(s0, a);
        }
        x = y;
    } else {
        for (; j + 16 <= k; j += 16) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + j + 8));
        }
        for (; j < k; j += 8) s0 = _mm256_add_ps(s0, _mm256_maskload_ps(x + j, tail8(k - j)));
    }
    float mean = (float)(hsum8d(_mm256_add_ps(s0, s1)) / (double)k);
    __m256 mv = _mm256_set1_ps(mean);
    s0 = _mm256_setzero_ps();
    s1 = _mm256_setzero_ps();
    for (j = 0; j + 16 <= k; j += 16) {
        const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(x + j), mv);
        const __m256 b = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), mv);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    for (; j < k; j += 8) {
        const __m256i m = tail8(k - j);
        const __m256 a = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, m), mv), _mm256_castsi256_ps(m));
        s0 = _mm256_fmadd_ps(a, a, s0);
    }
    double var = hsum8d(_mm256_add_ps(s0, s1)) / (double)k;
    if (cq_ln_unsafe(mean, var)) { /* float32 partial sums overflowed or underflowed: in double */
        cq_ln_stats_double(x, k, &mean, &var);
        mv = _mm256_set1_ps(mean);
    }
    const __m256 inv = _mm256_set1_ps((float)(1.0 / sqrt(var + (double)eps)));
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (j = 0; j < k; j += 8) {
        const __m256i m = tail8(k - j);
        const int full = k - j >= 8;
        const __m256 xv = full ? _mm256_loadu_ps(x + j) : _mm256_maskload_ps(x + j, m);
        const __m256 t = _mm256_mul_ps(_mm256_sub_ps(xv, mv), inv);
        const __m256 g = gamma ? (full ? _mm256_loadu_ps(gamma + j) : _mm256_maskload_ps(gamma + j, m)) : one;
        const __m256 b = beta ? (full ? _mm256_loadu_ps(beta + j) : _mm256_maskload_ps(beta + j, m)) : zero;
        const __m256 r = _mm256_fmadd_ps(t, g, b);
        if (full) _mm256_storeu_ps(y + j, r);
        else _mm256_maskstore_ps(y + j, m, r);
    }
}

/* ---- attention: scores in 4 x 24 tiles (12 accumulators) with the scale, the mask and each row's
 * running maximum (8 lanes, rmax[r]) in the epilogue (-Inf past seq); context in 4 x 16 tiles. */
CQ_INLINE void qk_tile(const int mr, const int nv, const float *q, int64_t ld, const float *kt, int64_t ldk,
                       int64_t dh, int64_t left, const float *bias, float scale, float *s, __m256 *rmax)
{
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 3; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dh; d++) {
        __m256 b[3];
        for (int c = 0; c < nv; c++) b[c] = _mm256_loadu_ps(kt + d * ldk + 8 * c);
        for (int r = 0; r < mr; r++) {
            const __m256 a = _mm256_broadcast_ss(q + r * ld + d);
            for (int c = 0; c < nv; c++) acc[r][c] = _mm256_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
    const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    for (int c = 0; c < nv; c++) {
        const __m256i m = tail8(left - 8 * c);
        const __m256 bv = bias ? _mm256_maskload_ps(bias + 8 * c, m) : _mm256_setzero_ps();
        for (int r = 0; r < mr; r++) {
            const __m256 v = _mm256_blendv_ps(ninf, _mm256_fmadd_ps(acc[r][c], sc, bv), _mm256_castsi256_ps(m));
            _mm256_storeu_ps(s + r * ldk + 8 * c, v);
            rmax[r] = _mm256_max_ps(rmax[r], v);
        }
    }
}

#define QK_NV(MR)                                                                        \
    switch (nv) {                                                                        \
    case 1: qk_tile(MR, 1, q, ld, kt, ldk, dh, left, bias, scale, s, rmax); break;       \
    case 2: qk_tile(MR, 2, q, ld, kt, ldk, dh, left, bias, scale, s, rmax); break;       \
    default: qk_tile(MR, 3, q, ld, kt, ldk, dh, left, bias, scale, s, rmax); break;      \
    }
static void qk_block(int mr, int nv, const float *q, int64_t ld, const float *kt, int64_t ldk, int64_t dh,
                     int64_t left, const float *bias, float scale, float *s, __m256 *rmax)
{
    switch (mr) {
    case 1: QK_NV(1) break;
    case 2: QK_NV(2) break;
    case 3: QK_NV(3) break;
    default: QK_NV(4) break;
    }
}

/* s[j] = exp(s[j] - max) over the padded row (ldk, a multiple of 16; -Inf pads give 0); the sum. */
CQ_INLINE float exp_sum_row(float *s, int64_t ldk, float max)
{
    const __m256 vmax = _mm256_set1_ps(max);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < ldk; j += 16) {
        const __m256 e0 = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmax));
        const __m256 e1 = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vmax));
        _mm256_storeu_ps(s + j, e0);
        _mm256_storeu_ps(s + j + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    return (float)hsum8d(_mm256_add_ps(s0, s1));
}

/* 8 x 8 transpose in registers (unpack, shuffle, permute2f128: 24 shuffles): rows [0, nrows) of src
 * (ld apart; columns masked by cm unless full; absent rows read as 0) -> dst rows [0, ncols). */
static void transpose8(const float *src, int64_t ld, int nrows, __m256i cm, int full, int ncols, float *dst, int64_t ldd)
{
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++)
        r[i] = i >= nrows ? _mm256_setzero_ps() : (full ? _mm256_loadu_ps(src + i * ld) : _mm256_maskload_ps(src + i * ld, cm));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);     /* columns 0, 4 */
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee); /* 1, 5 */
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44); /* 2, 6 */
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee); /* 3, 7 */
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < ncols; i++) _mm256_storeu_ps(dst + i * ldd, t[i]);
}

static void pack_kt(const float *k, int64_t ld, int64_t seq, int64_t dh, int64_t ldk, float *kt)
{
    for (int64_t j0 = 0; j0 < ldk; j0 += 8) {
        const int nrows = seq - j0 < 8 ? (seq - j0 < 0 ? 0 : (int)(seq - j0)) : 8;
        for (int64_t d0 = 0; d0 < dh; d0 += 8) {
            const int ncols = dh - d0 < 8 ? (int)(dh - d0) : 8;
            transpose8(k + j0 * ld + d0, ld, nrows, tail8(dh - d0), ncols == 8, ncols, kt + d0 * ldk + j0, ldk);
        }
    }
}

CQ_INLINE void pv_tile(const int mr, const int full, const float *p, int64_t ldk, const float *v, int64_t ld,
                       int64_t seq, __m256i m0, __m256i m1, const float *inv, float *o, int64_t ldo)
{
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < seq; j++) {
        const __m256 b0 = full ? _mm256_loadu_ps(v + j * ld) : _mm256_maskload_ps(v + j * ld, m0);
        const __m256 b1 = full ? _mm256_loadu_ps(v + j * ld + 8) : _mm256_maskload_ps(v + j * ld + 8, m1);
        for (int r = 0; r < mr; r++) {
            const __m256 a = _mm256_broadcast_ss(p + r * ldk + j);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < mr; r++) {
        const __m256 s = _mm256_set1_ps(inv[r]);
        if (full) {
            _mm256_storeu_ps(o + r * ldo, _mm256_mul_ps(acc[r][0], s));
            _mm256_storeu_ps(o + r * ldo + 8, _mm256_mul_ps(acc[r][1], s));
        } else {
            _mm256_maskstore_ps(o + r * ldo, m0, _mm256_mul_ps(acc[r][0], s));
            _mm256_maskstore_ps(o + r * ldo + 8, m1, _mm256_mul_ps(acc[r][1], s));
        }
    }
}

#define PV_FULL(MR)                                                                      \
    if (full) pv_tile(MR, 1, p, ldk, v, ld, seq, m0, m1, inv, o, ldo);                   \
    else pv_tile(MR, 0, p, ldk, v, ld, seq, m0, m1, inv, o, ldo);
static void pv_block(int mr, int full, const float *p, int64_t ldk, const float *v, int64_t ld, int64_t seq,
                     __m256i m0, __m256i m1, const float *inv, float *o, int64_t ldo)
{
    switch (mr) {
    case 1: PV_FULL(1) break;
    case 2: PV_FULL(2) break;
    case 3: PV_FULL(3) break;
    default: PV_FULL(4) break;
    }
}

/* One (batch, head) pair, query rows in blocks of 4: scores (scaled, masked, row maxima on the fly),
 * softmax numerators in place (exp(s - max)), then context rows scaled by 1 / sum. */
void cq_attn_head_avx2(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                       int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch)
{
    const int64_t ldk = (seq + 15) & ~(int64_t)15;
    float *kt = scratch, *s = scratch + dh * ldk;
    pack_kt(k, ld, seq, dh, ldk, kt);
    for (int64_t i0 = 0; i0 < seq; i0 += 4) {
        const int mr = seq - i0 < 4 ? (int)(seq - i0) : 4;
        __m256 rmax[4];
        for (int r = 0; r < 4; r++) rmax[r] = _mm256_set1_ps(-INFINITY);
        for (int64_t j0 = 0; j0 < ldk; j0 += 24) {
            const int nv = ldk - j0 < 24 ? (int)((ldk - j0) / 8) : 3;
            qk_block(mr, nv, q + i0 * ld, ld, kt + j0, ldk, dh, seq - j0, bias ? bias + j0 : NULL, scale, s + j0, rmax);
        }
        float inv[4] = {1, 1, 1, 1};
        for (int r = 0; r < mr; r++) inv[r] = exp_sum_row(s + r * ldk, ldk, hmax8(rmax[r]));
        _mm_storeu_ps(inv, _mm_div_ps(_mm_set1_ps(1.0f), _mm_loadu_ps(inv))); /* one division */
        for (int64_t c0 = 0; c0 < dh; c0 += 16) {
            const int full = dh - c0 >= 16;
            pv_block(mr, full, s, ldk, v + c0, ld, seq, tail8(dh - c0), tail8(dh - c0 - 8), inv,
                     out + i0 * ldo + c0, ldo);
        }
    }
}

/* The element-wise table's transpose (internal.h; linear.c's gather_scales turns (N, groups)
 * scales into per-group rows of a GEMV's columns): blocks of 8 rows, each half of up to 16 columns
 * one 8 x 8 register transpose (transpose8), stored as the block's part of cols rows; the rows past
 * the last whole block one by one. (The scalar loop was 13% of an AVX2 per-group int4 M = 1 GEMV.) */
void cq_transpose_avx2(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd)
{
    int64_t r0 = 0;
    for (; r0 + 8 <= rows; r0 += 8)
        for (int c0 = 0; c0 < cols; c0 += 8) {
            const int nc = cols - c0 < 8 ? cols - c0 : 8;
            transpose8(src + r0 * lds + c0, lds, 8, tail8(nc), nc == 8, nc, dst + c0 * ldd + r0, ldd);
        }
    for (; r0 < rows; r0++)
        for (int c = 0; c < cols; c++) dst[c * ldd + r0] = src[r0 * lds + c];
}

CQ_TARGET_END
#endif
