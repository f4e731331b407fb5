/* cq_dispatch.c - choose the kernel table once: CPUID feature bits *and* the OS's XSAVE state
 * (XCR0) decide what can run; CQUANT_ISA forces a path. Compiled without any -m flag. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "cq_internal.h"

#if defined(CQ_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
static int cpu_has(int isa)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* OS saves XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    if (isa == CQ_ISA_AVX2) return avx2 && fma;
    if (isa == CQ_ISA_AVX512VNNI) {
        int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
        int zmm_state = (xcr0 & 0xe6) == 0xe6; /* opmask, ZMM_Hi256, Hi16_ZMM saved by the OS */
        return avx2 && fma && f && bw && vl && vnni && zmm_state;
    }
    return 0;
}
#else
static int cpu_has(int isa) { (void)isa; return 0; }
#endif

static const cq_kernels *table_for(int isa)
{
    switch (isa) {
    case CQ_ISA_SCALAR: return &cq_kernels_scalar;
#ifdef CQ_X86
    case CQ_ISA_AVX2: return cq_kernels_avx2.absmax ? &cq_kernels_avx2 : NULL;
    case CQ_ISA_AVX512VNNI: return cq_kernels_avx512.absmax ? &cq_kernels_avx512 : NULL;
#endif
    default: return NULL;
    }
}

int cq_isa_supported(int isa)
{
    if (isa == CQ_ISA_SCALAR) return 1;
    return table_for(isa) != NULL && cpu_has(isa);
}

const char *cq_isa_name(int isa)
{
    switch (isa) {
    case CQ_ISA_SCALAR: return "scalar";
    case CQ_ISA_AVX2: return "avx2";
    case CQ_ISA_AVX512VNNI: return "avx512vnni";
    default: return "unknown";
    }
}

/* The active table. NULL before first use is resolved by cq_active_kernels(); g_state tells
 * whether a forced path was refused. Pointer-sized atomics: safe to read while another thread sets. */
static const cq_kernels *volatile g_active = NULL;
static volatile int g_state = 0; /* 0 unresolved, 1 ok, 2 forced path unavailable, 3 unknown name */

static int resolve(int isa)
{
    if (isa == CQ_ISA_AUTO) {
        const char *env = getenv("CQUANT_ISA");
        if (env && *env && strcasecmp(env, "auto") != 0) {
            int want = -2;
            for (int i = CQ_ISA_SCALAR; i <= CQ_ISA_AVX512VNNI; i++)
                if (strcasecmp(env, cq_isa_name(i)) == 0) want = i;
            if (want == -2 || !cq_isa_supported(want)) {
                __atomic_store_n(&g_state, want == -2 ? 3 : 2, __ATOMIC_RELEASE);
                return want == -2 ? CQ_ERR_ARG : CQ_ERR_ISA;
            }
            isa = want;
        } else {
            isa = CQ_ISA_SCALAR;
            for (int i = CQ_ISA_AVX512VNNI; i > CQ_ISA_SCALAR; i--)
                if (cq_isa_supported(i)) { isa = i; break; }
        }
    }
    if (isa < CQ_ISA_SCALAR || isa > CQ_ISA_AVX512VNNI) return CQ_ERR_ARG;
    if (!cq_isa_supported(isa)) return CQ_ERR_ISA;
    __atomic_store_n(&g_active, table_for(isa), __ATOMIC_RELEASE);
    __atomic_store_n(&g_state, 1, __ATOMIC_RELEASE);
    return CQ_OK;
}

const cq_kernels *cq_active_kernels(void)
{
    int st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
    if (st == 0) { resolve(CQ_ISA_AUTO); st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE); }
    return st == 1 ? __atomic_load_n(&g_active, __ATOMIC_ACQUIRE) : NULL;
}

int cq_set_isa(int isa) { return resolve(isa); }

int cq_get_isa(void)
{
    const cq_kernels *k = cq_active_kernels();
    if (k) return k->isa;
    return __atomic_load_n(&g_state, __ATOMIC_ACQUIRE) == 3 ? CQ_ERR_ARG : CQ_ERR_ISA;
}
