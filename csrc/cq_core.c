/* cq_core.c - public entry points: argument checks, blocking and threading around the per-ISA
 * micro-kernels (cq_internal.h). Nothing here depends on the ISA: the table is read once per call,
 * so a call finishes on the path it started with even if another thread forces a new one.
 *
 * Blocking (why these numbers): output rows are processed in panels of 16 (the packed layout);
 * a unit of parallel work is a panel (or a group of panels) times a block of activation rows, so
 * every output element is computed by exactly one thread with the same loop order whatever the
 * thread count (results are bit-identical for 1..N threads).
 * - dynamic / gemm_s8s8s32: k is swept in blocks of S8_KC4 steps (16 KiB of a panel, L1-resident)
 *   by every 4-row tile of a block of S8_MB rows; int32 sums are exact per chunk of <= 131072 k.
 * - weight-only, M >= 4: WO_KC=256 rows of k of a panel are dequantized (16 KiB of float32, L1) and
 *   reused by 6x16 float tiles over up to WO_MB=96 rows of x, whose k block (96 KiB) stays in L2
 *   across a group of WO_PG=8 panels.
 * - weight-only, M < 4: the int8 panel is read directly (a memory-bound GEMV).
 * The block sizes were picked by measurement on a Zen 3 core (see README, "Measured performance"). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cq_internal.h"

#define WO_GEMM_MIN_M 4
#define WO_KC 256
#define WO_MB 96
#define WO_PG 8
#ifndef S8_MB
#define S8_MB 64
#endif
#ifndef S8_KC4
#define S8_KC4 256 /* k4 steps per block of a panel in the int8 driver (16 KiB) */
#endif

const char *cq_version(void) { return CQ_VERSION_STRING; }

const char *cq_strerror(int status)
{
    switch (status) {
    case CQ_OK: return "ok";
    case CQ_ERR_NULL: return "a required pointer is NULL";
    case CQ_ERR_SHAPE: return "invalid shape: sizes must be positive and agree";
    case CQ_ERR_GROUP: return "invalid group_size: it must be a positive multiple of 4 that divides k";
    case CQ_ERR_NONFINITE: return "the weight holds NaN or Inf";
    case CQ_ERR_OVERFLOW: return "size too large: a byte count or an int32 sum would overflow";
    case CQ_ERR_NOMEM: return "out of memory";
    case CQ_ERR_ISA: return "the requested instruction set is not available on this CPU or in this build";
    case CQ_ERR_RANGE: return "an int8 code is -128; codes must be in [-127, 127]";
    case CQ_ERR_ARG: return "invalid argument (unknown mode, scheme, ISA or thread count)";
    case CQ_ERR_VERSION: return "library and header versions differ";
    default: return "unknown status";
    }
}

/* ---- size checks ---------------------------------------------------------------------------- */
static int mul_ok(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    int64_t r = a * b;
    if ((uint64_t)r > (uint64_t)SIZE_MAX) return 0;
    *out = r;
    return 1;
}
/* a*b*c elements of `elt` bytes fit in int64 and size_t. */
static int bytes_ok(int64_t a, int64_t b, int64_t elt)
{
    int64_t t;
    return mul_ok(a, b, &t) && mul_ok(t, elt, &t);
}

static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); } /* no overflow */

int64_t cq_num_scales(int scheme, int64_t n, int64_t k, int64_t group_size)
{
    if (n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!bytes_ok(n, k, 4)) return CQ_ERR_OVERFLOW;
    switch (scheme) {
    case CQ_PER_TENSOR: return 1;
    case CQ_PER_CHANNEL: return n;
    case CQ_PER_GROUP:
        if (group_size <= 0 || group_size % 4 != 0 || k % group_size != 0) return CQ_ERR_GROUP;
        return n * (k / group_size);
    default: return CQ_ERR_ARG;
    }
}

int64_t cq_packed_size(int64_t n, int64_t k)
{
    if (n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    int64_t np = ceil_div(n, CQ_NR), kp4 = ceil_div(k, 4), t;
    if (!mul_ok(np, kp4, &t) || !mul_ok(t, CQ_PANEL_STEP, &t)) return CQ_ERR_OVERFLOW;
    return t;
}

/* ---- quantization ----------------------------------------------------------------------------- */
typedef struct {
    const cq_kernels *kern;
    const float *w;
    int64_t n, k, group, ng;
    int8_t *q;
    float *scales;
    int activations;   /* rows of x: non-finite rows get NaN scale instead of an error */
    int bad;           /* set when a weight is non-finite (atomic) */
    int64_t rows_per_unit;
    int64_t ldq;       /* row stride of q (>= k); columns [k, ldq) are zeroed */
} quant_ctx;

static float scale_of(float amax)
{
    float s = amax / 127.0f;
    return s > 0.0f ? s : 1.0f; /* all-zero slice (or one whose scale underflows to 0) */
}

static void quant_unit(void *vctx, int64_t u)
{
    quant_ctx *c = (quant_ctx *)vctx;
    int64_t r0 = u * c->rows_per_unit, r1 = r0 + c->rows_per_unit;
    if (r1 > c->n) r1 = c->n;
    for (int64_t r = r0; r < r1; r++) {
        if (c->ldq > c->k) memset(c->q + r * c->ldq + c->k, 0, (size_t)(c->ldq - c->k));
        for (int64_t g = 0; g < c->ng; g++) {
            const float *src = c->w + r * c->k + g * c->group;
            int8_t *dst = c->q + r * c->ldq + g * c->group;
            float amax;
            if (!c->kern->absmax(src, c->group, &amax)) {
                if (!c->activations) { __atomic_store_n(&c->bad, 1, __ATOMIC_RELAXED); return; }
                memset(dst, 0, (size_t)c->group);
                c->scales[r * c->ng + g] = NAN;
                continue;
            }
            float s = scale_of(amax);
            c->scales[r * c->ng + g] = s;
            c->kern->quantize(src, c->group, s, dst);
        }
    }
}

static void quantize_rows_parallel(quant_ctx *c)
{
    double work = (double)c->n * (double)c->k;
    int64_t rpu = (int64_t)(65536 / c->k) + 1;
    c->rows_per_unit = rpu;
    int64_t nunits = ceil_div(c->n, rpu);
    cq_parallel_for(nunits, work < 1.0e6 ? 1 : cq_threads_for(work, nunits), quant_unit, c);
}

typedef struct {
    const cq_kernels *kern;
    const float *w;
    int64_t total, chunk;
    float scale;
    int8_t *q;
} flat_ctx;

static void flat_quant_unit(void *vctx, int64_t u)
{
    flat_ctx *c = (flat_ctx *)vctx;
    int64_t i0 = u * c->chunk, len = c->total - i0 < c->chunk ? c->total - i0 : c->chunk;
    c->kern->quantize(c->w + i0, len, c->scale, c->q + i0);
}

int cq_quantize(const float *w, int64_t n, int64_t k, int scheme, int64_t group_size, int8_t *q,
                float *scales)
{
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    if (!w || !q || !scales) return CQ_ERR_NULL;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;
    if (scheme == CQ_PER_TENSOR) {
        float amax;
        if (!kern->absmax(w, n * k, &amax)) return CQ_ERR_NONFINITE;
        flat_ctx c = {kern, w, n * k, 1 << 16, scale_of(amax), q};
        int64_t nunits = ceil_div(n * k, c.chunk);
        scales[0] = c.scale;
        cq_parallel_for(nunits, n * k < 1000000 ? 1 : cq_threads_for((double)n * k, nunits), flat_quant_unit, &c);
        return CQ_OK;
    }
    quant_ctx c = {kern, w, n, k, scheme == CQ_PER_GROUP ? group_size : k,
                   scheme == CQ_PER_GROUP ? k / group_size : 1, q, scales, 0, 0, 0, k};
    quantize_rows_parallel(&c);
    return c.bad ? CQ_ERR_NONFINITE : CQ_OK;
}

int cq_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scales)
{
    if (m <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
    if (!x || !q || !scales) return CQ_ERR_NULL;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;
    quant_ctx c = {kern, x, m, k, k, 1, q, scales, 1, 0, 0, k};
    quantize_rows_parallel(&c);
    return CQ_OK;
}

int cq_dequantize(const int8_t *q, const float *scales, int64_t n, int64_t k, int scheme,
                  int64_t group_size, float *out)
{
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    if (!q || !scales || !out) return CQ_ERR_NULL;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;
    int64_t g = scheme == CQ_PER_GROUP ? group_size : k, ng = k / g;
    for (int64_t r = 0; r < n; r++)
        for (int64_t gi = 0; gi < ng; gi++)
            kern->dequant(q + r * k + gi * g, g, scheme == CQ_PER_TENSOR ? scales[0] : scales[r * ng + gi],
                          out + r * k + gi * g);
    return CQ_OK;
}

/* ---- packing -------------------------------------------------------------------------------- */
typedef struct {
    const int8_t *q;
    int8_t *packed;
    int64_t n, k, kp4;
    int unpack;
} pack_ctx;

static int32_t load_word(const int8_t *src, int64_t avail)
{
    int32_t v = 0;
    memcpy(&v, src, (size_t)(avail < 4 ? avail : 4)); /* zero padding past k */
    return v;
}

/* One panel, step by step: 16 row streams read sequentially, 64 contiguous bytes written per
 * step (a row-by-row scatter with a 64-byte stride was 3x slower). */
static void pack_unit(void *vctx, int64_t p)
{
    pack_ctx *c = (pack_ctx *)vctx;
    int8_t *panel = c->packed + p * c->kp4 * CQ_PANEL_STEP;
    int64_t kfull = c->k / 4, rows = c->n - p * CQ_NR < CQ_NR ? c->n - p * CQ_NR : CQ_NR;
    const int8_t *src[CQ_NR];
    for (int j = 0; j < rows; j++) src[j] = c->q + (p * CQ_NR + j) * c->k;
    if (c->unpack) {
        for (int64_t t = 0; t < kfull; t++)
            for (int j = 0; j < rows; j++) memcpy((int8_t *)src[j] + 4 * t, panel + t * CQ_PANEL_STEP + 4 * j, 4);
        if (kfull < c->kp4)
            for (int j = 0; j < rows; j++)
                memcpy((int8_t *)src[j] + 4 * kfull, panel + kfull * CQ_PANEL_STEP + 4 * j, (size_t)(c->k - 4 * kfull));
        return;
    }
    for (int64_t t = 0; t < c->kp4; t++) {
        int32_t w[CQ_NR] = {0};
        for (int j = 0; j < rows; j++) w[j] = load_word(src[j] + 4 * t, t < kfull ? 4 : c->k - 4 * t);
        memcpy(panel + t * CQ_PANEL_STEP, w, sizeof w);
    }
}

static int has_minus128(const int8_t *q, int64_t len)
{
    int bad = 0;
    for (int64_t i = 0; i < len; i++) bad |= (q[i] == -128); /* vectorized by the compiler */
    return bad;
}

static int pack_common(const int8_t *q, int64_t n, int64_t k, int8_t *packed, int unpack)
{
    int64_t size = cq_packed_size(n, k);
    if (size < 0) return (int)size;
    if (!q || !packed) return CQ_ERR_NULL;
    if (!unpack && has_minus128(q, n * k)) return CQ_ERR_RANGE;
    pack_ctx c = {q, packed, n, k, ceil_div(k, 4), unpack};
    int64_t np = ceil_div(n, CQ_NR);
    cq_parallel_for(np, (double)n * k < 4.0e6 ? 1 : cq_threads_for((double)n * k, np), pack_unit, &c);
    return CQ_OK;
}

int cq_pack(const int8_t *q, int64_t n, int64_t k, int8_t *packed) { return pack_common(q, n, k, packed, 0); }
int cq_unpack(const int8_t *packed, int64_t n, int64_t k, int8_t *q) { return pack_common(q, n, k, (int8_t *)packed, 1); }

/* ---- shared by the linear drivers ------------------------------------------------------------- */
typedef struct {
    const cq_kernels *kern;
    int64_t m, n, k, kp4, np, nmb, mb;
    int64_t group4, ng;   /* k4 steps per scale group, number of groups per row */
    int scheme;
    const float *x;       /* weight-only: x (lda = xlda) */
    int64_t xlda;
    const int8_t *qa;     /* dynamic / gemm: int8 activations (lda = 4 * kp4) */
    const float *sx;      /* dynamic: per-row activation scales */
    const int8_t *packed;
    const float *scales;
    const float *bias;
    float *y;
    int32_t *c32;         /* gemm_s8s8s32 output */
} lin_ctx;

/* Scales of panel p, group gi, as 16 floats (0 beyond n). */
static void panel_scales(const lin_ctx *c, int64_t p, int64_t gi, float *ws)
{
    for (int j = 0; j < CQ_NR; j++) {
        int64_t row = p * CQ_NR + j;
        ws[j] = row >= c->n ? 0.0f
              : c->scheme == CQ_PER_TENSOR ? c->scales[0] : c->scales[row * c->ng + gi];
    }
}

static void store_rows(const lin_ctx *c, int64_t p, int64_t r0, int64_t rows, const float *tile)
{
    int64_t n0 = p * CQ_NR, cols = c->n - n0 < CQ_NR ? c->n - n0 : CQ_NR;
    for (int64_t r = 0; r < rows; r++)
        memcpy(c->y + (r0 + r) * c->n + n0, tile + r * CQ_NR, (size_t)cols * sizeof(float));
}

static void bias16(const lin_ctx *c, int64_t p, float *b)
{
    for (int j = 0; j < CQ_NR; j++) {
        int64_t row = p * CQ_NR + j;
        b[j] = (c->bias && row < c->n) ? c->bias[row] : 0.0f;
    }
}

/* ---- weight-only ------------------------------------------------------------------------------ */
/* GEMV (M < 4): a unit is 4 consecutive panels read as concurrent streams (f32_gemv4). */
static void wo_gemv4_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    int64_t p0 = 4 * u;
    const int8_t *panels[4];
    float ws[4 * CQ_NR], bb[CQ_NR], y[4 * CQ_NR];
    int64_t last = c->np - 1;
    for (int64_t r = 0; r < c->m; r++) {
        memset(y, 0, sizeof y);
        for (int64_t gi = 0; gi < c->ng; gi++) {
            int64_t t0 = gi * c->group4;
            for (int i = 0; i < 4; i++) { /* past the last panel: repeat it (discarded) */
                int64_t p = p0 + i <= last ? p0 + i : last;
                panels[i] = c->packed + (p * c->kp4 + t0) * CQ_PANEL_STEP;
                panel_scales(c, p, gi, ws + i * CQ_NR);
            }
            c->kern->f32_gemv4(c->group4, c->x + r * c->xlda + 4 * t0, panels, ws, y);
        }
        for (int i = 0; i < 4 && p0 + i <= last; i++) {
            bias16(c, p0 + i, bb);
            for (int j = 0; j < CQ_NR; j++) y[i * CQ_NR + j] += bb[j];
            store_rows(c, p0 + i, r, 1, y + i * CQ_NR);
        }
    }
}

/* One unit = a block of up to WO_MB rows of x times a group of WO_PG panels. The k loop is
 * outermost inside the unit, so the x block's WO_KC columns (96 KiB) stay in L2 while every panel
 * of the group dequantizes its own WO_KC x 16 block (16 KiB, L1) and runs the float tiles. The
 * outputs accumulate in a contiguous local buffer, copied to y at the end: accumulating in y itself
 * (rows n floats apart, the same L1 sets as the rows of x when n == k) halved the tile's speed
 * through L1 set conflicts. 64 KiB of stack. */
static void wo_gemm_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    int64_t npg = ceil_div(c->np, WO_PG), pg = u % npg, mbi = u / npg;
    int64_t p0 = pg * WO_PG, p1 = p0 + WO_PG < c->np ? p0 + WO_PG : c->np;
    int64_t m0 = mbi * c->mb, rows = c->m - m0 < c->mb ? c->m - m0 : c->mb;
    float bblk[WO_KC * CQ_NR] __attribute__((aligned(64)));
    float cbuf[WO_PG * WO_MB * CQ_NR] __attribute__((aligned(64)));
    float ws[CQ_NR], bb[CQ_NR];
    for (int64_t p = p0; p < p1; p++) {
        bias16(c, p, bb);
        float *cp = cbuf + (p - p0) * WO_MB * CQ_NR;
        for (int64_t r = 0; r < rows; r++) memcpy(cp + r * CQ_NR, bb, sizeof bb);
    }
    for (int64_t t0 = 0; t0 < c->kp4; t0 += WO_KC / 4) {
        int64_t nt = c->kp4 - t0 < WO_KC / 4 ? c->kp4 - t0 : WO_KC / 4;
        int64_t kc = c->k - 4 * t0 < 4 * nt ? c->k - 4 * t0 : 4 * nt;
        for (int64_t p = p0; p < p1; p++) {
            /* dequantize this block of the panel, one scale group at a time */
            for (int64_t t = t0; t < t0 + nt;) {
                int64_t gi = t / c->group4, gend = (gi + 1) * c->group4;
                int64_t seg = (gend < t0 + nt ? gend : t0 + nt) - t;
                panel_scales(c, p, gi, ws);
                c->kern->f32_dequant(seg, c->packed + (p * c->kp4 + t) * CQ_PANEL_STEP, ws,
                                     bblk + (t - t0) * 4 * CQ_NR);
                t += seg;
            }
            float *cp = cbuf + (p - p0) * WO_MB * CQ_NR;
            for (int64_t r = 0; r < rows; r += CQ_MR_F32) {
                int mr = (int)(rows - r < CQ_MR_F32 ? rows - r : CQ_MR_F32);
                c->kern->f32_tile(mr, kc, c->x + (m0 + r) * c->xlda + 4 * t0, c->xlda, bblk,
                                  cp + r * CQ_NR, CQ_NR);
            }
        }
    }
    for (int64_t p = p0; p < p1; p++) store_rows(c, p, m0, rows, cbuf + (p - p0) * WO_MB * CQ_NR);
}

/* ---- dynamic ------------------------------------------------------------------------------------ */
/* One unit = one panel x a block of up to S8_MB activation rows. k is blocked by S8_KC4 steps
 * (16 KiB of the panel, L1-resident) and the block is swept by every row tile before moving on
 * (+25% over streaming the whole panel from L2 for each row tile). */
static void s8_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    int64_t p = u % c->np, mbi = u / c->np;
    int64_t m0 = mbi * c->mb, rows = c->m - m0 < c->mb ? c->m - m0 : c->mb;
    int64_t lda = 4 * c->kp4;
    const int8_t *bp = c->packed + p * c->kp4 * CQ_PANEL_STEP;
    const int8_t *a0 = c->qa + m0 * lda;
    int32_t acc[S8_MB * CQ_NR];
    float facc[S8_MB * CQ_NR], ws[CQ_NR], bb[CQ_NR];
    int64_t n0 = p * CQ_NR, cols = c->n - n0 < CQ_NR ? c->n - n0 : CQ_NR;

    if (c->c32 || (c->ng == 1 && c->kp4 <= CQ_CHUNK4)) {
        /* one exact int32 sum per output (gemm_s8s8s32 has k <= CQ_MAX_K_S32) */
        memset(acc, 0, sizeof(int32_t) * (size_t)rows * CQ_NR);
        for (int64_t t0 = 0; t0 < c->kp4; t0 += S8_KC4) {
            int64_t nt = c->kp4 - t0 < S8_KC4 ? c->kp4 - t0 : S8_KC4;
            for (int64_t r = 0; r < rows; r += CQ_MR_S8) {
                int mr = (int)(rows - r < CQ_MR_S8 ? rows - r : CQ_MR_S8);
                c->kern->s8_tile(mr, nt, a0 + r * lda + 4 * t0, lda, bp + t0 * CQ_PANEL_STEP,
                                 acc + r * CQ_NR, NULL, NULL);
            }
        }
        if (c->c32) {
            for (int64_t r = 0; r < rows; r++)
                memcpy(c->c32 + (m0 + r) * c->n + n0, acc + r * CQ_NR, (size_t)cols * sizeof(int32_t));
            return;
        }
        /* y = acc * (sx * sw) + b, in the contract's order */
        panel_scales(c, p, 0, ws);
        bias16(c, p, bb);
        for (int64_t r = 0; r < rows; r++) {
            float sx = c->sx[m0 + r];
            for (int j = 0; j < CQ_NR; j++) facc[r * CQ_NR + j] = (float)acc[r * CQ_NR + j] * (sx * ws[j]) + bb[j];
        }
        store_rows(c, p, m0, rows, facc);
        return;
    } else if (c->group4 <= CQ_CHUNK4) {
        /* per-group: each group's int32 sum is scaled into float accumulators; a block holds
         * whole groups, up to S8_KC4 steps */
        float wsg[S8_KC4][CQ_NR];
        int64_t gpb = S8_KC4 / c->group4 > 0 ? S8_KC4 / c->group4 : 1;
        memset(facc, 0, sizeof(float) * (size_t)rows * CQ_NR);
        for (int64_t g0 = 0; g0 < c->ng; g0 += gpb) {
            int64_t g1 = g0 + gpb < c->ng ? g0 + gpb : c->ng;
            for (int64_t g = g0; g < g1; g++) panel_scales(c, p, g, wsg[g - g0]);
            for (int64_t r = 0; r < rows; r += CQ_MR_S8) {
                int mr = (int)(rows - r < CQ_MR_S8 ? rows - r : CQ_MR_S8);
                for (int64_t g = g0; g < g1; g++) {
                    int64_t t0 = g * c->group4;
                    c->kern->s8_tile(mr, c->group4, a0 + r * lda + 4 * t0, lda, bp + t0 * CQ_PANEL_STEP,
                                     NULL, facc + r * CQ_NR, wsg[g - g0]);
                }
            }
        }
    } else {
        /* a scale group longer than int32 can sum exactly: int32 chunks widened into int64 */
        int64_t acc64[CQ_MR_S8 * CQ_NR];
        int32_t acc32[CQ_MR_S8 * CQ_NR];
        memset(facc, 0, sizeof(float) * (size_t)rows * CQ_NR);
        for (int64_t r = 0; r < rows; r += CQ_MR_S8) {
            int mr = (int)(rows - r < CQ_MR_S8 ? rows - r : CQ_MR_S8);
            for (int64_t gi = 0; gi < c->ng; gi++) {
                int64_t t0 = gi * c->group4;
                panel_scales(c, p, gi, ws);
                memset(acc64, 0, sizeof acc64);
                for (int64_t t = t0; t < t0 + c->group4; t += CQ_CHUNK4) {
                    int64_t nt = t0 + c->group4 - t < CQ_CHUNK4 ? t0 + c->group4 - t : CQ_CHUNK4;
                    memset(acc32, 0, sizeof acc32);
                    c->kern->s8_tile(mr, nt, a0 + r * lda + 4 * t, lda, bp + t * CQ_PANEL_STEP, acc32, NULL, NULL);
                    for (int i = 0; i < mr * CQ_NR; i++) acc64[i] += acc32[i];
                }
                for (int i = 0; i < mr * CQ_NR; i++) facc[r * CQ_NR + i] += (float)acc64[i] * ws[i % CQ_NR];
            }
        }
    }
    /* per group: y = (sum_g acc_g * sw_g) * sx + b */
    bias16(c, p, bb);
    for (int64_t r = 0; r < rows; r++) {
        float sx = c->sx[m0 + r];
        for (int j = 0; j < CQ_NR; j++) facc[r * CQ_NR + j] = facc[r * CQ_NR + j] * sx + bb[j];
    }
    store_rows(c, p, m0, rows, facc);
}

/* M = 1, per-channel / per-tensor: a unit is 4 consecutive panels read as 4 concurrent streams
 * (s8_gemv4). Same integer sums and the same epilogue as s8_unit. */
static void s8_gemv4_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    int64_t p0 = 4 * u;
    const int8_t *panels[4];
    int32_t acc[4 * CQ_NR];
    float ws[CQ_NR], bb[CQ_NR], y16[CQ_NR];
    for (int i = 0; i < 4; i++) /* past the last panel: repeat it (its sums are discarded) */
        panels[i] = c->packed + (p0 + i < c->np ? p0 + i : c->np - 1) * c->kp4 * CQ_PANEL_STEP;
    memset(acc, 0, sizeof acc);
    c->kern->s8_gemv4(c->kp4, c->qa, panels, acc);
    float sx = c->sx[0];
    for (int i = 0; i < 4 && p0 + i < c->np; i++) {
        panel_scales(c, p0 + i, 0, ws);
        bias16(c, p0 + i, bb);
        for (int j = 0; j < CQ_NR; j++) y16[j] = (float)acc[i * CQ_NR + j] * (sx * ws[j]) + bb[j];
        store_rows(c, p0 + i, 0, 1, y16);
    }
}

/* Copy rows of int8 a (m, k) into (m, 4*kp4) with zero padding. */
static void pad_rows_s8(const int8_t *a, int64_t m, int64_t k, int64_t lda, int8_t *out)
{
    for (int64_t r = 0; r < m; r++) {
        memcpy(out + r * lda, a + r * k, (size_t)k);
        memset(out + r * lda + k, 0, (size_t)(lda - k));
    }
}

int cq_gemm_s8s8s32(const int8_t *a, const int8_t *b, int64_t m, int64_t n, int64_t k, int32_t *c)
{
    if (m <= 0 || n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!a || !b || !c) return CQ_ERR_NULL;
    if (k > CQ_MAX_K_S32) return CQ_ERR_OVERFLOW;
    if (!bytes_ok(m, k, 1) || !bytes_ok(n, k, 1) || !bytes_ok(m, n, 4)) return CQ_ERR_OVERFLOW;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;
    if (has_minus128(a, m * k)) return CQ_ERR_RANGE;
    int64_t psize = cq_packed_size(n, k), kp4 = ceil_div(k, 4), lda = 4 * kp4;
    if (psize < 0) return (int)psize;
    int8_t *packed = (int8_t *)malloc((size_t)psize);
    int8_t *apad = (k % 4) ? (int8_t *)malloc((size_t)(m * lda)) : NULL;
    if (!packed || ((k % 4) && !apad)) { free(packed); free(apad); return CQ_ERR_NOMEM; }
    int st = cq_pack(b, n, k, packed); /* also refuses -128 in b */
    if (st == CQ_OK) {
        if (apad) pad_rows_s8(a, m, k, lda, apad);
        lin_ctx ctx;
        memset(&ctx, 0, sizeof ctx);
        ctx.kern = kern; ctx.m = m; ctx.n = n; ctx.k = k; ctx.kp4 = kp4;
        ctx.np = ceil_div(n, CQ_NR); ctx.mb = S8_MB; ctx.nmb = ceil_div(m, S8_MB);
        ctx.qa = apad ? apad : a; ctx.packed = packed; ctx.c32 = c;
        int64_t nunits = ctx.np * ctx.nmb;
        cq_parallel_for(nunits, cq_threads_for((double)m * n * k, nunits), s8_unit, &ctx);
    }
    free(packed);
    free(apad);
    return st;
}

int cq_linear(int mode, const float *x, int64_t m, int64_t k, const int8_t *packed,
              const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
              float *y)
{
    if (mode != CQ_MODE_WEIGHT_ONLY && mode != CQ_MODE_DYNAMIC) return CQ_ERR_ARG;
    if (m < 0) return CQ_ERR_SHAPE;
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    int64_t psize = cq_packed_size(n, k);
    if (psize < 0) return (int)psize;
    if (!bytes_ok(m, k, 4) || !bytes_ok(m, n, 4) || !bytes_ok(m, ceil_div(k, 4), 16)) return CQ_ERR_OVERFLOW;
    if (m == 0) return CQ_OK;
    if (!x || !packed || !scales || !y) return CQ_ERR_NULL;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;

    lin_ctx c;
    memset(&c, 0, sizeof c);
    c.kern = kern; c.m = m; c.n = n; c.k = k; c.kp4 = ceil_div(k, 4); c.np = ceil_div(n, CQ_NR);
    c.scheme = scheme;
    c.ng = scheme == CQ_PER_GROUP ? k / group_size : 1;
    c.group4 = scheme == CQ_PER_GROUP ? group_size / 4 : c.kp4;
    c.packed = packed; c.scales = scales; c.bias = bias; c.y = y;
    double work = (double)m * (double)n * (double)k;
    void *scratch = NULL;

    if (mode == CQ_MODE_WEIGHT_ONLY) {
        c.x = x; c.xlda = k;
        if (m < WO_GEMM_MIN_M) {
            if (k % 4) { /* the GEMV kernel reads whole steps of 4: pad x */
                int64_t lda = 4 * c.kp4;
                float *xp = (float *)calloc((size_t)(m * lda), sizeof(float));
                if (!xp) return CQ_ERR_NOMEM;
                for (int64_t r = 0; r < m; r++) memcpy(xp + r * lda, x + r * k, (size_t)k * sizeof(float));
                c.x = xp; c.xlda = lda; scratch = xp;
            }
            int64_t nunits = ceil_div(c.np, 4);
            cq_parallel_for(nunits, cq_threads_for(work, nunits), wo_gemv4_unit, &c);
        } else {
            c.mb = WO_MB; c.nmb = ceil_div(m, WO_MB);
            int64_t nunits = ceil_div(c.np, WO_PG) * c.nmb;
            cq_parallel_for(nunits, cq_threads_for(work, nunits), wo_gemm_unit, &c);
        }
        free(scratch);
        return CQ_OK;
    }

    /* dynamic: quantize rows of x (zero-padded to whole steps of 4), then integer tiles */
    int64_t lda = 4 * c.kp4;
    int8_t *qa = (int8_t *)malloc((size_t)(m * lda) + (size_t)m * sizeof(float));
    if (!qa) return CQ_ERR_NOMEM;
    float *sx = (float *)(void *)(qa + m * lda); /* m*lda is a multiple of 4: aligned */
    quant_ctx q = {kern, x, m, k, k, 1, qa, sx, 1, 0, 0, lda};
    quantize_rows_parallel(&q);
    c.qa = qa; c.sx = sx; c.mb = S8_MB; c.nmb = ceil_div(m, S8_MB);
    if (m == 1 && c.ng == 1 && c.kp4 <= CQ_CHUNK4) {
        int64_t nunits = ceil_div(c.np, 4);
        cq_parallel_for(nunits, cq_threads_for(work, nunits), s8_gemv4_unit, &c);
    } else {
        int64_t nunits = c.np * c.nmb;
        cq_parallel_for(nunits, cq_threads_for(work, nunits), s8_unit, &c);
    }
    free(qa);
    return CQ_OK;
}

/* ---- float32 helpers ------------------------------------------------------------------------- */
typedef struct {
    const cq_kernels *kern;
    const float *x;
    float *y;
    int64_t n, chunk;
} ew_ctx;

static void gelu_unit(void *vctx, int64_t u)
{
    ew_ctx *c = (ew_ctx *)vctx;
    int64_t i0 = u * c->chunk, len = c->n - i0 < c->chunk ? c->n - i0 : c->chunk;
    c->kern->gelu(c->x + i0, len, c->y + i0);
}

int cq_gelu(const float *x, int64_t n, float *y)
{
    if (n < 0) return CQ_ERR_SHAPE;
    if (!bytes_ok(n, 1, 4)) return CQ_ERR_OVERFLOW;
    if (n == 0) return CQ_OK;
    if (!x || !y) return CQ_ERR_NULL;
    const cq_kernels *kern = cq_active_kernels();
    if (!kern) return CQ_ERR_ISA;
    ew_ctx c = {kern, x, y, n, 1 << 14};
    int64_t nunits = ceil_div(n, c.chunk);
    /* ~30 flops per element: threads pay off from ~64K elements */
    cq_parallel_for(nunits, n < 65536 ? 1 : cq_threads_for(30.0 * (double)n, nunits), gelu_unit, &c);
    return CQ_OK;
}

typedef struct {
    const float *x, *gamma, *beta;
    float *y;
    int64_t m, k, rows_per_unit;
    float eps;
} ln_ctx;

/* Two passes per row (mean, then the centred sum of squares: no cancellation), each with 8
 * independent partial sums so the compiler can vectorize without reassociating a single sum. */
static void ln_unit(void *vctx, int64_t u)
{
    ln_ctx *c = (ln_ctx *)vctx;
    int64_t r0 = u * c->rows_per_unit, r1 = r0 + c->rows_per_unit < c->m ? r0 + c->rows_per_unit : c->m;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = c->x + r * c->k;
        float *y = c->y + r * c->k;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0, k = c->k;
        for (; i + 8 <= k; i += 8)
            for (int j = 0; j < 8; j++) s[j] += x[i + j];
        double sum = 0.0;
        for (int j = 0; j < 8; j++) sum += s[j];
        for (; i < k; i++) sum += x[i];
        float mean = (float)(sum / (double)k);
        float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (i = 0; i + 8 <= k; i += 8)
            for (int j = 0; j < 8; j++) { float d = x[i + j] - mean; v[j] += d * d; }
        double var = 0.0;
        for (int j = 0; j < 8; j++) var += v[j];
        for (; i < k; i++) { float d = x[i] - mean; var += (double)d * d; }
        float inv = (float)(1.0 / sqrt(var / (double)k + (double)c->eps));
        for (i = 0; i < k; i++) {
            float t = (x[i] - mean) * inv;
            if (c->gamma) t *= c->gamma[i];
            if (c->beta) t += c->beta[i];
            y[i] = t;
        }
    }
}

int cq_layer_norm(const float *x, int64_t m, int64_t k, const float *gamma, const float *beta,
                  float eps, float *y)
{
    if (m < 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!(eps >= 0.0f)) return CQ_ERR_ARG;
    if (!bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
    if (m == 0) return CQ_OK;
    if (!x || !y) return CQ_ERR_NULL;
    ln_ctx c = {x, gamma, beta, y, m, k, (16384 / k) + 1, eps};
    int64_t nunits = ceil_div(m, c.rows_per_unit);
    cq_parallel_for(nunits, (double)m * k < 65536 ? 1 : cq_threads_for(8.0 * (double)m * k, nunits), ln_unit, &c);
    return CQ_OK;
}
