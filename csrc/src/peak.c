/* peak.c - cq_peak_gmacs: the measured peak of the active path's multiply instruction on one core,
 * the denominator of `make bench`'s "% of peak" (a figure, never a test). */
#include <time.h>
#include "target.h"

#if defined(CQ_X86) && CQ_CAN_TARGET_AVX2 && !defined(CQ_EMU)
double cq_peak_loop_avx2_int8(int64_t iters);
double cq_peak_loop_avx2_fma(int64_t iters);
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AVX512 && !defined(CQ_EMU)
double cq_peak_loop_vnni(int64_t iters);
double cq_peak_loop_fma512(int64_t iters);
#endif

#if defined(CQ_X86) && CQ_CAN_TARGET_AMX && !defined(CQ_EMU)
double cq_peak_loop_amx(int64_t iters);
#endif

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A scalar loop for the scalar path: one multiply-add per iteration per accumulator. */
static double scalar_loop(int64_t iters, int kind)
{
    volatile float fs = 0.0f;
    volatile int32_t is = 0;
    float f0 = 0, f1 = 0, f2 = 0, f3 = 0;
    int32_t i0 = 0, i1 = 0, i2 = 0, i3 = 0;
    for (int64_t it = 0; it < iters; it++) {
        if (kind) { f0 = f0 * 0.999f + 1.0f; f1 = f1 * 0.999f + 2.0f; f2 = f2 * 0.999f + 3.0f; f3 = f3 * 0.999f + 4.0f; }
        else { i0 += (int32_t)it * 3; i1 += (int32_t)it * 5; i2 += (int32_t)it * 7; i3 += (int32_t)it * 9; }
    }
    fs = f0 + f1 + f2 + f3;
    is = i0 + i1 + i2 + i3;
    (void)fs; (void)is;
    return (double)iters * 4.0;
}

int cq_peak_gmacs(int kind, double *gmacs)
{
    if (kind != 0 && kind != 1) return CQ_ERR_ARG;
    if (!gmacs) return CQ_ERR_NULL;
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    double (*loop)(int64_t) = NULL;
#if defined(CQ_X86) && CQ_CAN_TARGET_AMX && !defined(CQ_EMU)
    if (isa == CQ_ISA_AMX && !kind) loop = cq_peak_loop_amx;
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AVX512 && !defined(CQ_EMU)
    if (!loop && (isa == CQ_ISA_AVX512VNNI || isa == CQ_ISA_AMX)) loop = kind ? cq_peak_loop_fma512 : cq_peak_loop_vnni;
    else if (isa == CQ_ISA_AVX512 && kind) loop = cq_peak_loop_fma512;
#endif
#if defined(CQ_X86) && CQ_CAN_TARGET_AVX2 && !defined(CQ_EMU)
    if (!loop && isa != CQ_ISA_SCALAR) loop = kind ? cq_peak_loop_avx2_fma : cq_peak_loop_avx2_int8;
#endif
    double best = 0.0, start = now();
    int64_t iters = 20000;
    /* the best of runs of >= 5 ms over >= 60 ms in all (long enough for the clock to ramp up) */
    for (int rep = 0; rep < 40 && (rep < 4 || now() - start < 0.06); rep++) {
        double t0 = now();
        double macs = loop ? loop(iters) : scalar_loop(iters * 24, kind);
        double dt = now() - t0;
        if (dt > 0 && macs / dt > best) best = macs / dt;
        if (dt < 5e-3) iters *= 2;
    }
    *gmacs = best / 1e9;
    return CQ_OK;
}
