/* ref-kernels.c - the scalar references: portable C99, written to be read. They define the
 * results (every SIMD micro-kernel is tested against them: integers exactly, floats within a
 * K-scaled budget) and are the fallback that runs any packed format (any nr) on any CPU. */
#include <math.h>
#include <string.h>
#include "internal.h"

static int absmax_ref(const float *x, int64_t n, float *amax)
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
static void quantize_ref(const float *x, int64_t n, float scale, int8_t *q, int flip)
{
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(x[i] / scale);
        if (r > 127.0f) r = 127.0f;
        if (r < -127.0f) r = -127.0f;
        q[i] = (int8_t)((uint8_t)(int8_t)r ^ (uint8_t)flip);
    }
}

static void qd8_gemm_any(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                         const cq_qd8_out *o, int u8)
{
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) {
            uint32_t v = 0; /* modulo 2^32, as the SIMD kernels */
            for (int64_t t = 0; t < nk4; t++) {
                const int8_t *ap = a + r * lda + 4 * t;
                const int8_t *bp = b + (t * nr + j) * 4;
                for (int i = 0; i < 4; i++) {
                    int32_t av = u8 ? (int32_t)(uint8_t)ap[i] : (int32_t)ap[i];
                    v += (uint32_t)(av * (int32_t)bp[i]);
                }
            }
            if (o->acc_in) v += (uint32_t)o->acc[r * nr + j];
            if (o->mode == CQ_OUT_I32) { o->acc[r * nr + j] = (int32_t)v; continue; }
            if (o->comp) v -= (uint32_t)o->comp[j];
            float f = (float)(int32_t)v;
            if (o->mode == CQ_OUT_FACC) o->facc[r * nr + j] = fmaf(f, cq_scale_product(o->sx[r], o->sw[j]), o->facc[r * nr + j]); /* as the SIMD epilogues */
            else if (j < o->nc) o->y[r * o->ldy + j] = f * cq_scale_product(o->sx[r], o->sw[j]) + (o->bias ? o->bias[j] : 0.0f);
        }
}

void cq_ref_qd8_gemm(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                     const cq_qd8_out *o)
{
    qd8_gemm_any(mr, nr, nk4, a, lda, b, o, 0);
}

void cq_ref_qd8_gemm_u8(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                        const cq_qd8_out *o)
{
    qd8_gemm_any(mr, nr, nk4, a, lda, b, o, 1);
}

void cq_ref_qd8_gemv4(int nr, int64_t nk4, const int8_t *a, const int8_t *const *panels,
                          int64_t panel_stride, int32_t *acc)
{
    (void)panel_stride;
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < nr; j++) {
            int32_t s = 0;
            for (int64_t t = 0; t < nk4; t++)
                for (int i = 0; i < 4; i++) s += (int32_t)a[4 * t + i] * (int32_t)panels[p][(t * nr + j) * 4 + i];
            acc[p * nr + j] = s;
        }
}

void cq_ref_f32_dequant(int nr, int64_t nk4, const int8_t *b, const float *ws, float *out)
{
    for (int64_t t = 0; t < nk4; t++)
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < 4; i++)
                out[(4 * t + i) * nr + j] = (float)b[(t * nr + j) * 4 + i] * ws[j];
}

void cq_ref_f32_gemm(int mr, int nr, int64_t kc, const float *a, int64_t lda, const float *bb,
                         float *c, int64_t ldc)
{
    for (int r = 0; r < mr; r++)
        for (int64_t kk = 0; kk < kc; kk++) {
            float av = a[r * lda + kk];
            for (int j = 0; j < nr; j++) c[r * ldc + j] += av * bb[kk * nr + j];
        }
}

void cq_ref_f32_gemv4(int mr, int nr, int64_t nk4, const float *x, int64_t ldx,
                      const int8_t *const *panels, const float *ws, float *y, int64_t ldy)
{
    for (int r = 0; r < mr; r++)
        for (int p = 0; p < 4; p++)
            for (int j = 0; j < nr; j++) {
                float s = 0.0f;
                for (int64_t t = 0; t < nk4; t++) {
                    const int8_t *bp = panels[p] + (t * nr + j) * 4;
                    for (int i = 0; i < 4; i++) s = fmaf(x[r * ldx + 4 * t + i], (float)bp[i], s);
                }
                y[r * ldy + p * nr + j] = fmaf(s, ws[p * nr + j], y[r * ldy + p * nr + j]); /* as the SIMD GEMVs */
            }
}

void cq_ref_f32_i4_gemv4(int nr, int64_t nk8, const float *x, const int8_t *const *panels, int64_t step,
                         const float *ws, float *y)
{
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < nr; j++) {
            float s = 0.0f;
            for (int64_t t = 0; t < nk8; t++)
                for (int kk = 0; kk < 8; kk++) {
                    unsigned v = (uint8_t)panels[p][t * step + 4 * j + (kk & 3)];
                    int q = (int)(((kk < 4 ? v : v >> 4) & 15u) ^ 8u) - 8;
                    s += x[8 * t + kk] * (float)q;
                }
            y[p * nr + j] += ws[p * nr + j] * s;
        }
}

/* Weight-only int4 GEMV with x as 24-bit fixed point digits (cq_x24_i4_gemv4_fn): the exact
 * digit sums, then the float epilogue in the order every x24 kernel uses. */
void cq_ref_x24_i4_gemv4(int nr, int64_t nk8, const int8_t *xd, int64_t xds, const int32_t *comp, float xs,
                         const int8_t *const *panels, int64_t step, const float *ws, float *y)
{
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < nr; j++) {
            int64_t a[3] = {0, 0, 0};
            for (int64_t t = 0; t < nk8; t++)
                for (int kk = 0; kk < 8; kk++) {
                    unsigned v = (uint8_t)panels[p][t * step + 4 * j + (kk & 3)];
                    int q8 = (int)(((kk < 4 ? v : v >> 4) & 15u) ^ 8u); /* code + 8 */
                    for (int d = 0; d < 3; d++) a[d] += (int64_t)q8 * xd[d * xds + 8 * t + kk];
                }
            float f = fmaf(fmaf((float)(int32_t)(a[2] - comp[2]), 256.0f, (float)(int32_t)(a[1] - comp[1])), 256.0f,
                           (float)(int32_t)(a[0] - comp[0]));
            y[p * nr + j] = fmaf(f * xs, ws[p * nr + j], y[p * nr + j]);
        }
}

/* The reference GELU: libm's erf in double (GELU(-Inf) = 0, where the formula gives -Inf * 0). */
float cq_gelu1(float x)
{
    double v = x;
    if (v == -INFINITY) return 0.0f;
    return (float)(0.5 * v * (1.0 + erf(v * 0.70710678118654752440)));
}

static void gelu_ref(const float *x, int64_t n, float *y)
{
    for (int64_t i = 0; i < n; i++) y[i] = cq_gelu1(x[i]);
}

static void dequant_ref(const int8_t *q, int64_t n, float scale, float *out)
{
    for (int64_t i = 0; i < n; i++) out[i] = (float)q[i] * scale;
}

static void facc_fold_ref(int n, const int32_t *acc, const int32_t *comp, float sx, const float *ws, float *facc)
{
    for (int j = 0; j < n; j++) {
        float f = (float)(int32_t)((uint32_t)acc[j] - (comp ? (uint32_t)comp[j] : 0u));
        facc[j] = fmaf(f, cq_scale_product(sx, ws[j]), facc[j]);
    }
}

static int absmax_mul_ref(const float *x, const float *mul, int64_t n, float *prod, float *amax)
{
    float m = 0.0f;
    int finite = 1;
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i] * mul[i];
        if (prod) prod[i] = v;
        const float a = fabsf(v);
        if (!(a <= 3.402823466e38f)) finite = 0;
        else if (a > m) m = a;
    }
    *amax = m;
    return finite;
}

/* quantize_ref of the float32 products x[i] * mul[i] (formed again, not read from memory) */
static void quantize_mul_ref(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip)
{
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf((x[i] * mul[i]) / scale);
        if (r > 127.0f) r = 127.0f;
        if (r < -127.0f) r = -127.0f;
        q[i] = (int8_t)((uint8_t)(int8_t)r ^ (uint8_t)flip);
    }
}

/* The rotation of cq_linear_ex's x_hadamard, the order of operations that defines it: v = x (or the
 * float32 products x[i] * mul[i]), then for h = 1, 2, 4, ..., b / 2 in turn, every pair (i, i + h)
 * with i % (2 h) < h becomes (v[i] + v[i + h], v[i] - v[i + h]) (float32 additions): the unnormalised
 * Walsh-Hadamard transform of each block of b consecutive values. Every path does these additions in
 * this order, so the result is bit-identical everywhere. */
static int hadamard_absmax_ref(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax)
{
    for (int64_t i = 0; i < n; i++) out[i] = mul ? x[i] * mul[i] : x[i];
    for (int64_t h = 1; h < b; h *= 2)
        for (int64_t i0 = 0; i0 < n; i0 += 2 * h)
            for (int64_t i = i0; i < i0 + h; i++) {
                const float a = out[i], c = out[i + h];
                out[i] = a + c;
                out[i + h] = a - c;
            }
    return absmax_ref(out, n, amax);
}

void cq_transpose_ref(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd)
{
    for (int64_t r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
}

/* The pair-safe preparation of a block (cq_elementwise.ps_block), pair by pair. */
static int64_t ps_block_ref(int8_t *x, int64_t n, int64_t base, int64_t room, int32_t *ent, int32_t *sum)
{
    *sum = 0;
    return cq_ps_block_pairs(x, 0, n, base, room, ent, 0, sum);
}

const cq_elementwise cq_elementwise_ref = {CQ_ISA_SCALAR, absmax_ref, quantize_ref, gelu_ref, dequant_ref,
                                           facc_fold_ref, absmax_mul_ref, hadamard_absmax_ref, quantize_mul_ref,
                                           cq_transpose_ref, ps_block_ref};
