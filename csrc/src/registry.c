/* registry.c - every compiled micro-kernel (name = type, tile, ISA, as in XNNPACK), the per-scheme
 * configs chosen best first, and the thread-local name of the kernel that ran last.
 * Adding a kernel: its file in x86/ISA/ (and csrc/sources.txt), a prototype and a line in
 * UKERNELS below; if it is the best for a scheme on its path, a line at the top of that scheme's
 * config list. Nothing else changes: drivers read mr/nr/act_u8 from here. */
#include "target.h"

#if defined(CQ_X86) && CQ_CAN_TARGET_AVX2
void cq_qd8_f32_qc8w_gemm_4x16c4_avx2(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_qd8_f32_qc8w_gemm_4x16c4_ps_avx2(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_qd8_f32_qc8w_gemv4_1x64c4_avx2(int, int64_t, const int8_t *, const int8_t *const *, int64_t, int32_t *);
void cq_f32_qc8w_dequant_16c4_avx2(int, int64_t, const int8_t *, const float *, float *);
void cq_f32_qc8w_gemm_6x16_avx2(int, int, int64_t, const float *, int64_t, const float *, float *, int64_t);
void cq_f32_qc8w_gemv4_6x64c4_avx2(int, int, int64_t, const float *, int64_t, const int8_t *const *, const float *, float *, int64_t);
void cq_f32_qc4w_gemv4_1x64c8_avx2(int, int64_t, const float *, const int8_t *const *, int64_t, const float *, float *);
#define HAVE_AVX2 1
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AVX512
void cq_qd8_f32_qc8w_gemm_6x64c4_avx512vnni(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_qd8_f32_qc8w_gemv4_1x256c4_avx512vnni(int, int64_t, const int8_t *, const int8_t *const *, int64_t, int32_t *);
void cq_qd8_f32_qc8w_gemm_4x64c4_avx512bw(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_qd8_f32_qc8w_gemm_4x64c4_ps_avx512bw(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_f32_qc8w_dequant_64c4_avx512f(int, int64_t, const int8_t *, const float *, float *);
void cq_f32_qc8w_gemm_6x64_avx512f(int, int, int64_t, const float *, int64_t, const float *, float *, int64_t);
void cq_f32_qc8w_gemv4_6x256c4_avx512f(int, int, int64_t, const float *, int64_t, const int8_t *const *, const float *, float *, int64_t);
void cq_f32_qc4w_gemv4_1x256c8_avx512f(int, int64_t, const float *, const int8_t *const *, int64_t, const float *, float *);
void cq_x24_qc4w_gemv4_1x256c8_avx512vnni(int, int64_t, const int8_t *, int64_t, const int32_t *, float,
                                          const int8_t *const *, int64_t, const float *, float *);
#define HAVE_AVX512 1
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AVXVNNI
void cq_qd8_f32_qc8w_gemm_4x16c4_avxvnni(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_qd8_f32_qc8w_gemv4_1x64c4_avxvnni(int, int64_t, const int8_t *, const int8_t *const *, int64_t, int32_t *);
#define HAVE_AVXVNNI 1
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AMX
void cq_qd8_f32_qc8w_gemm_32x64c4_amx(int, int, int64_t, const int8_t *, int64_t, const int8_t *, const cq_qd8_out *);
void cq_amx_release(void);
#define HAVE_AMX 1
#endif

/* Indices into UKERNELS, for the configs below. */
enum {
    REF_QD8_GEMM, REF_QD8_GEMM_U8, REF_QD8_GEMV4, REF_F32_DEQUANT, REF_F32_GEMM, REF_F32_GEMV4, REF_F32_I4_GEMV4, REF_X24_I4_GEMV4,
#ifdef HAVE_AVX2
    AVX2_QD8_GEMM, AVX2_QD8_GEMM_PS, AVX2_QD8_GEMV4, AVX2_F32_DEQUANT, AVX2_F32_GEMM, AVX2_F32_GEMV4, AVX2_F32_I4_GEMV4,
#endif
#ifdef HAVE_AVX512
    VNNI_QD8_GEMM, VNNI_QD8_GEMV4, BW_QD8_GEMM, BW_QD8_GEMM_PS, F512_F32_DEQUANT, F512_F32_GEMM, F512_F32_GEMV4, F512_F32_I4_GEMV4, VNNI_X24_I4_GEMV4,
#endif
#ifdef HAVE_AVXVNNI
    AVXVNNI_QD8_GEMM, AVXVNNI_QD8_GEMV4,
#endif
#ifdef HAVE_AMX
    AMX_QD8_GEMM,
#endif
    NUKERNELS
};

static const cq_ukernel UKERNELS[] = {
    /* scalar references: any nr (a multiple of 16) */
    {"qd8_f32_qc8w_gemm_4xNc4_ref", CQ_UK_QD8_GEMM, CQ_ISA_SCALAR, 4, 0, 0, (void *)cq_ref_qd8_gemm, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemm_4xNc4_u8_ref", CQ_UK_QD8_GEMM, CQ_ISA_SCALAR, 4, 0, 1, (void *)cq_ref_qd8_gemm_u8, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemv4_1x4Nc4_ref", CQ_UK_QD8_GEMV4, CQ_ISA_SCALAR, 1, 0, 0, (void *)cq_ref_qd8_gemv4, 0, 0, 0, NULL, 0},
    {"f32_qc8w_dequant_Nc4_ref", CQ_UK_F32_DEQUANT, CQ_ISA_SCALAR, 1, 0, 0, (void *)cq_ref_f32_dequant, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemm_6xN_ref", CQ_UK_F32_GEMM, CQ_ISA_SCALAR, 6, 0, 0, (void *)cq_ref_f32_gemm, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemv4_6x4Nc4_ref", CQ_UK_F32_GEMV4, CQ_ISA_SCALAR, 6, 0, 0, (void *)cq_ref_f32_gemv4, 0, 0, 0, NULL, 0},
    {"f32_qc4w_gemv4_1x4Nc8_ref", CQ_UK_F32_I4_GEMV4, CQ_ISA_SCALAR, 1, 0, 0, (void *)cq_ref_f32_i4_gemv4, 0, 0, 0, NULL, 0},
    {"x24_qc4w_gemv4_1x4Nc8_ref", CQ_UK_X24_I4_GEMV4, CQ_ISA_SCALAR, 1, 0, 0, (void *)cq_ref_x24_i4_gemv4, 0, 0, 0, NULL, 0},
#ifdef HAVE_AVX2
    {"qd8_f32_qc8w_gemm_4x16c4_avx2", CQ_UK_QD8_GEMM, CQ_ISA_AVX2, 4, 16, 0, (void *)cq_qd8_f32_qc8w_gemm_4x16c4_avx2, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemm_4x16c4_pairsafe_avx2", CQ_UK_QD8_GEMM, CQ_ISA_AVX2, 4, 16, 0, (void *)cq_qd8_f32_qc8w_gemm_4x16c4_ps_avx2, 0, 0, 0, NULL, 1},
    {"qd8_f32_qc8w_gemv4_1x64c4_avx2", CQ_UK_QD8_GEMV4, CQ_ISA_AVX2, 1, 16, 0, (void *)cq_qd8_f32_qc8w_gemv4_1x64c4_avx2, 0, 0, 0, NULL, 0},
    {"f32_qc8w_dequant_16c4_avx2", CQ_UK_F32_DEQUANT, CQ_ISA_AVX2, 1, 16, 0, (void *)cq_f32_qc8w_dequant_16c4_avx2, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemm_6x16_avx2", CQ_UK_F32_GEMM, CQ_ISA_AVX2, 6, 16, 0, (void *)cq_f32_qc8w_gemm_6x16_avx2, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemv4_6x64c4_avx2", CQ_UK_F32_GEMV4, CQ_ISA_AVX2, 6, 16, 0, (void *)cq_f32_qc8w_gemv4_6x64c4_avx2, 0, 0, 0, NULL, 0},
    {"f32_qc4w_gemv4_1x64c8_avx2", CQ_UK_F32_I4_GEMV4, CQ_ISA_AVX2, 1, 16, 0, (void *)cq_f32_qc4w_gemv4_1x64c8_avx2, 0, 0, 0, NULL, 0},
#endif
#ifdef HAVE_AVX512
    {"qd8_f32_qc8w_gemm_6x64c4_avx512vnni", CQ_UK_QD8_GEMM, CQ_ISA_AVX512VNNI, 6, 64, 1, (void *)cq_qd8_f32_qc8w_gemm_6x64c4_avx512vnni, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemv4_1x256c4_avx512vnni", CQ_UK_QD8_GEMV4, CQ_ISA_AVX512VNNI, 1, 64, 1, (void *)cq_qd8_f32_qc8w_gemv4_1x256c4_avx512vnni, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemm_4x64c4_avx512bw", CQ_UK_QD8_GEMM, CQ_ISA_AVX512, 4, 64, 0, (void *)cq_qd8_f32_qc8w_gemm_4x64c4_avx512bw, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemm_4x64c4_pairsafe_avx512bw", CQ_UK_QD8_GEMM, CQ_ISA_AVX512, 4, 64, 0, (void *)cq_qd8_f32_qc8w_gemm_4x64c4_ps_avx512bw, 0, 0, 0, NULL, 1},
    {"f32_qc8w_dequant_64c4_avx512f", CQ_UK_F32_DEQUANT, CQ_ISA_AVX512, 1, 64, 0, (void *)cq_f32_qc8w_dequant_64c4_avx512f, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemm_6x64_avx512f", CQ_UK_F32_GEMM, CQ_ISA_AVX512, 6, 64, 0, (void *)cq_f32_qc8w_gemm_6x64_avx512f, 0, 0, 0, NULL, 0},
    {"f32_qc8w_gemv4_6x256c4_avx512f", CQ_UK_F32_GEMV4, CQ_ISA_AVX512, 6, 64, 0, (void *)cq_f32_qc8w_gemv4_6x256c4_avx512f, 0, 0, 0, NULL, 0},
    {"f32_qc4w_gemv4_1x256c8_avx512f", CQ_UK_F32_I4_GEMV4, CQ_ISA_AVX512, 1, 64, 0, (void *)cq_f32_qc4w_gemv4_1x256c8_avx512f, 0, 0, 0, NULL, 0},
    {"x24_qc4w_gemv4_1x256c8_avx512vnni", CQ_UK_X24_I4_GEMV4, CQ_ISA_AVX512VNNI, 1, 64, 0, (void *)cq_x24_qc4w_gemv4_1x256c8_avx512vnni, 0, 0, 0, NULL, 0},
#endif
#ifdef HAVE_AVXVNNI
    {"qd8_f32_qc8w_gemm_4x16c4_avxvnni", CQ_UK_QD8_GEMM, CQ_ISA_AVXVNNI, 4, 16, 0, (void *)cq_qd8_f32_qc8w_gemm_4x16c4_avxvnni, 0, 0, 0, NULL, 0},
    {"qd8_f32_qc8w_gemv4_1x64c4_avxvnni", CQ_UK_QD8_GEMV4, CQ_ISA_AVXVNNI, 1, 16, 0, (void *)cq_qd8_f32_qc8w_gemv4_1x64c4_avxvnni, 0, 0, 0, NULL, 0},
#endif
#ifdef HAVE_AMX
    {"qd8_f32_qc8w_gemm_32x64c4_amx", CQ_UK_QD8_GEMM, CQ_ISA_AMX, 32, 64, 0, (void *)cq_qd8_f32_qc8w_gemm_32x64c4_amx, 16, 32, 1,
     cq_amx_release, 0},
#endif
};

int cq_ukernel_count(void) { return NUKERNELS; }
const cq_ukernel *cq_ukernel_at(int i) { return i >= 0 && i < NUKERNELS ? &UKERNELS[i] : NULL; }
#define UK(i) (&UKERNELS[i])

/* Path ranks: a path runs the kernels of every path ranked at or below it, except AVX-VNNI's:
 * those run on the avxvnni path, and on avx512vnni / amx where the CPU has AVX-VNNI too (Ice Lake
 * and Zen 4 have AVX-512 VNNI without it; Skylake-SP's avx512 has neither). */
static int rank(int isa)
{
    switch (isa) {
    case CQ_ISA_SCALAR: return 0;
    case CQ_ISA_AVX2: return 1;
    case CQ_ISA_AVXVNNI: return 2;
    case CQ_ISA_AVX512: return 3;
    case CQ_ISA_AVX512VNNI: return 4;
    case CQ_ISA_AMX: return 5;
    default: return 99;
    }
}
static int allowed(int active, int isa)
{
    if (isa == CQ_ISA_AVXVNNI && active != CQ_ISA_AVXVNNI) /* a forced avx512 stays Skylake-SP's */
        return (active == CQ_ISA_AVX512VNNI || active == CQ_ISA_AMX) && cq_cpu_has(CQ_ISA_AVXVNNI);
    return rank(isa) <= rank(active);
}

/* ---- configs, best first --------------------------------------------------------------------- */
/* {path, format, gemm, gemv4, min_m, k4_multiple, no_groups, pad_rows, kc4 (0: KC_BYTES of the
 * panel), mb (0: S8_MB), whole_k, gemm_ps (or NULL)} */
static const cq_qd8_config QD8_CFG[] = {
#ifdef HAVE_AMX
    /* AMX: k a multiple of 64, per-channel, from 16 rows (M = 8: the VNNI tile was faster,
     * (4096, 4096) 0.84 against 0.95 ms and (4096, 11008) 2.28 against 2.46 ms; M = 16 about
     * equal; M = 32: AMX 1.17 / 3.11 ms against 2.20 / 7.62 ms; one thread, 2026-11-29).
     * k blocks of 4096 (256 KiB of the panel, L2) and 64 rows per unit: (4096, 4096) M=256 took
     * 5.3 ms against 6.8-7.5 ms with 128 or 256 rows or k blocks of 256 to 1024 (same machine).
     * Per-group scales too, for groups of 32 k (tiles of 32 k) or a multiple of 64 k: (4096, 4096)
     * M=256, one thread, int8 group 128: 23.4 -> 12.8 ms, group 32: 39.5 -> 31.5 ms, int4 group 32:
     * 45.9 -> 28.1 ms against the VNNI 6x64 tile (2026-11-30, other work running on the machine). */
    {CQ_ISA_AMX, CQ_FORMAT_N64K4, UK(AMX_QD8_GEMM), NULL, 16, 16, 2, 32, 1024, 64, 0, NULL},
#endif
#ifdef HAVE_AVX512
    /* whole k per tile call where it pays (linear.c, WHOLE_K_ROWS): (4096, 4096) M = 256 -8 to -10%;
     * the other paths' tiles measured no gain (avx512 / avxvnni / avx2 forced here: +-2%, +0-5%, +1-4%) */
    {CQ_ISA_AVX512VNNI, CQ_FORMAT_N64K4, UK(VNNI_QD8_GEMM), UK(VNNI_QD8_GEMV4), 0, 0, 0, 0, 0, 0, 1, NULL},
    /* Skylake-SP: the pair-safe tile where the activations allow it (linear.c, want_ps) */
    {CQ_ISA_AVX512, CQ_FORMAT_N64K4, UK(BW_QD8_GEMM), NULL, 0, 0, 0, 0, 0, 0, 0, UK(BW_QD8_GEMM_PS)},
#endif
#ifdef HAVE_AVXVNNI
    {CQ_ISA_AVXVNNI, CQ_FORMAT_N16K4, UK(AVXVNNI_QD8_GEMM), UK(AVXVNNI_QD8_GEMV4), 0, 0, 0, 0, 0, 0, 0, NULL},
#endif
#ifdef HAVE_AVX2
    /* the pair-safe tile where the activations allow it (linear.c, want_ps) */
    {CQ_ISA_AVX2, CQ_FORMAT_N16K4, UK(AVX2_QD8_GEMM), UK(AVX2_QD8_GEMV4), 0, 0, 0, 0, 0, 0, 0, UK(AVX2_QD8_GEMM_PS)},
#endif
    {CQ_ISA_SCALAR, CQ_FORMAT_N16K4, UK(REF_QD8_GEMM), UK(REF_QD8_GEMV4), 0, 0, 0, 0, 0, 0, 0, NULL},
    {CQ_ISA_SCALAR, CQ_FORMAT_N64K4, UK(REF_QD8_GEMM), UK(REF_QD8_GEMV4), 0, 0, 0, 0, 0, 0, 0, NULL},
};
/* {path, format, dequant, gemm, gemv4, kc, int4 gemv4, int4 gemv4 in integers (or NULL), gemv_m} */
#ifndef WO_GEMV_M_AVX512
#define WO_GEMV_M_AVX512 9
#endif
#ifndef WO_GEMV_M_AVX2
#define WO_GEMV_M_AVX2 9
#endif
#define WO_GEMV_M_REF 9 /* the scalar path: the same rows as the SIMD paths, so results match */
typedef char cq_gemv_m_fits[WO_GEMV_M_AVX512 <= CQ_WO_GEMV_MAX_M && WO_GEMV_M_AVX2 <= CQ_WO_GEMV_MAX_M &&
                            WO_GEMV_M_REF <= CQ_WO_GEMV_MAX_M ? 1 : -1];
static const cq_f32_config F32_CFG[] = {
#ifdef HAVE_AVX512
    /* AVX-512 VNNI: the int4 GEMV in integers, x as 24-bit fixed point, for weights up to 4 MiB of
     * codes (linear.c, x24_prepare, has the measurements) */
    {CQ_ISA_AVX512VNNI, CQ_FORMAT_N64K4, UK(F512_F32_DEQUANT), UK(F512_F32_GEMM), UK(F512_F32_GEMV4), 128,
     UK(F512_F32_I4_GEMV4), UK(VNNI_X24_I4_GEMV4), WO_GEMV_M_AVX512},
    {CQ_ISA_AVX512, CQ_FORMAT_N64K4, UK(F512_F32_DEQUANT), UK(F512_F32_GEMM), UK(F512_F32_GEMV4), 128, UK(F512_F32_I4_GEMV4), NULL,
     WO_GEMV_M_AVX512},
#endif
#ifdef HAVE_AVX2
    {CQ_ISA_AVX2, CQ_FORMAT_N16K4, UK(AVX2_F32_DEQUANT), UK(AVX2_F32_GEMM), UK(AVX2_F32_GEMV4), 256, UK(AVX2_F32_I4_GEMV4), NULL,
     WO_GEMV_M_AVX2},
#endif
    {CQ_ISA_SCALAR, CQ_FORMAT_N16K4, UK(REF_F32_DEQUANT), UK(REF_F32_GEMM), UK(REF_F32_GEMV4), 256, UK(REF_F32_I4_GEMV4), NULL, WO_GEMV_M_REF},
    {CQ_ISA_SCALAR, CQ_FORMAT_N64K4, UK(REF_F32_DEQUANT), UK(REF_F32_GEMM), UK(REF_F32_GEMV4), 64, UK(REF_F32_I4_GEMV4), NULL, WO_GEMV_M_REF},
};
#define NROWS(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* The first config the path allows that reads the format and takes this shape (per-group scales
 * run the same micro-kernels through their CQ_OUT_FACC epilogue). */
static int groups_ok(const cq_qd8_config *c, int64_t group4)
{
    if (!group4 || !c->no_groups) return 1;
    if (c->no_groups == 1) return 0;
    return group4 <= CQ_CHUNK4 && (group4 == 8 || group4 % 16 == 0);
}

const cq_qd8_config *cq_qd8_config_for(int active_isa, int format, int64_t group4, int64_t m, int64_t kp4)
{
    for (int i = 0; i < NROWS(QD8_CFG); i++) {
        const cq_qd8_config *c = &QD8_CFG[i];
        if (!allowed(active_isa, c->isa) || c->format != format) continue;
        if (m < c->min_m || (c->k4_multiple && kp4 % c->k4_multiple) || !groups_ok(c, group4)) continue;
        return c;
    }
    return NULL;
}

const cq_f32_config *cq_f32_config_for(int active_isa, int format)
{
    for (int i = 0; i < NROWS(F32_CFG); i++)
        if (allowed(active_isa, F32_CFG[i].isa) && F32_CFG[i].format == format) return &F32_CFG[i];
    return NULL;
}

/* The int4 expansion step (exact on every path: the SIMD ones only where the path allows them). */
cq_i4_rows_fn cq_i4_rows_for(int active_isa)
{
#ifdef HAVE_AVX512
    if (allowed(active_isa, CQ_ISA_AVX512)) return cq_i4_rows_avx512bw;
#endif
#ifdef HAVE_AVX2
    if (allowed(active_isa, CQ_ISA_AVX2)) return cq_i4_rows_avx2;
#endif
    (void)active_isa;
    return cq_i4_rows_ref;
}

/* The format of the best dynamic config the path allows (whatever the shape). */
int cq_best_format_for(int active_isa)
{
    for (int i = 0; i < NROWS(QD8_CFG); i++)
        if (allowed(active_isa, QD8_CFG[i].isa)) return QD8_CFG[i].format;
    return CQ_FORMAT_N16K4;
}

/* ---- the kernel that ran ----------------------------------------------------------------------- */
static __thread const char *last_kernel = "";
void cq_set_last_kernel(const char *name) { last_kernel = name; }
const char *cq_last_kernel(void) { return last_kernel; }
