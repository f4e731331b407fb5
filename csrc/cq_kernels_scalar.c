/* cq_kernels_scalar.c - the reference kernels: portable C99, written to be read. Every SIMD path
 * is tested against these (integers exactly, floats within a K-scaled budget). */
#include <math.h>
#include <string.h>
#include "cq_internal.h"

static int absmax_scalar(const float *x, int64_t n, float *amax)
{
    float m = 0.0f;
    int finite = 1;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.402823466e38f)) finite = 0; /* NaN or Inf */
        else if (a > m) m = a;
    }
    *amax = m;
    return finite;
}

/* The numerics contract: the division in float32, round half to even, clamp to [-127, 127]. */
static void quantize_scalar(const float *x, int64_t n, float scale, int8_t *q)
{
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(x[i] / scale);
        if (r > 127.0f) r = 127.0f;
        if (r < -127.0f) r = -127.0f;
        q[i] = (int8_t)r;
    }
}

static void s8_tile_scalar(int mr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                           int32_t *acc, float *facc, const float *ws)
{
    for (int r = 0; r < mr; r++) {
        for (int j = 0; j < CQ_NR; j++) {
            int32_t s = 0;
            for (int64_t t = 0; t < nk4; t++) {
                const int8_t *ap = a + r * lda + 4 * t;
                const int8_t *bp = b + (t * CQ_NR + j) * 4;
                for (int i = 0; i < 4; i++) s += (int32_t)ap[i] * (int32_t)bp[i];
            }
            if (facc) facc[r * CQ_NR + j] += (float)s * ws[j];
            else acc[r * CQ_NR + j] += s;
        }
    }
}

static void s8_gemv4_scalar(int64_t nk4, const int8_t *a, const int8_t *const *panels, int32_t *acc)
{
    for (int p = 0; p < 4; p++) s8_tile_scalar(1, nk4, a, 4 * nk4, panels[p], acc + p * CQ_NR, NULL, NULL);
}

static void f32_gemv4_scalar(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws,
                             float *y)
{
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < CQ_NR; j++) {
            float s = 0.0f;
            for (int64_t t = 0; t < nk4; t++) {
                const int8_t *bp = panels[p] + (t * CQ_NR + j) * 4;
                for (int i = 0; i < 4; i++) s += x[4 * t + i] * (float)bp[i];
            }
            y[p * CQ_NR + j] += ws[p * CQ_NR + j] * s;
        }
}

static void f32_dequant_scalar(int64_t nk4, const int8_t *b, const float *ws, float *out)
{
    for (int64_t t = 0; t < nk4; t++)
        for (int j = 0; j < CQ_NR; j++)
            for (int i = 0; i < 4; i++)
                out[(4 * t + i) * CQ_NR + j] = (float)b[(t * CQ_NR + j) * 4 + i] * ws[j];
}

static void f32_tile_scalar(int mr, int64_t kc, const float *a, int64_t lda, const float *bb, float *c,
                            int64_t ldc)
{
    for (int r = 0; r < mr; r++)
        for (int64_t kk = 0; kk < kc; kk++) {
            float av = a[r * lda + kk];
            for (int j = 0; j < CQ_NR; j++) c[r * ldc + j] += av * bb[kk * CQ_NR + j];
        }
}

/* The reference GELU: libm's erf in double (GELU(-Inf) = 0, where the formula gives -Inf * 0). */
float cq_gelu1(float x)
{
    double v = x;
    if (v == -INFINITY) return 0.0f;
    return (float)(0.5 * v * (1.0 + erf(v * 0.70710678118654752440)));
}

static void gelu_scalar(const float *x, int64_t n, float *y)
{
    for (int64_t i = 0; i < n; i++) y[i] = cq_gelu1(x[i]);
}

static void dequant_scalar(const int8_t *q, int64_t n, float scale, float *out)
{
    for (int64_t i = 0; i < n; i++) out[i] = (float)q[i] * scale;
}

const cq_kernels cq_kernels_scalar = {
    CQ_ISA_SCALAR, absmax_scalar, quantize_scalar, s8_tile_scalar,
    f32_dequant_scalar, f32_tile_scalar, gelu_scalar, dequant_scalar,
    s8_gemv4_scalar, f32_gemv4_scalar,
};
