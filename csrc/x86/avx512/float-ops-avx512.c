/* float-ops-avx512.c - AVX-512F float32 kernels for float_ops.c: row softmax (scale + additive
 * bias), LayerNorm with a fused residual add, one (batch, head) pair of attention, exact GELU.
 * Tails use masked loads and stores (no scalar remainder loops). */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <math.h>

/* prototypes: internal.h */

CQ_INLINE __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

/* e^v for v <= 0 (or NaN): v = n ln2 + r, |r| <= ln2/2 (ln2 in two parts, the first exact in n * C1),
 * e^r = 1 + r + r^2 P(r) with Cephes' expf minimax P (~1 ulp), times 2^n by vscalefps. Below
 * -87 (e^-87 = 1.6e-38) the result is 0: v is clamped to -87, where 2^n e^r is still normal, so no
 * operation ever makes a subnormal (a microcode assist costing ~100 cycles on Intel, which every
 * masked key, exp(-Inf), would pay); -Inf gives 0, NaN stays NaN. */
CQ_INLINE __m512 exp_nonpos(__m512 v)
{
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ); /* v >= lo, or NaN */
    v = _mm512_max_ps(lo, v);                                        /* a NaN v is returned */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(keep, e, n);
}

/* x[j] = exp(x[j] * scale + bias[j] - max) in place; returns the sum (NaN if any term is NaN). */
static float softmax_exp_row(float *x, int64_t k, const float *bias, float scale)
{
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 m = tail16(k - j);
        __m512 v = _mm512_maskz_loadu_ps(m, x + j);
        v = bias ? _mm512_fmadd_ps(v, sc, _mm512_maskz_loadu_ps(m, bias + j)) : _mm512_mul_ps(v, sc);
        _mm512_mask_storeu_ps(x + j, m, v);
        mx = _mm512_mask_max_ps(mx, m, mx, v);
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 m = tail16(k - j);
        const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vmax));
        _mm512_mask_storeu_ps(x + j, m, e);
        s0 = _mm512_mask_add_ps(s0, m, s0, e);
    }
    return _mm512_reduce_add_ps(s0);
}

void cq_softmax_row_avx512(float *x, int64_t k, const float *bias, float scale)
{
    const __m512 inv = _mm512_set1_ps(1.0f / softmax_exp_row(x, k, bias, scale));
    for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 m = tail16(k - j);
        _mm512_mask_storeu_ps(x + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), inv));
    }
}

/* sum of the 16 lanes of a and b in double (a tree: no long dependency chain) */
CQ_INLINE double hsum2_d(__m512 a, __m512 b)
{
    const __m512d lo = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)), _mm512_cvtps_pd(_mm512_castps512_ps256(b)));
    const __m512d hi = _mm512_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))),
                                     _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1))));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

/* 16 values of the residual from j (lanes m), times rmul's where rmul is given (the float32 product) */
CQ_INLINE __m512 res16(const float *res, const float *rmul, int64_t j, __mmask16 m)
{
    const __m512 r = _mm512_maskz_loadu_ps(m, res + j);
    return rmul ? _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, rmul + j)) : r;
}

/* LayerNorm(x + res): pass 1 sums (and stores x + res into y), pass 2 the centred squares, pass 3
 * normalizes; two accumulators of 16 lanes each, reduced in double. y may be x or res. */
void cq_add_ln_row_avx512(const float *x, const float *res, const float *rmul, int64_t k, const float *gamma,
                          const float *beta, float eps, float *y)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = 0;
    if (res) { /* x + res, or x + (res * rmul rounded): a residual whose channels were divided by rmul */
        for (; j + 32 <= k; j += 32) {
            const __m512 a = _mm512_add_ps(_mm512_loadu_ps(x + j), res16(res, rmul, j, 0xffff));
            const __m512 b = _mm512_add_ps(_mm512_loadu_ps(x + j + 16), res16(res, rmul, j + 16, 0xffff));
            _mm512_storeu_ps(y + j, a);
            _mm512_storeu_ps(y + j + 16, b);
            s0 = _mm512_add_ps(s0, a);
            s1 = _mm512_add_ps(s1, b);
        }
        for (; j < k; j += 16) {
            const __mmask16 m = tail16(k - j);
            const __m512 a = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + j), res16(res, rmul, j, m));
            _mm512_mask_storeu_ps(y + j, m, a);
            s0 = _mm512_add_ps(s0, a);
        }
        x = y;
    } else {
        for (; j + 32 <= k; j += 32) {
            s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + j));
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + j + 16));
        }
        for (; j < k; j += 16) s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(tail16(k - j), x + j));
    }
    float mean = (float)(hsum2_d(s0, s1) / (double)k);
    __m512 mv = _mm512_set1_ps(mean);
    s0 = _mm512_setzero_ps();
    s1 = _mm512_setzero_ps();
    for (j = 0; j + 32 <= k; j += 32) {
        const __m512 a = _mm512_sub_ps(_mm512_loadu_ps(x + j), mv);
        const __m512 b = _mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv);
        s0 = _mm512_fmadd_ps(a, a, s0);
        s1 = _mm512_fmadd_ps(b, b, s1);
    }
    for (; j < k; j += 16) {
        const __mmask16 m = tail16(k - j);
        const __m512 a = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + j), mv);
        s0 = _mm512_fmadd_ps(a, a, s0);
    }
    double var = hsum2_d(s0, s1) / (double)k;
    if (cq_ln_unsafe(mean, var)) { /* float32 partial sums overflowed or underflowed: in double */
        cq_ln_stats_double(x, k, &mean, &var);
        mv = _mm512_set1_ps(mean);
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sqrt(var + (double)eps)));
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (j = 0; j < k; j += 16) {
        const __mmask16 m = tail16(k - j);
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), mv), inv);
        const __m512 g = gamma ? _mm512_maskz_loadu_ps(m, gamma + j) : one;
        const __m512 b = beta ? _mm512_maskz_loadu_ps(m, beta + j) : zero;
        _mm512_mask_storeu_ps(y + j, m, _mm512_fmadd_ps(t, g, b));
    }
}

/* ---- attention --------------------------------------------------------------------------------
 * Scores: an MR x (16 NV) tile, s[r][j] = sum_d q[r][d] kt[d][j] * scale + bias[j] (-Inf past seq):
 * per d, NV loads of K^T and MR broadcasts of q for MR * NV FMAs (4 x 4 or 8 x 2: 16 accumulators); the
 * epilogue also folds the tile into each row's running maximum rmax[r] (16 lanes). */
CQ_INLINE void qk_tile(const int mr, const int nv, const float *q, int64_t ld, const float *kt, int64_t ldk,
                       int64_t dh, int64_t left, const float *bias, float scale, float *s, __m512 *rmax)
{
    __m512 acc[8][4];
    for (int r = 0; r < 8; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dh; d++) {
        __m512 b[4];
        for (int c = 0; c < nv; c++) b[c] = _mm512_loadu_ps(kt + d * ldk + 16 * c);
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(q[r * ld + d]);
            for (int c = 0; c < nv; c++) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < nv; c++) {
        const __mmask16 m = left > 16 * c ? tail16(left - 16 * c) : 0;
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < mr; r++) {
            const __m512 v = _mm512_mask_mov_ps(ninf, m, _mm512_fmadd_ps(acc[r][c], sc, bv));
            _mm512_storeu_ps(s + r * ldk + 16 * c, v);
            rmax[r] = _mm512_max_ps(rmax[r], v);
        }
    }
}

/* Tiles of up to 8 rows x 32 columns or 4 rows x 64 columns: 16 accumulators either way. */
#define QK_ARGS q, ld, kt, ldk, dh, left, bias, scale, s, rmax
#define QK_NV12(MR)                                                                      \
    if (nv == 1) qk_tile(MR, 1, QK_ARGS);                                                \
    else qk_tile(MR, 2, QK_ARGS);
#define QK_NV34(MR)                                                                      \
    if (nv == 3) qk_tile(MR, 3, QK_ARGS);                                                \
    else qk_tile(MR, 4, QK_ARGS);
static void qk_block(int mr, int nv, const float *q, int64_t ld, const float *kt, int64_t ldk, int64_t dh,
                     int64_t left, const float *bias, float scale, float *s, __m512 *rmax)
{
    if (nv <= 2) {
        switch (mr) {
        case 1: QK_NV12(1) break;
        case 2: QK_NV12(2) break;
        case 3: QK_NV12(3) break;
        case 4: QK_NV12(4) break;
        case 5: QK_NV12(5) break;
        case 6: QK_NV12(6) break;
        case 7: QK_NV12(7) break;
        default: QK_NV12(8) break;
        }
    } else {
        switch (mr) {
        case 1: QK_NV34(1) break;
        case 2: QK_NV34(2) break;
        case 3: QK_NV34(3) break;
        default: QK_NV34(4) break;
        }
    }
}

/* s[j] = exp(s[j] - max) over the padded row (ldk, a multiple of 16; -Inf pads give 0); the sum. */
CQ_INLINE float exp_sum_row(float *s, int64_t ldk, float max)
{
    const __m512 vmax = _mm512_set1_ps(max);
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < ldk; j += 16) {
        const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax));
        _mm512_storeu_ps(s + j, e);
        s0 = _mm512_add_ps(s0, e);
    }
    return _mm512_reduce_add_ps(s0);
}

/* Context: o[r][c] = inv[r] * sum_j p[r][j] v[j][c] for c in a block of 32 columns (masks m0, m1):
 * per key j, 2 loads of V and MR broadcasts of p for 2 MR FMAs (8 x 2: 16 accumulators, named
 * variables: GCC keeps an array of them on the stack). */
#define R1(M) M(0)
#define R2(M) R1(M) M(1)
#define R3(M) R2(M) M(2)
#define R4(M) R3(M) M(3)
#define R5(M) R4(M) M(4)
#define R6(M) R5(M) M(5)
#define R7(M) R6(M) M(6)
#define R8(M) R7(M) M(7)
#define PV_DECL(r) __m512 o##r##a = _mm512_setzero_ps(), o##r##b = o##r##a;
#define PV_STEP(r)                                                                       \
    {                                                                                    \
        const __m512 a = _mm512_set1_ps(p[(r) * ldk + j]);                               \
        o##r##a = _mm512_fmadd_ps(a, b0, o##r##a);                                       \
        o##r##b = _mm512_fmadd_ps(a, b1, o##r##b);                                       \
    }
#define PV_OUT(r)                                                                        \
    {                                                                                    \
        const __m512 sc = _mm512_set1_ps(inv[r]);                                        \
        _mm512_mask_storeu_ps(o + (r) * ldo, m0, _mm512_mul_ps(o##r##a, sc));            \
        _mm512_mask_storeu_ps(o + (r) * ldo + 16, m1, _mm512_mul_ps(o##r##b, sc));       \
    }
#define PV_TILE(N)                                                                                   \
    static void pv_tile##N(const float *p, int64_t ldk, const float *v, int64_t ld, int64_t seq,    \
                           __mmask16 m0, __mmask16 m1, const float *inv, float *o, int64_t ldo)     \
    {                                                                                                \
        R##N(PV_DECL)                                                                                \
        for (int64_t j = 0; j < seq; j++) {                                                          \
            const __m512 b0 = _mm512_maskz_loadu_ps(m0, v + j * ld);                                 \
            const __m512 b1 = _mm512_maskz_loadu_ps(m1, v + j * ld + 16);                            \
            R##N(PV_STEP)                                                                            \
        }                                                                                            \
        R##N(PV_OUT)                                                                                 \
    }
PV_TILE(1)
PV_TILE(2)
PV_TILE(3)
PV_TILE(4)
PV_TILE(5)
PV_TILE(6)
PV_TILE(7)
PV_TILE(8)

static void pv_block(int mr, const float *p, int64_t ldk, const float *v, int64_t ld, int64_t seq,
                     __mmask16 m0, __mmask16 m1, const float *inv, float *o, int64_t ldo)
{
    switch (mr) {
    case 1: pv_tile1(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 2: pv_tile2(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 3: pv_tile3(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 4: pv_tile4(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 5: pv_tile5(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 6: pv_tile6(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    case 7: pv_tile7(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    default: pv_tile8(p, ldk, v, ld, seq, m0, m1, inv, o, ldo); break;
    }
}

/* 16 x 16 transpose in registers (unpack ps, unpack pd, 2 x shuffle_f32x4: 64 shuffles): rows
 * [0, nrows) of src (ld apart, columns masked by cm; absent rows read as 0) -> columns of dst rows
 * [0, ncols) (ldd apart). */
static void transpose16(const float *src, int64_t ld, int nrows, __mmask16 cm, int ncols, float *dst, int64_t ldd)
{
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = i < nrows ? _mm512_maskz_loadu_ps(cm, src + i * ld) : _mm512_setzero_ps();
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));     /* columns 0, 4, 8, 12 */
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c)); /* 1, 5, 9, 13 */
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)); /* 2, 6, 10, 14 */
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d)); /* 3, 7, 11, 15 */
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < ncols; i++) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

/* dst[j * dhp + c] = src[j * ld + c] for c < dh (dhp - dh zeros after), j < seq. */
static void pack_rows(const float *src, int64_t ld, int64_t seq, int64_t dh, int64_t dhp, float *dst)
{
    for (int64_t j = 0; j < seq; j++)
        for (int64_t c = 0; c < dhp; c += 16)
            _mm512_storeu_ps(dst + j * dhp + c, _mm512_maskz_loadu_ps(tail16(dh - c), src + j * ld + c));
}

/* K^T of the head, kt[d * ldk + j], zero-padded to ldk columns, by 16 x 16 blocks. */
static void pack_kt(const float *k, int64_t ld, int64_t seq, int64_t dh, int64_t ldk, float *kt)
{
    for (int64_t j0 = 0; j0 < ldk; j0 += 16) {
        const int nrows = seq - j0 < 16 ? (int)(seq - j0) : 16;
        for (int64_t d0 = 0; d0 < dh; d0 += 16) {
            const int ncols = dh - d0 < 16 ? (int)(dh - d0) : 16;
            transpose16(k + j0 * ld + d0, ld, nrows, tail16(dh - d0), ncols, kt + d0 * ldk + j0, ldk);
        }
    }
}

/* One (batch, head) pair, query rows in blocks of 8: scores (8 x 32 or 4 x 64 tiles, scaled, masked,
 * row maxima on the fly), softmax numerators in place (exp(s - max)), then context rows scaled by
 * 1 / sum (one division per block). */
void cq_attn_head_avx512(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                         int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch)
{
    const int64_t ldk = (seq + 15) & ~(int64_t)15, dhp = (dh + 15) & ~(int64_t)15;
    float *kt = scratch, *s = kt + dh * ldk, *vp = s + 8 * ldk, *qp = vp + ldk * dhp;
    pack_kt(k, ld, seq, dh, ldk, kt);
    /* Q and V rows copied to contiguous, zero-padded rows (dh floats every ld in the projections) */
    pack_rows(q, ld, seq, dh, dhp, qp);
    pack_rows(v, ld, seq, dh, dhp, vp);
    q = qp;
    v = vp;
    ld = dhp;
    for (int64_t i0 = 0; i0 < seq; i0 += 8) {
        const int mr = seq - i0 < 8 ? (int)(seq - i0) : 8;
        __m512 rmax[8];
        for (int r = 0; r < 8; r++) rmax[r] = _mm512_set1_ps(-INFINITY);
        for (int64_t j0 = 0; j0 < ldk; j0 += 64) {
            const int nv = ldk - j0 < 64 ? (int)((ldk - j0) / 16) : 4;
            const int step = nv <= 2 ? 8 : 4;
            for (int r0 = 0; r0 < mr; r0 += step) {
                const int m = mr - r0 < step ? mr - r0 : step;
                qk_block(m, nv, q + (i0 + r0) * ld, ld, kt + j0, ldk, dh, seq - j0, bias ? bias + j0 : NULL,
                         scale, s + r0 * ldk + j0, rmax + r0);
            }
        }
        float inv[8] = {1, 1, 1, 1, 1, 1, 1, 1};
        for (int r = 0; r < mr; r++) inv[r] = exp_sum_row(s + r * ldk, ldk, _mm512_reduce_max_ps(rmax[r]));
        _mm256_storeu_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(inv))); /* one division */
        for (int64_t c0 = 0; c0 < dh; c0 += 32) {
            const __mmask16 m0 = tail16(dh - c0), m1 = dh - c0 > 16 ? tail16(dh - c0 - 16) : 0;
            pv_block(mr, s, ldk, v + c0, ld, seq, m0, m1, inv, out + i0 * ldo + c0, ldo);
        }
    }
}

/* ---- GELU ---------------------------------------------------------------------------------------
 * GELU(x) = x/2 + |x|/2 erf(|x| / sqrt 2). erf(z) on [0, 4] from 16 quartics, one per quarter:
 * w = 4z, i = floor(w), erf(z) ~ P_i(w - i) (least-squares fits on Chebyshev nodes, |error| <
 * 2.5e-7 evaluated in float32; P_0(0) = 0, P_15(1) = 1.0f); the coefficients come from 16-entry
 * tables by vpermps. |x| beyond 4 sqrt 2 uses P_15(1) = 1. No division, no exp. */
static const float gelu_tab[5][16] = {
    {0.000000000e+00f, 2.763264775e-01f, 5.204998255e-01f, 7.111555338e-01f, 8.427006602e-01f, 9.229000807e-01f, 9.661051631e-01f, 9.866716862e-01f, 9.953222871e-01f, 9.985373020e-01f, 9.995930791e-01f, 9.998993874e-01f, 9.999778867e-01f, 9.999957085e-01f, 9.999992847e-01f, 9.999998808e-01f},
    {2.820874155e-01f, 2.649987936e-01f, 2.196978629e-01f, 1.607390195e-01f, 1.037828252e-01f, 5.913339183e-02f, 2.973292023e-02f, 1.319270767e-02f, 5.165545736e-03f, 1.784755848e-03f, 5.441472749e-04f, 1.463943336e-04f, 3.475342965e-05f, 7.280020327e-06f, 1.345628903e-06f, 2.194687312e-07f},
    {7.135429769e-05f, -1.652323455e-02f, -2.747830935e-02f, -3.018702753e-02f, -2.599222213e-02f, -1.850380749e-02f, -1.115298457e-02f, -5.764097441e-03f, -2.573724603e-03f, -9.976995643e-04f, -3.368920879e-04f, -9.932734974e-05f, -2.561528345e-05f, -5.785823760e-06f, -1.145836109e-06f, -1.991289196e-07f},
    {-6.093224045e-03f, -4.948385060e-03f, -2.249213401e-03f, 5.553178489e-04f, 2.298285021e-03f, 2.692671958e-03f, 2.179493429e-03f, 1.386639429e-03f, 7.262862637e-04f, 3.202621010e-04f, 1.204139626e-04f, 3.891307279e-05f, 1.086695920e-05f, 2.632593578e-06f, 5.548284321e-07f, 1.019475206e-07f},
    {2.606337075e-04f, 6.461477024e-04f, 6.855222164e-04f, 4.380968167e-04f, 1.106830969e-04f, -1.171211916e-04f, -1.928955753e-04f, -1.646994497e-04f, -1.031364372e-04f, -5.158572458e-05f, -2.135522845e-05f, -7.455227660e-06f, -2.219619546e-06f, -5.677459285e-07f, -1.254049806e-07f, -2.400962273e-08f},
};

CQ_INLINE __m512 gelu16(__m512 x, __m512 c0, __m512 c1, __m512 c2, __m512 c3, __m512 c4)
{
    const __m512 ax = _mm512_abs_ps(x);
    /* w = 4 |x| / sqrt 2, kept below 16 so that i <= 15 and s = w - i in [0, 1) is exact;
     * min(w, c) returns c for a NaN w: y is NaN through x / 2 anyway */
    const __m512 w = _mm512_min_ps(_mm512_mul_ps(ax, _mm512_set1_ps(2.82842712474619010f)), _mm512_set1_ps(15.9999990f));
    const __m512 f = _mm512_roundscale_ps(w, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 s = _mm512_sub_ps(w, f);
    const __m512i i = _mm512_cvttps_epi32(f);
    __m512 p = _mm512_permutexvar_ps(i, c4);
    p = _mm512_fmadd_ps(p, s, _mm512_permutexvar_ps(i, c3));
    p = _mm512_fmadd_ps(p, s, _mm512_permutexvar_ps(i, c2));
    p = _mm512_fmadd_ps(p, s, _mm512_permutexvar_ps(i, c1));
    p = _mm512_fmadd_ps(p, s, _mm512_permutexvar_ps(i, c0));
    const __m512 half = _mm512_set1_ps(0.5f);
    /* x = -Inf: Inf * 1 - Inf would be NaN; GELU(-Inf) = 0 */
    const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    return _mm512_maskz_fmadd_ps(ok, _mm512_mul_ps(ax, half), p, _mm512_mul_ps(x, half));
}

void cq_gelu_avx512(const float *x, int64_t n, float *y)
{
    const __m512 c0 = _mm512_loadu_ps(gelu_tab[0]), c1 = _mm512_loadu_ps(gelu_tab[1]), c2 = _mm512_loadu_ps(gelu_tab[2]);
    const __m512 c3 = _mm512_loadu_ps(gelu_tab[3]), c4 = _mm512_loadu_ps(gelu_tab[4]);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 a = gelu16(_mm512_loadu_ps(x + i), c0, c1, c2, c3, c4);
        const __m512 b = gelu16(_mm512_loadu_ps(x + i + 16), c0, c1, c2, c3, c4);
        _mm512_storeu_ps(y + i, a);
        _mm512_storeu_ps(y + i + 16, b);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        _mm512_mask_storeu_ps(y + i, m, gelu16(_mm512_maskz_loadu_ps(m, x + i), c0, c1, c2, c3, c4));
    }
}

CQ_TARGET_END
#endif
