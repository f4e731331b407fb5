/* elementwise-avx2.c - AVX2 + FMA element-wise kernels: absmax, quantize (s8 or u8 codes), GELU,
 * dequantize. Bit-exact against ref/ (GELU within its documented error). */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>
#include <math.h>
#include <string.h>

/* max |v| over n floats and whether all are finite, v = x, or x * mul (stored into prod unless it is
 * NULL: the activation quantizer's pre-scale); mul / prod NULL are compile-time constants in the
 * callers. The max is taken on the int32 bit patterns of |v| (the float order for non-negative
 * floats; NaN / Inf patterns, >= 0x7f800000, above every finite one, so the max also says whether
 * all were finite): one single-cycle vpmaxsd per vector in four independent chains, where vmaxps
 * plus a compare-and-or for the finite test made this pass latency-bound (measured: the absmax
 * was a third of cq_quantize_rows' time). */
CQ_INLINE int absmax_core(const float *x, const float *mul, float *prod, int64_t n, float *amax)
{
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
#define CQ_ABS_STEP(acc, off)                                                                        \
    do {                                                                                           \
        __m256 v = _mm256_loadu_ps(x + i + (off));                                                 \
        if (mul) {                                                                                 \
            v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + i + (off)));                                \
            if (prod) _mm256_storeu_ps(prod + i + (off), v);                                       \
        }                                                                                          \
        acc = _mm256_max_epi32(acc, _mm256_and_si256(_mm256_castps_si256(v), absmask));            \
    } while (0)
    for (; i + 32 <= n; i += 32) {
        CQ_ABS_STEP(m0, 0);
        CQ_ABS_STEP(m1, 8);
        CQ_ABS_STEP(m2, 16);
        CQ_ABS_STEP(m3, 24);
    }
    for (; i + 8 <= n; i += 8) CQ_ABS_STEP(m0, 0);
#undef CQ_ABS_STEP
    m0 = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
    int32_t tmp[8], m = 0;
    _mm256_storeu_si256((__m256i *)tmp, m0);
    for (int j = 0; j < 8; j++) m = tmp[j] > m ? tmp[j] : m;
    for (; i < n; i++) {
        float v = x[i];
        if (mul) {
            v = v * mul[i];
            if (prod) prod[i] = v;
        }
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= 0x7fffffffu;
        if ((int32_t)bits > m) m = (int32_t)bits;
    }
    if (m >= 0x7f800000) {
        *amax = 0.0f;
        return 0;
    }
    memcpy(amax, &m, sizeof m);
    return 1;
}

static int absmax_avx2(const float *x, int64_t n, float *amax) { return absmax_core(x, NULL, NULL, n, amax); }

/* 1 / scale where it is a normal float (the bound below needs it), else NaN: every lane then
 * fails the test and is divided (scales below ~3e-39 or above ~8e37, e.g. a static x_scale) */
CQ_INLINE __m256 recip_or_nan(float scale)
{
    const float r = 1.0f / scale;
    return _mm256_set1_ps(r >= 1.17549435e-38f && r <= 3.402823466e38f ? r : NAN);
}

/* min(round_half_even(v / s), 127) as int32 for 8 lanes, bit-exact with the contract's true
 * division but mostly without it: q0 = v * (1 / s) is within |v / s| * 2^-23 (two roundings) of
 * v / s, so for |q0| <= 128 the two round to the same integer unless q0 lies within 2^-15
 * (> 128 * 2^-23) of a half-integer; such a vector (rare: ~1e-4 per lane on random data; a NaN /
 * Inf product too) is divided after all. For 128 < |q0| only the sign and |t| >= 128 matter (the
 * clamp). The clamp: min 127 here (also keeps |t| >= 2^31 from converting to INT_MIN), and the
 * -127 side after the saturating packs (max_epi8 -127: t <= -128 packs to -128). t is integral, so
 * the convert is exact whatever MXCSR's rounding mode. Measured: see quantize_avx2. */
CQ_INLINE __m256i q8v(__m256 v, __m256 s, __m256 r, __m256 hi)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 q0 = _mm256_mul_ps(v, r);
    __m256 t = _mm256_round_ps(q0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(q0, t), absmask); /* exact (Sterbenz), in [0, 0.5] */
    if (_mm256_movemask_ps(_mm256_cmp_ps(d, _mm256_set1_ps(0.5f - 0x1p-15f), _CMP_LT_OQ)) != 0xff)
        t = _mm256_round_ps(_mm256_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(t, hi));
}

CQ_INLINE __m256i q8(const float *x, __m256 s, __m256 r, __m256 hi)
{
    return q8v(_mm256_loadu_ps(x), s, r, hi);
}

CQ_INLINE __m256i q8m(const float *x, const float *mul, __m256 s, __m256 r, __m256 hi)
{
    return q8v(_mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(mul)), s, r, hi);
}

/* The code pass of x, or of the float32 products x * mul (mul NULL: a compile-time constant in
 * quantize_avx2, so one body serves both entries). */
CQ_INLINE void quantize_core(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip)
{
    const __m256i flipv = _mm256_set1_epi8((char)flip);
    const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.0f);
    const __m256i lo8 = _mm256_set1_epi8(-127);
    const __m256 r = recip_or_nan(scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a, b, c, d;
        if (mul) {
            a = q8m(x + i, mul + i, s, r, hi);
            b = q8m(x + i + 8, mul + i + 8, s, r, hi);
            c = q8m(x + i + 16, mul + i + 16, s, r, hi);
            d = q8m(x + i + 24, mul + i + 24, s, r, hi);
        } else {
            a = q8(x + i, s, r, hi);
            b = q8(x + i + 8, s, r, hi);
            c = q8(x + i + 16, s, r, hi);
            d = q8(x + i + 24, s, r, hi);
        }
        __m256i p = _mm256_max_epi8(_mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)), lo8);
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_xor_si256(_mm256_permutevar8x32_epi32(p, order), flipv));
    }
    for (; i < n; i++) {
        float v = mul ? x[i] * mul[i] : x[i];
        float t = nearbyintf(v / scale);
        t = t > 127.0f ? 127.0f : (t < -127.0f ? -127.0f : t);
        q[i] = (int8_t)((uint8_t)(int8_t)t ^ (uint8_t)flip);
    }
}

static void quantize_mul_avx2(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip)
{
    quantize_core(x, mul, n, scale, q, flip);
}

static void quantize_avx2(const float *x, int64_t n, float scale, int8_t *q, int flip)
{
    quantize_core(x, NULL, n, scale, q, flip);
}

/* exp(v) for v in [-88, 0]: v = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts so r is
 * exact to float rounding), e^r by its Taylor polynomial to degree 7 (relative error < 3e-8 on that
 * interval), 2^n put in the exponent bits. */
CQ_INLINE __m256 exp_neg(__m256 v)
{
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* GELU through erf(z) = 1 - t (a1 + t (a2 + ...)) e^{-z^2}, t = 1 / (1 + p z), z >= 0: the
 * rational approximation of Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7); odd in z. z is
 * clamped to 6, where erf is 1 in float32. */
CQ_INLINE __m256 gelu8(__m256 v)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 u = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
    const __m256 z = _mm256_min_ps(_mm256_and_ps(u, absmask), _mm256_set1_ps(6.0f));
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 poly = _mm256_set1_ps(1.061405429f);
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
    poly = _mm256_mul_ps(poly, t);
    const __m256 e = exp_neg(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z));
    const __m256 erf_abs = _mm256_fnmadd_ps(poly, e, _mm256_set1_ps(1.0f));
    /* erf(u) = sign(u) * erf(|u|); a NaN x keeps NaN through v * (...) */
    const __m256 erf_u = _mm256_or_ps(erf_abs, _mm256_andnot_ps(absmask, u));
    const __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.0f), erf_u));
    /* +-Inf: 0.5 * Inf * 2 = Inf, and -Inf * 0 would be NaN: GELU(-Inf) = 0 (-0) */
    return _mm256_blendv_ps(g, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
}

/* The tail is a masked vector too, so every element gets the same formula wherever it sits (a GELU
 * fused into a linear's output tiles, cq_linear_post, is then bit for bit the separate pass). */
static void gelu_avx2(const float *x, int64_t n, float *y)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(y + i, m, gelu8(_mm256_maskload_ps(x + i, m)));
    }
}

static void dequant_avx2(const int8_t *q, int64_t n, float scale, float *out)
{
    const __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                      _mm_loadl_epi64((const __m128i *)(q + i)))), s));
    for (; i < n; i++) out[i] = (float)q[i] * scale;
}

/* facc[j] = fma((float)(acc[j] - comp[j]), min(sx * ws[j], FLT_MAX), facc[j]): the CQ_OUT_FACC
 * epilogue of the int8 kernels (qd8-out-256.h), bit for bit; n a multiple of 8. */
static void facc_fold_avx2(int n, const int32_t *acc, const int32_t *comp, float sx, const float *ws, float *facc)
{
    const __m256 vsx = _mm256_set1_ps(sx), big = _mm256_set1_ps(3.402823466e38f);
    for (int j = 0; j < n; j += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(acc + j));
        if (comp) v = _mm256_sub_epi32(v, _mm256_loadu_si256((const __m256i *)(comp + j)));
        const __m256 s = _mm256_min_ps(big, _mm256_mul_ps(vsx, _mm256_loadu_ps(ws + j)));
        _mm256_storeu_ps(facc + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), s, _mm256_loadu_ps(facc + j)));
    }
}

/* The pre-scaled row and its absmax in one pass (the product stored for the quantize pass). */
static int absmax_mul_avx2(const float *x, const float *mul, int64_t n, float *prod, float *amax)
{
    return absmax_core(x, mul, prod, n, amax);
}

/* The Hadamard stages h = 1, 2, 4 (those below b) inside one vector of 8: lanes whose bit h is
 * clear take a + c, the others a - c (a the lane below, c the lane above): the pairs and operands of
 * the reference. One permute and one FMA per stage: fma(v, sign, swapped) = swapped + v or
 * swapped - v, rounded once from an exact product (v * +-1), so it equals the add / sub. */
CQ_INLINE __m256 fwht_in8(__m256 v, int64_t b)
{
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-1.0f);
    v = _mm256_fmadd_ps(v, _mm256_blend_ps(one, neg, 0xAA), _mm256_permute_ps(v, 0xB1)); /* lanes 1 0 3 2 */
    if (b >= 4) v = _mm256_fmadd_ps(v, _mm256_blend_ps(one, neg, 0xCC), _mm256_permute_ps(v, 0x4E));
    if (b >= 8) v = _mm256_fmadd_ps(v, _mm256_blend_ps(one, neg, 0xF0), _mm256_permute2f128_ps(v, v, 0x01));
    return v;
}

/* Running max of |v| as int32 bit patterns: for non-negative floats the integer order is the float
 * order, and NaN / Inf patterns (>= 0x7f800000) are above every finite one, so the max also tells
 * whether all were finite. */
CQ_INLINE __m256i absmax_bits(__m256i mx, __m256 v)
{
    return _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}

/* One block of nv * 8 values (nv = 1, 2, 4 or 8: blocks up to 64) in registers: loaded (times mul),
 * every stage below 8 * nv, stored, and folded into the running max. */
CQ_INLINE __m256i fwht_regs(const float *x, const float *mul, float *out, int nv, __m256i mx)
{
    __m256 r[8];
    for (int j = 0; j < nv; j++) {
        __m256 v = _mm256_loadu_ps(x + 8 * j);
        if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + 8 * j));
        r[j] = fwht_in8(v, 8);
    }
    for (int h = 1; h < nv; h *= 2)
        for (int j = 0; j < nv; j++)
            if (!(j & h)) {
                const __m256 a = r[j], c = r[j + h];
                r[j] = _mm256_add_ps(a, c);
                r[j + h] = _mm256_sub_ps(a, c);
            }
    for (int j = 0; j < nv; j++) {
        _mm256_storeu_ps(out + 8 * j, r[j]);
        mx = absmax_bits(mx, r[j]);
    }
    return mx;
}

CQ_INLINE __m256i fwht_blocks(const float *x, const float *mul, int64_t n, int nv, float *out, __m256i mx)
{
    for (int64_t i = 0; i < n; i += 8 * nv) mx = fwht_regs(x + i, mul ? mul + i : NULL, out + i, nv, mx);
    return mx;
}

int cq_hadamard_absmax_avx2(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax)
{
    __m256i mx = _mm256_setzero_si256();
    if (b < 8) { /* blocks of 2 or 4: whole vectors, then the tail as the reference */
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + i));
            v = fwht_in8(v, b);
            _mm256_storeu_ps(out + i, v);
            mx = absmax_bits(mx, v);
        }
        for (int64_t t = i; t < n; t++) out[t] = mul ? x[t] * mul[t] : x[t];
        for (int64_t h = 1; h < b; h *= 2)
            for (int64_t i0 = i; i0 < n; i0 += 2 * h)
                for (int64_t t = i0; t < i0 + h; t++) {
                    const float a = out[t], c = out[t + h];
                    out[t] = a + c;
                    out[t + h] = a - c;
                }
        for (int64_t t = i; t < n; t++) mx = absmax_bits(mx, _mm256_set1_ps(out[t]));
    } else {
        /* stages below 64 in registers; any larger stage as a pass over out (the row is in L1) */
        if (b == 8) mx = fwht_blocks(x, mul, n, 1, out, mx);
        else if (b == 16) mx = fwht_blocks(x, mul, n, 2, out, mx);
        else if (b == 32) mx = fwht_blocks(x, mul, n, 4, out, mx);
        else mx = fwht_blocks(x, mul, n, 8, out, mx);
        if (b > 64) {
            for (int64_t h = 64; h < b; h *= 2)
                for (int64_t i0 = 0; i0 < n; i0 += 2 * h)
                    for (int64_t t = i0; t < i0 + h; t += 8) {
                        const __m256 a = _mm256_loadu_ps(out + t), c = _mm256_loadu_ps(out + t + h);
                        _mm256_storeu_ps(out + t, _mm256_add_ps(a, c));
                        _mm256_storeu_ps(out + t + h, _mm256_sub_ps(a, c));
                    }
            return absmax_core(out, NULL, NULL, n, amax);
        }
    }
    int32_t tmp[8], m = 0;
    _mm256_storeu_si256((__m256i *)tmp, mx);
    for (int j = 0; j < 8; j++) m = tmp[j] > m ? tmp[j] : m;
    if (m >= 0x7f800000) { *amax = 0.0f; return 0; }
    memcpy(amax, &m, sizeof m);
    return 1;
}

/* The pair-safe preparation of a block (cq_elementwise.ps_block): vpmaddubsw with u8 ones gives
 * the pair sums a + b as int16 (|a + b| <= 254: exact), compared with 128 in magnitude; vpmaddwd
 * with ones sums them into int32. 4 instructions per 32 codes; the (few) vectors with a pair to
 * change are fixed pair by pair and summed again. */
static int64_t ps_block_avx2(int8_t *x, int64_t n, int64_t base, int64_t room, int32_t *ent, int32_t *sum)
{
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1), lim = _mm256_set1_epi16(128);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0, e = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i p = _mm256_maddubs_epi16(one8, _mm256_loadu_si256((const __m256i *)(x + i)));
        uint32_t bad = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(_mm256_abs_epi16(p), lim));
        if (bad) {
            for (; bad; bad &= bad - 1, bad &= bad - 1) { /* 2 mask bits per pair */
                if (e == room) {
                    cq_ps_restore(x, base, ent, e);
                    return -1;
                }
                cq_ps_fix_pair(x, i + (__builtin_ctz(bad) & ~1), base, ent + CQ_PS_ENT * e++);
            }
            p = _mm256_maddubs_epi16(one8, _mm256_loadu_si256((const __m256i *)(x + i)));
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, one16));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    *sum = _mm_cvtsi128_si32(h);
    return cq_ps_block_pairs(x, i, n, base, room, ent, e, sum); /* the tail (n % 32) */
}

CQ_TARGET_END

const cq_elementwise cq_elementwise_avx2 = {CQ_ISA_AVX2, absmax_avx2, quantize_avx2, gelu_avx2, dequant_avx2,
                                            facc_fold_avx2, absmax_mul_avx2, cq_hadamard_absmax_avx2,
                                            quantize_mul_avx2, cq_transpose_avx2, ps_block_avx2};
#if CQ_CAN_TARGET_AVX512
/* the AVX-512 paths: the same table with the zmm row maximum, GELU, rotation, code pass and
 * transpose (x86/avx512/float-ops-avx512.c, hadamard-avx512.c, quantize-avx512.c,
 * transpose-avx512.c) */
const cq_elementwise cq_elementwise_avx512 = {CQ_ISA_AVX512, cq_absmax_avx512, cq_quantize_avx512, cq_gelu_avx512, dequant_avx2,
                                              facc_fold_avx2, cq_absmax_mul_avx512, cq_hadamard_absmax_avx512,
                                              cq_quantize_mul_avx512, cq_transpose_avx512, ps_block_avx2};
#else
const cq_elementwise cq_elementwise_avx512 = {CQ_ISA_AVX512, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
#endif
#elif defined(CQ_X86)
const cq_elementwise cq_elementwise_avx2 = {CQ_ISA_AVX2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
const cq_elementwise cq_elementwise_avx512 = {CQ_ISA_AVX512, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
#endif
