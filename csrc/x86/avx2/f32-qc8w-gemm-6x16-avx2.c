/* f32-qc8w-gemm-6x16-avx2.c - weight-only (float32 activations x int8 weights) micro-kernels for
 * AVX2 + FMA, format N16K4: a panel block dequantized to float32 (dequant_16c4), a 6x16 float tile
 * (12 ymm accumulators) over it, and GEMVs of 1 to 6 rows that convert codes in registers. */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>

#define NR 16
#define STEP (NR * 4)

/* Code i (0..3) of every int32 lane (one column's 4 codes of a k step) as a float: a shift pair
 * and a convert. */
CQ_INLINE __m256 code8(__m256i v, const int i)
{
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * i), 24));
}

/* The GEMVs' conversion (as the AVX-512 GEMVs'): code i moved to the lane's top byte with zeros
 * below (code 0 by vpslld 24, 1 and 2 by vpshufb, 3 by vpand: 2 instructions per 8 weights against
 * the shift pair's 3), so the int32 is code * 2^24 and converts exactly; the sums are 2^24 times
 * those of x * code bit for bit, scaled back by 2^-24 (exact) in the epilogue (the argument is at
 * code_f24 in f32-qc8w-gemm-6x64-avx512f.c). Against the shift pair, A/B on Zen 3 (AVX2, one
 * thread, (768, 768) and (2048, 512), both import orders, 2026-12-02): M = 1 1.14-1.16x, M = 2
 * 1.18-1.20x, M = 3 1.08x, M = 4 1.03-1.06x, M = 5 1.06-1.07x, M = 6 0.99-1.0x, M = 7 1.04x,
 * M = 8 1.04x. */
CQ_INLINE __m256i code_sh8(const int i)
{
#define CQ_SH(j) (int)(((uint32_t)(4 * (j) + i) << 24) | 0x808080u)
    return _mm256_setr_epi32(CQ_SH(0), CQ_SH(1), CQ_SH(2), CQ_SH(3), CQ_SH(0), CQ_SH(1), CQ_SH(2), CQ_SH(3));
#undef CQ_SH
}
CQ_INLINE __m256 code24(__m256i v, const int i)
{
    if (i == 0) return _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 24));
    if (i == 3) return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFF000000u)));
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, code_sh8(i)));
}

/* Weight-only GEMVs (M below the config's gemv_m). One row: 4 panels at once (4 concurrent weight
 * streams, as s8_gemv4). Each int32 lane of a 32-byte load holds one column's 4 codes of the step;
 * code i is brought to a float times 2^24 (code24), so each column keeps one accumulator lane and k is
 * summed in order: 2 accumulators per panel, 8 in all, and the 4 broadcasts of x are shared by the
 * panels. 2 rows: panels in pairs; 3-6 rows: one panel at a time, its 2 converted vectors shared
 * by the rows (16 ymm registers: 2 R P accumulators + 2 P codes + a broadcast). Every row's sums
 * are the same FMA chain over k whatever mr is. */
#define F4_STEP(p)                                                                                \
    {                                                                                             \
        const int8_t *bp = panels[p] + t * STEP;                                         \
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)bp);                               \
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(bp + 32));                        \
        _mm_prefetch((const char *)(bp + CQ_PF_DIST), _MM_HINT_T0);                               \
        F4_K(p, 0, x0) F4_K(p, 1, x1) F4_K(p, 2, x2) F4_K(p, 3, x3)                                \
    }
#define F4_K(p, I, XV)                                                                            \
    f##p##0 = _mm256_fmadd_ps(code24(v0, I), XV, f##p##0);                                        \
    f##p##1 = _mm256_fmadd_ps(code24(v1, I), XV, f##p##1);
static void gemv_1x64(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws, float *y)
{
    __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00, f30 = f00, f31 = f00;
    for (int64_t t = 0; t < nk4; t++) {
        const __m256 x0 = _mm256_broadcast_ss(x + 4 * t), x1 = _mm256_broadcast_ss(x + 4 * t + 1);
        const __m256 x2 = _mm256_broadcast_ss(x + 4 * t + 2), x3 = _mm256_broadcast_ss(x + 4 * t + 3);
        F4_STEP(0) F4_STEP(1) F4_STEP(2) F4_STEP(3)
    }
    const __m256 down = _mm256_set1_ps(0x1p-24f);
#define F4_OUT(p)                                                                                 \
    _mm256_storeu_ps(y + 16 * (p), _mm256_fmadd_ps(_mm256_mul_ps(f##p##0, down), _mm256_loadu_ps(ws + 16 * (p)), _mm256_loadu_ps(y + 16 * (p)))); \
    _mm256_storeu_ps(y + 16 * (p) + 8, _mm256_fmadd_ps(_mm256_mul_ps(f##p##1, down), _mm256_loadu_ps(ws + 16 * (p) + 8), _mm256_loadu_ps(y + 16 * (p) + 8)));
    F4_OUT(0) F4_OUT(1) F4_OUT(2) F4_OUT(3)
#undef F4_OUT
}

/* R rows x P panels, R and P constants where it is inlined (the arrays stay in registers) */
CQ_INLINE void gemv_rows(const int R, const int P, int64_t nk4, const float *x, int64_t ldx,
                         const int8_t *const *pp, const float *ws, float *y, int64_t ldy)
{
    const __m256 down = _mm256_set1_ps(0x1p-24f);
    __m256 acc[6][2][2];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < nk4; t++) {
        for (int p = 0; p < P; p++) _mm_prefetch((const char *)(pp[p] + t * STEP + CQ_PF_DIST), _MM_HINT_T0);
        for (int i = 0; i < 4; i++) {
            __m256 c[2][2];
            for (int p = 0; p < P; p++) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(pp[p] + t * STEP));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(pp[p] + t * STEP + 32));
                c[p][0] = code24(v0, i);
                c[p][1] = code24(v1, i);
            }
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_broadcast_ss(x + r * ldx + 4 * t + i);
                for (int p = 0; p < P; p++) {
                    acc[r][p][0] = _mm256_fmadd_ps(c[p][0], xb, acc[r][p][0]);
                    acc[r][p][1] = _mm256_fmadd_ps(c[p][1], xb, acc[r][p][1]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
            for (int h = 0; h < 2; h++) {
                float *yp = y + r * ldy + NR * p + 8 * h;
                _mm256_storeu_ps(yp, _mm256_fmadd_ps(_mm256_mul_ps(acc[r][p][h], down), _mm256_loadu_ps(ws + NR * p + 8 * h),
                                                     _mm256_loadu_ps(yp)));
            }
}
#define GEMV_ROWS(R, P)                                                                           \
    static void gemv_##R##x##P(int64_t nk4, const float *x, int64_t ldx, const int8_t *const *pp,  \
                               const float *ws, float *y, int64_t ldy)                            \
    {                                                                                             \
        gemv_rows(R, P, nk4, x, ldx, pp, ws, y, ldy);                                             \
    }
GEMV_ROWS(2, 2)
GEMV_ROWS(3, 1)
GEMV_ROWS(4, 1)
GEMV_ROWS(5, 1)
GEMV_ROWS(6, 1)

void cq_f32_qc8w_gemv4_6x64c4_avx2(int mr, int nr, int64_t nk4, const float *x, int64_t ldx,
                                   const int8_t *const *panels, const float *ws, float *y, int64_t ldy)
{
    (void)nr;
    if (mr <= 1) { gemv_1x64(nk4, x, panels, ws, y); return; }
    for (int p = 0; p < 4; p += mr == 2 ? 2 : 1) {
        const int8_t *const *pp = panels + p;
        const float *wp = ws + NR * p;
        float *yp = y + NR * p;
        switch (mr) {
        case 2: gemv_2x2(nk4, x, ldx, pp, wp, yp, ldy); break;
        case 3: gemv_3x1(nk4, x, ldx, pp, wp, yp, ldy); break;
        case 4: gemv_4x1(nk4, x, ldx, pp, wp, yp, ldy); break;
        case 5: gemv_5x1(nk4, x, ldx, pp, wp, yp, ldy); break;
        default: gemv_6x1(nk4, x, ldx, pp, wp, yp, ldy); break;
        }
    }
}

void cq_f32_qc8w_dequant_16c4_avx2(int nr, int64_t nk4, const int8_t *b, const float *ws, float *out)
{
    (void)nr;
    const __m256 w0 = _mm256_loadu_ps(ws), w1 = _mm256_loadu_ps(ws + 8);
    for (int64_t t = 0; t < nk4; t++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(b + t * STEP));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(b + t * STEP + 32));
        float *o = out + 4 * t * NR;
        /* each int32 lane of v0 holds the 4 codes (k = 4t..4t+3) of one column: byte i is k 4t+i */
#define CQ_DQ_ROW(I)                                                                              \
        _mm256_storeu_ps(o + (I) * NR, _mm256_mul_ps(code8(v0, I), w0));                          \
        _mm256_storeu_ps(o + (I) * NR + 8, _mm256_mul_ps(code8(v1, I), w1));
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
            const __m256 b0 = _mm256_load_ps(bb + kk * NR), b1 = _mm256_load_ps(bb + kk * NR + 8); \
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

void cq_f32_qc8w_gemm_6x16_avx2(int mr, int nr, int64_t kc, const float *a, int64_t lda, const float *bb,
                                float *c, int64_t ldc)
{
    (void)nr;
    switch (mr) {
    case 1: f32_tile_1(kc, a, lda, bb, c, ldc); break;
    case 2: f32_tile_2(kc, a, lda, bb, c, ldc); break;
    case 3: f32_tile_3(kc, a, lda, bb, c, ldc); break;
    case 4: f32_tile_4(kc, a, lda, bb, c, ldc); break;
    case 5: f32_tile_5(kc, a, lda, bb, c, ldc); break;
    default: f32_tile_6(kc, a, lda, bb, c, ldc); break;
    }
}

CQ_TARGET_END
#endif
