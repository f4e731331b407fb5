/* test_api.c - the public API as an embedder sees it: only "cquant.h", no internals.
 *
 * Built twice by `make ctest-api`: as strict C99 (-std=c99 -pedantic-errors) and as C++
 * (-x c++ -std=c++11 -pedantic-errors) linked against the C library, which checks that the header is
 * self-contained and extern "C"-safe. Checks: version macros against cq_version(); every status
 * has a message; sizes whose byte counts overflow int64/size_t are refused with CQ_ERR_OVERFLOW
 * before any pointer is touched (the calls pass NULL, so a missed check returns CQ_ERR_NULL
 * instead of crashing); sizes past 2^31 that do fit are accepted; k past the int32 limit is refused
 * by cq_gemm_s8s8s32 only; cq_linear refuses an output that overlaps an input (CQ_ERR_ALIAS);
 * cq_isa_error() explains a CQUANT_ISA that cannot be used; cq_shutdown() joins the pool's workers
 * and kernels still work after it; the default thread count is CQUANT_NUM_THREADS, else
 * OMP_NUM_THREADS, else the CPU count (in forked children). Run it once per ISA path with CQUANT_ISA=... Ends with
 * "N passed, N failed"; with a CQUANT_ISA that cannot run here it prints cq_isa_error() and exits 77
 * (1 if that text is empty). */
#if !defined(_POSIX_C_SOURCE) && !defined(__cplusplus)
#define _POSIX_C_SOURCE 200112L /* setenv / unsetenv (POSIX, not C99) */
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include "cquant.h"

static int failures = 0, checks = 0;
#define CHECK(cond, what)                                                                  \
    do {                                                                                   \
        checks++;                                                                          \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, what);                 \
        }                                                                                  \
    } while (0)
#define EXPECT_STATUS(call, want)                                                          \
    do {                                                                                   \
        long long got_ = (long long)(call);                                                \
        checks++;                                                                          \
        if (got_ != (long long)(want)) {                                                   \
            failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s = %lld (%s), want %s\n", __FILE__, __LINE__,   \
                    #call, got_, cq_strerror((int)got_), #want);                           \
        }                                                                                  \
    } while (0)

#define P40 ((int64_t)1 << 40)
#define P31 ((int64_t)1 << 31)
#define P32 ((int64_t)1 << 32)

static void test_version_and_strings(void)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%d.%d.%d", CQ_VERSION_MAJOR, CQ_VERSION_MINOR, CQ_VERSION_PATCH);
    CHECK(strcmp(buf, CQ_VERSION_STRING) == 0, "CQ_VERSION_* agree with CQ_VERSION_STRING");
    CHECK(strcmp(cq_version(), CQ_VERSION_STRING) == 0, "library version == header version");
    for (int st = CQ_ERR_ALIAS; st <= CQ_OK; st++) {
        const char *msg = cq_strerror(st);
        CHECK(msg && *msg && strcmp(msg, "unknown status") != 0, "every status has its own message");
    }
    CHECK(cq_strerror(1) != NULL && cq_strerror(-1000000) != NULL, "unknown status: a message, never NULL");
    CHECK(strcmp(cq_isa_name(CQ_ISA_SCALAR), "scalar") == 0, "isa name scalar");
    CHECK(strcmp(cq_isa_name(CQ_ISA_AVX2), "avx2") == 0, "isa name avx2");
    CHECK(strcmp(cq_isa_name(CQ_ISA_AVX512VNNI), "avx512vnni") == 0, "isa name avx512vnni");
    CHECK(strcmp(cq_isa_name(12345), "unknown") == 0, "isa name unknown");
    CHECK(cq_isa_supported(CQ_ISA_SCALAR) == 1, "scalar always supported");
    CHECK(cq_isa_supported(-5) == 0 && cq_isa_supported(99) == 0, "unknown isa not supported");
    CHECK(cq_get_num_threads() >= 1, "threads >= 1");
}

/* Every size check happens before the pointers are read: NULL buffers with sizes that cannot be
 * allocated must give CQ_ERR_OVERFLOW (or SHAPE), never CQ_ERR_NULL and never a crash. */
static void test_size_overflow(void)
{
    /* n*k*4 bytes overflows int64 */
    EXPECT_STATUS(cq_num_scales(CQ_PER_CHANNEL, P32, P32, 0), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_num_scales(CQ_PER_TENSOR, INT64_MAX, 2, 0), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, P40, P40, 64), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_quantize(NULL, P32, P32, CQ_PER_CHANNEL, 0, NULL, NULL), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_dequantize(NULL, NULL, P32, P32, CQ_PER_TENSOR, 0, NULL), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_quantize_rows(NULL, P32, P32, NULL, NULL), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_quantize_rows(NULL, INT64_MAX, 1, NULL, NULL), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_AUTO, INT64_MAX, INT64_MAX, 0), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_N16K4, INT64_MAX, 1, 0), CQ_ERR_OVERFLOW); /* n padded to 16: 64 bytes/row */
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, NULL, P32, P32, 0, NULL), CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_unpack(NULL, P32, P32, NULL), CQ_ERR_OVERFLOW);
    /* gemm: m*n*4 output bytes overflow while m*k and n*k fit */
    EXPECT_STATUS(cq_gemm_s8s8s32(NULL, NULL, P40, P40, 4, NULL), CQ_ERR_NULL); /* NULL checked first */
    {
        int8_t a[4] = {1, 2, 3, 4};
        int32_t c[1];
        EXPECT_STATUS(cq_gemm_s8s8s32(a, a, P40, P40, 4, c), CQ_ERR_OVERFLOW);
        EXPECT_STATUS(cq_gemm_s8s8s32(a, a, INT64_MAX, 1, 4, c), CQ_ERR_OVERFLOW);
        EXPECT_STATUS(cq_gemm_s8s8s32(a, a, 1, INT64_MAX / 2, 4, c), CQ_ERR_OVERFLOW);
        EXPECT_STATUS(cq_gemm_s8s8s32(a, a, 1, 1, CQ_MAX_K_S32 + 1, c), CQ_ERR_OVERFLOW);
    }
    /* linear: m*k*4 (x), m*n*4 (y) and the int8 copy of x each overflow in turn */
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, NULL, P40, P32, NULL, NULL, CQ_PER_CHANNEL, 0, 4, NULL, NULL),
                  CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_linear(CQ_MODE_WEIGHT_ONLY, NULL, P40, 4, NULL, NULL, CQ_PER_CHANNEL, 0, P32, NULL, NULL),
                  CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, NULL, INT64_MAX, 1, NULL, NULL, CQ_PER_TENSOR, 0, 1, NULL, NULL),
                  CQ_ERR_OVERFLOW);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, NULL, (int64_t)1 << 60, 1, NULL, NULL, CQ_PER_TENSOR, 0, 1, NULL, NULL),
                  CQ_ERR_OVERFLOW); /* x and y fit; the padded int8 copy (16 bytes a row) does not */
    /* the weight itself too large */
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, NULL, 1, P40, NULL, NULL, CQ_PER_CHANNEL, 0, P40, NULL, NULL),
                  CQ_ERR_OVERFLOW);
}

/* Sizes past 2^31 (elements or bytes) that still fit are valid sizes, not errors: with NULL
 * buffers the calls get as far as the NULL check. */
static void test_large_but_valid_sizes(void)
{
    EXPECT_STATUS(cq_num_scales(CQ_PER_CHANNEL, P31 + 7, 1024, 0), P31 + 7);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, P32, 1024, 256), P32 * 4);
    EXPECT_STATUS(cq_num_scales(CQ_PER_TENSOR, P40, (int64_t)1 << 20, 0), 1);
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_N16K4, P31 + 1, 3, 0), 64 + (P31 + 16) * 4); /* header; n padded to 16, k to 4 */
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_N64K4, 65, 8, 4), 64 + 128 * 8 + 2 * 2 * 64 * 4); /* + a sum per row and group */
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_N16K4, 17, P32 + 1, 0), 64 + (int64_t)32 * (P32 + 4));
    EXPECT_STATUS(cq_quantize(NULL, P31, 8, CQ_PER_CHANNEL, 0, NULL, NULL), CQ_ERR_NULL);
    EXPECT_STATUS(cq_quantize_rows(NULL, 3, P32, NULL, NULL), CQ_ERR_NULL);
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, NULL, P32, 3, 0, NULL), CQ_ERR_NULL);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, NULL, P31, 64, NULL, NULL, CQ_PER_CHANNEL, 0, 16, NULL, NULL),
                  CQ_ERR_NULL);
    EXPECT_STATUS(cq_linear(CQ_MODE_WEIGHT_ONLY, NULL, 0, P32, NULL, NULL, CQ_PER_CHANNEL, 0, 16, NULL, NULL),
                  CQ_OK); /* m = 0: nothing to do, nothing read */
}

static void test_bad_arguments(void)
{
    float f[8] = {0};
    int8_t q[8] = {0};
    EXPECT_STATUS(cq_num_scales(CQ_PER_CHANNEL, 0, 4, 0), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_num_scales(CQ_PER_CHANNEL, 4, -1, 0), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_num_scales(CQ_PER_CHANNEL, INT64_MIN, INT64_MIN, 0), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_num_scales(3, 4, 4, 0), CQ_ERR_ARG);
    EXPECT_STATUS(cq_num_scales(-1, 4, 4, 0), CQ_ERR_ARG);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, 4, 8, 6), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, 4, 8, -4), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, 4, 8, INT64_MIN), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_num_scales(CQ_PER_GROUP, 4, 8, 16), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_AUTO, 0, 1, 0), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_AUTO, 1, INT64_MIN, 0), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_packed_size(7, 4, 4, 0), CQ_ERR_ARG);              /* unknown format */
    EXPECT_STATUS(cq_packed_size(CQ_FORMAT_N16K4, 4, 8, 6), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_packed_info(q, 8, NULL, NULL, NULL), CQ_ERR_FORMAT); /* not a packed buffer */
    {   /* a buffer of the header's size that is no packed weight (a NULL-free but wrong pointer) */
        static const int8_t junk[64] = {1, 2, 3};
        EXPECT_STATUS(cq_unpack(junk, 2, 4, q), CQ_ERR_FORMAT);
        EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, f, 1, 4, junk, f, CQ_PER_CHANNEL, 0, 2, NULL, f), CQ_ERR_FORMAT);
    }
    EXPECT_STATUS(cq_quantize(f, 2, 4, CQ_PER_CHANNEL, 0, NULL, f), CQ_ERR_NULL);
    EXPECT_STATUS(cq_dequantize(q, f, 2, 4, CQ_PER_CHANNEL, 0, NULL), CQ_ERR_NULL);
    EXPECT_STATUS(cq_unpack(q, 2, 4, NULL), CQ_ERR_NULL);
    EXPECT_STATUS(cq_linear(-1, f, 1, 4, q, f, CQ_PER_CHANNEL, 0, 2, NULL, f), CQ_ERR_ARG);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, f, 1, 4, NULL, f, CQ_PER_CHANNEL, 0, 2, NULL, f), CQ_ERR_NULL);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, f, 1, 4, q, f, CQ_PER_GROUP, 3, 2, NULL, f), CQ_ERR_GROUP);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, f, 1, 0, q, f, CQ_PER_CHANNEL, 0, 2, NULL, f), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, f, 1, 4, q, f, CQ_PER_CHANNEL, 0, 0, NULL, f), CQ_ERR_SHAPE);
    EXPECT_STATUS(cq_set_num_threads(0), CQ_ERR_ARG);
    EXPECT_STATUS(cq_set_num_threads(-3), CQ_ERR_ARG);
    EXPECT_STATUS(cq_set_num_threads(257), CQ_ERR_ARG);
    EXPECT_STATUS(cq_set_isa(6), CQ_ERR_ARG);
    EXPECT_STATUS(cq_set_isa(-2), CQ_ERR_ARG);
}

/* A tiny end-to-end run on the active path, so the C++ build links and calls real kernels. */
static void test_small_run(void)
{
    enum { n = 3, k = 8 };
    float w[n * k], x[2 * k], s[n], y[2 * n];
    int8_t q[n * k], back[n * k];
    for (int i = 0; i < n * k; i++) w[i] = (float)((i * 7) % 11 - 5) / 5.0f;
    for (int i = 0; i < 2 * k; i++) x[i] = (float)(i % 5 - 2);
    EXPECT_STATUS(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, s), CQ_OK);
    int8_t *packed = (int8_t *)malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
    CHECK(packed != NULL, "malloc");
    if (!packed) return;
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed), CQ_OK);
    EXPECT_STATUS(cq_unpack(packed, n, k, back), CQ_OK);
    CHECK(memcmp(q, back, sizeof q) == 0, "pack/unpack round trip");
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
        EXPECT_STATUS(cq_linear(mode, x, 2, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y), CQ_OK);
        for (int r = 0; r < 2; r++)
            for (int j = 0; j < n; j++) {
                double ref = 0;
                for (int i = 0; i < k; i++) ref += (double)x[r * k + i] * w[j * k + i];
                double err = y[r * n + j] - ref;
                CHECK(err < 0.1 && err > -0.1, "small linear close to the float layer");
            }
    }
    free(packed);
}

/* cq_linear_ex: x_mul gives what cq_linear gives on the multiplied x (the float32 product), in both
 * modes; x_scale (static activations) gives what the contract says for a row quantized with that
 * one scale; bad options are refused with a status and nothing written. */
static void test_linear_ex(void)
{
    enum { n = 5, k = 24, m = 3 };
    float w[n * k], s[n], bias[n], x[m * k], xm[m * k], mul[k], y0[m * n], y1[m * n];
    int8_t q[n * k];
    for (int i = 0; i < n * k; i++) w[i] = (float)((i * 7) % 13 - 6) / 6.0f;
    for (int i = 0; i < n; i++) bias[i] = 0.5f * (float)i - 1.0f;
    for (int i = 0; i < k; i++) mul[i] = 0.25f + 0.125f * (float)(i % 9);
    for (int i = 0; i < m * k; i++) {
        x[i] = (float)((i * 5) % 11 - 5) * 0.37f;
        xm[i] = x[i] * mul[i % k];
    }
    EXPECT_STATUS(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, s), CQ_OK);
    int8_t *packed = (int8_t *)malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
    CHECK(packed != NULL, "malloc");
    if (!packed) return;
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed), CQ_OK);
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
        EXPECT_STATUS(cq_linear(mode, xm, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, y0), CQ_OK);
        EXPECT_STATUS(cq_linear_ex(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, mul, 0, 0.0f, y1), CQ_OK);
        CHECK(memcmp(y0, y1, sizeof y0) == 0, "x_mul: bit-identical to cq_linear on x * x_mul");
        EXPECT_STATUS(cq_linear_ex(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, 0.0f, y1), CQ_OK);
        EXPECT_STATUS(cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, y0), CQ_OK);
        CHECK(memcmp(y0, y1, sizeof y0) == 0, "cq_linear_ex(NULL, 0) is cq_linear");
    }
    /* static: codes clamp(round(x / xs)), y = (float)sum * (xs * s_j) + b_j (sums exact) */
    const float xs = 0.05f;
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, xs, y1), CQ_OK);
    for (int r = 0; r < m; r++)
        for (int j = 0; j < n; j++) {
            int32_t acc = 0;
            for (int i = 0; i < k; i++) {
                float c = nearbyintf(x[r * k + i] / xs);
                c = c > 127.0f ? 127.0f : c < -127.0f ? -127.0f : c;
                acc += (int32_t)c * q[j * k + i];
            }
            float want = (float)acc * (xs * s[j]) + bias[j];
            CHECK(y1[r * n + j] == want, "static activations: the contract's codes and epilogue");
        }
    /* refused: bad x_scale, static weight-only, non-finite x_mul, y over x_mul */
    const float nanv = NAN, infv = INFINITY;
    for (int i = 0; i < m * n; i++) y1[i] = -7.0f;
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, -1.0f, y1), CQ_ERR_ARG);
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, nanv, y1), CQ_ERR_ARG);
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, infv, y1), CQ_ERR_ARG);
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_WEIGHT_ONLY, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, NULL, 0, xs, y1), CQ_ERR_ARG);
    mul[3] = nanv;
    EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, mul, 0, 0.0f, y1), CQ_ERR_NONFINITE);
    mul[3] = 1.0f;
    {
        float ym[m * n + k];
        for (int i = 0; i < k; i++) ym[i] = 1.0f;
        EXPECT_STATUS(cq_linear_ex(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, ym, 0, 0.0f, ym),
                      CQ_ERR_ALIAS);
    }
    int untouched = 1;
    for (int i = 0; i < m * n; i++) untouched &= y1[i] == -7.0f;
    CHECK(untouched, "a refused cq_linear_ex writes nothing");
    free(packed);
}

/* cq_linear_multi: three weights (different n) on one x, both modes, with x_mul and a rotation:
 * each output bit-identical to its own cq_linear_ex call; an output over another linear's weight
 * refused before anything is written; a count outside 1..CQ_MULTI_MAX refused. */
static void test_linear_multi(void)
{
    enum { k = 32, m = 5, nmax = 40 };
    const int64_t ns[3] = {16, 40, 8};
    float w[nmax * k], s[3][nmax], b[3][nmax], x[m * k], mul[k], y[3][m * nmax], yref[m * nmax];
    int8_t q[nmax * k];
    void *packed[3] = {NULL, NULL, NULL};
    for (int i = 0; i < k; i++) mul[i] = 0.5f + 0.0625f * (float)(i % 7);
    for (int i = 0; i < m * k; i++) x[i] = (float)((i * 7) % 23 - 11) * 0.21f;
    for (int l = 0; l < 3; l++) {
        for (int i = 0; i < ns[l] * k; i++) w[i] = (float)((i * (l + 3)) % 17 - 8) / 8.0f;
        for (int j = 0; j < ns[l]; j++) b[l][j] = 0.25f * (float)(j - l);
        EXPECT_STATUS(cq_quantize(w, ns[l], k, CQ_PER_CHANNEL, 0, q, s[l]), CQ_OK);
        packed[l] = malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, ns[l], k, 0));
        CHECK(packed[l] != NULL, "malloc");
        if (!packed[l]) goto done;
        EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, ns[l], k, 0, (int8_t *)packed[l]), CQ_OK);
    }
    {
        const void *pk[3] = {packed[0], packed[1], packed[2]};
        const float *sc[3] = {s[0], s[1], s[2]}, *bi[3] = {b[0], NULL, b[2]};
        float *ys[3] = {y[0], y[1], y[2]};
        for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++)
            for (int opt = 0; opt < 3; opt++) {
                const float *xm = opt ? mul : NULL;
                const int64_t had = opt == 2 ? 16 : 0;
                EXPECT_STATUS(cq_linear_multi(mode, x, m, k, 3, pk, sc, CQ_PER_CHANNEL, 0, ns, bi, xm, had, 0.0f, ys),
                              CQ_OK);
                for (int l = 0; l < 3; l++) {
                    EXPECT_STATUS(cq_linear_ex(mode, x, m, k, pk[l], sc[l], CQ_PER_CHANNEL, 0, ns[l], bi[l], xm, had,
                                               0.0f, yref), CQ_OK);
                    CHECK(memcmp(y[l], yref, sizeof(float) * (size_t)(m * ns[l])) == 0,
                          "cq_linear_multi: each output is its own cq_linear_ex");
                }
            }
        /* refusals: nothing written */
        for (int i = 0; i < m * nmax; i++) y[0][i] = -3.0f;
        float *over[3] = {y[0], (float *)packed[0], y[2]};
        EXPECT_STATUS(cq_linear_multi(CQ_MODE_DYNAMIC, x, m, k, 3, pk, sc, CQ_PER_CHANNEL, 0, ns, bi, NULL, 0, 0.0f,
                                      over), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_linear_multi(CQ_MODE_DYNAMIC, x, m, k, 0, pk, sc, CQ_PER_CHANNEL, 0, ns, bi, NULL, 0, 0.0f,
                                      ys), CQ_ERR_ARG);
        EXPECT_STATUS(cq_linear_multi(CQ_MODE_DYNAMIC, x, m, k, CQ_MULTI_MAX + 1, pk, sc, CQ_PER_CHANNEL, 0, ns, bi,
                                      NULL, 0, 0.0f, ys), CQ_ERR_ARG);
        int untouched = 1;
        for (int i = 0; i < m * nmax; i++) untouched &= y[0][i] == -3.0f;
        CHECK(untouched, "a refused cq_linear_multi writes nothing");
    }
done:
    for (int l = 0; l < 3; l++) free(packed[l]);
}

/* The output of cq_linear may not share a byte with x, scales, bias or the packed weight: in place
 * (y == x) used to give wrong results in weight-only mode. Refused before anything is written. */
static void test_linear_alias(void)
{
    enum { n = 4, k = 8, m = 2 };
    float w[n * k], s[n], bias[n], ref[m * n];
    float buf[m * k + 64]; /* x at buf, outputs placed to overlap it */
    int8_t q[n * k];
    for (int i = 0; i < n * k; i++) w[i] = (float)((i * 5) % 9 - 4) / 4.0f;
    for (int i = 0; i < n; i++) bias[i] = 0.25f * (float)i;
    EXPECT_STATUS(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, s), CQ_OK);
    int64_t psize = cq_packed_size(CQ_FORMAT_AUTO, n, k, 0);
    int8_t *packed = (int8_t *)malloc((size_t)psize);
    CHECK(packed != NULL, "malloc");
    if (!packed) return;
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed), CQ_OK);
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
        for (int i = 0; i < m * k + 64; i++) buf[i] = (float)(i % 7 - 3);
        EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, ref), CQ_OK);
        float keep[m * k];
        memcpy(keep, buf, sizeof keep);
        /* y == x (in place), y starting inside x, x starting inside y */
        EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, buf), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, buf + m * k - 1),
                      CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_linear(mode, buf + 3, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, buf), CQ_ERR_ALIAS);
        CHECK(memcmp(keep, buf, sizeof keep) == 0, "a refused call writes nothing");
        /* y over the scales, the bias, the packed weight */
        {
            float sb[n + m * n];
            memcpy(sb, s, sizeof s);
            EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, sb, CQ_PER_CHANNEL, 0, n, NULL, sb), CQ_ERR_ALIAS);
            memcpy(sb + m * n - 1, bias, sizeof bias); /* its first element under y's last */
            EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, sb + m * n - 1, sb),
                          CQ_ERR_ALIAS);
        }
        EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias,
                                (float *)(void *)(packed + psize - 4)), CQ_ERR_ALIAS);
        /* adjacent but disjoint: fine, and the same result as separate buffers */
        {
            float y[m * n];
            memcpy(buf + m * k, bias, sizeof bias);
            EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, buf + m * k, y), CQ_OK);
            CHECK(memcmp(y, ref, sizeof y) == 0, "disjoint buffers give the reference result");
            EXPECT_STATUS(cq_linear(mode, buf, m, k, packed, s, CQ_PER_CHANNEL, 0, n, bias, buf + m * k), CQ_OK);
            CHECK(memcmp(buf + m * k, ref, sizeof ref) == 0, "y right after x gives the reference result");
        }
    }
    free(packed);
}

/* The other entry points that write while they read: an output overlapping an input other than
 * the documented in-place cases is CQ_ERR_ALIAS, and nothing is written (review 2026-11-30: these
 * gave status 0 and a wrong result). */
static void test_other_alias(void)
{
    static float buf[4096];
    static int8_t a8[256], b8[256];
    static int32_t c32[256];
    for (int i = 0; i < 4096; i++) buf[i] = (float)(i % 13) * 0.25f - 1.5f;
    for (int i = 0; i < 256; i++) { a8[i] = (int8_t)(i % 9 - 4); b8[i] = (int8_t)(i % 7 - 3); }
    float keep[4096];
    memcpy(keep, buf, sizeof keep);
    /* gemm_s8s8s32: c over a or b (c as int32 over int8 storage) */
    {
        static int32_t ab32[128];
        int8_t *a = (int8_t *)(void *)ab32;
        for (int i = 0; i < 64; i++) a[i] = (int8_t)(i % 5 - 2);
        EXPECT_STATUS(cq_gemm_s8s8s32(a, b8, 4, 4, 16, ab32), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_gemm_s8s8s32(a8, a, 4, 4, 16, ab32 + 12), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_gemm_s8s8s32(a8, b8, 4, 4, 16, c32), CQ_OK);
    }
    /* GELU: in place is fine, a shifted output is not */
    EXPECT_STATUS(cq_gelu(buf, 100, buf + 1), CQ_ERR_ALIAS);
    EXPECT_STATUS(cq_gelu(buf + 1, 100, buf), CQ_ERR_ALIAS);
    CHECK(memcmp(keep, buf, sizeof keep) == 0, "a refused cq_gelu writes nothing");
    /* LayerNorm: y is x or residual, or apart; not shifted, not over gamma / beta */
    EXPECT_STATUS(cq_layer_norm(buf, 4, 64, NULL, NULL, 1e-5f, buf + 64), CQ_ERR_ALIAS);
    EXPECT_STATUS(cq_add_layer_norm(buf, buf + 1024, 4, 64, NULL, NULL, 1e-5f, buf + 1024 + 32), CQ_ERR_ALIAS);
    EXPECT_STATUS(cq_layer_norm(buf, 4, 64, buf + 2048, NULL, 1e-5f, buf + 2048 - 100), CQ_ERR_ALIAS);
    EXPECT_STATUS(cq_layer_norm(buf, 4, 64, NULL, buf + 2048, 1e-5f, buf + 2048 - 100), CQ_ERR_ALIAS);
    CHECK(memcmp(keep, buf, sizeof keep) == 0, "a refused LayerNorm writes nothing");
    /* attention (batch 1, seq 4, 2 heads of 8: width 16): out over q, k, v or the mask */
    {
        const float *q = buf, *k = buf + 16, *v = buf + 32; /* a fused QKV projection, ld 48 */
        EXPECT_STATUS(cq_attention(q, k, v, 48, 1, 4, 2, 8, NULL, 0.35f, buf + 32, 48), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_attention(q, k, v, 48, 1, 4, 2, 8, NULL, 0.35f, buf + 100, 16), CQ_ERR_ALIAS);
        EXPECT_STATUS(cq_attention(q, k, v, 48, 1, 4, 2, 8, buf + 1000, 0.35f, buf + 998, 16), CQ_ERR_ALIAS);
        CHECK(memcmp(keep, buf, sizeof keep) == 0, "a refused cq_attention writes nothing");
        EXPECT_STATUS(cq_attention(q, k, v, 48, 1, 4, 2, 8, buf + 1000, 0.35f, buf + 2000, 16), CQ_OK);
    }
    /* the documented in-place cases still work */
    EXPECT_STATUS(cq_gelu(buf, 100, buf), CQ_OK);
    EXPECT_STATUS(cq_layer_norm(buf, 4, 64, NULL, NULL, 1e-5f, buf), CQ_OK);
    EXPECT_STATUS(cq_add_layer_norm(buf, buf + 1024, 4, 64, NULL, NULL, 1e-5f, buf + 1024), CQ_OK);
}

/* A packed weight at any address (e.g. read from a file at an odd offset): the header and the
 * column sums are read byte-wise, so the results equal those of an aligned copy (under the
 * sanitizer build, -fno-sanitize-recover=undefined also proves there is no misaligned access). */
static void test_unaligned_packed(void)
{
    enum { M = 5, N = 192, K = 36 }; /* N64K4 (with column sums) on the AVX-512 paths */
    static int8_t q[N * K];
    static float s[N], x[M * K], y0[M * N], y1[M * N];
    for (int i = 0; i < N * K; i++) q[i] = (int8_t)((i * 37) % 255 - 127);
    for (int i = 0; i < N; i++) s[i] = 0.01f + 0.001f * (float)i;
    for (int i = 0; i < M * K; i++) x[i] = (float)(i % 11) * 0.3f - 1.4f;
    int64_t psize = cq_packed_size(CQ_FORMAT_AUTO, N, K, 0);
    CHECK(psize > 0, "packed size");
    if (psize <= 0) return;
    char *base = (char *)malloc((size_t)psize + 128);
    CHECK(base != NULL, "malloc");
    if (!base) return;
    char *aligned = base + (64 - (uintptr_t)base % 64) % 64;
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, aligned), CQ_OK);
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
        EXPECT_STATUS(cq_linear(mode, x, M, K, aligned, s, CQ_PER_CHANNEL, 0, N, NULL, y0), CQ_OK);
        for (int off = 1; off < 8; off += 2) {
            char *odd = aligned + off;
            EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, odd), CQ_OK);
            EXPECT_STATUS(cq_linear(mode, x, M, K, odd, s, CQ_PER_CHANNEL, 0, N, NULL, y1), CQ_OK);
            CHECK(memcmp(y0, y1, sizeof y0) == 0, "a packed weight at an odd address gives the same result");
        }
        EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, aligned), CQ_OK);
    }
    free(base);
}

/* cq_linear_add_ln is bit for bit cq_linear_ex then cq_add_layer_norm_ex (every mode, M = 1 and a
 * block of rows), and refuses a missing residual, a negative eps and y over the residual. */
static void test_linear_add_ln(void)
{
    enum { M = 9, N = 40, K = 36 };
    static int8_t q[N * K];
    static float s[N], x[M * K], res[M * N], g[N], b[N], rm[N], y0[M * N], y1[M * N];
    for (int i = 0; i < N * K; i++) q[i] = (int8_t)((i * 29) % 255 - 127);
    for (int i = 0; i < N; i++) { s[i] = 0.01f + 0.001f * (float)i; g[i] = 1.0f + 0.01f * (float)i; b[i] = 0.1f * (float)(i % 5); rm[i] = 0.5f + 0.02f * (float)i; }
    for (int i = 0; i < M * K; i++) x[i] = (float)(i % 11) * 0.3f - 1.4f;
    for (int i = 0; i < M * N; i++) res[i] = (float)(i % 7) * 0.2f - 0.6f;
    int64_t psize = cq_packed_size(CQ_FORMAT_AUTO, N, K, 0);
    int8_t *packed = (int8_t *)malloc((size_t)psize);
    CHECK(packed != NULL, "malloc");
    if (!packed) return;
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, packed), CQ_OK);
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++)
        for (int m = 1; m <= M; m += M - 1) {
            EXPECT_STATUS(cq_linear_ex(mode, x, m, K, packed, s, CQ_PER_CHANNEL, 0, N, b, NULL, 0, 0.0f, y0), CQ_OK);
            EXPECT_STATUS(cq_add_layer_norm_ex(y0, res, rm, m, N, g, b, 1e-5f, y0), CQ_OK);
            EXPECT_STATUS(cq_linear_add_ln(mode, x, m, K, packed, s, CQ_PER_CHANNEL, 0, N, b, NULL, 0, 0.0f, res, rm,
                                           g, b, 1e-5f, y1), CQ_OK);
            CHECK(memcmp(y0, y1, sizeof(float) * (size_t)(m * N)) == 0, "fused add + LayerNorm = the two calls");
        }
    EXPECT_STATUS(cq_linear_add_ln(CQ_MODE_DYNAMIC, x, M, K, packed, s, CQ_PER_CHANNEL, 0, N, NULL, NULL, 0, 0.0f,
                                   NULL, NULL, NULL, NULL, 1e-5f, y1), CQ_ERR_NULL);
    EXPECT_STATUS(cq_linear_add_ln(CQ_MODE_DYNAMIC, x, M, K, packed, s, CQ_PER_CHANNEL, 0, N, NULL, NULL, 0, 0.0f,
                                   res, NULL, NULL, NULL, -1.0f, y1), CQ_ERR_ARG);
    EXPECT_STATUS(cq_linear_add_ln(CQ_MODE_DYNAMIC, x, M, K, packed, s, CQ_PER_CHANNEL, 0, N, NULL, NULL, 0, 0.0f,
                                   y1, NULL, NULL, NULL, 1e-5f, y1), CQ_ERR_ALIAS);
    free(packed);
}

/* cq_isa_error: "" while the selection works; the reason after a CQUANT_ISA that cannot be used
 * (unknown name, or a path this CPU/build lacks) and after a refused cq_set_isa; cleared again by a
 * selection that succeeds. */
static void test_isa_error(void)
{
#ifdef _WIN32
    return;
#else
    int active = cq_get_isa();
    EXPECT_STATUS(cq_set_isa(active), CQ_OK); /* test_bad_arguments made refused selections */
    const char *e = cq_isa_error();
    CHECK(e != NULL && *e == '\0', "no ISA error after a selection that worked");
    const char *old = getenv("CQUANT_ISA");
    char saved[64] = "";
    if (old) snprintf(saved, sizeof saved, "%s", old);

    setenv("CQUANT_ISA", "avx9", 1);
    EXPECT_STATUS(cq_set_isa(CQ_ISA_AUTO), CQ_ERR_ARG);
    e = cq_isa_error();
    CHECK(strstr(e, "CQUANT_ISA='avx9'") != NULL, "the reason names the variable and its value");
    CHECK(strstr(e, "unknown path") != NULL, "the reason says the name is no path");
    CHECK(strstr(e, "avx512vnni") != NULL && strstr(e, "scalar") != NULL, "the reason lists the paths");
    {   /* every kernel now refuses, and the text stays available */
        float f[4] = {0}, sc[1];
        int8_t q[4];
        EXPECT_STATUS(cq_quantize_rows(f, 1, 4, q, sc), CQ_ERR_ISA);
        CHECK(strstr(cq_isa_error(), "avx9") != NULL, "the reason stays until a selection succeeds");
    }
    /* a path that exists but cannot run here (if this machine lacks one) */
    {
        static const int paths[] = {CQ_ISA_AMX, CQ_ISA_AVX512VNNI, CQ_ISA_AVX512, CQ_ISA_AVXVNNI, CQ_ISA_AVX2};
        for (unsigned i = 0; i < sizeof paths / sizeof paths[0]; i++) {
            if (cq_isa_supported(paths[i])) continue;
            setenv("CQUANT_ISA", cq_isa_name(paths[i]), 1);
            EXPECT_STATUS(cq_set_isa(CQ_ISA_AUTO), CQ_ERR_ISA);
            e = cq_isa_error();
            CHECK(strstr(e, cq_isa_name(paths[i])) != NULL && strstr(e, "available here: scalar") != NULL,
                  "the reason names the path and what is available");
            EXPECT_STATUS(cq_set_isa(paths[i]), CQ_ERR_ISA);
            CHECK(strstr(cq_isa_error(), "cq_set_isa(") != NULL, "a refused cq_set_isa is explained too");
            break;
        }
    }
    EXPECT_STATUS(cq_set_isa(99), CQ_ERR_ARG);
    CHECK(strstr(cq_isa_error(), "cq_set_isa(99)") != NULL, "an unknown enum value is explained");
    /* restore: the path in use before */
    if (old) setenv("CQUANT_ISA", saved, 1);
    else unsetenv("CQUANT_ISA");
    EXPECT_STATUS(cq_set_isa(active), CQ_OK);
    CHECK(cq_get_isa() == active && *cq_isa_error() == '\0', "a successful selection clears the reason");
#endif
}

/* Threads of this process from /proc/self/status (Linux), or -1 where that file does not exist. */
static int count_threads(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    int n = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "Threads:", 8) == 0) { n = atoi(line + 8); break; }
    fclose(f);
    return n;
}

static void run_shutdown_checks(float *w, float *x, float *y1, float *y2, float *s, int8_t *q, int8_t *packed);

static void *shutdown_loop(void *arg)
{
    volatile int *stop = (volatile int *)arg;
    while (!__atomic_load_n(stop, __ATOMIC_ACQUIRE)) cq_shutdown();
    return NULL;
}

/* The thread count once it equals want (a joined thread can stay counted by the kernel for a moment
 * after pthread_join returns), polling for up to 2 s; the last count seen otherwise. */
static int threads_settle(int want)
{
    int n = count_threads();
    for (int i = 0; i < 200 && n != want; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        n = count_threads();
    }
    return n;
}

/* The thread count once it stops changing (5 equal readings 10 ms apart, at most 2 s). */
static int threads_stable(void)
{
    int n = count_threads(), same = 0;
    for (int i = 0; i < 200 && same < 5; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        int c = count_threads();
        same = c == n ? same + 1 : 0;
        n = c;
    }
    return n;
}

/* The default thread count, read once at the first use: CQUANT_NUM_THREADS (cq_parse_num_threads's
 * rule), else OMP_NUM_THREADS (as Ray sets it for an actor: its CPUs; the first entry of a list),
 * else the CPUs this process may use. The value is cached, so each case runs in a forked child that
 * has not read it yet (main runs this before anything else asks for the thread count); the child
 * reports the count as its exit status, -1 if the child could not be run. */
static int default_threads_with(const char *cquant_env, const char *omp_env)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        if (cquant_env) setenv("CQUANT_NUM_THREADS", cquant_env, 1);
        else unsetenv("CQUANT_NUM_THREADS");
        if (omp_env) setenv("OMP_NUM_THREADS", omp_env, 1);
        else unsetenv("OMP_NUM_THREADS");
        int n = cq_get_num_threads();
        _exit(n >= 1 && n <= 250 ? n : 255);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
    return WEXITSTATUS(status);
}

static void test_default_threads_env(void)
{
    int cpus = default_threads_with(NULL, NULL); /* neither set: the CPUs it may use */
    CHECK(cpus >= 1 && cpus < 255, "default without either variable: the CPU count");
    CHECK(default_threads_with(NULL, "3") == 3, "OMP_NUM_THREADS=3 (CQUANT_NUM_THREADS unset) -> 3");
    CHECK(default_threads_with(NULL, " 5 ") == 5, "OMP_NUM_THREADS=' 5 ' -> 5");
    CHECK(default_threads_with(NULL, "4,2") == 4, "OMP_NUM_THREADS=4,2 (nested list) -> its first entry");
    CHECK(default_threads_with("2", "3") == 2, "CQUANT_NUM_THREADS wins over OMP_NUM_THREADS");
    CHECK(default_threads_with("x", "3") == 3, "an unusable CQUANT_NUM_THREADS falls back to OMP_NUM_THREADS");
    CHECK(default_threads_with("", "3") == 3, "an empty CQUANT_NUM_THREADS falls back to OMP_NUM_THREADS");
    CHECK(default_threads_with(NULL, "0") == cpus, "OMP_NUM_THREADS=0 is ignored");
    CHECK(default_threads_with(NULL, "abc") == cpus, "OMP_NUM_THREADS=abc is ignored");
    CHECK(default_threads_with(NULL, "") == cpus, "an empty OMP_NUM_THREADS is ignored");
    CHECK(default_threads_with(NULL, "257") == cpus, "OMP_NUM_THREADS past 256 is ignored");
    CHECK(default_threads_with(NULL, ",4") == cpus, "OMP_NUM_THREADS with an empty first entry is ignored");
    CHECK(default_threads_with("x", "y") == cpus, "both unusable: the CPU count");
}

/* cq_shutdown joins the pool's workers; kernels keep working (the pool restarts); twice is fine. */
static void test_shutdown(void)
{
    enum { n = 256, k = 256, m = 64 }; /* 4M multiply-adds: enough for the pool to be used (run_shutdown_checks) */
    int before_threads = cq_get_num_threads();
    float *w = (float *)malloc(sizeof(float) * n * k), *x = (float *)malloc(sizeof(float) * m * k);
    float *y1 = (float *)malloc(sizeof(float) * m * n), *y2 = (float *)malloc(sizeof(float) * m * n);
    float *s = (float *)malloc(sizeof(float) * n);
    int8_t *q = (int8_t *)malloc((size_t)n * k);
    int8_t *packed = (int8_t *)malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
    int ok = w && x && y1 && y2 && s && q && packed;
    CHECK(ok, "malloc");
    if (ok) run_shutdown_checks(w, x, y1, y2, s, q, packed);
    cq_set_num_threads(before_threads);
    free(w); free(x); free(y1); free(y2); free(s); free(q); free(packed);
}

static void run_shutdown_checks(float *w, float *x, float *y1, float *y2, float *s, int8_t *q, int8_t *packed)
{
    enum { n = 256, k = 256, m = 64 };
    for (int i = 0; i < n * k; i++) w[i] = (float)((i * 13) % 17 - 8) / 8.0f;
    for (int i = 0; i < m * k; i++) x[i] = (float)((i * 7) % 11 - 5) / 5.0f;
    EXPECT_STATUS(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, s), CQ_OK);
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed), CQ_OK);
    EXPECT_STATUS(cq_shutdown(), CQ_OK); /* no pool yet, or one from earlier tests */
    EXPECT_STATUS(cq_set_num_threads(3), CQ_OK);
    /* the threads of the process without the pool's (a sanitizer's runtime may start one of its own
     * with the first thread): after a run and a shutdown; -1 where /proc is missing */
    EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y1), CQ_OK);
    EXPECT_STATUS(cq_shutdown(), CQ_OK);
    int base = threads_stable();
    for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
        EXPECT_STATUS(cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y1), CQ_OK);
        int running = count_threads();
        CHECK(base < 0 || running > base, "the pool started worker threads");
        EXPECT_STATUS(cq_shutdown(), CQ_OK);
        CHECK(base < 0 || threads_settle(base) == base, "cq_shutdown joined every worker");
        EXPECT_STATUS(cq_shutdown(), CQ_OK); /* twice */
        CHECK(base < 0 || threads_settle(base) == base, "a second cq_shutdown is a no-op");
        EXPECT_STATUS(cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y2), CQ_OK);
        CHECK(memcmp(y1, y2, sizeof(float) * m * n) == 0, "kernels work (and agree) after cq_shutdown");
        CHECK(base < 0 || count_threads() > base, "the pool restarted lazily");
    }
    EXPECT_STATUS(cq_shutdown(), CQ_OK);
    CHECK(base < 0 || threads_settle(base) == base, "joined again after the restart");

    /* cq_shutdown from another thread while this one runs kernels (make tsan runs this too) */
    {
        pthread_t th;
        volatile int stop = 0;
        int bad = 0;
        CHECK(pthread_create(&th, NULL, shutdown_loop, (void *)&stop) == 0, "pthread_create");
        for (int i = 0; i < 40; i++) {
            int mode = i % 2 ? CQ_MODE_DYNAMIC : CQ_MODE_WEIGHT_ONLY;
            if (cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y2) != CQ_OK) bad++;
            if (mode == CQ_MODE_DYNAMIC && memcmp(y1, y2, sizeof(float) * m * n) != 0) bad++;
        }
        __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
        pthread_join(th, NULL);
        CHECK(bad == 0, "kernels agree while another thread calls cq_shutdown");
        EXPECT_STATUS(cq_shutdown(), CQ_OK);
    }
}

/* cq_use_openmp: refused paths leave the pool; on an OpenMP runtime this program loads (the
 * compiler's libgomp.so.1, where it exists) the kernels agree with the pool's results bit for bit,
 * and a fork()ed child is back on the pool. Not under ThreadSanitizer: libgomp's barrier is not
 * instrumented, so TSan would report the team's writes as races. */
static void test_openmp(void)
{
    enum { n = 256, k = 256, m = 64 }; /* 4M multiply-adds: parallel */
    float *w = (float *)malloc(sizeof(float) * n * k), *x = (float *)malloc(sizeof(float) * m * k);
    float *y1 = (float *)malloc(sizeof(float) * m * n), *y2 = (float *)malloc(sizeof(float) * m * n);
    float *s = (float *)malloc(sizeof(float) * n);
    int8_t *q = (int8_t *)malloc((size_t)n * k);
    int8_t *packed = (int8_t *)malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
    int before_threads = cq_get_num_threads();
    CHECK(w && x && y1 && y2 && s && q && packed, "malloc");
    if (!(w && x && y1 && y2 && s && q && packed)) goto done;
    for (int i = 0; i < n * k; i++) w[i] = (float)((i * 29) % 23 - 11) / 7.0f;
    for (int i = 0; i < m * k; i++) x[i] = (float)((i * 5) % 13 - 6) / 3.0f;
    EXPECT_STATUS(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, s), CQ_OK);
    EXPECT_STATUS(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed), CQ_OK);
    CHECK(cq_using_openmp() == 0, "the internal pool by default");
    EXPECT_STATUS(cq_use_openmp("/nonexistent/libgomp.so.1"), CQ_ERR_ARG);
    EXPECT_STATUS(cq_use_openmp("libc.so.6"), CQ_ERR_ARG); /* loaded, but no GOMP_parallel */
    CHECK(cq_using_openmp() == 0, "a refused runtime leaves the pool");
    EXPECT_STATUS(cq_use_openmp(NULL), CQ_OK);
    EXPECT_STATUS(cq_set_num_threads(3), CQ_OK);
#if !defined(__SANITIZE_THREAD__)
    {
        void *h = dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            printf("  (no libgomp.so.1 here: cq_use_openmp's team not exercised)\n");
            goto done;
        }
        EXPECT_STATUS(cq_use_openmp("libgomp.so.1"), CQ_OK);
        CHECK(cq_using_openmp() == 1, "the OpenMP team in use");
        for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
            EXPECT_STATUS(cq_use_openmp(NULL), CQ_OK);
            EXPECT_STATUS(cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y1), CQ_OK);
            EXPECT_STATUS(cq_use_openmp("libgomp.so.1"), CQ_OK);
            for (int rep = 0; rep < 3; rep++) {
                memset(y2, 0xff, sizeof(float) * m * n);
                EXPECT_STATUS(cq_linear(mode, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y2), CQ_OK);
                CHECK(memcmp(y1, y2, sizeof(float) * m * n) == 0, "the OpenMP team gives the pool's results");
            }
        }
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) { /* the child: back on the pool, kernels work */
            int ok = cq_using_openmp() == 0 &&
                     cq_linear(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y2) == CQ_OK &&
                     memcmp(y1, y2, sizeof(float) * m * n) == 0;
            _exit(ok ? 0 : 1);
        }
        int status = -1;
        CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "a fork()ed child runs on the pool");
        EXPECT_STATUS(cq_use_openmp(NULL), CQ_OK);
        CHECK(cq_using_openmp() == 0, "back on the pool");
        /* the owner lets go of the runtime while its team threads live: cq_use_openmp made it
         * RTLD_NODELETE, so they are not unmapped under them (this crashed under ASan before) */
        dlclose(h);
        EXPECT_STATUS(cq_linear(CQ_MODE_DYNAMIC, x, m, k, packed, s, CQ_PER_CHANNEL, 0, n, NULL, y2), CQ_OK);
        {
            struct timespec ts = {0, 50 * 1000 * 1000}; /* let the idle team threads spin and sleep */
            nanosleep(&ts, NULL);
        }
    }
#endif
done:
    cq_set_num_threads(before_threads);
    free(w); free(x); free(y1); free(y2); free(s); free(q); free(packed);
}

int main(void)
{
    int isa = cq_get_isa();
    if (isa < 0) {
        const char *why = cq_isa_error();
        printf("skipped: %s (%s)\n", why, cq_strerror(isa));
        return *why ? 77 : 1; /* the embedder must be told why */
    }
    printf("test_api (%s) on path %s\n",
#ifdef __cplusplus
           "C++",
#else
           "C99",
#endif
           cq_isa_name(isa));
    test_default_threads_env(); /* first: it needs a process that has not read the thread count */
    test_version_and_strings();
    test_size_overflow();
    test_large_but_valid_sizes();
    test_bad_arguments();
    test_small_run();
    test_linear_alias();
    test_other_alias();
    test_unaligned_packed();
    test_linear_add_ln();
    test_linear_ex();
    test_linear_multi();
    test_isa_error();
    test_shutdown();
    test_openmp();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
