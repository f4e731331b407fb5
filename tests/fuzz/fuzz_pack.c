/* fuzz_pack.c - cq_packed_size, cq_pack, cq_unpack. Any (n, k) up to a few panels, any codes
 * (-128 included). Checks: -128 anywhere is refused with CQ_ERR_RANGE; otherwise the packed bytes
 * follow the documented formula packed[((p*kp4 + t)*16 + j)*4 + i] = q[16p + j][4t + i] with zero
 * padding, and unpack gives the codes back. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    int64_t n = fz_range(&r, 1, 70), k = fz_range(&r, 1, 140);
    int allow_min = fz_u8(&r) < 40;
    int64_t psize = cq_packed_size(n, k), np = (n + 15) / 16, kp4 = (k + 3) / 4;
    fz_expect(psize == np * kp4 * 64, "packed_size(%lld, %lld) = %lld", (long long)n, (long long)k, (long long)psize);
    int8_t *q = fz_alloc((size_t)(n * k)), *packed = fz_alloc((size_t)psize), *back = fz_alloc((size_t)(n * k));
    fz_codes(&r, q, n * k, allow_min);
    int has_min = 0;
    for (int64_t i = 0; i < n * k; i++) has_min |= q[i] == -128;
    int st = cq_pack(q, n, k, packed);
    if (has_min) {
        fz_expect(st == CQ_ERR_RANGE, "-128 gave %d", st);
    } else {
        fz_expect(st == CQ_OK, "pack gave %d", st);
        for (int64_t p = 0; p < np; p++)
            for (int64_t t = 0; t < kp4; t++)
                for (int j = 0; j < 16; j++)
                    for (int i = 0; i < 4; i++) {
                        int64_t row = 16 * p + j, col = 4 * t + i;
                        int8_t want = (row < n && col < k) ? q[row * k + col] : 0;
                        fz_expect(packed[((p * kp4 + t) * 16 + j) * 4 + i] == want, "layout p=%lld t=%lld j=%d i=%d",
                                  (long long)p, (long long)t, j, i);
                    }
        fz_expect(cq_unpack(packed, n, k, back) == CQ_OK, "unpack");
        fz_expect(memcmp(q, back, (size_t)(n * k)) == 0, "round trip");
    }
    free(q); free(packed); free(back);
    return 0;
}
