/* fuzz_quantize.c - cq_num_scales, cq_quantize, cq_dequantize, cq_quantize_rows.
 * Any shape / scheme / group_size / float values (NaN, Inf, subnormals, FLT_MAX) on a fuzzed ISA
 * path. Checks: an invalid argument gives the same status from cq_num_scales and cq_quantize; a
 * non-finite weight gives CQ_ERR_NONFINITE; otherwise scales and codes equal the numerics contract
 * computed here in plain C, bit for bit, and dequantize is exactly code * scale; per-row activation
 * quantization gives scale NaN and codes 0 for a non-finite row and the contract elsewhere. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    fz_pick_isa(&r);
    int scheme = (int)fz_range(&r, 0, 3);             /* 3 is invalid */
    int64_t n = fz_range(&r, 1, 24), k = fz_range(&r, 1, 300);
    int64_t group;
    switch (fz_u8(&r) % 4) {
    case 0: group = 4 * fz_range(&r, 1, 16); break;
    case 1: group = k; break;
    case 2: group = (int64_t)(int8_t)fz_u8(&r); break; /* often invalid */
    default: group = 32; break;
    }
    if (fz_u8(&r) == 0xff) { n = -n; }                 /* bad shapes now and then */

    int64_t ns = cq_num_scales(scheme, n, k, group);
    if (n <= 0) { fz_expect(ns == CQ_ERR_SHAPE, "n=%lld gave %lld", (long long)n, (long long)ns); return 0; }
    float *w = fz_alloc(sizeof(float) * (size_t)(n * k));
    int8_t *q = fz_alloc((size_t)(n * k));
    fz_floats(&r, w, n * k);
    if (ns < 0) {
        float dummy[1];
        int st = cq_quantize(w, n, k, scheme, group, q, dummy);
        fz_expect(st == (int)ns, "num_scales %lld but quantize %d", (long long)ns, st);
        free(w); free(q);
        return 0;
    }
    int64_t g = scheme == CQ_PER_GROUP ? group : k, ng = k / g;
    fz_expect(ns == (scheme == CQ_PER_TENSOR ? 1 : n * ng), "num_scales %lld", (long long)ns);
    float *s = fz_alloc(sizeof(float) * (size_t)ns), *out = fz_alloc(sizeof(float) * (size_t)(n * k));
    int st = cq_quantize(w, n, k, scheme, group, q, s);
    if (!fz_all_finite(w, n * k)) {
        fz_expect(st == CQ_ERR_NONFINITE, "non-finite weight gave %d", st);
    } else {
        fz_expect(st == CQ_OK, "quantize gave %d", st);
        for (int64_t row = 0; row < n; row++)
            for (int64_t gi = 0; gi < ng; gi++) {
                const float *src = w + row * k + gi * g;
                float want = scheme == CQ_PER_TENSOR ? fz_ref_scale(w, n * k) : fz_ref_scale(src, g);
                float got = scheme == CQ_PER_TENSOR ? s[0] : s[row * ng + gi];
                fz_expect(memcmp(&want, &got, sizeof want) == 0, "scale row %lld group %lld: %a vs %a",
                          (long long)row, (long long)gi, got, want);
                for (int64_t i = 0; i < g; i++)
                    fz_expect(q[row * k + gi * g + i] == fz_ref_code(src[i], want), "code %lld,%lld: %d vs %d (w=%a s=%a)",
                              (long long)row, (long long)(gi * g + i), q[row * k + gi * g + i],
                              fz_ref_code(src[i], want), src[i], want);
            }
        fz_expect(cq_dequantize(q, s, n, k, scheme, group, out) == CQ_OK, "dequantize");
        for (int64_t row = 0; row < n; row++)
            for (int64_t i = 0; i < k; i++) {
                float sc = scheme == CQ_PER_TENSOR ? s[0] : s[row * ng + i / g];
                float want = (float)q[row * k + i] * sc;
                fz_expect(memcmp(&want, &out[row * k + i], sizeof want) == 0, "dequantize %lld,%lld", (long long)row, (long long)i);
            }
    }
    /* the same data as n rows of activations */
    float *sx = fz_alloc(sizeof(float) * (size_t)n);
    fz_expect(cq_quantize_rows(w, n, k, q, sx) == CQ_OK, "quantize_rows");
    for (int64_t row = 0; row < n; row++) {
        const float *src = w + row * k;
        if (!fz_all_finite(src, k)) {
            fz_expect(isnan(sx[row]), "non-finite row %lld: scale %g, want NaN", (long long)row, sx[row]);
            for (int64_t i = 0; i < k; i++) fz_expect(q[row * k + i] == 0, "non-finite row: codes 0");
            continue;
        }
        float want = fz_ref_scale(src, k);
        fz_expect(memcmp(&want, &sx[row], sizeof want) == 0, "row scale %lld", (long long)row);
        for (int64_t i = 0; i < k; i++)
            fz_expect(q[row * k + i] == fz_ref_code(src[i], want), "row code %lld,%lld", (long long)row, (long long)i);
    }
    free(w); free(q); free(s); free(out); free(sx);
    return 0;
}
