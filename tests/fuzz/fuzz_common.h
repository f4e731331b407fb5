/* fuzz_common.h - shared by the libFuzzer targets in tests/fuzz/ (built by `make fuzz`).
 *
 * Each target reads its arguments from the fuzzer's bytes with the small reader below: sizes,
 * enum values, the ISA path, then data. Floats come from two bytes each so that every class of
 * value is common: small values, values spread over the whole exponent range, subnormals, values
 * near FLT_MAX, +-0, NaN and +-Inf. Buffers are malloc'ed at exactly the size the API documents,
 * so AddressSanitizer reports any access past them. A failed check calls fz_fail(), which prints
 * and aborts (libFuzzer then saves the input as a crash-* artifact). */
#ifndef CQ_FUZZ_COMMON_H
#define CQ_FUZZ_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cquant.h"

typedef struct {
    const uint8_t *p;
    size_t n;
} fz_reader;

static uint8_t fz_u8(fz_reader *r)
{
    if (r->n == 0) return 0;
    r->n--;
    return *r->p++;
}

static uint32_t fz_u16(fz_reader *r) { uint32_t lo = fz_u8(r); return lo | ((uint32_t)fz_u8(r) << 8); }

static uint64_t fz_u64(fz_reader *r)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)fz_u8(r) << (8 * i);
    return v;
}

/* A value in [lo, hi], biased towards both ends and small values. */
static int64_t fz_range(fz_reader *r, int64_t lo, int64_t hi)
{
    uint8_t sel = fz_u8(r);
    if (sel < 16) return lo;
    if (sel < 32) return hi;
    uint64_t span = (uint64_t)(hi - lo) + 1;
    return lo + (int64_t)(fz_u16(r) % span);
}

static float fz_float(fz_reader *r)
{
    uint8_t cls = fz_u8(r), b = fz_u8(r);
    int8_t s = (int8_t)b;
    if (cls < 160) return (float)s / 16.0f;                               /* small, with ties */
    if (cls < 200) return ldexpf((float)s, (int)(cls - 180) * 6);         /* 2^-120 .. 2^114 */
    if (cls < 215) return (float)s * 1.0e-43f;                            /* subnormal */
    if (cls < 225) return (s < 0 ? -1.0f : 1.0f) * (FLT_MAX - (float)(b & 0x7f) * 1e31f);
    if (cls < 235) return (float)s;                                        /* whole numbers */
    if (cls < 242) return (b & 1) ? -0.0f : 0.0f;
    if (cls < 249) return NAN;
    return (b & 1) ? -INFINITY : INFINITY;
}

/* Fill x[0..count) from the reader; once the input runs out, repeat it (cheap and deterministic). */
static void fz_floats(fz_reader *r, float *x, int64_t count)
{
    for (int64_t i = 0; i < count; i++) x[i] = r->n >= 2 ? fz_float(r) : (i ? x[i % (i > 7 ? 7 : i)] : 0.5f);
}

/* Codes in [-127, 127]; -128 only when allow_min. */
static void fz_codes(fz_reader *r, int8_t *q, int64_t count, int allow_min)
{
    for (int64_t i = 0; i < count; i++) {
        int8_t c = r->n ? (int8_t)fz_u8(r) : (int8_t)(i * 37 % 255 - 127);
        if (c == -128 && !allow_min) c = -127;
        q[i] = c;
    }
}

/* Every ISA path (enum cq_isa); the fuzzer picks among them. */
static const int fz_isas[] = {CQ_ISA_SCALAR, CQ_ISA_AVX2, CQ_ISA_AVXVNNI, CQ_ISA_AVX512, CQ_ISA_AVX512VNNI, CQ_ISA_AMX};
#define FZ_NISAS ((int)(sizeof fz_isas / sizeof fz_isas[0]))

/* Pick a supported ISA path from one byte and make it active. Returns the path. */
static int fz_pick_isa(fz_reader *r)
{
    int want = fz_isas[fz_u8(r) % FZ_NISAS];
    if (!cq_isa_supported(want)) want = CQ_ISA_SCALAR;
    if (cq_set_isa(want) != CQ_OK) { fprintf(stderr, "cq_set_isa(%d) failed\n", want); abort(); }
    return want;
}

/* A packed format from one byte: AUTO (cq_best_format(n)) or either explicit one. */
static int fz_pick_format(fz_reader *r)
{
    static const int formats[] = {CQ_FORMAT_AUTO, CQ_FORMAT_N16K4, CQ_FORMAT_N64K4};
    return formats[fz_u8(r) % 3];
}

#define fz_fail(...)                                                                       \
    do {                                                                                   \
        fprintf(stderr, "fuzz check failed at %s:%d (isa %s): ", __FILE__, __LINE__,       \
                cq_isa_name(cq_get_isa()));                                                \
        fprintf(stderr, __VA_ARGS__);                                                      \
        fprintf(stderr, "\n");                                                             \
        abort();                                                                           \
    } while (0)

#define fz_expect(cond, ...) do { if (!(cond)) fz_fail(__VA_ARGS__); } while (0)

static void *fz_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); abort(); }
    return p;
}

/* The numerics contract in plain C: scale of a slice and the code of one value. */
static float fz_ref_scale(const float *w, int64_t len)
{
    float amax = 0.0f;
    for (int64_t i = 0; i < len; i++) amax = fabsf(w[i]) > amax ? fabsf(w[i]) : amax;
    float s = amax / 127.0f;
    return s > 0.0f ? s : 1.0f;
}

static int8_t fz_ref_code(float w, float s)
{
    float r = nearbyintf(w / s);
    return (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
}

static int fz_all_finite(const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

#endif
