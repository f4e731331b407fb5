/* f32-qc8w-gemm-6x64-avx512f.c - weight-only (float32 activations x int8 weights) micro-kernels for
 * AVX-512F, format N64K4: a panel block dequantized to float32 (dequant_64c4, one pass, L1-sized),
 * a 6x64 float tile over it (24 zmm accumulators, 4 weight vectors per k, the activation broadcast
 * embedded in the FMA: {1to16}), and GEMVs of 1 to 6 rows that convert codes in registers.
 * Each int32 lane of a 64-byte load holds one column's 4 codes of a step; code i becomes an int32
 * by a shift pair (vpslld 24-8i, vpsrad 24), then a float. */
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

/* Weight-only GEMVs (M below the config's gemv_m): codes converted in registers (3 instructions per
 * 16 weights, the bound of a 1-row GEMV on ports 0 and 5), so several rows share each conversion.
 * One row: 4 panels (4 concurrent weight streams, 16 accumulators, the 4 broadcasts of x shared);
 * more rows: gemv_rows below. Per 64 weights: 11 conversion instructions + 4 FMAs a row. Every
 * row's sums are the same FMA chain over k whatever mr is. */
#define G_DECL(p) __m512 f##p##0 = _mm512_setzero_ps(), f##p##1 = f##p##0, f##p##2 = f##p##0, f##p##3 = f##p##0;
#define G_K(p, V, I, XV) f##p##V = _mm512_fmadd_ps(code_f(v##V, I), XV, f##p##V);
#define G_VEC(p, V) { const __m512i v##V = _mm512_loadu_si512((const void *)(bp + 64 * (V))); \
    G_K(p, V, 0, x0) G_K(p, V, 1, x1) G_K(p, V, 2, x2) G_K(p, V, 3, x3) }
#define G_STEP(p)                                                                                 \
    {                                                                                             \
        const int8_t *bp = panels[p] + t * STEP;                                                  \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST), _MM_HINT_T0);                               \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST + 128), _MM_HINT_T0);                         \
        G_VEC(p, 0) G_VEC(p, 1) G_VEC(p, 2) G_VEC(p, 3)                                           \
    }
#define G_OUT1(p, V) _mm512_storeu_ps(y + NR * (p) + 16 * (V), _mm512_fmadd_ps(f##p##V, \
    _mm512_loadu_ps(ws + NR * (p) + 16 * (V)), _mm512_loadu_ps(y + NR * (p) + 16 * (V))));
#define G_OUT(p) G_OUT1(p, 0) G_OUT1(p, 1) G_OUT1(p, 2) G_OUT1(p, 3)
static void gemv_1x256(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws, float *y)
{
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
 * conversion (its load folded into the shift) and R FMAs. */
CQ_INLINE void gemv_rows(const int R, const int P, const int V, int v0, int64_t nk4, const float *x, int64_t ldx,
                         const int8_t *const *pp, const float *ws, float *y, int64_t ldy)
{
    __m512 acc[6][2][4];
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
                    const __m512 c = code_f(_mm512_loadu_si512((const void *)(pp[p] + t * STEP + 64 * (v0 + v))), i);
                    for (int r = 0; r < R; r++) acc[r][p][v] = _mm512_fmadd_ps(c, xb[r], acc[r][p][v]);
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
            for (int v = 0; v < V; v++) {
                float *yp = y + r * ldy + NR * p + 16 * (v0 + v);
                const __m512 w = _mm512_loadu_ps(ws + NR * p + 16 * (v0 + v));
                _mm512_storeu_ps(yp, _mm512_fmadd_ps(acc[r][p][v], w, _mm512_loadu_ps(yp)));
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
