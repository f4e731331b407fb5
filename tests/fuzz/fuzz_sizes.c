/* fuzz_sizes.c - every public entry point with arbitrary int64 sizes and enum values, and NULL
 * buffers: a size whose byte count does not fit int64/size_t must be refused (CQ_ERR_OVERFLOW),
 * a non-positive one with CQ_ERR_SHAPE, and nothing may touch memory or crash. cq_num_scales and
 * cq_packed_size (every format, any group_size) are checked against 128-bit arithmetic of the
 * documented layout. Also: cq_strerror / cq_isa_name never
 * return NULL, cq_set_isa / cq_set_num_threads refuse what they must. */
#include "fuzz_common.h"

typedef __int128 i128;

static int fits(i128 bytes) { return bytes >= 0 && bytes <= (i128)INT64_MAX && bytes <= (i128)SIZE_MAX; }
/* a*b*c fits int64 and size_t (a, b, c >= 0; no 128-bit overflow either) */
static int fits3(int64_t a, int64_t b, int64_t c)
{
    i128 ab = (i128)a * b;
    return fits(ab) && fits(ab * c);
}

static int64_t fz_size(fz_reader *r)
{
    uint8_t sel = fz_u8(r);
    int64_t v = (int64_t)fz_u64(r);
    switch (sel % 8) {
    case 0: return v;                                   /* anything, negative included */
    case 1: return (int64_t)1 << (fz_u8(r) % 63);       /* powers of two */
    case 2: return ((int64_t)1 << (fz_u8(r) % 63)) + (int8_t)fz_u8(r);
    case 3: return INT64_MAX - (fz_u8(r) % 64);
    case 4: return (v & 0xff) - 16;
    default: return (v & 0x7fffffff) + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_reader r = {data, size};
    int64_t m = fz_size(&r), n = fz_size(&r), k = fz_size(&r), g = fz_size(&r);
    int scheme = (int)(int8_t)fz_u8(&r) % 5, mode = (int)(int8_t)fz_u8(&r) % 4;
    int format = (int)(int8_t)fz_u8(&r) % 6; /* -5..5: AUTO, N16K4, N64K4, the int4 ones, unknown ones */
    int64_t pg = (fz_u8(&r) & 1) ? g : 0;     /* the packed scale group: 0 (one segment) or g */
    int any = (int)(int32_t)fz_u64(&r);

    int64_t ns = cq_num_scales(scheme, n, k, g);
    if (n <= 0 || k <= 0) fz_expect(ns == CQ_ERR_SHAPE, "num_scales shape %lld", (long long)ns);
    else if (!fits3(n, k, 4)) fz_expect(ns == CQ_ERR_OVERFLOW, "num_scales overflow %lld", (long long)ns);
    else if (scheme < 0 || scheme > 2) fz_expect(ns == CQ_ERR_ARG, "num_scales scheme %lld", (long long)ns);
    else if (scheme == CQ_PER_GROUP && (g <= 0 || g % 4 || k % g)) fz_expect(ns == CQ_ERR_GROUP, "group %lld", (long long)ns);
    else fz_expect(ns == (scheme == 0 ? 1 : scheme == 1 ? n : n * (k / g)), "num_scales value %lld", (long long)ns);

    /* documented layout: 64-byte header, codes (panels of nr rows by k in steps of 4), then for
     * N64K4 the int32 column sums per panel, segment and row, 64-byte aligned */
    int64_t ps = cq_packed_size(format, n, k, pg);
    int fmt = format == CQ_FORMAT_AUTO ? cq_best_format(n > 0 ? n : 1) : format;
    /* int4 formats: two codes a byte, k in steps of 8 (4 bytes per row per step), groups that are
     * multiples of 8 up to 256 */
    int i4 = fmt == CQ_FORMAT_N16K8I4 || fmt == CQ_FORMAT_N64K8I4;
    if (fmt < CQ_FORMAT_N16K4 || fmt > CQ_FORMAT_N64K8I4) fz_expect(ps == CQ_ERR_ARG, "packed format %d: %lld", format, (long long)ps);
    else if (n <= 0 || k <= 0) fz_expect(ps == CQ_ERR_SHAPE, "packed shape");
    else if (pg < 0 || (pg > 0 && (pg % (i4 ? 8 : 4) || k % pg)) || (i4 && pg > 256))
        fz_expect(ps == CQ_ERR_GROUP, "packed group %lld", (long long)ps);
    else {
        i128 nr = (fmt == CQ_FORMAT_N16K4 || fmt == CQ_FORMAT_N16K8I4) ? 16 : 64, np = ((i128)n + nr - 1) / nr;
        i128 steps = i4 ? ((i128)k + 7) / 8 : ((i128)k + 3) / 4; /* stored steps, 4 bytes per row each */
        i128 nseg = pg ? (i128)k / pg : 1, big = (i128)1 << 100; /* products stay far from 2^127 */
        i128 want = np * steps > big ? big : 64 + np * steps * 4 * nr;
        if (fmt == CQ_FORMAT_N64K4 || fmt == CQ_FORMAT_N64K8I4)
            want = (want + 63) / 64 * 64 + (np * nseg > big ? big : np * nseg * nr * 4);
        if (!fits(want)) fz_expect(ps == CQ_ERR_OVERFLOW, "packed overflow %lld", (long long)ps);
        else fz_expect(ps == (int64_t)want, "packed value %lld, want %lld", (long long)ps, (long long)want);
    }

    /* NULL buffers: a status, never a touch */
    fz_expect(cq_quantize(NULL, n, k, scheme, g, NULL, NULL) < 0, "quantize NULL");
    fz_expect(cq_dequantize(NULL, NULL, n, k, scheme, g, NULL) < 0, "dequantize NULL");
    fz_expect(cq_quantize_rows(NULL, m, k, NULL, NULL) < 0, "quantize_rows NULL");
    fz_expect(cq_pack(format, NULL, n, k, pg, NULL) < 0 && cq_unpack(NULL, n, k, NULL) < 0, "pack NULL");
    fz_expect(cq_packed_info(NULL, n, NULL, NULL, NULL) == CQ_ERR_NULL, "packed_info NULL");
    fz_expect(cq_gemm_s8s8s32(NULL, NULL, m, n, k, NULL) < 0, "gemm NULL");
    int st = cq_linear(mode, NULL, m, k, NULL, NULL, scheme, g, n, NULL, NULL);
    if (mode > 1 || mode < 0) fz_expect(st == CQ_ERR_ARG, "linear mode %d", st);
    else if (m < 0) fz_expect(st == CQ_ERR_SHAPE, "linear m<0 %d", st);
    else if (ns < 0) fz_expect(st < 0, "linear bad weight %d", st);
    else if (!fits3(m, k, 4) || !fits3(m, n, 4) || !fits3(m, (k + 3) / 4, 16))
        fz_expect(st == CQ_ERR_OVERFLOW, "linear overflow gave %d (m=%lld n=%lld k=%lld)", st, (long long)m, (long long)n, (long long)k);
    else if (m == 0) fz_expect(st == CQ_OK, "linear m=0 %d", st);
    else fz_expect(st == CQ_ERR_NULL, "linear NULL %d", st);

    /* gemm with real (tiny) buffers: sizes that do not fit must be refused before use */
    int8_t a[4] = {1, 2, 3, 4};
    int32_t c[1];
    if (m > 0 && n > 0 && k > 0 && (!fits3(m, k, 1) || !fits3(n, k, 1) || !fits3(m, n, 4)) && k <= CQ_MAX_K_S32)
        fz_expect(cq_gemm_s8s8s32(a, a, m, n, k, c) == CQ_ERR_OVERFLOW, "gemm overflow not refused");
    if (k > CQ_MAX_K_S32 && m > 0 && n > 0)
        fz_expect(cq_gemm_s8s8s32(a, a, m, n, k, c) == CQ_ERR_OVERFLOW, "gemm k not refused");

    fz_expect(cq_strerror(any) != NULL && cq_isa_name(any) != NULL, "strings");
    int sup = cq_isa_supported(any);
    fz_expect(sup == 0 || sup == 1, "isa_supported");
    st = cq_set_isa(any);
    if (any < -1 || (any >= 0 && strcmp(cq_isa_name(any), "unknown") == 0)) fz_expect(st == CQ_ERR_ARG, "set_isa(%d) = %d", any, st);
    else if (any >= 0) fz_expect(st == (sup ? CQ_OK : CQ_ERR_ISA), "set_isa(%d) = %d", any, st);
    fz_expect(cq_get_isa() >= 0, "a refused set_isa leaves a working path");
    st = cq_set_num_threads(any);
    fz_expect(st == ((any >= 1 && any <= 256) ? CQ_OK : CQ_ERR_ARG), "set_num_threads(%d) = %d", any, st);
    cq_set_num_threads(2);
    cq_set_isa(CQ_ISA_AUTO);
    return 0;
}
