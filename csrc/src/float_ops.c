/* float_ops.c - the float32 layers around the linear ones: GELU, LayerNorm (optionally fused with
 * the residual add), row softmax (scale + additive mask), multi-head attention. The drivers
 * (checks, threading) and the scalar references live here; the SIMD row kernels live in
 * x86/avx2/float-ops-avx2.c and x86/avx512/float-ops-avx512.c, picked by the active path.
 *
 * Attention scratch (every path): per (batch, head) pair, K^T of the head, kt[d * ldk + j] (dh rows,
 * ldk = seq rounded up to 16, zero past seq), up to 8 rows of scores s[r * ldk + j], then room for
 * the head's V and Q rows packed with stride dhp = dh rounded up to 16 (ldk * dhp floats each):
 * (dh + 8 + 2 dhp) * ldk floats per unit of work. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "target.h"

/* The SIMD row kernels: internal.h. (GELU: the element-wise tables' gelu.) */

/* ---- scalar references ------------------------------------------------------------------------ */
static void softmax_row_ref(float *x, int64_t k, const float *bias, float scale)
{
    float mx = -INFINITY;
    for (int64_t j = 0; j < k; j++) {
        float v = x[j] * scale + (bias ? bias[j] : 0.0f);
        x[j] = v;
        mx = v > mx ? v : mx; /* NaN is skipped here and propagates through the sum */
    }
    double sum = 0.0;
    for (int64_t j = 0; j < k; j++) {
        float e = expf(x[j] - mx);
        x[j] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j < k; j++) x[j] *= inv;
}

void cq_ln_stats_double(const float *x, int64_t k, float *mean, double *var)
{
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < k; i++) sum += (double)x[i];
    const double m = sum / (double)k;
    for (int64_t i = 0; i < k; i++) {
        const double d = (double)x[i] - m;
        sq += d * d;
    }
    *mean = (float)m;
    *var = sq / (double)k;
}

/* Two passes per row (mean, then the centred sum of squares: no cancellation), each with 8
 * independent partial sums so the compiler can vectorize without reassociating a single sum. */
static void add_ln_row_ref(const float *x, const float *res, const float *rmul, int64_t k,
                           const float *gamma, const float *beta, float eps, float *y)
{
    if (res) {
        for (int64_t i = 0; i < k; i++) {
            const float r = rmul ? res[i] * rmul[i] : res[i];
            y[i] = x[i] + r;
        }
        x = y;
    }
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) s[j] += x[i + j];
    double sum = 0.0;
    for (int j = 0; j < 8; j++) sum += s[j];
    for (; i < k; i++) sum += x[i];
    float mean = (float)(sum / (double)k);
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float mean0 = mean;
    for (i = 0; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) { float d = x[i + j] - mean; v[j] += d * d; }
    double var = 0.0;
    for (int j = 0; j < 8; j++) var += v[j];
    for (; i < k; i++) { float d = x[i] - mean; var += (double)d * d; }
    var /= (double)k;
    if (cq_ln_unsafe(mean0, var)) cq_ln_stats_double(x, k, &mean, &var);
    float inv = (float)(1.0 / sqrt(var + (double)eps));
    for (i = 0; i < k; i++) {
        float t = (x[i] - mean) * inv;
        if (gamma) t *= gamma[i];
        if (beta) t += beta[i];
        y[i] = t;
    }
}

static void attn_head_ref(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                          int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch)
{
    const int64_t ldk = (seq + 15) & ~(int64_t)15;
    float *kt = scratch, *s = scratch + dh * ldk;
    for (int64_t j = 0; j < seq; j++)
        for (int64_t d = 0; d < dh; d++) kt[d * ldk + j] = k[j * ld + d];
    for (int64_t i = 0; i < seq; i++) {
        const float *qi = q + i * ld;
        for (int64_t j = 0; j < seq; j++) s[j] = 0.0f;
        for (int64_t d = 0; d < dh; d++) {
            const float a = qi[d], *kd = kt + d * ldk;
            for (int64_t j = 0; j < seq; j++) s[j] += a * kd[j];
        }
        softmax_row_ref(s, seq, bias, scale);
        float *o = out + i * ldo;
        for (int64_t d = 0; d < dh; d++) o[d] = 0.0f;
        for (int64_t j = 0; j < seq; j++) {
            const float p = s[j], *vj = v + j * ld;
            for (int64_t d = 0; d < dh; d++) o[d] += p * vj[d];
        }
    }
}

/* ---- per-path kernels ----------------------------------------------------------------------- */
typedef struct {
    void (*softmax_row)(float *x, int64_t k, const float *bias, float scale);
    void (*add_ln_row)(const float *x, const float *res, const float *rmul, int64_t k, const float *gamma,
                       const float *beta, float eps, float *y);
    void (*attn_head)(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                      int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch);
} fo_kernels;

static const fo_kernels fo_ref = {softmax_row_ref, add_ln_row_ref, attn_head_ref};
#if CQ_CAN_TARGET_AVX2
static const fo_kernels fo_avx2 = {cq_softmax_row_avx2, cq_add_ln_row_avx2, cq_attn_head_avx2};
#endif
#if CQ_CAN_TARGET_AVX512
static const fo_kernels fo_avx512 = {cq_softmax_row_avx512, cq_add_ln_row_avx512, cq_attn_head_avx512};
#endif

static int isa_avx512(int isa) { return isa == CQ_ISA_AVX512 || isa == CQ_ISA_AVX512VNNI || isa == CQ_ISA_AMX; }

/* The float kernels of a path: AVX-512 paths (a build without them never reports them), then any
 * other SIMD path runs AVX2 + FMA (dispatch.c's rule for the element-wise kernels), else scalar. */
static const fo_kernels *fo_for(int isa)
{
#if CQ_CAN_TARGET_AVX512
    if (isa_avx512(isa)) return &fo_avx512;
#endif
#if CQ_CAN_TARGET_AVX2
    if (isa != CQ_ISA_SCALAR && cq_elementwise_for(isa) != &cq_elementwise_ref) return &fo_avx2;
#endif
    (void)isa;
    return &fo_ref;
}

/* ---- GELU --------------------------------------------------------------------------------- */
typedef struct {
    void (*gelu)(const float *x, int64_t n, float *y);
    const float *x;
    float *y;
    int64_t n, chunk;
} ew_ctx;

static void gelu_unit(void *vctx, int64_t u)
{
    ew_ctx *c = (ew_ctx *)vctx;
    int64_t i0 = u * c->chunk, len = c->n - i0 < c->chunk ? c->n - i0 : c->chunk;
    c->gelu(c->x + i0, len, c->y + i0);
}

int cq_gelu(const float *x, int64_t n, float *y)
{
    if (n < 0) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(n, 1, 4)) return CQ_ERR_OVERFLOW;
    if (n == 0) return CQ_OK;
    if (!x || !y) return CQ_ERR_NULL;
    if (y != x && cq_overlap(y, n * 4, x, n * 4)) return CQ_ERR_ALIAS; /* in place, or apart */
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    /* the path's GELU (the element-wise table's: cq_linear_post's CQ_POST_GELU runs the same one,
     * so a fused GELU is bit for bit this pass); flops per element for the thread count, AVX-512's
     * being a table of 16 quartics (no division, no exp) */
    ew_ctx c = {cq_elementwise_for(isa)->gelu, x, y, n, 1 << 14};
    const double per = isa_avx512(isa) ? 8.0 : 30.0;
    int64_t nunits = cq_ceil_div(n, c.chunk);
    cq_parallel_for(nunits, n < 65536 ? 1 : cq_threads_for(per * (double)n, nunits), gelu_unit, &c);
    return CQ_OK;
}

/* ---- LayerNorm (+ residual) ----------------------------------------------------------------- */
typedef struct {
    const fo_kernels *kern;
    const float *x, *res, *rmul, *gamma, *beta;
    float *y;
    int64_t m, k, rows_per_unit;
    float eps;
} ln_ctx;

static void add_ln_rows(const fo_kernels *kern, const float *x, const float *res, const float *rmul, int64_t rows,
                        int64_t k, const float *gamma, const float *beta, float eps, float *y)
{
    for (int64_t r = 0; r < rows; r++)
        kern->add_ln_row(x + r * k, res ? res + r * k : NULL, rmul, k, gamma, beta, eps, y + r * k);
}

static void ln_unit(void *vctx, int64_t u)
{
    ln_ctx *c = (ln_ctx *)vctx;
    int64_t r0 = u * c->rows_per_unit, r1 = r0 + c->rows_per_unit < c->m ? r0 + c->rows_per_unit : c->m;
    add_ln_rows(c->kern, c->x + r0 * c->k, c->res ? c->res + r0 * c->k : NULL, c->rmul, r1 - r0, c->k, c->gamma,
                c->beta, c->eps, c->y + r0 * c->k);
}

void cq_add_ln_rows(int isa, const float *x, const float *res, const float *rmul, int64_t rows, int64_t k,
                    const float *gamma, const float *beta, float eps, float *y)
{
    add_ln_rows(fo_for(isa), x, res, rmul, rows, k, gamma, beta, eps, y);
}

int cq_add_layer_norm_ex(const float *x, const float *residual, const float *residual_mul, int64_t m,
                         int64_t k, const float *gamma, const float *beta, float eps, float *y)
{
    if (m < 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!(eps >= 0.0f)) return CQ_ERR_ARG;
    if (!cq_bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
    if (m == 0) return CQ_OK;
    if (!x || !y || (residual_mul && !residual)) return CQ_ERR_NULL;
    /* every row reads residual_mul, gamma and beta: y (written row by row) must not overlap them;
     * y is x or residual (in place), or apart from both */
    const int64_t yb = m * k * 4;
    if ((residual_mul && cq_overlap(y, yb, residual_mul, k * 4)) || (gamma && cq_overlap(y, yb, gamma, k * 4)) ||
        (beta && cq_overlap(y, yb, beta, k * 4)) || (y != x && cq_overlap(y, yb, x, yb)) ||
        (residual && y != residual && cq_overlap(y, yb, residual, yb)))
        return CQ_ERR_ALIAS;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    ln_ctx c = {fo_for(isa), x, residual, residual_mul, gamma, beta, y, m, k, (16384 / k) + 1, eps};
    int64_t nunits = cq_ceil_div(m, c.rows_per_unit);
    cq_parallel_for(nunits, (double)m * k < 65536 ? 1 : cq_threads_for(8.0 * (double)m * k, nunits), ln_unit, &c);
    return CQ_OK;
}

int cq_add_layer_norm(const float *x, const float *residual, int64_t m, int64_t k, const float *gamma,
                      const float *beta, float eps, float *y)
{
    return cq_add_layer_norm_ex(x, residual, NULL, m, k, gamma, beta, eps, y);
}

int cq_layer_norm(const float *x, int64_t m, int64_t k, const float *gamma, const float *beta,
                  float eps, float *y)
{
    return cq_add_layer_norm(x, NULL, m, k, gamma, beta, eps, y);
}

/* ---- softmax over rows -------------------------------------------------------------------- */
typedef struct {
    const fo_kernels *kern;
    float *x;
    const float *bias;
    int64_t m, k, rows_per_bias, rows_per_unit;
    float scale;
} sm_ctx;

static void sm_unit(void *vctx, int64_t u)
{
    sm_ctx *c = (sm_ctx *)vctx;
    int64_t r0 = u * c->rows_per_unit, r1 = r0 + c->rows_per_unit < c->m ? r0 + c->rows_per_unit : c->m;
    for (int64_t r = r0; r < r1; r++)
        c->kern->softmax_row(c->x + r * c->k, c->k, c->bias ? c->bias + (r / c->rows_per_bias) * c->k : NULL,
                             c->scale);
}

int cq_softmax_rows(float *x, int64_t m, int64_t k, const float *bias, int64_t rows_per_bias, float scale)
{
    if (m < 0 || k <= 0) return CQ_ERR_SHAPE;
    if (bias && rows_per_bias <= 0) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
    if (m == 0) return CQ_OK;
    if (!x) return CQ_ERR_NULL;
    /* the bias rows are read while x is written: they must not be part of x */
    if (bias && cq_overlap(x, m * k * 4, bias, cq_ceil_div(m, rows_per_bias) * k * 4)) return CQ_ERR_ALIAS;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    sm_ctx c = {fo_for(isa), x, bias, m, k, bias ? rows_per_bias : 1, (8192 / k) + 1, scale};
    int64_t nunits = cq_ceil_div(m, c.rows_per_unit);
    cq_parallel_for(nunits, (double)m * k < 32768 ? 1 : cq_threads_for(20.0 * (double)m * k, nunits), sm_unit, &c);
    return CQ_OK;
}

/* ---- multi-head attention ------------------------------------------------------------------- */
typedef struct {
    const fo_kernels *kern;
    const float *q, *k, *v, *bias;
    float *out, *scratch;
    int64_t ld, ldo, seq, heads, dh, pairs, pairs_per_unit, scratch_floats;
    float scale;
} at_ctx;

static void at_unit(void *vctx, int64_t u)
{
    at_ctx *c = (at_ctx *)vctx;
    int64_t p0 = u * c->pairs_per_unit, p1 = p0 + c->pairs_per_unit < c->pairs ? p0 + c->pairs_per_unit : c->pairs;
    float *scratch = c->scratch + u * c->scratch_floats;
    for (int64_t p = p0; p < p1; p++) {
        int64_t b = p / c->heads, h = p % c->heads;
        int64_t row = b * c->seq, col = h * c->dh;
        c->kern->attn_head(c->q + row * c->ld + col, c->k + row * c->ld + col, c->v + row * c->ld + col,
                           c->ld, c->seq, c->dh, c->bias ? c->bias + b * c->seq : NULL, c->scale,
                           c->out + row * c->ldo + col, c->ldo, scratch);
    }
}

int cq_attention(const float *q, const float *k, const float *v, int64_t ld, int64_t batch, int64_t seq,
                 int64_t heads, int64_t head_dim, const float *mask_bias, float scale, float *out, int64_t ldo)
{
    if (batch < 0 || seq < 0 || heads <= 0 || head_dim <= 0) return CQ_ERR_SHAPE;
    int64_t width, rows, pairs;
    if (!cq_mul_ok(heads, head_dim, &width) || !cq_mul_ok(batch, seq, &rows) || !cq_mul_ok(batch, heads, &pairs))
        return CQ_ERR_OVERFLOW;
    if (ld < width || ldo < width) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(rows, ld, 4) || !cq_bytes_ok(rows, ldo, 4)) return CQ_ERR_OVERFLOW;
    if (seq > INT64_MAX - 16) return CQ_ERR_OVERFLOW;
    if (head_dim > INT64_MAX / 4 - 16) return CQ_ERR_OVERFLOW;
    int64_t ldk = (seq + 15) & ~(int64_t)15, dhp = (head_dim + 15) & ~(int64_t)15, per;
    if (!cq_mul_ok(head_dim + 8 + 2 * dhp, ldk, &per) || !cq_bytes_ok(per, 1024, 4)) return CQ_ERR_OVERFLOW; /* <= 4 units per thread */
    if (rows == 0) return CQ_OK;
    if (!q || !k || !v || !out) return CQ_ERR_NULL;
    { /* out is written while other units still read q, k, v and the mask: no overlap with any */
        const int64_t in_b = ((rows - 1) * ld + width) * 4, out_b = ((rows - 1) * ldo + width) * 4;
        if (cq_overlap(out, out_b, q, in_b) || cq_overlap(out, out_b, k, in_b) || cq_overlap(out, out_b, v, in_b) ||
            (mask_bias && cq_overlap(out, out_b, mask_bias, rows * 4)))
            return CQ_ERR_ALIAS;
    }
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    double work = 4.0 * (double)pairs * (double)seq * (double)seq * (double)head_dim;
    int threads = work < 2.0e5 ? 1 : cq_threads_for(work, pairs);
    int64_t nunits = threads == 1 ? 1 : (pairs < 4 * (int64_t)threads ? pairs : 4 * (int64_t)threads);
    at_ctx c = {fo_for(isa), q, k, v, mask_bias, out, NULL, ld, ldo, seq, heads, head_dim, pairs,
                cq_ceil_div(pairs, nunits), per, scale};
    nunits = cq_ceil_div(pairs, c.pairs_per_unit);
    c.scratch = (float *)malloc((size_t)(per * nunits) * sizeof(float));
    if (!c.scratch) return CQ_ERR_NOMEM;
    cq_parallel_for(nunits, threads, at_unit, &c);
    free(c.scratch);
    return CQ_OK;
}
