/* peak-avx2.c - register-only loops that measure one core's peak rate of vpmaddubsw ymm (the
 * AVX2 int8 path's multiply: 32 u8 x s8 products) and of float32 FMA ymm, in inline assembly (12
 * independent accumulators, no memory; see peak-avx512vnni.c for why not intrinsics). */
#include "target.h"
#if CQ_CAN_TARGET_AVX2 && !defined(CQ_EMU)
CQ_TARGET_BEGIN("avx2,fma")
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define ZERO(i) "vpxor %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
    "xmm11", "xmm12", "xmm13", "cc"
/* iters times: 12 independent `insn %ymm12, %ymm13, %ymmI` (all registers zeroed first) */
#define PEAK_LOOP(insn, n)                                                                        \
    __asm__ volatile(R12(ZERO) ZERO(12) ZERO(13) "1:\n\t" R12(insn) "dec %0\n\t" "jnz 1b\n\t"     \
                     : "+r"(n) : : CLOBBER)

double cq_peak_loop_avx2_int8(int64_t iters)
{
    int64_t n = iters;
#define MADD(i) "vpmaddubsw %%ymm12, %%ymm13, %%ymm" #i "\n\t"
    PEAK_LOOP(MADD, n);
    return (double)iters * 12.0 * 32.0;
}
double cq_peak_loop_avx2_fma(int64_t iters)
{
    int64_t n = iters;
#define FMA(i) "vfmadd231ps %%ymm12, %%ymm13, %%ymm" #i "\n\t"
    PEAK_LOOP(FMA, n);
    return (double)iters * 12.0 * 8.0;
}
CQ_TARGET_END
#endif
