/* test_kernels.c - C tests of the core (kernel layer v2).
 *
 * 1. Registry-driven micro-kernel tests: every entry of the registry (cq_ukernel_count /
 *    cq_ukernel_at) whose ISA this CPU runs (cq_cpu_has; "skip <isa>" otherwise) against the
 *    reference semantics written in internal.h, computed here independently: integer sums exactly
 *    (int64, reduced modulo 2^32 where the interface says so), the qd8 F32 epilogue bit-exactly
 *    (y = (float)s' * (sx * sw) + b, evaluated in the same float operations), float kernels within
 *    a budget scaled with their sum length. Outputs are pre-filled with sentinels and surrounded by
 *    guard bands (and gaps between rows, ldy / ldc > the row) that must stay untouched; inputs are
 *    never constant, so a kernel that writes nothing or ignores a row or a column cannot pass.
 * 2. The element-wise tables (absmax, quantize s8/u8, dequantize bit-exact against
 *    cq_elementwise_ref; GELU within its documented error).
 * 3. The public API on every ISA path (cq_set_isa) against plain-C references: quantize,
 *    dequantize, pack / unpack / packed_info (both formats), cq_linear (both modes, every scheme,
 *    GEMV and GEMM shapes, ragged n and k, k past an int32 chunk), cq_gemm_s8s8s32 (k up to
 *    CQ_MAX_K_S32), the kernel that ran (cq_last_kernel), thread-count invariance, the float32
 *    layers (GELU, LayerNorm with a residual, softmax, attention); then corrupted or mismatched
 *    packed buffers (CQ_ERR_FORMAT) and bad arguments.
 *
 * Built as build/tests/test_kernels; tests/c/test_avx512_emu.c includes this file with
 * CQ_TEST_EMU defined (kernels whose intrinsics SIMDe emulates: every emulated ISA "runs", and
 * the slowest cases are left out). Ends with "N passed, M failed"; exits non-zero on failure. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <float.h>
#include <string.h>
#include <time.h>
#include "internal.h"

#ifdef CQ_TEST_EMU
#define EMU 1
#else
#define EMU 0
#endif

static int failures = 0, checks = 0, printed = 0;
#define MAX_PRINTED 60
#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        checks++;                                                                                 \
        if (!(cond)) {                                                                            \
            failures++;                                                                           \
            if (printed++ < MAX_PRINTED) {                                                        \
                fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                             \
                fprintf(stderr, __VA_ARGS__);                                                     \
                fprintf(stderr, "\n");                                                            \
            }                                                                                     \
        }                                                                                         \
    } while (0)

/* ---- helpers ------------------------------------------------------------------------------------ */
static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rnd01(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }
static float rndf(void) { return (float)(rnd01() * 2.0 - 1.0); }          /* [-1, 1) */
static float rnd_pos(float lo, float hi) { return lo + (hi - lo) * (float)rnd01(); }
static int8_t rnd_code(void) { return (int8_t)((int)(rnd() % 255) - 127); } /* [-127, 127] */
static int8_t rnd_pm127(void) { return (rnd() >> 20) & 1 ? 127 : -127; }
static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

/* Guarded buffers of 4-byte words: GUARD words on each side (64 bytes, so the interior is 64-byte
 * aligned as the kernels' aligned loads and stores want), everything filled with a sentinel. */
#define GUARD 16
#define SENT_I32 0x5a5a5a5au
#define SENT_F32 0x7fc00badu /* a NaN pattern */
static void *gb_new(size_t words, uint32_t fill)
{
    void *base = NULL;
    size_t total = words + 2 * GUARD;
    if (posix_memalign(&base, 64, total * 4) != 0) { fprintf(stderr, "out of memory\n"); exit(2); }
    uint32_t *w = (uint32_t *)base;
    for (size_t i = 0; i < total; i++) w[i] = fill;
    return w + GUARD;
}
static int gb_guards_ok(const void *p, size_t words, uint32_t fill)
{
    const uint32_t *w = (const uint32_t *)p;
    for (int i = 1; i <= GUARD; i++)
        if (w[-i] != fill) return 0;
    for (size_t i = 0; i < GUARD; i++)
        if (w[words + i] != fill) return 0;
    return 1;
}
static void gb_free(void *p)
{
    if (p) free((uint32_t *)p - GUARD);
}

/* The qd8 F32 epilogue of internal.h, one float operation at a time (no contraction). */
static float epi_f32(int32_t s, float sx, float sw, float b)
{
    volatile float scale = sx * sw;
    volatile float prod = (float)s * scale;
    return prod + b;
}

/* ISA paths, lowest first (cquant.h: scalar < avx2 < avxvnni < avx512 < avx512vnni < amx). */
static const int PATHS[] = {CQ_ISA_SCALAR, CQ_ISA_AVX2, CQ_ISA_AVXVNNI, CQ_ISA_AVX512, CQ_ISA_AVX512VNNI, CQ_ISA_AMX};
#define NPATHS ((int)(sizeof PATHS / sizeof PATHS[0]))
static int path_rank(int isa)
{
    for (int i = 0; i < NPATHS; i++)
        if (PATHS[i] == isa) return i;
    return 99;
}
/* Whether the path may run a kernel of this ISA (cquant.h): those of the paths below it, except
 * AVX-VNNI's, which run on avxvnni, and on avx512vnni / amx where the CPU has AVX-VNNI. */
static int path_allows(int path, int isa)
{
    if (isa == CQ_ISA_AVXVNNI && path != CQ_ISA_AVXVNNI)
        return (path == CQ_ISA_AVX512VNNI || path == CQ_ISA_AMX) && cq_cpu_has(CQ_ISA_AVXVNNI);
    return path_rank(isa) <= path_rank(path);
}

/* Whether a kernel of this ISA can run here: the CPU has it, or (emulated build) SIMDe emulates
 * its intrinsics (AVX2, AVX-VNNI, AVX-512; not AMX). */
static int isa_runs(int isa)
{
    if (EMU && (isa == CQ_ISA_AVX2 || isa == CQ_ISA_AVXVNNI || isa == CQ_ISA_AVX512 || isa == CQ_ISA_AVX512VNNI))
        return 1;
    return cq_cpu_has(isa);
}

/* ==== 1. registry-driven micro-kernel tests ====================================================== */

/* Extra constraints of an int8 GEMM kernel (its registry entry): nk4 a multiple of k4_multiple,
 * pad_rows rows of activations readable whatever mr is. */
static void qd8_constraints(const cq_ukernel *uk, int *k4_multiple, int *pad_rows)
{
    *k4_multiple = uk->k4_multiple > 1 ? uk->k4_multiple : 1;
    *pad_rows = uk->pad_rows > 0 ? uk->pad_rows : 0;
}

/* The k4-step counts: small and ragged ones, long ones, one large (not in emulation). */
static int nk4_list(int k4m, int64_t *out)
{
    static const int64_t base[] = {1, 2, 3, 5, 8, 17, 64, 129, 4096};
    int n = 0;
    for (unsigned i = 0; i < sizeof base / sizeof base[0]; i++) {
        int64_t v = base[i];
        if (EMU && v > 1024) continue;
        if (k4m > 1) v = v < 8 ? v * k4m : cq_ceil_div(v, k4m) * k4m;
        if (n && out[n - 1] >= v) continue;
        out[n++] = v;
    }
    return n;
}

/* One int8 GEMM test case: `rows` rows of activations against one panel of nr columns. */
enum { KIND_RANDOM, KIND_EXTREME, KIND_WRAP };
typedef struct {
    int nr, rows, u8;
    int64_t nk4, lda;
    int8_t *a;      /* rows x lda as the kernel reads it (u8 kernels: code ^ 0x80 = code + 128) */
    int8_t *b;      /* the panel: nk4 steps of nr x 4 codes */
    int64_t *dot;   /* rows x nr: exact sums of code products */
    int64_t colsum[64];
    int32_t comp[64]; /* 128 * column sums modulo 2^32: the compensation of u8 kernels */
    int32_t alt[64];  /* an arbitrary compensation (the interface subtracts whatever it is given) */
} qcase;

static void qcase_make(qcase *c, int nr, int rows, int u8, int64_t nk4, int kind)
{
    c->nr = nr; c->rows = rows; c->u8 = u8; c->nk4 = nk4;
    c->lda = 4 * nk4 + 12; /* rows further apart than their k: the tail must not be read */
    if (c->lda < 80) c->lda = 80; /* room for a tiled copy's 64-byte tile rows (qcase_rows) */
    c->a = (int8_t *)xmalloc((size_t)(rows * c->lda));
    c->b = (int8_t *)xmalloc((size_t)(nk4 * nr * 4));
    c->dot = (int64_t *)xmalloc(sizeof(int64_t) * (size_t)(rows * nr));
    int8_t *codes = (int8_t *)xmalloc((size_t)(rows * c->lda));
    for (int64_t i = 0; i < rows * c->lda; i++) {
        int64_t r = i / c->lda, kk = i % c->lda;
        int8_t v = kind == KIND_RANDOM ? rnd_code() : kind == KIND_EXTREME ? rnd_pm127()
                 : (r % 2 == 0 ? 127 : -127);
        if (kind == KIND_WRAP && r >= 2) v = rnd_pm127();
        if (kk >= 4 * nk4) v = rnd_code(); /* past k: garbage that must not count */
        codes[i] = v;
        c->a[i] = (int8_t)((uint8_t)v ^ (u8 ? 0x80u : 0u));
    }
    for (int64_t t = 0; t < nk4; t++)
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < 4; i++) {
                int8_t v;
                if (kind == KIND_RANDOM) v = rnd_code();
                else if (kind == KIND_EXTREME) v = rnd_pm127();
                else v = j % 4 == 0 ? 127 : j % 4 == 1 ? -127 : j % 4 == 2 ? ((t + i) % 2 ? 127 : -127) : rnd_pm127();
                c->b[(t * nr + j) * 4 + i] = v;
            }
    for (int j = 0; j < nr; j++) {
        int64_t s = 0;
        for (int64_t t = 0; t < nk4; t++)
            for (int i = 0; i < 4; i++) s += c->b[(t * nr + j) * 4 + i];
        c->colsum[j] = s;
        c->comp[j] = (int32_t)(uint32_t)((uint64_t)(128 * s) & 0xffffffffu);
        c->alt[j] = (int32_t)(rnd() % 20001) - 10000;
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < nr; j++) {
            int64_t s = 0;
            const int8_t *ar = codes + r * c->lda;
            for (int64_t t = 0; t < nk4; t++) {
                const int8_t *bp = c->b + (t * nr + j) * 4;
                s += (int64_t)ar[4 * t] * bp[0] + (int64_t)ar[4 * t + 1] * bp[1] +
                     (int64_t)ar[4 * t + 2] * bp[2] + (int64_t)ar[4 * t + 3] * bp[3];
            }
            c->dot[r * nr + j] = s;
        }
    free(codes);
}
static void qcase_free(qcase *c)
{
    free(c->a); free(c->b); free(c->dot);
}
/* What the kernel sums for (r, j), modulo 2^32: the dot product, plus 128 * column sum for u8. */
static uint32_t qcase_raw(const qcase *c, int r, int j)
{
    int64_t v = c->dot[r * c->nr + j] + (c->u8 ? 128 * c->colsum[j] : 0);
    return (uint32_t)((uint64_t)v & 0xffffffffu);
}

enum { COMP_NULL, COMP_STD, COMP_ALT };
typedef struct { int mode, acc_in, nc, bias, comp; } qmode;
/* The pair-safe rows of a tile call, as the kernels read them: m rows of lda codes prepared with
 * cq_ps_prepare_row (the reference's block scan), their entries packed one row after the other
 * (rowptr, m + 1) and sums / counts nb + 1 per row; at most max_ent entries in all, else -1 with
 * every row as it was. */
static int64_t ps_prepare_rows(int8_t *qa, int64_t m, int64_t lda, int64_t kc4, int64_t max_ent, int32_t *bsum,
                               int32_t *bcnt, int64_t *rowptr, int32_t *ent)
{
    const int64_t kp4 = lda / 4, nb = (kp4 + kc4 - 1) / kc4;
    int64_t e = 0;
    for (int64_t r = 0; r < m; r++) {
        rowptr[r] = e;
        int64_t n = cq_ps_prepare_row(&cq_elementwise_ref, qa + r * lda, kp4, kc4, max_ent - e, bsum + r * (nb + 1),
                                      bcnt + r * (nb + 1), ent + CQ_PS_ENT * e);
        if (n < 0) { /* too many: the rows before back too (this one is) */
            for (int64_t q = 0; q < r; q++)
                cq_ps_restore(qa + q * lda, 0, ent + CQ_PS_ENT * rowptr[q], rowptr[q + 1] - rowptr[q]);
            return -1;
        }
        e += n;
    }
    rowptr[m] = e;
    return e;
}

static const char *mode_name(int mode)
{
    return mode == CQ_OUT_I32 ? "I32" : mode == CQ_OUT_F32 ? "F32" : mode == CQ_OUT_FACC ? "FACC" : "?";
}

/* Runs an int8 GEMM kernel on mr rows of the case in one output mode and checks every output.
 * a: at least max(mr, pad_rows) rows, allocated exactly. Returns 1 if right; else msg says why. */
static int qd8_run(const cq_ukernel *uk, const qcase *c, const int8_t *a, int mr, int pad_rows,
                   const qmode *md, char *msg, size_t msz)
{
    const int nr = c->nr;
    const int accrows = mr > pad_rows ? mr : pad_rows; /* AMX-style kernels read whole row blocks */
    const int64_t ldy = nr + 9;
    const size_t nacc = (size_t)accrows * (size_t)nr;
    int ok = 1;
    int32_t *acc = (int32_t *)gb_new(nacc, SENT_I32);
    int32_t *acc0 = (int32_t *)xmalloc(nacc * 4);
    if (md->acc_in)
        for (size_t i = 0; i < nacc; i++) acc[i] = (int32_t)(rnd() % (1u << 25)) - (1 << 24);
    memcpy(acc0, acc, nacc * 4);
    float *sx = (float *)xmalloc(sizeof(float) * (size_t)mr), *sw = (float *)xmalloc(sizeof(float) * (size_t)nr);
    float *bias = (float *)xmalloc(sizeof(float) * (size_t)nr), *y = NULL, *facc = NULL, *facc0 = NULL;
    for (int r = 0; r < mr; r++) sx[r] = rnd_pos(0.5f, 2.0f) * 0.0078125f;
    for (int j = 0; j < nr; j++) { sw[j] = rnd_pos(0.5f, 2.0f) * 0.00390625f; bias[j] = rndf() * 4.0f; }
    if (md->mode == CQ_OUT_F32) y = (float *)gb_new((size_t)(mr * ldy), SENT_F32);
    if (md->mode == CQ_OUT_FACC) {
        facc = (float *)gb_new((size_t)(mr * nr), SENT_F32);
        facc0 = (float *)xmalloc(sizeof(float) * (size_t)(mr * nr));
        for (int i = 0; i < mr * nr; i++) facc0[i] = facc[i] = rndf() * 1000.0f;
    }
    const int32_t *comp = md->comp == COMP_NULL ? NULL : md->comp == COMP_STD ? c->comp : c->alt;

    cq_qd8_out o;
    memset(&o, 0, sizeof o);
    o.mode = md->mode;
    o.acc_in = md->acc_in;
    o.nc = md->nc;
    o.acc = (md->mode == CQ_OUT_FACC && !md->acc_in) ? NULL : acc; /* as the per-group driver */
    if (md->mode == CQ_OUT_I32) {
        o.comp = c->alt; /* ignored in I32 mode */
    } else {
        o.comp = comp;
        o.sw = sw;
    }
    if (md->mode == CQ_OUT_F32) { o.sx = sx; o.bias = md->bias ? bias : NULL; o.y = y; o.ldy = ldy; }
    if (md->mode == CQ_OUT_FACC) { o.facc = facc; o.sx = sx; }
    /* the driver's prefetch hint (half the runs): never changes a result */
    int8_t *pfbuf = NULL;
    if (rnd() % 2) {
        static const int64_t pf_steps[3] = {0, 8, 64};
        pfbuf = (int8_t *)xmalloc((size_t)(c->nk4 * 64 + 64));
        o.pf = pfbuf;
        o.pf_step = pf_steps[rnd() % 3];
    }
    /* pair-safe kernels read the rows as the preparation leaves them: prepared here as one of three
     * k blocks of a row (the driver's k blocks start inside a row) */
    const int8_t *arun = a;
    int64_t ldrun = c->lda;
    int8_t *aps = NULL;
    int32_t *psum = NULL, *pent = NULL, *pcnt = NULL;
    int64_t *prow = NULL;
    if (uk->pairsafe) {
        /* k blocks of the call's nk4 steps; the call is block 0, 1 or 2 of a row of 3 blocks */
        const int64_t kc4 = c->nk4, blk = (int64_t)(rnd() % 3), kp4 = 3 * kc4, lda2 = 4 * kp4, ld = 4;
        aps = (int8_t *)xmalloc((size_t)(mr * lda2));
        psum = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(mr * ld));
        pcnt = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(mr * ld));
        prow = (int64_t *)xmalloc(sizeof(int64_t) * (size_t)(mr + 1));
        pent = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(CQ_PS_ENT * (mr * lda2 / 2 + 1)));
        for (int r = 0; r < mr; r++) {
            for (int64_t i = 0; i < lda2; i++) aps[r * lda2 + i] = rnd() % 2 ? rnd_code() : rnd_pm127();
            memcpy(aps + r * lda2 + 4 * blk * kc4, a + r * c->lda, (size_t)(4 * c->nk4));
        }
        int8_t *orig = (int8_t *)xmalloc((size_t)(mr * lda2));
        memcpy(orig, aps, (size_t)(mr * lda2));
        int64_t ne = ps_prepare_rows(aps, mr, lda2, kc4, mr * lda2 / 2, psum, pcnt, prow, pent);
        /* every pair of x' safe, the block sums of x' and entry counts, and x' + the entries = x */
        int good = ne >= 0 && prow[0] == 0 && prow[mr] == ne;
        for (int r = 0; r < mr && good; r++) {
            const int8_t *xr = aps + r * lda2;
            int32_t run = 0;
            int64_t e = prow[r];
            for (int64_t i = 0; i < lda2 && good; i += 2) {
                int x0 = xr[i], x1 = xr[i + 1];
                good = (x0 < 0 ? -x0 : x0) + (x1 < 0 ? -x1 : x1) <= 128 || (x0 < 0) != (x1 < 0);
            }
            for (int64_t b = 0; b <= 3 && good; b++) {
                while (e < prow[r + 1] && cq_ps_ent_k(pent + CQ_PS_ENT * e) < 4 * b * kc4) e++;
                good = psum[r * ld + b] == run && pcnt[r * ld + b] == e - prow[r];
                for (int64_t i = 4 * b * kc4; b < 3 && i < 4 * (b + 1) * kc4; i++) run += xr[i];
            }
            for (int64_t f = prow[r]; f < prow[r + 1] && good; f++) {
                const int32_t *en = pent + CQ_PS_ENT * f;
                const int64_t k = cq_ps_ent_k(en);
                const int v = cq_ps_ent_v(en);
                /* {kv = k or ~k by v's sign, sel = |v| << 8 (k % 4)}: one byte of sel set */
                good = k >= 0 && k < lda2 && (f == prow[r] || k > cq_ps_ent_k(en - CQ_PS_ENT)) && v != 0 &&
                       (uint32_t)en[1] == (uint32_t)(v < 0 ? -v : v) << (8 * (k & 3)) && (en[0] < 0) == (v < 0);
                if (good) aps[r * lda2 + k] = (int8_t)(aps[r * lda2 + k] + v);
            }
        }
        good = good && memcmp(aps, orig, (size_t)(mr * lda2)) == 0;
        CHECK(good, "%s: pair-safe preparation (mr=%d, %lld steps): x' + residuals != x, a pair not safe or bad block sums",
              uk->name, mr, (long long)kp4);
        /* one entry fewer allowed than needed: -1, and the codes as they were */
        memcpy(aps, orig, (size_t)(mr * lda2));
        if (ne > 0) {
            int64_t st = ps_prepare_rows(aps, mr, lda2, kc4, ne - 1, psum, pcnt, prow, pent);
            CHECK(st == -1 && memcmp(aps, orig, (size_t)(mr * lda2)) == 0,
                  "%s: pair-safe preparation with max_ent %lld < %lld entries: returned %lld or changed the codes",
                  uk->name, (long long)(ne - 1), (long long)ne, (long long)st);
        }
        ps_prepare_rows(aps, mr, lda2, kc4, mr * lda2 / 2, psum, pcnt, prow, pent);
        free(orig);
        o.ps_sum = psum + blk; o.ps_cnt = pcnt + blk; o.ps_ld = ld; o.ps_row = prow; o.ps_ent = pent;
        o.ps_k0 = 4 * blk * kc4;
        arun = aps + 4 * blk * kc4;
        ldrun = lda2;
    }
    ((cq_qd8_gemm_fn)uk->fn)(mr, nr, c->nk4, arun, ldrun, c->b, &o);
    free(pfbuf);
    free(aps); free(psum); free(pcnt); free(prow); free(pent);

    /* integer part of every output: s' (or, in I32 mode, the stored sum) */
    for (int r = 0; r < mr && ok; r++)
        for (int j = 0; j < nr && ok; j++) {
            uint32_t base = md->acc_in ? (uint32_t)acc0[r * nr + j] : 0u;
            uint32_t s = base + qcase_raw(c, r, j);
            if (md->mode == CQ_OUT_I32) {
                if (acc[r * nr + j] != (int32_t)s) {
                    snprintf(msg, msz, "acc[%d][%d] = %d, want %d", r, j, acc[r * nr + j], (int32_t)s);
                    ok = 0;
                }
                continue;
            }
            if (comp) s -= (uint32_t)comp[j];
            float f = (float)(int32_t)s;
            if (md->mode == CQ_OUT_F32) {
                if (j >= md->nc) continue;
                float want = epi_f32((int32_t)s, sx[r], sw[j], md->bias ? bias[j] : 0.0f);
                if (fbits(y[r * ldy + j]) != fbits(want)) {
                    snprintf(msg, msz, "y[%d][%d] = %.9g, want %.9g (s' = %d)", r, j, y[r * ldy + j], want, (int32_t)s);
                    ok = 0;
                }
            } else {
                /* one fused multiply-add by the capped product sx * sw, bit for bit */
                float sp = sx[r] * sw[j];
                if (sp > 3.402823466e38f) sp = 3.402823466e38f;
                float e = fmaf(f, sp, facc0[r * nr + j]);
                /* SIMDe may emulate vfmadd as a multiply and an add (two roundings) */
                float e2 = f * sp + facc0[r * nr + j];
                if (fbits(facc[r * nr + j]) != fbits(e) && !(EMU && fbits(facc[r * nr + j]) == fbits(e2))) {
                    snprintf(msg, msz, "facc[%d][%d] = %.9g, want %.9g", r, j, facc[r * nr + j], e);
                    ok = 0;
                }
            }
        }
    /* nothing else written */
    if (ok && md->mode == CQ_OUT_F32)
        for (int r = 0; r < mr && ok; r++)
            for (int64_t j = md->nc; j < ldy && ok; j++)
                if (fbits(y[r * ldy + j]) != SENT_F32) {
                    snprintf(msg, msz, "y[%d][%lld] written (nc = %d, ldy = %lld)", r, (long long)j, md->nc, (long long)ldy);
                    ok = 0;
                }
    if (ok && y && !gb_guards_ok(y, (size_t)(mr * ldy), SENT_F32)) { snprintf(msg, msz, "wrote outside y"); ok = 0; }
    if (ok && facc && !gb_guards_ok(facc, (size_t)(mr * nr), SENT_F32)) { snprintf(msg, msz, "wrote outside facc"); ok = 0; }
    if (ok) {
        /* I32 writes mr rows (a kernel reading whole blocks of pad_rows rows may write all of them:
         * acc has room for pad_rows rows); F32 / FACC write no acc */
        size_t from = md->mode == CQ_OUT_I32 ? (size_t)accrows * (size_t)nr : 0;
        if (memcmp(acc + from, acc0 + from, (nacc - from) * 4) != 0) {
            snprintf(msg, msz, "%s wrote acc %s", mode_name(md->mode), from ? "past its rows" : "(it must not)");
            ok = 0;
        } else if (!gb_guards_ok(acc, nacc, SENT_I32)) {
            snprintf(msg, msz, "wrote outside acc");
            ok = 0;
        }
    }
    gb_free(acc); free(acc0); free(sx); free(sw); free(bias); gb_free(y); gb_free(facc); free(facc0);
    return ok;
}

/* Rows of activations a kernel call may read: mr, or whole blocks of pad_rows; copied into a
 * buffer of exactly that size so that AddressSanitizer sees any read past them. A kernel whose
 * registry entry says a_tiled reads them as 16-row x 64-byte tiles (the driver's layout: the block
 * of 16 rows at row r starts at r * lda, its k bytes [64 j, 64 j + 64) are the 1 KiB at + 1024 j). */
static int8_t *qcase_rows(const qcase *c, int mr, int pad_rows, int tiled)
{
    int rows = mr > pad_rows ? mr : pad_rows;
    size_t bytes = (size_t)((rows - 1) * c->lda + 4 * c->nk4);
    if (tiled) {
        int64_t blocks = (rows + 15) / 16, chunks = (4 * c->nk4 + 63) / 64;
        bytes = (size_t)((blocks - 1) * 16 * c->lda + chunks * 1024);
        int8_t *a = (int8_t *)xmalloc(bytes);
        for (int64_t rb = 0; rb < blocks; rb++)
            for (int64_t j = 0; j < chunks; j++)
                for (int r = 0; r < 16; r++)
                    memcpy(a + rb * 16 * c->lda + j * 1024 + r * 64, c->a + (rb * 16 + r) * c->lda + j * 64, 64);
        return a;
    }
    int8_t *a = (int8_t *)xmalloc(bytes);
    memcpy(a, c->a, bytes);
    return a;
}

/* As qcase_rows(tiled), for one group of 32 k (nk4 = 8) sitting in the second half of each 64-byte
 * tile row (k bytes [32, 64) of a tile, where the per-group driver points the kernel for odd
 * groups); the first half holds other codes. *base: the allocation to free. */
static int8_t *qcase_rows_tiled_hi(const qcase *c, int mr, int pad_rows, int8_t **base)
{
    int rows = mr > pad_rows ? mr : pad_rows;
    int64_t blocks = (rows + 15) / 16;
    size_t bytes = (size_t)((blocks - 1) * 16 * c->lda + 1024);
    int8_t *a = (int8_t *)xmalloc(bytes);
    for (size_t i = 0; i < bytes; i++) a[i] = rnd_code();
    for (int64_t rb = 0; rb < blocks; rb++)
        for (int r = 0; r < 16; r++)
            memcpy(a + rb * 16 * c->lda + r * 64 + 32, c->a + (rb * 16 + r) * c->lda, 32);
    *base = a;
    return a + 32;
}

static void qd8_modes(int nr, int u8, qmode *m)
{
    const int std = u8 ? COMP_STD : COMP_NULL, alt = u8 ? COMP_NULL : COMP_ALT;
    const qmode list[] = {
        {CQ_OUT_I32, 0, 0, 0, 0},     {CQ_OUT_I32, 1, 0, 0, 0},
        {CQ_OUT_F32, 0, nr, 1, std},  {CQ_OUT_F32, 1, nr - 5, 0, std},
        {CQ_OUT_F32, 0, 1, 1, alt},   {CQ_OUT_F32, 1, nr, 0, alt},
        {CQ_OUT_FACC, 0, 0, 0, std},  {CQ_OUT_FACC, 1, 0, 0, alt},
    };
    memcpy(m, list, sizeof list);
}
#define NQMODES 8

static void test_qd8_gemm(const cq_ukernel *uk)
{
    int k4m, pad;
    qd8_constraints(uk, &k4m, &pad);
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    int64_t nk4s[16];
    int nn = nk4_list(k4m, nk4s);
    char msg[200];
    qmode modes[NQMODES];
    for (int ni = 0; ni < nnr; ni++) {
        const int nr = nrs[ni];
        qd8_modes(nr, uk->act_u8, modes);
        for (int ki = 0; ki < nn; ki++)
            for (int kind = KIND_RANDOM; kind <= KIND_EXTREME; kind++) {
                qcase c;
                qcase_make(&c, nr, uk->mr > pad ? uk->mr : pad, uk->act_u8, nk4s[ki], kind);
                for (int mr = 1; mr <= uk->mr; mr++) {
                    int8_t *a = qcase_rows(&c, mr, pad, uk->a_tiled);
                    for (int mi = 0; mi < NQMODES; mi++) {
                        msg[0] = 0;
                        int ok = qd8_run(uk, &c, a, mr, pad, &modes[mi], msg, sizeof msg);
                        CHECK(ok, "%s: mr=%d nr=%d nk4=%lld %s, mode %s acc_in=%d nc=%d bias=%d comp=%d: %s",
                              uk->name, mr, nr, (long long)c.nk4, kind ? "extreme" : "random",
                              mode_name(modes[mi].mode), modes[mi].acc_in, modes[mi].nc, modes[mi].bias,
                              modes[mi].comp, msg);
                    }
                    free(a);
                }
                qcase_free(&c);
            }
    }
    /* AMX-style kernels (k4 multiple 16) also take one group of 32 k (nk4 = 8, per-group scales),
     * starting at a tile or half-way into its rows */
    if (k4m == 16 && uk->a_tiled) {
        const int nr = nrs[0];
        qd8_modes(nr, uk->act_u8, modes);
        for (int kind = KIND_RANDOM; kind <= KIND_EXTREME; kind++)
            for (int hi = 0; hi < 2; hi++) {
                qcase c;
                qcase_make(&c, nr, uk->mr > pad ? uk->mr : pad, uk->act_u8, 8, kind);
                for (int mr = 1; mr <= uk->mr; mr++) {
                    int8_t *base = NULL;
                    int8_t *a = hi ? qcase_rows_tiled_hi(&c, mr, pad, &base) : (base = qcase_rows(&c, mr, pad, 1));
                    for (int mi = 0; mi < NQMODES; mi++) {
                        msg[0] = 0;
                        int ok = qd8_run(uk, &c, a, mr, pad, &modes[mi], msg, sizeof msg);
                        CHECK(ok, "%s: one group of 32 k (%s half of the tiles), mr=%d %s, mode %s acc_in=%d: %s",
                              uk->name, hi ? "second" : "first", mr, kind ? "extreme" : "random",
                              mode_name(modes[mi].mode), modes[mi].acc_in, msg);
                    }
                    free(base);
                }
                qcase_free(&c);
            }
    }
    /* One int32 chunk of CQ_CHUNK4 steps with codes +-127 (rows 0 and 1: all +127 / all -127):
     * the true sums reach +-127*127*131072, near 2^31; a u8 kernel's raw sums wrap modulo 2^32 and
     * only the compensation makes s' exact. */
    {
        const int nr = nrs[0], mr = uk->mr < 2 ? uk->mr : 2;
        qcase c;
        qcase_make(&c, nr, mr > pad ? mr : pad, uk->act_u8, cq_ceil_div(CQ_CHUNK4, k4m) * k4m, KIND_WRAP);
        int8_t *a = qcase_rows(&c, mr, pad, uk->a_tiled);
        const qmode wm[] = {{CQ_OUT_I32, 0, 0, 0, 0},
                            {CQ_OUT_F32, 0, nr, 1, uk->act_u8 ? COMP_STD : COMP_NULL},
                            {CQ_OUT_FACC, 0, 0, 0, uk->act_u8 ? COMP_STD : COMP_NULL}};
        int64_t big = c.dot[0] > 0 ? c.dot[0] : -c.dot[0];
        CHECK(big > (int64_t)2000000000, "wrapping chunk: test data too small (%lld)", (long long)big);
        for (int mi = 0; mi < 3; mi++) {
            msg[0] = 0;
            CHECK(qd8_run(uk, &c, a, mr, pad, &wm[mi], msg, sizeof msg),
                  "%s: int32 chunk of %lld steps, codes +-127, mode %s: %s", uk->name, (long long)c.nk4,
                  mode_name(wm[mi].mode), msg);
        }
        free(a);
        qcase_free(&c);
    }
}

/* 4 panels read as concurrent streams; the 4th pointer also repeats the 3rd (as the driver does
 * past the last panel), so a kernel must read panels[] and not panels[0] + p * stride. */
static void test_qd8_gemv4(const cq_ukernel *uk)
{
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    int64_t nk4s[16];
    int nn = nk4_list(1, nk4s);
    for (int ni = 0; ni < nnr; ni++)
        for (int ki = 0; ki < nn; ki++)
            for (int kind = KIND_RANDOM; kind <= KIND_EXTREME; kind++) {
                const int nr = nrs[ni];
                const int64_t nk4 = nk4s[ki], psz = nk4 * nr * 4;
                int8_t *codes = (int8_t *)xmalloc((size_t)(4 * nk4)), *a = (int8_t *)xmalloc((size_t)(4 * nk4));
                int8_t *pb = (int8_t *)xmalloc((size_t)(4 * psz));
                for (int64_t i = 0; i < 4 * nk4; i++) {
                    codes[i] = kind ? rnd_pm127() : rnd_code();
                    a[i] = (int8_t)((uint8_t)codes[i] ^ (uk->act_u8 ? 0x80u : 0u));
                }
                for (int64_t i = 0; i < 4 * psz; i++) pb[i] = kind ? rnd_pm127() : rnd_code();
                uint32_t raw[4 * 64];
                for (int p = 0; p < 4; p++)
                    for (int j = 0; j < nr; j++) {
                        int64_t s = 0, cs = 0;
                        for (int64_t t = 0; t < nk4; t++)
                            for (int i = 0; i < 4; i++) {
                                int8_t w = pb[p * psz + (t * nr + j) * 4 + i];
                                s += (int64_t)codes[4 * t + i] * w;
                                cs += w;
                            }
                        raw[p * nr + j] = (uint32_t)((uint64_t)(s + (uk->act_u8 ? 128 * cs : 0)) & 0xffffffffu);
                    }
                for (int variant = 0; variant < 2; variant++) {
                    const int8_t *panels[4] = {pb, pb + psz, pb + 2 * psz, pb + (variant ? 2 : 3) * psz};
                    int32_t *acc = (int32_t *)gb_new((size_t)(4 * nr), SENT_I32);
                    ((cq_qd8_gemv4_fn)uk->fn)(nr, nk4, a, panels, psz, acc);
                    int bad = -1;
                    for (int p = 0; p < 4 && bad < 0; p++)
                        for (int j = 0; j < nr && bad < 0; j++) {
                            int q = p == 3 && variant ? 2 : p;
                            if ((uint32_t)acc[p * nr + j] != raw[q * nr + j]) bad = p * nr + j;
                        }
                    CHECK(bad < 0, "%s: nr=%d nk4=%lld %s%s: acc[%d] = %d, want %d", uk->name, nr, (long long)nk4,
                          kind ? "extreme" : "random", variant ? ", panel 3 = panel 2" : "", bad,
                          bad >= 0 ? acc[bad] : 0, bad >= 0 ? (int32_t)raw[(bad / nr == 3 && variant ? 2 * nr + bad % nr : bad)] : 0);
                    CHECK(gb_guards_ok(acc, (size_t)(4 * nr), SENT_I32), "%s: nr=%d nk4=%lld wrote outside acc",
                          uk->name, nr, (long long)nk4);
                    gb_free(acc);
                }
                free(codes); free(a); free(pb);
            }
}

static void test_f32_dequant(const cq_ukernel *uk)
{
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    int64_t nk4s[16];
    int nn = nk4_list(1, nk4s);
    for (int ni = 0; ni < nnr; ni++)
        for (int ki = 0; ki < nn; ki++) {
            const int nr = nrs[ni];
            const int64_t nk4 = nk4s[ki], len = 4 * nk4 * nr;
            int8_t *b = (int8_t *)xmalloc((size_t)len);
            float *ws = (float *)xmalloc(sizeof(float) * (size_t)nr);
            for (int64_t i = 0; i < len; i++) b[i] = rnd_code();
            for (int j = 0; j < nr; j++) ws[j] = rnd_pos(0.5f, 2.0f) * 0.01f;
            float *out = (float *)gb_new((size_t)len, SENT_F32);
            ((cq_f32_dequant_fn)uk->fn)(nr, nk4, b, ws, out);
            int64_t bad = -1;
            for (int64_t t = 0; t < nk4 && bad < 0; t++)
                for (int j = 0; j < nr && bad < 0; j++)
                    for (int i = 0; i < 4 && bad < 0; i++) {
                        float want = (float)b[(t * nr + j) * 4 + i] * ws[j];
                        int64_t at = (4 * t + i) * nr + j;
                        if (fbits(out[at]) != fbits(want)) bad = at;
                    }
            CHECK(bad < 0, "%s: nr=%d nk4=%lld: out[%lld] = %g", uk->name, nr, (long long)nk4, (long long)bad,
                  bad >= 0 ? out[bad] : 0.0f);
            CHECK(gb_guards_ok(out, (size_t)len, SENT_F32), "%s: nr=%d nk4=%lld wrote outside out", uk->name, nr, (long long)nk4);
            gb_free(out); free(b); free(ws);
        }
}

/* c += a * bb over kc (any kc: the driver passes k's ragged end); budget: kc-scaled rounding. */
static void test_f32_gemm(const cq_ukernel *uk)
{
    static const int64_t kcs[] = {1, 2, 3, 4, 5, 8, 17, 64, 129, 256};
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    for (int ni = 0; ni < nnr; ni++)
        for (unsigned ki = 0; ki < sizeof kcs / sizeof kcs[0]; ki++) {
            const int nr = nrs[ni], MR = uk->mr;
            const int64_t kc = kcs[ki], lda = kc + 3, ldc = nr + 5;
            float *bb = (float *)gb_new((size_t)(kc * nr), SENT_F32);
            float *afull = (float *)xmalloc(sizeof(float) * (size_t)(MR * lda));
            for (int64_t i = 0; i < kc * nr; i++) bb[i] = (float)rnd_code() * rnd_pos(0.001f, 0.002f);
            for (int64_t i = 0; i < MR * lda; i++) afull[i] = rndf() * 3.0f;
            for (int mr = 1; mr <= MR; mr++) {
                size_t abytes = sizeof(float) * (size_t)((mr - 1) * lda + kc);
                float *a = (float *)xmalloc(abytes);
                memcpy(a, afull, abytes);
                float *c = (float *)gb_new((size_t)(mr * ldc), SENT_F32);
                float *c0 = (float *)xmalloc(sizeof(float) * (size_t)(mr * ldc));
                for (int r = 0; r < mr; r++)
                    for (int j = 0; j < nr; j++) c[r * ldc + j] = rndf();
                memcpy(c0, c, sizeof(float) * (size_t)(mr * ldc));
                ((cq_f32_gemm_fn)uk->fn)(mr, nr, kc, a, lda, bb, c, ldc);
                int ok = 1;
                char msg[160] = "";
                for (int r = 0; r < mr && ok; r++) {
                    for (int j = 0; j < nr && ok; j++) {
                        double e = c0[r * ldc + j], mag = fabs(e);
                        for (int64_t kk = 0; kk < kc; kk++) {
                            double t = (double)a[r * lda + kk] * (double)bb[kk * nr + j];
                            e += t; mag += fabs(t);
                        }
                        double tol = 2.0 * (double)(kc + 2) * 5.9604645e-08 * mag + 1e-30;
                        if (!(fabs((double)c[r * ldc + j] - e) <= tol)) {
                            snprintf(msg, sizeof msg, "c[%d][%d] = %.9g, want %.9g", r, j, c[r * ldc + j], e);
                            ok = 0;
                        }
                    }
                    for (int64_t j = nr; j < ldc && ok; j++)
                        if (fbits(c[r * ldc + j]) != SENT_F32) { snprintf(msg, sizeof msg, "c[%d][%lld] written", r, (long long)j); ok = 0; }
                }
                if (ok && !gb_guards_ok(c, (size_t)(mr * ldc), SENT_F32)) { snprintf(msg, sizeof msg, "wrote outside c"); ok = 0; }
                CHECK(ok, "%s: mr=%d nr=%d kc=%lld: %s", uk->name, mr, nr, (long long)kc, msg);
                gb_free(c); free(c0); free(a);
            }
            gb_free(bb); free(afull);
        }
}

/* Weight-only GEMV: every mr up to the kernel's, rows of x ldx apart (not 4 nk4), outputs ldy
 * apart with sentinels between the rows, a repeated panel, k tails, x from subnormal to 2^60. Each
 * output within the float bound of the double sum (but the extreme x), and bit for bit the scalar
 * reference's (the same FMA chain per row). */
static void test_f32_gemv4(const cq_ukernel *uk)
{
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    int64_t nk4s[16];
    int nn = nk4_list(1, nk4s);
    for (int ni = 0; ni < nnr; ni++)
        for (int ki = 0; ki < nn; ki++)
            for (int mr = 1; mr <= uk->mr; mr++) {
                const int nr = nrs[ni];
                const int64_t nk4 = nk4s[ki], psz = nk4 * nr * 4, ldx = 4 * nk4 + 3, ldy = 4 * nr + 16;
                float *x = (float *)xmalloc(sizeof(float) * (size_t)(mr * ldx));
                float *ws = (float *)xmalloc(sizeof(float) * (size_t)(4 * nr));
                int8_t *pb = (int8_t *)xmalloc((size_t)(4 * psz));
                for (int64_t i = 0; i < mr * ldx; i++) x[i] = rndf() * 2.0f;
                for (int i = 0; i < 4 * nr; i++) ws[i] = rnd_pos(0.5f, 2.0f) * 0.01f;
                for (int64_t i = 0; i < 4 * psz; i++) pb[i] = rnd_code();
                for (int variant = 0; variant < 3; variant++) {
                    const int8_t *panels[4] = {pb, pb + psz, pb + 2 * psz, pb + (variant == 1 ? 2 : 3) * psz};
                    if (variant == 2) /* magnitudes from subnormal to 2^60 (127 k max|x| <= 2^100, as the
                                       * driver keeps it): bit for bit the reference's (the GEMVs that sum
                                       * x * code * 2^24 must round exactly as it does) */
                        for (int64_t i = 0; i < mr * ldx; i++) {
                            static const float mag[6] = {0x1p-149f, 0x1p-140f, 1e-40f, 0x1p-126f, 1.0f, 0x1p60f};
                            x[i] = rndf() * mag[rnd() % 6];
                        }
                    float *y = (float *)gb_new((size_t)(mr * ldy), SENT_F32);
                    float *y0 = (float *)xmalloc(sizeof(float) * (size_t)(mr * ldy));
                    float *yr = (float *)xmalloc(sizeof(float) * (size_t)(mr * ldy));
                    for (int r = 0; r < mr; r++)
                        for (int i = 0; i < 4 * nr; i++) y0[r * ldy + i] = y[r * ldy + i] = rndf() * 10.0f;
                    memcpy(yr, y0, sizeof(float) * (size_t)(mr * ldy));
                    ((cq_f32_gemv4_fn)uk->fn)(mr, nr, nk4, x, ldx, panels, ws, y, ldy);
                    cq_ref_f32_gemv4(mr, nr, nk4, x, ldx, panels, ws, yr, ldy);
                    int ok = 1;
                    char msg[160] = "";
                    for (int r = 0; r < mr && ok; r++) {
                        for (int p = 0; p < 4 && ok; p++)
                            for (int j = 0; j < nr && ok; j++) {
                                double s = 0, mag = 0;
                                for (int64_t t = 0; t < nk4; t++)
                                    for (int i = 0; i < 4; i++) {
                                        double v = (double)x[r * ldx + 4 * t + i] * panels[p][(t * nr + j) * 4 + i];
                                        s += v; mag += fabs(v);
                                    }
                                const int64_t o = r * ldy + p * nr + j;
                                double w = ws[p * nr + j], e = y0[o] + w * s;
                                double tol = 2.0 * (double)(4 * nk4 + 3) * 5.9604645e-08 * (fabs(y0[o]) + w * mag) + 1e-30;
                                if (variant < 2 && !(fabs((double)y[o] - e) <= tol))
                                    snprintf(msg, sizeof msg, "y[%d][%d][%d] = %.9g, want %.9g", r, p, j, y[o], e), ok = 0;
                                else if (fbits(y[o]) != fbits(yr[o]))
                                    snprintf(msg, sizeof msg, "y[%d][%d][%d] = %.9g, the reference %.9g", r, p, j, y[o], yr[o]), ok = 0;
                            }
                        for (int64_t j = 4 * nr; j < ldy && ok && r < mr - 1; j++)
                            if (fbits(y[r * ldy + j]) != SENT_F32) snprintf(msg, sizeof msg, "y[%d][%lld] written", r, (long long)j), ok = 0;
                    }
                    if (ok && !gb_guards_ok(y, (size_t)(mr * ldy), SENT_F32)) { snprintf(msg, sizeof msg, "wrote outside y"); ok = 0; }
                    CHECK(ok, "%s: mr=%d nr=%d nk4=%lld%s: %s", uk->name, mr, nr, (long long)nk4,
                          variant == 1 ? " (panel 3 = panel 2)" : variant == 2 ? " (extreme magnitudes)" : "", msg);
                    gb_free(y); free(y0); free(yr);
                }
                free(x); free(ws); free(pb);
            }
}

/* int4 weight-only GEMV: random bytes (every nibble value, -8 included, is exercised), panels that
 * are slices of wider int4 panels (step = 4 * 64 bytes) or whole ones, a repeated panel, k tails. */
static void test_f32_i4_gemv4(const cq_ukernel *uk)
{
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    const int64_t nk8s[] = {1, 2, 3, 4, 7, 16, 33, 130};
    for (int ni = 0; ni < nnr; ni++)
        for (int ki = 0; ki < (int)(sizeof nk8s / sizeof nk8s[0]); ki++)
            for (int wide = 0; wide < 2; wide++) {
                const int nr = nrs[ni];
                const int64_t nk8 = nk8s[ki], step = 4 * (wide ? 64 : nr), psz = nk8 * step;
                float *x = (float *)xmalloc(sizeof(float) * (size_t)(8 * nk8));
                float *ws = (float *)xmalloc(sizeof(float) * (size_t)(4 * nr));
                int8_t *pb = (int8_t *)xmalloc((size_t)(4 * psz + 64));
                for (int64_t i = 0; i < 8 * nk8; i++) x[i] = rndf() * 2.0f;
                for (int i = 0; i < 4 * nr; i++) ws[i] = rnd_pos(0.5f, 2.0f) * 0.01f;
                for (int64_t i = 0; i < 4 * psz + 64; i++) pb[i] = (int8_t)(rand() & 255);
                const int64_t off = wide && nr < 64 ? 4 * 16 : 0; /* the second 16-column slice */
                const int8_t *panels[4] = {pb + off, pb + psz + off, pb + 2 * psz + off, pb + (wide ? 2 : 3) * psz + off};
                float *y = (float *)gb_new((size_t)(4 * nr), SENT_F32);
                float y0[4 * 64];
                for (int i = 0; i < 4 * nr; i++) y0[i] = y[i] = rndf() * 10.0f;
                ((cq_f32_i4_gemv4_fn)uk->fn)(nr, nk8, x, panels, step, ws, y);
                int ok = 1;
                char msg[160] = "";
                for (int p = 0; p < 4 && ok; p++)
                    for (int j = 0; j < nr && ok; j++) {
                        double sum = 0, mag = 0;
                        for (int64_t t = 0; t < nk8; t++)
                            for (int kk = 0; kk < 8; kk++) {
                                unsigned v = (uint8_t)panels[p][t * step + 4 * j + (kk & 3)];
                                int q = (int)(((kk < 4 ? v : v >> 4) & 15u) ^ 8u) - 8;
                                double prod = (double)x[8 * t + kk] * q;
                                sum += prod; mag += fabs(prod);
                            }
                        double w = ws[p * nr + j], e = y0[p * nr + j] + w * sum;
                        double tol = 2.0 * (double)(8 * nk8 + 3) * 5.9604645e-08 * (fabs(y0[p * nr + j]) + w * mag) + 1e-30;
                        if (!(fabs((double)y[p * nr + j] - e) <= tol)) {
                            snprintf(msg, sizeof msg, "y[%d][%d] = %.9g, want %.9g", p, j, y[p * nr + j], e);
                            ok = 0;
                        }
                    }
                if (ok && !gb_guards_ok(y, (size_t)(4 * nr), SENT_F32)) { snprintf(msg, sizeof msg, "wrote outside y"); ok = 0; }
                CHECK(ok, "%s: nr=%d nk8=%lld step=%lld: %s", uk->name, nr, (long long)nk8, (long long)step, msg);
                gb_free(y);
                free(x); free(ws); free(pb);
            }
}

/* The int4 GEMV in integers: x as 24-bit fixed point digit planes (cq_x24_i4_gemv4_fn). The scalar
 * reference against float64 (its digit sums exact, its epilogue within a few roundings), every
 * other kernel bit for bit against the reference: digits at the extremes (-128, 127), all-15 and
 * all-0 nibbles (codes 7 and -8... of the format's 16 values), every nk8 up to the driver's segment
 * bound, outputs pre-filled and guarded. */
static void test_x24_i4_gemv4(const cq_ukernel *uk)
{
    int nrs[2] = {uk->nr, 0}, nnr = 1;
    if (uk->nr == 0) { nrs[0] = 16; nrs[1] = 64; nnr = 2; }
    const int64_t nk8s[] = {1, 2, 3, 4, 7, 16, 33, 130, CQ_X24_MAX_NK8};
    for (int ni = 0; ni < nnr; ni++)
        for (int ki = 0; ki < (int)(sizeof nk8s / sizeof nk8s[0]); ki++)
            for (int kind = 0; kind < 3; kind++) { /* 0 random, 1 extreme digits and codes, 2 mixed */
                const int nr = nrs[ni];
                const int64_t nk8 = nk8s[ki], step = 4 * 64, psz = nk8 * step, xds = 8 * nk8 + 8; /* panels of 64 (nr 16 reads slices) */
                if (nk8 == CQ_X24_MAX_NK8 && kind != 1) continue;
                int8_t *xd = (int8_t *)xmalloc((size_t)(3 * xds));
                float *ws = (float *)xmalloc(sizeof(float) * (size_t)(4 * nr));
                int8_t *pb = (int8_t *)xmalloc((size_t)(4 * psz + 64));
                for (int64_t i = 0; i < 3 * xds; i++)
                    xd[i] = kind == 1 ? (int8_t)((i / 3) % 2 ? 127 : -128) : (int8_t)(rand() & 255);
                for (int i = 0; i < 4 * nr; i++) ws[i] = rnd_pos(0.5f, 2.0f) * 0.01f;
                for (int64_t i = 0; i < 4 * psz + 64; i++)
                    pb[i] = kind == 1 ? (int8_t)((i / 256) % 2 ? 0x77 : 0x88) : kind == 2 && (i % 7) == 0 ? (int8_t)0x77 : (int8_t)(rand() & 255);
                int32_t comp[3];
                for (int d = 0; d < 3; d++) {
                    int32_t sum = 0;
                    for (int64_t i = 0; i < 8 * nk8; i++) sum += xd[d * xds + i];
                    comp[d] = 8 * sum;
                }
                const float xs = kind == 2 ? 0x1p-30f : 0x1p-21f;
                const int8_t *panels[4] = {pb, pb + psz, pb + 2 * psz, pb + 3 * psz};
                float *y = (float *)gb_new((size_t)(4 * nr), SENT_F32);
                float *yr = (float *)gb_new((size_t)(4 * nr), SENT_F32);
                float y0[4 * 64];
                for (int i = 0; i < 4 * nr; i++) y0[i] = y[i] = yr[i] = rndf() * 10.0f;
                ((cq_x24_i4_gemv4_fn)uk->fn)(nr, nk8, xd, xds, comp, xs, panels, step, ws, y);
                cq_ref_x24_i4_gemv4(nr, nk8, xd, xds, comp, xs, panels, step, ws, yr);
                int ok = 1;
                char msg[200] = "";
                for (int p = 0; p < 4 && ok; p++)
                    for (int j = 0; j < nr && ok; j++) {
                        int i = p * nr + j;
                        if (memcmp(&y[i], &yr[i], 4) != 0) {
                            snprintf(msg, sizeof msg, "y[%d][%d] = %.9g, reference %.9g", p, j, y[i], yr[i]);
                            ok = 0;
                            break;
                        }
                        if (uk->isa != CQ_ISA_SCALAR || nk8 > 130) continue;
                        double sum = 0, mag = 0; /* the reference against float64 */
                        for (int64_t t = 0; t < nk8; t++)
                            for (int kk = 0; kk < 8; kk++) {
                                unsigned v = (uint8_t)panels[p][t * step + 4 * j + (kk & 3)];
                                int q = (int)(((kk < 4 ? v : v >> 4) & 15u) ^ 8u) - 8;
                                double xv = (double)xs * (xd[8 * t + kk] + 256.0 * xd[xds + 8 * t + kk] + 65536.0 * xd[2 * xds + 8 * t + kk]);
                                sum += xv * q; mag += fabs(xv * q);
                            }
                        double w = ws[i], e = y0[i] + w * sum, tol = 4 * 5.9604645e-08 * (fabs(y0[i]) + w * mag) + 1e-30;
                        if (!(fabs((double)yr[i] - e) <= tol)) {
                            snprintf(msg, sizeof msg, "reference y[%d][%d] = %.9g, float64 %.9g", p, j, yr[i], e);
                            ok = 0;
                        }
                    }
                if (ok && !gb_guards_ok(y, (size_t)(4 * nr), SENT_F32)) { snprintf(msg, sizeof msg, "wrote outside y"); ok = 0; }
                CHECK(ok, "%s: nr=%d nk8=%lld kind=%d: %s", uk->name, nr, (long long)nk8, kind, msg);
                gb_free(y); gb_free(yr);
                free(xd); free(ws); free(pb);
            }
}

static const char *op_name(int op)
{
    switch (op) {
    case CQ_UK_QD8_GEMM: return "qd8 gemm";
    case CQ_UK_QD8_GEMV4: return "qd8 gemv4";
    case CQ_UK_F32_DEQUANT: return "f32 dequant";
    case CQ_UK_F32_GEMM: return "f32 gemm";
    case CQ_UK_F32_GEMV4: return "f32 gemv4";
    case CQ_UK_F32_I4_GEMV4: return "f32 i4 gemv4";
    case CQ_UK_X24_I4_GEMV4: return "x24 i4 gemv4";
    default: return "unknown op";
    }
}

static int test_registry(void)
{
    int n = cq_ukernel_count(), tested = 0;
    CHECK(n > 0 && cq_ukernel_at(n) == NULL && cq_ukernel_at(-1) == NULL, "registry bounds (%d entries)", n);
    for (int i = 0; i < n; i++) {
        const cq_ukernel *uk = cq_ukernel_at(i);
        CHECK(uk && uk->name && uk->fn, "registry entry %d incomplete", i);
        if (!uk || !uk->fn) continue;
        CHECK(uk->mr >= 1 && (uk->nr == 0 || uk->nr == 16 || uk->nr == 64), "%s: tile %dx%d", uk->name, uk->mr, uk->nr);
        for (int j = 0; j < i; j++) CHECK(strcmp(cq_ukernel_at(j)->name, uk->name) != 0, "%s registered twice", uk->name);
        if (!isa_runs(uk->isa)) {
            printf("skip %s: kernel %s (this CPU lacks it)\n", cq_isa_name(uk->isa), uk->name);
            continue;
        }
        int f0 = failures, c0 = checks;
        double t0 = now_s();
        switch (uk->op) {
        case CQ_UK_QD8_GEMM: test_qd8_gemm(uk); break;
        case CQ_UK_QD8_GEMV4: test_qd8_gemv4(uk); break;
        case CQ_UK_F32_DEQUANT: test_f32_dequant(uk); break;
        case CQ_UK_F32_GEMM: test_f32_gemm(uk); break;
        case CQ_UK_F32_GEMV4: test_f32_gemv4(uk); break;
        case CQ_UK_F32_I4_GEMV4: test_f32_i4_gemv4(uk); break;
        case CQ_UK_X24_I4_GEMV4: test_x24_i4_gemv4(uk); break;
        default: CHECK(0, "%s: unknown op %d", uk->name, uk->op); break;
        }
        printf("%-4s kernel %-40s %-10s %-11s %2dx%-2d%s  %5d checks  %6.2f s\n", failures == f0 ? "ok" : "FAIL",
               uk->name, cq_isa_name(uk->isa), op_name(uk->op), uk->mr, uk->nr, uk->act_u8 ? " u8" : "   ",
               checks - c0, now_s() - t0);
        fflush(stdout);
        tested++;
    }
    /* the weight-only driver calls an int4 GEMV on every config (no expansion fallback) */
    for (int path = CQ_ISA_SCALAR; path <= CQ_ISA_AVXVNNI; path++)
        for (int fmt = CQ_FORMAT_N16K4; fmt <= CQ_FORMAT_N64K4; fmt++) {
            const cq_f32_config *f = cq_f32_config_for(path, fmt);
            CHECK(!f || (f->gemv4_i4 && f->gemv4_i4->op == CQ_UK_F32_I4_GEMV4), "path %d format %d: no int4 GEMV", path, fmt);
        }
    return tested;
}

/* ==== 2. element-wise tables ====================================================================== */
static const int SIZES[] = {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 257};
#define NSIZES ((int)(sizeof SIZES / sizeof SIZES[0]))

static void test_gelu_table(const cq_elementwise *t, const char *name)
{
    /* a dense grid plus the tails and the special values, against the double reference */
    int n = 20011;
    float *x = (float *)xmalloc(sizeof(float) * (size_t)n), *y = (float *)xmalloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) x[i] = -12.0f + 24.0f * (float)i / (float)(n - 1);
    x[0] = INFINITY; x[1] = -INFINITY; x[2] = 0.0f; x[3] = -0.0f; x[4] = 1e-30f; x[5] = -3e38f; x[6] = 3e38f;
    t->gelu(x, n, y);
    int bad = -1;
    for (int i = 0; i < n && bad < 0; i++) {
        double v = x[i], ref = isinf(v) ? (v > 0 ? INFINITY : 0.0) : 0.5 * v * (1.0 + erf(v * 0.7071067811865476));
        if (isinf(v)) { if (y[i] != (float)ref) bad = i; }
        else if (!(fabs(y[i] - ref) <= 1e-6 + 3e-7 * fabs(v))) bad = i;
    }
    CHECK(bad < 0, "%s gelu(%.9g) = %.9g", name, bad >= 0 ? x[bad] : 0.0f, bad >= 0 ? y[bad] : 0.0f);
    x[7] = NAN;
    for (int len = 1; len <= 40; len++) { /* every tail length */
        t->gelu(x + 7, len, y);
        CHECK(isnan(y[0]), "%s gelu(NaN) is NaN (n=%d)", name, len);
    }
    t->gelu(x, n, x); /* in place */
    CHECK(x[2] == 0.0f, "%s gelu in place", name);
    free(x); free(y);
}

/* The x_hadamard rotation: bit-identical to the reference's, which is checked here against the
 * definition written out (each block of b times the Sylvester matrix H_b, entry (i, j) = (-1)^
 * popcount(i & j), summed in float64: the float32 stages must land within rounding of it). Every
 * block size from 2 to 1024, with and without mul, outputs pre-filled with a sentinel plus a guard
 * value past the end, a NaN, an Inf and a row that overflows when rotated. */
/* quantize (x / s, round half to even, clamp) against the reference on the cases a kernel that
 * divides by multiplying with 1 / s could get wrong: exact half-integer quotients (s a power of
 * two), their float neighbours, random values against random scales (10^6 values), scales whose
 * reciprocal is not a normal float (subnormal s, static scales near FLT_MAX), huge quotients. */
static void test_quantize_division(const cq_elementwise *t, const char *name)
{
    const cq_elementwise *ref = &cq_elementwise_ref;
    enum { n = 4096 };
    float *x = (float *)xmalloc(sizeof(float) * n), *mul = (float *)xmalloc(sizeof(float) * n);
    int8_t *q1 = (int8_t *)xmalloc(n), *q2 = (int8_t *)xmalloc(n);
    const float scales[] = {1.0f / 128.0f, 0.25f, 3.0f, 0.0137f, 1.0f / 127.0f, 0.5f / 127.0f, 1e-42f, 2e-39f,
                            1e-20f, 1e30f, 3.0e38f, 7.77e-3f};
    int bad = 0;
    for (size_t si = 0; si < sizeof scales / sizeof scales[0]; si++) {
        const float sc = scales[si];
        for (int rep = 0; rep < 24; rep++) {
            for (int i = 0; i < n; i++) {
                const float k = (float)((int)(rnd() % 300) - 150) + 0.5f; /* half-integers, some past 127 */
                float v = k * sc;                                              /* exact when sc is 2^e */
                switch ((i / 16 + rep) % 5) { /* whole vectors of one kind: a vector's fast path
                                                * (no lane near a half-integer) is taken too */
                case 0: break;
                case 1: v = nextafterf(v, INFINITY); break;
                case 2: v = nextafterf(v, -INFINITY); break;
                case 3: /* far past the clamp (a static scale): v / s near and beyond +-2^31 */
                    v = ldexpf(i % 3 ? 1.0f + (float)(rnd() % 1000) / 1000.0f : 1.0f, 24 + (int)(rnd() % 14)) * sc;
                    if (i % 2) v = -v;
                    if (!isfinite(v)) v = i % 2 ? -FLT_MAX : FLT_MAX;
                    break;
                default: v = rndf() * sc * 130.0f; break;                      /* anything in range */
                }
                x[i] = v;
                mul[i] = (i % 7) ? 1.0f : 0.5f;
            }
            for (int flip = 0; flip <= 0x80; flip += 0x80) {
                ref->quantize(x, n, sc, q1, flip);
                t->quantize(x, n, sc, q2, flip);
                bad += memcmp(q1, q2, n) != 0;
                t->quantize_mul(x, mul, n, sc, q2, flip); /* the same on the products x * mul */
                {
                    float *p = (float *)xmalloc(sizeof(float) * n);
                    for (int i = 0; i < n; i++) p[i] = x[i] * mul[i];
                    ref->quantize(p, n, sc, q1, flip);
                    free(p);
                }
                bad += memcmp(q1, q2, n) != 0;
            }
        }
    }
    CHECK(bad == 0, "%s quantize (division cases): %d mismatching blocks", name, bad);
    free(x); free(mul); free(q1); free(q2);
}

static float a2_dummy;
/* transpose: an exact copy, every row count (whole blocks of 8 and 16, and tails) and column count
 * 1..16, src strides tight and wider than the data; everything of dst outside the rows x cols block
 * keeps its sentinel. */
static void test_transpose_table(const cq_elementwise *t, const char *name)
{
    const int64_t rowss[] = {1, 2, 7, 8, 9, 15, 16, 17, 33, 64, 67};
    for (int ri = 0; ri < 2 * (int)(sizeof rowss / sizeof rowss[0]); ri++)
        for (int cols = 1; cols <= 16; cols++) {
            /* src rows tight (lds = cols: a load past a row's columns reads the next row) or apart */
            const int64_t rows = rowss[ri / 2], lds = cols + (ri % 2 ? 3 : 0), ldd = rows + 5;
            float *src = (float *)xmalloc(sizeof(float) * (size_t)(rows * lds));
            float *dst = (float *)gb_new((size_t)(cols * ldd), SENT_F32);
            for (int64_t i = 0; i < rows * lds; i++) src[i] = rndf() * 100.0f;
            t->transpose(src, lds, rows, cols, dst, ldd);
            int ok = gb_guards_ok(dst, (size_t)(cols * ldd), SENT_F32);
            for (int c = 0; c < cols && ok; c++)
                for (int64_t r = 0; r < ldd && ok; r++) {
                    uint32_t got;
                    memcpy(&got, &dst[c * ldd + r], 4);
                    if (r < rows) ok = memcmp(&dst[c * ldd + r], &src[r * lds + c], 4) == 0;
                    else ok = got == SENT_F32;
                }
            CHECK(ok, "%s transpose rows=%lld cols=%d", name, (long long)rows, cols);
            gb_free(dst);
            free(src);
        }
}

static void test_hadamard_table(const cq_elementwise *t, const char *name)
{
    const cq_elementwise *ref = &cq_elementwise_ref;
    for (int n = 2; n <= 2048; n *= 2)
        for (int b = 2; b <= n && b <= 1024; b *= 2) {
            const int len = n * (b == n ? 1 : 3) / (b == n ? 1 : 2) / b * b; /* also non-power-of-two lengths */
            float *x = (float *)xmalloc(sizeof(float) * (size_t)len), *mul = (float *)xmalloc(sizeof(float) * (size_t)len);
            float *o1 = (float *)xmalloc(sizeof(float) * (size_t)(len + 1)), *o2 = (float *)xmalloc(sizeof(float) * (size_t)(len + 1));
            for (int i = 0; i < len; i++) {
                x[i] = rndf() * (i % 37 == 5 ? 300.0f : 3.0f); /* outliers, never constant */
                mul[i] = 0.25f + 0.5f * (float)((i * 7) % 5);
            }
            for (int withmul = 0; withmul < 2; withmul++) {
                const float *m = withmul ? mul : NULL;
                for (int i = 0; i <= len; i++) o1[i] = o2[i] = -777.0f;
                float a1 = -1.0f, a2 = -2.0f;
                int f1 = ref->hadamard_absmax(x, m, len, b, o1, &a1), f2 = t->hadamard_absmax(x, m, len, b, o2, &a2);
                CHECK(f1 == 1 && f2 == 1 && a1 == a2 && memcmp(o1, o2, sizeof(float) * (size_t)len) == 0,
                      "%s hadamard n=%d b=%d mul=%d", name, len, b, withmul);
                CHECK(o2[len] == -777.0f, "%s hadamard wrote past n=%d b=%d", name, len, b);
                if (t == ref && b <= 256) { /* the reference against the definition */
                    int bad = -1;
                    for (int i0 = 0; i0 < len && bad < 0; i0 += b)
                        for (int i = 0; i < b && bad < 0; i++) {
                            double sum = 0.0, mag = 0.0;
                            for (int j = 0; j < b; j++) {
                                double v = (double)(m ? x[i0 + j] * m[i0 + j] : x[i0 + j]);
                                sum += (__builtin_popcount((unsigned)(i & j)) & 1) ? -v : v;
                                mag += fabs(v);
                            }
                            if (fabs((double)o1[i0 + i] - sum) > 1e-5 * mag + 1e-30) bad = i0 + i;
                        }
                    CHECK(bad < 0, "reference hadamard n=%d b=%d mul=%d at %d", len, b, withmul, bad);
                }
            }
            x[len / 2] = NAN;
            CHECK(t->hadamard_absmax(x, NULL, len, b, o2, &a2_dummy) == 0, "%s hadamard NaN n=%d b=%d", name, len, b);
            x[len / 2] = INFINITY;
            CHECK(t->hadamard_absmax(x, NULL, len, b, o2, &a2_dummy) == 0, "%s hadamard Inf n=%d b=%d", name, len, b);
            for (int i = 0; i < len; i++) x[i] = 3.0e38f; /* finite, but the block sums overflow */
            CHECK(t->hadamard_absmax(x, NULL, len, b, o2, &a2_dummy) == 0, "%s hadamard overflow n=%d b=%d", name, len, b);
            free(x); free(mul); free(o1); free(o2);
        }
}

/* The pair-safe preparation of a block (ps_block) against the reference and the rule itself: codes
 * of four densities of pairs to change, every length (multiples of 4), a base k, room for all the
 * entries, and room for one fewer (-1, the codes as they were). */
static void test_ps_block_table(const cq_elementwise *t, const char *name)
{
    const cq_elementwise *ref = &cq_elementwise_ref;
    for (int si = 0; si < NSIZES; si++)
        for (int dens = 0; dens < 4; dens++) {
            const int64_t n = 4 * (int64_t)SIZES[si], base = 4 * (int64_t)(rnd() % 100);
            int8_t *x0 = (int8_t *)xmalloc((size_t)n), *x1 = (int8_t *)xmalloc((size_t)n), *x2 = (int8_t *)xmalloc((size_t)n);
            int32_t *e1 = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(CQ_PS_ENT * (n / 2 + 1)));
            int32_t *e2 = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(CQ_PS_ENT * (n / 2 + 1)));
            for (int64_t i = 0; i < n; i++) /* none / a few / half / every pair to change */
                x0[i] = dens == 0 ? (int8_t)(rnd_code() / 2) : dens == 3 ? (int8_t)(i & 2 ? -(65 + (int)(rnd() % 63)) : 65 + (int)(rnd() % 63))
                        : (rnd() % (dens == 1 ? 50 : 2)) ? rnd_code() : rnd_pm127();
            memcpy(x1, x0, (size_t)n);
            memcpy(x2, x0, (size_t)n);
            int32_t s1 = 0, s2 = -1;
            int64_t n1 = ref->ps_block(x1, n, base, n / 2, e1, &s1), n2 = t->ps_block(x2, n, base, n / 2, e2, &s2);
            CHECK(n1 == n2 && s1 == s2 && memcmp(x1, x2, (size_t)n) == 0 && memcmp(e1, e2, sizeof(int32_t) * (size_t)(CQ_PS_ENT * n1)) == 0,
                  "%s ps_block n=%lld density %d: %lld / %lld entries, sums %d / %d", name, (long long)n, dens,
                  (long long)n1, (long long)n2, s1, s2);
            /* the rule: every pair safe after, x' + entries = x, sum of x', entries in k order */
            int good = n2 >= 0 && (dens != 0 || n2 == 0) && (dens != 3 || n2 == n / 2);
            int32_t sum = 0;
            for (int64_t i = 0; i < n && good; i += 2) {
                const int p = x2[i] + x2[i + 1];
                good = p <= 128 && p >= -128;
                sum += p;
            }
            good = good && sum == s2;
            for (int64_t f = 0; f < n2 && good; f++) {
                const int32_t *en = e2 + CQ_PS_ENT * f;
                const int64_t k = cq_ps_ent_k(en);
                const int v = cq_ps_ent_v(en);
                good = k >= base && k < base + n && (f == 0 || k > cq_ps_ent_k(en - CQ_PS_ENT)) && v != 0 && v >= -126 &&
                       v <= 126 && (uint32_t)en[1] == (uint32_t)(v < 0 ? -v : v) << (8 * (k & 3)) && (en[0] < 0) == (v < 0);
                if (good) x2[k - base] = (int8_t)(x2[k - base] + v);
            }
            CHECK(good && memcmp(x2, x0, (size_t)n) == 0, "%s ps_block n=%lld density %d: the rule", name, (long long)n, dens);
            if (n1 > 0) {
                memcpy(x2, x0, (size_t)n);
                int64_t st = t->ps_block(x2, n, base, n1 - 1, e2, &s2);
                CHECK(st == -1 && memcmp(x2, x0, (size_t)n) == 0, "%s ps_block n=%lld room %lld < %lld: %lld or codes changed",
                      name, (long long)n, (long long)(n1 - 1), (long long)n1, (long long)st);
            }
            free(x0); free(x1); free(x2); free(e1); free(e2);
        }
}

static void test_elementwise(const cq_elementwise *t, const char *name)
{
    const cq_elementwise *ref = &cq_elementwise_ref;
    int f0 = failures, c0 = checks;
    for (int si = 0; si < NSIZES; si++) {
        int n = SIZES[si] * 3;
        float *x = (float *)xmalloc(sizeof(float) * (size_t)n);
        int8_t *q1 = (int8_t *)xmalloc((size_t)n), *q2 = (int8_t *)xmalloc((size_t)n);
        for (int i = 0; i < n; i++) x[i] = rndf() * 10.0f;
        if (n > 4) { x[1] = 2.5f; x[2] = -0.5f; x[3] = 1.5f; } /* ties: half to even */
        float a1, a2;
        int fin1 = ref->absmax(x, n, &a1), fin2 = t->absmax(x, n, &a2);
        CHECK(fin1 == 1 && fin2 == 1 && a1 == a2, "%s absmax n=%d %g %g", name, n, a1, a2);
        float s = a1 / 127.0f;
        for (int flip = 0; flip <= 0x80; flip += 0x80) {
            memset(q2, 0x55, (size_t)n);
            ref->quantize(x, n, s, q1, flip);
            t->quantize(x, n, s, q2, flip);
            CHECK(memcmp(q1, q2, (size_t)n) == 0, "%s quantize n=%d flip=%#x", name, n, flip);
            ref->quantize(x, n, 0.05f, q1, flip); /* codes that clamp */
            t->quantize(x, n, 0.05f, q2, flip);
            CHECK(memcmp(q1, q2, (size_t)n) == 0, "%s quantize clamp n=%d flip=%#x", name, n, flip);
        }
        /* the pre-scaled forms (x_mul): the products formed in registers, stored or not */
        {
            float *mul = (float *)xmalloc(sizeof(float) * (size_t)n), *prod = (float *)xmalloc(sizeof(float) * (size_t)n);
            for (int i = 0; i < n; i++) mul[i] = 0.01f + (float)((i * 13) % 17) * 0.37f;
            float p1, p2, p3;
            int g1 = ref->absmax_mul(x, mul, n, prod, &p1), g2 = t->absmax_mul(x, mul, n, NULL, &p2);
            int g3 = t->absmax_mul(x, mul, n, prod, &p3);
            CHECK(g1 == 1 && g2 == 1 && g3 == 1 && p1 == p2 && p1 == p3, "%s absmax_mul n=%d", name, n);
            for (int flip = 0; flip <= 0x80; flip += 0x80) {
                ref->quantize(prod, n, p1 / 127.0f, q1, flip);
                memset(q2, 0x55, (size_t)n);
                t->quantize_mul(x, mul, n, p1 / 127.0f, q2, flip);
                CHECK(memcmp(q1, q2, (size_t)n) == 0, "%s quantize_mul n=%d flip=%#x", name, n, flip);
            }
            free(mul); free(prod);
        }
        /* the reference itself: the contract in plain C */
        ref->quantize(x, n, s, q1, 0x80);
        int bad = -1;
        for (int i = 0; i < n && bad < 0; i++) {
            float r = nearbyintf(x[i] / s);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            if ((uint8_t)q1[i] != (uint8_t)((int)r + 128)) bad = i;
        }
        CHECK(bad < 0, "reference u8 quantize n=%d at %d", n, bad);
        x[n / 2] = NAN;
        CHECK(t->absmax(x, n, &a2) == 0, "%s absmax NaN n=%d", name, n);
        x[n / 2] = -INFINITY;
        CHECK(t->absmax(x, n, &a2) == 0, "%s absmax Inf n=%d", name, n);
        /* dequantize: bit-exact, every length (tails) */
        float *d1 = (float *)xmalloc(sizeof(float) * (size_t)n), *d2 = (float *)xmalloc(sizeof(float) * (size_t)n);
        for (int i = 0; i < n; i++) q1[i] = rnd_code();
        ref->dequant(q1, n, 0.0137f, d1);
        t->dequant(q1, n, 0.0137f, d2);
        CHECK(memcmp(d1, d2, sizeof(float) * (size_t)n) == 0, "%s dequant n=%d", name, n);
        free(x); free(q1); free(q2); free(d1); free(d2);
    }
    test_gelu_table(t, name);
    test_hadamard_table(t, name);
    test_quantize_division(t, name);
    test_transpose_table(t, name);
    test_ps_block_table(t, name);
    printf("%-4s element-wise %-12s %5d checks\n", failures == f0 ? "ok" : "FAIL", name, checks - c0);
}

/* int4 expansion (cq_i4_rows_for's, pack.c): n steps of nb packed bytes, src steps stride apart, to
 * their low and high codes side by side; every nibble value, against the formula (not the reference
 * kernel), with the bytes around the output untouched. */
static void test_i4_rows(cq_i4_rows_fn fn, const char *name)
{
    const int f0 = failures, c0 = checks;
    const int nbs[] = {64, 256};
    const int64_t ns[] = {1, 2, 3, 8, 33};
    for (int bi = 0; bi < 2; bi++)
        for (int ni = 0; ni < 5; ni++)
            for (int si = 0; si < 3; si++) {
                const int nb = nbs[bi];
                const int64_t n = ns[ni], stride = si == 0 ? nb : si == 1 ? nb + 64 : 4 * (int64_t)nb;
                uint8_t *src = (uint8_t *)xmalloc((size_t)(n * stride));
                for (int64_t i = 0; i < n * stride; i++) src[i] = (uint8_t)rnd();
                int8_t *out = (int8_t *)gb_new((size_t)(2 * n * nb / 4), SENT_I32);
                fn(src, stride, nb, n, out);
                int ok = gb_guards_ok(out, (size_t)(2 * n * nb / 4), SENT_I32);
                for (int64_t j = 0; j < n && ok; j++)
                    for (int i = 0; i < nb && ok; i++) {
                        const int b = src[j * stride + i], lo = (b & 15) >= 8 ? (b & 15) - 16 : (b & 15),
                                  hi = (b >> 4) >= 8 ? (b >> 4) - 16 : (b >> 4);
                        ok = out[2 * j * nb + i] == lo && out[2 * j * nb + nb + i] == hi;
                    }
                CHECK(ok, "%s i4 rows nb=%d n=%lld stride=%lld", name, nb, (long long)n, (long long)stride);
                gb_free(out);
                free(src);
            }
    printf("%-4s i4 expansion %-12s %5d checks\n", failures == f0 ? "ok" : "FAIL", name, checks - c0);
}

static void test_elementwise_tables(void)
{
    test_elementwise(&cq_elementwise_ref, "ref");
    test_i4_rows(cq_i4_rows_ref, "ref");
    if (isa_runs(CQ_ISA_AVX2)) test_i4_rows(cq_i4_rows_for(CQ_ISA_AVX2), "avx2 path");
    if (isa_runs(CQ_ISA_AVX512)) test_i4_rows(cq_i4_rows_for(CQ_ISA_AVX512), "avx512 path");
#ifdef CQ_X86
    if (!cq_elementwise_avx2.absmax) printf("skip avx2: element-wise kernels not compiled\n");
    else if (!isa_runs(CQ_ISA_AVX2)) printf("skip avx2: element-wise kernels (this CPU lacks it)\n");
    else test_elementwise(&cq_elementwise_avx2, "avx2");
    if (!cq_elementwise_avx512.absmax) printf("skip avx512: element-wise kernels not compiled\n");
    else if (!isa_runs(CQ_ISA_AVX512)) printf("skip avx512: element-wise kernels (this CPU lacks it)\n");
    else test_elementwise(&cq_elementwise_avx512, "avx512");
#endif
}

/* ==== 3. the public API on every ISA path ========================================================= */
/* The numerics contract in plain C: the scale of a slice and the code of one value. */
static float ref_scale(const float *w, int64_t len)
{
    float amax = 0.0f;
    for (int64_t i = 0; i < len; i++) amax = fabsf(w[i]) > amax ? fabsf(w[i]) : amax;
    float s = amax / 127.0f;
    return s > 0.0f ? s : 1.0f;
}
static int8_t ref_code(float w, float s)
{
    float r = nearbyintf(w / s);
    return (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
}

static const cq_ukernel *find_kernel(const char *name)
{
    for (int i = 0; i < cq_ukernel_count(); i++)
        if (strcmp(cq_ukernel_at(i)->name, name) == 0) return cq_ukernel_at(i);
    return NULL;
}
static int ends_with(const char *s, const char *tail)
{
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

static int ps_runs; /* calls that ran a config's pair-safe tile (check_kernel_ran) */

/* The kernel cq_linear runs for a weight in `fmt` and this shape on `path`: the config the registry
 * chooses, and the driver's GEMV rules (dynamic: M = 1, one scale group, one int32 chunk;
 * weight-only int8: M below the config's gemv_m). */
static const char *expected_kernel(int path, int fmt, int mode, int64_t m, int64_t k, int scheme, int64_t group)
{
    int64_t kp4 = cq_ceil_div(k, 4), ng = scheme == CQ_PER_GROUP ? k / group : 1;
    if (mode == CQ_MODE_WEIGHT_ONLY) {
        const cq_f32_config *f = cq_f32_config_for(path, fmt);
        return !f ? "(no config)" : m < f->gemv_m ? f->gemv4->name : f->gemm->name;
    }
    const cq_qd8_config *q = cq_qd8_config_for(path, fmt, ng > 1 ? group / 4 : kp4 > CQ_CHUNK4 ? kp4 : 0, m, kp4);
    if (!q) return "(no config)";
    /* M = 1: the GEMV, per channel when the sum fits one int32 chunk, per group when a group does */
    int gemv = m == 1 && q->gemv4 && (ng == 1 ? kp4 <= CQ_CHUNK4 : group / 4 <= CQ_CHUNK4);
    return gemv ? q->gemv4->name : q->gemm->name;
}
/* The config's pair-safe tile, which runs instead of its gemm when the rows allow it (linear.c,
 * want_ps; exact either way), or NULL. */
static const char *expected_kernel_alt(int path, int fmt, int mode, int64_t m, int64_t k, int scheme, int64_t group)
{
    int64_t kp4 = cq_ceil_div(k, 4);
    if (mode != CQ_MODE_DYNAMIC || scheme == CQ_PER_GROUP || kp4 > CQ_CHUNK4) return NULL;
    const cq_qd8_config *q = cq_qd8_config_for(path, fmt, 0, m, kp4);
    (void)group;
    /* M = 1 runs the GEMV where the config has one (AVX-512BW's has none: its tiles take M = 1) */
    return q && q->gemm_ps && !(m == 1 && q->gemv4) ? q->gemm_ps->name : NULL;
}

/* cq_last_kernel() after a call on `path` with a weight in `fmt`: a registry kernel the path
 * allows, the one the configs choose, and of the path the format says: N16K4 -> the AVX2 kernels
 * on every SIMD path (int8 ones: AVX-VNNI's on avxvnni, and on avx512vnni / amx where the CPU has
 * AVX-VNNI); N64K4 -> the AVX-512 kernels (float ones are AVX-512F's on the avx512vnni / amx
 * paths, int8 ones the path's own; AMX only where its config takes the shape), and the scalar
 * reference on the avx2 / avxvnni paths, which have no kernel for it. */
static void check_kernel_ran(int path, int fmt, int mode, int64_t m, int64_t k, int scheme, int64_t group,
                             const char *what)
{
    const char *got = cq_last_kernel();
    const cq_ukernel *uk = find_kernel(got);
    CHECK(uk != NULL, "%s: cq_last_kernel() = \"%s\" is no registry kernel", what, got);
    if (!uk) return;
    const char *want = expected_kernel(path, fmt, mode, m, k, scheme, group);
    const char *alt = expected_kernel_alt(path, fmt, mode, m, k, scheme, group);
    CHECK(strcmp(got, want) == 0 || (alt && strcmp(got, alt) == 0), "%s: ran %s, the config says %s", what, got, want);
    if (alt && strcmp(got, alt) == 0) ps_runs++;
    if (mode == CQ_MODE_DYNAMIC)
        CHECK(uk->op == CQ_UK_QD8_GEMM || uk->op == CQ_UK_QD8_GEMV4, "%s: %s is no int8 kernel", what, got);
    else
        CHECK(uk->op == CQ_UK_F32_GEMM || uk->op == CQ_UK_F32_GEMV4, "%s: %s is no float kernel", what, got);
    CHECK(path_allows(path, uk->isa), "%s: %s needs %s, not allowed on the path", what, got, cq_isa_name(uk->isa));
    int isa;
    if (path == CQ_ISA_SCALAR) isa = CQ_ISA_SCALAR;
    else if (fmt == CQ_FORMAT_N16K4)
        isa = mode == CQ_MODE_WEIGHT_ONLY ? CQ_ISA_AVX2
            : path == CQ_ISA_AVXVNNI || ((path == CQ_ISA_AVX512VNNI || path == CQ_ISA_AMX) && cq_cpu_has(CQ_ISA_AVXVNNI))
            ? CQ_ISA_AVXVNNI : CQ_ISA_AVX2;
    else if (path == CQ_ISA_AVX2 || path == CQ_ISA_AVXVNNI) isa = CQ_ISA_SCALAR;
    else if (mode == CQ_MODE_WEIGHT_ONLY) isa = CQ_ISA_AVX512;
    else if (path == CQ_ISA_AMX) isa = -1;
    else isa = path;
    if (isa >= 0) CHECK(uk->isa == isa, "%s: ran %s, want a kernel of %s", what, got, cq_isa_name(isa));
    else CHECK(uk->isa == CQ_ISA_AMX || uk->isa == CQ_ISA_AVX512VNNI, "%s: ran %s on the amx path", what, got);
    if (isa == CQ_ISA_SCALAR) CHECK(ends_with(got, "_ref"), "%s: ran %s, want the reference", what, got);
    if (isa == CQ_ISA_AVX512VNNI) CHECK(strstr(got, "avx512vnni") != NULL, "%s: ran %s", what, got);
}

/* Layout of a packed buffer as cquant.h documents it (codes) and internal.h (column sums). */
static int layout_ok(const void *packed, const int8_t *q, int64_t n, int64_t k, int64_t gs)
{
    cq_pack_header h;
    if (cq_pack_read_header(packed, &h) != CQ_OK) return 0;
    const int nr = h.nr;
    const int64_t kp4 = cq_ceil_div(k, 4), np = cq_ceil_div(n, nr), seg = gs ? gs : k, nseg = k / seg;
    if (nr != cq_format_nr(h.format) || h.n != n || h.k != k || h.kp4 != kp4 || h.np != np) return 0;
    const int8_t *codes = cq_pack_codes(packed);
    for (int64_t p = 0; p < np; p++)
        for (int64_t t = 0; t < kp4; t++)
            for (int j = 0; j < nr; j++)
                for (int i = 0; i < 4; i++) {
                    int64_t row = p * nr + j, col = 4 * t + i;
                    int8_t want = (row < n && col < k) ? q[row * k + col] : 0;
                    if (codes[((p * kp4 + t) * nr + j) * 4 + i] != want) return 0;
                }
    if (h.sums_bytes > 0) {
        const unsigned char *sums = cq_pack_sums(packed, &h); /* int32 at any alignment: cq_load_i32 */
        if (h.sums_off % 64 || h.nseg != (gs ? nseg : 1)) return 0;
        for (int64_t p = 0; p < np; p++)
            for (int64_t s = 0; s < h.nseg; s++)
                for (int j = 0; j < nr; j++) {
                    int64_t row = p * nr + j, sum = 0;
                    int64_t k0 = gs ? s * gs : 0, k1 = gs ? k0 + gs : k;
                    if (row < n)
                        for (int64_t c = k0; c < k1; c++) sum += q[row * k + c];
                    if (cq_load_i32(sums + 4 * ((p * h.nseg + s) * nr + j)) != (int32_t)sum) return 0;
                }
    }
    return 1;
}

typedef struct {
    int64_t m, n, k;
    int scheme;
    int64_t group;
    int bias, nanrow;
} shape;
/* GEN_GAUSS: Gaussian activations (codes mostly small: few pairs that can saturate), so that the
 * dynamic calls run the pair-safe tile where the path has one (uniform codes send every row to the
 * sign tile) */
enum { GEN_RANDOM, GEN_LARGE, GEN_GAUSS };
static float rnd_gauss(void) { return (float)(sqrt(-2.0 * log(1.0 - rnd01())) * cos(6.283185307179586 * rnd01())); }

/* One shape on the active path: quantize, dequantize, both formats packed / unpacked / read, and
 * cq_linear in both modes against a plain-C reference (int64 sums for the dynamic mode); gemm. */
static void run_shape(int path, const shape *s, int gen)
{
    const int64_t m = s->m, n = s->n, k = s->k, group = s->scheme == CQ_PER_GROUP ? s->group : 0;
    const int64_t g = group ? group : k, ng = k / g, gs = group;
    const int scheme = s->scheme;
    char what[200];
    snprintf(what, sizeof what, "path %s m=%lld n=%lld k=%lld scheme %d group %lld%s", cq_isa_name(path),
             (long long)m, (long long)n, (long long)k, scheme, (long long)group,
             gen == GEN_LARGE ? " (large sums)" : gen == GEN_GAUSS ? " (Gaussian x)" : "");
    float *w = (float *)xmalloc(sizeof(float) * (size_t)(n * k)), *x = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
    float *bias = s->bias ? (float *)xmalloc(sizeof(float) * (size_t)n) : NULL;
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < k; i++) {
            float v = rndf();
            if (gen == GEN_LARGE) v = j % 3 == 0 ? 1.0f - 0.02f * (float)rnd01() : j % 3 == 1 ? -1.0f + 0.02f * (float)rnd01() : rndf();
            w[j * k + i] = v;
        }
    for (int64_t i = 0; i < m * k; i++)
        x[i] = gen == GEN_LARGE ? 1.0f - 0.02f * (float)rnd01() : gen == GEN_GAUSS ? rnd_gauss() : rndf() * 3.0f;
    if (s->nanrow && m >= 2) x[1 * k + k / 2] = NAN;
    if (bias) for (int64_t j = 0; j < n; j++) bias[j] = rndf();

    /* quantize: the contract, bit for bit */
    int64_t ns = cq_num_scales(scheme, n, k, group);
    CHECK(ns == (scheme == CQ_PER_TENSOR ? 1 : n * ng), "%s: num_scales %lld", what, (long long)ns);
    float *sc = (float *)xmalloc(sizeof(float) * (size_t)ns);
    int8_t *q = (int8_t *)xmalloc((size_t)(n * k));
    CHECK(cq_quantize(w, n, k, scheme, group, q, sc) == CQ_OK, "%s: quantize", what);
    {
        int bad = 0;
        float st = scheme == CQ_PER_TENSOR ? ref_scale(w, n * k) : 0.0f;
        for (int64_t j = 0; j < n && !bad; j++)
            for (int64_t gi = 0; gi < ng && !bad; gi++) {
                float want = scheme == CQ_PER_TENSOR ? st : ref_scale(w + j * k + gi * g, g);
                float got = scheme == CQ_PER_TENSOR ? sc[0] : sc[j * ng + gi];
                if (fbits(got) != fbits(want)) bad = 1;
                for (int64_t i = gi * g; i < (gi + 1) * g && !bad; i++)
                    if (q[j * k + i] != ref_code(w[j * k + i], want)) bad = 2;
            }
        CHECK(!bad, "%s: quantize %s differ from the contract", what, bad == 1 ? "scales" : "codes");
        float *dq = (float *)xmalloc(sizeof(float) * (size_t)(n * k));
        CHECK(cq_dequantize(q, sc, n, k, scheme, group, dq) == CQ_OK, "%s: dequantize", what);
        for (int64_t i = 0; i < n * k && !bad; i++) {
            float want = (float)q[i] * (scheme == CQ_PER_TENSOR ? sc[0] : sc[(i / k) * ng + (i % k) / g]);
            if (fbits(dq[i]) != fbits(want)) bad = 3;
        }
        CHECK(bad != 3, "%s: dequantize not q * scale", what);
        free(dq);
    }
    /* activations: cq_quantize_rows against the contract, u8 = s8 + 128 */
    int8_t *qx = (int8_t *)xmalloc((size_t)(m * k));
    uint8_t *qu = (uint8_t *)xmalloc((size_t)(m * k));
    float *sx = (float *)xmalloc(sizeof(float) * (size_t)m), *sxu = (float *)xmalloc(sizeof(float) * (size_t)m);
    CHECK(cq_quantize_rows(x, m, k, qx, sx) == CQ_OK && cq_quantize_rows_u8(x, m, k, qu, sxu) == CQ_OK, "%s: quantize_rows", what);
    {
        int bad = 0;
        for (int64_t r = 0; r < m && !bad; r++) {
            int finite = 1;
            for (int64_t i = 0; i < k; i++) finite &= isfinite(x[r * k + i]) != 0;
            if (!finite) {
                if (!isnan(sx[r]) || !isnan(sxu[r])) bad = 1;
                for (int64_t i = 0; i < k; i++)
                    if (qx[r * k + i] != 0 || qu[r * k + i] != 128) bad = 2;
                continue;
            }
            float want = ref_scale(x + r * k, k);
            if (fbits(sx[r]) != fbits(want) || fbits(sxu[r]) != fbits(want)) bad = 3;
            for (int64_t i = 0; i < k && !bad; i++)
                if (qx[r * k + i] != ref_code(x[r * k + i], want) || qu[r * k + i] != (uint8_t)(qx[r * k + i] + 128)) bad = 4;
        }
        CHECK(!bad, "%s: quantize_rows differs from the contract (%d)", what, bad);
    }
    /* exact int64 sums per (row, column, group) */
    int64_t *accg = (int64_t *)xmalloc(sizeof(int64_t) * (size_t)(m * n * ng));
    int64_t biggest = 0;
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            int64_t tot = 0;
            for (int64_t gi = 0; gi < ng; gi++) {
                int64_t a = 0;
                const int8_t *xr = qx + r * k + gi * g, *wr = q + j * k + gi * g;
                for (int64_t i = 0; i < g; i++) a += (int64_t)xr[i] * wr[i];
                accg[(r * n + j) * ng + gi] = a;
                tot += a;
            }
            if (llabs(tot) > biggest) biggest = llabs(tot);
        }
    if (gen == GEN_LARGE) CHECK(biggest > INT32_MAX, "%s: test data: sums %lld fit int32", what, (long long)biggest);
    /* gemm_s8s8s32 on the same codes */
    if (k <= CQ_MAX_K_S32 && !s->nanrow) {
        int32_t *c = (int32_t *)gb_new((size_t)(m * n), SENT_I32);
        CHECK(cq_gemm_s8s8s32(qx, q, m, n, k, c) == CQ_OK, "%s: gemm", what);
        int64_t bad = -1;
        for (int64_t r = 0; r < m && bad < 0; r++)
            for (int64_t j = 0; j < n && bad < 0; j++) {
                int64_t tot = 0;
                for (int64_t gi = 0; gi < ng; gi++) tot += accg[(r * n + j) * ng + gi];
                if (c[r * n + j] != tot) bad = r * n + j;
            }
        CHECK(bad < 0, "%s: gemm_s8s8s32 c[%lld] = %d", what, (long long)bad, bad >= 0 ? c[bad] : 0);
        CHECK(gb_guards_ok(c, (size_t)(m * n), SENT_I32), "%s: gemm wrote outside c", what);
        const cq_qd8_config *cfg = cq_qd8_config_for(path, cq_best_format(n), 0, m, cq_ceil_div(k, 4));
        CHECK(cfg && strcmp(cq_last_kernel(), cfg->gemm->name) == 0, "%s: gemm ran %s", what, cq_last_kernel());
        gb_free(c);
    }

    for (int fmt = CQ_FORMAT_N16K4; fmt <= CQ_FORMAT_N64K4; fmt++) {
        char fwhat[240];
        snprintf(fwhat, sizeof fwhat, "%s, format %s", what, fmt == CQ_FORMAT_N16K4 ? "N16K4" : "N64K4");
        int64_t size = cq_packed_size(fmt, n, k, gs);
        CHECK(size > CQ_PACK_HEADER, "%s: packed_size %lld", fwhat, (long long)size);
        if (size <= 0) continue;
        int8_t *packed = (int8_t *)gb_new((size_t)cq_ceil_div(size, 4), 0xa5a5a5a5u);
        memset(packed + size, 0xa5, (size_t)(cq_ceil_div(size, 4) * 4 - size));
        CHECK(cq_pack(fmt, q, n, k, gs, packed) == CQ_OK, "%s: pack", fwhat);
        CHECK(gb_guards_ok(packed, (size_t)cq_ceil_div(size, 4), 0xa5a5a5a5u), "%s: pack wrote outside", fwhat);
        CHECK(layout_ok(packed, q, n, k, gs), "%s: packed layout", fwhat);
        int64_t pn = -1, pk = -1, pg = -1;
        CHECK(cq_packed_info(packed, size, &pn, &pk, &pg) == fmt && pn == n && pk == k && pg == (gs == k ? 0 : gs),
              "%s: packed_info %lld %lld %lld", fwhat, (long long)pn, (long long)pk, (long long)pg);
        int8_t *back = (int8_t *)xmalloc((size_t)(n * k));
        CHECK(cq_unpack(packed, n, k, back) == CQ_OK && memcmp(back, q, (size_t)(n * k)) == 0, "%s: unpack round trip", fwhat);
        free(back);
        for (int mode = CQ_MODE_WEIGHT_ONLY; mode <= CQ_MODE_DYNAMIC; mode++) {
            float *y = (float *)gb_new((size_t)(m * n), SENT_F32);
            int st = cq_linear(mode, x, m, k, packed, sc, scheme, group, n, bias, y);
            CHECK(st == CQ_OK, "%s: linear mode %d gave %d", fwhat, mode, st);
            int64_t bad = -1;
            double badref = 0;
            for (int64_t r = 0; r < m && bad < 0; r++) {
                int finite = isfinite(sx[r]);
                for (int64_t j = 0; j < n && bad < 0; j++) {
                    float got = y[r * n + j];
                    if (!finite) { if (isfinite(got)) bad = r * n + j; continue; }
                    double ref = bias ? bias[j] : 0.0, mag = fabs(ref), terms;
                    if (mode == CQ_MODE_DYNAMIC) {
                        for (int64_t gi = 0; gi < ng; gi++) {
                            double sw = scheme == CQ_PER_TENSOR ? sc[0] : sc[j * ng + gi];
                            double t = (double)accg[(r * n + j) * ng + gi] * sw * sx[r];
                            ref += t; mag += fabs(t);
                        }
                        terms = (double)ng + 4;
                    } else {
                        for (int64_t i = 0; i < k; i++) {
                            float sw = scheme == CQ_PER_TENSOR ? sc[0] : sc[j * ng + i / g];
                            double t = (double)x[r * k + i] * (double)((float)q[j * k + i] * sw);
                            ref += t; mag += fabs(t);
                        }
                        terms = (double)k + 4;
                    }
                    if (!(fabs((double)got - ref) <= 2.0 * terms * 5.9604645e-08 * mag + 1e-30)) { bad = r * n + j; badref = ref; }
                }
            }
            CHECK(bad < 0, "%s: linear mode %d: y[%lld][%lld] = %.9g, ref %.9g", fwhat, mode, (long long)(bad / n),
                  (long long)(bad % n), bad >= 0 ? y[bad] : 0.0f, badref);
            CHECK(gb_guards_ok(y, (size_t)(m * n), SENT_F32), "%s: linear mode %d wrote outside y", fwhat, mode);
            char mwhat[300];
            snprintf(mwhat, sizeof mwhat, "%s, mode %d", fwhat, mode);
            check_kernel_ran(path, fmt, mode, m, k, scheme, group, mwhat);
            gb_free(y);
        }
        gb_free(packed);
    }
    free(w); free(x); free(bias); free(sc); free(q); free(qx); free(qu); free(sx); free(sxu); free(accg);
}

static const shape SHAPES[] = {
    /* m, n, k, scheme, group, bias, nanrow */
    {1, 20, 33, CQ_PER_CHANNEL, 0, 1, 0},    /* GEMV, ragged n and k */
    {1, 70, 256, CQ_PER_GROUP, 64, 0, 0},    /* M = 1 per group: the GEMM kernel */
    {1, 257, 1, CQ_PER_TENSOR, 0, 1, 0},     /* k = 1 */
    {1, 300, 512, CQ_PER_CHANNEL, 0, 0, 0},  /* GEMV over several 4-panel units */
    {2, 70, 130, CQ_PER_TENSOR, 0, 0, 0},
    {2, 130, 192, CQ_PER_GROUP, 32, 1, 0},
    {3, 100, 1100, CQ_PER_CHANNEL, 0, 1, 1}, /* weight-only GEMV, several k blocks; a NaN row */
    {5, 17, 64, CQ_PER_GROUP, 4, 1, 0},
    {5, 40, 1500, CQ_PER_CHANNEL, 0, 0, 1},  /* several int8 k blocks (acc_in), ragged k; a NaN row */
    {7, 130, 96, CQ_PER_GROUP, 32, 0, 0},
    {7, 1, 5, CQ_PER_TENSOR, 0, 1, 0},
    {9, 64, 4, CQ_PER_GROUP, 4, 0, 0},
    {50, 20, 36, CQ_PER_CHANNEL, 0, 0, 0},   /* two row blocks of the int8 driver */
    {64, 100, 128, CQ_PER_GROUP, 64, 1, 0},
    {64, 33, 257, CQ_PER_CHANNEL, 0, 1, 0},
    {64, 130, 320, CQ_PER_CHANNEL, 0, 1, 0}, /* AMX-sized: m >= 8, k a multiple of 64 */
    {100, 20, 40, CQ_PER_TENSOR, 0, 0, 0},   /* two row blocks of the weight-only driver */
};

/* Shapes where the pair-safe tile runs on Gaussian activations (GEN_GAUSS): N >= 64 (PS_MIN_N),
 * per channel / per tensor; several row tiles, ragged k, M = 1 (no GEMV on AVX-512BW). */
static const shape PS_SHAPES[] = {
    {1, 64, 300, CQ_PER_CHANNEL, 0, 1, 0},
    {6, 70, 130, CQ_PER_TENSOR, 0, 0, 0},
    {9, 130, 1501, CQ_PER_CHANNEL, 0, 1, 0},
    {64, 128, 768, CQ_PER_CHANNEL, 0, 0, 1}, /* a NaN row: its codes zero, the rest exact */
    {6, 64, 16500, CQ_PER_CHANNEL, 0, 1, 0}, /* K > PS_BLOCK_K: several k blocks, each with its sums and entries */
};

/* k past one int32 chunk (CQ_CHUNK4 steps): sums beyond int32, accumulated in int64 chunks. */
static const shape BIG_SHAPES[] = {
    {2, 20, 140000, CQ_PER_CHANNEL, 0, 1, 0},
    {2, 20, 140000, CQ_PER_GROUP, 70000, 0, 0},  /* two groups, each within int32 */
    {1, 20, 140000, CQ_PER_GROUP, 140000, 1, 0}, /* one group longer than a chunk */
};

/* cq_gemm_s8s8s32 at k = CQ_MAX_K_S32, codes +-127: sums up to 127*127*k, just inside int32. */
static void test_gemm_max_k(int path)
{
    const int64_t m = 3, n = 60, k = CQ_MAX_K_S32; /* 60: the wide format on AVX-512 (u8 kernels) */
    int8_t *a = (int8_t *)xmalloc((size_t)(m * k)), *b = (int8_t *)xmalloc((size_t)(n * k));
    for (int64_t i = 0; i < m * k; i++) a[i] = i < k ? 127 : i < 2 * k ? -127 : rnd_pm127();
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < k; i++) b[j * k + i] = j % 3 == 0 ? 127 : j % 3 == 1 ? -127 : rnd_pm127();
    int32_t *c = (int32_t *)gb_new((size_t)(m * n), SENT_I32);
    CHECK(cq_gemm_s8s8s32(a, b, m, n, k, c) == CQ_OK, "path %s: gemm k = CQ_MAX_K_S32", cq_isa_name(path));
    int64_t bad = -1, want = 0;
    for (int64_t r = 0; r < m && bad < 0; r++)
        for (int64_t j = 0; j < n && bad < 0; j++) {
            int64_t s = 0;
            for (int64_t i = 0; i < k; i++) s += (int64_t)a[r * k + i] * b[j * k + i];
            if (c[r * n + j] != s) { bad = r * n + j; want = s; }
        }
    CHECK(bad < 0, "path %s: gemm k = CQ_MAX_K_S32: c[%lld] = %d, want %lld", cq_isa_name(path), (long long)bad,
          bad >= 0 ? c[bad] : 0, (long long)want);
    CHECK(c[0] == 127 * 127 * k, "path %s: gemm k = CQ_MAX_K_S32 extreme value %d", cq_isa_name(path), c[0]);
    CHECK(gb_guards_ok(c, (size_t)(m * n), SENT_I32), "path %s: gemm wrote outside c", cq_isa_name(path));
    const cq_qd8_config *cfg = cq_qd8_config_for(path, cq_best_format(n), 0, m, cq_ceil_div(k, 4));
    CHECK(cfg && strcmp(cq_last_kernel(), cfg->gemm->name) == 0, "path %s: gemm ran %s", cq_isa_name(path), cq_last_kernel());
    CHECK(cq_gemm_s8s8s32(a, b, 1, n, k + 1, c) == CQ_ERR_OVERFLOW, "gemm refuses k > CQ_MAX_K_S32");
    gb_free(c); free(a); free(b);
}

/* Results do not depend on the thread count (every output is computed by one thread). */
static void test_threads_identical(int path)
{
    /* big enough that every call engages the threads (cq_threads_for: >= 1M multiply-adds),
     * including the single-row GEMV */
    const int64_t m = EMU ? 9 : 37, k = EMU ? 1024 : 1100, n = EMU ? 1024 : 1000;
    float *w = (float *)xmalloc(sizeof(float) * (size_t)(n * k)), *x = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
    float *sc = (float *)xmalloc(sizeof(float) * (size_t)n);
    float *y1 = (float *)xmalloc(sizeof(float) * (size_t)(m * n)), *y2 = (float *)xmalloc(sizeof(float) * (size_t)(m * n));
    int8_t *q = (int8_t *)xmalloc((size_t)(n * k)), *qx = (int8_t *)xmalloc((size_t)(m * k));
    int32_t *c1 = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(m * n)), *c2 = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(m * n));
    float *sx = (float *)xmalloc(sizeof(float) * (size_t)m);
    for (int64_t i = 0; i < n * k; i++) w[i] = rndf();
    for (int64_t i = 0; i < m * k; i++) x[i] = rndf();
    cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, sc);
    cq_quantize_rows(x, m, k, qx, sx);
    int8_t *packed = (int8_t *)xmalloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
    CHECK(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, packed) == CQ_OK, "pack (auto format)");
    int saved = cq_get_num_threads();
    for (int mode = 0; mode < 2; mode++)
        for (int64_t rows = 1; rows <= m; rows += m - 1) {
            cq_set_num_threads(1);
            cq_linear(mode, x, rows, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y1);
            for (int t = 2; t <= 4; t++) {
                cq_set_num_threads(t);
                memset(y2, 0, sizeof(float) * (size_t)(rows * n));
                CHECK(cq_linear(mode, x, rows, k, packed, sc, CQ_PER_CHANNEL, 0, n, NULL, y2) == CQ_OK, "linear");
                CHECK(memcmp(y1, y2, sizeof(float) * (size_t)(rows * n)) == 0, "path %s: mode %d rows %lld threads %d differ",
                      cq_isa_name(path), mode, (long long)rows, t);
            }
        }
    cq_set_num_threads(1);
    cq_gemm_s8s8s32(qx, q, m, n, k, c1);
    for (int t = 2; t <= 4; t++) {
        cq_set_num_threads(t);
        CHECK(cq_gemm_s8s8s32(qx, q, m, n, k, c2) == CQ_OK && memcmp(c1, c2, sizeof(int32_t) * (size_t)(m * n)) == 0,
              "path %s: gemm threads %d differ", cq_isa_name(path), t);
    }
    cq_set_num_threads(saved);
    free(w); free(x); free(sc); free(y1); free(y2); free(q); free(qx); free(c1); free(c2); free(sx); free(packed);
}

static void test_gelu_layer_norm(int path)
{
    int64_t n = 1000;
    float *x = (float *)xmalloc(sizeof(float) * (size_t)n), *y = (float *)xmalloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = rndf() * 8.0f;
    CHECK(cq_gelu(x, n, y) == CQ_OK, "gelu");
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double v = x[i], ref = 0.5 * v * (1.0 + erf(v * 0.7071067811865476));
        if (!(fabs(y[i] - ref) <= 1e-6 + 3e-7 * fabs(v))) bad++;
    }
    CHECK(!bad, "path %s: cq_gelu: %d values off", cq_isa_name(path), bad);
    free(x); free(y);
    int64_t m = 5, k = 37;
    float lx[5 * 37], ly[5 * 37], gm[37], bt[37];
    for (int i = 0; i < m * k; i++) lx[i] = 100.0f + rndf() * 3.0f; /* a large mean: no cancellation */
    for (int i = 0; i < k; i++) { gm[i] = 1.0f + 0.1f * (float)i; bt[i] = 0.01f * (float)i; }
    CHECK(cq_layer_norm(lx, m, k, gm, bt, 1e-5f, ly) == CQ_OK, "layer_norm");
    bad = 0;
    for (int64_t r = 0; r < m; r++) {
        double mu = 0, var = 0;
        for (int64_t i = 0; i < k; i++) mu += lx[r * k + i];
        mu /= (double)k;
        for (int64_t i = 0; i < k; i++) var += (lx[r * k + i] - mu) * (lx[r * k + i] - mu);
        var /= (double)k;
        for (int64_t i = 0; i < k; i++) {
            double ref = (lx[r * k + i] - mu) / sqrt(var + 1e-5) * gm[i] + bt[i];
            if (!(fabs(ly[r * k + i] - ref) <= 2e-5 * (1 + fabs(ref)))) bad++;
        }
    }
    CHECK(!bad, "path %s: layer_norm: %d values off", cq_isa_name(path), bad);
    CHECK(cq_layer_norm(lx, m, k, NULL, NULL, 1e-5f, lx) == CQ_OK, "in place, no affine");
}

/* The float32 layers with per-path kernels: LayerNorm with a residual, row softmax with a mask
 * bias, attention; against double-precision references. */
static void test_float_layers(int path)
{
    const char *pn = cq_isa_name(path);
    /* add + LayerNorm, ragged k, in place into x and into residual, and without a residual */
    static const int64_t ks[] = {1, 7, 37, 768};
    for (unsigned ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        const int64_t m = 3, k = ks[ki];
        float *x = (float *)xmalloc(sizeof(float) * (size_t)(m * k)), *res = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
        float *g = (float *)xmalloc(sizeof(float) * (size_t)k), *b = (float *)xmalloc(sizeof(float) * (size_t)k);
        float *y = (float *)gb_new((size_t)(m * k), SENT_F32), *x0 = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
        for (int64_t i = 0; i < m * k; i++) { x[i] = 10.0f + rndf() * 3.0f; res[i] = rndf(); }
        for (int64_t i = 0; i < k; i++) { g[i] = 1.0f + 0.1f * rndf(); b[i] = 0.1f * rndf(); }
        memcpy(x0, x, sizeof(float) * (size_t)(m * k));
        for (int variant = 0; variant < 3; variant++) {
            const float *r = variant == 2 ? NULL : res;
            float *out = variant == 1 ? x : y;
            memcpy(x, x0, sizeof(float) * (size_t)(m * k));
            CHECK(cq_add_layer_norm(x, r, m, k, g, b, 1e-5f, out) == CQ_OK, "add_layer_norm");
            int bad = 0;
            for (int64_t row = 0; row < m; row++) {
                double mu = 0, var = 0;
                for (int64_t i = 0; i < k; i++) mu += (double)(x0[row * k + i] + (r ? r[row * k + i] : 0.0f));
                mu /= (double)k;
                for (int64_t i = 0; i < k; i++) {
                    double d = (double)(x0[row * k + i] + (r ? r[row * k + i] : 0.0f)) - mu;
                    var += d * d;
                }
                var /= (double)k;
                for (int64_t i = 0; i < k; i++) {
                    double v = (double)(x0[row * k + i] + (r ? r[row * k + i] : 0.0f));
                    double ref = (v - mu) / sqrt(var + 1e-5) * g[i] + b[i];
                    if (!(fabs(out[row * k + i] - ref) <= 2e-5 * (1 + fabs(ref)))) bad++;
                }
            }
            CHECK(!bad, "path %s: add_layer_norm k=%lld variant %d: %d values off", pn, (long long)k, variant, bad);
            if (variant != 1) CHECK(gb_guards_ok(y, (size_t)(m * k), SENT_F32), "add_layer_norm wrote outside y");
        }
        { /* the residual's columns scaled (cq_add_layer_norm_ex): bit for bit the plain call on the
           * float32 products, in place into the residual too */
            float *rm = (float *)xmalloc(sizeof(float) * (size_t)k), *prod = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
            float *want = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
            for (int64_t i = 0; i < k; i++) rm[i] = 0.25f + 4.0f * fabsf(rndf());
            for (int64_t i = 0; i < m * k; i++) prod[i] = res[i] * rm[i % k];
            CHECK(cq_add_layer_norm(x0, prod, m, k, g, b, 1e-5f, want) == CQ_OK, "add_layer_norm");
            CHECK(cq_add_layer_norm_ex(x0, res, rm, m, k, g, b, 1e-5f, y) == CQ_OK, "add_layer_norm_ex");
            CHECK(!memcmp(y, want, sizeof(float) * (size_t)(m * k)), "path %s: add_layer_norm_ex k=%lld differs", pn,
                  (long long)k);
            CHECK(gb_guards_ok(y, (size_t)(m * k), SENT_F32), "add_layer_norm_ex wrote outside y");
            memcpy(prod, res, sizeof(float) * (size_t)(m * k));
            CHECK(cq_add_layer_norm_ex(x0, prod, rm, m, k, g, b, 1e-5f, prod) == CQ_OK, "add_layer_norm_ex in place");
            CHECK(!memcmp(prod, want, sizeof(float) * (size_t)(m * k)), "path %s: add_layer_norm_ex in place k=%lld",
                  pn, (long long)k);
            CHECK(cq_add_layer_norm_ex(x0, NULL, rm, m, k, g, b, 1e-5f, y) == CQ_ERR_NULL, "rmul without residual");
            CHECK(cq_add_layer_norm_ex(x0, res, prod, m, k, g, b, 1e-5f, prod) == CQ_ERR_ALIAS, "y over rmul");
            free(rm); free(prod); free(want);
        }
        free(x); free(res); free(g); free(b); gb_free(y); free(x0);
    }
    /* softmax rows with a mask bias shared by 2 rows, ragged k, special rows */
    static const int64_t sks[] = {1, 7, 16, 33, 200};
    for (unsigned ki = 0; ki < sizeof sks / sizeof sks[0]; ki++) {
        const int64_t m = 6, k = sks[ki];
        const float scale = 0.3f;
        float *x = (float *)gb_new((size_t)(m * k), SENT_F32), *x0 = (float *)xmalloc(sizeof(float) * (size_t)(m * k));
        float *bias = (float *)xmalloc(sizeof(float) * (size_t)(3 * k));
        for (int64_t i = 0; i < m * k; i++) x[i] = rndf() * 20.0f;
        for (int64_t i = 0; i < 3 * k; i++) bias[i] = (rnd() % 5 == 0 && i % k) ? -INFINITY : rndf();
        if (k > 1) x[4 * k + 1] = NAN;                                           /* row 4: NaN */
        if (k > 2) { x[1 * k + 2] = 400.0f; }                                    /* row 1: others underflow */
        for (int64_t i = 0; i < k; i++) bias[2 * k + i] = i % 2 ? -INFINITY : bias[2 * k + i]; /* rows 4, 5 */
        memcpy(x0, x, sizeof(float) * (size_t)(m * k));
        CHECK(cq_softmax_rows(x, m, k, bias, 2, scale) == CQ_OK, "softmax_rows");
        int bad = 0;
        for (int64_t r = 0; r < m; r++) {
            const float *br = bias + (r / 2) * k;
            double mx = -INFINITY, sum = 0;
            int nan = 0;
            for (int64_t i = 0; i < k; i++) {
                float t = x0[r * k + i] * scale + br[i];
                if (isnan(t)) nan = 1;
                else if (t > mx) mx = t;
            }
            if (nan || mx == -INFINITY) {
                for (int64_t i = 0; i < k; i++) bad += !isnan(x[r * k + i]);
                continue;
            }
            for (int64_t i = 0; i < k; i++) sum += exp((double)(x0[r * k + i] * scale + br[i]) - mx);
            for (int64_t i = 0; i < k; i++) {
                double ref = exp((double)(x0[r * k + i] * scale + br[i]) - mx) / sum;
                if (!(fabs(x[r * k + i] - ref) <= 4e-6 * ref + 2e-38)) bad++;
            }
        }
        CHECK(!bad, "path %s: softmax_rows k=%lld: %d values off", pn, (long long)k, bad);
        CHECK(gb_guards_ok(x, (size_t)(m * k), SENT_F32), "softmax_rows wrote outside x");
        gb_free(x); free(x0); free(bias);
    }
    {
        float f[4] = {1, 2, 3, 4};
        CHECK(cq_softmax_rows(f, 0, 4, NULL, 0, 1.0f) == CQ_OK && cq_softmax_rows(f, 1, 4, f, 0, 1.0f) == CQ_ERR_SHAPE,
              "softmax_rows args");
    }
    /* attention: fused QKV rows (ld = 3 * heads * head_dim), a padding mask, ldo > heads * head_dim */
    static const int64_t seqs[] = {1, 5, 17};
    for (unsigned si = 0; si < sizeof seqs / sizeof seqs[0]; si++) {
        const int64_t batch = 2, seq = seqs[si], heads = 3, hd = si == 2 ? 64 : 8, w = heads * hd;
        const int64_t ld = 3 * w, ldo = w + 5;
        const float scale = 1.0f / sqrtf((float)hd);
        float *qkv = (float *)xmalloc(sizeof(float) * (size_t)(batch * seq * ld));
        float *mask = (float *)xmalloc(sizeof(float) * (size_t)(batch * seq));
        float *out = (float *)gb_new((size_t)(batch * seq * ldo), SENT_F32);
        for (int64_t i = 0; i < batch * seq * ld; i++) qkv[i] = rndf() * 2.0f;
        for (int64_t i = 0; i < batch * seq; i++) mask[i] = (i >= seq && i % seq >= seq - 2 && i % seq) ? -10000.0f : 0.0f;
        const float *q = qkv, *kk = qkv + w, *v = qkv + 2 * w;
        CHECK(cq_attention(q, kk, v, ld, batch, seq, heads, hd, mask, scale, out, ldo) == CQ_OK, "attention");
        int bad = 0;
        double *p = (double *)xmalloc(sizeof(double) * (size_t)seq);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t h = 0; h < heads; h++)
                for (int64_t t = 0; t < seq; t++) {
                    double mx = -INFINITY, sum = 0;
                    for (int64_t u = 0; u < seq; u++) {
                        double sc = 0;
                        for (int64_t d = 0; d < hd; d++)
                            sc += (double)q[(b * seq + t) * ld + h * hd + d] * kk[(b * seq + u) * ld + h * hd + d];
                        p[u] = sc * scale + mask[b * seq + u];
                        if (p[u] > mx) mx = p[u];
                    }
                    for (int64_t u = 0; u < seq; u++) { p[u] = exp(p[u] - mx); sum += p[u]; }
                    for (int64_t d = 0; d < hd; d++) {
                        double ref = 0;
                        for (int64_t u = 0; u < seq; u++) ref += p[u] / sum * v[(b * seq + u) * ld + h * hd + d];
                        if (!(fabs(out[(b * seq + t) * ldo + h * hd + d] - ref) <= 3e-5)) bad++;
                    }
                }
        for (int64_t r = 0; r < batch * seq; r++)
            for (int64_t j = w; j < ldo; j++) bad += fbits(out[r * ldo + j]) != SENT_F32;
        CHECK(!bad, "path %s: attention seq=%lld head_dim=%lld: %d values off", pn, (long long)seq, (long long)hd, bad);
        CHECK(gb_guards_ok(out, (size_t)(batch * seq * ldo), SENT_F32), "attention wrote outside out");
        free(qkv); free(mask); gb_free(out); free(p);
    }
}

static void test_path(int path)
{
    int f0 = failures, c0 = checks;
    double t0 = now_s();
    CHECK(cq_set_isa(path) == CQ_OK && cq_get_isa() == path, "set isa %s", cq_isa_name(path));
    /* the best format: the widest panels the path's int8 kernels read; panels of 16 for n < 48 */
    int wide = path_rank(path) >= path_rank(CQ_ISA_AVX512);
    CHECK(cq_best_format(4096) == (wide ? CQ_FORMAT_N64K4 : CQ_FORMAT_N16K4), "path %s: best format %d",
          cq_isa_name(path), cq_best_format(4096));
    CHECK(cq_best_format(16) == CQ_FORMAT_N16K4, "path %s: best format for n = 16: %d", cq_isa_name(path), cq_best_format(16));
    for (unsigned i = 0; i < sizeof SHAPES / sizeof SHAPES[0]; i++) run_shape(path, &SHAPES[i], GEN_RANDOM);
    { /* the pair-safe tile end to end: per-channel / per-tensor, N >= 64, Gaussian rows; where the
       * path's configs have one it must have run (and matched the int64 reference above) */
        int ps0 = ps_runs, want_ps = 0;
        for (unsigned i = 0; i < sizeof PS_SHAPES / sizeof PS_SHAPES[0]; i++) {
            const shape *sp = &PS_SHAPES[i];
            int fmt = cq_best_format(sp->n);
            want_ps |= expected_kernel_alt(path, fmt, CQ_MODE_DYNAMIC, sp->m, sp->k, sp->scheme, 0) != NULL;
            run_shape(path, sp, GEN_GAUSS);
        }
        CHECK(!want_ps || ps_runs > ps0, "path %s: the pair-safe tile never ran on Gaussian rows", cq_isa_name(path));
    }
    if (!EMU) {
        for (unsigned i = 0; i < sizeof BIG_SHAPES / sizeof BIG_SHAPES[0]; i++) run_shape(path, &BIG_SHAPES[i], GEN_LARGE);
        test_gemm_max_k(path);
    }
    test_threads_identical(path);
    test_gelu_layer_norm(path);
    test_float_layers(path);
    printf("%-4s path %-10s (public API)                    %5d checks  %6.2f s\n", failures == f0 ? "ok" : "FAIL",
           cq_isa_name(path), checks - c0, now_s() - t0);
    fflush(stdout);
}

/* ---- packed buffers that are not what the call says ---- */
static void test_packed_errors(void)
{
    const int64_t n = 70, k = 96, m = 3;
    int8_t q[70 * 96], back[70 * 96];
    float w[70 * 96], sc[70 * 3], x[3 * 96], y[3 * 70];
    for (int i = 0; i < n * k; i++) w[i] = rndf();
    for (int i = 0; i < m * k; i++) x[i] = rndf();
    CHECK(cq_quantize(w, n, k, CQ_PER_CHANNEL, 0, q, sc) == CQ_OK, "quantize");
    for (int fmt = CQ_FORMAT_N16K4; fmt <= CQ_FORMAT_N64K4; fmt++) {
        int64_t size = cq_packed_size(fmt, n, k, 0), gsize = cq_packed_size(fmt, n, k, 32);
        int8_t *p = (int8_t *)xmalloc((size_t)size), *bad = (int8_t *)xmalloc((size_t)size);
        int8_t *pg = (int8_t *)xmalloc((size_t)gsize);
        CHECK(cq_pack(fmt, q, n, k, 0, p) == CQ_OK && cq_pack(fmt, q, n, k, 32, pg) == CQ_OK, "pack");
        CHECK(cq_packed_info(p, size, NULL, NULL, NULL) == fmt && cq_packed_info(p, -1, NULL, NULL, NULL) == fmt, "info");
        CHECK(cq_packed_info(p, size - 1, NULL, NULL, NULL) == CQ_ERR_FORMAT, "info: size - 1");
        CHECK(cq_packed_info(p, size + 64, NULL, NULL, NULL) == CQ_ERR_FORMAT, "info: size + 64");
        CHECK(cq_packed_info(p, 10, NULL, NULL, NULL) == CQ_ERR_FORMAT, "info: size 10");
        CHECK(cq_packed_info(NULL, size, NULL, NULL, NULL) == CQ_ERR_NULL, "info: NULL");
        int64_t gn, gk, gg;
        CHECK(cq_packed_info(pg, gsize, &gn, &gk, &gg) == fmt && gn == n && gk == k && gg == 32, "info: group 32");
        /* corrupted headers: every stored field */
        struct { size_t off; int32_t v32; int64_t v64; int is64; const char *what; } bads[] = {
            {offsetof(cq_pack_header, magic), 0x4b505144, 0, 0, "magic"},
            {offsetof(cq_pack_header, version), 99, 0, 0, "version"},
            {offsetof(cq_pack_header, format), 7, 0, 0, "format 7"},
            {offsetof(cq_pack_header, format), fmt == 1 ? 2 : 1, 0, 0, "the other format"},
            {offsetof(cq_pack_header, nr), 32, 0, 0, "nr"},
            {offsetof(cq_pack_header, n), 0, 0, 1, "n = 0"},
            {offsetof(cq_pack_header, n), 0, -70, 1, "n < 0"},
            {offsetof(cq_pack_header, k), 0, 0, 1, "k = 0"},
            {offsetof(cq_pack_header, seg4), 0, 25, 1, "seg4 > kp4"},
            {offsetof(cq_pack_header, seg4), 0, 5, 1, "seg4 not dividing kp4"},
            {offsetof(cq_pack_header, seg4), 0, 0, 1, "seg4 = 0"},
        };
        for (unsigned i = 0; i < sizeof bads / sizeof bads[0]; i++) {
            memcpy(bad, p, (size_t)size);
            if (bads[i].is64) memcpy(bad + bads[i].off, &bads[i].v64, 8);
            else memcpy(bad + bads[i].off, &bads[i].v32, 4);
            CHECK(cq_packed_info(bad, -1, NULL, NULL, NULL) == CQ_ERR_FORMAT, "fmt %d corrupted %s: info", fmt, bads[i].what);
            CHECK(cq_unpack(bad, n, k, back) == CQ_ERR_FORMAT, "fmt %d corrupted %s: unpack", fmt, bads[i].what);
            for (int mode = 0; mode < 2; mode++)
                CHECK(cq_linear(mode, x, m, k, bad, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_ERR_FORMAT,
                      "fmt %d corrupted %s: linear mode %d", fmt, bads[i].what, mode);
        }
        /* a valid header for another shape or scale group */
        CHECK(cq_unpack(p, n + 1, k, back) == CQ_ERR_FORMAT && cq_unpack(p, n, k - 4, back) == CQ_ERR_FORMAT, "unpack n/k");
        for (int mode = 0; mode < 2; mode++) {
            CHECK(cq_linear(mode, x, m, k, p, sc, CQ_PER_CHANNEL, 0, n - 1, NULL, y) == CQ_ERR_FORMAT, "linear n mismatch");
            CHECK(cq_linear(mode, x, m, k - 4, p, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_ERR_FORMAT, "linear k mismatch");
            CHECK(cq_linear(mode, x, m, k, p, sc, CQ_PER_GROUP, 32, n, NULL, y) == CQ_ERR_FORMAT, "per-group on group 0");
            CHECK(cq_linear(mode, x, m, k, pg, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_ERR_FORMAT, "per-channel on group 32");
            CHECK(cq_linear(mode, x, m, k, pg, sc, CQ_PER_GROUP, 16, n, NULL, y) == CQ_ERR_FORMAT, "group 16 on group 32");
            CHECK(cq_linear(mode, x, m, k, pg, sc, CQ_PER_GROUP, 32, n, NULL, y) == CQ_OK, "group 32 on group 32");
        }
        CHECK(cq_unpack(pg, n, k, back) == CQ_OK && memcmp(back, q, sizeof q) == 0, "unpack of a per-group buffer");
        free(p); free(bad); free(pg);
    }
    /* the automatic format is cq_best_format(n) */
    {
        int8_t *p = (int8_t *)xmalloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, n, k, 0));
        CHECK(cq_packed_size(CQ_FORMAT_AUTO, n, k, 0) == cq_packed_size(cq_best_format(n), n, k, 0), "auto size");
        CHECK(cq_pack(CQ_FORMAT_AUTO, q, n, k, 0, p) == CQ_OK && cq_packed_info(p, -1, NULL, NULL, NULL) == cq_best_format(n),
              "auto format");
        free(p);
    }
    CHECK(cq_packed_size(99, n, k, 0) == CQ_ERR_ARG && cq_pack(99, q, n, k, 0, back) == CQ_ERR_ARG, "unknown format");
    CHECK(cq_packed_size(CQ_FORMAT_N16K4, n, k, 3) == CQ_ERR_GROUP && cq_packed_size(CQ_FORMAT_N16K4, n, k, 36) == CQ_ERR_GROUP,
          "pack group");
    CHECK(cq_packed_size(CQ_FORMAT_N16K4, 0, k, 0) == CQ_ERR_SHAPE && cq_packed_size(CQ_FORMAT_N64K4, n, -1, 0) == CQ_ERR_SHAPE,
          "pack shape");
    int8_t zeros[4096];
    memset(zeros, 0, sizeof zeros);
    CHECK(cq_linear(CQ_MODE_DYNAMIC, x, 1, k, zeros, sc, CQ_PER_CHANNEL, 0, n, NULL, y) == CQ_ERR_FORMAT, "not a packed buffer");
    CHECK(cq_unpack(zeros, n, k, back) == CQ_ERR_FORMAT, "unpack of zeros");
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
    CHECK(cq_packed_size(CQ_FORMAT_N16K4, INT64_MAX, INT64_MAX, 0) == CQ_ERR_OVERFLOW, "packed size overflow");
    CHECK(cq_packed_size(CQ_FORMAT_N64K4, INT64_MAX, 1, 0) == CQ_ERR_OVERFLOW, "packed size overflow (n)");
    f[5] = NAN;
    CHECK(cq_quantize(f, 2, 8, CQ_PER_CHANNEL, 0, q, sc) == CQ_ERR_NONFINITE, "nan");
    CHECK(cq_quantize(f, 2, 8, CQ_PER_TENSOR, 0, q, sc) == CQ_ERR_NONFINITE, "nan per tensor");
    f[5] = 0;
    q[3] = -128;
    CHECK(cq_pack(CQ_FORMAT_N16K4, q, 2, 8, 0, p) == CQ_ERR_RANGE && cq_pack(CQ_FORMAT_N64K4, q, 2, 8, 0, p) == CQ_ERR_RANGE,
          "pack -128");
    CHECK(cq_gemm_s8s8s32(q, q, 2, 2, 8, c) == CQ_ERR_RANGE, "gemm -128");
    q[3] = 0;
    CHECK(cq_pack(CQ_FORMAT_N16K4, NULL, 2, 8, 0, p) == CQ_ERR_NULL && cq_pack(CQ_FORMAT_N16K4, q, 2, 8, 0, NULL) == CQ_ERR_NULL,
          "pack NULL");
    CHECK(cq_unpack(NULL, 2, 8, q) == CQ_ERR_NULL && cq_unpack(p, 0, 8, q) == CQ_ERR_SHAPE, "unpack args");
    CHECK(cq_linear(5, f, 1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_ARG, "bad mode");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, -1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_SHAPE, "m<0");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, 0, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_OK, "m=0 ok");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, NULL, 1, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_NULL, "null x");
    CHECK(cq_linear(CQ_MODE_DYNAMIC, f, (int64_t)1 << 62, 8, p, sc, CQ_PER_CHANNEL, 0, 2, NULL, f) == CQ_ERR_OVERFLOW, "m overflow");
    CHECK(cq_linear(CQ_MODE_WEIGHT_ONLY, f, 1, 8, p, sc, CQ_PER_GROUP, 3, 2, NULL, f) == CQ_ERR_GROUP, "linear group 3");
    CHECK(cq_gemm_s8s8s32(q, q, 1, 1, CQ_MAX_K_S32 + 1, c) == CQ_ERR_OVERFLOW, "gemm k overflow");
    CHECK(cq_gemm_s8s8s32(q, q, 0, 1, 8, c) == CQ_ERR_SHAPE && cq_gemm_s8s8s32(NULL, q, 1, 1, 8, c) == CQ_ERR_NULL, "gemm args");
    CHECK(cq_set_num_threads(0) == CQ_ERR_ARG && cq_set_num_threads(100000) == CQ_ERR_ARG, "threads range");
    CHECK(cq_set_isa(42) == CQ_ERR_ARG && cq_set_isa(-2) == CQ_ERR_ARG, "unknown isa");
    for (int i = 0; i < NPATHS; i++) {
        CHECK(strcmp(cq_isa_name(PATHS[i]), "unknown") != 0, "isa name %d", PATHS[i]);
        if (!cq_isa_supported(PATHS[i])) CHECK(cq_set_isa(PATHS[i]) == CQ_ERR_ISA, "unsupported isa %d refused", PATHS[i]);
    }
    CHECK(cq_get_isa() >= 0, "a refused cq_set_isa leaves a path");
    CHECK(strcmp(cq_isa_name(99), "unknown") == 0, "isa name 99");
    CHECK(cq_gelu(NULL, 4, f) == CQ_ERR_NULL && cq_gelu(f, -1, f) == CQ_ERR_SHAPE && cq_gelu(NULL, 0, NULL) == CQ_OK, "gelu args");
    CHECK(cq_layer_norm(f, 2, 0, NULL, NULL, 1e-5f, f) == CQ_ERR_SHAPE, "ln k=0");
    CHECK(cq_layer_norm(f, 2, 4, NULL, NULL, -1.0f, f) == CQ_ERR_ARG, "ln eps<0");
    CHECK(cq_layer_norm(f, 2, 4, NULL, NULL, NAN, f) == CQ_ERR_ARG, "ln eps NaN");
    CHECK(cq_layer_norm(NULL, 2, 4, NULL, NULL, 1e-5f, f) == CQ_ERR_NULL, "ln null");
    CHECK(strlen(cq_strerror(-1234)) > 0 && strlen(cq_strerror(CQ_ERR_FORMAT)) > 0 &&
          strcmp(cq_version(), CQ_VERSION_STRING) == 0, "strings");
}

/* The calling thread's kept scratch (threads.c): a buffer handed back is handed out again for a
 * request it covers (so the activation codes of the next linear reuse its pages), a bigger request
 * gets a new one, a huge one is not kept, and cq_shutdown drops what is kept. */
static void *scratch_thread(void *arg)
{
    size_t cap = 0;
    void *p = cq_scratch_get(4096, &cap);
    cq_scratch_put(p, cap); /* kept until this thread exits (its key destructor frees it) */
    *(int *)arg = p != NULL && cap >= 4096;
    return NULL;
}

/* Keeps one CQ_SCRATCH_KEEP buffer if the budget allows, then holds it (waits at the barrier
 * twice: once all threads have handed theirs back, and until the count was checked). */
static pthread_barrier_t g_scratch_barrier;
static void *scratch_budget_thread(void *arg)
{
    (void)arg;
    size_t cap;
    void *p = cq_scratch_get(CQ_SCRATCH_KEEP, &cap); /* never touched: no pages faulted in */
    cq_scratch_put(p, cap);
    pthread_barrier_wait(&g_scratch_barrier);
    pthread_barrier_wait(&g_scratch_barrier);
    return NULL;
}

static void test_scratch(void)
{
    size_t cap = 0, cap2 = 0;
    void *a = cq_scratch_get(1000, &cap);
    CHECK(a && cap >= 1000 && ((uintptr_t)a & 63) == 0, "scratch: 64-byte aligned, >= size");
    memset(a, 1, 1000);
    cq_scratch_put(a, cap);
    void *b = cq_scratch_get(800, &cap2);
    CHECK(b == a && cap2 == cap, "scratch: a kept buffer that covers the request is reused");
    void *c = cq_scratch_get(800, &cap); /* nothing kept now: a new one */
    CHECK(c && c != b, "scratch: taken buffers are not handed out twice");
    cq_scratch_put(c, cap);
    cq_scratch_put(b, cap2);             /* the same size kept already: freed */
    void *d = cq_scratch_get(5000, &cap);
    CHECK(d && cap >= 5000, "scratch: a bigger request gets a bigger buffer");
    cq_scratch_put(d, cap);
    void *e = cq_scratch_get(4000, &cap2);
    CHECK(e == d, "scratch: the bigger buffer replaced the smaller one");
    cq_scratch_put(e, cap2);
    cq_shutdown();                       /* drops the calling thread's buffer */
    void *f = cq_scratch_get(16, &cap);
    CHECK(f && cap == 16, "scratch: nothing kept after cq_shutdown");
    cq_scratch_put(f, cap);
    cq_scratch_put(NULL, 0);
    void *g = malloc(1);                 /* larger than CQ_SCRATCH_KEEP: freed at once, not kept */
    cq_scratch_put(g, CQ_SCRATCH_KEEP + 1);
    void *h = cq_scratch_get(8, &cap);
    CHECK(h == f, "scratch: an oversized buffer is not kept");
    cq_scratch_put(h, cap);
    pthread_t th;
    int ok = 0;
    CHECK(pthread_create(&th, NULL, scratch_thread, &ok) == 0 && pthread_join(th, NULL) == 0 && ok,
          "scratch: another thread has its own");
    cq_shutdown();
    CHECK(cq_scratch_kept() == 0, "scratch: nothing counted as kept once every buffer is freed");
    /* the budget of all threads: 5 threads each keeping CQ_SCRATCH_KEEP would pass CQ_SCRATCH_TOTAL */
    pthread_t ths[6];
    pthread_barrier_init(&g_scratch_barrier, NULL, 7);
    for (int i = 0; i < 6; i++)
        CHECK(pthread_create(&ths[i], NULL, scratch_budget_thread, NULL) == 0, "scratch: thread");
    pthread_barrier_wait(&g_scratch_barrier); /* every thread has handed its buffer back */
    CHECK(cq_scratch_kept() == CQ_SCRATCH_TOTAL / CQ_SCRATCH_KEEP * CQ_SCRATCH_KEEP,
          "scratch: the threads together keep no more than the budget");
    pthread_barrier_wait(&g_scratch_barrier);
    for (int i = 0; i < 6; i++) pthread_join(ths[i], NULL);
    pthread_barrier_destroy(&g_scratch_barrier);
    CHECK(cq_scratch_kept() == 0, "scratch: threads' buffers uncounted when they exit");
}

/* "--paths": the public-API tests of every path only (the drivers, their thread splits and the
 * pool), not the single-threaded micro-kernel and element-wise table tests: how `make asan-c`
 * re-runs the binary at other thread counts. */
int main(int argc, char **argv)
{
    double t0 = now_s();
    int paths_only = argc > 1 && strcmp(argv[1], "--paths") == 0;
    printf("cquant %s kernel tests%s%s\n", cq_version(),
           EMU ? ": AVX2 / AVX-512 intrinsics emulated by SIMDe (logic, not speed)" : "",
           paths_only ? " (paths only)" : "");
    int kernels = paths_only ? -1 : test_registry();
    if (!paths_only) test_elementwise_tables();
    int ran = 0;
    for (int i = 0; i < NPATHS; i++) {
        if (!cq_isa_supported(PATHS[i])) {
            printf("skip %s: path not supported by this CPU/build\n", cq_isa_name(PATHS[i]));
            continue;
        }
        test_path(PATHS[i]);
        ran++;
    }
    cq_set_isa(CQ_ISA_AUTO);
    test_scratch();
    test_packed_errors();
    test_bad_args();
    if (kernels >= 0) printf("%d kernels and %d paths tested in %.1f s\n", kernels, ran, now_s() - t0);
    else printf("%d paths tested in %.1f s\n", ran, now_s() - t0);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures || !ran || !kernels ? 1 : 0;
}
