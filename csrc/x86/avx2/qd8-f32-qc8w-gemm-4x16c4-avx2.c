/* qd8-f32-qc8w-gemm-4x16c4-avx2.c - dynamic int8 micro-kernels for AVX2: a 4x16 tile (8 ymm
 * accumulators) and a 1x64 GEMV over 4 panels of 16 (4 concurrent weight streams).
 *
 * int8 x int8 without saturation: vpmaddubsw multiplies u8 x s8 pairs and saturates their int16
 * sum. With |w| as the u8 operand (vpabsb) and x carrying w's sign (vpsignb), each pair is at most
 * 2 * 127 * 127 = 32258 < 32767 since codes are in [-127, 127] (-128 is refused when packing and
 * never produced by activation quantization), so it never saturates; vpmaddwd with ones then
 * widens pairs to int32 (exact). Taking |w| once per step rather than |x| per row saves one op per
 * row and step (measured +6% on the 4x16 tile, Zen 3). Activations are s8: no compensation. */
#include "target.h"
#if CQ_CAN_TARGET_AVX2
CQ_TARGET_BEGIN("avx2,fma")
#include <immintrin.h>
#include <string.h>

#define NR 16
#define STEP (NR * 4)
#include "../qd8-out-256.h"

/* The tiles are written with one named variable per accumulator (macros per row): with arrays
 * indexed in loops, GCC 12 kept the accumulators on the stack (a store per FMA). */
#define S8_DECL(r) __m256i c##r##0 = _mm256_setzero_si256(), c##r##1 = _mm256_setzero_si256();
/* |w| is taken once per step (shared by the rows) and x's sign moved onto it per row:
 * |w| * (x * sign(w)) = x * w, with both factors in [-127, 127]. */
#define S8_STEP(r)                                                                                \
    {                                                                                             \
        const __m256i xb = _mm256_set1_epi32(cq_load4(a + (r) * lda + 4 * t));                       \
        c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ab0, _mm256_sign_epi8(xb, b0)), ones)); \
        c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ab1, _mm256_sign_epi8(xb, b1)), ones)); \
    }
#define S8_OUT(r) cq_qd8_out_row16(o, r, c##r##0, c##r##1);
/* per step, the weight vectors the rows share: b0, b1 and |b0|, |b1| */
#define S8_PREP                                                                                   \
    const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + t * STEP));                       \
    const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + t * STEP + 32));                  \
    const __m256i ab0 = _mm256_abs_epi8(b0);                                                      \
    const __m256i ab1 = _mm256_abs_epi8(b1);
/* (PREP, STEP and OUT are macro arguments: no comma outside parentheses in them) */
/* A tile of the family: PREP (the step's shared weight vectors), then STEP(r) per row; per step
 * the panel's next line CQ_PF_DIST ahead into L1 and a line of the driver's next panel into L2
 * (cq_qd8_pf_stream). */
#define TILE(NAME, PREP, DECLS, STEPS, OUTS)                                                      \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        const __m256i ones = _mm256_set1_epi16(1);                                                \
        int64_t pf_step;                                                                          \
        const char *pf = cq_qd8_pf_stream(o, b, STEP, &pf_step);                                  \
        DECLS                                                                                     \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            _mm_prefetch(pf + t * pf_step, _MM_HINT_T1);                                          \
            PREP                                                                                  \
            _mm_prefetch((const char *)(b + t * STEP + CQ_PF_DIST), _MM_HINT_T0);                 \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
/* The 1- to 4-row tiles of a family and the micro-kernel that picks one by mr. OUTS_(n, R) is a
 * tile's epilogue, R(M) expanding M(r) for each of its n rows (the sign family: its OUT per row;
 * the pair-safe one decides once per tile). */
#define ROWS1(M) M(0)
#define ROWS2(M) M(0) M(1)
#define ROWS3(M) M(0) M(1) M(2)
#define ROWS4(M) M(0) M(1) M(2) M(3)
#define TILES(FN, P, PREP, STEP_, OUTS_)                                                          \
    TILE(P##_1x16, PREP, ROWS1(S8_DECL), ROWS1(STEP_), OUTS_(1, ROWS1))                           \
    TILE(P##_2x16, PREP, ROWS2(S8_DECL), ROWS2(STEP_), OUTS_(2, ROWS2))                           \
    TILE(P##_3x16, PREP, ROWS3(S8_DECL), ROWS3(STEP_), OUTS_(3, ROWS3))                           \
    TILE(P##_4x16, PREP, ROWS4(S8_DECL), ROWS4(STEP_), OUTS_(4, ROWS4))                           \
    void FN(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        (void)nr;                                                                                 \
        switch (mr) {                                                                             \
        case 1: P##_1x16(nk4, a, lda, b, o); break;                                               \
        case 2: P##_2x16(nk4, a, lda, b, o); break;                                               \
        case 3: P##_3x16(nk4, a, lda, b, o); break;                                               \
        default: P##_4x16(nk4, a, lda, b, o); break;                                              \
        }                                                                                         \
    }
#define S8_OUTS(n, R) R(S8_OUT)
TILES(cq_qd8_f32_qc8w_gemm_4x16c4_avx2, gemm, S8_PREP, S8_STEP, S8_OUTS)

/* The pair-safe 4x16 tile: the u8 x s8 recipe that does not saturate, 3 instructions per 32 MACs
 * (vpmaddubsw, vpmaddwd, vpaddd) against the tile above's 4 (it adds a vpsignb per row). The u8
 * operand is the weight, w + 128 (an XOR per step, shared by the rows); the s8 operand is x' from
 * the pair-safe preparation (quantize.c, cq_ps_prepare_row, in the activation pass), whose aligned
 * pairs have opposite signs (a pair sum is then at most 255 * 127 - 1
 * in magnitude) or |x'_a| + |x'_b| <= 128 (at most 255 * 128 = 32640 < 32767). Then
 *   sum (w + 128) x' = sum w x' + 128 sum x'     (the second term from the block sums ps_sum)
 *   sum w x = sum w x' + sum over residual entries {k, v} of v * w[k]   (x = x' + v at k)
 * both exact in int32 (modulo 2^32, as the other kernels). A residual entry costs a few vector
 * instructions per 16 columns; Gaussian rows quantized per row have ~1 per 270 k (the driver
 * takes this tile at most 1 per 64 k over the rows and 1 per 16 k in a row, from N = 64, else the
 * sign tile: linear.c, want_ps). Zen 3, weights in L1, 4x16: 62
 * GMAC/s against 49.5 for the sign tile (median of 15, interleaved; a saturating u8 x s8 loop, as
 * fbgemm's, 65); register-only loops: 87 against 67 GMAC/s. */
/* The epilogue of a tile some of whose n rows have residual entries in this block: each row r's
 * accumulators (c<r>0, c<r>1) minus 128 * sum x', plus v * (code k of each column) per entry, then
 * its output. An entry's sel (|v| in byte k % 4 of every int32, the other bytes 0: internal.h, CQ_PS_ENT) makes
 * vpmaddubsw give |v| * w[k] in one int16 of each int32 (at most 126 * 127: exact), and vpmaddwd
 * by the int16 pairs (+-1, +-1) of v's sign the signed int32: 8 vector instructions per entry and
 * 16 columns (the sign pairs loaded from ps_sgn by the sign of the entry's kv). */
static const int32_t ps_sgn[16] __attribute__((aligned(32))) = {
    0x00010001, 0x00010001, 0x00010001, 0x00010001, 0x00010001, 0x00010001, 0x00010001, 0x00010001,
    -1, -1, -1, -1, -1, -1, -1, -1};
static __attribute__((noinline)) void ps_out_tile(const cq_qd8_out *o, int n, const int8_t *b, __m256i c00, __m256i c01,
                                                  __m256i c10, __m256i c11, __m256i c20, __m256i c21, __m256i c30,
                                                  __m256i c31)
{
    const __m256i f[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
    const int64_t k0 = o->ps_k0;
    for (int r = 0; r < n; r++) {
        const int32_t *s = o->ps_sum + r * o->ps_ld, *c = o->ps_cnt + r * o->ps_ld;
        const __m256i comp = _mm256_set1_epi32((int32_t)((uint32_t)(s[1] - s[0]) * 128u));
        __m256i a0 = _mm256_sub_epi32(f[2 * r], comp), a1 = _mm256_sub_epi32(f[2 * r + 1], comp);
        const int32_t *en = o->ps_ent + CQ_PS_ENT * (o->ps_row[r] + c[0]);
        const int32_t *en1 = o->ps_ent + CQ_PS_ENT * (o->ps_row[r] + c[1]);
        for (; en < en1; en += CQ_PS_ENT) {
            const int8_t *st = b + ((cq_ps_ent_k(en) - k0) >> 2) * STEP; /* code k of column j: byte k % 4 of int32 j */
            const __m256i sel = _mm256_set1_epi32(en[1]);
            const __m256i sg = _mm256_load_si256((const __m256i *)(ps_sgn + 8 * ((uint32_t)en[0] >> 31)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(sel, _mm256_loadu_si256((const __m256i *)st)), sg));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(sel, _mm256_loadu_si256((const __m256i *)(st + 32))), sg));
        }
        cq_qd8_out_row16(o, r, a0, a1);
    }
}
/* per step, the weight vectors the rows share: w + 128 as u8 */
#define PS_PREP                                                                                   \
    const __m256i flip = _mm256_set1_epi8((char)0x80);                                            \
    const __m256i u0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + t * STEP)), flip); \
    const __m256i u1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + t * STEP + 32)), flip);
#define PS_STEP(r)                                                                                \
    {                                                                                             \
        const __m256i xb = _mm256_set1_epi32(cq_load4(a + (r) * lda + 4 * t));                       \
        c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(u0, xb), ones));  \
        c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(u1, xb), ones));  \
    }
/* A tile whose rows have no residual entry in this block only subtracts 128 * sum x' (inline);
 * else ps_out_tile finishes the whole tile: one call per tile, the accumulators passed in ymm
 * registers (missing rows as zeros), rather than a call per row with entries, across which the
 * other rows' accumulators had to be saved (every call clobbers the ymm registers). PS_KEEP, an
 * empty asm taking the accumulators in registers after the k loop: without it GCC 12 kept memory
 * copies of some through the loop. */
#define PS_NOENT(r) && o->ps_cnt[(r) * o->ps_ld] == o->ps_cnt[(r) * o->ps_ld + 1]
#define PS_FAST(r)                                                                                \
    {                                                                                             \
        const int32_t *sr = o->ps_sum + (r) * o->ps_ld;                                           \
        const __m256i cm = _mm256_set1_epi32((int32_t)((uint32_t)(sr[1] - sr[0]) * 128u));        \
        cq_qd8_out_row16(o, r, _mm256_sub_epi32(c##r##0, cm), _mm256_sub_epi32(c##r##1, cm));     \
    }
#if defined(CQ_EMU) /* SIMDe's vectors are not register operands */
#define PS_KEEP(r)
#else
#define PS_KEEP(r) __asm__ volatile("" : "+x"(c##r##0), "+x"(c##r##1));
#endif
#define PS_ARGS1 c00, c01, z, z, z, z, z, z
#define PS_ARGS2 c00, c01, c10, c11, z, z, z, z
#define PS_ARGS3 c00, c01, c10, c11, c20, c21, z, z
#define PS_ARGS4 c00, c01, c10, c11, c20, c21, c30, c31
#define PS_OUTS(n, R)                                                                             \
    R(PS_KEEP)                                                                                    \
    if (1 R(PS_NOENT)) {                                                                          \
        R(PS_FAST)                                                                                \
    } else {                                                                                      \
        const __m256i z = _mm256_setzero_si256();                                                 \
        (void)z;                                                                                  \
        ps_out_tile(o, n, b, PS_ARGS##n);                                                         \
    }
TILES(cq_qd8_f32_qc8w_gemm_4x16c4_ps_avx2, ps, PS_PREP, PS_STEP, PS_OUTS)

/* One row of activations against 4 panels at once (M = 1): 4 concurrent sequential streams of the
 * weight, which one core reads faster than a single stream (Zen 3: ~14 GB/s against ~11, 20-30%
 * less time for a (4096, 11008) GEMV). The same sign trick (|x| per step, w takes x's sign). */
#define G_DECL(p) __m256i g##p##0 = _mm256_setzero_si256(), g##p##1 = _mm256_setzero_si256();
#define G_STEP(p)                                                                                 \
    {                                                                                             \
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(b##p + t * STEP));                \
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(b##p + t * STEP + 32));           \
        _mm_prefetch((const char *)(b##p + t * STEP + CQ_PF_DIST), _MM_HINT_T0);                  \
        g##p##0 = _mm256_add_epi32(g##p##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones)); \
        g##p##1 = _mm256_add_epi32(g##p##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones)); \
    }
#define G_OUT(p)                                                                                  \
    _mm256_storeu_si256((__m256i *)(acc + (p) * NR), g##p##0);                                    \
    _mm256_storeu_si256((__m256i *)(acc + (p) * NR + 8), g##p##1);
void cq_qd8_f32_qc8w_gemv4_1x64c4_avx2(int nr, int64_t nk4, const int8_t *a, const int8_t *const *panels,
                                       int64_t panel_stride, int32_t *acc)
{
    (void)nr; (void)panel_stride;
    const int8_t *b0 = panels[0], *b1 = panels[1], *b2 = panels[2], *b3 = panels[3];
    const __m256i ones = _mm256_set1_epi16(1);
    G_DECL(0) G_DECL(1) G_DECL(2) G_DECL(3)
    for (int64_t t = 0; t < nk4; t++) {
        const __m256i xb = _mm256_set1_epi32(cq_load4(a + 4 * t));
        const __m256i ax = _mm256_abs_epi8(xb);
        G_STEP(0) G_STEP(1) G_STEP(2) G_STEP(3)
    }
    G_OUT(0) G_OUT(1) G_OUT(2) G_OUT(3)
}
CQ_TARGET_END
#endif
