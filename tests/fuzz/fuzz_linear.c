/* fuzz_linear.c - cq_linear (and cq_linear_ex's x_mul / x_scale), both modes, every scheme, on a fuzzed ISA path, thread count and
 * packed format (AUTO, N16K4 or N64K4: every format runs on every path, the other one on a slower
 * kernel). Shapes: m in [0, 24] (now and then 64, which the AMX config takes), k in [1, 300],
 * n in [1, 40] (or up to 130); activations with NaN/Inf/subnormal/huge values; optional bias. Two
 * kinds of weight:
 *  - quantized from fuzzed finite floats (the documented use): outputs are checked against a
 *    double-precision reference of the same computation, row by row, with an error budget from
 *    float32 rounding (K-scaled) plus subnormal underflow; a row of x holding NaN/Inf must give a
 *    row of non-finite outputs, and the other rows are unaffected (they still match the reference);
 *  - raw codes and arbitrary scales (NaN, negative, ...): only memory safety and the status.
 * Every buffer has exactly its documented size. */
#include "fuzz_common.h"

#define EPS32 1.1920929e-07
#define FZ_ULP0 1.4012984643e-45 /* the smallest float32 subnormal, 2^-149 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    fz_pick_isa(&r);
    cq_set_num_threads((int)fz_range(&r, 1, 3));
    int mode = fz_u8(&r) & 1, scheme = (int)fz_range(&r, 0, 2), raw = fz_u8(&r) < 32, use_bias = fz_u8(&r) & 1;
    int format = fz_pick_format(&r);
    int64_t m = fz_range(&r, 0, 24), k = fz_range(&r, 1, 300), n = fz_range(&r, 1, 40);
    if (fz_u8(&r) == 0xa5) { m = 64; k = 64 * fz_range(&r, 1, 4); n = fz_range(&r, 1, 130); } /* AMX-sized */
    /* int4 weights (a quarter of the inputs): codes in [-7, 7], an int4 format of the same panel
     * width, groups that are multiples of 8 up to 256 */
    int bits4 = fz_u8(&r) < 64;
    if (bits4) format = format == CQ_FORMAT_AUTO ? cq_best_format_bits(n, 4)
                      : format == CQ_FORMAT_N64K4 ? CQ_FORMAT_N64K8I4 : CQ_FORMAT_N16K8I4;
    int64_t group = 0;
    if (scheme == CQ_PER_GROUP) {
        const int64_t gq = bits4 ? 8 : 4; /* group granule */
        if (k % gq) k += gq - k % gq;
        int64_t steps = k / gq, d = fz_range(&r, 1, bits4 && steps > 32 ? 32 : steps);
        while (steps % d) d--;              /* a divisor of k/gq: group = gq*d divides k */
        group = gq * d;
    }
    int64_t ns = cq_num_scales(scheme, n, k, group), psize = cq_packed_size(format, n, k, group);
    fz_expect(ns > 0 && psize > 0, "num_scales %lld packed %lld", (long long)ns, (long long)psize);
    float *w = fz_alloc(sizeof(float) * (size_t)(n * k)), *s = fz_alloc(sizeof(float) * (size_t)ns);
    float *x = fz_alloc(sizeof(float) * (size_t)(m * k)), *y = fz_alloc(sizeof(float) * (size_t)(m * n));
    float *bias = use_bias ? fz_alloc(sizeof(float) * (size_t)n) : NULL;
    int8_t *q = fz_alloc((size_t)(n * k)), *packed = fz_alloc((size_t)psize);
    if (raw) {
        fz_codes(&r, q, n * k, 0);
        if (bits4) for (int64_t i = 0; i < n * k; i++) q[i] = (int8_t)(q[i] % 8); /* [-7, 7] */
        fz_floats(&r, s, ns);
    } else {
        fz_floats(&r, w, n * k);
        for (int64_t i = 0; i < n * k; i++) if (!isfinite(w[i])) w[i] = 0.25f;
        fz_expect(cq_quantize_bits(bits4 ? 4 : 8, w, n, k, scheme, group, q, s) == CQ_OK, "quantize");
    }
    fz_expect(cq_pack(format, q, n, k, group, packed) == CQ_OK, "pack");
    fz_floats(&r, x, m * k);
    if (bias) { fz_floats(&r, bias, n); for (int64_t j = 0; j < n; j++) if (!isfinite(bias[j])) bias[j] = 1.0f; }
    for (int64_t i = 0; i < m * n; i++) y[i] = 1234.5f; /* sentinel: every output must be written */

    int st = cq_linear(mode, m ? x : NULL, m, k, packed, s, scheme, group, n, bias, m ? y : NULL);
    fz_expect(st == CQ_OK, "linear gave %d", st);
    if (raw || m == 0) goto done;

    int64_t g = scheme == CQ_PER_GROUP ? group : k, ng = k / g;
    int8_t *qx = fz_alloc((size_t)(m * k));
    float *sx = fz_alloc(sizeof(float) * (size_t)m);
    fz_expect(cq_quantize_rows(x, m, k, qx, sx) == CQ_OK, "quantize_rows");
    for (int64_t row = 0; row < m; row++) {
        const float *xr = x + row * k;
        int finite = fz_all_finite(xr, k);
        double xmax = 0;
        for (int64_t i = 0; i < k; i++) if (fabs(xr[i]) > xmax) xmax = fabs(xr[i]);
        for (int64_t j = 0; j < n; j++) {
            float got = y[row * n + j];
            if (!finite) {
                fz_expect(!isfinite(got), "row %lld has NaN/Inf but y[%lld] = %g (mode %d)", (long long)row, (long long)j, got, mode);
                continue;
            }
            double ref = bias ? bias[j] : 0.0, mag = fabs(ref), smax = 0, accmag = 0;
            for (int64_t gi = 0; gi < ng; gi++) {
                double sw = scheme == CQ_PER_TENSOR ? s[0] : s[j * ng + gi];
                if (sw > smax) smax = sw;
                if (mode == CQ_MODE_DYNAMIC) {
                    int64_t acc = 0;
                    for (int64_t i = gi * g; i < (gi + 1) * g; i++) acc += (int64_t)qx[row * k + i] * q[j * k + i];
                    double t = (double)acc * sw * sx[row];
                    ref += t; mag += fabs(t); accmag += fabs((double)acc);
                    /* per channel the kernels use the contract's acc * (sx * sw); per group they
                     * sum acc_g * sw_g first and scale by sx last, so with sw near FLT_MAX / 127
                     * and a subnormal row a product can overflow: not checked here */
                    if (fabs((double)acc * sw) > 1.0e37) mag = INFINITY;
                    /* one scale group (per channel, or a group of all of k): the epilogue is
                     * acc * (sx * sw) (internal.h), and sx * sw can overflow float32 (both near
                     * FLT_MAX / 127): Inf, or NaN for acc = 0. Not checked either */
                    if ((double)sw * (double)sx[row] > 3.0e38) mag = INFINITY;
                } else {
                    for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                        /* the dequantized weight is float32(q) * scale in float32 (the contract):
                         * for |w| within an ulp of FLT_MAX, 127 * (amax / 127) rounds up to Inf,
                         * and then 0 * Inf = NaN is the contract's answer too: not checked */
                        float dq = (float)q[j * k + i] * (float)sw;
                        double t = (double)xr[i] * (double)dq;
                        ref += t; mag += isfinite(dq) ? fabs(t) : INFINITY;
                    }
                }
            }
            if (mag > 1.0e36) continue; /* float32 partial sums may overflow: only no crash */
            /* float32 rounding of a (k + few)-term sum, relative to the magnitude of the terms ... */
            double terms = mode == CQ_MODE_DYNAMIC ? (double)ng + 4 : (double)k + 4;
            double budget = 2.0 * terms * EPS32 * mag;
            /* ... plus underflow: every float32 operation whose result is subnormal (or flushes to 0)
             * is off by up to half the smallest subnormal, FZ_ULP0 / 2, absolutely, and that error is
             * then multiplied by whatever factors the kernel applies after it. Which order a kernel
             * uses is not the oracle's business, so each product is charged with every factor that
             * may come after it:
             *  - dynamic: sx * sw_g first (the contract's order), times |acc_g|: the product can be 0
             *    in float32 where |acc_g| * sx * sw_g is not (e.g. y = 0, ref -4.0e-43); acc_g * sw_g
             *    first, times sx; acc_g * sx first, times sw_g; then one FMA/add per group and the bias;
             *  - weight-only: q * s first (the contract's dequantized weight), times |x|; x * q or
             *    x * s first (GEMV forms), times s or 127; x pre-scaled by 2^-e (huge rows), times
             *    2^e * 127 * s; then one FMA/add per term and the bias. */
            double tiny = 1.5e-45 * terms * 4 * (1.0 + smax * 127 + xmax + (mode ? sx[row] * 127.0 * 16129.0 * k : 0))
                        + 1.5e-45 * 2 * accmag; /* as before */
            if (mode == CQ_MODE_DYNAMIC) {
                tiny += FZ_ULP0 * (accmag + (double)ng * ((double)sx[row] + smax + 2.0) + 2.0);
            } else {
                double pre = 127.0 * (double)k * xmax > 0x1p100 ? 2.0 * 127.0 * (double)k * xmax * 0x1p-100 : 1.0;
                tiny += FZ_ULP0 * ((double)k * (xmax + 127.0 + smax * 127.0 * (1.0 + pre) + 2.0) + 2.0);
            }
            budget += 2.0 * tiny; /* a factor 2 of margin: the bound is an estimate, not a proof */
            fz_expect(fabs((double)got - ref) <= budget,
                      "mode %d scheme %d m=%lld k=%lld n=%lld: y[%lld,%lld] = %.9g, ref %.9g, budget %.3g",
                      mode, scheme, (long long)m, (long long)k, (long long)n, (long long)row, (long long)j, got, ref, budget);
        }
    }
    free(qx); free(sx);
done:
    /* cq_linear_ex: a fuzzed pre-scale x_mul must give exactly cq_linear on the float32 product
     * x * x_mul (a NaN/Inf in it: CQ_ERR_NONFINITE); a fuzzed static scale x_scale is taken when
     * finite > 0 (0: per-row scales), refused otherwise, and a refused call writes nothing */
    if (m > 0 && !raw) {
        float *mul = fz_alloc(sizeof(float) * (size_t)k), *xm = fz_alloc(sizeof(float) * (size_t)(m * k));
        float *y1 = fz_alloc(sizeof(float) * (size_t)(m * n)), *y2 = fz_alloc(sizeof(float) * (size_t)(m * n));
        fz_floats(&r, mul, k);
        int mul_ok = fz_all_finite(mul, k);
        for (int64_t i = 0; i < m * k; i++) xm[i] = x[i] * mul[i % k];
        for (int64_t i = 0; i < m * n; i++) y1[i] = 1234.5f;
        int st1 = cq_linear_ex(mode, x, m, k, packed, s, scheme, group, n, bias, mul, 0, 0.0f, y1);
        if (!mul_ok) {
            fz_expect(st1 == CQ_ERR_NONFINITE, "x_mul with NaN/Inf gave %d", st1);
            for (int64_t i = 0; i < m * n; i++) fz_expect(y1[i] == 1234.5f, "refused call wrote y");
        } else {
            fz_expect(st1 == CQ_OK, "linear_ex x_mul gave %d", st1);
            fz_expect(cq_linear(mode, xm, m, k, packed, s, scheme, group, n, bias, y2) == CQ_OK, "linear on x*mul");
            for (int64_t i = 0; i < m * n; i++)
                fz_expect(y1[i] == y2[i] || (isnan(y1[i]) && isnan(y2[i])),
                          "x_mul: y[%lld] = %.9g, on x * x_mul %.9g (mode %d)", (long long)i, y1[i], y2[i], mode);
        }
        float xs;
        fz_floats(&r, &xs, 1);
        int st3 = cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, scheme, group, n, bias, NULL, 0, xs, y1);
        if (xs == 0.0f || (xs > 0.0f && isfinite(xs)))
            fz_expect(st3 == CQ_OK, "x_scale %g gave %d", xs, st3);
        else
            fz_expect(st3 == CQ_ERR_ARG, "x_scale %g gave %d", xs, st3);
        fz_expect(cq_linear_ex(CQ_MODE_WEIGHT_ONLY, x, m, k, packed, s, scheme, group, n, bias, NULL, 0, 0.5f, y1)
                  == CQ_ERR_ARG, "static weight-only not refused");
        /* x_hadamard: a fuzzed block b; a power of two >= 2 dividing k must give exactly cq_linear on
         * the rotation written out here (stages h = 1, 2, ..., b / 2 of float32 a + c, a - c), any
         * other value CQ_ERR_ARG with nothing written */
        if (mul_ok) {
            int64_t b = (int64_t)1 << (fz_u8(&r) % 12);
            if (fz_u8(&r) & 1) b += fz_u8(&r) % 3; /* sometimes not a power of two */
            for (int64_t i = 0; i < m * n; i++) y1[i] = 1234.5f;
            int st4 = cq_linear_ex(mode, x, m, k, packed, s, scheme, group, n, bias, mul, b, 0.0f, y1);
            if (b >= 2 && (b & (b - 1)) == 0 && k % b == 0) {
                fz_expect(st4 == CQ_OK, "x_hadamard %lld gave %d", (long long)b, st4);
                for (int64_t h = 1; h < b; h *= 2)
                    for (int64_t row = 0; row < m; row++)
                        for (int64_t i0 = 0; i0 < k; i0 += 2 * h)
                            for (int64_t i = i0; i < i0 + h; i++) {
                                float a = xm[row * k + i], c = xm[row * k + i + h];
                                xm[row * k + i] = a + c;
                                xm[row * k + i + h] = a - c;
                            }
                fz_expect(cq_linear(mode, xm, m, k, packed, s, scheme, group, n, bias, y2) == CQ_OK, "rotated x");
                for (int64_t i = 0; i < m * n; i++)
                    fz_expect(y1[i] == y2[i] || (isnan(y1[i]) && isnan(y2[i])),
                              "x_hadamard %lld: y[%lld] = %.9g, on the rotated x %.9g (mode %d)", (long long)b,
                              (long long)i, y1[i], y2[i], mode);
            } else {
                fz_expect(st4 == CQ_ERR_ARG, "x_hadamard %lld gave %d", (long long)b, st4);
                for (int64_t i = 0; i < m * n; i++) fz_expect(y1[i] == 1234.5f, "refused call wrote y");
            }
        }
        free(mul); free(xm); free(y1); free(y2);
    }
    free(w); free(s); free(x); free(y); free(bias); free(q); free(packed);
    return 0;
}
