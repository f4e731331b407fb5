/* Test shim, used only by `make ctest-avx512-emu`: replaces <immintrin.h> so that
 * csrc/cq_kernels_avx512.c (with its target pragmas stripped) compiles against SIMDe's portable
 * implementations of the AVX-512 intrinsics (Debian: libsimde-dev). This checks the AVX-512 VNNI
 * kernels' logic on machines without AVX-512; it says nothing about their speed. */
#ifndef CQ_EMU_IMMINTRIN_H
#define CQ_EMU_IMMINTRIN_H
#define SIMDE_ENABLE_NATIVE_ALIASES
#define SIMDE_NO_NATIVE
#include <simde/x86/avx512.h>
#ifndef _mm512_cvtepi32_ps
static inline simde__m512 cq_emu_cvtepi32_ps(simde__m512i a)
{
    int32_t i[16];
    float f[16];
    simde_mm512_storeu_si512((void *)i, a);
    for (int k = 0; k < 16; k++) f[k] = (float)i[k];
    return simde_mm512_loadu_ps(f);
}
#define _mm512_cvtepi32_ps cq_emu_cvtepi32_ps
#endif
#endif
