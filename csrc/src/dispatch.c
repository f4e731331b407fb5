/* dispatch.c - choose the path once: CPUID feature bits *and* the OS's XSAVE state
 * (XCR0) decide what can run; CQUANT_ISA forces a path. Compiled without any -m flag. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "internal.h"

#if defined(CQ_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
/* Linux hands out the AMX tile state only to a process that asks for it (once). */
static int amx_permitted(void)
{
    static int state = 0; /* 0 unknown, 1 yes, 2 no */
    int st = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (st == 0) {
#if defined(__linux__)
        long r = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
        st = r == 0 ? 1 : 2;
#else
        st = 2;
#endif
        __atomic_store_n(&state, st, __ATOMIC_RELEASE);
    }
    return st == 1;
}
static int cpu_has_uncached(int isa)
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
    if (isa == CQ_ISA_AVXVNNI) {
        unsigned a1, b1, c1, d1;
        __cpuid_count(7, 1, a1, b1, c1, d1);
        (void)b1; (void)c1; (void)d1;
        return avx2 && fma && ((a1 >> 4) & 1);
    }
    if (isa == CQ_ISA_AMX) {
        int amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
        int tile_state = (xcr0 & 0x60000) == 0x60000; /* XTILECFG, XTILEDATA */
        return amx_tile && amx_int8 && tile_state && cpu_has_uncached(CQ_ISA_AVX512VNNI) && amx_permitted();
    }
    if (isa == CQ_ISA_AVX512VNNI || isa == CQ_ISA_AVX512) {
        int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
        int vnni = (c >> 11) & 1;
        int zmm_state = (xcr0 & 0xe6) == 0xe6; /* opmask, ZMM_Hi256, Hi16_ZMM saved by the OS */
        int base = avx2 && fma && f && dq && bw && vl && zmm_state;
        return isa == CQ_ISA_AVX512 ? base : base && vnni;
    }
    return 0;
}
/* Asked once per path and remembered: CPUID traps to the hypervisor in a virtual machine, and the
 * config lookup of every N16K4 call asks for AVX-VNNI (allowed() in registry.c): uncached, that was
 * ~36 us of CPUID exits per call of a (64, 16) layer under KVM, 70% of its time. */
static int cpu_has(int isa)
{
    static int known[8]; /* 0 unknown, 1 yes, 2 no */
    if (isa < 0 || isa >= 8) return 0;
    int st = __atomic_load_n(&known[isa], __ATOMIC_ACQUIRE);
    if (st == 0) {
        st = cpu_has_uncached(isa) ? 1 : 2;
        __atomic_store_n(&known[isa], st, __ATOMIC_RELEASE);
    }
    return st == 1;
}
#else
static int cpu_has(int isa) { (void)isa; return 0; }
#endif

int cq_cpu_has(int isa) { return isa == CQ_ISA_SCALAR || cpu_has(isa); }

/* Compiled into this build: the kernels of a path exist (an old compiler leaves them out). */
static int compiled(int isa)
{
    switch (isa) {
    case CQ_ISA_SCALAR: return 1;
#ifdef CQ_X86
    case CQ_ISA_AVX2: return cq_elementwise_avx2.absmax != NULL;
    case CQ_ISA_AVX512:
    case CQ_ISA_AVX512VNNI:
    case CQ_ISA_AVXVNNI:
    case CQ_ISA_AMX: {
        int n = cq_ukernel_count();
        for (int i = 0; i < n; i++)
            if (cq_ukernel_at(i)->isa == isa) return cq_elementwise_avx2.absmax != NULL;
        return 0;
    }
#endif
    default: return 0;
    }
}

/* Element-wise kernels of a path: AVX2's serve every x86 SIMD path. */
const cq_elementwise *cq_elementwise_for(int isa)
{
#ifdef CQ_X86
    if ((isa == CQ_ISA_AVX512 || isa == CQ_ISA_AVX512VNNI || isa == CQ_ISA_AMX) && cq_elementwise_avx512.absmax)
        return &cq_elementwise_avx512;
    if (isa != CQ_ISA_SCALAR && cq_elementwise_avx2.absmax) return &cq_elementwise_avx2;
#else
    (void)isa;
#endif
    return &cq_elementwise_ref;
}

int cq_isa_supported(int isa)
{
    if (isa == CQ_ISA_SCALAR) return 1;
    return compiled(isa) && cpu_has(isa);
}

const char *cq_isa_name(int isa)
{
    switch (isa) {
    case CQ_ISA_SCALAR: return "scalar";
    case CQ_ISA_AVX2: return "avx2";
    case CQ_ISA_AVX512VNNI: return "avx512vnni";
    case CQ_ISA_AVX512: return "avx512";
    case CQ_ISA_AMX: return "amx";
    case CQ_ISA_AVXVNNI: return "avxvnni";
    default: return "unknown";
    }
}

/* The active path, chosen at first use. g_state tells whether a forced path was refused.
 * Plain int atomics: safe to read while another thread sets. */
static const int BEST_FIRST[] = {CQ_ISA_AMX, CQ_ISA_AVX512VNNI, CQ_ISA_AVX512, CQ_ISA_AVXVNNI, CQ_ISA_AVX2};
static const int ALL_ISAS[] = {CQ_ISA_SCALAR, CQ_ISA_AVX2, CQ_ISA_AVX512VNNI, CQ_ISA_AVX512, CQ_ISA_AMX,
                               CQ_ISA_AVXVNNI};
static volatile int g_active = CQ_ISA_SCALAR;
static volatile int g_state = 0; /* 0 unresolved, 1 ok, 2 forced path unavailable, 3 unknown name */

static int known(int isa) { return isa >= CQ_ISA_SCALAR && isa <= CQ_ISA_AVXVNNI; }

/* The reason the last selection failed (cq_isa_error), "" after one that succeeded. Written and
 * copied under g_err_mu; each reader gets its own copy, so a later failure never changes a string
 * that a caller still holds. */
#define CQ_ISA_ERR_LEN 320
static pthread_mutex_t g_err_mu = PTHREAD_MUTEX_INITIALIZER;
static char g_err[CQ_ISA_ERR_LEN];
static __thread char t_err[CQ_ISA_ERR_LEN];

/* "scalar, avx2, ..." in path order (the order of the header's enum comment). */
static void list_paths(char *buf, size_t size, int supported_only)
{
    static const int ORDER[] = {CQ_ISA_SCALAR, CQ_ISA_AVX2, CQ_ISA_AVXVNNI, CQ_ISA_AVX512, CQ_ISA_AVX512VNNI,
                                CQ_ISA_AMX};
    size_t len = 0;
    buf[0] = '\0';
    for (unsigned i = 0; i < sizeof ORDER / sizeof ORDER[0]; i++) {
        if (supported_only && !cq_isa_supported(ORDER[i])) continue;
        int w = snprintf(buf + len, size - len, "%s%s", len ? ", " : "", cq_isa_name(ORDER[i]));
        if (w < 0 || (size_t)w >= size - len) break;
        len += (size_t)w;
    }
}

/* Record why selecting `isa` (from CQUANT_ISA=env when env is not NULL) failed with status st. */
static void set_error(int st, int isa, const char *env)
{
    char all[96], here[96], who[64], msg[CQ_ISA_ERR_LEN];
    list_paths(all, sizeof all, 0);
    list_paths(here, sizeof here, 1);
    if (env) snprintf(who, sizeof who, "CQUANT_ISA='%.40s'", env);
    else if (known(isa)) snprintf(who, sizeof who, "cq_set_isa(%s)", cq_isa_name(isa));
    else snprintf(who, sizeof who, "cq_set_isa(%d)", isa);
    if (st == CQ_ERR_ARG)
        snprintf(msg, sizeof msg, "%s: unknown path; expected one of %s or auto (available here: %s)", who,
                 all, here);
    else if (!compiled(isa))
        snprintf(msg, sizeof msg, "%s: path not compiled into this build (the compiler could not target it; "
                 "available here: %s)", who, here);
    else
        snprintf(msg, sizeof msg, "%s: this CPU or OS cannot run the path (available here: %s)", who, here);
    pthread_mutex_lock(&g_err_mu);
    memcpy(g_err, msg, sizeof g_err);
    pthread_mutex_unlock(&g_err_mu);
}

static void clear_error(void)
{
    pthread_mutex_lock(&g_err_mu);
    g_err[0] = '\0';
    pthread_mutex_unlock(&g_err_mu);
}

const char *cq_isa_error(void)
{
    cq_active_isa(); /* the first use reads CQUANT_ISA */
    pthread_mutex_lock(&g_err_mu);
    memcpy(t_err, g_err, sizeof t_err);
    pthread_mutex_unlock(&g_err_mu);
    return t_err;
}

static int resolve(int isa)
{
    if (isa == CQ_ISA_AUTO) {
        const char *env = getenv("CQUANT_ISA");
        if (env && *env && strcasecmp(env, "auto") != 0) {
            int want = -2;
            for (unsigned i = 0; i < sizeof ALL_ISAS / sizeof ALL_ISAS[0]; i++)
                if (strcasecmp(env, cq_isa_name(ALL_ISAS[i])) == 0) want = ALL_ISAS[i];
            if (want == -2 || !cq_isa_supported(want)) {
                int st = want == -2 ? CQ_ERR_ARG : CQ_ERR_ISA;
                set_error(st, want, env);
                __atomic_store_n(&g_state, want == -2 ? 3 : 2, __ATOMIC_RELEASE);
                return st;
            }
            isa = want;
        } else {
            isa = CQ_ISA_SCALAR;
            for (unsigned i = 0; i < sizeof BEST_FIRST / sizeof BEST_FIRST[0]; i++)
                if (cq_isa_supported(BEST_FIRST[i])) { isa = BEST_FIRST[i]; break; }
        }
    }
    if (!known(isa)) { set_error(CQ_ERR_ARG, isa, NULL); return CQ_ERR_ARG; }
    if (!cq_isa_supported(isa)) { set_error(CQ_ERR_ISA, isa, NULL); return CQ_ERR_ISA; }
    clear_error();
    __atomic_store_n(&g_active, isa, __ATOMIC_RELEASE);
    __atomic_store_n(&g_state, 1, __ATOMIC_RELEASE);
    return CQ_OK;
}

int cq_active_isa(void)
{
    int st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
    if (st == 0) { resolve(CQ_ISA_AUTO); st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE); }
    if (st == 1) return __atomic_load_n(&g_active, __ATOMIC_ACQUIRE);
    return st == 3 ? CQ_ERR_ARG : CQ_ERR_ISA;
}

int cq_set_isa(int isa) { return resolve(isa); }

int cq_get_isa(void) { return cq_active_isa(); }

int cq_best_format(int64_t n)
{
    int isa = cq_active_isa();
    if (isa < 0) return CQ_ERR_ISA;
    int f = cq_best_format_for(isa);
    int64_t nr = cq_format_nr(f);
    /* padding n to the panel width would waste more than a quarter of the codes */
    if (n > 0 && nr > 16 && 4 * ((nr - n % nr) % nr) > n) f = CQ_FORMAT_N16K4; /* no overflow */
    return f;
}

int cq_best_format_bits(int64_t n, int bits)
{
    if (bits != 8 && bits != 4) return CQ_ERR_ARG;
    int f = cq_best_format(n);
    if (f < 0 || bits == 8) return f;
    return f == CQ_FORMAT_N64K4 ? CQ_FORMAT_N64K8I4 : CQ_FORMAT_N16K8I4;
}
