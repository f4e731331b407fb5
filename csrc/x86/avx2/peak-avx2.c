/* peak-avx2.c - register-only loops that measure one core's peak rate of vpmaddubsw ymm (the
 * AVX2 int8 path's multiply: 32 u8 x s8 products) and of float32 FMA ymm, in inline assembly (12
 * independent accumulators, no memory; see peak-avx512vnni.c for why not intrinsics). */
#include "target.h"
#if CQ_CAN_TARGET_AVX2 && !defined(CQ_EMU)
CQ_TARGET_BEGIN("avx2,fma")
double cq_peak_loop_avx2_int8(int64_t iters)
{
    int64_t n = iters;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
        "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        "vpxor %%ymm12, %%ymm12, %%ymm12\n\t"
        "vpxor %%ymm13, %%ymm13, %%ymm13\n\t"
        "1:\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm0\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm1\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm2\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm3\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm4\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm5\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm6\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm7\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm8\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm9\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm10\n\t"
        "vpmaddubsw %%ymm12, %%ymm13, %%ymm11\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "cc");
    return (double)iters * 12.0 * 32.0;
}
double cq_peak_loop_avx2_fma(int64_t iters)
{
    int64_t n = iters;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
        "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        "vpxor %%ymm12, %%ymm12, %%ymm12\n\t"
        "vpxor %%ymm13, %%ymm13, %%ymm13\n\t"
        "1:\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm0\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm1\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm2\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm3\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm4\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm5\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm6\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm7\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm8\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm9\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm10\n\t"
        "vfmadd231ps %%ymm12, %%ymm13, %%ymm11\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "cc");
    return (double)iters * 12.0 * 8.0;
}
CQ_TARGET_END
#endif
