/* quantize_and_run.c - using cquant from C: quantize a float weight, pack it, run one linear layer
 * in both modes (weight_only and dynamic) and check the results against a float reference.
 *
 * Build against an installed cquant (make install PREFIX=...):
 *     cc -std=c99 quantize_and_run.c $(pkg-config --cflags --libs cquant) -o quantize_and_run
 * or statically against the build tree (make lib):
 *     cc -std=c99 -Icsrc/include quantize_and_run.c build/lib/libcquant.a -lm -lpthread -ldl
 *
 * CQUANT_ISA=scalar|avx2|avx512vnni forces a kernel path (exit status 77 if this CPU or build
 * lacks it); CQUANT_NUM_THREADS sets the thread count. Exit status 0 when every check passes. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cquant.h"

#define M 5    /* rows of activations (a small batch) */
#define K 300  /* in_features: not a multiple of the vector width, on purpose */
#define N 37   /* out_features: not a multiple of the 16-row panel */

/* Stop with a message if a cquant call failed: every function returns an int status. */
#define CQ_TRY(call)                                                                       \
    do {                                                                                   \
        int st_ = (call);                                                                  \
        if (st_ != CQ_OK) {                                                                \
            fprintf(stderr, "%s failed: %s (%d)\n", #call, cq_strerror(st_), st_);         \
            return 1;                                                                      \
        }                                                                                  \
    } while (0)

/* A deterministic pseudo-random float in [-1, 1). */
static float next_float(uint32_t *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffffff) / 8388608.0f - 1.0f;
}

/* Largest |a - b| over rows x cols, and the largest |b| (for a relative error). */
static double max_abs_diff(const float *a, const double *b, int count, double *bmax)
{
    double d = 0.0, m = 0.0;
    for (int i = 0; i < count; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e; /* also catches NaN */
        if (fabs(b[i]) > m) m = fabs(b[i]);
    }
    *bmax = m;
    return d;
}

int main(void)
{
    /* The header and the library must agree (a program built against one version and run
     * against another shared library would see a different string here). */
    if (cq_version()[0] != CQ_VERSION_STRING[0]) {
        fprintf(stderr, "header %s but library %s\n", CQ_VERSION_STRING, cq_version());
        return 1;
    }
    int isa = cq_get_isa();
    if (isa < 0) { /* CQUANT_ISA names a path this CPU or build lacks */
        fprintf(stderr, "kernel path unavailable: %s\n", cq_strerror(isa));
        return 77;
    }
    printf("cquant %s, kernel path %s, %d thread(s)\n", cq_version(), cq_isa_name(isa), cq_get_num_threads());

    static float w[N * K], x[M * K], bias[N], y[M * N];
    static double ref_float[M * N], ref_wo[M * N], ref_dyn[M * N];
    uint32_t rng = 12345u;
    for (int i = 0; i < N * K; i++) w[i] = 0.05f * next_float(&rng);
    for (int i = 0; i < M * K; i++) x[i] = next_float(&rng);
    for (int i = 0; i < N; i++) bias[i] = 0.1f * next_float(&rng);

    /* 1. Quantize per output channel: int8 codes q (N, K) and N float scales. */
    int64_t nscales = cq_num_scales(CQ_PER_CHANNEL, N, K, 0);
    if (nscales < 0) { fprintf(stderr, "cq_num_scales: %s\n", cq_strerror((int)nscales)); return 1; }
    int8_t *q = malloc(N * K);
    float *scales = malloc(sizeof(float) * (size_t)nscales);
    /* 2. Pack the codes once into the layout the kernels read (the same on every ISA path). */
    int64_t psize = cq_packed_size(CQ_FORMAT_AUTO, N, K, 0);
    int8_t *packed = psize > 0 ? malloc((size_t)psize) : NULL;
    if (!q || !scales || !packed) { fprintf(stderr, "out of memory\n"); return 1; }
    CQ_TRY(cq_quantize(w, N, K, CQ_PER_CHANNEL, 0, q, scales));
    CQ_TRY(cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, packed));

    /* References in double: the float layer, and the two quantized computations. */
    float *sx = malloc(sizeof(float) * M);
    int8_t *qx = malloc(M * K);
    if (!sx || !qx) { fprintf(stderr, "out of memory\n"); return 1; }
    CQ_TRY(cq_quantize_rows(x, M, K, qx, sx)); /* what the dynamic mode does to x */
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double f = bias[n], wo = bias[n];
            int64_t acc = 0;
            for (int k = 0; k < K; k++) {
                f += (double)x[m * K + k] * w[n * K + k];
                wo += (double)x[m * K + k] * ((double)q[n * K + k] * scales[n]);
                acc += (int64_t)qx[m * K + k] * q[n * K + k];
            }
            ref_float[m * N + n] = f;
            ref_wo[m * N + n] = wo;
            ref_dyn[m * N + n] = (double)acc * scales[n] * sx[m] + bias[n];
        }

    /* 3. Run the layer in both modes and compare. */
    int failed = 0;
    const struct { int mode; const char *name; const double *exact; double budget; } runs[] = {
        /* float32 accumulation of K terms: a few ulp per term at most */
        {CQ_MODE_WEIGHT_ONLY, "weight_only", ref_wo, 1e-5},
        /* exact integer sums, then two float32 multiplies and an add */
        {CQ_MODE_DYNAMIC, "dynamic", ref_dyn, 1e-5},
    };
    for (int r = 0; r < 2; r++) {
        CQ_TRY(cq_linear(runs[r].mode, x, M, K, packed, scales, CQ_PER_CHANNEL, 0, N, bias, y));
        double scale_ref, scale_q;
        double err_q = max_abs_diff(y, runs[r].exact, M * N, &scale_q);
        double err_f = max_abs_diff(y, ref_float, M * N, &scale_ref);
        /* vs the same quantized computation in double: float32 rounding only */
        int ok_q = err_q <= runs[r].budget * (scale_q + 1.0);
        /* vs the float layer: int8 quantization error, a few percent of the output range */
        int ok_f = err_f <= 0.05 * scale_ref;
        printf("  %-11s ran %s\n", runs[r].name, cq_last_kernel());
        printf("  %-11s max|y - quantized ref| = %.3g (%s), max|y - float ref| = %.3g of %.3g (%s)\n",
               runs[r].name, err_q, ok_q ? "ok" : "FAIL", err_f, scale_ref, ok_f ? "ok" : "FAIL");
        failed += !ok_q + !ok_f;
    }
    free(q); free(scales); free(packed); free(sx); free(qx);
    printf("%s\n", failed ? "FAILED" : "all checks passed");
    return failed ? 1 : 0;
}
