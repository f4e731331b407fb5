/* Test shim, used only by the emulated kernel test (build/emu/test_avx512_emu, tests/c/
 * test_avx512_emu.c): replaces <immintrin.h> for the micro-kernel files of csrc/x86/avx2/,
 * csrc/x86/avx512/ and csrc/x86/avx512vnni/ compiled with -DCQ_EMU -Itests/c/emu (target.h then
 * drops the target pragmas), so their intrinsics come from SIMDe's portable implementations
 * (Debian: libsimde-dev). This checks the kernels' logic on any x86-64 (or other) CPU; it says
 * nothing about their speed. The peak-*.c timing loops are not emulated: their inline asm pins
 * vectors in ymm/zmm registers, which SIMDe's types cannot satisfy (compile them normally).
 *
 * SIMDe 0.7.4 (Debian 12) lacks a few intrinsics and type aliases the kernels use; they are
 * provided below, each only where SIMDe does not define it (newer SIMDe releases have more), and
 * written as plain loops over the lanes, the definition in Intel's guide. */
#ifndef CQ_EMU_IMMINTRIN_H
#define CQ_EMU_IMMINTRIN_H
#define SIMDE_ENABLE_NATIVE_ALIASES
#define SIMDE_NO_NATIVE
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <simde/x86/avx512.h>

/* ---- constants and mask types ---- */
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _MM_HINT_T0
#define _MM_HINT_T0 SIMDE_MM_HINT_T0
#endif
/* macros rather than typedefs: harmless where SIMDe already aliases them */
#define __mmask8 simde__mmask8
#define __mmask16 simde__mmask16
#define __mmask32 simde__mmask32
#define __mmask64 simde__mmask64

/* SIMDe 0.7.4 defines the alias _mm512_madd_epi16 with four parameters (its masked form's); the
 * intrinsic takes two */
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)

/* ---- lane access helpers ---- */
typedef union {
    simde__m512i v;
    int32_t i32[16];
    int8_t i8[64];
} cq_emu_512i;
typedef union {
    simde__m512 v;
    float f32[16];
} cq_emu_512;


/* ---- rounding ----
 * SIMDe 0.7.4 rounds _MM_FROUND_TO_NEAREST_INT half away from zero (roundf) in _mm_round_ps /
 * _mm256_round_ps (and so in _mm512_roundscale_ps, built on them); the instructions round half to
 * even. Replaced by lane loops with Intel's rounding controls: imm & 3 = nearest even, down, up,
 * toward zero; imm & 4 = the current direction (MXCSR; here the C rounding mode). */
static inline float cq_emu_round1(float v, int imm)
{
    if (imm & 4) return nearbyintf(v);
    switch (imm & 3) {
    case 0: {
        if (!(fabsf(v) < 8388608.0f)) return v; /* NaN, Inf, or already an integer */
        float t = truncf(v);
        if (fabsf(v - t) == 0.5f) return 2.0f * roundf(v * 0.5f); /* a tie: the even neighbour */
        return roundf(v);
    }
    case 1: return floorf(v);
    case 2: return ceilf(v);
    default: return truncf(v);
    }
}
typedef union {
    simde__m128 v;
    float f32[4];
} cq_emu_128;
typedef union {
    simde__m256 v;
    float f32[8];
} cq_emu_256;
static inline simde__m128 cq_emu_mm_round_ps(simde__m128 a, int imm)
{
    cq_emu_128 x;
    x.v = a;
    for (int i = 0; i < 4; i++) x.f32[i] = cq_emu_round1(x.f32[i], imm);
    return x.v;
}
static inline simde__m256 cq_emu_mm256_round_ps(simde__m256 a, int imm)
{
    cq_emu_256 x;
    x.v = a;
    for (int i = 0; i < 8; i++) x.f32[i] = cq_emu_round1(x.f32[i], imm);
    return x.v;
}
/* ---- AVX masked loads: SIMDe 0.7.4 reads all 8 lanes and masks afterwards; vmaskmovps does not
 * touch masked-out lanes (the kernels rely on it past the end of a row, and AddressSanitizer
 * sees the difference). Lane i is loaded where bit 31 of mask lane i is set. ---- */
typedef union {
    simde__m256i v;
    int32_t i32[8];
} cq_emu_256i;
static inline simde__m256 cq_emu_mm256_maskload_ps(const float *p, simde__m256i mask)
{
    cq_emu_256i m;
    cq_emu_256 r;
    m.v = mask;
    for (int i = 0; i < 8; i++) r.f32[i] = m.i32[i] < 0 ? p[i] : 0.0f;
    return r.v;
}
#undef _mm256_maskload_ps
#define _mm256_maskload_ps(p, mask) cq_emu_mm256_maskload_ps((const float *)(p), (mask))
/* vrndscaleps: round to imm >> 4 fraction bits (2^-M steps) */
static inline simde__m512 cq_emu_mm512_roundscale_ps(simde__m512 a, int imm)
{
    cq_emu_512 x;
    const int m = (imm >> 4) & 15;
    x.v = a;
    for (int i = 0; i < 16; i++) {
        float v = x.f32[i];
        if (v != v || isinf(v)) continue;
        x.f32[i] = ldexpf(cq_emu_round1(ldexpf(v, m), imm), -m);
    }
    return x.v;
}
#undef _mm_round_ps
#define _mm_round_ps(a, imm) cq_emu_mm_round_ps((a), (int)(imm))
#undef _mm256_round_ps
#define _mm256_round_ps(a, imm) cq_emu_mm256_round_ps((a), (int)(imm))
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) cq_emu_mm512_roundscale_ps((a), (int)(imm))


/* ---- AVX-VNNI: the VEX-encoded vpdpbusd computes what AVX512_VNNI + VL's 256-bit form does ---- */
#ifndef _mm256_dpbusd_avx_epi32
#define _mm256_dpbusd_avx_epi32(src, a, b) simde_mm256_dpbusd_epi32((src), (a), (b))
#endif
#ifndef _mm_dpbusd_avx_epi32
#define _mm_dpbusd_avx_epi32(src, a, b) simde_mm_dpbusd_epi32((src), (a), (b))
#endif

/* ---- AVX-512F ---- */
static inline simde__m512 cq_emu_mm512_cvtepi32_ps(simde__m512i a)
{
    cq_emu_512i x;
    cq_emu_512 r;
    x.v = a;
    for (int i = 0; i < 16; i++) r.f32[i] = (float)x.i32[i];
    return r.v;
}
#ifndef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) cq_emu_mm512_cvtepi32_ps(a)
#endif

/* arithmetic shift right of 32-bit lanes; counts above 31 fill with the sign (Intel's rule) */
static inline simde__m512i cq_emu_mm512_srai_epi32(simde__m512i a, unsigned imm)
{
    cq_emu_512i x;
    x.v = a;
    unsigned s = imm > 31 ? 31 : imm;
    for (int i = 0; i < 16; i++) {
        int32_t v = x.i32[i];
        /* portable arithmetic shift of a negative value */
        x.i32[i] = v < 0 ? (int32_t)~(~(uint32_t)v >> s) : (int32_t)((uint32_t)v >> s);
    }
    return x.v;
}
#ifndef _mm512_srai_epi32
#define _mm512_srai_epi32(a, imm) cq_emu_mm512_srai_epi32((a), (unsigned)(imm))
#endif

/* masked loads / stores of floats: lanes whose mask bit is 0 are neither read nor written (the
 * kernels rely on it at the end of a row: those lanes may lie past the end of the buffer) */
static inline simde__m512 cq_emu_mm512_maskz_loadu_ps(simde__mmask16 k, const void *p)
{
    cq_emu_512 r;
    const float *f = (const float *)p;
    for (int i = 0; i < 16; i++) r.f32[i] = ((k >> i) & 1) ? f[i] : 0.0f;
    return r.v;
}
#ifndef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) cq_emu_mm512_maskz_loadu_ps((simde__mmask16)(k), (p))
#endif
static inline void cq_emu_mm512_mask_storeu_ps(void *p, simde__mmask16 k, simde__m512 a)
{
    cq_emu_512 x;
    float *f = (float *)p;
    x.v = a;
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) f[i] = x.f32[i];
}
#ifndef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) cq_emu_mm512_mask_storeu_ps((p), (simde__mmask16)(k), (a))
#endif

/* horizontal reductions in the order GCC's and clang's headers use (upper 256 op lower 256, then
 * upper 128 op lower 128, then lanes {2,3,0,1}, then {1,0,3,2}), so float results round alike */
static inline float cq_emu_max1(float a, float b) { return a > b ? a : b; } /* vmaxps: NaN -> b */
static inline float cq_emu_add1(float a, float b) { return a + b; }
static inline float cq_emu_reduce_ps(simde__m512 a, float (*op)(float, float))
{
    cq_emu_512 x;
    float t3[8], t6[4], t8[4];
    x.v = a;
    for (int i = 0; i < 8; i++) t3[i] = op(x.f32[8 + i], x.f32[i]);
    for (int i = 0; i < 4; i++) t6[i] = op(t3[4 + i], t3[i]);
    for (int i = 0; i < 4; i++) t8[i] = op(t6[i], t6[i ^ 2]);
    return op(t8[0], t8[1]);
}
static inline int32_t cq_emu_mm512_reduce_add_epi32(simde__m512i a)
{
    cq_emu_512i x;
    uint32_t s = 0;
    x.v = a;
    for (int i = 0; i < 16; i++) s += (uint32_t)x.i32[i];
    return (int32_t)s;
}
#ifndef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32(a) cq_emu_mm512_reduce_add_epi32(a)
#endif
#ifndef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) cq_emu_reduce_ps((a), cq_emu_add1)
#endif
#ifndef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps(a) cq_emu_reduce_ps((a), cq_emu_max1)
#endif

/* truncating conversion; NaN and values out of int32 range give 0x80000000 (integer indefinite) */
static inline simde__m512i cq_emu_mm512_cvttps_epi32(simde__m512 a)
{
    cq_emu_512 x;
    cq_emu_512i r;
    x.v = a;
    for (int i = 0; i < 16; i++) {
        float v = x.f32[i];
        r.i32[i] = (v == v && v > -2147483904.0f && v < 2147483648.0f) ? (int32_t)v : INT32_MIN;
    }
    return r.v;
}
#ifndef _mm512_cvttps_epi32
#define _mm512_cvttps_epi32(a) cq_emu_mm512_cvttps_epi32(a)
#endif

/* float -> double widening of 8 lanes, and the double sum in GCC's / clang's order */
typedef union {
    simde__m512d v;
    double f64[8];
} cq_emu_512d;
static inline simde__m512d cq_emu_mm512_cvtps_pd(simde__m256 a)
{
    cq_emu_256 x;
    cq_emu_512d r;
    x.v = a;
    for (int i = 0; i < 8; i++) r.f64[i] = (double)x.f32[i];
    return r.v;
}
#ifndef _mm512_cvtps_pd
#define _mm512_cvtps_pd(a) cq_emu_mm512_cvtps_pd(a)
#endif
static inline double cq_emu_mm512_reduce_add_pd(simde__m512d a)
{
    cq_emu_512d x;
    double t3[4], t6[2];
    x.v = a;
    for (int i = 0; i < 4; i++) t3[i] = x.f64[4 + i] + x.f64[i];
    for (int i = 0; i < 2; i++) t6[i] = t3[2 + i] + t3[i];
    return t6[0] + t6[1];
}
#ifndef _mm512_reduce_add_pd
#define _mm512_reduce_add_pd(a) cq_emu_mm512_reduce_add_pd(a)
#endif

/* dst 128-bit lanes: a[imm & 3], a[(imm >> 2) & 3], b[(imm >> 4) & 3], b[(imm >> 6) & 3] */
static inline simde__m512 cq_emu_mm512_shuffle_f32x4(simde__m512 a, simde__m512 b, int imm)
{
    cq_emu_512 x, y, r;
    x.v = a;
    y.v = b;
    for (int l = 0; l < 4; l++) {
        const float *src = (l < 2 ? x.f32 : y.f32) + 4 * ((imm >> (2 * l)) & 3);
        memcpy(r.f32 + 4 * l, src, 16);
    }
    return r.v;
}
#ifndef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) cq_emu_mm512_shuffle_f32x4((a), (b), (int)(imm))
#endif

/* ---- fused multiply-add ----
 * SIMDe 0.7.4's portable _mm256_fmadd_ps / _mm512_fmadd_ps round twice (a * b, then + c); the
 * instructions round once. Kernels whose epilogue is bit-identical to a reference's fmaf (the x24
 * GEMV) need the single rounding: lane loops over fmaf. */
#define CQ_EMU_FMADD(bits, lanes)                                                              \
    typedef union {                                                                            \
        simde__m##bits v;                                                                      \
        float f32[lanes];                                                                      \
    } cq_emu_fma##bits;                                                                        \
    static inline simde__m##bits cq_emu_fmadd##bits(simde__m##bits a, simde__m##bits b, simde__m##bits c) \
    {                                                                                          \
        cq_emu_fma##bits x, y, z;                                                              \
        x.v = a; y.v = b; z.v = c;                                                             \
        for (int i = 0; i < (lanes); i++) z.f32[i] = fmaf(x.f32[i], y.f32[i], z.f32[i]);       \
        return z.v;                                                                            \
    }
CQ_EMU_FMADD(512, 16)
CQ_EMU_FMADD(256, 8)
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps(a, b, c) cq_emu_fmadd512(a, b, c)
#undef _mm256_fmadd_ps
#define _mm256_fmadd_ps(a, b, c) cq_emu_fmadd256(a, b, c)

#endif
