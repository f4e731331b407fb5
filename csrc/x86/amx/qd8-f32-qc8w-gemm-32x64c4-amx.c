/* qd8-f32-qc8w-gemm-32x64c4-amx.c - dynamic int8 micro-kernel for AMX-INT8 (Sapphire Rapids and
 * later), format N64K4: 32 rows x 64 columns, in two halves of 32 columns, each a 2 x 2 block of
 * 16x16 int32 C tiles fed by 2 A tiles (16 rows x 64 k of s8 activations) and 2 B tiles (16 k4
 * steps x 16 columns x 4 codes: an N64K4 panel slice read with a row stride of 256 bytes). One
 * tdpbssd is 16 x 16 x 64 = 16384 exact s8 x s8 multiply-adds into int32 (no u8 shift, no
 * compensation: the column sums are unused).
 * Contract beyond cq_qd8_gemm_fn: nk4 is a multiple of 16 (64 k per tile) or 8 (one group of 32 k:
 * tiles of 32 k, A read 32 bytes a row at a stride of 64), a is in 16 x 64-byte tiles
 * (cq_ukernel.a_tiled: one contiguous 1 KiB per tile load, rather than 16 rows lda bytes apart;
 * for nk4 = 8, a may point half-way into a tile row), and 32 rows of a are readable (the driver pads the activations to 32 rows); only mr rows are
 * written, except in CQ_OUT_I32 mode, where the int32 sums of all 32 rows go to acc (which has room
 * for them). The tile configuration (per-thread state) is loaded when the calling thread has not got
 * this call's already, and kept: the caller releases it with cq_amx_release (cq_ukernel.release)
 * when its run of calls is over. */
#include "target.h"
#if CQ_CAN_TARGET_AMX
CQ_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
#include <immintrin.h>
#include <string.h>

#define NR 64
#define STEP (NR * 4)
#include "../qd8-out-512.h"
#ifndef CQ_AMX_PF
#define CQ_AMX_PF 32 /* k4 steps the panel is prefetched ahead */
#endif

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* Tiles 0-3: C (16 x 16 int32), 4-5: A (16 rows x kb bytes of k), 6-7: B (kb / 4 k4 steps x 64
 * bytes); kb = 64, or 32 for one group of 32 k. GCC 12 does not see _tile_loadconfig read its
 * operand and drops the stores that fill it (the tiles then have no shape: SIGSEGV), so the asm
 * below says it reads. */
CQ_INLINE void load_tiles(tilecfg *cfg, int kb)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int i = 0; i < 8; i++) { cfg->colsb[i] = 64; cfg->rows[i] = 16; }
    cfg->colsb[4] = cfg->colsb[5] = (uint16_t)kb;
    cfg->rows[6] = cfg->rows[7] = (uint8_t)(kb / 4);
    __asm__ volatile("" : : "m"(*cfg) : "memory");
    _tile_loadconfig(cfg);
}
CQ_INLINE void load_tiles_16x64(tilecfg *cfg) { load_tiles(cfg, 64); }

/* The tile configuration this thread has loaded (k bytes per A tile), 0 for none: the kernel keeps
 * it across calls (ldtilecfg was ~13% of the per-group kernel's samples in perf, one call per group
 * of 32 k) and the driver releases it once a unit of work is done (cq_ukernel.release). */
static __thread int amx_kb;

void cq_amx_release(void)
{
    if (amx_kb) {
        _tile_release();
        amx_kb = 0;
    }
}

void cq_qd8_f32_qc8w_gemm_32x64c4_amx(int mr, int nr, int64_t nk4, const int8_t *a, int64_t lda,
                                      const int8_t *b, const cq_qd8_out *o)
{
    (void)nr;
    /* nk4 = 8: one group of 32 k (per-group scales), in tiles of 32 k; else tiles of 64 k */
    const int kt = nk4 == 8 ? 8 : 16;
    if (amx_kb != 4 * kt) {
        tilecfg cfg;
        load_tiles(&cfg, 4 * kt);
        amx_kb = 4 * kt;
    }
    int32_t c[32 * NR] __attribute__((aligned(64)));
    for (int half = 0; half < 2; half++) {
        const int8_t *bh = b + half * 128;
        int32_t *ch = c + half * 32;
        if (o->acc_in) { /* resume from the int32 sums of the previous k block */
            _tile_loadd(0, o->acc + half * 32, NR * 4);
            _tile_loadd(1, o->acc + half * 32 + 16, NR * 4);
            _tile_loadd(2, o->acc + 16 * NR + half * 32, NR * 4);
            _tile_loadd(3, o->acc + 16 * NR + half * 32 + 16, NR * 4);
        } else {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        }
        for (int64_t t = 0; t < nk4; t += kt) {
            if (half == 0 && nk4 > 16) /* the panel streams from memory at small M: fetch 32 steps ahead */
                for (int i = 0; i < 16; i++) {
                    const char *pf = (const char *)(b + (t + CQ_AMX_PF + i) * STEP);
                    _mm_prefetch(pf, _MM_HINT_T0);
                    _mm_prefetch(pf + 64, _MM_HINT_T0);
                    _mm_prefetch(pf + 128, _MM_HINT_T0);
                    _mm_prefetch(pf + 192, _MM_HINT_T0);
                }
            _tile_loadd(4, a + 64 * t, 64); /* tiled activations (a_tiled): 1 KiB per tile */
            _tile_loadd(5, a + 16 * lda + 64 * t, 64);
            _tile_loadd(6, bh + t * STEP, STEP);
            _tile_loadd(7, bh + t * STEP + 64, STEP);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
        if (o->mode == CQ_OUT_I32) /* straight into the caller's sums (room for 32 rows: pad_rows) */
            ch = o->acc + half * 32;
        _tile_stored(0, ch, NR * 4);
        _tile_stored(1, ch + 16, NR * 4);
        _tile_stored(2, ch + 16 * NR, NR * 4);
        _tile_stored(3, ch + 16 * NR + 16, NR * 4);
    }
    if (o->mode == CQ_OUT_I32) return;
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 4; v++) cq_qd8_out_vec64(o, r, v, _mm512_load_si512((const void *)(c + r * NR + 16 * v)), 0);
}
/* Peak of tdpbssd on one core (for `make bench`'s "% of peak"): 4 independent C tiles, operands
 * already in tiles, no memory. Returns the MACs done (16 x 16 x 64 per instruction). */
double cq_peak_loop_amx(int64_t iters)
{
    tilecfg cfg;
    load_tiles_16x64(&cfg);
    amx_kb = 64;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    for (int64_t i = 0; i < iters; i++) {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    cq_amx_release();
    return (double)iters * 4.0 * 16384.0;
}
CQ_TARGET_END
#endif
