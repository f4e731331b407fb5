/* f32-qc8w-gemm-6x64-avx512f.c - weight-only (float32 activations x int8 weights) micro-kernels for
 * AVX-512F, format N64K4: a panel block dequantized to float32 (dequant_64c4, one pass, L1-sized),
 * a 6x64 float tile over it (24 zmm accumulators, 4 weight vectors per k, the activation broadcast
 * embedded in the FMA: {1to16}), and GEMVs of 1 to 6 rows that convert codes in registers.
 * Each int32 lane of a 64-byte load holds one column's 4 codes of a step; code i becomes an int32
 * by a shift pair (vpslld 24-8i, vpsrad 24), then a float (code_f, the dequantizer), or, in the
 * GEMVs, code * 2^24 by one instruction (code_f24). */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

#define NR 64
#define STEP (NR * 4)

CQ_INLINE __m512 code_f(__m512i v, const int i)
{
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24));
}

/* The GEMVs' conversion: code i of each lane moved to the lane's top byte with the bytes below it
 * zero, so the int32 is code * 2^24 exactly and converts exactly: code 0 by vpslld 24, code 3 by
 * vpandd, codes 1 and 2 by vpshufb (2 instructions per 16 weights, against 3 for the shift pair).
 * The GEMV's sums are then 2^24 times the sums of x * code, bit for bit: every FMA's exact result
 * is a multiple of 2^-149 (x a float, the code an integer), so where it is subnormal it is exact in
 * both scalings, and elsewhere rounding commutes with the power of two; the driver keeps
 * 127 k max|x| <= 2^100 (wo_gemv_rows), so the scaled sums stay below 2^124. The epilogue
 * multiplies them by 2^-24 (exact: a multiple of 2^-125 below 2^124) before the scale. This assumes
 * IEEE gradual underflow, as the library runs: a caller that sets flush-to-zero (MXCSR FTZ, e.g.
 * torch.set_flush_denormal(True)) flushes the reference's subnormal partial sums but not the scaled
 * ones, so the paths may then differ where partial sums fall below 2^-126. */
CQ_INLINE __m512i code_sh(const int i)
{
    /* per lane j of a 128-bit block: bytes [zero, zero, zero, byte 4j + i] */
#define CQ_SH(j) (int)(((uint32_t)(4 * (j) + i) << 24) | 0x808080u)
    return _mm512_set4_epi32(CQ_SH(3), CQ_SH(2), CQ_SH(1), CQ_SH(0));
#undef CQ_SH
}
CQ_INLINE __m512 code_f24(__m512i v, const int i, __m512i sh1, __m512i sh2)
{
    if (i == 0) return _mm512_cvtepi32_ps(_mm512_slli_epi32(v, 24));
    if (i == 3) return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFF000000u)));
    return _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, i == 1 ? sh1 : sh2));
}

void cq_f32_qc8w_dequant_64c4_avx512f(int nr, int64_t nk4, const int8_t *b, const float *ws, float *out)
{
    (void)nr;
    const __m512 w0 = _mm512_loadu_ps(ws), w1 = _mm512_loadu_ps(ws + 16);
    const __m512 w2 = _mm512_loadu_ps(ws + 32), w3 = _mm512_loadu_ps(ws + 48);
    for (int64_t t = 0; t < nk4; t++) {
        const int8_t *bp = b + t * STEP;
        const __m512i v0 = _mm512_loadu_si512((const void *)bp), v1 = _mm512_loadu_si512((const void *)(bp + 64));
        const __m512i v2 = _mm512_loadu_si512((const void *)(bp + 128)), v3 = _mm512_loadu_si512((const void *)(bp + 192));
        float *o = out + 4 * t * NR;
#define DQ(I)                                                                                     \
        _mm512_store_ps(o + (I) * NR, _mm512_mul_ps(code_f(v0, I), w0));                          \
        _mm512_store_ps(o + (I) * NR + 16, _mm512_mul_ps(code_f(v1, I), w1));                     \
        _mm512_store_ps(o + (I) * NR + 32, _mm512_mul_ps(code_f(v2, I), w2));                     \
        _mm512_store_ps(o + (I) * NR + 48, _mm512_mul_ps(code_f(v3, I), w3));
        DQ(0) DQ(1) DQ(2) DQ(3)
#undef DQ
    }
}

#define F_DECL(r)                                                                                 \
    __m512 c##r##0 = _mm512_loadu_ps(c + (r) * ldc), c##r##1 = _mm512_loadu_ps(c + (r) * ldc + 16); \
    __m512 c##r##2 = _mm512_loadu_ps(c + (r) * ldc + 32), c##r##3 = _mm512_loadu_ps(c + (r) * ldc + 48);
#define F_STEP(r)                                                                                 \
    {                                                                                             \
        const __m512 av = _mm512_set1_ps(a[(r) * lda + kk]);                                      \
        c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                                               \
        c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);                                               \
        c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2);                                               \
        c##r##3 = _mm512_fmadd_ps(av, b3, c##r##3);                                               \
    }
#define F_OUT(r)                                                                                  \
    _mm512_storeu_ps(c + (r) * ldc, c##r##0); _mm512_storeu_ps(c + (r) * ldc + 16, c##r##1);     \
    _mm512_storeu_ps(c + (r) * ldc + 32, c##r##2); _mm512_storeu_ps(c + (r) * ldc + 48, c##r##3);
#define F_TILE(NAME, DECLS, STEPS, OUTS)                                                          \
    static void NAME(int64_t kc, const float *a, int64_t lda, const float *bb, float *c, int64_t ldc) \
    {                                                                                             \
        DECLS                                                                                     \
        for (int64_t kk = 0; kk < kc; kk++) {                                                     \
            const float *bk = bb + kk * NR;                                                       \
            const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);                   \
            const __m512 b2 = _mm512_load_ps(bk + 32), b3 = _mm512_load_ps(bk + 48);              \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
F_TILE(f32_1x64, F_DECL(0), F_STEP(0), F_OUT(0))
F_TILE(f32_2x64, F_DECL(0) F_DECL(1), F_STEP(0) F_STEP(1), F_OUT(0) F_OUT(1))
F_TILE(f32_3x64, F_DECL(0) F_DECL(1) F_DECL(2), F_STEP(0) F_STEP(1) F_STEP(2), F_OUT(0) F_OUT(1) F_OUT(2))
F_TILE(f32_4x64, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3), F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3),
       F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3))
F_TILE(f32_5x64, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3) F_DECL(4),
       F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3) F_STEP(4), F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3) F_OUT(4))
F_TILE(f32_6x64, F_DECL(0) F_DECL(1) F_DECL(2) F_DECL(3) F_DECL(4) F_DECL(5),
       F_STEP(0) F_STEP(1) F_STEP(2) F_STEP(3) F_STEP(4) F_STEP(5),
       F_OUT(0) F_OUT(1) F_OUT(2) F_OUT(3) F_OUT(4) F_OUT(5))

void cq_f32_qc8w_gemm_6x64_avx512f(int mr, int nr, int64_t kc, const float *a, int64_t lda,
                                   const float *bb, float *c, int64_t ldc)
{
    (void)nr;
    switch (mr) {
    case 1: f32_1x64(kc, a, lda, bb, c, ldc); break;
    case 2: f32_2x64(kc, a, lda, bb, c, ldc); break;
    case 3: f32_3x64(kc, a, lda, bb, c, ldc); break;
    case 4: f32_4x64(kc, a, lda, bb, c, ldc); break;
    case 5: f32_5x64(kc, a, lda, bb, c, ldc); break;
    default: f32_6x64(kc, a, lda, bb, c, ldc); break;
    }
}

/* Weight-only GEMVs (M below the config's gemv_m): codes converted in registers, so several rows
 * share each conversion: code_f24, 2 instructions per 16 weights (the shift pair's 3 bounded a
 * 1-row GEMV on ports 0 and 5). One row: 4 panels (4 concurrent weight streams, 16 accumulators,
 * the 4 broadcasts of x shared); more rows: gemv_rows below. Per 64 weights: 8 conversion
 * instructions + 4 FMAs a row. Every row's sums are the same FMA chain over k whatever mr is, and
 * 2^24 times the scalar reference's, bit for bit. */
#define G_DECL(p) __m512 f##p##0 = _mm512_setzero_ps(), f##p##1 = f##p##0, f##p##2 = f##p##0, f##p##3 = f##p##0;
#define G_K(p, V, I, XV) f##p##V = _mm512_fmadd_ps(code_f24(v##V, I, sh1, sh2), XV, f##p##V);
#define G_VEC(p, V) { const __m512i v##V = _mm512_loadu_si512((const void *)(bp + 64 * (V))); \
    G_K(p, V, 0, x0) G_K(p, V, 1, x1) G_K(p, V, 2, x2) G_K(p, V, 3, x3) }
#define G_STEP(p)                                                                                 \
    {                                                                                             \
        const int8_t *bp = panels[p] + t * STEP;                                                  \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST + 128), _MM_HINT_T0);                         \
        G_VEC(p, 0) G_VEC(p, 1) G_VEC(p, 2) G_VEC(p, 3)                                           \
    }
#define G_OUT1(p, V) _mm512_storeu_ps(y + NR * (p) + 16 * (V), _mm512_fmadd_ps(_mm512_mul_ps(f##p##V, down), \
    _mm512_loadu_ps(ws + NR * (p) + 16 * (V)), _mm512_loadu_ps(y + NR * (p) + 16 * (V))));
#define G_OUT(p) G_OUT1(p, 0) G_OUT1(p, 1) G_OUT1(p, 2) G_OUT1(p, 3)
static void gemv_1x256(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws, float *y)
{
    const __m512i sh1 = code_sh(1), sh2 = code_sh(2);
    const __m512 down = _mm512_set1_ps(0x1p-24f);
    G_DECL(0) G_DECL(1) G_DECL(2) G_DECL(3)
    for (int64_t t = 0; t < nk4; t++) {
        const __m512 x0 = _mm512_set1_ps(x[4 * t]), x1 = _mm512_set1_ps(x[4 * t + 1]);
        const __m512 x2 = _mm512_set1_ps(x[4 * t + 2]), x3 = _mm512_set1_ps(x[4 * t + 3]);
        G_STEP(0) G_STEP(1) G_STEP(2) G_STEP(3)
    }
    G_OUT(0) G_OUT(1) G_OUT(2) G_OUT(3)
}

/* R rows x P panels x V of each panel's 4 vectors from vector v0 (R P V <= 16 accumulators: with
 * 24, GCC 12 spilled some of them in the k loop); R, P, V constants where it is inlined, so the
 * arrays stay in registers. Per k step and code i: R broadcasts, then per weight vector one
 * conversion (code_f24, its load folded in) and R FMAs. code_f24 against the shift pair (code_f):
 * A/B on Zen 4 (one thread, (768, 768) and (2048, 512), both import orders, 2026-12-01): M = 1
 * 1.52-1.56x, 2 1.16-1.21x, 3 1.07-1.09x, 4 1.04-1.05x, 7-8 1.05-1.06x, but 5 and 6 0.96-0.98x
 * (the conversion there is shared by 5-6 rows' FMAs); llvm-mca (make mca, predictions) for the
 * 5- and 6-row loops: sapphirerapids 62 -> 50 and 70 -> 58 cycles, icelake-server 54 -> 44 and
 * 62 -> 52, skylake-avx512 37 -> 33 and 40 -> 34 (vpshufb, shifts and FMAs share ports 0 and 5
 * there), znver4 55 -> 56 and 65 -> 65. Intel servers first: code_f24 in every GEMV. */
CQ_INLINE void gemv_rows(const int R, const int P, const int V, int v0, int64_t nk4, const float *x, int64_t ldx,
                         const int8_t *const *pp, const float *ws, float *y, int64_t ldy)
{
    __m512 acc[6][2][4];
    const __m512i sh1 = code_sh(1), sh2 = code_sh(2);
    const __m512 down = _mm512_set1_ps(0x1p-24f);
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
            for (int v = 0; v < V; v++) acc[r][p][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < nk4; t++) {
        for (int p = 0; p < P; p++) {
            _mm_prefetch((const char *)(pp[p] + t * STEP + 64 * v0 + CQ_PF_DIST), _MM_HINT_T0);
            if (V > 2) _mm_prefetch((const char *)(pp[p] + t * STEP + CQ_PF_DIST + 128), _MM_HINT_T0);
        }
        for (int i = 0; i < 4; i++) {
            __m512 xb[6];
            for (int r = 0; r < R; r++) xb[r] = _mm512_set1_ps(x[r * ldx + 4 * t + i]);
            for (int p = 0; p < P; p++)
                for (int v = 0; v < V; v++) {
                    const __m512i cv = _mm512_loadu_si512((const void *)(pp[p] + t * STEP + 64 * (v0 + v)));
                    const __m512 c = code_f24(cv, i, sh1, sh2);
                    for (int r = 0; r < R; r++) acc[r][p][v] = _mm512_fmadd_ps(c, xb[r], acc[r][p][v]);
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
            for (int v = 0; v < V; v++) {
                float *yp = y + r * ldy + NR * p + 16 * (v0 + v);
                const __m512 w = _mm512_loadu_ps(ws + NR * p + 16 * (v0 + v));
                _mm512_storeu_ps(yp, _mm512_fmadd_ps(_mm512_mul_ps(acc[r][p][v], down), w, _mm512_loadu_ps(yp)));
            }
}
#define GEMV_ROWS(R, P, V)                                                                        \
    static void gemv_##R##x##P##x##V(int v0, int64_t nk4, const float *x, int64_t ldx,             \
                                     const int8_t *const *pp, const float *ws, float *y, int64_t ldy) \
    {                                                                                             \
        gemv_rows(R, P, V, v0, nk4, x, ldx, pp, ws, y, ldy);                                      \
    }
GEMV_ROWS(2, 2, 4)
GEMV_ROWS(3, 1, 4)
GEMV_ROWS(4, 1, 4)
GEMV_ROWS(5, 1, 2)
GEMV_ROWS(6, 1, 2)

/* 2 rows: panels in pairs (2 weight streams); 3-4 rows: a panel at a time; 5-6 rows: half a panel
 * at a time (the other half in a second pass over k). */
void cq_f32_qc8w_gemv4_6x256c4_avx512f(int mr, int nr, int64_t nk4, const float *x, int64_t ldx,
                                       const int8_t *const *panels, const float *ws, float *y, int64_t ldy)
{
    (void)nr;
    if (mr <= 1) { gemv_1x256(nk4, x, panels, ws, y); return; }
    for (int p = 0; p < 4; p += mr == 2 ? 2 : 1) {
        const int8_t *const *pp = panels + p;
        const float *wp = ws + NR * p;
        float *yp = y + NR * p;
        switch (mr) {
        case 2: gemv_2x2x4(0, nk4, x, ldx, pp, wp, yp, ldy); break;
        case 3: gemv_3x1x4(0, nk4, x, ldx, pp, wp, yp, ldy); break;
        case 4: gemv_4x1x4(0, nk4, x, ldx, pp, wp, yp, ldy); break;
        case 5: gemv_5x1x2(0, nk4, x, ldx, pp, wp, yp, ldy); gemv_5x1x2(2, nk4, x, ldx, pp, wp, yp, ldy); break;
        default: gemv_6x1x2(0, nk4, x, ldx, pp, wp, yp, ldy); gemv_6x1x2(2, nk4, x, ldx, pp, wp, yp, ldy); break;
        }
    }
}
CQ_TARGET_END
#endif
