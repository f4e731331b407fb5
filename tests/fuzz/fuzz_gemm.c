/* fuzz_gemm.c - cq_gemm_s8s8s32 on a fuzzed ISA path and thread count. Any (m, n, k) up to a few
 * tiles, now and then k up to CQ_MAX_K_S32 (the largest k whose sums fit int32), codes random,
 * extreme (all +-127) or with -128. Checks: -128 is refused (CQ_ERR_RANGE); otherwise c equals an
 * int64 reference exactly. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    fz_pick_isa(&r);
    cq_set_num_threads((int)fz_range(&r, 1, 3));
    int64_t m = fz_range(&r, 1, 13), n = fz_range(&r, 1, 40), k = fz_range(&r, 1, 400);
    uint8_t kind = fz_u8(&r);
    if (kind == 0xfe) { m = 1; n = fz_range(&r, 1, 3); k = CQ_MAX_K_S32 - fz_range(&r, 0, 5); }
    int8_t *a = fz_alloc((size_t)(m * k)), *b = fz_alloc((size_t)(n * k));
    int32_t *c = fz_alloc(sizeof(int32_t) * (size_t)(m * n));
    if (kind >= 0xf0) { /* extreme codes: the sums reach their largest magnitude */
        for (int64_t i = 0; i < m * k; i++) a[i] = (kind & 1) ? 127 : ((i & 1) ? 127 : -127);
        for (int64_t i = 0; i < n * k; i++) b[i] = (kind & 2) ? -127 : 127;
    } else {
        fz_codes(&r, a, m * k, kind < 8);
        fz_codes(&r, b, n * k, kind < 8);
    }
    int has_min = 0;
    for (int64_t i = 0; i < m * k; i++) has_min |= a[i] == -128;
    for (int64_t i = 0; i < n * k; i++) has_min |= b[i] == -128;
    int st = cq_gemm_s8s8s32(a, b, m, n, k, c);
    if (has_min) {
        fz_expect(st == CQ_ERR_RANGE, "-128 gave %d", st);
    } else {
        fz_expect(st == CQ_OK, "gemm gave %d", st);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                int64_t acc = 0;
                for (int64_t t = 0; t < k; t++) acc += (int64_t)a[i * k + t] * b[j * k + t];
                fz_expect(c[i * n + j] == acc, "c[%lld,%lld] = %d, want %lld (m=%lld n=%lld k=%lld)",
                          (long long)i, (long long)j, c[i * n + j], (long long)acc, (long long)m, (long long)n, (long long)k);
            }
    }
    free(a); free(b); free(c);
    return 0;
}
