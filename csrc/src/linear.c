/* linear.c - the GEMM drivers: argument checks, blocking, threading and epilogues around the
 * micro-kernels of the config chosen for the weight's packed format (registry.c). Nothing here
 * depends on the ISA; the config is chosen once per call, so a call finishes on the path it started
 * with even if another thread forces a new one.
 *
 * Blocking (why these numbers: README "Measured performance"):
 * - a unit of parallel work is one panel (nr output columns) times a block of activation rows, so
 *   every output element is computed by exactly one thread with the same loop order whatever the
 *   thread count (results are bit-identical for 1..N threads);
 * - dynamic / gemm_s8s8s32: k is swept in blocks of KC_BYTES of the panel (L1-resident) by every
 *   mr-row tile of the row block before moving on; int32 sums are exact per chunk of <= 131072 k;
 * - weight-only, M >= the config's gemv_m (int4: M >= 4): a block of kc rows of k of a panel is
 *   dequantized once (L1) and reused by
 *   the float tiles over up to WO_MB rows of x, whose k block stays in L2 across the panels of a
 *   unit (WO_COLS columns);
 * - M = 1 (dynamic) and M below the config's gemv_m (weight-only; int4: M < 4): GEMVs over 4 panels
 *   read as concurrent streams. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

#define WO_GEMM_MIN_M 4 /* weight-only int4: the per-row GEMVs below this M; at M = 4 the int8 GEMV
                          * per row measured 1.7x slower than dequantize + tile ((768, 768), Sapphire
                          * Rapids-class Xeon, 2026-12-01). int8 weights: the config's gemv_m */
#define WO_GEMV_MAX_M CQ_WO_GEMV_MAX_M
#ifndef WO_MB
#define WO_MB 96 /* rows per weight-only unit (Zen 3, 2026-12-01: 256, one dequantization at M = 256, measured 0.98-1.01x) */
#endif
#define WO_COLS 128 /* output columns per weight-only unit */
#ifndef PS_MIN_N
#define PS_MIN_N 64 /* the pair-safe tile from this N (linear_impl, want_ps) */
#endif
#ifndef PS_BLOCK_K
#define PS_BLOCK_K 16384 /* the pair-safe tile's rows in one k block up to this K (want_ps) */
#endif
#ifndef KC_BYTES
#define KC_BYTES 16384 /* bytes of a panel per k block in the int8 driver */
#endif
#ifndef S8_MB
#define S8_MB 48 /* activation rows per int8 unit (a multiple of 4 and of 6) */
#endif
/* Configs with whole_k: a tile call sweeps all of k (up to an int32 chunk) when its unit has at
 * least WHOLE_K_ROWS rows or the packed weight is at most WHOLE_K_BYTES; otherwise k blocks of
 * KC_BYTES of the panel, which every tile of the unit reads from L1. Measured on the Sapphire
 * Rapids-class Xeon, VNNI 6x64 tile forced, one thread, paired medians of 21-41 interleaved calls
 * (whole k / blocks of 64 steps): (4096, 4096) M = 256 0.90-0.92 (2 threads 0.92), M = 64 0.95,
 * M = 24-32 1.00, M = 16 1.05, M = 12 1.08, M = 8 1.11; (11008, 4096) M = 256 0.87; (4096, 11008)
 * M = 64 0.96; small weights at every M: (768, 768) M = 8 / 12 / 16 / 256 0.92 / 0.95 / 0.94 /
 * 0.99, (1536, 384) M = 8 0.89, (384, 1536) M = 24 0.96, (1024, 1024) M = 8 0.99, but (2048, 2048)
 * M = 8 1.07. Per call the tile spends ~200 cycles outside its loop (accumulators in and out, the
 * epilogue): 21% of a 64-step call (tile alone, weights in L1: 79% of the vpdpbusd peak) against 14%
 * over 1024 steps from L2 (86%); few rows of a large weight keep the blocks, whose tiles after the
 * first read the block from L1 while the next one streams in. */
#define WHOLE_K_ROWS 24
#define WHOLE_K_BYTES ((int64_t)1 << 20)
#define MAXNR 64
#define MAXMB 256 /* the largest rows per unit of any config */

typedef struct {
    int64_t m, n, k, kp4, np, nmb, mb;
    int nr, u8;
    int64_t group4, ng, nseg; /* k4 steps per scale group, groups per row, sum segments per panel */
    int scheme;
    const float *x;       /* weight-only: x (lda = xlda) */
    int64_t xlda;
    const int8_t *qa;     /* dynamic / gemm: int8 (or u8) activations (lda = 4 * kp4) */
    const float *sx;      /* dynamic: per-row activation scales */
    const int8_t *codes;  /* packed codes */
    const unsigned char *sums; /* packed column sums (int32 at any alignment: cq_load_i32) */
    const float *scales;
    const float *bias;
    float *y;
    int32_t *c32;         /* gemm_s8s8s32 output */
    const cq_qd8_config *qcfg;
    const cq_f32_config *fcfg;
    const cq_elementwise *ew; /* the path's element-wise kernels */
    int64_t gv_rs;        /* weight-only GEMV: row blocks per group of 4 panels (unit u: group
                             u / gv_rs, rows of block u % gv_rs; 0 taken as 1) */
    float xup[WO_GEMV_MAX_M]; /* weight-only GEMV: 2^e per row where x was scaled by 2^-e (else 1) */
    int i4;               /* int4 weight: blocks of its panels are expanded to int8 before use */
    const int8_t *codes4; /* int4 codes; panels of h4.nr rows, read as panels of nr (<= h4.nr) */
    cq_i4_rows_fn i4row;  /* the expansion step of the path */
    cq_pack_header h4;
    /* weight-only int4 GEMV in integers (gemv4_i4_x24), or xd NULL: per row, 3 planes of x's 24-bit
     * fixed point digits (xds bytes each), and per segment of seg8 k8 steps (a group, or a chunk of
     * a per-channel row) the 3 compensations */
    const int8_t *xd;
    int64_t xds, seg8, nsegx;
    const int32_t *xcomp;
    float xs[4];
    /* cq_linear_post: the element-wise op applied to each unit's outputs once they are final (in
     * cache), or NULL; the unit function it wraps and which output block a unit writes */
    cq_gelu_fn post;
    cq_unit_fn inner;
    int region;
    int threads; /* threads the job runs on (run_units) */
    /* cq_linear_add_ln: y = LayerNorm(y + residual * residual_mul) per row, in the units that finish
     * whole rows (s8_rows_unit), else as a pass after the linear */
    const struct ln_args *ln;
    int isa;
    int nonfinite; /* weight-only GEMM: a unit wrote a non-finite output (atomic) */
    unsigned char *rowbad; /* weight-only GEMM: per row, 1 where a unit wrote a non-finite output
                              before any post-op (GELU maps -Inf to 0, which hid the row) */
    /* dynamic: the GEMM kernel that runs (NULL: qcfg->gemm), and for a pair-safe one the prepared
     * activations' block sums and entry counts (m x (ceil(kp4 / ps_kc4) + 1) each), row pointers
     * and residual entries (the activation pass's cq_ps_prepare_row) */
    const cq_ukernel *gemm;
    const int32_t *ps_sum, *ps_cnt;
    const int64_t *ps_row;
    const int32_t *ps_ent;
    int64_t ps_kc4, ps_ld; /* its k blocks (the tile calls' kc4) and the sums' values per row */
} lin_ctx;

typedef struct ln_args {
    const float *residual, *residual_mul, *gamma, *beta;
    float eps;
} ln_args;

enum { REGION_PANEL_ROWS, REGION_GEMV4, REGION_WO_GEMM };

/* Weight-only GEMV unit u: its first panel (returned) and rows [*r0, *r1) (c->gv_rs blocks of rows
 * per group of 4 panels; 0 as 1). */
static int64_t gv_unit(const lin_ctx *c, int64_t u, int64_t *r0, int64_t *r1)
{
    const int64_t rs = c->gv_rs > 1 ? c->gv_rs : 1, h = cq_ceil_div(c->m, rs), b = u % rs;
    *r0 = b * h;
    *r1 = (b + 1) * h < c->m ? (b + 1) * h : c->m;
    return 4 * (u / rs);
}

/* The output block unit u of the running job wrote: rows [*r0, *r1), columns [*c0, *c1). */
static void unit_region(const lin_ctx *c, int64_t u, int64_t *r0, int64_t *r1, int64_t *c0, int64_t *c1)
{
    int64_t p0, p1;
    if (c->region == REGION_GEMV4) { /* GEMVs: 4 panels, every row (or a block of them) */
        p0 = gv_unit(c, u, r0, r1); p1 = p0 + 4;
    } else {
        int64_t mbi;
        if (c->region == REGION_PANEL_ROWS) { /* s8_unit: a panel's block of mb rows */
            p0 = u / c->nmb; p1 = p0 + 1; mbi = u % c->nmb;
        } else { /* wo_gemm_unit: WO_COLS / nr panels, a block of mb rows */
            int64_t ppu = WO_COLS / c->nr, npg = cq_ceil_div(c->np, ppu);
            p0 = (u % npg) * ppu; p1 = p0 + ppu; mbi = u / npg;
        }
        *r0 = mbi * c->mb;
        *r1 = *r0 + c->mb < c->m ? *r0 + c->mb : c->m;
    }
    *c0 = p0 * c->nr;
    *c1 = p1 * c->nr < c->n ? p1 * c->nr : c->n;
}

/* A unit, then the post-op over the outputs it wrote (still in L1 / L2): no second pass over y. */
static void post_unit(void *vctx, int64_t u)
{
    const lin_ctx *c = (const lin_ctx *)vctx;
    c->inner(vctx, u);
    int64_t r0, r1, c0, c1;
    unit_region(c, u, &r0, &r1, &c0, &c1);
    for (int64_t r = r0; r < r1; r++) c->post(c->y + r * c->n + c0, c1 - c0, c->y + r * c->n + c0);
}

/* parallel_for over the units of fn, with the post-op (if any) fused into each unit. */
static void run_units(lin_ctx *c, int64_t nunits, int threads, cq_unit_fn fn, int region)
{
    c->threads = threads < 1 ? 1 : threads > nunits ? (int)nunits : threads;
    if (c->post) {
        c->inner = fn;
        c->region = region;
        fn = post_unit;
    }
    cq_parallel_for(nunits, threads, fn, c);
}

static const int8_t *panel_at(const lin_ctx *c, int64_t p, int64_t t)
{
    return c->codes + (p * c->kp4 + t) * 4 * (int64_t)c->nr;
}

/* int4 weights run every int8 kernel: a block of I4_SCRATCH bytes of a panel (64 steps at nr 64)
 * is expanded into the int8 layout (in L1) just before the kernels read it, so the weight streams
 * from memory at half the bytes and the integer sums stay those of the int8 kernels. */
#define I4_SCRATCH 16384
static int64_t i4_block(const lin_ctx *c) { return I4_SCRATCH / (4 * (int64_t)c->nr); }

/* nt steps of panel p from step t (t, nt even for int4): the packed codes, or the expanded block. */
static const int8_t *panel_blk(const lin_ctx *c, int64_t p, int64_t t, int64_t nt, int8_t *scratch)
{
    if (!c->i4) return panel_at(c, p, t);
    cq_i4_expand(&c->h4, c->codes4, c->nr, p, t, nt, scratch, c->i4row);
    return scratch;
}

/* Scales of panel p, group gi, as nr floats (0 beyond n). */
static void panel_scales(const lin_ctx *c, int64_t p, int64_t gi, float *ws)
{
    for (int j = 0; j < c->nr; j++) {
        int64_t row = p * c->nr + j;
        ws[j] = row >= c->n ? 0.0f
              : c->scheme == CQ_PER_TENSOR ? c->scales[0] : c->scales[row * c->ng + gi];
    }
}

static void panel_bias(const lin_ctx *c, int64_t p, float *b)
{
    for (int j = 0; j < c->nr; j++) {
        int64_t row = p * c->nr + j;
        b[j] = (c->bias && row < c->n) ? c->bias[row] : 0.0f;
    }
}

/* The same nr values as panel_scales / panel_bias, read in place where they lie contiguous (per-channel
 * scales, a bias, of a whole panel), else copied into buf: the per-panel copies were half of the M = 1
 * GEMV's epilogue at (3072, 768). */
static const float *panel_scales_ref(const lin_ctx *c, int64_t p, float *buf)
{
    if (c->scheme == CQ_PER_CHANNEL && (p + 1) * c->nr <= c->n) return c->scales + p * c->nr;
    panel_scales(c, p, 0, buf);
    return buf;
}

static const float *panel_bias_ref(const lin_ctx *c, int64_t p, float *buf)
{
    if (c->bias && (p + 1) * c->nr <= c->n) return c->bias + p * c->nr;
    panel_bias(c, p, buf);
    return buf;
}

/* 128 * column sums of segment s of panel p (the u8 compensation), modulo 2^32. */
static void panel_comp(const lin_ctx *c, int64_t p, int64_t s, int32_t *comp)
{
    const unsigned char *src = c->sums + 4 * (p * c->nseg + s) * c->nr;
    for (int j = 0; j < c->nr; j++) comp[j] = (int32_t)((uint32_t)cq_load_i32(src + 4 * j) * 128u);
}

/* 128 * column sums of steps [t0, t0 + nt) of panel p, read from the codes (the rare chunked case). */
static void chunk_comp(const lin_ctx *c, int64_t p, int64_t t0, int64_t nt, int32_t *comp)
{
    int8_t scratch[I4_SCRATCH] __attribute__((aligned(64)));
    uint32_t s[MAXNR] = {0};
    const int64_t blk = c->i4 ? i4_block(c) : nt;
    for (int64_t tb = t0; tb < t0 + nt; tb += blk) {
        int64_t n4 = t0 + nt - tb < blk ? t0 + nt - tb : blk;
        const int8_t *b = panel_blk(c, p, tb, n4, scratch);
        for (int j = 0; j < c->nr; j++)
            for (int64_t t = 0; t < n4; t++)
                for (int i = 0; i < 4; i++) s[j] += (uint32_t)(int32_t)b[(t * c->nr + j) * 4 + i];
    }
    for (int j = 0; j < c->nr; j++) comp[j] = (int32_t)(s[j] * 128u);
}

static int64_t cols_of(const lin_ctx *c, int64_t p)
{
    int64_t n0 = p * c->nr;
    return c->n - n0 < c->nr ? c->n - n0 : c->nr;
}

/* Reorder rows of int8 activations (mpad x lda, mpad a multiple of 16, lda of 64) into 16 x 64-byte
 * tiles (cq_ukernel.a_tiled): one contiguous 1 KiB per tile, so a tile load reads 16 lines of one
 * page instead of 16 rows lda bytes apart. */
static void tile_rows_16x64(const int8_t *a, int64_t mpad, int64_t lda, int8_t *out)
{
    for (int64_t rb = 0; rb < mpad; rb += 16)
        for (int64_t c = 0; c < lda / 64; c++)
            for (int r = 0; r < 16; r++)
                memcpy(out + rb * lda + c * 1024 + r * 64, a + (rb + r) * lda + c * 64, 64);
}

/* ---- dynamic ------------------------------------------------------------------------------------ */
/* Byte offset of k step t in a row block of quantized activations: rows of 4 * kp4 bytes, or the
 * 16 x 64-byte tiles of cq_ukernel.a_tiled (k bytes [64 c, 64 c + 64) of the 16 rows at + 1024 c). */
static int64_t a_off(const cq_ukernel *uk, int64_t t)
{
    return uk->a_tiled ? 1024 * (t / 16) + 4 * (t % 16) : 4 * t;
}

/* k4 steps per tile call of the int8 driver: the config's, else KC_BYTES of the panel */
static int64_t s8_kc4(const lin_ctx *c) { return c->qcfg->kc4 ? c->qcfg->kc4 : KC_BYTES / (4 * (int64_t)c->nr); }

static void s8_unit_run(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    const cq_ukernel *uk = c->gemm ? c->gemm : c->qcfg->gemm;
    const cq_qd8_gemm_fn gemm = (cq_qd8_gemm_fn)uk->fn;
    const int nr = c->nr;
    /* the row blocks of a panel are consecutive units: the panel stays in cache between them */
    int64_t mbi = u % c->nmb, p = u / c->nmb;
    int64_t m0 = mbi * c->mb, rows = c->m - m0 < c->mb ? c->m - m0 : c->mb;
    /* tile heights as even as the kernel's mr allows (M = 8 with mr 6: 4 + 4 rather than 6 + 2,
     * whose 2-row tile is load-bound: llvm-mca, icelake-server, 53% of the vpdpbusd port limit
     * against 99% at 4 rows); kernels that read whole blocks of rows keep their mr */
    const int MR = uk->pad_rows ? uk->mr : (int)cq_ceil_div(rows, cq_ceil_div(rows, uk->mr));
    int64_t lda = 4 * c->kp4, step = 4 * (int64_t)nr;
    const int8_t *a0 = c->qa + m0 * lda;
    int64_t n0 = p * nr, cols = cols_of(c, p);
    int32_t acc[MAXMB * MAXNR] __attribute__((aligned(64)));
    float facc[MAXMB * MAXNR] __attribute__((aligned(64)));
    int8_t scratch[I4_SCRATCH] __attribute__((aligned(64)));
    float ws[MAXNR], bb[MAXNR];
    int32_t comp[MAXNR];
    cq_qd8_out o;
    memset(&o, 0, sizeof o);

    if (c->c32 || (c->ng == 1 && c->kp4 <= CQ_CHUNK4)) {
        /* one exact int32 sum per output (gemm_s8s8s32 has k <= CQ_MAX_K_S32; modulo 2^32 the
         * u8 sums minus the compensation are exact whenever the true sum fits) */
        int64_t kc4 = uk->pairsafe ? c->ps_kc4 : s8_kc4(c);
        if (c->qcfg->whole_k && !c->c32 && !c->i4 && !uk->pairsafe &&
            (rows >= WHOLE_K_ROWS || (double)c->np * (double)step * (double)c->kp4 <= (double)WHOLE_K_BYTES))
            kc4 = c->kp4; /* (<= CQ_CHUNK4 here) */
        int8_t *iscr = scratch, *big = NULL;
        if (c->i4 && kc4 > i4_block(c)) {
            /* a config with long k blocks (AMX keeps its C tiles across a block): up to 256 steps
             * expanded into a heap block (64 KiB at nr 64, below glibc's mmap threshold) */
            int64_t want = kc4 < 256 ? kc4 : 256;
            big = (int8_t *)cq_alloc64((size_t)(want * step));
            kc4 = big ? want : i4_block(c);
            if (big) iscr = big;
        }
        if (c->u8) panel_comp(c, p, 0, comp);
        if (!c->c32) {
            panel_scales(c, p, 0, ws);
            panel_bias(c, p, bb);
        }
        /* NEXT_PANEL: the tile calls of a unit prefetch (cq_qd8_out.pf: into L2, a line per k step at
         * most) the panel this thread will read next, so that panel's first tile does not wait on L3
         * (VNNI 6x64, whole k, 48 rows: streaming its panel from L3 a tile ran at 26% of the vpdpbusd
         * peak, from L2 at 86%; 64 panels of 48 rows each 62%, with the next panel prefetched 71%).
         * Units are handed out in order, so a thread's next unit is about u + threads: with several
         * units per panel per thread each prefetches its share of panel p + 1, else the whole panel of
         * unit u + threads. Measured (paired against none, one / two threads, CQUANT_ISA=avx512vnni):
         * (4096, 4096) M = 256 0.94 / 0.97, M = 64 0.93 / 0.95; (4096, 11008) M = 8 0.94 / 0.97 (weight
         * in L3), 0.92 / 0.96 (caches flushed); small weights (in L2) do not prefetch: (768, 768) M = 8
         * measured 1.02-1.04. */
        const int8_t *pf = NULL;
        int64_t pf_step = 0;
        const int64_t T = c->threads > 1 ? c->threads : 1, pbytes = c->kp4 * step;
        const int64_t steps = cq_ceil_div(rows, MR) * c->kp4;
        if (!c->i4 && !c->ln && (double)c->np * (double)pbytes > (double)WHOLE_K_BYTES &&
            (kc4 >= c->kp4 || rows < WHOLE_K_ROWS)) { /* not for weights in L2, nor in s8_rows_unit's
                                                       * order, nor where many rows' tiles reuse each
                                                       * k block (AVX-VNNI 4x16, (4096, 11008) M = 256:
                                                       * 0.96 with it) */
            if (c->nmb >= T) {
                /* this thread runs about nmb / T units of panel p: each prefetches its share of p + 1 */
                const int64_t nsh = cq_ceil_div(c->nmb, T), sh = cq_ceil_div(pbytes, nsh), i = (mbi / T) % nsh;
                if (p + 1 < c->np && i * sh < pbytes) {
                    pf = panel_at(c, p + 1, 0) + i * sh;
                    pf_step = (pbytes - i * sh < sh ? pbytes - i * sh : sh) / steps;
                }
            } else {
                const int64_t q = (u + T) / c->nmb;
                if (q != p && q < c->np) {
                    pf = panel_at(c, q, 0);
                    pf_step = pbytes / steps;
                }
            }
            if (pf_step > 64) pf_step = 64;
        }
        for (int64_t t0 = 0; t0 < c->kp4; t0 += kc4) {
            int64_t nt = c->kp4 - t0 < kc4 ? c->kp4 - t0 : kc4;
            int last = t0 + nt >= c->kp4;
            const int8_t *bk = panel_blk(c, p, t0, nt, iscr);
            for (int64_t r = 0; r < rows; r += MR) {
                int mr = (int)(rows - r < MR ? rows - r : MR);
                o.acc = acc + r * nr;
                o.acc_in = t0 > 0;
                if (last && !c->c32) {
                    o.mode = CQ_OUT_F32;
                    o.comp = c->u8 ? comp : NULL;
                    o.sx = c->sx + m0 + r; o.sw = ws; o.bias = bb;
                    o.y = c->y + (m0 + r) * c->n + n0; o.ldy = c->n; o.nc = (int)cols;
                } else {
                    o.mode = CQ_OUT_I32;
                }
                o.pf = pf; o.pf_step = pf_step;
                if (uk->pairsafe) { /* the block's sums and entries (cq_ps_prepare_row) */
                    o.ps_ld = c->ps_ld;
                    o.ps_sum = c->ps_sum + (m0 + r) * o.ps_ld + t0 / kc4;
                    o.ps_cnt = c->ps_cnt + (m0 + r) * o.ps_ld + t0 / kc4;
                    o.ps_row = c->ps_row + m0 + r;
                    o.ps_ent = c->ps_ent;
                    o.ps_k0 = 4 * t0;
                }
                gemm(mr, nr, nt, a0 + r * lda + a_off(uk, t0), lda, bk, &o);
                if (pf) pf += nt * pf_step;
            }
        }
        if (c->c32)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < cols; j++)
                    c->c32[(m0 + r) * c->n + n0 + j] =
                        (int32_t)((uint32_t)acc[r * nr + j] - (c->u8 ? (uint32_t)comp[j] : 0u));
        free(big);
        return;
    }
    memset(facc, 0, sizeof(float) * (size_t)(rows * nr));
    if (c->group4 <= CQ_CHUNK4) {
        /* per-group: each group's int32 sum (minus its compensation) is scaled into float
         * accumulators; the groups of a k block are swept by every row tile */
        int64_t gpb = (KC_BYTES / step) / c->group4;
        if (gpb < 1) gpb = 1;
        for (int64_t g0 = 0; g0 < c->ng; g0 += gpb) {
            int64_t g1 = g0 + gpb < c->ng ? g0 + gpb : c->ng;
            /* int4: groups of at most i4_block steps (cq_linear), so a whole block expands */
            const int8_t *bk = panel_blk(c, p, g0 * c->group4, (g1 - g0) * c->group4, scratch);
            for (int64_t g = g0; g < g1; g++) {
                float wsg[MAXNR];
                int32_t compg[MAXNR];
                panel_scales(c, p, g, wsg);
                if (c->u8) panel_comp(c, p, g, compg);
                o.mode = CQ_OUT_FACC; o.acc_in = 0; o.sw = wsg; o.comp = c->u8 ? compg : NULL;
                for (int64_t r = 0; r < rows; r += MR) {
                    int mr = (int)(rows - r < MR ? rows - r : MR);
                    o.facc = facc + r * nr;
                    o.sx = c->sx + m0 + r;
                    gemm(mr, nr, c->group4, a0 + r * lda + a_off(uk, g * c->group4), lda,
                         bk + (g - g0) * c->group4 * step, &o);
                }
            }
        }
        (void)step;
    } else {
        /* a scale group longer than int32 can sum exactly (or all of a huge k): int32 chunks
         * widened into int64, the compensation of each chunk computed from the codes */
        int64_t acc64[8 * MAXNR];
        for (int64_t r = 0; r < rows; r += MR) {
            int mr = (int)(rows - r < MR ? rows - r : MR);
            for (int64_t gi = 0; gi < c->ng; gi++) {
                int64_t t0 = gi * c->group4;
                panel_scales(c, p, gi, ws);
                memset(acc64, 0, sizeof acc64);
                for (int64_t t = t0; t < t0 + c->group4; t += CQ_CHUNK4) {
                    int64_t nt = t0 + c->group4 - t < CQ_CHUNK4 ? t0 + c->group4 - t : CQ_CHUNK4;
                    o.mode = CQ_OUT_I32; o.acc_in = 0; o.acc = acc;
                    if (!c->i4) {
                        gemm(mr, nr, nt, a0 + r * lda + 4 * t, lda, panel_at(c, p, t), &o);
                    } else { /* int4: the chunk in expanded blocks, summed in int32 by the kernel */
                        for (int64_t tb = t; tb < t + nt; tb += i4_block(c)) {
                            int64_t n4 = t + nt - tb < i4_block(c) ? t + nt - tb : i4_block(c);
                            o.acc_in = tb > t;
                            gemm(mr, nr, n4, a0 + r * lda + 4 * tb, lda, panel_blk(c, p, tb, n4, scratch), &o);
                        }
                    }
                    if (c->u8) chunk_comp(c, p, t, nt, comp);
                    for (int i = 0; i < mr * nr; i++)
                        acc64[i] += (int32_t)((uint32_t)acc[i] - (c->u8 ? (uint32_t)comp[i % nr] : 0u));
                }
                if (c->ng == 1) { /* per-channel / per-tensor: the contract's acc * (sx * sw) + b */
                    panel_bias(c, p, bb);
                    for (int i = 0; i < mr; i++) {
                        float sx = c->sx[m0 + r + i];
                        float *yr = c->y + (m0 + r + i) * c->n + n0;
                        for (int64_t j = 0; j < cols; j++) yr[j] = (float)acc64[i * nr + j] * cq_scale_product(sx, ws[j]) + bb[j];
                    }
                } else { /* fused multiply-add, as the SIMD kernels' CQ_OUT_FACC epilogue */
                    for (int i = 0; i < mr * nr; i++)
                        facc[r * nr + i] = fmaf((float)acc64[i], cq_scale_product(c->sx[m0 + r + i / nr], ws[i % nr]),
                                                facc[r * nr + i]);
                }
            }
        }
        if (c->ng == 1) return;
    }
    /* per group: y = sum_g acc_g * (sx * sw_g) + b (sx inside each group's product: forming
     * acc_g * sw_g first overflowed where the true result is finite) */
    panel_bias(c, p, bb);
    for (int64_t r = 0; r < rows; r++) {
        float *yr = c->y + (m0 + r) * c->n + n0;
        for (int64_t j = 0; j < cols; j++) yr[j] = facc[r * nr + j] + bb[j];
    }
}

static void s8_unit(void *vctx, int64_t u)
{
    const lin_ctx *c = (const lin_ctx *)vctx;
    s8_unit_run(vctx, u);
    if (c->qcfg->gemm->release) c->qcfg->gemm->release(); /* AMX: the tile configuration */
}

/* cq_linear_add_ln: a unit is a block of mb rows through every panel (s8_unit_run's units of that
 * row block, in panel order), then the add + LayerNorm of those rows while they are in cache: the
 * same row kernel as cq_add_layer_norm_ex on the same values, so the same bits as the two calls. */
static void s8_rows_unit(void *vctx, int64_t mbi)
{
    const lin_ctx *c = (const lin_ctx *)vctx;
    for (int64_t p = 0; p < c->np; p++) s8_unit_run(vctx, p * c->nmb + mbi);
    if (c->qcfg->gemm->release) c->qcfg->gemm->release(); /* AMX: the tile configuration */
    const int64_t r0 = mbi * c->mb, r1 = r0 + c->mb < c->m ? r0 + c->mb : c->m;
    const ln_args *ln = c->ln;
    cq_add_ln_rows(c->isa, c->y + r0 * c->n, ln->residual + r0 * c->n, ln->residual_mul, r1 - r0, c->n,
                   ln->gamma, ln->beta, ln->eps, c->y + r0 * c->n);
}

/* M = 1, per-channel / per-tensor: a unit is 4 consecutive panels read as 4 concurrent streams.
 * Same integer sums and the same epilogue as s8_unit. */
/* acc[i*nr + j] = raw int32 sums (modulo 2^32) of steps [t0, t0 + nt) of panels pp[0..3] against the
 * quantized activation row: one GEMV call over the packed panels, or for int4 blocks of the 4 panels
 * expanded side by side in the caller's scratch (2 * I4_SCRATCH bytes, 64-byte aligned) with their
 * sums added. */
/* steps per panel of an int4 block of the 4 GEMV panels expanded side by side in 2 * I4_SCRATCH bytes */
static int64_t gemv4_i4_block(const lin_ctx *c) { return 2 * I4_SCRATCH / (4 * 4 * (int64_t)c->nr); }

static void qd8_gemv4_sums(const lin_ctx *c, const int64_t *pp, int64_t t0, int64_t nt, int32_t *acc, int8_t *scratch)
{
    const int nr = c->nr;
    const cq_qd8_gemv4_fn gemv = (cq_qd8_gemv4_fn)c->qcfg->gemv4->fn;
    const int8_t *panels[4];
    if (!c->i4) {
        for (int i = 0; i < 4; i++) panels[i] = panel_at(c, pp[i], t0);
        gemv(nr, nt, c->qa + 4 * t0, panels, c->kp4 * 4 * (int64_t)nr, acc);
        return;
    }
    int32_t part[4 * MAXNR] __attribute__((aligned(64)));
    const int64_t blk = gemv4_i4_block(c);
    memset(acc, 0, sizeof(int32_t) * 4 * (size_t)nr);
    for (int64_t t = t0; t < t0 + nt; t += blk) {
        int64_t n4 = t0 + nt - t < blk ? t0 + nt - t : blk;
        for (int i = 0; i < 4; i++) panels[i] = panel_blk(c, pp[i], t, n4, scratch + i * blk * 4 * nr);
        gemv(nr, n4, c->qa + 4 * t, panels, blk * 4 * (int64_t)nr, part);
        for (int i = 0; i < 4 * nr; i++) acc[i] = (int32_t)((uint32_t)acc[i] + (uint32_t)part[i]);
    }
}

static void s8_gemv4_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    const int nr = c->nr;
    int64_t p0 = 4 * u, pp[4];
    int32_t acc[4 * MAXNR] __attribute__((aligned(64)));
    int8_t scratch[2 * I4_SCRATCH] __attribute__((aligned(64))); /* int4: the expanded blocks */
    float ws[MAXNR], bb[MAXNR];
    int32_t comp[MAXNR];
    for (int i = 0; i < 4; i++) pp[i] = p0 + i < c->np ? p0 + i : c->np - 1; /* past the last: repeat it */
    qd8_gemv4_sums(c, pp, 0, c->kp4, acc, scratch);
    float sx = c->sx[0];
    for (int i = 0; i < 4 && p0 + i < c->np; i++) {
        int64_t p = p0 + i, cols = cols_of(c, p);
        const float *wsp = panel_scales_ref(c, p, ws), *bp = panel_bias_ref(c, p, bb);
        if (c->u8) panel_comp(c, p, 0, comp);
        float *yr = c->y + p * nr;
        for (int64_t j = 0; j < cols; j++) {
            int32_t v = (int32_t)((uint32_t)acc[i * nr + j] - (c->u8 ? (uint32_t)comp[j] : 0u));
            yr[j] = (float)v * cq_scale_product(sx, wsp[j]) + bp[j];
        }
    }
}

/* M = 1, per group: 4 panels read as 4 concurrent streams, one GEMV call per group (s8_unit's
 * 1-row tile over one panel reads a single stream and gathered its scales group by group: 4x
 * slower than per-channel at (11008, 4096)). Each group's sums are folded by the path's
 * facc_fold, s8_unit's CQ_OUT_FACC epilogue bit for bit; the scales of GB groups of the 4 panels
 * are gathered once, a contiguous read per row. */
enum { GB = 16 };

/* The scales of groups [g0, g0 + gn) of the 4 panels pp of a GEMV unit: wsb[g - g0][i*nr + j] (0 past
 * n). Each row's consecutive scales are one contiguous read (a per-group gather of 4*nr scalars, rows
 * ng floats apart, was 40% of a per-group GEMV); the lines of the block after next are prefetched
 * (rows ng floats apart defeat the hardware prefetcher). */
static void gather_scales(const lin_ctx *c, const int64_t *pp, int64_t g0, int64_t gn, float (*wsb)[4 * MAXNR])
{
    const int nr = c->nr;
    if (c->scheme == CQ_PER_CHANNEL) { /* one scale per row: each panel's are nr consecutive floats
                                         * (the general loop below was 4% of a (768, 768) M = 1 call) */
        for (int i = 0; i < 4; i++) {
            const int64_t row0 = pp[i] * nr, cols = c->n - row0 < nr ? c->n - row0 : nr;
            memcpy(&wsb[0][i * nr], c->scales + row0, (size_t)cols * sizeof(float));
            for (int64_t j = cols; j < nr; j++) wsb[0][i * nr + j] = 0.0f;
        }
        return;
    }
    for (int i = 0; i < 4; i++) {
        /* a whole panel of per-group scales: one register transpose (the per-row copy below took as
         * long as the int4 GEMV kernel itself) */
        const int whole = c->scheme == CQ_PER_GROUP && (pp[i] + 1) * nr <= c->n;
        for (int j = 0; j < nr; j++) {
            int64_t row = pp[i] * nr + j;
            if (row >= c->n) { for (int64_t g = 0; g < gn; g++) wsb[g][i * nr + j] = 0.0f; continue; }
            if (c->scheme == CQ_PER_TENSOR) { for (int64_t g = 0; g < gn; g++) wsb[g][i * nr + j] = c->scales[0]; continue; }
            const float *src = c->scales + row * c->ng + g0;
            if (g0 + 2 * GB < c->ng) __builtin_prefetch(src + 2 * GB);
            if (g0 == 0 && GB < c->ng) __builtin_prefetch(src + GB);
            if (!whole)
                for (int64_t g = 0; g < gn; g++) wsb[g][i * nr + j] = src[g];
        }
        if (whole) c->ew->transpose(c->scales + pp[i] * nr * c->ng + g0, c->ng, nr, (int)gn, &wsb[0][i * nr], 4 * MAXNR);
    }
}

static void s8_gemv4_group_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    const int nr = c->nr;
    int64_t p0 = 4 * u, last = c->np - 1, pp[4];
    for (int i = 0; i < 4; i++) pp[i] = p0 + i <= last ? p0 + i : last; /* past the last: repeat it */
    int32_t acc[4 * MAXNR] __attribute__((aligned(64)));
    float facc[4 * MAXNR], wsb[GB][4 * MAXNR], bb[MAXNR];
    int32_t comp[MAXNR];
    const float sx = c->sx[0];
    /* int4: the 4 panels expanded side by side a block of whole groups at a time (as qd8_gemv4_sums
     * lays them out), each group's GEMV reading its slice: one expansion per panel per block instead
     * of one per group (group 32 on AVX2: 16 groups a block) */
    int8_t scratch[2 * I4_SCRATCH] __attribute__((aligned(64)));
    const int64_t blk4 = gemv4_i4_block(c), pstride = blk4 * 4 * (int64_t)nr;
    const int64_t gpb = c->i4 && c->group4 <= blk4 ? blk4 / c->group4 : 0;
    const cq_qd8_gemv4_fn gemv = (cq_qd8_gemv4_fn)c->qcfg->gemv4->fn;
    int64_t eg0 = 0, eg1 = 0; /* the groups expanded in scratch */
    memset(facc, 0, sizeof facc);
    for (int64_t g0 = 0; g0 < c->ng; g0 += GB) {
        const int64_t gn = c->ng - g0 < GB ? c->ng - g0 : GB;
        gather_scales(c, pp, g0, gn, wsb);
        for (int64_t g = g0; g < g0 + gn; g++) {
            if (gpb) {
                if (g >= eg1) {
                    eg0 = g;
                    eg1 = g + gpb < c->ng ? g + gpb : c->ng;
                    /* (int4 groups are whole multiples of 8 k dividing k: kp4 = ng * group4) */
                    for (int i = 0; i < 4; i++)
                        (void)panel_blk(c, pp[i], eg0 * c->group4, (eg1 - eg0) * c->group4, scratch + i * pstride);
                }
                const int8_t *panels[4];
                for (int i = 0; i < 4; i++) panels[i] = scratch + i * pstride + (g - eg0) * c->group4 * 4 * (int64_t)nr;
                gemv(nr, c->group4, c->qa + 4 * g * c->group4, panels, pstride, acc);
            } else {
                qd8_gemv4_sums(c, pp, g * c->group4, c->group4, acc, scratch);
            }
            for (int i = 0; i < 4; i++) {
                if (c->u8) panel_comp(c, pp[i], g, comp);
                c->ew->facc_fold(nr, acc + i * nr, c->u8 ? comp : NULL, sx, wsb[g - g0] + i * nr, facc + i * nr);
            }
        }
    }
    for (int i = 0; i < 4 && p0 + i <= last; i++) {
        int64_t p = p0 + i, cols = cols_of(c, p);
        panel_bias(c, p, bb);
        float *yr = c->y + p * nr;
        for (int64_t j = 0; j < cols; j++) yr[j] = facc[i * nr + j] + bb[j];
    }
}

/* ---- weight-only ------------------------------------------------------------------------------ */
/* Weight-only GEMV (M < gemv_m; int4: M < 4): a unit is 4 consecutive panels read as concurrent
 * streams, and every row (or a block of them, c->gv_rs). */
/* int4: the 4 panels' slices of nr columns at step t8 of 8 k (16-column slices of 64-row panels on
 * AVX2) */
static void i4_slices(const lin_ctx *c, const int64_t *pp, int64_t t8, const int8_t **panels)
{
    const int64_t kp8 = c->kp4 / 2, step4 = 4 * (int64_t)c->h4.nr;
    for (int i = 0; i < 4; i++) {
        int64_t col = pp[i] * c->nr;
        panels[i] = c->codes4 + ((col / c->h4.nr) * kp8 + t8) * step4 + (col % c->h4.nr) * 4;
    }
}

static void wo_gemv4_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    const int nr = c->nr;
    const cq_f32_gemv4_fn gemv = (cq_f32_gemv4_fn)c->fcfg->gemv4->fn;
    int64_t ra, rb, p0 = gv_unit(c, u, &ra, &rb); /* this unit's rows; y[r - ra] is row r's */
    const int64_t m = rb - ra;
    const float *xa = c->x + ra * c->xlda;
    const int8_t *panels[4];
    float bb[MAXNR], y[WO_GEMV_MAX_M - 1][4 * MAXNR];
    float wsb[GB][4 * MAXNR]; /* the scales of GB groups, gathered once for all rows (gather_scales) */
    /* int4: every config's int4 GEMV expands the codes in registers, reading slices of the int4
     * panels directly (16-column slices of 64-row panels on AVX2) */
    const cq_f32_i4_gemv4_fn gemv_i4 = (cq_f32_i4_gemv4_fn)c->fcfg->gemv4_i4->fn;
    const int64_t step4 = 4 * (int64_t)c->h4.nr, kp8 = c->kp4 / 2;
    int64_t last = c->np - 1, pp[4];
    for (int i = 0; i < 4; i++) pp[i] = p0 + i <= last ? p0 + i : last; /* past the last: repeat it */
    for (int64_t r = 0; r < m; r++) memset(y[r], 0, sizeof y[r]); /* the rows this unit has */
    const cq_x24_i4_gemv4_fn gemv_x24 = c->xd ? (cq_x24_i4_gemv4_fn)c->fcfg->gemv4_i4_x24->fn : NULL;
    /* int8: all rows at once, in calls of up to the kernel's mr rows, as even as mr allows */
    const int mr = (int)cq_ceil_div(m, cq_ceil_div(m, c->fcfg->gemv4->mr));
    for (int64_t g0 = 0; g0 < c->ng; g0 += GB) {
        const int64_t gn = c->ng - g0 < GB ? c->ng - g0 : GB;
        gather_scales(c, pp, g0, gn, wsb);
        if (!gemv_x24 && !c->i4) {
            for (int64_t gi = g0; gi < g0 + gn; gi++) {
                const int64_t t0 = gi * c->group4;
                for (int i = 0; i < 4; i++) panels[i] = panel_at(c, pp[i], t0);
                for (int64_t r0 = 0; r0 < m; r0 += mr)
                    gemv((int)(m - r0 < mr ? m - r0 : mr), nr, c->group4, xa + r0 * c->xlda + 4 * t0,
                         c->xlda, panels, wsb[gi - g0], y[r0], 4 * MAXNR);
            }
            continue;
        }
        for (int64_t i = 0; i < m; i++) /* int4: row by row (row r = ra + i) */
            for (int64_t gi = g0; gi < g0 + gn; gi++) {
                const int64_t t0 = gi * c->group4, r = ra + i;
                const float *ws = wsb[gi - g0];
                const float *xr = c->x + r * c->xlda;
                if (gemv_x24) { /* segments: the group, or the chunks of a per-channel row */
                    const int64_t s0 = c->ng > 1 ? gi : 0, s1 = c->ng > 1 ? gi + 1 : c->nsegx;
                    for (int64_t sg = s0; sg < s1; sg++) {
                        const int64_t t8 = sg * c->seg8, n8 = kp8 - t8 < c->seg8 ? kp8 - t8 : c->seg8;
                        i4_slices(c, pp, t8, panels);
                        gemv_x24(nr, n8, c->xd + 3 * r * c->xds + 8 * t8, c->xds, c->xcomp + 3 * (r * c->nsegx + sg),
                                 c->xs[r], panels, step4, ws, y[i]);
                    }
                } else {
                    i4_slices(c, pp, t0 / 2, panels);
                    gemv_i4(nr, c->group4 / 2, xr + 4 * t0, panels, step4, ws, y[i]);
                }
            }
    }
    for (int64_t i = 0; i < m; i++)
        for (int q = 0; q < 4 && p0 + q <= last; q++) {
            int64_t p = p0 + q, cols = cols_of(c, p);
            panel_bias(c, p, bb);
            float *yr = c->y + (ra + i) * c->n + p * nr;
            const float up = c->xup[ra + i];
            for (int64_t j = 0; j < cols; j++) yr[j] = y[i][q * nr + j] * up + bb[j];
        }
}

/* The weight-only int4 GEMV in integers (gemv4_i4_x24, where the path has one): each row of x
 * (m < 4) as 24-bit fixed point, x[k] ~ xs * v[k] with xs = 2^(e - 21) for max|x| in [2^e,
 * 2^(e+1)), v = round_half_even(x[k] / xs), so |v| <= 2^22 and every x[k] is off by at most
 * max|x| * 2^-22 (float32's own rounding of x[k] * code is 2^-24 relative); v is split into balanced
 * base-256 digits (d0 + 256 d1 + 65536 d2, each in [-128, 127]) in three zero-padded planes. The
 * rows must be finite with max|x| 0 or in [2^-60, 2^60] (so xs, the digit sums and f * xs stay
 * normal and far from overflow); otherwise, or where the path has no such kernel, 0 (the float
 * GEMV runs). On success c->xd is allocated (the caller frees it).
 * Only for weights of at most X24_MAX_BYTES of int4 codes: the integer kernel does 2.6x the float
 * one's work per cycle (make mca, icelake-server / sapphirerapids: 27.6 against 10.7 weights per
 * cycle) and wins where the weight is in cache, but reads 2 of its 4 panels at a time, and where
 * the weight streams from memory it lost. Interleaved medians, one thread, this Xeon (Sapphire
 * Rapids class), 2026-11-30, integer / float GEMV, weight in cache (called twice) | caches flushed:
 * per channel (768, 768) 0.014 / 0.019 | 0.117 / 0.106 ms, (2048, 2048) 0.077 / 0.118 | 0.253 /
 * 0.234, (4096, 4096) 0.349 / 0.454 | 0.752 / 0.683, (4096, 11008) | 1.87 / 1.82; group 32
 * (768, 3072) 0.084 / 0.101 | 0.247 / 0.244, (4096, 4096) 0.583 / 0.708 | 1.16 / 1.11. A big weight
 * is more likely to be streamed (LLM decoding) than a small one (a BERT-sized model stays in L3). */
enum { X24_EMIN = -60, X24_EMAX = 60 };
#define X24_MAX_BYTES (4 << 20)
static int x24_prepare(lin_ctx *c)
{
    const cq_ukernel *uk = c->fcfg->gemv4_i4_x24;
    if (!uk || (uk->nr && uk->nr != c->nr)) return 0;
    if ((double)c->n * (double)(4 * c->kp4) / 2.0 > (double)X24_MAX_BYTES) return 0;
    const int64_t kp8 = c->kp4 / 2, k = c->k;
    int ex[WO_GEMV_MAX_M] = {0};
    for (int64_t r = 0; r < c->m; r++) {
        float amax = 0.0f;
        if (!c->ew->absmax(c->x + r * c->xlda, k, &amax)) return 0;
        if (amax == 0.0f) { ex[r] = 21; continue; } /* xs = 1, every digit 0 */
        ex[r] = ilogbf(amax);
        if (ex[r] < X24_EMIN || ex[r] > X24_EMAX) return 0;
    }
    const int64_t xds = 8 * kp8;
    int64_t seg8, nseg;
    if (c->ng > 1) { seg8 = c->group4 / 2; nseg = c->ng; }
    else { seg8 = CQ_X24_MAX_NK8; nseg = cq_ceil_div(kp8, seg8); } /* per channel: chunks the int32 sums allow */
    if (seg8 > CQ_X24_MAX_NK8 || !cq_bytes_ok(3 * c->m, xds, 1) || !cq_bytes_ok(3 * c->m, nseg, 4)) return 0;
    size_t dbytes = (size_t)(3 * c->m * xds);
    dbytes = (dbytes + 63) / 64 * 64;
    int8_t *xd = (int8_t *)cq_alloc64(dbytes + (size_t)(3 * c->m * nseg) * sizeof(int32_t));
    if (!xd) return 0;
    int32_t *comp = (int32_t *)(void *)(xd + dbytes);
    for (int64_t r = 0; r < c->m; r++) {
        const float *xr = c->x + r * c->xlda;
        int8_t *d0 = xd + 3 * r * xds, *d1 = d0 + xds, *d2 = d1 + xds;
        const float mul = ldexpf(1.0f, 21 - ex[r]);
        c->xs[r] = ldexpf(1.0f, ex[r] - 21);
        c->xup[r] = 1.0f;
        for (int64_t i = 0; i < k; i++) {
            const int32_t v = (int32_t)nearbyintf(xr[i] * mul); /* exact scaling, |v| <= 2^22 */
            const int32_t a = (int32_t)(int8_t)(uint8_t)(uint32_t)v, v1 = (v - a) / 256;
            const int32_t b = (int32_t)(int8_t)(uint8_t)(uint32_t)v1;
            d0[i] = (int8_t)a; d1[i] = (int8_t)b; d2[i] = (int8_t)((v1 - b) / 256);
        }
        memset(d0 + k, 0, (size_t)(xds - k)); memset(d1 + k, 0, (size_t)(xds - k)); memset(d2 + k, 0, (size_t)(xds - k));
        for (int64_t sg = 0; sg < nseg; sg++) {
            int64_t i0 = sg * seg8 * 8, i1 = i0 + seg8 * 8 < xds ? i0 + seg8 * 8 : xds;
            int32_t s0 = 0, s1 = 0, s2 = 0;
            for (int64_t i = i0; i < i1; i++) { s0 += d0[i]; s1 += d1[i]; s2 += d2[i]; }
            int32_t *cp = comp + 3 * (r * nseg + sg);
            cp[0] = 8 * s0; cp[1] = 8 * s1; cp[2] = 8 * s2;
        }
    }
    c->xd = xd; c->xds = xds; c->xcomp = comp; c->seg8 = seg8; c->nsegx = nseg;
    return 1;
}

/* The float weight-only GEMV sums x * code per column and scales once at the end, so its float32
 * sums could overflow where the GEMM (which dequantizes the weight first) and the true result are
 * finite: a row whose bound 127 * k * max|x| passes 2^100 is scaled by an exact power of two 2^-e
 * first and the outputs by 2^e after (before the bias, c->xup). The kernel reads whole steps of 4,
 * so such rows, or a k that is not a multiple of 4, get a padded copy (*scratch, freed by the
 * caller). CQ_OK or CQ_ERR_NOMEM. */
static int wo_gemv_rows(lin_ctx *c, void **scratch)
{
    const int64_t m = c->m, k = c->k;
    const float *x = c->x;
    int need_copy = 4 * c->kp4 != k, ex[WO_GEMV_MAX_M] = {0};
    for (int64_t r = 0; r < m; r++) {
        float amax = 0.0f;
        c->xup[r] = 1.0f;
        if (c->ew->absmax(x + r * k, k, &amax) && (double)amax * 127.0 * (double)k > 0x1p100) {
            frexp((double)amax * 127.0 * (double)k, &ex[r]);
            ex[r] -= 100;
            c->xup[r] = ldexpf(1.0f, ex[r]);
            need_copy = 1;
        }
    }
    if (need_copy) {
        int64_t lda = 4 * c->kp4;
        float *xp = (float *)calloc((size_t)(m * lda), sizeof(float));
        if (!xp) return CQ_ERR_NOMEM;
        for (int64_t r = 0; r < m; r++) {
            const float down = ldexpf(1.0f, -ex[r]);
            for (int64_t i = 0; i < k; i++) xp[r * lda + i] = x[r * k + i] * down;
        }
        c->x = xp; c->xlda = lda; *scratch = xp;
    }
    return CQ_OK;
}

/* One unit = a block of up to WO_MB rows of x times WO_COLS columns (WO_COLS / nr panels). The k
 * loop is outermost inside the unit, so the x block's kc columns stay in L2 while every panel of
 * the unit dequantizes its own kc x nr block (L1) and runs the float tiles. The outputs accumulate
 * in a contiguous local buffer, copied to y at the end: accumulating in y itself (rows n floats
 * apart, the same L1 sets as the rows of x when n == k) halved the tile's speed through L1 set
 * conflicts (Zen 3). */
static void wo_gemm_unit(void *vctx, int64_t u)
{
    lin_ctx *c = (lin_ctx *)vctx;
    const cq_f32_config *f = c->fcfg;
    const cq_f32_dequant_fn dequant = (cq_f32_dequant_fn)f->dequant->fn;
    const cq_f32_gemm_fn tile = (cq_f32_gemm_fn)f->gemm->fn;
    const int nr = c->nr, MR = f->gemm->mr;
    const int64_t ppu = WO_COLS / nr, kc = f->kc; /* kc is a multiple of 4 */
    int64_t npg = cq_ceil_div(c->np, ppu), pg = u % npg, mbi = u / npg;
    int64_t p0 = pg * ppu, p1 = p0 + ppu < c->np ? p0 + ppu : c->np;
    int64_t m0 = mbi * c->mb, rows = c->m - m0 < c->mb ? c->m - m0 : c->mb;
    float bblk[128 * 64] __attribute__((aligned(64))); /* kc * nr floats: at most 32 KiB */
    int8_t scratch[I4_SCRATCH] __attribute__((aligned(64))); /* int4: the block expanded */
    float cbuf[WO_MB * WO_COLS] __attribute__((aligned(64)));
    float ws[MAXNR], bb[MAXNR];
    for (int64_t p = p0; p < p1; p++) {
        panel_bias(c, p, bb);
        float *cp = cbuf + (p - p0) * WO_MB * nr;
        for (int64_t r = 0; r < rows; r++) memcpy(cp + r * nr, bb, sizeof(float) * (size_t)nr);
    }
    for (int64_t t0 = 0; t0 < c->kp4; t0 += kc / 4) {
        int64_t nt = c->kp4 - t0 < kc / 4 ? c->kp4 - t0 : kc / 4;
        int64_t kcur = c->k - 4 * t0 < 4 * nt ? c->k - 4 * t0 : 4 * nt;
        for (int64_t p = p0; p < p1; p++) {
            /* dequantize this block of the panel, one scale group at a time */
            for (int64_t t = t0; t < t0 + nt;) {
                int64_t gi = t / c->group4, gend = (gi + 1) * c->group4;
                int64_t seg = (gend < t0 + nt ? gend : t0 + nt) - t;
                panel_scales(c, p, gi, ws);
                dequant(nr, seg, panel_blk(c, p, t, seg, scratch), ws, bblk + (t - t0) * 4 * nr);
                t += seg;
            }
            float *cp = cbuf + (p - p0) * WO_MB * nr;
            for (int64_t r = 0; r < rows; r += MR) {
                int mr = (int)(rows - r < MR ? rows - r : MR);
                tile(mr, nr, kcur, c->x + (m0 + r) * c->xlda + 4 * t0, c->xlda, bblk, cp + r * nr, nr);
            }
        }
    }
    for (int64_t p = p0; p < p1; p++) {
        int64_t cols = cols_of(c, p);
        const float *cp = cbuf + (p - p0) * WO_MB * nr;
        for (int64_t r = 0; r < rows; r++) {
            memcpy(c->y + (m0 + r) * c->n + p * nr, cp + r * nr, (size_t)cols * sizeof(float));
            float a;
            if (!c->ew->absmax(cp + r * nr, cols, &a)) { /* (in cache: the rare overflow, see linear_impl) */
                __atomic_store_n(&c->rowbad[m0 + r], 1, __ATOMIC_RELAXED);
                __atomic_store_n(&c->nonfinite, 1, __ATOMIC_RELAXED);
            }
        }
    }
}

/* ---- entry points ------------------------------------------------------------------------------ */
int cq_gemm_s8s8s32(const int8_t *a, const int8_t *b, int64_t m, int64_t n, int64_t k, int32_t *c)
{
    if (m <= 0 || n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!a || !b || !c) return CQ_ERR_NULL;
    if (k > CQ_MAX_K_S32) return CQ_ERR_OVERFLOW;
    if (!cq_bytes_ok(m, k, 1) || !cq_bytes_ok(n, k, 1) || !cq_bytes_ok(m, n, 4)) return CQ_ERR_OVERFLOW;
    /* c is written by some units while others still read a (in place, on some paths) and b */
    if (cq_overlap(c, m * n * 4, a, m * k) || cq_overlap(c, m * n * 4, b, n * k)) return CQ_ERR_ALIAS;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    for (int64_t i = 0; i < m * k; i++)
        if (a[i] == -128) return CQ_ERR_RANGE;
    int format = cq_best_format(n);
    const cq_qd8_config *cfg = cq_qd8_config_for(isa, format, 0, m, cq_ceil_div(k, 4));
    int64_t psize = cq_packed_size(format, n, k, 0), kp4 = cq_ceil_div(k, 4), lda = 4 * kp4;
    if (psize < 0) return (int)psize;
    if (!cq_bytes_ok(m, lda, 1)) return CQ_ERR_OVERFLOW;
    int u8 = cfg->gemm->act_u8;
    int64_t mpad = cfg->pad_rows ? cq_ceil_div(m, cfg->pad_rows) * cfg->pad_rows : m;
    int tiled = cfg->gemm->a_tiled;
    int copy = (k % 4) || u8 || mpad > m || tiled;
    if (!cq_bytes_ok(mpad, lda, 1)) return CQ_ERR_OVERFLOW;
    int8_t *packed = (int8_t *)cq_alloc64((size_t)psize);
    int8_t *apad = copy ? (int8_t *)cq_alloc64((size_t)(mpad * lda)) : NULL;
    if (apad) memset(apad, 0, (size_t)(mpad * lda));
    int8_t *atile = tiled ? (int8_t *)cq_alloc64((size_t)(mpad * lda)) : NULL;
    if (!packed || (copy && !apad) || (tiled && !atile)) { free(packed); free(apad); free(atile); return CQ_ERR_NOMEM; }
    int st = cq_pack(format, b, n, k, 0, packed); /* also refuses -128 in b */
    if (st == CQ_OK) {
        if (apad)
            for (int64_t r = 0; r < m; r++) {
                for (int64_t i = 0; i < k; i++) apad[r * lda + i] = (int8_t)((uint8_t)a[r * k + i] ^ (u8 ? 0x80u : 0u));
                memset(apad + r * lda + k, u8 ? 0x80 : 0, (size_t)(lda - k));
            }
        if (tiled) tile_rows_16x64(apad, mpad, lda, atile);
        cq_pack_header h;
        cq_pack_read_header(packed, &h);
        lin_ctx ctx;
        memset(&ctx, 0, sizeof ctx);
        ctx.m = m; ctx.n = n; ctx.k = k; ctx.kp4 = kp4; ctx.nr = h.nr; ctx.np = h.np; ctx.nseg = h.nseg;
        ctx.u8 = u8; ctx.ng = 1; ctx.group4 = kp4; ctx.qcfg = cfg;
        ctx.mb = cfg->mb ? cfg->mb : S8_MB; ctx.nmb = cq_ceil_div(m, ctx.mb);
        ctx.qa = tiled ? atile : apad ? apad : a; ctx.codes = cq_pack_codes(packed); ctx.sums = cq_pack_sums(packed, &h);
        ctx.c32 = c;
        cq_set_last_kernel(cfg->gemm->name);
        int64_t nunits = ctx.np * ctx.nmb;
        run_units(&ctx, nunits, cq_threads_for((double)m * n * k, nunits), s8_unit, REGION_PANEL_ROWS);
    }
    free(packed);
    free(apad);
    free(atile);
    return st;
}

int cq_linear(int mode, const float *x, int64_t m, int64_t k, const void *packed,
              const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
              float *y)
{
    return cq_linear_ex(mode, x, m, k, packed, scales, scheme, group_size, n, bias, NULL, 0, 0.0f, y);
}

/* What cq_linear_multi's linears share: the activation pass, kept for the next weight when it
 * reads the same layout (dynamic: the quantized rows; weight-only: the transformed copy of x). */
typedef struct {
    int8_t *qa;        /* dynamic: codes (mpad x lda) followed by the m row scales; owned */
    int u8, tiled, gemv;
    int64_t lda, mpad;
    int ps;            /* the block holds room for the pair-safe arrays (after the row scales) */
    int64_t ps_kc4;    /* their k blocks */
    int64_t ps_n;      /* their state: entries (>= 0, qa prepared), -1: too many (qa as quantized) */
    size_t qa_cap;     /* capacity of qa (cq_scratch_get) */
    float *xm;         /* weight-only: x * x_mul (rotated), or NULL; owned (cq_scratch_get) */
    size_t xm_cap;
} act_cache;

/* One linear. check_only: every check (nothing written, nothing allocated), then CQ_OK. ac: NULL,
 * or the activation pass shared with the other linears of a cq_linear_multi call. */
static int linear_impl(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                       const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                       const float *x_mul, int64_t x_hadamard, float x_scale, int post, float *y,
                       int check_only, act_cache *ac, const ln_args *ln)
{
    if (mode != CQ_MODE_WEIGHT_ONLY && mode != CQ_MODE_DYNAMIC) return CQ_ERR_ARG;
    if (post != CQ_POST_NONE && post != CQ_POST_GELU) return CQ_ERR_ARG;
    if (ln && (post != CQ_POST_NONE || !(ln->eps >= 0.0f))) return CQ_ERR_ARG;
    /* the rotation: 0 (none) or a power of two >= 2 that divides k */
    if (x_hadamard != 0 && (x_hadamard < 2 || (x_hadamard & (x_hadamard - 1)) != 0 || k % x_hadamard != 0))
        return CQ_ERR_ARG;
    /* a static scale: finite > 0, dynamic mode only (0 means per-row dynamic scales) */
    if (!(x_scale == 0.0f || (x_scale > 0.0f && x_scale <= 3.402823466e38f))) return CQ_ERR_ARG;
    if (x_scale != 0.0f && mode != CQ_MODE_DYNAMIC) return CQ_ERR_ARG;
    if (m < 0) return CQ_ERR_SHAPE;
    int64_t ns = cq_num_scales(scheme, n, k, group_size);
    if (ns < 0) return (int)ns;
    if (!cq_bytes_ok(m, k, 4) || !cq_bytes_ok(m, n, 4) || !cq_bytes_ok(m, cq_ceil_div(k, 4), 16))
        return CQ_ERR_OVERFLOW;
    if (m == 0) return CQ_OK;
    if (!x || !packed || !scales || !y) return CQ_ERR_NULL;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    cq_pack_header h;
    if (cq_pack_read_header(packed, &h) != CQ_OK || h.n != n || h.k != k) return CQ_ERR_FORMAT;
    int64_t group4 = scheme == CQ_PER_GROUP ? group_size / 4 : h.kp4;
    if (h.seg4 != group4) return CQ_ERR_FORMAT;
    /* y is written while x, scales, bias and the packed weight are still being read (by other
     * threads, in blocks): no overlap of y with any of them, on every path and in every mode */
    if (cq_overlap(y, m * n * 4, x, m * k * 4) || cq_overlap(y, m * n * 4, scales, ns * 4) ||
        (bias && cq_overlap(y, m * n * 4, bias, n * 4)) || (x_mul && cq_overlap(y, m * n * 4, x_mul, k * 4)) ||
        cq_overlap(y, m * n * 4, packed, h.sums_off + h.sums_bytes))
        return CQ_ERR_ALIAS;
    if (ln) { /* the LayerNorm's inputs are read while rows of y are written */
        if (!ln->residual) return CQ_ERR_NULL;
        if (cq_overlap(y, m * n * 4, ln->residual, m * n * 4) ||
            (ln->residual_mul && cq_overlap(y, m * n * 4, ln->residual_mul, n * 4)) ||
            (ln->gamma && cq_overlap(y, m * n * 4, ln->gamma, n * 4)) ||
            (ln->beta && cq_overlap(y, m * n * 4, ln->beta, n * 4)))
            return CQ_ERR_ALIAS;
    }

    lin_ctx c;
    memset(&c, 0, sizeof c);
    c.m = m; c.n = n; c.k = k; c.kp4 = h.kp4; c.np = h.np; c.nr = h.nr; c.nseg = h.nseg;
    c.scheme = scheme;
    c.ng = scheme == CQ_PER_GROUP ? k / group_size : 1;
    c.group4 = group4;
    c.codes = cq_pack_codes(packed); c.sums = cq_pack_sums(packed, &h);
    c.scales = scales; c.bias = bias; c.y = y;
    c.ew = cq_elementwise_for(isa);
    c.isa = isa;
    c.post = post == CQ_POST_GELU ? c.ew->gelu : NULL;
    double work = (double)m * (double)n * (double)k;
    void *scratch = NULL;
    int fmt = h.format;
    if (cq_format_is_i4(fmt)) {
        /* int4: the kernels of the int8 format of the same panel width, or of panels of 16 where
         * this path's kernels read those (the expansion takes 16-row slices of a 64-row panel) */
        c.i4 = 1; c.h4 = h; c.codes4 = c.codes; c.codes = NULL; c.i4row = cq_i4_rows_for(isa);
        fmt = h.nr == 64 && cq_format_nr(cq_best_format_for(isa)) == 64 ? CQ_FORMAT_N64K4 : CQ_FORMAT_N16K4;
        c.nr = cq_format_nr(fmt);
        c.np = cq_ceil_div(n, c.nr);
        if (c.nr != h.nr) c.sums = NULL; /* the sums are per 64-row panel: only u8 kernels read them */
        if (c.ng > 1 && c.group4 > i4_block(&c)) return CQ_ERR_GROUP; /* cq_pack refuses these */
    }

    if (x_mul) { /* the pre-scale must be finite (a NaN would spread to every row) */
        float amax;
        if (!c.ew->absmax(x_mul, k, &amax)) return CQ_ERR_NONFINITE;
    }

    if (mode == CQ_MODE_WEIGHT_ONLY) {
        c.fcfg = cq_f32_config_for(isa, fmt);
        if (!c.fcfg) return CQ_ERR_FORMAT;
        if (check_only) return CQ_OK;
        float *xm = NULL;
        size_t xm_cap = 0;
        if ((x_mul || x_hadamard) && ac && ac->xm) {
            x = ac->xm; /* the copy the previous weight made */
        } else if (x_mul || x_hadamard) { /* weight-only kernels read float x as it is: one transformed copy */
            if (!cq_bytes_ok(m, k, 4)) return CQ_ERR_OVERFLOW;
            xm = (float *)cq_scratch_get((size_t)(m * k) * sizeof(float), &xm_cap);
            if (!xm) return CQ_ERR_NOMEM;
            for (int64_t r = 0; r < m; r++) {
                float amax;
                if (x_hadamard)
                    c.ew->hadamard_absmax(x + r * k, x_mul, k, x_hadamard, xm + r * k, &amax);
                else
                    for (int64_t i = 0; i < k; i++) xm[r * k + i] = x[r * k + i] * x_mul[i];
            }
            x = xm;
            if (ac) { /* kept for the next weight (freed by the caller) */
                ac->xm = xm;
                ac->xm_cap = xm_cap;
                xm = NULL;
            }
        }
        c.x = x; c.xlda = k;
        if (m < (c.i4 ? WO_GEMM_MIN_M : c.fcfg->gemv_m)) {
            if (c.i4 && x24_prepare(&c)) scratch = (void *)c.xd; /* int4 in integers: x as fixed-point digits */
            else if (wo_gemv_rows(&c, &scratch) != CQ_OK) { cq_scratch_put(xm, xm_cap); return CQ_ERR_NOMEM; }
            cq_set_last_kernel((c.xd ? c.fcfg->gemv4_i4_x24 : c.i4 ? c.fcfg->gemv4_i4 : c.fcfg->gemv4)->name);
            int64_t nunits = cq_ceil_div(c.np, 4);
            /* several rows and few groups of 4 panels for the threads: the rows in 2 blocks (each
             * group's weight is then read twice, from cache at this size). (768, 768) M = 6 / 8,
             * 2 threads: 3 units of 4 panels measured 0.87 / 0.84x the tile's time (one thread did
             * two of them) */
            const int64_t T = cq_threads_for(work, nunits);
            if (!c.i4 && m >= 4 && T > 1 && nunits < 4 * T) {
                c.gv_rs = 2;
                nunits *= 2;
            }
            run_units(&c, nunits, cq_threads_for(work, nunits), wo_gemv4_unit, REGION_GEMV4);
        } else {
            cq_set_last_kernel(c.fcfg->gemm->name);
            c.mb = WO_MB; c.nmb = cq_ceil_div(m, WO_MB);
            c.rowbad = (unsigned char *)calloc((size_t)m, 1);
            if (!c.rowbad) { free(scratch); cq_scratch_put(xm, xm_cap); return CQ_ERR_NOMEM; }
            int64_t nunits = cq_ceil_div(c.np, WO_COLS / c.nr) * c.nmb;
            run_units(&c, nunits, cq_threads_for(work, nunits), wo_gemm_unit, REGION_WO_GEMM);
            /* A row whose float32 sums overflowed although its x is finite (values near FLT_MAX: the
             * tiles do not scale rows, whose true results may still be in range) is computed again
             * by the GEMV, which scales such rows by a power of two (wo_gemv_rows). The units flag
             * the rows with a non-finite output as they write them (before a fused post-op, whose
             * GELU would map -Inf to 0); a row of x that is not finite keeps its NaN / Inf outputs. */
            for (int64_t r = 0; __atomic_load_n(&c.nonfinite, __ATOMIC_RELAXED) && r < m; r++) {
                float a; /* only after a unit saw a non-finite output (the units check theirs in cache) */
                if (!c.rowbad[r] || !c.ew->absmax(c.x + r * c.xlda, k, &a)) continue;
                lin_ctx g = c;
                void *gs = NULL;
                g.m = 1; g.x = c.x + r * c.xlda; g.xlda = k; g.y = y + r * n;
                if (wo_gemv_rows(&g, &gs) != CQ_OK) {
                    free(c.rowbad); free(scratch); cq_scratch_put(xm, xm_cap);
                    return CQ_ERR_NOMEM;
                }
                run_units(&g, cq_ceil_div(g.np, 4), 1, wo_gemv4_unit, REGION_GEMV4);
                free(gs);
            }
            free(c.rowbad);
        }
        free(scratch);
        cq_scratch_put(xm, xm_cap);
        return ln ? cq_add_layer_norm_ex(y, ln->residual, ln->residual_mul, m, n, ln->gamma, ln->beta, ln->eps, y)
                  : CQ_OK;
    }

    /* dynamic: quantize rows of x (s8, or u8 for kernels that want it; zero-padded to whole
     * steps of 4), then integer tiles */
    c.qcfg = cq_qd8_config_for(isa, fmt, c.ng > 1 ? c.group4 : c.kp4 > CQ_CHUNK4 ? c.kp4 : 0, m, c.kp4);
    if (!c.qcfg) return CQ_ERR_FORMAT;
    /* M = 1: the 4-stream GEMV, per channel (one sum) or per group (a call per group) */
    int gemv = m == 1 && c.qcfg->gemv4 && (c.ng == 1 ? c.kp4 <= CQ_CHUNK4 : c.group4 <= CQ_CHUNK4);
    const cq_ukernel *uk = gemv ? c.qcfg->gemv4 : c.qcfg->gemm;
    c.u8 = uk->act_u8;
    int64_t lda = 4 * c.kp4;
    /* rows the kernel reads: whole blocks of pad_rows (zero codes past m) */
    int64_t mpad = c.qcfg->pad_rows && !gemv ? cq_ceil_div(m, c.qcfg->pad_rows) * c.qcfg->pad_rows : m;
    if (!cq_bytes_ok(mpad, lda, 1)) return CQ_ERR_OVERFLOW;
    /* the pair-safe tile (per-channel / per-tensor in one int32 chunk): its arrays follow the row
     * scales in the same scratch block; at most ps_max residual entries, else the config's tile
     * runs (a residual entry costs a few instructions per 16 columns, against 64 k x 16 columns of
     * the tile's work per entry at the limit). The rows are prepared in the activation pass (on its
     * threads, each row while in L1), so it pays from N = 64 (Zen 3, interleaved A/B against the
     * sign tile, 2026-12-01, geometric mean of both import orders (which differed by up to 10% on
     * this VM: small effects are not resolved), 1 / 2 threads: (K, N) (4096, 64)
     * M = 64 1.05 / 1.03, (4096, 128) M = 256 1.06 / 1.07, (1024, 128) M = 64 1.04 / -, 2 threads
     * (768, 64) M = 64 / 256 1.00 / 0.97, (768, 32) 0.95 / 0.90, (768, 16) 0.91 / 0.86). On
     * AVX-512BW (nr 64: N = 64 is one panel) natively on a Sapphire Rapids-class Xeon, 2026-12-01,
     * CQUANT_ISA=avx512, 1 thread, against the sign tile: (768, 64) M = 8 / 64 / 256 1.17 / 1.18 /
     * 1.20, (4096, 64) 1.32 / 1.28 / 1.24, (768, 128) 1.31, (1536, 128) 1.33-1.38; the bench
     * shapes 1.15-1.54 at M >= 8. */
    const int want_ps = !gemv && c.qcfg->gemm_ps && c.ng == 1 && c.kp4 <= CQ_CHUNK4 && !uk->a_tiled && mpad == m &&
                        n >= PS_MIN_N;
    if (want_ps && !cq_bytes_ok(m, 4 * c.kp4 + 32, 4)) return CQ_ERR_OVERFLOW; /* bounds qa_bytes below */
    /* at most 1 entry per 64 k over the rows, and per row 1 per 16 k (the row's slots) */
    const int64_t ps_max = m * c.kp4 / 16, ps_cap = c.kp4 / 4 + 1;
    /* the tile calls' k blocks: int4 blocks at most i4_block; int8 rows in one block up to K =
     * PS_BLOCK_K (the panel's slice in L2 rather than L1; one call with each row's entries rather
     * than one per block). Zen 3 (nr 16), A/B, both import orders, 1 thread, against blocks of
     * 1024 k: MiniLM's FFN output (K = 1536, N = 384, M = 800) 1.05 plain / 1.07 rotated, (4096,
     * 4096) M = 64 / 256 1.07 / 1.07, (16384, 1024) / (8192, 2048) M = 64 1.02 / 1.03 (orders
     * disagreeing: 0.96 / 1.08). AVX-512BW (nr 64) on the Sapphire Rapids-class Xeon, 2026-12-01,
     * CQUANT_ISA=avx512, 1 thread, one block up to K = 16384 against up to 4096 (a 256 KiB slice):
     * (8192, 2048) M = 64 / 256 1.07 / 1.11, (16384, 1024) 1.06 / 1.10, (8192, 4096) 1.09 / 1.11;
     * a 128 KiB slice (K <= 2048) lost 1.04-1.07 at (4096, 4096) / (4096, 11008); one block at
     * K = 32768 against 4: 1.03 / 0.99, not resolved, so the bound stays at 16384. Else s8_kc4's */
    int64_t ps_kc4 = s8_kc4(&c);
    if (c.i4 && ps_kc4 > i4_block(&c)) ps_kc4 = i4_block(&c);
    else if (!c.i4 && c.kp4 * 4 <= PS_BLOCK_K) ps_kc4 = c.kp4;
    const int64_t ps_ld = cq_ceil_div(c.kp4, ps_kc4) + 1;
    const int64_t off_ps = (mpad * lda + m * 4 + 7) / 8 * 8, off_cnt = off_ps + (m * ps_ld * 4 + 7) / 8 * 8,
                  off_row = off_cnt + (m * ps_ld * 4 + 7) / 8 * 8, off_ent = off_row + (m + 1) * 8;
    const int64_t qa_bytes = want_ps ? off_ent + m * ps_cap * 4 * CQ_PS_ENT : mpad * lda + m * 4;
    if (check_only) return CQ_OK;
    int tiled = uk->a_tiled && !gemv; /* written straight into the kernel's 16 x 64-byte tiles */
    int8_t *qa;
    float *sx;
    size_t qa_cap = 0;
    int64_t ps_n = -1;
    if (ac && ac->qa && ac->u8 == c.u8 && ac->tiled == tiled && ac->gemv == gemv && ac->lda == lda && ac->mpad == mpad &&
        ac->ps == want_ps && (!want_ps || ac->ps_kc4 == ps_kc4)) {
        qa = ac->qa; /* the previous weight's activation pass, in the layout this kernel reads */
        sx = (float *)(void *)(qa + mpad * lda);
        ps_n = ac->ps_n;
    } else {
        /* the calling thread's kept scratch (cq_scratch_get): no fresh pages to fault in per call */
        qa = (int8_t *)cq_scratch_get((size_t)qa_bytes, &qa_cap);
        if (!qa) return CQ_ERR_NOMEM;
        sx = (float *)(void *)(qa + mpad * lda); /* mpad*lda is a multiple of 4: aligned */
        /* padding rows: zero codes (in the tiled layout they share the last block with rows < m,
         * which the quantizer then writes over) */
        int64_t pad0 = tiled ? m / 16 * 16 : m;
        if (mpad > m) memset(qa + pad0 * lda, c.u8 ? 0x80 : 0, (size_t)((mpad - pad0) * lda));
        /* pair-safe: each row prepared in the activation pass, right after its codes */
        cq_ps_rows ps = {ps_kc4, ps_cap, ps_ld, (int32_t *)(void *)(qa + off_ps), (int32_t *)(void *)(qa + off_cnt),
                         (int32_t *)(void *)(qa + off_ent), (int64_t *)(void *)(qa + off_row), 0, 0};
        if (cq_quantize_rows_into(c.ew, x, m, k, lda, c.u8 ? 0x80 : 0, tiled, qa, sx, x_mul,
                                  x_scale, x_hadamard, want_ps ? &ps : NULL) != CQ_OK) {
            cq_scratch_put(qa, qa_cap);
            return CQ_ERR_NOMEM;
        }
        if (want_ps) {
            ps_n = ps.total;
            if (ps.over || ps.total > ps_max) { /* too many: the config's tile, on the codes as they were */
                for (int64_t r = 0; r < m; r++)
                    cq_ps_restore(qa + r * lda, 0, ps.ent + CQ_PS_ENT * r * ps_cap, ps.cnt[r * ps_ld + ps_ld - 1]);
                ps_n = -1;
            }
        }
        if (ac) { /* kept for the next weight (the caller hands the last one back) */
            cq_scratch_put(ac->qa, ac->qa_cap);
            ac->qa = qa; ac->qa_cap = qa_cap; ac->u8 = c.u8; ac->tiled = tiled; ac->gemv = gemv; ac->lda = lda;
            ac->mpad = mpad; ac->ps = want_ps; ac->ps_n = ps_n; ac->ps_kc4 = ps_kc4;
        }
    }
    if (want_ps && ps_n >= 0) {
        uk = c.gemm = c.qcfg->gemm_ps;
        c.ps_sum = (const int32_t *)(const void *)(qa + off_ps);
        c.ps_cnt = (const int32_t *)(const void *)(qa + off_cnt);
        c.ps_row = (const int64_t *)(const void *)(qa + off_row);
        c.ps_ent = (const int32_t *)(const void *)(qa + off_ent);
        c.ps_kc4 = ps_kc4;
        c.ps_ld = ps_ld;
    }
    c.qa = qa; c.sx = sx; c.mb = c.qcfg->mb ? c.qcfg->mb : S8_MB;
    /* int4: a unit expands its panel's blocks once for all its rows, so units take as many rows
     * as they can (MAXMB, a multiple of every kernel's pad_rows) */
    if (c.i4 && m > c.mb) c.mb = MAXMB;
    c.nmb = cq_ceil_div(m, c.mb);
    cq_set_last_kernel(uk->name);
    if (gemv) {
        int64_t nunits = cq_ceil_div(c.np, 4);
        run_units(&c, nunits, cq_threads_for(work, nunits), c.ng > 1 ? s8_gemv4_group_unit : s8_gemv4_unit,
                  REGION_GEMV4);
    } else if (ln) { /* units of whole rows: the add + LayerNorm on each block as it is finished */
        c.ln = ln;
        run_units(&c, c.nmb, cq_threads_for(work, c.nmb), s8_rows_unit, REGION_PANEL_ROWS);
    } else {
        int64_t nunits = c.np * c.nmb;
        run_units(&c, nunits, cq_threads_for(work, nunits), s8_unit, REGION_PANEL_ROWS);
    }
    if (!ac) cq_scratch_put(qa, qa_cap);
    if (ln && gemv) /* the GEMVs' units are columns: the add + LayerNorm as a pass after them */
        return cq_add_layer_norm_ex(y, ln->residual, ln->residual_mul, m, n, ln->gamma, ln->beta, ln->eps, y);
    return CQ_OK;
}

int cq_linear_ex(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                 const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                 const float *x_mul, int64_t x_hadamard, float x_scale, float *y)
{
    return cq_linear_post(mode, x, m, k, packed, scales, scheme, group_size, n, bias, x_mul, x_hadamard, x_scale,
                          CQ_POST_NONE, y);
}

int cq_linear_post(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                   const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                   const float *x_mul, int64_t x_hadamard, float x_scale, int post, float *y)
{
    return linear_impl(mode, x, m, k, packed, scales, scheme, group_size, n, bias, x_mul, x_hadamard, x_scale,
                       post, y, 0, NULL, NULL);
}

int cq_linear_add_ln(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                     const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                     const float *x_mul, int64_t x_hadamard, float x_scale, const float *residual,
                     const float *residual_mul, const float *gamma, const float *beta, float eps, float *y)
{
    const ln_args ln = {residual, residual_mul, gamma, beta, eps};
    return linear_impl(mode, x, m, k, packed, scales, scheme, group_size, n, bias, x_mul, x_hadamard, x_scale,
                       CQ_POST_NONE, y, 0, NULL, &ln);
}

int cq_linear_multi(int mode, const float *x, int64_t m, int64_t k, int count, const void *const *packed,
                    const float *const *scales, int scheme, int64_t group_size, const int64_t *n,
                    const float *const *bias, const float *x_mul, int64_t x_hadamard, float x_scale,
                    float *const *y)
{
    if (count < 1 || count > CQ_MULTI_MAX) return CQ_ERR_ARG;
    if (!packed || !scales || !n || !y) return CQ_ERR_NULL;
    /* every linear's own checks first, and no output over another linear's inputs or output: all
     * refusals come before anything is written */
    for (int i = 0; i < count; i++) {
        int st = linear_impl(mode, x, m, k, packed[i], scales[i], scheme, group_size, n[i], bias ? bias[i] : NULL,
                             x_mul, x_hadamard, x_scale, CQ_POST_NONE, y[i], 1, NULL, NULL);
        if (st != CQ_OK) return st;
    }
    if (m == 0) return CQ_OK;
    for (int j = 0; j < count; j++) {
        cq_pack_header h;
        cq_pack_read_header(packed[j], &h); /* checked above */
        const int64_t ns = cq_num_scales(scheme, n[j], k, group_size);
        for (int i = 0; i < count; i++) {
            const int64_t ybytes = m * n[i] * 4;
            if (i != j && (cq_overlap(y[i], ybytes, y[j], m * n[j] * 4) || cq_overlap(y[i], ybytes, scales[j], ns * 4) ||
                           (bias && bias[j] && cq_overlap(y[i], ybytes, bias[j], n[j] * 4)) ||
                           cq_overlap(y[i], ybytes, packed[j], h.sums_off + h.sums_bytes)))
                return CQ_ERR_ALIAS;
        }
    }
    act_cache ac;
    memset(&ac, 0, sizeof ac);
    int st = CQ_OK;
    for (int i = 0; i < count && st == CQ_OK; i++)
        st = linear_impl(mode, x, m, k, packed[i], scales[i], scheme, group_size, n[i], bias ? bias[i] : NULL, x_mul,
                         x_hadamard, x_scale, CQ_POST_NONE, y[i], 0, &ac, NULL);
    cq_scratch_put(ac.qa, ac.qa_cap);
    cq_scratch_put(ac.xm, ac.xm_cap);
    return st;
}
