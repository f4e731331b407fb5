/* pack.c - packed weight formats (see cquant.h and internal.h): header, codes in panels of nr rows
 * by k steps of 4, and the per-segment column sums the u8 kernels subtract (128 * sum), computed
 * once here rather than by a vpdpbusd per k step. */
#include <string.h>
#include "internal.h"

#define PACK_VERSION 1u

int cq_format_nr(int format)
{
    switch (format) {
    case CQ_FORMAT_N16K4: case CQ_FORMAT_N16K8I4: return 16;
    case CQ_FORMAT_N64K4: case CQ_FORMAT_N64K8I4: return 64;
    default: return 0;
    }
}

int cq_format_is_i4(int format) { return format == CQ_FORMAT_N16K8I4 || format == CQ_FORMAT_N64K8I4; }

/* Formats whose kernels read u8 activations carry the column sums of the compensation (an int4
 * weight runs the kernels of the int8 format of its panel width). */
static int format_has_sums(int format) { return format == CQ_FORMAT_N64K4 || format == CQ_FORMAT_N64K8I4; }

/* k4 steps of a format: ceil(k / 4), or for int4 two per step of 8 (k padded to 8). */
static int64_t format_kp4(int format, int64_t k)
{
    return cq_format_is_i4(format) ? 2 * cq_ceil_div(k, 8) : cq_ceil_div(k, 4);
}

/* Geometry of a packed (n, k) weight; group_size 0 = one segment. */
static int geometry(int format, int64_t n, int64_t k, int64_t group_size, cq_pack_header *h)
{
    if (format == CQ_FORMAT_AUTO) {
        format = cq_best_format(n);
        if (format < 0) return format;
    }
    int nr = cq_format_nr(format);
    if (!nr) return CQ_ERR_ARG;
    if (n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    int i4 = cq_format_is_i4(format);
    if (group_size < 0 || (group_size > 0 && (group_size % (i4 ? 8 : 4) != 0 || k % group_size != 0)))
        return CQ_ERR_GROUP;
    if (i4 && group_size > 256) return CQ_ERR_GROUP; /* a group expands whole into L1 (linear.c) */
    memset(h, 0, sizeof *h);
    h->magic = CQ_PACK_MAGIC;
    h->version = PACK_VERSION;
    h->format = format;
    h->nr = nr;
    h->n = n;
    h->k = k;
    h->np = cq_ceil_div(n, nr);
    h->kp4 = format_kp4(format, k);
    h->seg4 = group_size ? group_size / 4 : h->kp4;
    h->nseg = h->kp4 / h->seg4;
    int64_t codes, sums = 0, t;
    /* int4: kp4 / 2 steps of 8, 4 bytes per row each (half the bytes of int8) */
    if (!cq_mul_ok(h->np, i4 ? h->kp4 / 2 : h->kp4, &t) || !cq_mul_ok(t, 4 * (int64_t)nr, &codes))
        return CQ_ERR_OVERFLOW;
    if (format_has_sums(format) &&
        (!cq_mul_ok(h->np, h->nseg, &t) || !cq_mul_ok(t, 4 * (int64_t)nr, &sums))) return CQ_ERR_OVERFLOW;
    /* codes start after the header; sums 64-byte aligned after them */
    if (codes > INT64_MAX - 64 - CQ_PACK_HEADER) return CQ_ERR_OVERFLOW;
    int64_t off = cq_ceil_div(CQ_PACK_HEADER + codes, 64) * 64;
    if (!sums) off = CQ_PACK_HEADER + codes;
    if (off > INT64_MAX - sums || (uint64_t)(off + sums) > (uint64_t)SIZE_MAX) return CQ_ERR_OVERFLOW;
    h->sums_off = off;
    h->sums_bytes = sums;
    return CQ_OK;
}

int64_t cq_packed_size(int format, int64_t n, int64_t k, int64_t group_size)
{
    cq_pack_header h;
    int st = geometry(format, n, k, group_size, &h);
    if (st != CQ_OK) return st;
    return h.sums_off + h.sums_bytes;
}

int cq_pack_read_header(const void *packed, cq_pack_header *h)
{
    if (!packed) return CQ_ERR_NULL;
    cq_pack_header st;
    memset(&st, 0, sizeof st);
    memcpy(&st, packed, CQ_PACK_STORED);
    if (st.magic != CQ_PACK_MAGIC || st.version != PACK_VERSION) return CQ_ERR_FORMAT;
    if (!cq_format_nr(st.format)) return CQ_ERR_FORMAT; /* CQ_FORMAT_AUTO is no stored format */
    if (st.n <= 0 || st.k <= 0 || st.seg4 <= 0 || st.seg4 > format_kp4(st.format, st.k)) return CQ_ERR_FORMAT;
    int64_t kp4 = format_kp4(st.format, st.k);
    int64_t group = st.seg4 != kp4 ? 4 * st.seg4 : 0;
    if (geometry(st.format, st.n, st.k, group, h) != CQ_OK || h->nr != st.nr || h->seg4 != st.seg4)
        return CQ_ERR_FORMAT;
    return CQ_OK;
}

int cq_packed_info(const void *packed, int64_t size, int64_t *n, int64_t *k, int64_t *group_size)
{
    cq_pack_header h;
    if (!packed) return CQ_ERR_NULL;
    if (size >= 0 && size < CQ_PACK_HEADER) return CQ_ERR_FORMAT;
    int st = cq_pack_read_header(packed, &h);
    if (st != CQ_OK) return st;
    int64_t group = h.seg4 != h.kp4 ? 4 * h.seg4 : 0;
    if (size >= 0 && size != cq_packed_size(h.format, h.n, h.k, group)) return CQ_ERR_FORMAT;
    if (n) *n = h.n;
    if (k) *k = h.k;
    if (group_size) *group_size = group;
    return h.format;
}

typedef struct {
    const int8_t *q;
    int8_t *packed;
    cq_pack_header h;
    int unpack;
} pack_ctx;

static int32_t load_word(const int8_t *src, int64_t avail)
{
    int32_t v = 0;
    memcpy(&v, src, (size_t)(avail < 4 ? avail : 4)); /* zero padding past k */
    return v;
}

/* One panel, step by step: nr row streams read sequentially, 4*nr contiguous bytes written per
 * step (a row-by-row scatter with a 64-byte stride was 3x slower); then the segment sums. */
static void pack_unit(void *vctx, int64_t p)
{
    pack_ctx *c = (pack_ctx *)vctx;
    const cq_pack_header *h = &c->h;
    const int nr = h->nr;
    const int64_t k = h->k, kp4 = h->kp4, kfull = k / 4, step = 4 * (int64_t)nr;
    int8_t *panel = c->packed + CQ_PACK_HEADER + p * kp4 * step;
    int rows = (int)(h->n - p * nr < nr ? h->n - p * nr : nr);
    const int8_t *src[64];
    for (int j = 0; j < rows; j++) src[j] = c->q + (p * nr + j) * k;
    if (cq_format_is_i4(h->format)) { /* two codes a byte: see cquant.h */
        const int64_t kp8 = kp4 / 2;
        panel = c->packed + CQ_PACK_HEADER + p * kp8 * step;
        if (c->unpack) {
            for (int64_t t = 0; t < kp8; t++)
                for (int j = 0; j < rows; j++)
                    for (int b = 0; b < 4; b++) {
                        uint8_t v = (uint8_t)panel[t * step + 4 * j + b];
                        int64_t k0 = 8 * t + b, k1 = k0 + 4;
                        if (k0 < k) ((int8_t *)src[j])[k0] = (int8_t)(((v & 15) ^ 8) - 8);
                        if (k1 < k) ((int8_t *)src[j])[k1] = (int8_t)((((v >> 4) & 15) ^ 8) - 8);
                    }
            return;
        }
        if (rows < nr) memset(panel, 0, (size_t)(kp8 * step));
        for (int64_t t = 0; t < kp8; t++)
            for (int j = 0; j < rows; j++)
                for (int b = 0; b < 4; b++) {
                    int64_t k0 = 8 * t + b, k1 = k0 + 4;
                    unsigned lo = k0 < k ? (unsigned)src[j][k0] & 15u : 0u;
                    unsigned hi = k1 < k ? (unsigned)src[j][k1] & 15u : 0u;
                    panel[t * step + 4 * j + b] = (int8_t)(uint8_t)(lo | hi << 4);
                }
        goto sums;
    }
    if (c->unpack) {
        for (int64_t t = 0; t < kfull; t++)
            for (int j = 0; j < rows; j++) memcpy((int8_t *)src[j] + 4 * t, panel + t * step + 4 * j, 4);
        if (kfull < kp4)
            for (int j = 0; j < rows; j++)
                memcpy((int8_t *)src[j] + 4 * kfull, panel + kfull * step + 4 * j, (size_t)(k - 4 * kfull));
        return;
    }
    /* blocks of 16 steps: each row gives one 64-byte line, written as 16 words 4*nr bytes apart
     * (a constant-size copy, one mov); the partial last step and missing rows are zero */
    if (rows < nr) memset(panel, 0, (size_t)(kp4 * step));
    int64_t t = 0;
    for (; t + 16 <= kfull; t += 16)
        for (int j = 0; j < rows; j++) {
            const int8_t *sp = src[j] + 4 * t;
            int8_t *dp = panel + t * step + 4 * j;
            for (int i = 0; i < 16; i++) memcpy(dp + i * step, sp + 4 * i, 4);
        }
    for (; t < kp4; t++)
        for (int j = 0; j < rows; j++) {
            int32_t w = load_word(src[j] + 4 * t, t < kfull ? 4 : k - 4 * t);
            memcpy(panel + t * step + 4 * j, &w, 4);
        }
sums:
    if (!h->sums_bytes) return;
    /* int32 values at any alignment (the caller's buffer): stored with memcpy */
    unsigned char *sums = (unsigned char *)c->packed + h->sums_off + 4 * p * h->nseg * nr;
    for (int64_t s = 0; s < h->nseg; s++)
        for (int j = 0; j < nr; j++) {
            uint32_t acc = 0; /* modulo 2^32: only segments short enough for exact int32 use it */
            if (j < rows) {
                int64_t k0 = 4 * s * h->seg4, k1 = k0 + 4 * h->seg4 < k ? k0 + 4 * h->seg4 : k;
                for (int64_t b0 = k0; b0 < k1; b0 += 4096) { /* exact int32 blocks; vectorized */
                    int64_t b1 = b0 + 4096 < k1 ? b0 + 4096 : k1;
                    int32_t part = 0;
                    for (int64_t kk = b0; kk < b1; kk++) part += src[j][kk];
                    acc += (uint32_t)part;
                }
            }
            int32_t v = (int32_t)acc;
            memcpy(sums + 4 * (s * nr + j), &v, sizeof v);
        }
}

static int has_minus128(const int8_t *q, int64_t len)
{
    int bad = 0;
    for (int64_t i = 0; i < len; i++) bad |= (q[i] == -128); /* vectorized by the compiler */
    return bad;
}

static int outside_i4(const int8_t *q, int64_t len)
{
    int bad = 0;
    for (int64_t i = 0; i < len; i++) bad |= (q[i] < -7) | (q[i] > 7);
    return bad;
}

/* Expand steps [t4, t4 + nt4) (both even) of int4 panel rows into the int8 layout of panels of
 * out_nr rows (out_nr <= the int4 panel width): out[((t - t4) * out_nr + j) * 4 + i] = q[out_nr *
 * p_out + j][4t + i]. A byte-wise mask and shift per stored byte; vectorized by the compiler. */
void cq_i4_rows_ref(const uint8_t *src, int64_t stride, int nb, int64_t n, int8_t *out)
{
    for (int64_t j = 0; j < n; j++, src += stride, out += 2 * (int64_t)nb)
        for (int i = 0; i < nb; i++) {
            out[i] = (int8_t)(((src[i] & 15) ^ 8) - 8);
            out[nb + i] = (int8_t)(((src[i] >> 4) ^ 8) - 8);
        }
}

void cq_i4_expand(const cq_pack_header *h, const int8_t *codes, int out_nr, int64_t p_out, int64_t t4,
                  int64_t nt4, int8_t *out, cq_i4_rows_fn rows)
{
    const int nr = h->nr;
    const int64_t col = p_out * out_nr, pin = col / nr, c0 = col % nr, kp8 = h->kp4 / 2;
    if (nt4 < 2) return;
    rows((const uint8_t *)codes + ((pin * kp8 + t4 / 2) * nr + c0) * 4, 4 * (int64_t)nr, 4 * out_nr, nt4 / 2, out);
}

int cq_pack(int format, const int8_t *q, int64_t n, int64_t k, int64_t group_size, void *packed)
{
    pack_ctx c;
    int st = geometry(format, n, k, group_size, &c.h);
    if (st != CQ_OK) return st;
    if (!q || !packed) return CQ_ERR_NULL;
    /* the header is written before the codes are read: the buffers must be apart */
    if (cq_overlap(packed, c.h.sums_off + c.h.sums_bytes, q, n * k)) return CQ_ERR_ALIAS;
    if (cq_format_is_i4(c.h.format) ? outside_i4(q, n * k) : has_minus128(q, n * k)) return CQ_ERR_RANGE;
    c.q = q;
    c.packed = (int8_t *)packed;
    c.unpack = 0;
    memset(packed, 0, CQ_PACK_HEADER);
    memcpy(packed, &c.h, CQ_PACK_STORED);
    /* the gap between the codes and the 64-byte aligned sums */
    int64_t codes_end = CQ_PACK_HEADER + c.h.np * (cq_format_is_i4(c.h.format) ? c.h.kp4 / 2 : c.h.kp4) * 4 * c.h.nr;
    memset(c.packed + codes_end, 0, (size_t)(c.h.sums_off - codes_end));
    cq_parallel_for(c.h.np, (double)n * k < 4.0e6 ? 1 : cq_threads_for((double)n * k, c.h.np), pack_unit, &c);
    return CQ_OK;
}

int cq_unpack(const void *packed, int64_t n, int64_t k, int8_t *q)
{
    if (n <= 0 || k <= 0) return CQ_ERR_SHAPE;
    if (!cq_bytes_ok(n, k, 1)) return CQ_ERR_OVERFLOW;
    if (!packed || !q) return CQ_ERR_NULL;
    pack_ctx c;
    int st = cq_pack_read_header(packed, &c.h);
    if (st != CQ_OK) return st;
    if (c.h.n != n || c.h.k != k) return CQ_ERR_FORMAT;
    if (cq_overlap(q, n * k, packed, c.h.sums_off + c.h.sums_bytes)) return CQ_ERR_ALIAS;
    c.q = q;
    c.packed = (int8_t *)(uintptr_t)packed;
    c.unpack = 1;
    cq_parallel_for(c.h.np, (double)n * k < 4.0e6 ? 1 : cq_threads_for((double)n * k, c.h.np), pack_unit, &c);
    return CQ_OK;
}
