/*
 * cquant.h - public C API of cquant: symmetric int8 quantization and int8 linear kernels for CPUs.
 *
 * Self-contained C99; safe to include from C++ (extern "C"). Every function returns an int status
 * (CQ_OK == 0, negative on error; cq_strerror() gives the text) unless documented otherwise. No
 * function aborts or prints. All arrays are dense, row-major and owned by the caller; the library
 * never keeps a pointer after a call returns. Sizes are int64_t; a size whose byte count would not
 * fit in int64_t / size_t is refused with CQ_ERR_OVERFLOW, never wrapped.
 *
 * Numerics (README, "Numerics"): codes are in [-127, 127]; scale of a slice = max|w| / 127
 * (float32); an all-zero slice has scale 1; q = clamp(round_half_even(w / scale), -127, 127) with the
 * division in float32. Every ISA path gives bit-identical codes and bit-identical integer sums.
 *
 * Thread safety: every function may be called from several threads at once. Kernels run on an
 * internal pool of cq_get_num_threads() threads; results do not depend on the thread count.
 */
#ifndef CQUANT_H
#define CQUANT_H

#ifndef CQ_CDEF /* the cffi bridge preprocesses this header with CQ_CDEF defined */
#include <stdint.h>
#endif

#define CQ_VERSION_MAJOR 0
#define CQ_VERSION_MINOR 3
#define CQ_VERSION_PATCH 0
#define CQ_VERSION_STRING "0.3.0"

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
enum cq_status {
    CQ_OK = 0,
    CQ_ERR_NULL = -1,         /* a required pointer is NULL */
    CQ_ERR_SHAPE = -2,        /* a size is <= 0 where it must be positive, or sizes disagree */
    CQ_ERR_GROUP = -3,        /* group_size is not a positive multiple of 4 dividing k */
    CQ_ERR_NONFINITE = -4,    /* NaN or Inf in a weight (or in cq_linear_ex's x_mul) */
    CQ_ERR_OVERFLOW = -5,     /* a size whose byte count or whose int32 sums would overflow */
    CQ_ERR_NOMEM = -6,        /* out of memory */
    CQ_ERR_ISA = -7,          /* the requested instruction set is not available */
    CQ_ERR_RANGE = -8,        /* an int8 code of -128 where codes must be in [-127, 127] */
    CQ_ERR_ARG = -9,          /* an unknown enum value (scheme, mode, isa, format, peak kind) or eps < 0 */
    CQ_ERR_VERSION = -10,     /* reserved: mismatched library / header version */
    CQ_ERR_FORMAT = -11,      /* a packed buffer that is not one (bad header), or packed for
                                 another shape or scale group */
    CQ_ERR_ALIAS = -12        /* an output buffer overlaps an input that the function reads
                                 (cq_linear: y with x, scales, bias or the packed weight) */
};

/* Weight quantization schemes (granularity of the scales). */
enum cq_scheme {
    CQ_PER_TENSOR = 0,   /* one scale for the whole (n, k) tensor: scales has 1 element */
    CQ_PER_CHANNEL = 1,  /* one scale per output row: scales has n elements */
    CQ_PER_GROUP = 2     /* one scale per group_size consecutive columns of a row: n * (k / group_size) */
};

/* Compute modes of cq_linear. */
enum cq_mode {
    CQ_MODE_WEIGHT_ONLY = 0, /* float32 x times dequantized int8 weight, float32 accumulation */
    CQ_MODE_DYNAMIC = 1      /* x quantized per row at run time, int8 x int8 -> exact integer sums */
};

/* Instruction-set paths. */
enum cq_isa {
    CQ_ISA_AUTO = -1,        /* best available, or the one named by the CQUANT_ISA environment variable */
    CQ_ISA_SCALAR = 0,       /* portable C: the reference */
    CQ_ISA_AVX2 = 1,         /* AVX2 + FMA */
    CQ_ISA_AVX512VNNI = 2,   /* AVX-512 F/BW/DQ/VL + VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4) */
    CQ_ISA_AVX512 = 3,       /* AVX-512 F/BW/DQ/VL without VNNI (Skylake-SP) */
    CQ_ISA_AMX = 4,          /* avx512vnni + AMX-INT8 tiles (Sapphire Rapids, Granite Rapids) */
    CQ_ISA_AVXVNNI = 5       /* avx2 + AVX-VNNI, 256-bit vpdpbusd without AVX-512 (Alder Lake, Zen 5) */
};
/* Paths are ordered scalar < avx2 < avxvnni < avx512 < avx512vnni < amx (the enum values keep their
 * ABI numbers): a path runs the kernels of the paths below it where it has none of its own, except
 * that the avxvnni kernels run only where the CPU has AVX-VNNI (Skylake-SP's avx512 does not). */

/* Largest k for which an int8 x int8 dot product of codes in [-127, 127] always fits in int32:
 * floor((2^31 - 1) / (127 * 127)). cq_gemm_s8s8s32 refuses larger k; cq_linear has no limit
 * (it accumulates chunks of k in int64). */
#define CQ_MAX_K_S32 133144

/* Library version "MAJOR.MINOR.PATCH" (static string). */
const char *cq_version(void);
/* Human-readable text of a status code (static string; never NULL). */
const char *cq_strerror(int status);

/* ---- instruction set and threads ---------------------------------------------------------- */
/* The path in use (an enum cq_isa value >= 0). Chosen at first use. If CQUANT_ISA names a path that
 * cannot run here: CQ_ERR_ISA, or CQ_ERR_ARG for a name that is no path at all (names are
 * case-insensitive); kernels then return CQ_ERR_ISA until cq_set_isa succeeds, and cq_isa_error()
 * says why. */
int cq_get_isa(void);
/* Why the last selection of a path failed (CQUANT_ISA at first use, or cq_set_isa), as one line
 * for a log, e.g. "CQUANT_ISA='avx9': unknown path; expected one of scalar, avx2, avxvnni, avx512,
 * avx512vnni, amx or auto (available here: scalar, avx2)"; "" when the last selection succeeded
 * (or none has been made). Never NULL. The text is a copy owned by the calling thread, valid until
 * that thread's next call of cq_isa_error. */
const char *cq_isa_error(void);
/* Name of a path ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"), or "unknown". */
const char *cq_isa_name(int isa);
/* 1 if the path is compiled into this build and this CPU and OS support it, else 0. */
int cq_isa_supported(int isa);
/* Force a path (CQ_ISA_AUTO re-reads CQUANT_ISA, then picks the best). CQ_ERR_ISA if unsupported;
 * CQ_ERR_ARG for an unknown value, or for CQUANT_ISA naming an unknown path. */
int cq_set_isa(int isa);
/* Number of threads kernels use (>= 1). Default: CQUANT_NUM_THREADS when cq_parse_num_threads
 * accepts it, else OMP_NUM_THREADS by the same rule (its first entry: Ray and other engines set it
 * to a worker's CPUs), else the CPUs available (at most 256). */
int cq_get_num_threads(void);
/* The thread count a CQUANT_NUM_THREADS value names: decimal digits, optionally surrounded by
 * blanks, in 1..256 (" 3 " is 3; "+3", "3x", "0", "257" and "" are not). CQ_ERR_ARG otherwise,
 * CQ_ERR_NULL for NULL. The library reads the variable with this function. */
int cq_parse_num_threads(const char *text);
/* Set it (n >= 1, at most 256; CQ_ERR_ARG otherwise). Safe while other threads run kernels. */
int cq_set_num_threads(int n);
/* Stop and join the worker threads of the internal pool (e.g. before dlclose or at the end of a
 * program that checks for leaked threads). Waits for a job in progress to finish; a kernel that
 * another thread calls meanwhile runs on that thread alone. Safe to call more than once and when no
 * pool was started; kernels called afterwards still work and start the pool again when they need
 * it. Returns CQ_OK. */
int cq_shutdown(void);
/* Run the kernels' parallel loops on the thread team of an OpenMP runtime this process has already
 * loaded (`path`: the shared library, e.g. torch's bundled libgomp.so.1; it must export
 * GOMP_parallel, as libgomp and libiomp5 do) instead of the internal pool: where the process runs
 * OpenMP work between cquant's kernels, that runtime's workers spin-wait on the cores the pool's
 * workers would need. NULL: back to the internal pool. Never loads a library: CQ_ERR_ARG if `path`
 * is not loaded or lacks the symbol (the setting is then unchanged). A runtime once accepted is
 * never unmapped (RTLD_NODELETE: the team threads live in it). A fork()ed child goes back to the
 * pool. Results do not depend on it. Waits for a job in progress. */
int cq_use_openmp(const char *path);
/* 1 while an OpenMP runtime's team runs the parallel loops (cq_use_openmp), else 0. */
int cq_using_openmp(void);

/* ---- quantization ------------------------------------------------------------------------- */
/* Number of scales the scheme needs for an (n, k) tensor, or a negative status if the arguments
 * are invalid (CQ_ERR_SHAPE, CQ_ERR_GROUP, CQ_ERR_ARG). group_size is ignored unless CQ_PER_GROUP. */
int64_t cq_num_scales(int scheme, int64_t n, int64_t k, int64_t group_size);

/* Quantize w (n, k) float32 to q (n, k) int8 and scales (cq_num_scales elements).
 * CQ_ERR_NONFINITE if w holds NaN or Inf (q and scales are then unspecified); CQ_ERR_ALIAS if q,
 * scales and w overlap. */
int cq_quantize(const float *w, int64_t n, int64_t k, int scheme, int64_t group_size,
                int8_t *q, float *scales);

/* As cq_quantize with codes of `bits` bits: 8 (cq_quantize) or 4: scale = max|w| / 7 (1 for an
 * all-zero slice), q = clamp(round_half_even(w / scale), -7, 7) in int8 storage (pack them with an
 * int4 format). CQ_ERR_ARG for other bits. */
int cq_quantize_bits(int bits, const float *w, int64_t n, int64_t k, int scheme, int64_t group_size,
                     int8_t *q, float *scales);

/* Dequantize: out (n, k) = float32(q) * scale of its slice. CQ_ERR_RANGE if q holds -128,
 * CQ_ERR_ALIAS if out overlaps q or scales (nothing written then). */
int cq_dequantize(const int8_t *q, const float *scales, int64_t n, int64_t k, int scheme,
                  int64_t group_size, float *out);

/* Quantize each row of x (m, k) by the same rule as CQ_PER_CHANNEL, for activations: a row holding
 * NaN or Inf gets scale NaN and codes 0 (so outputs computed from it are NaN), other rows are
 * unaffected. q is (m, k), scales (m). */
/* CQ_ERR_ALIAS if q, scales and x overlap. */
int cq_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scales);

/* ---- packed weights ---------------------------------------------------------------------------
 * The linear kernels read the weight codes in a packed format made once at quantization time; the
 * canonical (n, k) codes are what checkpoints hold, so a weight can be repacked for whatever format
 * is best on the machine that loads it. A packed buffer is self-describing:
 *   bytes [0, 64)   header: magic "CQPK", layout version, format, nr, n, k, ... (read it with
 *                   cq_packed_info; never rely on its fields directly)
 *   codes           output rows in panels of nr (the format's width: 16 or 64); inside a panel, k in
 *                   steps of 4; per step nr rows x 4 consecutive codes:
 *                     codes[((p * kp4 + t) * nr + j) * 4 + i] = q[nr*p + j][4t + i],  kp4 = ceil(k/4),
 *                   rows past n and k past its end are zero codes
 *   column sums     (N64K4 only, 64-byte aligned after the codes) int32, per panel, per segment
 *                   of k (the scale group for per-group weights, all of k otherwise), per row of
 *                   the panel: the sum of that row's codes over the segment. The AVX-512 VNNI
 *                   kernels read activations as u8 (x + 128) and subtract 128 * sum.
 * Every format runs on every path (the scalar reference reads any of them); the best one for this
 * CPU and n is cq_best_format(n). */
enum cq_format {
    CQ_FORMAT_AUTO = 0,   /* cq_pack / cq_packed_size: cq_best_format(n) */
    CQ_FORMAT_N16K4 = 1,  /* panels of 16 rows: the AVX2 and scalar kernels */
    CQ_FORMAT_N64K4 = 2,  /* panels of 64 rows: the AVX-512 kernels (4 zmm of int32 per row) */
    CQ_FORMAT_N16K8I4 = 3, /* int4 codes in [-7, 7], two per byte, panels of 16 rows (below) */
    CQ_FORMAT_N64K8I4 = 4  /* int4, panels of 64 rows, with column sums as N64K4 */
};
/* int4 formats: k in steps of 8 (kp8 = ceil(k/8), padded with zero codes); per step, nr rows x 4
 * bytes; byte b of row j holds two 4-bit two's complement codes:
 *   codes[((p * kp8 + t) * nr + j) * 4 + b] = (q[nr*p+j][8t+b] & 15) | (q[nr*p+j][8t+4+b] & 15) << 4
 * (low nibble: k = 8t + b, high nibble: k = 8t + 4 + b), so a byte-wise mask or shift of one step
 * gives two steps of 4 consecutive codes, the int8 layout. Codes must lie in [-7, 7] (cq_pack:
 * CQ_ERR_RANGE otherwise; cq_quantize_bits(4, ...) makes them); group_size must be a multiple of 8.
 * The kernels expand a block of steps to int8 in registers or L1, so integer sums stay exact on
 * every path. */
/* The best format for a weight with n output rows on the active path (an enum cq_format value
 * > 0), or CQ_ERR_ISA: the widest panels the path's kernels read, unless padding n to them would
 * waste more than a quarter of the codes (then panels of 16, so quantized layers stay ~4x smaller;
 * they run on the AVX-VNNI or AVX2 kernels). n <= 0: the best format for large n. */
int cq_best_format(int64_t n);
/* The best format for codes of `bits` (8 or 4) bits: cq_best_format(n) for 8; for 4, the int4
 * format of the same panel width. CQ_ERR_ARG for other bits. */
int cq_best_format_bits(int64_t n, int bits);
/* Bytes of a packed (n, k) weight in `format`, whose column sums run over segments of group_size
 * columns (0: one segment, for per-tensor / per-channel scales; else as cq_num_scales requires).
 * Negative status on bad arguments. */
int64_t cq_packed_size(int format, int64_t n, int64_t k, int64_t group_size);
/* Pack canonical codes q (n, k). CQ_ERR_RANGE if any code is -128 (packed is then unspecified);
 * CQ_ERR_ALIAS if packed (cq_packed_size bytes) overlaps q (nothing written). */
int cq_pack(int format, const int8_t *q, int64_t n, int64_t k, int64_t group_size, void *packed);
/* Inverse of cq_pack; n and k must be the packed ones (CQ_ERR_FORMAT otherwise); CQ_ERR_ALIAS if q
 * overlaps the packed buffer. */
int cq_unpack(const void *packed, int64_t n, int64_t k, int8_t *q);
/* Read a packed buffer's header: its format (> 0) is returned, and n, k, group_size (0 for one
 * segment) stored where the pointers are not NULL; CQ_ERR_FORMAT if it is not a packed buffer of
 * `size` bytes (size < 0: the size is not checked). */
int cq_packed_info(const void *packed, int64_t size, int64_t *n, int64_t *k, int64_t *group_size);

/* ---- kernels --------------------------------------------------------------------------------- */
/* c (m, n) int32 = a (m, k) int8 times b (n, k) int8 transposed, exactly.
 * Codes must be in [-127, 127] (CQ_ERR_RANGE otherwise); k <= CQ_MAX_K_S32 (CQ_ERR_OVERFLOW);
 * c overlapping a or b: CQ_ERR_ALIAS. */
int cq_gemm_s8s8s32(const int8_t *a, const int8_t *b, int64_t m, int64_t n, int64_t k, int32_t *c);

/* y (m, n) float32 = x (m, k) float32 through a linear layer with packed int8 weight (n, k),
 * scales (cq_num_scales(scheme, n, k, group_size)), optional bias (n) (NULL for none).
 *   CQ_MODE_WEIGHT_ONLY: y = x @ (q * scale)^T + bias, float32 accumulation.
 *   CQ_MODE_DYNAMIC:     each row of x quantized (cq_quantize_rows); exact integer sums per scale
 *                        group; y = sum_g acc_g * (sx * sw_g) + bias (one fma per group; sx * sw
 *                        capped at FLT_MAX, so an exact sum of 0 gives 0, never NaN).
 * m may be 0 (nothing is done). NaN/Inf in a row of x makes that row of y non-finite only.
 * packed must come from cq_pack for this (n, k) and group_size (per-group scales: the same
 * group_size; otherwise 0), CQ_ERR_FORMAT if its header says otherwise. cq_linear takes no buffer
 * size and trusts a valid header: check a buffer from an untrusted source (a file) with
 * cq_packed_info(packed, size, ...) first, which also verifies its byte size. A format other than cq_best_format() still runs
 * (on a slower kernel: see cq_last_kernel).
 * y must not overlap x, scales, bias or packed: not in place (y == x), not partly; CQ_ERR_ALIAS
 * otherwise (nothing is written). Inputs may overlap each other. */
int cq_linear(int mode, const float *x, int64_t m, int64_t k, const void *packed,
              const float *scales, int scheme, int64_t group_size, int64_t n,
              const float *bias, float *y);

/* cq_linear with three activation options (cq_linear is this with NULL, 0, 0):
 *   x_mul (k floats, or NULL): the layer's input is x * x_mul (each column j of x times x_mul[j],
 *     the float32 product), applied inside the activation quantizer in dynamic mode (no extra pass
 *     over x) and by one pre-scaled copy of x in weight-only mode: SmoothQuant's 1 / s where it
 *     could not be folded into the preceding layer. Must be finite (CQ_ERR_NONFINITE otherwise).
 *   x_hadamard: 0, or b, a power of two >= 2 dividing k (CQ_ERR_ARG otherwise): the layer's input
 *     is then v = x * x_mul (or x) rotated by the unnormalised Walsh-Hadamard transform of each
 *     block of b consecutive columns, in this order of float32 operations: for h = 1, 2, 4, ...,
 *     b / 2, each pair (i, i + h) with i % (2 h) < h becomes (v[i] + v[i + h], v[i] - v[i + h]).
 *     Bit-identical on every path; applied in the activation quantizer's pass (dynamic mode) or the
 *     transformed copy (weight-only). The weight must have been rotated to match (W H / b for the
 *     same blocks, up to the factors the caller moves into x_mul): rotation spreads an outlier
 *     channel over its block, so per-row int8 scales fit every value (QuaRot-style). A row whose
 *     rotated values overflow float32 is treated as a non-finite row (NaN outputs).
 *   x_scale: 0 for per-row dynamic scales; > 0 (finite) for static activations, dynamic mode
 *     only: every row is quantized with this scale, codes clamp(round_half_even(x / x_scale),
 *     -127, 127), and y = acc * (x_scale * sw) + b. A row of x holding NaN/Inf still gives a
 *     non-finite row of y. CQ_ERR_ARG for a negative, NaN or infinite x_scale or weight-only mode.
 * x_mul must not overlap y (CQ_ERR_ALIAS). */
int cq_linear_ex(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                 const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                 const float *x_mul, int64_t x_hadamard, float x_scale, float *y);

/* cq_linear_ex followed by an element-wise op on y, post: CQ_POST_NONE (cq_linear_ex) or
 * CQ_POST_GELU (y = cq_gelu(y): BERT's FFN input layer). The op runs on each block of outputs as
 * soon as the kernel has finished it (in cache), not as a second pass over y; the result is bit
 * for bit cq_linear_ex then cq_gelu on the same path. CQ_ERR_ARG for another post. */
#define CQ_POST_NONE 0
#define CQ_POST_GELU 1
int cq_linear_post(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                   const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                   const float *x_mul, int64_t x_hadamard, float x_scale, int post, float *y);

/* cq_linear_ex, then y = LayerNorm(y + residual * residual_mul) per row (m x n), as
 * cq_add_layer_norm_ex(y, residual, residual_mul, m, n, gamma, beta, eps, y): BERT's output blocks.
 * Where the kernel finishes whole rows (dynamic mode, M >= 2) the add + LayerNorm runs on each
 * block of rows while it is in cache, not as a second pass over y; the result is bit for bit the
 * two calls on the same path. residual (m x n) is required (CQ_ERR_NULL); residual_mul, gamma, beta
 * (n) may be NULL; eps >= 0 (CQ_ERR_ARG). y must not overlap x, residual, residual_mul, gamma, beta
 * or the weight's arrays (CQ_ERR_ALIAS). */
int cq_linear_add_ln(int mode, const float *x, int64_t m, int64_t k, const void *packed,
                     const float *scales, int scheme, int64_t group_size, int64_t n, const float *bias,
                     const float *x_mul, int64_t x_hadamard, float x_scale, const float *residual,
                     const float *residual_mul, const float *gamma, const float *beta, float eps, float *y);

/* cq_linear_multi: count (1 .. CQ_MULTI_MAX) linears on the same input x (m x k), e.g. attention's
 * query, key and value projections, with one activation pass for all (quantization, x_mul,
 * x_hadamard, x_scale: as cq_linear_ex; done once where the weights' kernels read the same
 * activation layout, which they do for the same k, scheme and packed format), then each weight's
 * product: y[i] (m x n[i]) = what cq_linear_ex(mode, x, m, k, packed[i], scales[i], scheme,
 * group_size, n[i], bias ? bias[i] : NULL, x_mul, x_hadamard, x_scale, y[i]) gives, bit for bit.
 * bias may be NULL (no bias anywhere) or hold NULL entries. Every check of every linear is made
 * before anything is written; no y[i] may overlap x, x_mul, another linear's inputs or another y
 * (CQ_ERR_ALIAS). cq_last_kernel names the last linear's kernel. */
#define CQ_MULTI_MAX 64
int cq_linear_multi(int mode, const float *x, int64_t m, int64_t k, int count, const void *const *packed,
                    const float *const *scales, int scheme, int64_t group_size, const int64_t *n,
                    const float *const *bias, const float *x_mul, int64_t x_hadamard, float x_scale,
                    float *const *y);

/* Name of the micro-kernel the calling thread's last cq_linear / cq_gemm_s8s8s32 ran, e.g.
 * "qd8_f32_qc8w_gemm_6x64c4_avx512vnni" (type, tile, ISA); "" before any call. Static string. A call
 * that fails its checks, or has m == 0, runs nothing and leaves it unchanged. */
const char *cq_last_kernel(void);

/* Quantize rows as cq_quantize_rows, storing u8 codes q + 128 (what the u8 kernels read). */
int cq_quantize_rows_u8(const float *x, int64_t m, int64_t k, uint8_t *q, float *scales);

/* Peak multiply-accumulates per second of one core, in GMAC/s, measured now on the calling thread by
 * a short register-only loop (~60 ms) of the active path's int8 dot-product instruction (kind 0:
 * tdpbssd on amx, vpdpbusd zmm on avx512vnni, vpmaddubsw ymm below) or float32 FMA (kind 1).
 * Stored in *gmacs. For benchmarks. CQ_ERR_ARG for another kind, CQ_ERR_NULL for gmacs NULL,
 * CQ_ERR_ISA if no path can be used. The avx512 and avxvnni paths measure vpmaddubsw ymm. */
int cq_peak_gmacs(int kind, double *gmacs);

/* ---- float32 helpers for the layers around the linear ones ------------------------------------ */
/* y[i] = x[i] / 2 * (1 + erf(x[i] / sqrt(2)))  (exact GELU, as BERT uses it), n >= 0 elements;
 * y may be x (in place); any other overlap: CQ_ERR_ALIAS. Absolute error <= 1e-6 + 3e-7 * |x| against a double-precision reference
 * on every path; NaN stays NaN, +-Inf gives +Inf / 0. */
int cq_gelu(const float *x, int64_t n, float *y);

/* Layer normalization of each row of x (m, k): y = (x - mean) / sqrt(var + eps) * gamma + beta,
 * biased variance; gamma and beta (k) may be NULL (1 and 0). eps >= 0. y may be x; y overlapping
 * x otherwise, or gamma / beta: CQ_ERR_ALIAS. */
int cq_layer_norm(const float *x, int64_t m, int64_t k, const float *gamma, const float *beta,
                  float eps, float *y);

/* y = LayerNorm(x + residual) per row of (m, k), as cq_layer_norm, in one call (residual NULL:
 * cq_layer_norm). y may be x or residual (in place); any other overlap of y with x, residual, gamma
 * or beta: CQ_ERR_ALIAS. */
int cq_add_layer_norm(const float *x, const float *residual, int64_t m, int64_t k, const float *gamma,
                      const float *beta, float eps, float *y);

/* cq_add_layer_norm with the residual's columns scaled: y = LayerNorm(x + residual * residual_mul)
 * (the product residual[i] * residual_mul[i % k] rounded to float32, then the sum), residual_mul
 * (k) or NULL (cq_add_layer_norm). A block whose residual stream was divided by residual_mul
 * upstream (SmoothQuant folded into the LayerNorm that produced it: cquant.smoothing) adds the
 * unscaled residual back in the same pass. residual_mul without residual: CQ_ERR_NULL; y
 * overlapping residual_mul: CQ_ERR_ALIAS. */
int cq_add_layer_norm_ex(const float *x, const float *residual, const float *residual_mul, int64_t m,
                         int64_t k, const float *gamma, const float *beta, float eps, float *y);

/* Softmax of each row of x (m, k), in place: x[r] = softmax(x[r] * scale + bias row), the maximum
 * subtracted first, float32. bias (NULL: none) is an additive mask with one row of k per
 * rows_per_bias consecutive rows of x: row r uses bias[(r / rows_per_bias) * k ...] (attention
 * scores (B, heads, T, T) with a (B, T) key mask: rows_per_bias = heads * T; rows_per_bias >= 1
 * when bias is given, else CQ_ERR_SHAPE). k >= 1, m >= 0. A row with a NaN, or whose values are
 * all -Inf, becomes all NaN (as torch); exp of values more than 87 below the row's maximum is 0.
 * Relative error a few float32 ulps against a double-precision softmax of the float32 sums.
 * CQ_ERR_ALIAS if the bias rows overlap x. */
int cq_softmax_rows(float *x, int64_t m, int64_t k, const float *bias, int64_t rows_per_bias, float scale);

/* Multi-head scaled dot-product attention (BERT self-attention after its projections):
 * for each batch b and head h, O = softmax(Q K^T * scale + mask_bias[b]) V, where row t of Q, K, V
 * and O are element (b, t, h, d): q[(b*seq + t)*ld + h*head_dim + d] (k, v likewise, sharing ld;
 * out with row stride ldo), ld and ldo >= heads * head_dim (ld = 3 * heads * head_dim reads a
 * fused QKV projection). mask_bias (batch, seq) is added to the scores of every query row of its
 * batch (0 for tokens, -Inf or a large negative number for padding), or NULL. The softmax is
 * cq_softmax_rows'. out overlapping q, k, v or mask_bias: CQ_ERR_ALIAS. CQ_ERR_NOMEM if its scratch
 * (about (3 * head_dim + 40) * seq floats per unit of work) cannot be allocated. */
int cq_attention(const float *q, const float *k, const float *v, int64_t ld, int64_t batch, int64_t seq,
                 int64_t heads, int64_t head_dim, const float *mask_bias, float scale, float *out, int64_t ldo);

#ifdef __cplusplus
}
#endif
#endif /* CQUANT_H */
