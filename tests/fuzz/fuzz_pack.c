/* fuzz_pack.c - cq_packed_size, cq_pack, cq_unpack, cq_packed_info. Any (n, k) up to a few
 * panels, any format (AUTO, N16K4, N64K4), any scale group (0 or a divisor of k), any codes
 * (-128 included). Checks: -128 anywhere is refused with CQ_ERR_RANGE; otherwise the size is the
 * documented one (a 64-byte-aligned header, the codes, then for N64K4 the 64-byte-aligned column
 * sums), the codes follow the documented formula
 *   codes[((p*kp4 + t)*nr + j)*4 + i] = q[nr*p + j][4t + i]  (zero padding past n and k),
 * the column sums (N64K4) are the sums of each row's codes per segment, cq_packed_info reads the
 * shape back, and unpack gives the codes back. Then the header is corrupted at fuzzed bytes: every
 * call must answer with a status (CQ_ERR_FORMAT or a valid reading), never read past the buffer:
 * whatever cq_packed_info accepts for this buffer size must unpack without touching other memory. */
#include "fuzz_common.h"
#include "internal.h" /* CQ_PACK_HEADER, the column sums' place */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    fz_pick_isa(&r); /* CQ_FORMAT_AUTO depends on the path */
    int format = fz_pick_format(&r);
    int64_t n = fz_range(&r, 1, 140), k = fz_range(&r, 1, 140);
    int64_t group = 0;
    if (fz_u8(&r) & 1) { /* a scale group: a multiple of 4 dividing k */
        if (k % 4) k += 4 - k % 4;
        int64_t steps = k / 4, d = fz_range(&r, 1, steps);
        while (steps % d) d--;
        group = 4 * d;
    }
    int allow_min = fz_u8(&r) < 40;
    int fmt = format == CQ_FORMAT_AUTO ? cq_best_format(n) : format;
    fz_expect(fmt == CQ_FORMAT_N16K4 || fmt == CQ_FORMAT_N64K4, "best format %d", fmt);
    const int64_t nr = fmt == CQ_FORMAT_N16K4 ? 16 : 64, np = (n + nr - 1) / nr, kp4 = (k + 3) / 4;
    const int64_t seg = group ? group : k, nseg = k / seg;
    int64_t codes_end = CQ_PACK_HEADER + np * kp4 * 4 * nr, sums_off = (codes_end + 63) / 64 * 64;
    int64_t want_size = fmt == CQ_FORMAT_N64K4 ? sums_off + np * nseg * nr * 4 : codes_end;
    int64_t psize = cq_packed_size(format, n, k, group);
    fz_expect(psize == want_size, "packed_size(%d, %lld, %lld, %lld) = %lld, want %lld", format, (long long)n,
              (long long)k, (long long)group, (long long)psize, (long long)want_size);
    int8_t *q = fz_alloc((size_t)(n * k)), *packed = fz_alloc((size_t)psize), *back = fz_alloc((size_t)(n * k));
    fz_codes(&r, q, n * k, allow_min);
    int has_min = 0;
    for (int64_t i = 0; i < n * k; i++) has_min |= q[i] == -128;
    int st = cq_pack(format, q, n, k, group, packed);
    if (has_min) {
        fz_expect(st == CQ_ERR_RANGE, "-128 gave %d", st);
        goto done;
    }
    fz_expect(st == CQ_OK, "pack gave %d", st);
    const int8_t *codes = packed + CQ_PACK_HEADER;
    for (int64_t p = 0; p < np; p++)
        for (int64_t t = 0; t < kp4; t++)
            for (int j = 0; j < nr; j++)
                for (int i = 0; i < 4; i++) {
                    int64_t row = nr * p + j, col = 4 * t + i;
                    int8_t want = (row < n && col < k) ? q[row * k + col] : 0;
                    fz_expect(codes[((p * kp4 + t) * nr + j) * 4 + i] == want, "layout p=%lld t=%lld j=%d i=%d",
                              (long long)p, (long long)t, j, i);
                }
    if (fmt == CQ_FORMAT_N64K4) {
        const int32_t *sums = (const int32_t *)(const void *)(packed + sums_off);
        for (int64_t p = 0; p < np; p++)
            for (int64_t s = 0; s < nseg; s++)
                for (int j = 0; j < nr; j++) {
                    int64_t row = nr * p + j, sum = 0;
                    if (row < n)
                        for (int64_t c = s * seg; c < (s + 1) * seg; c++) sum += q[row * k + c];
                    fz_expect(sums[(p * nseg + s) * nr + j] == sum, "sum p=%lld seg=%lld j=%d", (long long)p, (long long)s, j);
                }
    }
    int64_t in = -1, ik = -1, ig = -1;
    st = cq_packed_info(packed, psize, &in, &ik, &ig);
    fz_expect(st == fmt && in == n && ik == k && ig == (group == k ? 0 : group), "packed_info %d %lld %lld %lld", st,
              (long long)in, (long long)ik, (long long)ig);
    fz_expect(cq_packed_info(packed, psize + 1, NULL, NULL, NULL) == CQ_ERR_FORMAT, "packed_info, size + 1");
    fz_expect(cq_unpack(packed, n, k, back) == CQ_OK, "unpack");
    fz_expect(memcmp(q, back, (size_t)(n * k)) == 0, "round trip");
    fz_expect(cq_unpack(packed, n + 1, k, back) == CQ_ERR_FORMAT, "unpack with another n");

    /* corrupt the header: a status, and whatever is accepted for this size unpacks in bounds */
    for (int c = fz_u8(&r) % 4; c > 0; c--) {
        uint8_t at = fz_u8(&r) % CQ_PACK_HEADER, v = fz_u8(&r);
        packed[at] = (int8_t)v;
    }
    st = cq_packed_info(packed, psize, &in, &ik, &ig);
    if (st > 0) {
        fz_expect(in > 0 && ik > 0 && in * ik <= (int64_t)1 << 40, "accepted header %lld x %lld", (long long)in, (long long)ik);
        if (in * ik <= 4 * n * k + 4096) {
            int8_t *out = fz_alloc((size_t)(in * ik));
            fz_expect(cq_unpack(packed, in, ik, out) == CQ_OK, "unpack of an accepted header");
            free(out);
        }
    } else {
        fz_expect(st == CQ_ERR_FORMAT, "corrupted header gave %d", st);
    }
done:
    free(q); free(packed); free(back);
    return 0;
}
