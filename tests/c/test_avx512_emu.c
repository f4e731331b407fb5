/* test_avx512_emu.c - the micro-kernel tests of test_kernels.c on kernels whose intrinsics are
 * emulated by SIMDe (tests/c/emu/immintrin.h): the AVX2 and AVX-512 (F/BW/VNNI) kernel files are
 * compiled with -DCQ_EMU -Itests/c/emu (no target pragmas, portable intrinsics), the rest of csrc
 * normally. Every registry kernel of an emulated ISA then runs on any CPU, so the AVX-512 VNNI code
 * (u8 activations, compensation, masked tails, the int32 chunk whose u8 sums wrap modulo 2^32) is
 * checked against the scalar reference semantics even where the CPU has no AVX-512: its logic,
 * not its speed. CQ_TEST_EMU tells test_kernels.c to ignore cq_cpu_has for those kernels (AMX,
 * which SIMDe cannot emulate, still needs the CPU) and to leave out its slowest cases (the
 * 4096-step kernel cases, k past an int32 chunk through the public API, gemm at CQ_MAX_K_S32).
 * The public API runs on the paths this CPU has, on the emulated kernels. */
#define CQ_TEST_EMU 1
#define main test_kernels_main
#include "test_kernels.c"
#undef main

int main(void)
{
    printf("emulated build: AVX2 / AVX-512 kernel files compiled against SIMDe\n");
    char *argv[] = {"test_avx512_emu", NULL};
    return test_kernels_main(1, argv);
}
