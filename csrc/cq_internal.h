/* cq_internal.h - what the C core's translation units share; not installed, not part of the API.
 *
 * Structure: cq_core.c holds the public entry points (argument checks, blocking, threading) and
 * calls the per-ISA micro-kernels through a cq_kernels table. Each ISA lives in its own file
 * (cq_kernels_scalar.c is the reference and always present; cq_kernels_avx2.c,
 * cq_kernels_avx512.c are compiled with per-function target attributes so the package can be
 * built without -march flags and still run on any x86-64). cq_dispatch.c picks the table. */
#ifndef CQ_INTERNAL_H
#define CQ_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "cquant.h"

/* Packed layout constants (see cquant.h). */
#define CQ_NR 16          /* output rows per panel */
#define CQ_KSTEP 4        /* k per packed step */
#define CQ_PANEL_STEP (CQ_NR * CQ_KSTEP) /* bytes per step of a panel */

/* Largest number of k4 steps summed into one int32 before it is widened to int64 in cq_linear:
 * 32768 steps = 131072 k <= CQ_MAX_K_S32, so an int32 partial sum of codes in [-127,127] is exact. */
#define CQ_CHUNK4 32768

/* Tile heights used by the drivers (all ISAs). */
#define CQ_MR_S8 4        /* rows of activations per int8 micro-kernel call */
#define CQ_MR_F32 6       /* rows of x per float32 micro-kernel call */

typedef struct cq_kernels {
    int isa;
    /* max |x[i]| over n floats into *amax; returns 1 if every x[i] is finite, 0 otherwise
     * (then *amax is unspecified). */
    int (*absmax)(const float *x, int64_t n, float *amax);
    /* q[i] = clamp(round_half_even(x[i] / scale), -127, 127); x finite, scale finite > 0. */
    void (*quantize)(const float *x, int64_t n, float scale, int8_t *q);
    /* Integer tile: for r < mr (1..CQ_MR_S8), j < 16:
     *   s[r][j] = sum_{t < nk4} sum_{i < 4} a[r*lda + 4t + i] * b[(t*16 + j)*4 + i]   (exact)
     * If facc is NULL: acc[r*16 + j] += s[r][j] (int32, the caller keeps the total exact);
     * else facc[r*16 + j] += (float)s[r][j] * ws[j].
     * Codes in [-127, 127]; the true sums fit in int32 (nk4 <= CQ_CHUNK4, or k <= CQ_MAX_K_S32). */
    void (*s8_tile)(int mr, int64_t nk4, const int8_t *a, int64_t lda, const int8_t *b,
                    int32_t *acc, float *facc, const float *ws);
    /* Dequantize nk4 steps of one panel: out[(4t + i)*16 + j] = (float)q[j][4t+i] * ws[j]. */
    void (*f32_dequant)(int64_t nk4, const int8_t *b, const float *ws, float *out);
    /* Float tile: c[r*ldc + j] += sum_{kk < kc} a[r*lda + kk] * bb[kk*16 + j], r < mr (1..CQ_MR_F32),
     * j < 16; bb is 64-byte aligned. */
    void (*f32_tile)(int mr, int64_t kc, const float *a, int64_t lda, const float *bb, float *c,
                     int64_t ldc);
    /* Exact GELU of n floats (y may be x). */
    void (*gelu)(const float *x, int64_t n, float *y);
    /* out[i] = (float)q[i] * scale: dequantize one slice (bit-exact on every path). */
    void (*dequant)(const int8_t *q, int64_t n, float scale, float *out);
    /* GEMVs (one row) read four panels at once: four concurrent weight streams, which one core
     * reads faster than a single stream. Integer: acc[p*16 + j] += sum_{t<nk4,i<4} a[4t+i] *
     * panels[p][(t*16+j)*4+i], exact, nk4 <= CQ_CHUNK4. */
    void (*s8_gemv4)(int64_t nk4, const int8_t *a, const int8_t *const *panels, int32_t *acc);
    /* Weight-only: y[p*16 + j] += ws[p*16 + j] * sum_{t<nk4,i<4} x[4t+i] * panels[p][(t*16+j)*4+i]
     * (x has 4*nk4 readable floats). */
    void (*f32_gemv4)(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws,
                      float *y);
} cq_kernels;

extern const cq_kernels cq_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
#define CQ_X86 1
extern const cq_kernels cq_kernels_avx2;
extern const cq_kernels cq_kernels_avx512;
/* AVX2 kernels the AVX-512 table reuses (defined only when the compiler can target AVX2). */
int cq_absmax_avx2(const float *x, int64_t n, float *amax);
void cq_quantize_avx2(const float *x, int64_t n, float scale, int8_t *q);
void cq_f32_dequant_avx2(int64_t nk4, const int8_t *b, const float *ws, float *out);
void cq_gelu_avx2(const float *x, int64_t n, float *y);
void cq_dequant_avx2(const int8_t *q, int64_t n, float scale, float *out);
void cq_f32_gemv4_avx2(int64_t nk4, const float *x, const int8_t *const *panels, const float *ws,
                       float *y);
#endif

/* GELU of one float, the reference (cq_kernels_scalar.c); SIMD kernels use it for tails. */
float cq_gelu1(float x);

/* Dispatch (cq_dispatch.c): the active table, or NULL if CQUANT_ISA names a path that cannot run
 * (then every kernel entry point returns CQ_ERR_ISA). */
const cq_kernels *cq_active_kernels(void);

/* Thread pool (cq_threads.c). Runs fn(ctx, u) for every u in [0, nunits), each exactly once, on up
 * to `threads` threads (the caller included). Which thread runs which unit must not matter to the
 * result: callers partition output, never a reduction. If the pool is busy with another caller's
 * job, the units run on the calling thread alone. */
typedef void (*cq_unit_fn)(void *ctx, int64_t unit);
void cq_parallel_for(int64_t nunits, int threads, cq_unit_fn fn, void *ctx);
int cq_threads_for(double work, int64_t nunits);

#endif
