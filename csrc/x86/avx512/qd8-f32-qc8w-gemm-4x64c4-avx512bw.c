/* qd8-f32-qc8w-gemm-4x64c4-avx512bw.c - dynamic int8 micro-kernel for AVX-512BW without VNNI
 * (Skylake-SP), format N64K4: a 4x64 tile (16 zmm accumulators). The AVX2 recipe on zmm: |w| is the
 * u8 operand of vpmaddubsw and x takes w's sign (AVX-512 has no vpsignb: a masked byte negate with
 * the mask of w's sign bits), so a pair sum is at most 2 * 127 * 127 = 32258 and never saturates;
 * vpmaddwd with ones widens to int32. Activations are s8: no compensation. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <string.h>

#define NR 64
#define STEP (NR * 4)
#include "../qd8-out-512.h"

#define DECL(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define MAC(r, v) c##r##v = _mm512_add_epi32(c##r##v, _mm512_madd_epi16(_mm512_maddubs_epi16(ab##v, \
    _mm512_mask_sub_epi8(xb, n##v, zero, xb)), ones));
#define STEPR(r) { const __m512i xb = _mm512_set1_epi32(cq_load4(a + (r) * lda + 4 * t)); \
    MAC(r, 0) MAC(r, 1) MAC(r, 2) MAC(r, 3) }
#define OUT(r)                                                                                    \
    cq_qd8_out_vec64(o, r, 0, c##r##0, o->acc_in); cq_qd8_out_vec64(o, r, 1, c##r##1, o->acc_in);   \
    cq_qd8_out_vec64(o, r, 2, c##r##2, o->acc_in); cq_qd8_out_vec64(o, r, 3, c##r##3, o->acc_in);
/* per step, the weight vectors the rows share: b, |b| and b's sign mask per 64 columns (macro
 * arguments below: no comma outside parentheses) */
#define LOADB(v) const __m512i b##v = _mm512_loadu_si512((const void *)(b + t * STEP + 64 * (v))); \
    const __m512i ab##v = _mm512_abs_epi8(b##v); const __mmask64 n##v = _mm512_movepi8_mask(b##v);
#define S8_PREP const __m512i zero = _mm512_setzero_si512(); LOADB(0) LOADB(1) LOADB(2) LOADB(3)
/* A tile of a family: PREP (the step's shared weight vectors), then STEP(r) per row; per step, as
 * the VNNI 6x64 tile does, the panel's lines CQ_PF_DIST ahead into L1 and a line of the driver's
 * next panel into L2 (measured natively on a Sapphire Rapids-class Xeon, CQUANT_ISA=avx512: README,
 * "AVX-512 without VNNI"). */
#define TILE(NAME, PREP, DECLS, STEPS, OUTS)                                                      \
    static void NAME(int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        const __m512i ones = _mm512_set1_epi16(1);                                                \
        int64_t pf_step;                                                                          \
        const char *pf = cq_qd8_pf_stream(o, b, STEP, &pf_step);                                  \
        DECLS                                                                                     \
        for (int64_t t = 0; t < nk4; t++) {                                                       \
            _mm_prefetch(pf + t * pf_step, _MM_HINT_T1);                                          \
            PREP                                                                                  \
            CQ_PF_STEP64(b + t * STEP)                                                            \
            STEPS                                                                                 \
        }                                                                                         \
        OUTS                                                                                      \
    }
/* The 1- to 4-row tiles of a family and the micro-kernel that picks one by mr. */
#define TILES(FN, P, PREP, STEP_, OUT_)                                                           \
    TILE(P##_1x64, PREP, DECL(0), STEP_(0), OUT_(0))                                              \
    TILE(P##_2x64, PREP, DECL(0) DECL(1), STEP_(0) STEP_(1), OUT_(0) OUT_(1))                     \
    TILE(P##_3x64, PREP, DECL(0) DECL(1) DECL(2), STEP_(0) STEP_(1) STEP_(2), OUT_(0) OUT_(1) OUT_(2)) \
    TILE(P##_4x64, PREP, DECL(0) DECL(1) DECL(2) DECL(3), STEP_(0) STEP_(1) STEP_(2) STEP_(3),    \
         OUT_(0) OUT_(1) OUT_(2) OUT_(3))                                                         \
    void FN(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b, const cq_qd8_out *o) \
    {                                                                                             \
        (void)nr;                                                                                 \
        switch (mr) {                                                                             \
        case 1: P##_1x64(nk4, a, lda, b, o); break;                                               \
        case 2: P##_2x64(nk4, a, lda, b, o); break;                                               \
        case 3: P##_3x64(nk4, a, lda, b, o); break;                                               \
        default: P##_4x64(nk4, a, lda, b, o); break;                                              \
        }                                                                                         \
    }
TILES(cq_qd8_f32_qc8w_gemm_4x64c4_avx512bw, gemm, S8_PREP, STEPR, OUT)

/* The pair-safe 4x64 tile (the AVX2 pair-safe tile on zmm: x86/avx2/qd8-f32-qc8w-gemm-4x16c4-avx2.c
 * explains): u8 w + 128 (an XOR per step, shared by the rows) times the s8 activations left by
 * the pair-safe preparation (quantize.c, cq_ps_prepare_row), whose pairs cannot saturate
 * vpmaddubsw; 3 instructions per 64 MACs against the sign tile's 4 (its masked negate). Then 128 * sum x' over the k block is subtracted and v * w[k]
 * added for each residual entry of the block. llvm-mca skylake-avx512 / cascadelake and the
 * measurements (CQUANT_ISA=avx512 on a Sapphire Rapids-class Xeon): see README. */
static __attribute__((noinline)) void ps_fix_row64(const cq_qd8_out *o, int r, const int8_t *b, __m512i *c)
{
    const int32_t *s = o->ps_sum + r * o->ps_ld, *n = o->ps_cnt + r * o->ps_ld;
    const __m512i comp = _mm512_set1_epi32((int32_t)((uint32_t)(s[1] - s[0]) * 128u));
    __m512i a0 = _mm512_sub_epi32(c[0], comp), a1 = _mm512_sub_epi32(c[1], comp);
    __m512i a2 = _mm512_sub_epi32(c[2], comp), a3 = _mm512_sub_epi32(c[3], comp);
    const int64_t k0 = o->ps_k0;
    const int32_t *en = o->ps_ent + CQ_PS_ENT * (o->ps_row[r] + n[0]), *en1 = o->ps_ent + CQ_PS_ENT * (o->ps_row[r] + n[1]);
    for (; en < en1; en += CQ_PS_ENT) {
        const int8_t *st = b + ((cq_ps_ent_k(en) - k0) >> 2) * STEP; /* code k of column j: byte k % 4 of int32 j */
        /* vpmaddubsw by sel (|v| in byte k % 4) gives |v| * w[k] per int32, vpmaddwd by the int16
         * pairs of v's sign the signed sum (the AVX2 tile's ps_out_tile explains) */
        const __m512i sel = _mm512_set1_epi32(en[1]), sg = _mm512_set1_epi32(en[0] < 0 ? -1 : 0x00010001);
#define PS_W(q) _mm512_madd_epi16(_mm512_maddubs_epi16(sel, _mm512_loadu_si512((const void *)(st + 64 * (q)))), sg)
        a0 = _mm512_add_epi32(a0, PS_W(0));
        a1 = _mm512_add_epi32(a1, PS_W(1));
        a2 = _mm512_add_epi32(a2, PS_W(2));
        a3 = _mm512_add_epi32(a3, PS_W(3));
#undef PS_W
    }
    c[0] = a0; c[1] = a1; c[2] = a2; c[3] = a3;
}
#define PS_MAC(r, v) c##r##v = _mm512_add_epi32(c##r##v, _mm512_madd_epi16(_mm512_maddubs_epi16(u##v, xb), ones));
#define PS_STEPR(r) { const __m512i xb = _mm512_set1_epi32(cq_load4(a + (r) * lda + 4 * t)); \
    PS_MAC(r, 0) PS_MAC(r, 1) PS_MAC(r, 2) PS_MAC(r, 3) }
/* (copies: taking the accumulators' addresses could keep them on the stack through the loop) */
#define PS_OUT(r)                                                                                 \
    {                                                                                             \
        __m512i f[4] = {c##r##0, c##r##1, c##r##2, c##r##3};                                      \
        ps_fix_row64(o, r, b, f);                                                                 \
        cq_qd8_out_vec64(o, r, 0, f[0], o->acc_in); cq_qd8_out_vec64(o, r, 1, f[1], o->acc_in);   \
        cq_qd8_out_vec64(o, r, 2, f[2], o->acc_in); cq_qd8_out_vec64(o, r, 3, f[3], o->acc_in);   \
    }
#define PS_LOADB(v) const __m512i u##v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(b + t * STEP + 64 * (v))), flip);
#define PS_PREP const __m512i flip = _mm512_set1_epi8((char)0x80); PS_LOADB(0) PS_LOADB(1) PS_LOADB(2) PS_LOADB(3)
TILES(cq_qd8_f32_qc8w_gemm_4x64c4_ps_avx512bw, ps, PS_PREP, PS_STEPR, PS_OUT)
CQ_TARGET_END
#endif
