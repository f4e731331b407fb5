/* quantize.c - weight and activation quantization drivers (rows in parallel) over the element-wise
 * kernels of the active path, and dequantization. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

/* ---- quantization ----------------------------------------------------------------------------- */
typedef struct {
    const cq_elementwise *kern;
    const float *w;
    int64_t n, k, group, ng;
    int8_t *q;
    float *scales;
    int activations;   /* rows of x: non-finite rows get NaN scale instead of an error */
    int flip;          /* 0x80: store u8 codes (q + 128) */
    int bad;           /* set when a weight is non-finite (atomic) */
    int64_t rows_per_unit;
    int64_t ldq;       /* row stride of q (>= k); columns [k, ldq) are zeroed */
    int tiled;         /* activations in 16-row x 64-byte tiles (cq_ukernel.a_tiled; ldq % 64 == 0) */
    float qmax;        /* 127 (int8) or 7 (int4 weights): scale = max|w| / qmax; 0 means 127 */
    const float *mul;  /* activations: x[r][i] * mul[i] (rounded to float32) is what is quantized */
    float fixed;       /* activations: > 0: this scale for every row (static), codes clamped */
    int64_t had;       /* activations: > 0: the row (times mul) rotated in Hadamard blocks of had */
    cq_ps_rows *ps;    /* activations: each row's pair-safe preparation right after its codes */
} quant_ctx;

static float scale_of_q(float amax, float qmax)
{
    float s = amax / qmax;
    return s > 0.0f ? s : 1.0f; /* all-zero slice (or one whose scale underflows to 0) */
}
static float scale_of(float amax) { return scale_of_q(amax, 127.0f); }

/* One row of activations (scale s, or NaN: codes 0) written straight into the tiled layout of
 * cq_ukernel.a_tiled: the block of 16 rows holding row r starts at (r / 16) * 16 * ldq, and its
 * k bytes [64 j, 64 j + 64) are row r % 16 of the 1 KiB tile at + 1024 j. Quantized 1024 codes at a
 * time into a stack buffer, then scattered 64 bytes at a time. */
static void quant_row_tiled(const quant_ctx *c, int64_t r, const float *src, const float *mul, float s,
                            int finite)
{
    int8_t tmp[1024];
    int8_t *blk = c->q + (r / 16) * 16 * c->ldq + (r % 16) * 64;
    for (int64_t i0 = 0; i0 < c->ldq; i0 += 1024) {
        int64_t len = finite && c->k > i0 ? (c->k - i0 < 1024 ? c->k - i0 : 1024) : 0;
        if (len && mul) c->kern->quantize_mul(src + i0, mul + i0, len, s, tmp, c->flip);
        else if (len) c->kern->quantize(src + i0, len, s, tmp, c->flip);
        memset(tmp + len, c->flip, (size_t)(1024 - len));
        int64_t chunks = (c->ldq - i0 < 1024 ? c->ldq - i0 : 1024) / 64;
        for (int64_t j = 0; j < chunks; j++) memcpy(blk + (i0 / 64 + j) * 1024, tmp + 64 * j, 64);
    }
}

/* One row of activations (one scale group), pre-scaled by c->mul, rotated (c->had) and/or with the
 * fixed (static) scale c->fixed; buf: k floats for the rotated row (when c->had). */
static void quant_act_row(const quant_ctx *c, int64_t r, float *buf)
{
    const float *src = c->w + r * c->k, *mul = NULL;
    float amax;
    int finite;
    if (c->had) { /* (x * mul) rotated in blocks (into buf, one pass in registers), then the usual rule */
        finite = c->kern->hadamard_absmax(src, c->mul, c->k, c->had, buf, &amax);
        src = buf;
    } else if (c->mul) { /* the product rounded to float32, as numpy's x * mul, then the usual rule:
                          * formed in registers in both passes (not stored: measured 3-7% of a
                          * MiniLM-shaped call, M = 1024, for the store and reload of the row) */
        finite = c->kern->absmax_mul(src, c->mul, c->k, NULL, &amax);
        mul = c->mul;
    } else {
        finite = c->kern->absmax(src, c->k, &amax); /* also for a static scale: NaN/Inf rows */
    }
    float s = !finite ? NAN : c->fixed > 0.0f ? c->fixed : scale_of(amax);
    c->scales[r] = s;
    if (c->tiled) {
        quant_row_tiled(c, r, src, mul, s, finite);
        return;
    }
    int8_t *dst = c->q + r * c->ldq;
    if (c->ldq > c->k) memset(dst + c->k, c->flip, (size_t)(c->ldq - c->k));
    if (finite && mul)
        c->kern->quantize_mul(src, mul, c->k, s, dst, c->flip);
    else if (finite)
        c->kern->quantize(src, c->k, s, dst, c->flip);
    else
        memset(dst, c->flip, (size_t)c->k);
    if (c->ps) { /* the row's codes are in L1: prepared here, on this pass's threads */
        cq_ps_rows *p = c->ps;
        p->row[r] = r * p->cap;
        int64_t e = cq_ps_prepare_row(c->kern, dst, c->ldq / 4, p->kc4, p->cap, p->sum + r * p->ld,
                                      p->cnt + r * p->ld, p->ent + CQ_PS_ENT * r * p->cap);
        if (e < 0) __atomic_store_n(&p->over, 1, __ATOMIC_RELAXED);
        else if (e) __atomic_fetch_add(&p->total, e, __ATOMIC_RELAXED);
    }
}

static void quant_unit(void *vctx, int64_t u)
{
    quant_ctx *c = (quant_ctx *)vctx;
    int64_t r0 = u * c->rows_per_unit, r1 = r0 + c->rows_per_unit;
    if (r1 > c->n) r1 = c->n;
    if (c->activations) {
        float stackbuf[2048], *buf = stackbuf;
        if (c->had && c->k > 2048) {
            buf = (float *)malloc((size_t)c->k * sizeof(float));
            if (!buf) { __atomic_store_n(&c->bad, 2, __ATOMIC_RELAXED); return; }
        }
        for (int64_t r = r0; r < r1; r++) quant_act_row(c, r, buf);
        if (buf != stackbuf) free(buf);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        if (c->ldq > c->k) memset(c->q + r * c->ldq + c->k, c->flip, (size_t)(c->ldq - c->k));
        for (int64_t g = 0; g < c->ng; g++) {
            const float *src = c->w + r * c->k + g * c->group;
            int8_t *dst = c->q + r * c->ldq + g * c->group;
            float amax;
            if (!c->kern->absmax(src, c->group, &amax)) {
                __atomic_store_n(&c->bad, 1, __ATOMIC_RELAXED);
                return;
            }
            float s = scale_of_q(amax, c->qmax > 0.0f ? c->qmax : 127.0f);
            c->scales[r * c->ng + g] = s;
            c->kern->quantize(src, c->group, s, dst, c->flip);
        }
    }
}

/* Rows are quantized in parallel from 1e5 floats of work (a rotated row counts twice). Measured
 * (Sapphire Rapids-class Xeon, 2 threads, dynamic (N, K) M, median us, quantizer threshold 1e6 ->
 * 1e5): (384, 384) M = 640 301 -> 188, M = 320 148 -> 109, M = 160 59 -> 62 (one thread below 1e5:
 * 61k floats); (384, 1536) M = 640 713 -> 532, M = 160 228 -> 132; (1536, 384) M = 640 671 -> 611.
 * (Measured while the code pass still divided every value; it is cheaper now, see the element-wise
 * kernels, but still long enough to split.) 5e4 was no better (61k floats: 62 -> 66 us). */
#ifndef QUANT_PAR_WORK
#define QUANT_PAR_WORK 1.0e5
#endif
static void quantize_rows_parallel(quant_ctx *c)
{
    /* the rotation's stages cost about as much as the quantization itself: count them as work */
    double work = (double)c->n * (double)c->k * (c->had ? 2.0 : 1.0);
    int64_t rpu = (int64_t)(65536 / c->k) + 1;
    c->rows_per_unit = rpu;
    int64_t nunits = cq_ceil_div(c->n, rpu);
    int t = cq_get_num_threads();
    if (t > nunits) t = (int)nunits;
    cq_parallel_for(nunits, work < QUANT_PAR_WORK || t < 1 ? 1 : t, quant_unit, c);
}

typedef struct {
    const cq_elementwise *kern;
    const float *w;
    int64_t total, chunk;
    float scale;
    int8_t *q;
} flat_ctx;

static void flat_quant_unit(void *vctx, int64_t u)
{
    flat_ctx *c = (flat_ctx *)vctx;
    int64_t i0 = u * c->chunk, len = c->total - i0 < c->chunk ? c->total - i0 : c->chunk;
    c->kern->quantize(c->w + i0, len, c->scale, c->q + i0, 0);
}

int cq_quantize(const float *w, int64_t n, int64_t k, int scheme, int64_t group_size, int8_t *q,
                float *scales)
{
    return cq_quantize_bits(8, w, n, k, scheme, group_size, q, scales);
}

int cq_quantize_bits(int bits, const float *w, int64_t n, int64_t k, int scheme, int64_t group_size,
                     int8_t *q, float *scales)
{
    if (bits != 8 && bits != 4) return CQ_ERR_ARG;
    const float qmax = bits == 8 ? 127.0f : 7.0f; /* |w / scale| <= 7 (+ rounding): codes in [-7, 7] */
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    if (!w || !q || !scales) return CQ_ERR_NULL;
    if (!cq_bytes_ok(n, k, 4)) return CQ_ERR_OVERFLOW;
    if (cq_overlap(q, n * k, w, n * k * 4) || cq_overlap(scales, ns * 4, w, n * k * 4) ||
        cq_overlap(scales, ns * 4, q, n * k))
        return CQ_ERR_ALIAS;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    const cq_elementwise *kern = cq_elementwise_for(isa);
    if (scheme == CQ_PER_TENSOR) {
        float amax;
        if (!kern->absmax(w, n * k, &amax)) return CQ_ERR_NONFINITE;
        flat_ctx c = {kern, w, n * k, 1 << 16, scale_of_q(amax, qmax), q};
        int64_t nunits = cq_ceil_div(n * k, c.chunk);
        scales[0] = c.scale;
        cq_parallel_for(nunits, n * k < 1000000 ? 1 : cq_threads_for((double)n * k, nunits), flat_quant_unit, &c);
        return CQ_OK;
    }
    quant_ctx c = {kern, w, n, k, scheme == CQ_PER_GROUP ? group_size : k,
                   scheme == CQ_PER_GROUP ? k / group_size : 1, q, scales, 0, 0, 0, 0, k, 0, qmax,
                   NULL, 0.0f, 0, NULL};
    quantize_rows_parallel(&c);
    return c.bad ? CQ_ERR_NONFINITE : CQ_OK;
}

int cq_quantize_rows_into(const cq_elementwise *kern, const float *x, int64_t m, int64_t k, int64_t ldq,
                          int flip, int tiled, int8_t *q, float *scales, const float *mul, float fixed,
                          int64_t had, cq_ps_rows *ps)
{
    if (ps) { ps->total = 0; ps->over = 0; }
    quant_ctx c = {kern, x, m, k, k, 1, q, scales, 1, flip, 0, 0, ldq, tiled, 127.0f, mul, fixed, had, ps};
    quantize_rows_parallel(&c);
    return c.bad ? CQ_ERR_NOMEM : CQ_OK;
}

static int quantize_rows_api(const float *x, int64_t m, int64_t k, int8_t *q, float *scales, int flip)
{
    if (m <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
    if (!x || !q || !scales) return CQ_ERR_NULL;
    if (cq_overlap(q, m * k, x, m * k * 4) || cq_overlap(scales, m * 4, x, m * k * 4) || cq_overlap(scales, m * 4, q, m * k))
        return CQ_ERR_ALIAS;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    return cq_quantize_rows_into(cq_elementwise_for(isa), x, m, k, k, flip, 0, q, scales, NULL, 0.0f, 0, NULL);
}

int cq_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scales)
{
    return quantize_rows_api(x, m, k, q, scales, 0);
}

int cq_quantize_rows_u8(const float *x, int64_t m, int64_t k, uint8_t *q, float *scales)
{
    return quantize_rows_api(x, m, k, (int8_t *)q, scales, 0x80);
}

int cq_dequantize(const int8_t *q, const float *scales, int64_t n, int64_t k, int scheme,
                  int64_t group_size, float *out)
{
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    if (!q || !scales || !out) return CQ_ERR_NULL;
    if (!cq_bytes_ok(n, k, 4)) return CQ_ERR_OVERFLOW;
    if (cq_overlap(out, n * k * 4, q, n * k) || cq_overlap(out, n * k * 4, scales, ns * 4)) return CQ_ERR_ALIAS;
    for (int64_t i = 0; i < n * k; i++) /* refused before anything is written, as every reader of codes does */
        if (q[i] == -128) return CQ_ERR_RANGE;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    const cq_elementwise *kern = cq_elementwise_for(isa);
    int64_t g = scheme == CQ_PER_GROUP ? group_size : k, ng = k / g;
    for (int64_t r = 0; r < n; r++)
        for (int64_t gi = 0; gi < ng; gi++)
            kern->dequant(q + r * k + gi * g, g, scheme == CQ_PER_TENSOR ? scales[0] : scales[r * ng + gi],
                          out + r * k + gi * g);
    return CQ_OK;
}


/* Pair-safe activations (internal.h). vpmaddubsw's pair sum (w_a + 128) a + (w_b + 128) b, with
 * weight codes in [-127, 127] (u8 operands 1..255), cannot saturate when a and b have opposite
 * signs (at most 255 * 127 - 1 in magnitude) or when |a| + |b| <= 128 (at most 255 * 128 =
 * 32640). So only pairs of the same sign with |a| + |b| > 128 are changed. */
int64_t cq_ps_prepare_row(const cq_elementwise *kern, int8_t *x, int64_t kp4, int64_t kc4, int64_t cap,
                          int32_t *bs, int32_t *bc, int32_t *ent)
{
    const int64_t nb = (kp4 + kc4 - 1) / kc4;
    int64_t e = 0;
    int32_t s = 0;
    for (int64_t b = 0; b < nb; b++) {
        bs[b] = s;
        bc[b] = (int32_t)e;
        const int64_t i0 = 4 * b * kc4, i1 = 4 * ((b + 1) * kc4 < kp4 ? (b + 1) * kc4 : kp4);
        int32_t bsum;
        const int64_t n = kern->ps_block(x + i0, i1 - i0, i0, cap - e, ent + CQ_PS_ENT * e, &bsum);
        if (n < 0) { /* too many: the row as it was */
            cq_ps_restore(x, 0, ent, e);
            bc[nb] = 0;
            return -1;
        }
        e += n;
        s += bsum;
    }
    bs[nb] = s;
    bc[nb] = (int32_t)e;
    return e;
}
