/* read_checkpoint.c - a cquant checkpoint read from C with no dependency but libcquant: a small
 * safetensors reader (header parse, checks of every offset and size, tensor lookup), then, for each
 * quantized layer the header's metadata lists, cq_pack + cq_linear on the int8 codes it read,
 * compared with the output cquant's Python side computed for the same input.
 *
 *     read_checkpoint MODEL.safetensors REFERENCE.safetensors
 *
 * MODEL is what cquant.save / `cquant quantize` write (README, "Checkpoints"): per quantized layer L
 * the tensors L.weight_q (I8, (N, K), canonical codes), L.weight_scale (F32, 1 / N / N * K/g
 * scales) and optionally L.bias (F32, (N)); the header's __metadata__ holds "cquant.layers", a
 * JSON object: per layer "mode", "granularity", "group_size", "shape" [N, K], "bias", "layout"
 * (and "bits", 8 when absent). REFERENCE (examples/c/write_checkpoint.py) holds, per layer, x.L
 * (F32, (M, K)) and y.L (F32, (M, N)). `make cexamples` writes both and runs this on every ISA path.
 *
 * The safetensors layout: 8 bytes little-endian header length H, H bytes of JSON
 * {"NAME": {"dtype": "F32", "shape": [..], "data_offsets": [BEGIN, END]}, ..., "__metadata__":
 * {"key": "string", ...}}, then the data; offsets are relative to the data, and the tensors must
 * cover it exactly (sorted, no gap, no overlap), each END - BEGIN = product(shape) * dtype size.
 * Exit status: 0 all layers match, 1 a mismatch, 2 usage or a malformed file, 77 no usable ISA path.
 * Build: cc -std=c99 read_checkpoint.c $(pkg-config --cflags --libs cquant) */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cquant.h"

#define MAX_NAME 256
#define MAX_DIMS 8
#define MAX_HEADER ((uint64_t)100 << 20) /* safetensors' own limit */

/* ---- a minimal JSON reader (what a safetensors header needs) ------------------------------- */
typedef struct {
    const char *p, *end;
    const char *file; /* for messages */
    int ok;
} json;

static void jfail(json *j, const char *what)
{
    if (j->ok) fprintf(stderr, "%s: malformed header: %s\n", j->file, what);
    j->ok = 0;
}
static void skip_ws(json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}
static int peek(json *j)
{
    skip_ws(j);
    return j->ok && j->p < j->end ? (unsigned char)*j->p : -1;
}
static int expect(json *j, char c)
{
    if (peek(j) != (unsigned char)c) { jfail(j, "unexpected character"); return 0; }
    j->p++;
    return 1;
}
static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}
static void put_utf8(char *out, size_t *len, size_t cap, unsigned long cp, json *j)
{
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) { b[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { b[0] = (unsigned char)(0xC0 | (cp >> 6)); b[1] = (unsigned char)(0x80 | (cp & 63)); n = 2; }
    else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | (cp >> 12)); b[1] = (unsigned char)(0x80 | ((cp >> 6) & 63));
        b[2] = (unsigned char)(0x80 | (cp & 63)); n = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | (cp >> 18)); b[1] = (unsigned char)(0x80 | ((cp >> 12) & 63));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 63)); b[3] = (unsigned char)(0x80 | (cp & 63)); n = 4;
    }
    if (*len + n >= cap) { jfail(j, "string too long"); return; }
    memcpy(out + *len, b, n);
    *len += n;
}
static unsigned long read_u4(json *j)
{
    unsigned long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = j->p < j->end ? hexval((unsigned char)*j->p) : -1;
        if (h < 0) { jfail(j, "bad \\u escape"); return 0; }
        v = v * 16 + (unsigned long)h;
        j->p++;
    }
    return v;
}
/* A string into out (NUL-terminated, at most cap - 1 bytes; longer is an error); out may be NULL
 * to skip one. Returns its length. */
static size_t parse_string(json *j, char *out, size_t cap)
{
    char dummy[8];
    size_t len = 0;
    int skipping = out == NULL;
    if (skipping) { out = dummy; cap = sizeof dummy; }
    if (!expect(j, '"')) return 0;
    while (j->ok) {
        if (j->p >= j->end) { jfail(j, "unterminated string"); break; }
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"') break;
        if (c < 0x20) { jfail(j, "control character in a string"); break; }
        unsigned long cp = c;
        if (c == '\\') {
            if (j->p >= j->end) { jfail(j, "unterminated escape"); break; }
            c = (unsigned char)*j->p++;
            switch (c) {
            case '"': case '\\': case '/': cp = c; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                cp = read_u4(j);
                if (cp >= 0xD800 && cp < 0xDC00 && j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u') {
                    j->p += 2;
                    unsigned long lo = read_u4(j);
                    if (lo < 0xDC00 || lo > 0xDFFF) { jfail(j, "bad surrogate pair"); break; }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xD800 && cp < 0xE000) { jfail(j, "lone surrogate"); break; }
                break;
            default: jfail(j, "unknown escape"); break;
            }
        }
        if (skipping) continue;
        if (cp < 0x80) {
            if (len + 1 >= cap) { jfail(j, "string too long"); break; }
            out[len++] = (char)cp;
        } else if (c >= 0x80 && cp == c) { /* a raw UTF-8 byte: copied as is */
            if (len + 1 >= cap) { jfail(j, "string too long"); break; }
            out[len++] = (char)c;
        } else {
            put_utf8(out, &len, cap, cp, j);
        }
    }
    out[skipping ? 0 : len] = '\0';
    return len;
}
/* A non-negative integer (offsets, dimensions) that fits in int64_t. */
static int64_t parse_uint(json *j)
{
    int c = peek(j);
    if (c < '0' || c > '9') { jfail(j, "expected a non-negative integer"); return -1; }
    int64_t v = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        int d = *j->p++ - '0';
        if (v > (INT64_MAX - d) / 10) { jfail(j, "integer too large"); return -1; }
        v = v * 10 + d;
    }
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')) { jfail(j, "expected an integer"); return -1; }
    return v;
}
static int match_word(json *j, const char *w)
{
    size_t n = strlen(w);
    if (peek(j) < 0 || (size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0) return 0;
    j->p += n;
    return 1;
}
static void skip_value(json *j, int depth)
{
    int c = peek(j);
    if (depth > 64) { jfail(j, "nested too deeply"); return; }
    if (c == '"') { parse_string(j, NULL, 0); return; }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        if (peek(j) == (unsigned char)close) { j->p++; return; }
        while (j->ok) {
            if (c == '{') { parse_string(j, NULL, 0); expect(j, ':'); }
            skip_value(j, depth + 1);
            if (peek(j) == ',') { j->p++; continue; }
            expect(j, close);
            return;
        }
        return;
    }
    if (match_word(j, "true") || match_word(j, "false") || match_word(j, "null")) return;
    if (c == '-' || (c >= '0' && c <= '9')) {
        if (c == '-') j->p++;
        while (j->p < j->end && strchr("0123456789.eE+-", *j->p)) j->p++;
        return;
    }
    jfail(j, "unexpected value");
}
/* Iterate over an object's members: call with *first = 1; returns 1 with the key in key while there
 * is a member (the caller then reads its value), 0 at the closing brace or on error. */
static int next_member(json *j, int *first, char *key, size_t cap)
{
    if (*first) {
        *first = 0;
        if (!expect(j, '{')) return 0;
        if (peek(j) == '}') { j->p++; return 0; }
    } else {
        if (peek(j) == '}') { j->p++; return 0; }
        if (!expect(j, ',')) return 0;
    }
    parse_string(j, key, cap);
    expect(j, ':');
    return j->ok;
}

/* ---- safetensors ------------------------------------------------------------------------------ */
typedef struct {
    char name[MAX_NAME], dtype[8];
    int ndim;
    int64_t shape[MAX_DIMS], begin, end;
} tensor;
typedef struct {
    const char *path;
    unsigned char *buf; /* the whole file */
    int64_t size;
    const unsigned char *data; /* after the header */
    int64_t data_len;
    tensor *t;
    int nt;
    char *layers_json; /* __metadata__["cquant.layers"], or NULL */
} st_file;

static int64_t dtype_size(const char *d)
{
    static const struct { const char *name; int size; } T[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
        {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (unsigned i = 0; i < sizeof T / sizeof T[0]; i++)
        if (strcmp(d, T[i].name) == 0) return T[i].size;
    return 0;
}

static void parse_tensor(json *j, tensor *t)
{
    int first = 1, seen = 0;
    char key[32];
    while (next_member(j, &first, key, sizeof key)) {
        if (strcmp(key, "dtype") == 0) { parse_string(j, t->dtype, sizeof t->dtype); seen |= 1; }
        else if (strcmp(key, "shape") == 0) {
            expect(j, '[');
            t->ndim = 0;
            if (peek(j) == ']') j->p++;
            else
                while (j->ok) {
                    if (t->ndim == MAX_DIMS) { jfail(j, "too many dimensions"); break; }
                    t->shape[t->ndim++] = parse_uint(j);
                    if (peek(j) == ',') { j->p++; continue; }
                    expect(j, ']');
                    break;
                }
            seen |= 2;
        } else if (strcmp(key, "data_offsets") == 0) {
            expect(j, '[');
            t->begin = parse_uint(j);
            expect(j, ',');
            t->end = parse_uint(j);
            expect(j, ']');
            seen |= 4;
        } else skip_value(j, 1);
    }
    if (j->ok && seen != 7) jfail(j, "a tensor without dtype, shape or data_offsets");
}

static int by_begin(const void *a, const void *b)
{
    const tensor *x = (const tensor *)a, *y = (const tensor *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}

static const tensor *find(const st_file *f, const char *name)
{
    for (int i = 0; i < f->nt; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

static void st_close(st_file *f)
{
    free(f->buf);
    free(f->t);
    free(f->layers_json);
    memset(f, 0, sizeof *f);
}

/* Read and check a whole safetensors file. Returns 0, or 2 with a message. */
static int st_open(st_file *f, const char *path)
{
    memset(f, 0, sizeof *f);
    f->path = path;
    FILE *fp = fopen(path, "rb");
    if (!fp) { perror(path); return 2; }
    size_t cap = 1 << 16, len = 0, got;
    f->buf = (unsigned char *)malloc(cap);
    while (f->buf && (got = fread(f->buf + len, 1, cap - len, fp)) > 0) {
        len += got;
        if (len == cap) {
            unsigned char *nb = cap > SIZE_MAX / 2 ? NULL : (unsigned char *)realloc(f->buf, cap * 2);
            if (!nb) { free(f->buf); f->buf = NULL; break; }
            f->buf = nb;
            cap *= 2;
        }
    }
    int rerr = ferror(fp);
    fclose(fp);
    if (!f->buf || rerr) { fprintf(stderr, "%s: cannot read the file\n", path); st_close(f); return 2; }
    f->size = (int64_t)len;
    if (f->size < 8) { fprintf(stderr, "%s: %lld bytes: too short for a safetensors file\n", path, (long long)f->size); st_close(f); return 2; }
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | f->buf[i];
    if (hl > MAX_HEADER || hl > (uint64_t)(f->size - 8)) {
        fprintf(stderr, "%s: header length %llu does not fit in the file (%lld bytes)\n", path,
                (unsigned long long)hl, (long long)f->size);
        st_close(f);
        return 2;
    }
    f->data = f->buf + 8 + hl;
    f->data_len = f->size - 8 - (int64_t)hl;

    json j = {(const char *)f->buf + 8, (const char *)f->buf + 8 + hl, path, 1};
    int first = 1, cap_t = 0;
    char key[MAX_NAME];
    while (next_member(&j, &first, key, sizeof key)) {
        if (strcmp(key, "__metadata__") == 0) {
            int mfirst = 1;
            char mkey[MAX_NAME];
            while (next_member(&j, &mfirst, mkey, sizeof mkey)) {
                if (strcmp(mkey, "cquant.layers") == 0 && !f->layers_json) {
                    size_t room = (size_t)hl + 1; /* an unescaped string is never longer */
                    f->layers_json = (char *)malloc(room);
                    if (!f->layers_json) { jfail(&j, "out of memory"); break; }
                    parse_string(&j, f->layers_json, room);
                } else if (peek(&j) == '"') parse_string(&j, NULL, 0);
                else jfail(&j, "a metadata value that is not a string");
            }
            continue;
        }
        if (find(f, key)) { jfail(&j, "a tensor name given twice"); break; }
        if (f->nt == cap_t) {
            cap_t = cap_t ? 2 * cap_t : 16;
            tensor *nt = (tensor *)realloc(f->t, sizeof(tensor) * (size_t)cap_t);
            if (!nt) { jfail(&j, "out of memory"); break; }
            f->t = nt;
        }
        tensor *t = &f->t[f->nt++];
        memset(t, 0, sizeof *t);
        memcpy(t->name, key, sizeof t->name);
        parse_tensor(&j, t);
    }
    if (j.ok && peek(&j) != -1) jfail(&j, "text after the header's object");
    if (!j.ok) { st_close(f); return 2; }

    /* every tensor: a known dtype, begin <= end, END - BEGIN = elements * dtype size */
    for (int i = 0; i < f->nt; i++) {
        tensor *t = &f->t[i];
        int64_t esz = dtype_size(t->dtype), bytes = esz;
        const char *bad = esz == 0 ? "unknown dtype" : t->begin > t->end ? "data_offsets begin > end" : NULL;
        for (int d = 0; !bad && d < t->ndim; d++) {
            if (t->shape[d] != 0 && bytes > INT64_MAX / t->shape[d]) bad = "shape too large";
            else bytes *= t->shape[d];
        }
        if (!bad && t->end - t->begin != bytes) bad = "data_offsets do not span shape * dtype size";
        if (!bad && t->end > f->data_len) bad = "data_offsets run past the end of the file";
        if (bad) {
            fprintf(stderr, "%s: tensor '%s' (%s, [%lld, %lld)): %s\n", path, t->name, t->dtype,
                    (long long)t->begin, (long long)t->end, bad);
            st_close(f);
            return 2;
        }
    }
    /* together they cover the data exactly once: sorted by offset, no gap, no overlap */
    tensor *s = f->nt ? (tensor *)malloc(sizeof(tensor) * (size_t)f->nt) : NULL;
    if (f->nt && !s) { fprintf(stderr, "out of memory\n"); st_close(f); return 2; }
    if (f->nt) memcpy(s, f->t, sizeof(tensor) * (size_t)f->nt);
    if (f->nt) qsort(s, (size_t)f->nt, sizeof(tensor), by_begin);
    int64_t at = 0;
    for (int i = 0; i < f->nt; i++) {
        if (s[i].begin != at) {
            fprintf(stderr, "%s: tensor '%s' starts at %lld, expected %lld (%s)\n", path, s[i].name,
                    (long long)s[i].begin, (long long)at, s[i].begin > at ? "a gap" : "overlaps another");
            free(s);
            st_close(f);
            return 2;
        }
        at = s[i].end;
    }
    free(s);
    if (at != f->data_len) {
        fprintf(stderr, "%s: the tensors end at %lld but the data is %lld bytes\n", path, (long long)at,
                (long long)f->data_len);
        st_close(f);
        return 2;
    }
    return 0;
}

/* A tensor by name with the given dtype and shape (ndim dims; -1 in want: any), or NULL with a
 * message. Its bytes are copied into a fresh malloc'd buffer (the data need not be aligned). */
static void *load(const st_file *f, const char *name, const char *dtype, int ndim, const int64_t *want)
{
    const tensor *t = find(f, name);
    if (!t) { fprintf(stderr, "%s: no tensor '%s'\n", f->path, name); return NULL; }
    int ok = strcmp(t->dtype, dtype) == 0 && t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = want[d] < 0 || t->shape[d] == want[d];
    if (!ok) {
        fprintf(stderr, "%s: tensor '%s' is %s with %d dims (", f->path, name, t->dtype, t->ndim);
        for (int d = 0; d < t->ndim; d++) fprintf(stderr, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        fprintf(stderr, "), expected %s (", dtype);
        for (int d = 0; d < ndim; d++) fprintf(stderr, "%s%lld", d ? ", " : "", (long long)want[d]);
        fprintf(stderr, ")\n");
        return NULL;
    }
    void *p = malloc(t->end > t->begin ? (size_t)(t->end - t->begin) : 1);
    if (p) memcpy(p, f->data + t->begin, (size_t)(t->end - t->begin));
    return p;
}

/* ---- the layers ------------------------------------------------------------------------------- */
typedef struct {
    char name[MAX_NAME], mode[16], granularity[16];
    int64_t group_size, n, k, bits;
    int bias;
} layer_spec;

static void parse_layer(json *j, layer_spec *L)
{
    int first = 1;
    char key[32];
    L->group_size = 0; L->n = L->k = -1; L->bits = 8; L->bias = 0;
    L->mode[0] = L->granularity[0] = '\0';
    while (next_member(j, &first, key, sizeof key)) {
        if (strcmp(key, "mode") == 0) parse_string(j, L->mode, sizeof L->mode);
        else if (strcmp(key, "granularity") == 0) parse_string(j, L->granularity, sizeof L->granularity);
        else if (strcmp(key, "group_size") == 0) { if (!match_word(j, "null")) L->group_size = parse_uint(j); }
        else if (strcmp(key, "bits") == 0) L->bits = parse_uint(j);
        else if (strcmp(key, "bias") == 0) {
            if (match_word(j, "true")) L->bias = 1;
            else if (!match_word(j, "false")) jfail(j, "bias is not true/false");
        } else if (strcmp(key, "shape") == 0) {
            expect(j, '['); L->n = parse_uint(j); expect(j, ','); L->k = parse_uint(j); expect(j, ']');
        } else skip_value(j, 1);
    }
}

/* Run one layer from the checkpoint on the reference input; 0 on a match, 1 on a mismatch, 2 on a
 * malformed checkpoint. */
static int run_layer(const st_file *ck, const st_file *ref, const layer_spec *L)
{
    int mode = strcmp(L->mode, "weight_only") == 0 ? CQ_MODE_WEIGHT_ONLY
             : strcmp(L->mode, "dynamic") == 0 ? CQ_MODE_DYNAMIC : -1;
    int scheme = strcmp(L->granularity, "per_tensor") == 0 ? CQ_PER_TENSOR
               : strcmp(L->granularity, "per_channel") == 0 ? CQ_PER_CHANNEL
               : strcmp(L->granularity, "per_group") == 0 ? CQ_PER_GROUP : -1;
    int64_t n = L->n, k = L->k, g = scheme == CQ_PER_GROUP ? L->group_size : 0;
    int64_t ns = cq_num_scales(scheme, n, k, g);
    if (mode < 0 || scheme < 0 || ns < 0 || (L->bits != 8 && L->bits != 4)) {
        fprintf(stderr, "%s: layer '%s': mode '%s', granularity '%s', group_size %lld, shape (%lld, %lld), "
                "bits %lld: not a layer cquant can run (%s)\n", ck->path, L->name, L->mode, L->granularity,
                (long long)g, (long long)n, (long long)k, (long long)L->bits,
                ns < 0 ? cq_strerror((int)ns) : "unknown mode or granularity");
        return 2;
    }
    char name[MAX_NAME + 32];
    int64_t shape_q[2] = {n, k}, shape_s[2] = {ns, -1}, shape_b[1] = {n}, shape_x[2] = {-1, k};
    int rc = 2;
    void *packed = NULL;
    int8_t *q = NULL;
    float *scales = NULL, *bias = NULL, *x = NULL, *yref = NULL, *y = NULL;

    snprintf(name, sizeof name, "%s.weight_q", L->name);
    q = (int8_t *)load(ck, name, "I8", 2, shape_q);
    snprintf(name, sizeof name, "%s.weight_scale", L->name);
    {   /* (1,), (N,) or (N, K/g) */
        const tensor *t = find(ck, name);
        int nd = t ? t->ndim : 1;
        if (scheme == CQ_PER_GROUP && nd == 2) { shape_s[0] = n; shape_s[1] = k / g; }
        scales = (float *)load(ck, name, "F32", nd == 2 ? 2 : 1, shape_s);
    }
    if (L->bias) {
        snprintf(name, sizeof name, "%s.bias", L->name);
        bias = (float *)load(ck, name, "F32", 1, shape_b);
    }
    snprintf(name, sizeof name, "x.%s", L->name);
    x = (float *)load(ref, name, "F32", 2, shape_x);
    const tensor *tx = find(ref, name);
    int64_t m = tx && x ? tx->shape[0] : 0;
    int64_t shape_y[2] = {m, n};
    snprintf(name, sizeof name, "y.%s", L->name);
    yref = (float *)load(ref, name, "F32", 2, shape_y);
    if (!q || !scales || (L->bias && !bias) || !x || !yref) goto out;

    /* pack the canonical codes for this machine's path, check the buffer, run the layer */
    int format = cq_best_format_bits(n, (int)L->bits);
    int64_t psize = format < 0 ? format : cq_packed_size(format, n, k, g);
    if (psize < 0) { fprintf(stderr, "cq_packed_size: %s\n", cq_strerror((int)psize)); goto out; }
    packed = malloc((size_t)psize);
    y = (float *)malloc(sizeof(float) * (size_t)(m * n > 0 ? m * n : 1));
    if (!packed || !y) { fprintf(stderr, "out of memory\n"); goto out; }
    int st = cq_pack(format, q, n, k, g, packed);
    if (st != CQ_OK) {
        fprintf(stderr, "%s: layer '%s': cq_pack: %s\n", ck->path, L->name, cq_strerror(st));
        goto out;
    }
    int64_t pn, pk, pg;
    st = cq_packed_info(packed, psize, &pn, &pk, &pg);
    if (st != format || pn != n || pk != k || pg != g) {
        fprintf(stderr, "cq_packed_info disagrees with the pack\n");
        rc = 1;
        goto out;
    }
    st = cq_linear(mode, x, m, k, packed, scales, scheme, g, n, bias, y);
    if (st != CQ_OK) {
        fprintf(stderr, "%s: layer '%s': cq_linear: %s\n", ck->path, L->name, cq_strerror(st));
        rc = 1;
        goto out;
    }
    /* compare: same integer sums on every path; float32 sums may round differently */
    double ymax = 0.0, err = 0.0;
    int64_t exact = 0;
    for (int64_t i = 0; i < m * n; i++) {
        double d = fabs((double)y[i] - (double)yref[i]);
        if (!(d <= err)) err = d; /* NaN too */
        if (fabs((double)yref[i]) > ymax) ymax = fabs((double)yref[i]);
        exact += y[i] == yref[i];
    }
    double tol = 1e-5 * ymax + 1e-6;
    printf("  layer %-4s %-11s %-11s (%lld x %lld) x (%lld, %lld)^T: max |y - y_python| = %.3g "
           "(tolerance %.3g), %lld of %lld bit-exact, kernel %s\n", L->name, L->mode, L->granularity,
           (long long)m, (long long)k, (long long)n, (long long)k, err, tol, (long long)exact,
           (long long)(m * n), cq_last_kernel());
    rc = err <= tol ? 0 : 1;
out:
    free(packed); free(q); free(scales); free(bias); free(x); free(yref); free(y);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.safetensors REFERENCE.safetensors\n", argv[0]);
        return 2;
    }
    int isa = cq_get_isa();
    if (isa < 0) {
        fprintf(stderr, "kernel path unavailable: %s\n", cq_isa_error());
        return 77;
    }
    st_file ck, ref;
    int rc = st_open(&ck, argv[1]);
    if (rc) return rc;
    rc = st_open(&ref, argv[2]);
    if (rc) { st_close(&ck); return rc; }
    printf("%s: %d tensors, %lld data bytes; path %s\n", argv[1], ck.nt, (long long)ck.data_len,
           cq_isa_name(isa));
    if (!ck.layers_json) {
        fprintf(stderr, "%s: no cquant.layers in the header's __metadata__: not a cquant checkpoint\n", argv[1]);
        rc = 2;
    } else {
        json j = {ck.layers_json, ck.layers_json + strlen(ck.layers_json), argv[1], 1};
        int first = 1, nlayers = 0, bad = 0;
        layer_spec L;
        while (!rc && next_member(&j, &first, L.name, sizeof L.name)) {
            parse_layer(&j, &L);
            if (!j.ok) break;
            int r = run_layer(&ck, &ref, &L);
            nlayers++;
            if (r == 2) rc = 2;
            else bad += r;
        }
        if (j.ok && peek(&j) != -1) jfail(&j, "text after cquant.layers");
        if (!j.ok) rc = 2;
        if (!rc && nlayers == 0) { fprintf(stderr, "%s: no quantized layers\n", argv[1]); rc = 2; }
        if (!rc) {
            printf("%d layer(s), %d mismatch(es)\n", nlayers, bad);
            rc = bad ? 1 : 0;
        }
    }
    st_close(&ck);
    st_close(&ref);
    return rc;
}
