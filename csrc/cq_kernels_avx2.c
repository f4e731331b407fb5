/* cq_kernels_avx2.c - AVX2 + FMA kernels. Compiled with a target pragma (no -m flags for the whole
 * build), so the package still runs on an x86-64 without AVX2: dispatch never calls these there.
 *
 * int8 x int8 without saturation: vpmaddubsw multiplies u8 x s8 pairs and saturates their int16
 * sum. With |w| as the u8 operand (vpabsb) and x carrying w's sign (vpsignb), each pair is at most
 * 2 * 127 * 127 = 32258 < 32767 since codes are in [-127, 127] (-128 is refused when packing and
 * never produced by activation quantization), so it never saturates; vpmaddwd with ones then
 * widens pairs to int32 (exact). Taking |w| once per step rather than |x| per row saves one op per
 * row and step (measured +6% on a 4x16 tile). */
#include "cq_internal.h"

#if defined(CQ_X86) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__clang__) || __GNUC__ >= 5)
#define CQ_BUILD_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Software prefetch distance along a panel (bytes): the weights stream from DRAM once per call at
 * small M, and the hardware prefetcher alone reached about half of the machine's bandwidth. */
#ifndef CQ_PF_DIST
#define CQ_PF_DIST 4096
#endif

int cq_absmax_avx2(const float *x, int64_t n, float *amax)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(3.402823466e38f);
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a0 = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
        __m256 a1 = _mm256_and_ps(_mm256_loadu_ps(x + i + 8), absmask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a0, big, _CMP_NLE_UQ));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a1, big, _CMP_NLE_UQ));
        m0 = _mm256_max_ps(m0, a0);
        m1 = _mm256_max_ps(m1, a1);
    }
    m0 = _mm256_max_ps(m0, m1);
    float tmp[8];
    _mm256_storeu_ps(tmp, m0);
    float m = 0.0f;
    for (int j = 0; j < 8; j++) m = tmp[j] > m ? tmp[j] : m;
    int finite = _mm256_movemask_ps(bad) == 0;
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.402823466e38f)) finite = 0;
        else if (a > m) m = a;
    }
    *amax = m;
    return finite;
}

ALWAYS_INLINE __m256i q8(const float *x, __m256 s, __m256 lo, __m256 hi)
{
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), s); /* a true division, as the contract says */
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    return _mm256_cvtps_epi32(v);
}

void cq_quantize_avx2(const float *x, int64_t n, float scale, int8_t *q)
{
    const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a = q8(x + i, s, lo, hi), b = q8(x + i + 8, s, lo, hi);
        __m256i c = q8(x + i + 16, s, lo, hi), d = q8(x + i + 24, s, lo, hi);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; i < n; i++) {
        float r = nearbyintf(x[i] / scale);
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[i] = (int8_t)r;
    }
}

ALWAYS_INLINE int32_t load4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The tiles are written with one named variable per accumulator (macros per row): with arrays
 * indexed in loops, GCC 12 kept the accumulators on the stack (a store per FMA). */
#define S8_DECL(r) __m256i c##r##0 = _mm256_setzero_si256(), c##r##1 = _mm256_setzero_si256();
/* |w| is taken once per step (shared by the rows) and x's sign moved onto it per row:
 * |w| * (x * sign(w)) = x * w, with both factors in [-127, 127]. */
#define S8_STEP(r)                                                                                \
    {                                                                                             \
        const __m256i xb = _mm256_set1_epi32(load4(a + (r) * lda + 4 * t));                       \
        c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ab0, _mm256_sign_epi8(xb, b0)), ones)); \
        c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ab1, _mm256_sign_epi8(xb, b1)), ones)); \
    }
#define S8_OUT(r)                                                                                 \
    if (facc) {                                                                                   \
        float *f = facc + (r) * CQ_NR;                                                            \
        _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c##r##0), w0, _mm256_loadu_ps(f))); \
        _mm256_storeu_ps(f + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c##r##1), w1, _mm256_loadu_ps(f + 8))); \
    } else {                                                                                      \
        __m256i *o = (__m256i *)(acc + (r) * CQ_NR);                                              \
        _mm256_storeu_si256(o, _mm256_add_epi32(c##r##0, _mm256_loadu_si256(o)));                 \
        _mm256_storeu_si256(o + 1, _mm256_add_epi32(c##r##1, _mm256_loadu_si256(o + 1)));         \
    }
/* each int32 lane of c<r>0 / c<r>1 is one column's sum (maddubs adds k pairs, madd the pairs) */
#define S8_TILE(NAME, DECLS, STEPS, OUTS)                                                         \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, int32_t *acc,    \
                     float *facc, const float *ws)                                                \
    {                                                                                             \
        const __m256i ones = _mm256_set1_epi16(1);                                                \
        DECLS                                                                                     \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + t * CQ_PANEL_STEP));      \
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + t * CQ_PANEL_STEP + 32)); \
            const __m256i ab0 = _mm256_abs_epi8(b0), ab1 = _mm256_abs_epi8(b1);                   \
            _mm_prefetch((const char *)(b + t * CQ_PANEL_STEP + CQ_PF_DIST), _MM_HINT_T0);         \
            STEPS                                                                                 \
        }                                                                                         \
        const __m256 w0 = facc ? _mm256_loadu_ps(ws) : _mm256_setzero_ps();                       \
        const __m256 w1 = facc ? _mm256_loadu_ps(ws + 8) : _mm256_setzero_ps();                   \
        OUTS                                                                                      \
    }
S8_TILE(s8_tile_1, S8_DECL(0), S8_STEP(0), S8_OUT(0))
S8_TILE(s8_tile_2, S8_DECL(0) S8_DECL(1), S8_STEP(0) S8_STEP(1), S8_OUT(0) S8_OUT(1))
S8_TILE(s8_tile_3, S8_DECL(0) S8_DECL(1) S8_DECL(2), S8_STEP(0) S8_STEP(1) S8_STEP(2),
        S8_OUT(0) S8_OUT(1) S8_OUT(2))
S8_TILE(s8_tile_4, S8_DECL(0) S8_DECL(1) S8_DECL(2) S8_DECL(3),
        S8_STEP(0) S8_STEP(1) S8_STEP(2) S8_STEP(3), S8_OUT(0) S8_OUT(1) S8_OUT(2) S8_OUT(3))

void cq_s8_tile_avx2(int mr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                     int32_t *acc, float *facc, const float *ws)
{
    switch (mr) {
    case 1: s8_tile_1(nk4, a, lda, b, acc, facc, ws); break;
    case 2: s8_tile_2(nk4, a, lda, b, acc, facc, ws); break;
    case 3: s8_tile_3(nk4, a, lda, b, acc, facc, ws); break;
    default: s8_tile_4(nk4, a, lda, b, acc, facc, ws); break;
    }
}

/* One row of activations against 4 panels at once (M = 1): 4 concurrent sequential streams of the
 * weight, which one core reads faster than a single stream (measured here: ~14 GB/s against ~11,
 * 20-30% less time for a (4096, 11008) GEMV). acc[p*16 + j] += sum over k of a * panel p; the
 * same sign trick as the tiles (|x| per step, w takes x's sign). */
#define G_DECL(p) __m256i g##p##0 = _mm256_setzero_si256(), g##p##1 = _mm256_setzero_si256();
#define G_STEP(p)                                                                                 \
    {                                                                                             \
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(b##p + t * CQ_PANEL_STEP));       \
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(b##p + t * CQ_PANEL_STEP + 32));  \
        _mm_prefetch((const char *)(b##p + t * CQ_PANEL_STEP + CQ_PF_DIST), _MM_HINT_T0);         \
        g##p##0 = _mm256_add_epi32(g##p##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones)); \
        g##p##1 = _mm256_add_epi32(g##p##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones)); \
    }
#define G_OUT(p)                                                                                  \
    {                                                                                             \
        __m256i *o = (__m256i *)(acc + (p) * CQ_NR);                                              \
        _mm256_storeu_si256(o, _mm256_add_epi32(g##p##0, _mm256_loadu_si256(o)));                 \
        _mm256_storeu_si256(o + 1, _mm256_add_epi32(g##p##1, _mm256_loadu_si256(o + 1)));         \
    }
static void s8_gemv4_avx2(int64_t nk4, const int8_t *a, const int8_t *const *panels, int32_t *acc)
{
    const int8_t *b0 = panels[0], *b1 = panels[1], *b2 = panels[2], *b3 = panels[3];
    const __m256i ones = _mm256_set1_epi16(1);
    G_DECL(0) G_DECL(1) G_DECL(2) G_DECL(3)
    for (int64_t t = 0; t < nk4; t++) {
        const __m256i xb = _mm256_set1_epi32(load4(a + 4 * t));
        const __m256i ax = _mm256_abs_epi8(xb);
        G_STEP(0) G_STEP(1) G_STEP(2) G_STEP(3)
    }
    G_OUT(0) G_OUT(1) G_OUT(2) G_OUT(3)
}

/* Weight-only GEMV over 4 panels at once (4 concurrent weight streams, as s8_gemv4). Each int32
 * lane of a 32-byte load holds one column's 4 codes of the step; code i is brought to a float by
 * a shift pair, so each column keeps one accumulator lane and k is summed in order: 2 accumulators
 * per panel, 8 in all, and the 4 broadcasts of x are shared by the panels. */
#define F4_STEP(p)                                                                                \
    {                                                                                             \
        const int8_t *bp = panels[p] + t * CQ_PANEL_STEP;                                         \
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)bp);                               \
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(bp + 32));                        \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST), _MM_HINT_T0);                               \
        F4_K(p, 0, x0) F4_K(p, 1, x1) F4_K(p, 2, x2) F4_K(p, 3, x3)                                \
    }
#define F4_K(p, I, XV)                                                                            \
    f##p##0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v0, 24 - 8 * (I)), 24)), XV, f##p##0); \
    f##p##1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v1, 24 - 8 * (I)), 24)), XV, f##p##1);
void cq_f32_gemv4_avx2(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws,
                           float *y)
{
    __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00, f30 = f00, f31 = f00;
    for (int64_t t = 0; t < nk4; t++) {
        const __m256 x0 = _mm256_broadcast_ss(x + 4 * t), x1 = _mm256_broadcast_ss(x + 4 * t + 1);
        const __m256 x2 = _mm256_broadcast_ss(x + 4 * t + 2), x3 = _mm256_broadcast_ss(x + 4 * t + 3);
        F4_STEP(0) F4_STEP(1) F4_STEP(2) F4_STEP(3)
    }
#define F4_OUT(p)                                                                                 \
    _mm256_storeu_ps(y + 16 * (p), _mm256_fmadd_ps(f##p##0, _mm256_loadu_ps(ws + 16 * (p)), _mm256_loadu_ps(y + 16 * (p)))); \
    _mm256_storeu_ps(y + 16 * (p) + 8, _mm256_fmadd_ps(f##p##1, _mm256_loadu_ps(ws + 16 * (p) + 8), _mm256_loadu_ps(y + 16 * (p) + 8)));
    F4_OUT(0) F4_OUT(1) F4_OUT(2) F4_OUT(3)
#undef F4_OUT
}

void cq_f32_dequant_avx2(int64_t nk4, const int8_t *b, const float *ws, float *out)
{
    const __m256 w0 = _mm256_loadu_ps(ws), w1 = _mm256_loadu_ps(ws + 8);
    for (int64_t t = 0; t < nk4; t++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(b + t * CQ_PANEL_STEP));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(b + t * CQ_PANEL_STEP + 32));
        float *o = out + 4 * t * CQ_NR;
        /* each int32 lane of v0 holds the 4 codes (k = 4t..4t+3) of one column: byte i is k 4t+i */
#define CQ_DQ_ROW(I)                                                                              \
        _mm256_storeu_ps(o + (I) * CQ_NR, _mm256_mul_ps(_mm256_cvtepi32_ps(                        \
            _mm256_srai_epi32(_mm256_slli_epi32(v0, 24 - 8 * (I)), 24)), w0));                     \
        _mm256_storeu_ps(o + (I) * CQ_NR + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(                    \
            _mm256_srai_epi32(_mm256_slli_epi32(v1, 24 - 8 * (I)), 24)), w1));
        CQ_DQ_ROW(0)
        CQ_DQ_ROW(1)
        CQ_DQ_ROW(2)
        CQ_DQ_ROW(3)
#undef CQ_DQ_ROW
    }
}

#define F_DECL(r) __m256 c##r##0 = _mm256_loadu_ps(c + (r) * ldc), c##r##1 = _mm256_loadu_ps(c + (r) * ldc + 8);
#define F_STEP(r)                                                                                 \
    {                                                                                             \
        const __m256 av = _mm256_broadcast_ss(a + (r) * lda + kk);                                \
        c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                                               \
        c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                                               \
    }
#define F_OUT(r) _mm256_storeu_ps(c + (r) * ldc, c##r##0); _mm256_storeu_ps(c + (r) * ldc + 8, c##r##1);
#define F_TILE(NAME, DECLS, STEPS, OUTS)                                                          \
    static void NAME(int64_t kc, const float *a, int64_t lda, const float *bb, float *c, int64_t ldc) \
    {                                                                                             \
        DECLS                                                                                     \
        for (int64_t kk = 0; kk < kc; kk++) {                                                     \
            const __m256 b0 = _mm256_load_ps(bb + kk * CQ_NR), b1 = _mm256_load_ps(bb + kk * CQ_NR + 8); \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
F_TILE(f32_tile_1, F_DECL(0), F_STEP(0), F_OUT(0))
F_TILE(f32_tile_2, F_DECL(0) F_DECL(1), F_STEP(0) F_STEP(1), F_OUT(0) F_OUT(1))
F_TILE(f32_tile_3, F_DECL(0) F_DECL(1) F_DECL(2), F_STEP(0) F_STEP(1) F_STEP(2), F_OUT(0) F_OUT(1) F_OUT(2))
F_TILE(f32_tile_4, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3), F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3),
       F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3))
F_TILE(f32_tile_5, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3) F_DECL(4),
       F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3) F_STEP(4), F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3) F_OUT(4))
F_TILE(f32_tile_6, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3) F_DECL(4) F_DECL(5),
       F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3) F_STEP(4) F_STEP(5),
       F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3) F_OUT(4) F_OUT(5))

void cq_f32_tile_avx2(int mr, int64_t kc, const float *a, int64_t lda, const float *bb, float *c,
                      int64_t ldc)
{
    switch (mr) {
    case 1: f32_tile_1(kc, a, lda, bb, c, ldc); break;
    case 2: f32_tile_2(kc, a, lda, bb, c, ldc); break;
    case 3: f32_tile_3(kc, a, lda, bb, c, ldc); break;
    case 4: f32_tile_4(kc, a, lda, bb, c, ldc); break;
    case 5: f32_tile_5(kc, a, lda, bb, c, ldc); break;
    default: f32_tile_6(kc, a, lda, bb, c, ldc); break;
    }
}

/* exp(v) for v in [-88, 0]: v = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts so r is
 * exact to float rounding), e^r by its Taylor polynomial to degree 7 (relative error < 3e-8 on that
 * interval), 2^n put in the exponent bits. */
ALWAYS_INLINE __m256 exp_neg(__m256 v)
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
void cq_gelu_avx2(const float *x, int64_t n, float *y)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
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
        _mm256_storeu_ps(y + i, _mm256_blendv_ps(g, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ)));
    }
    for (; i < n; i++) y[i] = cq_gelu1(x[i]);
}

void cq_dequant_avx2(const int8_t *q, int64_t n, float scale, float *out)
{
    const __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                      _mm_loadl_epi64((const __m128i *)(q + i)))), s));
    for (; i < n; i++) out[i] = (float)q[i] * scale;
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const cq_kernels cq_kernels_avx2 = {
    CQ_ISA_AVX2, cq_absmax_avx2, cq_quantize_avx2, cq_s8_tile_avx2,
    cq_f32_dequant_avx2, cq_f32_tile_avx2, cq_gelu_avx2, cq_dequant_avx2,
    s8_gemv4_avx2, cq_f32_gemv4_avx2,
};
#elif defined(CQ_X86)
/* The compiler cannot target AVX2: an empty table, which dispatch treats as "not built". */
const cq_kernels cq_kernels_avx2 = {CQ_ISA_AVX2, 0, 0, 0, 0, 0, 0, 0, 0, 0};
#endif
