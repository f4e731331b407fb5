/*
 * cquant.h - public C API of cquant: symmetric int8 quantization and int8 linear kernels for CPUs.
 *
 * Self-contained C99; safe to include from C++ (extern "C"). Every function returns an int status
 * (CQ_OK == 0, negative on error; cq_strerror() gives the text) unless documented otherwise. No
 * function aborts or prints. All arrays are dense, row-major and owned by the caller; the library
 * never keeps a pointer after a call returns. Sizes are int64_t; a size whose byte count would not
 * fit in int64_t / size_t is refused with CQ_ERR_OVERFLOW, never wrapped.
 *
 * Numerics (see DESIGN.md section 2): codes are in [-127, 127]; scale of a slice = max|w| / 127
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
#define CQ_VERSION_MINOR 1
#define CQ_VERSION_PATCH 0
#define CQ_VERSION_STRING "0.1.0"

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
enum cq_status {
    CQ_OK = 0,
    CQ_ERR_NULL = -1,         /* a required pointer is NULL */
    CQ_ERR_SHAPE = -2,        /* a size is <= 0 where it must be positive, or sizes disagree */
    CQ_ERR_GROUP = -3,        /* group_size is not a positive multiple of 4 dividing k */
    CQ_ERR_NONFINITE = -4,    /* NaN or Inf in a weight */
    CQ_ERR_OVERFLOW = -5,     /* a size whose byte count or whose int32 sums would overflow */
    CQ_ERR_NOMEM = -6,        /* out of memory */
    CQ_ERR_ISA = -7,          /* the requested instruction set is not available */
    CQ_ERR_RANGE = -8,        /* an int8 code of -128 where codes must be in [-127, 127] */
    CQ_ERR_ARG = -9,          /* an unknown enum value (scheme, mode, isa) */
    CQ_ERR_VERSION = -10      /* reserved: mismatched library / header version */
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
    CQ_ISA_AVX512VNNI = 2    /* AVX-512 F/BW/VL + VNNI */
};

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
 * case-insensitive); kernels then return CQ_ERR_ISA until cq_set_isa succeeds. */
int cq_get_isa(void);
/* Name of a path ("scalar", "avx2", "avx512vnni"), or "unknown". */
const char *cq_isa_name(int isa);
/* 1 if the path is compiled into this build and this CPU and OS support it, else 0. */
int cq_isa_supported(int isa);
/* Force a path (CQ_ISA_AUTO re-reads CQUANT_ISA, then picks the best). CQ_ERR_ISA if unsupported;
 * CQ_ERR_ARG for an unknown value, or for CQUANT_ISA naming an unknown path. */
int cq_set_isa(int isa);
/* Number of threads kernels use (>= 1). Default: CQUANT_NUM_THREADS, else the CPUs available. */
int cq_get_num_threads(void);
/* Set it (n >= 1, at most 256; CQ_ERR_ARG otherwise). Safe while other threads run kernels. */
int cq_set_num_threads(int n);

/* ---- quantization ------------------------------------------------------------------------- */
/* Number of scales the scheme needs for an (n, k) tensor, or a negative status if the arguments
 * are invalid (CQ_ERR_SHAPE, CQ_ERR_GROUP, CQ_ERR_ARG). group_size is ignored unless CQ_PER_GROUP. */
int64_t cq_num_scales(int scheme, int64_t n, int64_t k, int64_t group_size);

/* Quantize w (n, k) float32 to q (n, k) int8 and scales (cq_num_scales elements).
 * CQ_ERR_NONFINITE if w holds NaN or Inf (q and scales are then unspecified). */
int cq_quantize(const float *w, int64_t n, int64_t k, int scheme, int64_t group_size,
                int8_t *q, float *scales);

/* Dequantize: out (n, k) = float32(q) * scale of its slice. */
int cq_dequantize(const int8_t *q, const float *scales, int64_t n, int64_t k, int scheme,
                  int64_t group_size, float *out);

/* Quantize each row of x (m, k) by the same rule as CQ_PER_CHANNEL, for activations: a row holding
 * NaN or Inf gets scale NaN and codes 0 (so outputs computed from it are NaN), other rows are
 * unaffected. q is (m, k), scales (m). */
int cq_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scales);

/* ---- packed weight layout ------------------------------------------------------------------
 * The linear kernels read the weight codes in one ISA-independent packed layout, made once at
 * quantization time: output rows in panels of 16; inside a panel, k in steps of 4; for each step,
 * 16 rows x 4 consecutive k codes (64 bytes). n is padded to a multiple of 16 and k to a multiple
 * of 4 with zero codes:  packed[((p * kp4 + t) * 16 + j) * 4 + i] = q[16p + j][4t + i]
 * with kp4 = ceil(k / 4). The same packed array serves every ISA path. */
int64_t cq_packed_size(int64_t n, int64_t k); /* bytes, or a negative status */
/* Pack canonical codes q (n, k). CQ_ERR_RANGE if any code is -128 (q is validated, packed is then
 * unspecified). */
int cq_pack(const int8_t *q, int64_t n, int64_t k, int8_t *packed);
/* Inverse of cq_pack. */
int cq_unpack(const int8_t *packed, int64_t n, int64_t k, int8_t *q);

/* ---- kernels --------------------------------------------------------------------------------- */
/* c (m, n) int32 = a (m, k) int8 times b (n, k) int8 transposed, exactly.
 * Codes must be in [-127, 127] (CQ_ERR_RANGE otherwise); k <= CQ_MAX_K_S32 (CQ_ERR_OVERFLOW). */
int cq_gemm_s8s8s32(const int8_t *a, const int8_t *b, int64_t m, int64_t n, int64_t k, int32_t *c);

/* y (m, n) float32 = x (m, k) float32 through a linear layer with packed int8 weight (n, k),
 * scales (cq_num_scales(scheme, n, k, group_size)), optional bias (n) (NULL for none).
 *   CQ_MODE_WEIGHT_ONLY: y = x @ (q * scale)^T + bias, float32 accumulation.
 *   CQ_MODE_DYNAMIC:     each row of x quantized (cq_quantize_rows); exact integer sums per scale
 *                        group; y = sum_g acc_g * sw_g * sx + bias.
 * m may be 0 (nothing is done). NaN/Inf in a row of x makes that row of y non-finite only.
 * packed must come from cq_pack (codes in [-127, 127]); otherwise results are unspecified but
 * memory-safe. */
int cq_linear(int mode, const float *x, int64_t m, int64_t k, const int8_t *packed,
              const float *scales, int scheme, int64_t group_size, int64_t n,
              const float *bias, float *y);

/* ---- float32 helpers for the layers around the linear ones ------------------------------------ */
/* y[i] = x[i] / 2 * (1 + erf(x[i] / sqrt(2)))  (exact GELU, as BERT uses it), n >= 0 elements;
 * y may be x (in place). Absolute error <= 1e-6 + 3e-7 * |x| against a double-precision reference
 * on every path; NaN stays NaN, +-Inf gives +Inf / 0. */
int cq_gelu(const float *x, int64_t n, float *y);

/* Layer normalization of each row of x (m, k): y = (x - mean) / sqrt(var + eps) * gamma + beta,
 * biased variance; gamma and beta (k) may be NULL (1 and 0). eps >= 0. y may be x. */
int cq_layer_norm(const float *x, int64_t m, int64_t k, const float *gamma, const float *beta,
                  float eps, float *y);

#ifdef __cplusplus
}
#endif
#endif /* CQUANT_H */
