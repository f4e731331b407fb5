/* target.h - per-file ISA targets for the micro-kernel files (x86/ISA/...c).
 *
 * Each such file wraps its code in CQ_TARGET_BEGIN("isa,list") ... CQ_TARGET_END, guarded by
 * #if CQ_CAN_TARGET_<ISA>: the whole build is compiled without -m flags (it must run on any
 * x86-64), and dispatch calls a kernel only where CPUID and XCR0 say its instructions run.
 * A compiler too old for an ISA (GCC < 5 for AVX2, < 8 for AVX-512 VNNI, < 11 for AVX-VNNI and AMX) leaves the
 * file empty and registry.c leaves its kernels out.
 * CQ_EMU (make ctest-avx512-emu): the intrinsics come from SIMDe's portable implementations
 * (tests/c/emu/immintrin.h), so the target pragmas are dropped and every file is compiled. */
#ifndef CQ_TARGET_H
#define CQ_TARGET_H
#include "internal.h"

#define CQ_PRAGMA(x) _Pragma(#x)
#if defined(CQ_EMU)
#define CQ_CAN_TARGET_AVX2 1
#define CQ_CAN_TARGET_AVX512 1
#define CQ_CAN_TARGET_AMX 0 /* SIMDe has no AMX */
#define CQ_CAN_TARGET_AVXVNNI 1
#define CQ_TARGET_BEGIN(t)
#define CQ_TARGET_END
#elif defined(CQ_X86) && (defined(__GNUC__) || defined(__clang__))
#if defined(CQ_SIM_GNUC) /* make ctest-noisa: pretend the compiler is GCC CQ_SIM_GNUC */
#define CQ_GNUC CQ_SIM_GNUC
#define CQ_CLANG 0
#elif defined(__clang__)
#define CQ_GNUC 99
#define CQ_CLANG 1
#else
#define CQ_GNUC __GNUC__
#define CQ_CLANG 0
#endif
#if CQ_CLANG || CQ_GNUC >= 5
#define CQ_CAN_TARGET_AVX2 1
#else
#define CQ_CAN_TARGET_AVX2 0
#endif
#if CQ_CLANG || CQ_GNUC >= 8
#define CQ_CAN_TARGET_AVX512 1
#else
#define CQ_CAN_TARGET_AVX512 0
#endif
#if (CQ_CLANG && defined(__clang_major__) && __clang_major__ >= 12) || (!CQ_CLANG && CQ_GNUC >= 11)
#define CQ_CAN_TARGET_AMX 1
#define CQ_CAN_TARGET_AVXVNNI 1
#else
#define CQ_CAN_TARGET_AMX 0
#define CQ_CAN_TARGET_AVXVNNI 0
#endif
#if defined(__clang__)
#define CQ_TARGET_BEGIN(t) CQ_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define CQ_TARGET_END CQ_PRAGMA(clang attribute pop)
#else
#define CQ_TARGET_BEGIN(t) CQ_PRAGMA(GCC push_options) CQ_PRAGMA(GCC target(t))
#define CQ_TARGET_END CQ_PRAGMA(GCC pop_options)
#endif
#else
#define CQ_CAN_TARGET_AVX2 0
#define CQ_CAN_TARGET_AVX512 0
#define CQ_CAN_TARGET_AMX 0
#define CQ_CAN_TARGET_AVXVNNI 0
#endif

#define CQ_INLINE static inline __attribute__((always_inline))
/* Software prefetch distance along a panel (bytes): at small M the weights stream from DRAM once
 * per call, and the hardware prefetcher alone reached about half the bandwidth (Zen 3). */
#ifndef CQ_PF_DIST
#define CQ_PF_DIST 4096
#endif
#endif
