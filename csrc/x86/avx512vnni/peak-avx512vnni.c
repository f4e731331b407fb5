/* peak-avx512vnni.c - register-only loops that measure one core's peak rate of vpdpbusd zmm and of
 * float32 FMA zmm (for `make bench`'s "% of peak"): 24 independent accumulators, no memory. Written
 * in inline assembly: with intrinsics GCC 12 spilled the accumulators to the stack every
 * iteration, and the loop measured ~60% of the rate the 6x64 kernel reaches. */
#include "target.h"
#if CQ_CAN_TARGET_AVX512 && !defined(CQ_EMU)
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#define R24(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) \
    X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
#define ZERO(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
    "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", \
    "xmm22", "xmm23", "xmm24", "xmm25", "cc"
/* iters times: 24 independent `insn %zmm24, %zmm25, %zmmI` (all registers zeroed first) */
#define PEAK_LOOP(insn, n)                                                                        \
    __asm__ volatile(R24(ZERO) ZERO(24) ZERO(25) "1:\n\t" R24(insn) "dec %0\n\t" "jnz 1b\n\t"     \
                     : "+r"(n) : : CLOBBER)

/* returns MACs done (iters * 24 instructions * 64 u8 x s8 products) */
double cq_peak_loop_vnni(int64_t iters)
{
    int64_t n = iters;
#define DP(i) "vpdpbusd %%zmm24, %%zmm25, %%zmm" #i "\n\t"
    PEAK_LOOP(DP, n);
    return (double)iters * 24.0 * 64.0;
}
double cq_peak_loop_fma512(int64_t iters)
{
    int64_t n = iters;
#define FMA(i) "vfmadd231ps %%zmm24, %%zmm25, %%zmm" #i "\n\t"
    PEAK_LOOP(FMA, n);
    return (double)iters * 24.0 * 16.0;
}
CQ_TARGET_END
#endif
