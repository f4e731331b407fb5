/* C tests of the core: every ISA path this CPU has against the scalar reference (integers and
 * codes exactly, floats within a K-scaled budget), the public API against plain-C references, and
 * bad arguments (a status, never a crash). Prints the path that ran; exits non-zero on failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cq_internal.h"

static int failures = 0, checks = 0;
#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            failures++;                                                              \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                    \
            fprintf(stderr, __VA_ARGS__);                                            \
            fprintf(stderr, "\n");                                                   \
        }                                                                            \
    } while (0)

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) { rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17; return rng_state; }
static float rndf(void) { return (float)((double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }
static int8_t rnd_code(int extreme) { return extreme ? (rnd() & 1 ? 127 : -127) : (int8_t)((int)(rnd() % 255) - 127); }

static const int SIZES[] = {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 257};
#define NSIZES ((int)(sizeof SIZES / sizeof SIZES[0]))

static void test_table(const cq_kernels *t)
{
    const cq_kernels *ref = &cq_kernels_scalar;
    /* absmax / quantize: bit-exact */
    for (int si = 0; si < NSIZES; si++) {
        int n = SIZES[si] * 3;
        float *x = malloc(sizeof(float) * n);
        int8_t *q1 = malloc(n), *q2 = malloc(n);
        for (int i = 0; i < n; i++) x[i] = rndf() * 10.0f;
        if (n > 4) { x[1] = 2.5f; x[2] = -0.5f; x[3] = 1.5f; } /* ties: half to even */
        float a1, a2;
        int f1 = ref->absmax(x, n, &a1), f2 = t->absmax(x, n, &a2);
        CHECK(f1 == 1 && f2 == 1 && a1 == a2, "absmax n=%d %g %g", n, a1, a2);
        float s = a1 / 127.0f;
        memset(q2, 0x55, n);
        ref->quantize(x, n, s, q1);
        t->quantize(x, n, s, q2);
        CHECK(memcmp(q1, q2, n) == 0, "quantize n=%d", n);
        ref->quantize(x, n, 1.0f, q1); /* codes that clamp */
        t->quantize(x, n, 1.0f, q2);
        CHECK(memcmp(q1, q2, n) == 0, "quantize clamp n=%d", n);
        x[n / 2] = NAN;
        CHECK(t->absmax(x, n, &a2) == 0, "absmax NaN n=%d", n);
        x[n / 2] = -INFINITY;
        CHECK(t->absmax(x, n, &a2) == 0, "absmax Inf n=%d", n);
        free(x); free(q1); free(q2);
    }
    /* int8 tile: exact, every mr, random and extreme codes */
    for (int si = 0; si < NSIZES; si++)
        for (int mr = 1; mr <= CQ_MR_S8; mr++)
            for (int ex = 0; ex < 2; ex++) {
                int64_t nk4 = SIZES[si], lda = 4 * nk4 + 4;
                int8_t *a = malloc(mr * lda), *b = malloc(nk4 * CQ_PANEL_STEP);
                for (int64_t i = 0; i < mr * lda; i++) a[i] = rnd_code(ex);
                for (int64_t i = 0; i < nk4 * CQ_PANEL_STEP; i++) b[i] = rnd_code(ex);
                int32_t c1[CQ_MR_S8 * 16], c2[CQ_MR_S8 * 16 + 8];
                for (int i = 0; i < CQ_MR_S8 * 16 + 8; i++) c2[i] = 0x7eadbeef;
                for (int i = 0; i < mr * 16; i++) c1[i] = c2[i] = i * 1000 - 7; /* it accumulates */
                ref->s8_tile(mr, nk4, a, lda, b, c1, NULL, NULL);
                t->s8_tile(mr, nk4, a, lda, b, c2, NULL, NULL);
                CHECK(memcmp(c1, c2, sizeof(int32_t) * mr * 16) == 0, "s8_tile mr=%d nk4=%lld", mr, (long long)nk4);
                CHECK(c2[mr * 16] == 0x7eadbeef, "s8_tile wrote past its tile");
                float ws[16], f1[CQ_MR_S8 * 16], f2[CQ_MR_S8 * 16];
                for (int j = 0; j < 16; j++) ws[j] = 0.01f * (j + 1);
                for (int i = 0; i < mr * 16; i++) f1[i] = f2[i] = 1.0f;
                ref->s8_tile(mr, nk4, a, lda, b, NULL, f1, ws);
                t->s8_tile(mr, nk4, a, lda, b, NULL, f2, ws);
                for (int i = 0; i < mr * 16; i++)
                    CHECK(fabsf(f1[i] - f2[i]) <= 1e-6f * (fabsf(f1[i]) + 1.0f), "s8_tile facc %d %g %g", i, f1[i], f2[i]);
                free(a); free(b);
            }
    /* 4-panel GEMV: exact, equal to s8_tile on each panel */
    for (int si = 0; si < NSIZES; si++)
        for (int ex = 0; ex < 2; ex++) {
            int64_t nk4 = SIZES[si];
            int8_t *a = malloc(4 * nk4), *bs[4];
            const int8_t *panels[4];
            for (int64_t i = 0; i < 4 * nk4; i++) a[i] = rnd_code(ex);
            for (int p = 0; p < 4; p++) {
                bs[p] = malloc(nk4 * CQ_PANEL_STEP);
                for (int64_t i = 0; i < nk4 * CQ_PANEL_STEP; i++) bs[p][i] = rnd_code(ex);
                panels[p] = bs[p];
            }
            int32_t c1[4 * 16], c2[4 * 16 + 8];
            for (int i = 0; i < 4 * 16 + 8; i++) c2[i] = 0x5eadbeef;
            for (int i = 0; i < 4 * 16; i++) c1[i] = c2[i] = 3 * i - 50; /* it accumulates */
            for (int p = 0; p < 4; p++) ref->s8_tile(1, nk4, a, 4 * nk4, bs[p], c1 + 16 * p, NULL, NULL);
            t->s8_gemv4(nk4, a, panels, c2);
            CHECK(memcmp(c1, c2, sizeof c1) == 0, "s8_gemv4 nk4=%lld", (long long)nk4);
            CHECK(c2[64] == 0x5eadbeef, "s8_gemv4 wrote past its output");
            for (int p = 0; p < 4; p++) free(bs[p]);
            free(a);
        }
    /* 4-panel weight-only GEMV against the reference, within a K-scaled budget */
    for (int si = 0; si < NSIZES; si++) {
        int64_t nk4 = SIZES[si];
        float *x = malloc(sizeof(float) * 4 * nk4), ws[64], y1[64], y2[64 + 8];
        int8_t *bs[4];
        const int8_t *panels[4];
        for (int64_t i = 0; i < 4 * nk4; i++) x[i] = rndf();
        for (int p = 0; p < 4; p++) {
            bs[p] = malloc(nk4 * CQ_PANEL_STEP);
            for (int64_t i = 0; i < nk4 * CQ_PANEL_STEP; i++) bs[p][i] = rnd_code(si & 1);
            panels[p] = bs[p];
        }
        for (int i = 0; i < 64; i++) { ws[i] = 0.001f * (i + 1); y1[i] = y2[i] = 0.5f; }
        y2[64] = 12345.0f;
        ref->f32_gemv4(nk4, x, panels, ws, y1);
        t->f32_gemv4(nk4, x, panels, ws, y2);
        float budget = 1e-6f * (float)(4 * nk4) * 127.0f * 0.07f + 1e-6f;
        for (int i = 0; i < 64; i++) CHECK(fabsf(y1[i] - y2[i]) <= budget, "f32_gemv4 nk4=%lld %d: %g %g", (long long)nk4, i, y1[i], y2[i]);
        CHECK(y2[64] == 12345.0f, "f32_gemv4 wrote past its output");
        for (int p = 0; p < 4; p++) free(bs[p]);
        free(x);
    }
    /* float kernels: dequant exact, gemv / tile within a K-scaled budget */
    for (int si = 0; si < NSIZES; si++) {
        int64_t nk4 = SIZES[si], k = 4 * nk4;
        int8_t *b = malloc(nk4 * CQ_PANEL_STEP);
        float *x = malloc(sizeof(float) * k * CQ_MR_F32), *d1 = malloc(sizeof(float) * k * 16);
        float *d2 = aligned_alloc(64, sizeof(float) * k * 16 + 64);
        for (int64_t i = 0; i < nk4 * CQ_PANEL_STEP; i++) b[i] = rnd_code(0);
        for (int64_t i = 0; i < k * CQ_MR_F32; i++) x[i] = rndf();
        float ws[16];
        for (int j = 0; j < 16; j++) ws[j] = 0.001f * (j + 3);
        ref->f32_dequant(nk4, b, ws, d1);
        t->f32_dequant(nk4, b, ws, d2);
        CHECK(memcmp(d1, d2, sizeof(float) * k * 16) == 0, "f32_dequant nk4=%lld", (long long)nk4);
        /* flat dequantize: bit-exact, every length (tails) */
        for (int64_t len = 0; len < 4 * nk4; len += 1 + len / 3) {
            ref->dequant(b, len, 0.0137f, d1);
            t->dequant(b, len, 0.0137f, d2);
            CHECK(memcmp(d1, d2, sizeof(float) * len) == 0, "dequant len=%lld", (long long)len);
        }
        ref->f32_dequant(nk4, b, ws, d1);
        t->f32_dequant(nk4, b, ws, d2);
        float budget = 1e-6f * (float)k * 127.0f * 0.02f;
        for (int mr = 1; mr <= CQ_MR_F32; mr++) {
            float c1[CQ_MR_F32 * 16], c2[CQ_MR_F32 * 16];
            for (int i = 0; i < CQ_MR_F32 * 16; i++) c1[i] = c2[i] = 0.25f;
            ref->f32_tile(mr, k - 1, x, k, d1, c1, 16);
            t->f32_tile(mr, k - 1, x, k, d2, c2, 16);
            for (int i = 0; i < mr * 16; i++) CHECK(fabsf(c1[i] - c2[i]) <= budget, "f32_tile mr=%d %g %g", mr, c1[i], c2[i]);
        }
        free(b); free(x); free(d1); free(d2);
    }
}

static void test_gelu(const cq_kernels *t)
{
    /* a dense grid plus the tails and the special values, against the double reference */
    int n = 20011;
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) x[i] = -12.0f + 24.0f * (float)i / (float)(n - 1);
    x[0] = INFINITY; x[1] = -INFINITY; x[2] = 0.0f; x[3] = -0.0f; x[4] = 1e-30f; x[5] = -3e38f;
    t->gelu(x, n, y);
    for (int i = 0; i < n; i++) {
        double v = x[i], ref = isinf(v) ? (v > 0 ? INFINITY : 0.0) : 0.5 * v * (1.0 + erf(v * 0.7071067811865476));
        if (isinf(v)) CHECK(y[i] == (float)ref, "gelu(%g) = %g", v, y[i]);
        else CHECK(fabs(y[i] - ref) <= 1e-6 + 3e-7 * fabs(v), "gelu(%.9g) = %.9g, ref %.9g", v, y[i], ref);
    }
    x[7] = NAN;
    t->gelu(x, 16, y);
    CHECK(isnan(y[7]), "gelu(NaN) is NaN");
    t->gelu(x, n, x); /* in place */
    CHECK(x[2] == 0.0f, "in place");
    free(x); free(y);
}

static void test_layer_norm(void)
{
    int64_t m = 5, k = 37;
    float x[5 * 37], y[5 * 37], g[37], b[37];
    for (int i = 0; i < m * k; i++) x[i] = 100.0f + rndf() * 3.0f; /* a large mean: no cancellation */
    for (int i = 0; i < k; i++) { g[i] = 1.0f + 0.1f * i; b[i] = 0.01f * i; }
    CHECK(cq_layer_norm(x, m, k, g, b, 1e-5f, y) == CQ_OK, "layer_norm");
    for (int64_t r = 0; r < m; r++) {
        double mu = 0, var = 0;
        for (int64_t i = 0; i < k; i++) mu += x[r * k + i];
        mu /= k;
        for (int64_t i = 0; i < k; i++) var += (x[r * k + i] - mu) * (x[r * k + i] - mu);
        var /= k;
        for (int64_t i = 0; i < k; i++) {
            double ref = (x[r * k + i] - mu) / sqrt(var + 1e-5) * g[i] + b[i];
            CHECK(fabs(y[r * k + i] - ref) <= 2e-5 * (1 + fabs(ref)), "ln %g %g", y[r * k + i], ref);
        }
    }
    CHECK(cq_layer_norm(x, m, k, NULL, NULL, 1e-5f, x) == CQ_OK, "in place, no affine");
}

/* Public API on the active path against plain references. */
static void test_public(void)
{
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 7, 5}, {3, 33, 17}, {5, 64, 16}, {9, 130, 40}, {70, 96, 33}, {2, 260, 1}};
    for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t m = shapes[s][0], k = shapes[s][1], n = shapes[s][2];
        float *w = malloc(sizeof(float) * n * k), *x = malloc(sizeof(float) * m * k);
        float *y = malloc(sizeof(float) * m * n), *sc = malloc(sizeof(float) * n), sx[80];
        int8_t *q = malloc(n * k), *qx = malloc(m * k), *q2 = malloc(n * k);
        int32_t *c = malloc(sizeof(int32_t) * m * n);
        for (int64_t i = 0; i < n * k; i++) w[i] = rndf();
        for (int64_t i = 0; i < m * k; i++) x[i] = rndf() * 3.0f;
        CHECK(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, sc) == CQ_OK, "quantize");
        for (int64_t r = 0; r < n; r++) {
            float amax = 0;
            for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(w[r * k + i]));
            CHECK(sc[r] == amax / 127.0f, "scale row %lld", (long long)r);
            for (int64_t i = 0; i < k; i++) {
                float e = nearbyintf(w[r * k + i] / sc[r]);
                CHECK(q[r * k + i] == (int8_t)fminf(127, fmaxf(-127, e)), "code %lld,%lld", (long long)r, (long long)i);
            }
        }
        int8_t *packed = malloc(cq_packed_size(n, k));
        CHECK(cq_pack(q, n, k, packed) == CQ_OK, "pack");
        CHECK(cq_unpack(packed, n, k, q2) == CQ_OK && memcmp(q, q2, n * k) == 0, "unpack roundtrip");
        CHECK(cq_quantize_rows(x, m, k, qx, sx) == CQ_OK, "quantize_rows");
        CHECK(cq_gemm_s8s8s32(qx, q, m, n, k, c) == CQ_OK, "gemm");
        CHECK(cq_linear(CQ_MODE_DYNAMIC, x, m, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_OK, "linear dyn");
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < n; j++) {
                int64_t acc = 0;
                for (int64_t i = 0; i < k; i++) acc += (int64_t)qx[r * k + i] * q[j * k + i];
                CHECK(c[r * n + j] == acc, "gemm %lld,%lld", (long long)r, (long long)j);
                float ref = (float)acc * sc[j] * sx[r];
                CHECK(fabsf(y[r * n + j] - ref) <= 1e-5f * fabsf(ref) + 1e-30f, "dyn %g %g", y[r * n + j], ref);
            }
        CHECK(cq_linear(CQ_MODE_WEIGHT_ONLY, x, m, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_OK, "linear wo");
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < n; j++) {
                double acc = 0;
                for (int64_t i = 0; i < k; i++) acc += (double)x[r * k + i] * ((double)q[j * k + i] * sc[j]);
                CHECK(fabs(y[r * n + j] - acc) <= 1e-5 * k * 3.0 * sc[j] * 127, "wo %g %g", y[r * n + j], acc);
            }
        free(w); free(x); free(y); free(sc); free(q); free(qx); free(q2); free(c); free(packed);
    }
    /* K beyond the int32 range: all codes 127, exact result 127*127*k */
    {
        int64_t k = 140004, n = 3;
        float *x = malloc(sizeof(float) * k), sc[3] = {1.0f / 127, 1.0f / 127, 1.0f / 127}, y[3];
        int8_t *q = malloc(n * k), *packed = malloc(cq_packed_size(n, k));
        for (int64_t i = 0; i < k; i++) x[i] = 1.0f;
        memset(q, 127, n * k);
        CHECK(cq_pack(q, n, k, packed) == CQ_OK, "pack big");
        CHECK(cq_linear(CQ_MODE_DYNAMIC, x, 1, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_OK, "big k");
        /* acc = 127*127*k; y = acc * (1/127) * (1/127) ~= k */
        CHECK(fabsf(y[0] - (float)k) <= 1e-5f * k, "big k value %g vs %lld", y[0], (long long)k);
        int32_t c[3];
        CHECK(cq_gemm_s8s8s32(q, q, 1, n, k, c) == CQ_ERR_OVERFLOW, "gemm refuses k > CQ_MAX_K_S32");
        free(x); free(q); free(packed);
    }
}

static void test_threads_identical(void)
{
    /* big enough that every call engages the threads (cq_threads_for: >= 1M multiply-adds),
     * including the single-row GEMV */
    int64_t m = 37, k = 1100, n = 1000;
    float *w = malloc(sizeof(float) * n * k), *x = malloc(sizeof(float) * m * k), sc[1000];
    float *y1 = malloc(sizeof(float) * m * n), *y2 = malloc(sizeof(float) * m * n);
    int8_t *q = malloc(n * k), *packed = malloc(cq_packed_size(n, k));
    for (int64_t i = 0; i < n * k; i++) w[i] = rndf();
    for (int64_t i = 0; i < m * k; i++) x[i] = rndf();
    cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, sc);
    cq_pack(q, n, k, packed);
    int saved = cq_get_num_threads();
    for (int mode = 0; mode < 2; mode++) {
        for (int64_t rows = 1; rows <= m; rows += m - 1) {
            cq_set_num_threads(1);
            cq_linear(mode, x, rows, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y1);
            for (int t = 2; t <= 4; t++) {
                cq_set_num_threads(t);
                cq_linear(mode, x, rows, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y2);
                CHECK(memcmp(y1, y2, sizeof(float) * rows * n) == 0, "mode %d rows %lld threads %d differ", mode, (long long)rows, t);
            }
        }
    }
    cq_set_num_threads(saved);
    free(w); free(x); free(y1); free(y2); free(q); free(packed);
}

static void test_bad_args(void)
{
    float f[64] = {0}, sc[16] = {1};
    int8_t q[64] = {0}, p[1024] = {0};
    int32_t c[16];
    CHECK(cq_quantize(NULL, 1, 1, CQ_PER_CHANNEL, 0, q, sc) == CQ_ERR_NULL, "null w");
    CHECK(cq_quantize(f, 0, 1, CQ_PER_CHANNEL, 0, q, sc) == CQ_ERR_SHAPE, "n=0");
    CHECK(cq_quantize(f, -1, 1, CQ_PER_CHANNEL, 0, q, sc) == CQ_ERR_SHAPE, "n<0");
    CHECK(cq_quantize(f, 2, 8, 7, 0, q, sc) == CQ_ERR_ARG, "bad scheme");
    CHECK(cq_quantize(f, 2, 8, CQ_PER_GROUP, 3, q, sc) == CQ_ERR_GROUP, "group 3");
    CHECK(cq_quantize(f, 2, 8, CQ_PER_GROUP, 0, q, sc) == CQ_ERR_GROUP, "group 0");
    CHECK(cq_quantize(f, 2, 8, CQ_PER_GROUP, 12, q, sc) == CQ_ERR_GROUP, "group does not divide");
    CHECK(cq_num_scales(CQ_PER_CHANNEL, (int64_t)1 << 40, (int64_t)1 << 40, 0) == CQ_ERR_OVERFLOW, "overflow n*k");
    CHECK(cq_packed_size(INT64_MAX, INT64_MAX) == CQ_ERR_OVERFLOW, "packed size overflow");
    f[5] = NAN;
    CHECK(cq_quantize(f, 2, 8, CQ_PER_CHANNEL, 0, q, sc) == CQ_ERR_NONFINITE, "nan");
    CHECK(cq_quantize(f, 2, 8, CQ_PER_TENSOR, 0, q, sc) == CQ_ERR_NONFINITE, "nan per tensor");
    f[5] = 0;
    q[3] = -128;
    CHECK(cq_pack(q, 2, 8, p) == CQ_ERR_RANGE, "pack -128");
    CHECK(cq_gemm_s8s8s32(q, q, 2, 2, 8, c) == CQ_ERR_RANGE, "gemm -128");
    q[3] = 0;
    CHECK(cq_linear(5, f, 1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_ARG, "bad mode");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, -1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_SHAPE, "m<0");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, 0, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_OK, "m=0 ok");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, NULL, 1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_NULL, "null x");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, (int64_t)1 << 62, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_OVERFLOW, "m overflow");
    CHECK(cq_gemm_s8s8s32(q, q, 1, 1, CQ_MAX_K_S32 + 1, c) == CQ_ERR_OVERFLOW, "gemm k overflow");
    CHECK(cq_set_num_threads(0) == CQ_ERR_ARG && cq_set_num_threads(100000) == CQ_ERR_ARG, "threads range");
    CHECK(cq_set_isa(42) == CQ_ERR_ARG, "unknown isa");
    for (int i = CQ_ISA_SCALAR; i <= CQ_ISA_AVX512VNNI; i++)
        if (!cq_isa_supported(i)) CHECK(cq_set_isa(i) == CQ_ERR_ISA, "unsupported isa %d refused", i);
    CHECK(cq_gelu(NULL, 4, f) == CQ_ERR_NULL && cq_gelu(f, -1, f) == CQ_ERR_SHAPE && cq_gelu(NULL, 0, NULL) == CQ_OK, "gelu args");
    CHECK(cq_layer_norm(f, 2, 0, NULL, NULL, 1e-5f, f) == CQ_ERR_SHAPE, "ln k=0");
    CHECK(cq_layer_norm(f, 2, 4, NULL, NULL, -1.0f, f) == CQ_ERR_ARG, "ln eps<0");
    CHECK(cq_layer_norm(f, 2, 4, NULL, NULL, NAN, f) == CQ_ERR_ARG, "ln eps NaN");
    CHECK(cq_layer_norm(NULL, 2, 4, NULL, NULL, 1e-5f, f) == CQ_ERR_NULL, "ln null");
    CHECK(strlen(cq_strerror(-1234)) > 0 && strcmp(cq_version(), CQ_VERSION_STRING) == 0, "strings");
}

int main(void)
{
    int ran = 0;
    for (int isa = CQ_ISA_SCALAR; isa <= CQ_ISA_AVX512VNNI; isa++) {
        if (!cq_isa_supported(isa)) {
            printf("skip %s: not supported by this CPU/build\n", cq_isa_name(isa));
            continue;
        }
        CHECK(cq_set_isa(isa) == CQ_OK && cq_get_isa() == isa, "set isa %s", cq_isa_name(isa));
        const cq_kernels *t = cq_active_kernels();
        printf("path %s (active: %s)\n", cq_isa_name(isa), cq_isa_name(cq_get_isa()));
        test_table(t);
        test_gelu(t);
        test_layer_norm();
        test_public();
        test_threads_identical();
        ran++;
    }
    cq_set_isa(CQ_ISA_AUTO);
    test_bad_args();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures || !ran ? 1 : 0;
}
