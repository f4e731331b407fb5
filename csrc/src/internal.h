/* internal.h - what the C core's translation units share; not installed, not part of the API.
 *
 * Layout (kernel layer v2, see README "Architecture"):
 *   src/      api.c (status texts, version), dispatch.c (CPU flags, CQUANT_ISA), registry.c (every
 *             compiled micro-kernel + the per-scheme configs, best first), pack.c (packed formats,
 *             column sums), quantize.c, linear.c (drivers: blocking, threading, epilogues),
 *             float_ops.c (GELU, LayerNorm, softmax), threads.c, peak.c
 *   ref/      the scalar references: the oracle every SIMD kernel is tested against, and the
 *             fallback that runs any packed format on any CPU
 *   x86/ISA/  one micro-kernel family per file, named type-tile-ISA, compiled with per-file target
 *             pragmas (target.h) so the build needs no -m flags and runs on any x86-64
 * Adding a micro-kernel: one file in x86/ISA/, one line in csrc/sources.txt, one line in
 * registry.c (and a config line if it is the best for a scheme). */
#ifndef CQ_INTERNAL_H
#define CQ_INTERNAL_H

#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include "cquant.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CQ_X86 1
#endif

/* Largest number of k4 steps summed into one int32 before it is widened to int64 in cq_linear:
 * 32768 steps = 131072 k <= CQ_MAX_K_S32, so an int32 partial sum of codes in [-127,127] is exact
 * (and 128 * a column sum over a chunk, the u8 compensation, fits in int32 too). */
#define CQ_CHUNK4 32768

/* ---- packed weights (pack.c) -----------------------------------------------------------------
 * A packed buffer = a 64-byte header, the codes, then (formats read by u8 kernels) the column sums:
 *   header: magic, layout version, format, nr, n, k, seg4 (the fields below it are derived)
 *   codes:  panels of nr output rows; inside a panel, k in steps of kr = 4; per step, nr rows x 4
 *           consecutive codes:  codes[((p * kp4 + t) * nr + j) * 4 + i] = q[nr*p + j][4t + i]
 *   sums:   int32 sums[(p * nseg + s) * nr + j] = sum of q[nr*p + j][k] over k in segment s
 *           (segments of seg4 steps: the scale group, or all of k), zero for padded rows; only in
 *           formats whose kernels read u8 activations (N64K4), so N16K4 weights stay as small
 *           as the codes.
 * kr = 4 is the depth of one vpdpbusd / vpmaddwd group and of AMX's B-tile rows. */
#define CQ_PACK_MAGIC 0x4b505143u /* "CQPK" */
#define CQ_PACK_HEADER 64
typedef struct {
    uint32_t magic, version;
    int32_t format, nr;
    int64_t n, k, seg4;  /* stored: the first 40 bytes of the buffer */
    int64_t kp4, nseg, np, sums_off, sums_bytes; /* derived */
} cq_pack_header;
#define CQ_PACK_STORED 40

/* Reads and validates a packed buffer's header (magic, version, a valid geometry). Returns CQ_OK
 * or CQ_ERR_FORMAT. */
int cq_pack_read_header(const void *packed, cq_pack_header *h);
static inline const int8_t *cq_pack_codes(const void *packed) { return (const int8_t *)packed + CQ_PACK_HEADER; }
/* The column sums' bytes: int32 values that may sit at any address (the caller's packed buffer
 * need not be aligned), so they are read with memcpy (cq_load_i32), never through an int32_t *. */
static inline const unsigned char *cq_pack_sums(const void *packed, const cq_pack_header *h)
{
    return (const unsigned char *)packed + h->sums_off;
}
static inline int32_t cq_load_i32(const unsigned char *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
int cq_format_nr(int format); /* nr of a format, or 0 for an unknown one */
int cq_format_is_i4(int format);
/* int4 panels: steps [t4, t4 + nt4) (even) of output panel p_out (out_nr rows, <= h->nr) in the
 * int8 layout (see pack.c). For int4 formats h->kp4 is 2 * ceil(k / 8). */
/* The expansion step, n steps of 8 k at once: step j's nb packed bytes at src + j * stride become its
 * nb low codes at out + 2 j nb and its nb high codes right after them. (One call per step of 8 k,
 * 64 bytes at nr 16, was half the time of an AVX2 per-group M = 1 int4 GEMV: the calls, not the
 * work.) */
typedef void (*cq_i4_rows_fn)(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out);
void cq_i4_rows_ref(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out);
#ifdef CQ_X86
void cq_i4_rows_avx2(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out); /* nb % 32 == 0 */
void cq_i4_rows_avx512bw(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out); /* nb % 64 == 0 */
#endif
cq_i4_rows_fn cq_i4_rows_for(int isa); /* the best the path allows (registry.c) */
void cq_i4_expand(const cq_pack_header *h, const int8_t *codes, int out_nr, int64_t p_out, int64_t t4,
                  int64_t nt4, int8_t *out, cq_i4_rows_fn rows);

/* ---- micro-kernel interfaces ------------------------------------------------------------------ */
/* Integer GEMM micro-kernel: mr rows (1..its mr) of quantized activations against one packed
 * panel (nr columns), nk4 steps:  s[r][j] = sum_{t<nk4, i<4} a[r*lda + 4t + i] * b[(t*nr + j)*4 + i]
 * exactly modulo 2^32, where a holds s8 codes or, for kernels whose config says act_u8, u8 codes
 * (x + 128; then s includes 128 * the column's code sum, removed through comp). Output by mode:
 *   CQ_OUT_I32:  acc[r*nr + j] = (acc_in ? acc[r*nr + j] : 0) + s[r][j]           (all nr columns)
 *   CQ_OUT_F32:  y[r*ldy + j] = (float)(s' ) * (sx[r] * sw[j]) + (bias ? bias[j] : 0), j < nc
 *   CQ_OUT_FACC: facc[r*nr + j] = fma((float)(s'), min(sx[r] * sw[j], FLT_MAX), facc[r*nr + j])  (all nr)
 * with s' = (acc_in ? acc[r*nr + j] : 0) + s[r][j] - (comp ? comp[j] : 0), exact in int32. */
enum { CQ_OUT_I32 = 0, CQ_OUT_F32 = 1, CQ_OUT_FACC = 2 };
typedef struct {
    int mode, acc_in, nc;
    int32_t *acc;
    const int32_t *comp;
    const float *sx, *sw, *bias;
    float *y, *facc;
    int64_t ldy;
    /* optional, a hint: kernels that read it prefetch pf + t * pf_step into L2 at k step t (the
     * driver points it at the next panel while this one is in L2: linear.c, NEXT_PANEL); NULL: none */
    const int8_t *pf;
    int64_t pf_step;
    /* pair-safe kernels only (cq_ukernel.pairsafe; NULL / unused for the others): the activation
     * rows as cq_ps_prepare_row left them, seen from the call's first row and k step.
     * The call covers one k block of the preparation's kc4 steps (the last one may be shorter),
     * k in [ps_k0, ps_k0 + 4 * nk4):
     *   ps_sum[r * ps_ld + 1] - ps_sum[r * ps_ld]: the sum of row r's codes over the block
     *   ps_cnt[r * ps_ld], ps_cnt[r * ps_ld + 1]: row r's residual entries before / after it
     *   ps_row[r] + those: row r's entries of the block in ps_ent (CQ_PS_ENT int32 each, k absolute) */
    const int32_t *ps_sum, *ps_cnt;
    int64_t ps_ld;
    const int64_t *ps_row;
    const int32_t *ps_ent;
    int64_t ps_k0;
} cq_qd8_out;
/* The L2 prefetch stream of a tile's k loop (prefetch ptr + t * *step at step t): the driver's next
 * panel (o->pf), or, none given, the tile's own panel b at its step (an L1 hit), so the loop has no
 * branch. */
static inline const char *cq_qd8_pf_stream(const cq_qd8_out *o, const int8_t *b, int64_t step, int64_t *pf_step)
{
    *pf_step = o->pf ? o->pf_step : step;
    return (const char *)(o->pf ? o->pf : b);
}

/* Pair-safe activations (the AVX2 u8 x s8 kernels that do not saturate; x86/avx2/
 * qd8-f32-qc8w-gemm-4x16c4-avx2.c explains): in a row of s8 codes, every aligned pair (k, k + 1) of
 * the same sign with |x_k| + |x_k+1| > 128 keeps its larger code and moves the smaller one towards
 * 0 until the pair sums to 128 in magnitude; what was taken off is a residual entry, so
 * x = x' + the entries, exactly. */
/* A residual entry is CQ_PS_ENT int32 {kv, sel} for x_k = x'_k + v (v in [-126, 126], never 0):
 * kv = k, or ~k (negative) when v < 0; sel = |v| << 8 (k % 4) (vpmaddubsw by sel picks |v| * code k
 * of each int32 of 4 codes; the kernels take v's sign from kv's). cq_ps_ent_k / _v read them. */
#define CQ_PS_ENT 2
static inline int64_t cq_ps_ent_k(const int32_t *e) { return e[0] < 0 ? ~e[0] : e[0]; }
static inline int cq_ps_ent_v(const int32_t *e)
{
    const int a = (int)(((uint32_t)e[1] >> (8 * (cq_ps_ent_k(e) & 3))) & 0xff);
    return e[0] < 0 ? -a : a;
}
/* One pair to change (x[i], x[i + 1]: same signs, |a| + |c| > 128): the larger code is kept, the
 * smaller one keeps its sign with magnitude 128 - larger (1..63, since the larger is > 64), and
 * the residual entry for k = base + j, v - v' goes to ent[0..CQ_PS_ENT). */
static inline void cq_ps_fix_pair(int8_t *x, int64_t i, int64_t base, int32_t *ent)
{
    const int a = x[i], c = x[i + 1], aa = a < 0 ? -a : a, ac = c < 0 ? -c : c;
    const int64_t j = aa >= ac ? i + 1 : i;
    const int v = x[j], keep = 128 - (aa >= ac ? aa : ac), nv = v < 0 ? -keep : keep, d = v - nv;
    x[j] = (int8_t)nv;
    ent[0] = d < 0 ? ~(int32_t)(base + j) : (int32_t)(base + j);
    ent[1] = (int32_t)((uint32_t)(d < 0 ? -d : d) << (8 * ((base + j) & 3)));
}
/* x (whose x[0] is k = base) as it was before the n entries ent */
static inline void cq_ps_restore(int8_t *x, int64_t base, const int32_t *ent, int64_t n)
{
    for (const int32_t *e = ent; e < ent + CQ_PS_ENT * n; e += CQ_PS_ENT)
        x[cq_ps_ent_k(e) - base] = (int8_t)(x[cq_ps_ent_k(e) - base] + cq_ps_ent_v(e));
}
/* cq_elementwise.ps_block pair by pair over x[i0..n), after e entries and with the sum so far in
 * *sum: the reference's whole loop and the SIMD kernels' tails. Returns the entries, or -1 with
 * the block (ent[0] its first entry) as it was. */
static inline int64_t cq_ps_block_pairs(int8_t *x, int64_t i0, int64_t n, int64_t base, int64_t room, int32_t *ent,
                                        int64_t e, int32_t *sum)
{
    int32_t s = *sum;
    for (int64_t i = i0; i < n; i += 2) {
        const int p = x[i] + x[i + 1];
        if (p > 128 || p < -128) {
            if (e == room) {
                cq_ps_restore(x, base, ent, e);
                return -1;
            }
            cq_ps_fix_pair(x, i, base, ent + CQ_PS_ENT * e++);
        }
        s += x[i] + x[i + 1];
    }
    *sum = s;
    return e;
}
/* The activation pass's pair-safe preparation (cq_quantize_rows_into with ps non-NULL): each row
 * prepared right after its codes are written (in cache, on the pass's threads), its entries at
 * ent + CQ_PS_ENT * r * cap (row[r] = r * cap), sums and counts at sum / cnt + r * ld. Out: total, the
 * rows' entries, and over = 1 if a row needed more than cap (that row left as it was). */
typedef struct {
    int64_t kc4, cap, ld;
    int32_t *sum, *cnt, *ent;
    int64_t *row;
    int64_t total;
    int over;
} cq_ps_rows;
typedef void (*cq_qd8_gemm_fn)(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda,
                               const int8_t *b, const cq_qd8_out *o);
/* One activation row against 4 consecutive panels read as concurrent streams (M = 1):
 * acc[p*nr + j] = s over panel p (raw, as above; the driver removes the compensation). */
typedef void (*cq_qd8_gemv4_fn)(int nr, int64_t nk4, const int8_t *a, const int8_t *const *panels,
                                int64_t panel_stride, int32_t *acc);
/* Dequantize nk4 steps of a panel: out[(4t + i)*nr + j] = (float)b[(t*nr + j)*4 + i] * ws[j];
 * out is 64-byte aligned (as bb of the float tile below). */
typedef void (*cq_f32_dequant_fn)(int nr, int64_t nk4, const int8_t *b, const float *ws, float *out);
/* Float tile: c[r*ldc + j] += sum_{kk < kc} a[r*lda + kk] * bb[kk*nr + j], r < mr, j < nr. */
typedef void (*cq_f32_gemm_fn)(int mr, int nr, int64_t kc, const float *a, int64_t lda,
                               const float *bb, float *c, int64_t ldc);
/* Weight-only GEMV over 4 panels for mr rows of x (1 <= mr <= the kernel's cq_ukernel.mr):
 * y[r*ldy + p*nr + j] += ws[p*nr + j] * sum_{t<nk4,i<4} x[r*ldx + 4t+i] * panels[p][(t*nr + j)*4 + i]
 * (each row has 4*nk4 readable floats). Each row's sum is a float32 FMA chain over k in order,
 * the same for every mr, so a row's outputs do not depend on the rows beside it. */
typedef void (*cq_f32_gemv4_fn)(int mr, int nr, int64_t nk4, const float *x, int64_t ldx,
                                const int8_t *const *panels, const float *ws, float *y, int64_t ldy);

/* Weight-only GEMV over 4 slices of int4 panels (nr columns each; step k of 8 at panels[p] + t *
 * step bytes, column j's 8 codes in the int32 at + 4j, as cquant.h's int4 formats):
 * y[p*nr + j] += ws[p*nr + j] * sum_{t<nk8, kk<8} x[8t+kk] * code(p, t, j, kk). */
typedef void (*cq_f32_i4_gemv4_fn)(int nr, int64_t nk8, const float *x, const int8_t *const *panels,
                                   int64_t step, const float *ws, float *y);

/* Weight-only int4 GEMV in integers (x86/avx512vnni/x24-qc4w-gemv-avx512vnni.c explains): x as 24-bit
 * fixed point, x[k] = xs * (d2[k] * 65536 + d1[k] * 256 + d0[k]), digit plane d at xd + d * xds (8 * nk8
 * bytes each), comp[d] = 8 * sum of plane d over these k; panels as cq_f32_i4_gemv4_fn. Per column,
 * a_d = sum (code + 8) * d[k] - comp[d] (exact: nk8 <= CQ_X24_MAX_NK8), then
 * f = fma(fma((float)a2, 256, (float)a1), 256, (float)a0), y = fma(f * xs, ws, y). */
typedef void (*cq_x24_i4_gemv4_fn)(int nr, int64_t nk8, const int8_t *xd, int64_t xds, const int32_t *comp,
                                   float xs, const int8_t *const *panels, int64_t step, const float *ws, float *y);
#define CQ_X24_MAX_NK8 4096 /* 15 * 128 * 8 * 4096 < 2^31 */

/* The registry: every compiled micro-kernel, with a name that says type, tile and ISA. */
enum { CQ_UK_QD8_GEMM, CQ_UK_QD8_GEMV4, CQ_UK_F32_DEQUANT, CQ_UK_F32_GEMM, CQ_UK_F32_GEMV4, CQ_UK_F32_I4_GEMV4, CQ_UK_X24_I4_GEMV4 };
typedef struct {
    const char *name;
    int op;      /* CQ_UK_* */
    int isa;     /* the path it needs (enum cq_isa) */
    int mr, nr;  /* tile: rows of activations (GEMVs: rows per call, 1 but for the weight-only
                    ones), output columns (0: any multiple of 16) */
    int act_u8;  /* int8 kernels: reads u8 activations (x + 128) and needs the compensation */
    void *fn;
    int k4_multiple; /* nk4 must be a multiple of this (0: any) */
    int pad_rows;    /* the kernel reads this many rows of a whatever mr is (0: mr rows), and in
                        CQ_OUT_I32 mode (or with acc_in) reads and writes this many rows of acc */
    int a_tiled;     /* reads activations in 16-row x 64-byte tiles (cq_tile_rows_16x64): the block
                        of 16 rows starting at row r begins at r * lda, and its k bytes
                        [64 c, 64 c + 64) are the 1 KiB at + 1024 c (16 rows x 64 bytes) */
    void (*release)(void); /* NULL, or: the kernel keeps per-thread state (AMX tile configuration)
                              across calls; the driver calls this when a unit of work is done */
    int pairsafe;    /* int8 GEMM that reads pair-safe activations (cq_ps_prepare_row) and the
                        cq_qd8_out ps_* fields; its sums are exact for the original codes */
} cq_ukernel;
int cq_ukernel_count(void);
const cq_ukernel *cq_ukernel_at(int i);

/* Configs: per scheme, what runs on a path, chosen best first among those whose ISA the active path
 * allows and whose packed format matches the weight's. Every format has a scalar config last. */
typedef struct {
    int isa, format;
    const cq_ukernel *gemm, *gemv4; /* gemv4 may be NULL */
    /* when the config applies, and how the driver feeds it (0: no constraint / the default) */
    int min_m;       /* at least this many rows of activations */
    int k4_multiple; /* ceil(k/4) a multiple of this (AMX: 16 steps = 64 k per tile) */
    int no_groups;   /* 0: any scale groups; 1: per-channel / per-tensor in one int32 chunk only;
                        2: also per-group with groups of 8 k4 steps (32 k) or a multiple of 16 (AMX) */
    int pad_rows;    /* the kernel reads whole blocks of this many activation rows */
    int kc4;         /* k steps per k block */
    int mb;          /* activation rows per unit of work */
    int whole_k;     /* per-channel: each tile sweeps all of k in one call where the unit has enough
                        rows or the weight is small (linear.c, WHOLE_K_*), else k blocks of kc4 */
    const cq_ukernel *gemm_ps; /* or NULL: a pair-safe GEMM (cq_ukernel.pairsafe) that linear.c runs
                                  instead of gemm for per-channel / per-tensor weights in one int32
                                  chunk when the activations have few residual entries */
} cq_qd8_config;
typedef struct {
    int isa, format;
    const cq_ukernel *dequant, *gemm, *gemv4;
    int kc;                          /* k block dequantized at once (floats per column) */
    const cq_ukernel *gemv4_i4;      /* int4 weights, M < 4, codes expanded in registers */
    const cq_ukernel *gemv4_i4_x24;  /* or NULL: the same in integers, x as 24-bit fixed point, where
                                        the rows allow it (linear.c) */
    int gemv_m;                      /* int8 weights: gemv4 runs for M below this (2 ..
                                        CQ_WO_GEMV_MAX_M), the dequantized block and gemm from it */
} cq_f32_config;
#define CQ_WO_GEMV_MAX_M 16
/* group4: 0 for one int32 sum per output (per-channel, k within one chunk), else the k4 steps of one
 * summed group (per-group: its group; chunked per-channel: kp4) */
const cq_qd8_config *cq_qd8_config_for(int active_isa, int format, int64_t group4, int64_t m, int64_t kp4);
const cq_f32_config *cq_f32_config_for(int active_isa, int format);
int cq_best_format_for(int active_isa);

/* Element-wise kernels, one table per path (best of what the path allows). */
typedef struct {
    int isa;
    /* max |x[i]| over n floats into *amax; returns 1 if every x[i] is finite, 0 otherwise */
    int (*absmax)(const float *x, int64_t n, float *amax);
    /* q[i] = clamp(round_half_even(x[i] / scale), -127, 127) ^ flip (flip 0: s8 codes; 0x80: u8
     * codes + 128); x finite, scale finite > 0. */
    void (*quantize)(const float *x, int64_t n, float scale, int8_t *q, int flip);
    /* y[i] = GELU(x[i]), each element by the same formula wherever it sits (cq_gelu and the fused
     * CQ_POST_GELU both run this one) */
    void (*gelu)(const float *x, int64_t n, float *y);
    /* out[i] = (float)q[i] * scale (bit-exact on every path). */
    void (*dequant)(const int8_t *q, int64_t n, float scale, float *out);
    /* facc[j] = fma((float)(acc[j] - (comp ? comp[j] : 0)), min(sx * ws[j], FLT_MAX), facc[j]),
     * j < n (a multiple of 16): the kernels' CQ_OUT_FACC epilogue, bit for bit, for the drivers
     * that fold raw per-group sums themselves (the per-group GEMV). */
    void (*facc_fold)(int n, const int32_t *acc, const int32_t *comp, float sx, const float *ws, float *facc);
    /* prod[i] = x[i] * m[i] (float32 product; not stored when prod is NULL) and max |prod[i]| into
     * *amax in one pass; returns 1 if every product is finite (the activation quantizer's pre-scale,
     * cq_linear_ex's x_mul). */
    int (*absmax_mul)(const float *x, const float *m, int64_t n, float *prod, float *amax);
    /* out = the Walsh-Hadamard rotation of x (or of the float32 products x[i] * mul[i], mul non-NULL)
     * in blocks of b (a power of two >= 2 dividing n), unnormalised, in the order of operations that
     * ref/ref-kernels.c's hadamard_absmax_ref defines (bit-exact on every path), and max |out[i]|
     * into *amax; returns 1 if every out[i] is finite (cq_linear_ex's x_hadamard). */
    int (*hadamard_absmax)(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax);
    /* quantize of the float32 products x[i] * mul[i], formed again in registers (bit-identical to
     * quantize on a stored product: the x_mul pass without the product's round trip to memory) */
    void (*quantize_mul)(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip);
    /* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (1 <= cols <= 16): a copy, exact on
     * every path (the per-group GEMVs' scale gather) */
    void (*transpose)(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd);
    /* The pair-safe preparation of n codes x[0..n) (n a multiple of 4; x[0] is k = base of its
     * row): every aligned pair (x[2i], x[2i + 1]) that sums to more than 128 in magnitude (same
     * signs and |a| + |b| > 128) is changed by cq_ps_fix_pair, its entries written to ent in k
     * order; *sum = the sum of the codes after. Returns the entries, or -1 with x as it was if
     * more than room were needed. */
    int64_t (*ps_block)(int8_t *x, int64_t n, int64_t base, int64_t room, int32_t *ent, int32_t *sum);
} cq_elementwise;
extern const cq_elementwise cq_elementwise_ref;
/* The pair-safe preparation of one row x (4 * kp4 codes, k blocks of kc4 steps, nb = ceil(kp4 /
 * kc4)): bs[b] = the sum of x' over the steps before block b (b <= nb), bc[b] = the entries before
 * it (relative to the row's first, ent; in k order); at most cap entries, else -1 with the row as
 * it was and bc[nb] = 0. kern->ps_block does the blocks. */
int64_t cq_ps_prepare_row(const cq_elementwise *kern, int8_t *x, int64_t kp4, int64_t kc4, int64_t cap,
                          int32_t *bs, int32_t *bc, int32_t *ent);
void cq_transpose_ref(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd);
#ifdef CQ_X86
extern const cq_elementwise cq_elementwise_avx2; /* .absmax NULL when the compiler cannot target it */
extern const cq_elementwise cq_elementwise_avx512; /* the AVX-512 paths: avx2's with the zmm rotation */
int cq_hadamard_absmax_avx2(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax);
int cq_hadamard_absmax_avx512(const float *x, const float *mul, int64_t n, int64_t b, float *out, float *amax);
void cq_quantize_avx512(const float *x, int64_t n, float scale, int8_t *q, int flip);
int cq_absmax_avx512(const float *x, int64_t n, float *amax);
int cq_absmax_mul_avx512(const float *x, const float *mul, int64_t n, float *prod, float *amax);
void cq_quantize_mul_avx512(const float *x, const float *mul, int64_t n, float scale, int8_t *q, int flip);
void cq_transpose_avx512(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd);
void cq_transpose_avx2(const float *src, int64_t lds, int64_t rows, int cols, float *dst, int64_t ldd);
void cq_gelu_avx512(const float *x, int64_t n, float *y); /* x86/avx512/float-ops-avx512.c */
/* The float-ops row kernels (x86/avx2/float-ops-avx2.c, x86/avx512/float-ops-avx512.c; the
 * references and drivers in float_ops.c):
 *   softmax_row: x[j] = softmax_j(x[j] * scale + (bias ? bias[j] : 0)), j < k, in place
 *   add_ln_row:  y = LayerNorm(x + (res ? res * rmul : 0)) with gamma/beta (NULL: 1/0); rmul NULL:
 *                1 (the product res[i] * rmul[i] rounded to float32, then the sum); y may be x or res
 *   attn_head:   one (batch, head) pair: q, k, v, out point at (b, t = 0, h, d = 0), rows ld / ldo
 *                apart (scratch: float_ops.c's header comment) */
void cq_softmax_row_avx2(float *x, int64_t k, const float *bias, float scale);
/* LayerNorm's statistics when the float32 partial sums cannot be trusted: a row whose centred
 * squares overflow float32 (|x| ~ 1e20) or underflow it (|x| ~ 1e-25, eps = 0), or whose sum
 * overflowed: var outside [1e-30, 1e30] or a non-finite mean. Then the mean and the variance are
 * computed again in double (float_ops.c), the same on every path; rows in the usual range never
 * take it (their results are unchanged). */
static inline int cq_ln_unsafe(float mean, double var) { return !(var >= 1e-30 && var <= 1e30) || !(mean - mean == 0.0f); }
void cq_ln_stats_double(const float *x, int64_t k, float *mean, double *var);
void cq_add_ln_row_avx2(const float *x, const float *res, const float *rmul, int64_t k, const float *gamma,
                        const float *beta, float eps, float *y);
void cq_attn_head_avx2(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                       int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch);
void cq_softmax_row_avx512(float *x, int64_t k, const float *bias, float scale);
void cq_add_ln_row_avx512(const float *x, const float *res, const float *rmul, int64_t k, const float *gamma,
                          const float *beta, float eps, float *y);
void cq_attn_head_avx512(const float *q, const float *k, const float *v, int64_t ld, int64_t seq,
                         int64_t dh, const float *bias, float scale, float *out, int64_t ldo, float *scratch);
#endif

/* rows of cq_add_layer_norm_ex on the calling thread, with the row kernel of path isa (float_ops.c:
 * the same bits as cq_add_layer_norm_ex; linear.c runs it on the blocks of rows it has finished) */
void cq_add_ln_rows(int isa, const float *x, const float *res, const float *rmul, int64_t rows, int64_t k,
                    const float *gamma, const float *beta, float eps, float *y);

/* Dispatch (dispatch.c): the active path (enum cq_isa), or a negative status if CQUANT_ISA names a
 * path that cannot run (then every kernel entry point returns CQ_ERR_ISA). */
int cq_active_isa(void);
const cq_elementwise *cq_elementwise_for(int isa);
int cq_cpu_has(int isa); /* this CPU and OS can run the path's instructions */

/* sx * sw of the dynamic epilogue y = acc * (sx * sw) + b, capped at FLT_MAX: both scales are
 * finite, but their product can overflow, and Inf * (acc = 0) would be NaN where the true result is
 * b (a nonzero acc overflows either way). A NaN (a row of x holding NaN/Inf) stays NaN. Every
 * kernel's epilogue does the same (vminps with the product as second operand). */
static inline float cq_scale_product(float sx, float sw)
{
    float s = sx * sw;
    return s > 3.402823466e38f ? 3.402823466e38f : s;
}

/* The micro-kernel the calling thread's last linear / gemm call ran (registry.c). */
void cq_set_last_kernel(const char *name);

/* Quantize rows of x (m, k) into q with row stride ldq >= k (columns [k, ldq) get code 0), per-row
 * scales; flip 0x80 stores u8 codes (q + 128); tiled: in the 16 x 64-byte tiles of
 * cq_ukernel.a_tiled instead of rows (ldq a multiple of 64). mul (k floats, or NULL): quantize
 * x[r][i] * mul[i] (the float32 product) instead of x; fixed > 0: every row's scale is fixed (static
 * activations; codes clamp), else max|row| / 127. A non-finite row gets scale NaN and codes 0.
 * The activation quantizer of cq_linear (quantize.c). CQ_OK, or CQ_ERR_NOMEM (a k > 2048 buffer). */
int cq_quantize_rows_into(const cq_elementwise *kern, const float *x, int64_t m, int64_t k, int64_t ldq,
                          int flip, int tiled, int8_t *q, float *scales, const float *mul, float fixed,
                          int64_t had, cq_ps_rows *ps);

/* GELU of one float, the reference (ref/); SIMD kernels use it for tails. */
float cq_gelu1(float x);

/* Scalar reference micro-kernels (ref/ref-kernels.c), also used by the SIMD tails. */
void cq_ref_qd8_gemm(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                     const cq_qd8_out *o);
void cq_ref_qd8_gemm_u8(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                        const cq_qd8_out *o);
void cq_ref_qd8_gemv4(int nr, int64_t nk4, const int8_t *a, const int8_t *const *panels,
                      int64_t panel_stride, int32_t *acc);
void cq_ref_f32_dequant(int nr, int64_t nk4, const int8_t *b, const float *ws, float *out);
void cq_ref_f32_gemm(int mr, int nr, int64_t kc, const float *a, int64_t lda, const float *bb,
                     float *c, int64_t ldc);
void cq_ref_f32_gemv4(int mr, int nr, int64_t nk4, const float *x, int64_t ldx,
                      const int8_t *const *panels, const float *ws, float *y, int64_t ldy);
void cq_ref_f32_i4_gemv4(int nr, int64_t nk8, const float *x, const int8_t *const *panels, int64_t step,
                         const float *ws, float *y);
void cq_ref_x24_i4_gemv4(int nr, int64_t nk8, const int8_t *xd, int64_t xds, const int32_t *comp, float xs,
                         const int8_t *const *panels, int64_t step, const float *ws, float *y);

/* Thread pool (threads.c). Runs fn(ctx, u) for every u in [0, nunits), each exactly once, on up
 * to `threads` threads (the caller included). Which thread runs which unit must not matter to the
 * result: callers partition output, never a reduction. If the pool is busy with another caller's
 * job, the units run on the calling thread alone. */
typedef void (*cq_unit_fn)(void *ctx, int64_t unit);
void cq_parallel_for(int64_t nunits, int threads, cq_unit_fn fn, void *ctx);
int cq_threads_for(double work, int64_t nunits);

typedef void (*cq_gelu_fn)(const float *x, int64_t n, float *y);

/* Per-calling-thread scratch (threads.c): cq_scratch_get returns a 64-byte aligned buffer of at
 * least size bytes (NULL on failure) and its capacity in *cap; cq_scratch_put hands it back (NULL:
 * nothing), and the thread keeps one such buffer (up to CQ_SCRATCH_KEEP bytes) for its next call,
 * freed when the thread exits or calls cq_shutdown. Why: a fresh malloc of the activation codes
 * each call came back from the kernel as new pages (glibc gives them back between calls), and
 * faulting them in cost 15% of a (4096, 4096) M = 256 VNNI GEMM (~100 page faults per call). */
#define CQ_SCRATCH_KEEP ((size_t)64 << 20)
/* All threads together keep at most CQ_SCRATCH_TOTAL bytes (a buffer over the budget is freed,
 * not kept): many long-lived caller threads with large inputs would otherwise hold 64 MiB each. */
#define CQ_SCRATCH_TOTAL ((size_t)256 << 20)
void *cq_scratch_get(size_t size, size_t *cap);
void cq_scratch_put(void *p, size_t cap);
size_t cq_scratch_kept(void); /* bytes kept now, all threads (for tests) */

/* Size checks shared by the entry points. */
static inline int cq_mul_ok(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    int64_t r = a * b;
    if ((uint64_t)r > (uint64_t)SIZE_MAX) return 0;
    *out = r;
    return 1;
}
static inline int cq_bytes_ok(int64_t a, int64_t b, int64_t elt)
{
    int64_t t;
    return cq_mul_ok(a, b, &t) && cq_mul_ok(t, elt, &t);
}
static inline int64_t cq_ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }
/* The byte ranges [a, a + na) and [b, b + nb) share a byte (sizes >= 0, already checked to fit). */
static inline int cq_overlap(const void *a, int64_t na, const void *b, int64_t nb)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return na > 0 && nb > 0 && pa < pb + (uintptr_t)nb && pb < pa + (uintptr_t)na;
}

/* 64-byte aligned scratch (free with free()). glibc's malloc returns page + 16 for large blocks:
 * every 64-byte row of a tile load then straddles two cache lines (AMX (4096, 4096) M = 256:
 * 8.1 -> 5.6 ms with the activations and packed weight aligned). NULL on failure or size 0. */
static inline void *cq_alloc64(size_t size)
{
    void *p = NULL;
    if (size == 0 || posix_memalign(&p, 64, size) != 0) return NULL;
    return p;
}

#endif
