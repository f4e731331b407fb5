/* The kernel-table checks of test_kernels.c run on the AVX-512 VNNI table, whose intrinsics are
 * emulated by SIMDe (see tests/c/emu/immintrin.h): the only way to exercise that path's code on a
 * CPU without AVX-512. Plus the case the table tests cannot reach with small sizes: an int32 chunk
 * of CQ_CHUNK4 steps with extreme codes, where VNNI's shifted sums wrap modulo 2^32 and only the
 * compensation makes the result exact. */
#define main test_kernels_main
#include "test_kernels.c"
#undef main

static void test_wrapping_chunk(const cq_kernels *t)
{
    int64_t nk4 = CQ_CHUNK4, lda = 4 * nk4;
    int8_t *a = malloc(2 * lda), *b = malloc(nk4 * CQ_PANEL_STEP);
    for (int64_t i = 0; i < 2 * lda; i++) a[i] = i < lda ? 127 : -127;
    for (int64_t i = 0; i < nk4 * CQ_PANEL_STEP; i++) b[i] = (i / 4) % 16 < 8 ? 127 : -127;
    int32_t c1[2 * 16] = {0}, c2[2 * 16] = {0};
    cq_kernels_scalar.s8_tile(2, nk4, a, lda, b, c1, NULL, NULL);
    t->s8_tile(2, nk4, a, lda, b, c2, NULL, NULL);
    CHECK(memcmp(c1, c2, sizeof c1) == 0, "wrapping chunk: %d vs %d", c1[0], c2[0]);
    CHECK(c1[0] == 127 * 127 * 4 * CQ_CHUNK4 && c1[8] == -127 * 127 * 4 * CQ_CHUNK4, "reference value");
    free(a); free(b);
}

int main(void)
{
    printf("path avx512vnni, intrinsics emulated by SIMDe (logic only, not speed)\n");
    test_table(&cq_kernels_avx512);
    test_wrapping_chunk(&cq_kernels_avx512);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
