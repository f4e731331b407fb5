/* cq_threads.c - a small persistent pthread pool.
 *
 * Why not OpenMP: libgomp's pool is not usable in a fork()ed child (multiprocessing's default on
 * Linux), its spin/sleep policy is global to the process (and shared with numpy's BLAS), and
 * concurrent callers from several Python threads would each start a team. This pool is ~150
 * lines: workers spin briefly after a job (a (768x768) GEMV takes ~20 us, a futex wake-up costs
 * about as much) and then sleep on a condition variable; one job runs at a time and a caller that
 * finds the pool busy runs its units itself, so concurrent callers never wait on each other.
 * A pthread_atfork handler resets the pool in a forked child (its workers do not exist there).
 * cq_shutdown() stops and joins the workers; the next job that wants them starts them again.
 * Where the process already runs an OpenMP runtime's team (torch), cq_use_openmp puts the jobs on
 * that team instead (below): then libgomp's spin/sleep policy is the one that counts anyway. */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"

#define CQ_MAX_THREADS 256
#define SPIN_ITERS 3000 /* ~100 us of pause on the machines we measured */

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() ((void)0)
#endif

typedef struct {
    pthread_mutex_t job_lock;  /* held by the caller that owns the pool for one job */
    pthread_mutex_t mu;        /* guards sleeping */
    pthread_cond_t cv;
    int nworkers;              /* worker threads started */
    unsigned generation;       /* bumped to publish a job (atomic) */
    int sleepers;
    /* the job */
    cq_unit_fn fn;
    void *ctx;
    int64_t nunits;
    int participants;          /* workers with id < participants take units */
    int64_t next;              /* next unit (atomic) */
    int pending;               /* workers not yet done with this generation (atomic) */
    int stop;                  /* set (atomic) before a generation that tells the workers to exit */
} pool_t;

static pool_t g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                        PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, 0, 0, 0};
static pthread_t g_threads[CQ_MAX_THREADS]; /* the workers (joinable), guarded by job_lock */
static int g_num_threads = 0; /* 0 = not yet read from the environment (atomic) */
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static unsigned g_start_gen[CQ_MAX_THREADS];

static void run_units(pool_t *p)
{
    int64_t u;
    while ((u = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED)) < p->nunits) p->fn(p->ctx, u);
}

/* ---- an OpenMP runtime's team in place of the pool (cq_use_openmp) ----------------------------
 * A process that runs another library's OpenMP work between cquant's kernels (torch: GELU,
 * LayerNorm, attention between the Linear layers of a model quantized through the adapter) has
 * that runtime's worker threads spin-waiting after every parallel region (libgomp's default), each
 * on a core that one of the pool's workers then shares: measured (2 vCPUs, all-MiniLM-L6-v2 through
 * the adapter) slower than torch's own int8 model. Run on that runtime's team instead, the spinning
 * worker is the one that takes the next job. GOMP_parallel (libgomp; libiomp5 exports it too)
 * runs fn(data) on num_threads threads, the caller among them, and returns when all are done. */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static gomp_parallel_fn g_omp;    /* NULL: the pool; set under job_lock (jobs read it under it) */
static void omp_body(void *v) { run_units((pool_t *)v); }

static void *worker_main(void *arg)
{
    pool_t *p = &g_pool;
    int id = (int)(intptr_t)arg;
    /* The generation current when this worker was created (under job_lock, before the job that
     * created it was published): reading p->generation here could already see that job. */
    unsigned seen = g_start_gen[id];
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE)) == seen && spins < SPIN_ITERS) {
            cpu_relax();
            spins++;
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            p->sleepers++;
            while ((g = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            p->sleepers--;
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) return NULL; /* cq_shutdown joins us */
        if (id < p->participants) run_units(p);
        __atomic_fetch_sub(&p->pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static void atfork_prepare(void) { pthread_mutex_lock(&g_pool.job_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_pool.job_lock); }
static void atfork_child(void)
{
    /* Only the forking thread exists in the child: forget the workers, re-create the locks. */
    pthread_mutex_t m1 = PTHREAD_MUTEX_INITIALIZER, m2 = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    g_pool.job_lock = m1;
    g_pool.mu = m2;
    g_pool.cv = c;
    g_pool.nworkers = 0;
    g_pool.sleepers = 0;
    g_pool.pending = 0;
    g_pool.stop = 0;
    /* an OpenMP runtime's team does not survive fork() either (libgomp's would hang): the pool */
    g_omp = NULL;
}
static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* Start workers up to `want` (job_lock held). Returns how many exist. */
static int grow(pool_t *p, int want)
{
    if (want > CQ_MAX_THREADS - 1) want = CQ_MAX_THREADS - 1;
    if (p->nworkers >= want) return p->nworkers;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* workers never take the process's signals */
    while (p->nworkers < want) {
        g_start_gen[p->nworkers] = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE);
        int rc = pthread_create(&g_threads[p->nworkers], NULL, worker_main, (void *)(intptr_t)p->nworkers);
        if (rc != 0) break; /* run with fewer threads */
        p->nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return p->nworkers;
}

/* Stop and join every worker (job_lock held); the next job starts the ones it needs. */
static void stop_workers(pool_t *p)
{
    int n = p->nworkers;
    if (n == 0) return;
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&p->mu);
    __atomic_fetch_add(&p->generation, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < n; i++) pthread_join(g_threads[i], NULL);
    p->nworkers = 0;
    p->sleepers = 0;
    __atomic_store_n(&p->pending, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&p->stop, 0, __ATOMIC_RELEASE);
}

void cq_parallel_for(int64_t nunits, int threads, cq_unit_fn fn, void *ctx)
{
    if (nunits <= 0) return;
    if (threads > nunits) threads = (int)nunits;
    pool_t *p = &g_pool;
    if (threads <= 1 || pthread_mutex_trylock(&p->job_lock) != 0) {
        for (int64_t u = 0; u < nunits; u++) fn(ctx, u);
        return;
    }
    pthread_once(&g_atfork_once, install_atfork);
    if (g_omp) { /* job_lock held: the runtime cannot change under us */
        p->fn = fn;
        p->ctx = ctx;
        p->nunits = nunits;
        __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
        g_omp(omp_body, p, (unsigned)threads, 0);
        pthread_mutex_unlock(&p->job_lock);
        return;
    }
    /* every started worker wakes for every job: after the thread count was lowered (a call at 64
     * threads, then 2), the extra ones are stopped once, not woken for each job from then on (a
     * small job took 1.8-9.6x as long) */
    if (p->nworkers > threads - 1 && p->nworkers > cq_get_num_threads() - 1) stop_workers(p);
    int workers = grow(p, threads - 1);
    if (workers == 0) {
        pthread_mutex_unlock(&p->job_lock);
        for (int64_t u = 0; u < nunits; u++) fn(ctx, u);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->nunits = nunits;
    p->participants = threads - 1;
    __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&p->pending, workers, __ATOMIC_RELAXED);
    pthread_mutex_lock(&p->mu);
    __atomic_fetch_add(&p->generation, 1, __ATOMIC_ACQ_REL);
    if (p->sleepers) pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    run_units(p);
    int spins = 0;
    while (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) != 0) {
        if (++spins < SPIN_ITERS) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&p->job_lock);
}

/* ---- per-thread scratch (internal.h) ---------------------------------------------------------- */
typedef struct {
    void *p;
    size_t cap;
} scratch_slot;
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
static int g_scratch_ok;
static size_t g_scratch_kept; /* bytes kept by all threads together (atomic), <= CQ_SCRATCH_TOTAL */

static void scratch_free(void *v)
{
    scratch_slot *s = (scratch_slot *)v;
    if (s) {
        if (s->p) __atomic_fetch_sub(&g_scratch_kept, s->cap, __ATOMIC_RELAXED);
        free(s->p);
    }
    free(s);
}
static void scratch_init(void) { g_scratch_ok = pthread_key_create(&g_scratch_key, scratch_free) == 0; }

/* At unload (dlclose) or exit: the key goes, so a thread that exits after the library is unmapped
 * runs no destructor of ours (its kept buffer, if any, is not freed: call cq_shutdown first). */
__attribute__((destructor)) static void scratch_fini(void)
{
    if (g_scratch_ok) {
        scratch_slot *s = (scratch_slot *)pthread_getspecific(g_scratch_key);
        scratch_free(s);
        pthread_setspecific(g_scratch_key, NULL);
        pthread_key_delete(g_scratch_key);
        g_scratch_ok = 0;
    }
}

static scratch_slot *scratch_slot_get(int create)
{
    pthread_once(&g_scratch_once, scratch_init);
    if (!g_scratch_ok) return NULL;
    scratch_slot *s = (scratch_slot *)pthread_getspecific(g_scratch_key);
    if (!s && create) {
        s = (scratch_slot *)calloc(1, sizeof *s);
        if (s && pthread_setspecific(g_scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

void *cq_scratch_get(size_t size, size_t *cap)
{
    scratch_slot *s = scratch_slot_get(0);
    if (s && s->p && s->cap >= size) { /* the kept buffer is big enough: take it */
        void *p = s->p;
        *cap = s->cap;
        __atomic_fetch_sub(&g_scratch_kept, s->cap, __ATOMIC_RELAXED);
        s->p = NULL;
        s->cap = 0;
        return p;
    }
    void *p = cq_alloc64(size);
    *cap = p ? size : 0;
    return p;
}

void cq_scratch_put(void *p, size_t cap)
{
    if (!p) return;
    scratch_slot *s = cap <= CQ_SCRATCH_KEEP ? scratch_slot_get(1) : NULL;
    if (!s || (s->p && s->cap >= cap)) { /* not kept: too big, no slot, or a bigger one is kept */
        free(p);
        return;
    }
    /* the budget of all threads: reserve cap first (a smaller kept buffer it replaces is counted
     * until it is freed below, so the total never exceeds CQ_SCRATCH_TOTAL even for a moment) */
    size_t kept = __atomic_add_fetch(&g_scratch_kept, cap, __ATOMIC_RELAXED);
    if (kept > CQ_SCRATCH_TOTAL) {
        __atomic_fetch_sub(&g_scratch_kept, cap, __ATOMIC_RELAXED);
        free(p);
        return;
    }
    if (s->p) __atomic_fetch_sub(&g_scratch_kept, s->cap, __ATOMIC_RELAXED);
    free(s->p);
    s->p = p;
    s->cap = cap;
}

size_t cq_scratch_kept(void) { return __atomic_load_n(&g_scratch_kept, __ATOMIC_RELAXED); }

int cq_shutdown(void)
{
    pool_t *p = &g_pool;
    scratch_slot *sl = scratch_slot_get(0); /* the calling thread's kept scratch goes too */
    if (sl) {
        scratch_free(sl);
        pthread_setspecific(g_scratch_key, NULL);
    }
    pthread_mutex_lock(&p->job_lock); /* waits for a job in progress; new callers run alone */
    stop_workers(p);
    pthread_mutex_unlock(&p->job_lock);
    return CQ_OK;
}

int cq_use_openmp(const char *path)
{
    gomp_parallel_fn f = NULL;
    if (path) {
        /* RTLD_NOLOAD: only a runtime this process has already loaded is shared, none is loaded.
         * RTLD_NODELETE: from now on it is never unmapped, even when its owner dlcloses it: the
         * team threads our regions may have started live on in it (a test that dlclosed libgomp
         * after using it crashed in one of them under ASan). */
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD | RTLD_NODELETE);
        if (!h) return CQ_ERR_ARG;
        void *sym = dlsym(h, "GOMP_parallel");
        dlclose(h); /* the reference only: the library stays (NODELETE, and its owner holds it) */
        if (!sym) return CQ_ERR_ARG;
        memcpy(&f, &sym, sizeof f); /* object pointer to function pointer without a cast warning */
    }
    /* the handler that sends a fork()ed child back to the pool must exist before the first
     * region: it used to be installed by the first pool job only, so a child whose parent had run
     * no multi-threaded job yet kept this runtime's team, which does not exist there, and hung */
    pthread_once(&g_atfork_once, install_atfork);
    pthread_mutex_lock(&g_pool.job_lock); /* waits for a job in progress */
    __atomic_store_n(&g_omp, f, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_pool.job_lock);
    return CQ_OK;
}

int cq_using_openmp(void) { return __atomic_load_n(&g_omp, __ATOMIC_ACQUIRE) != NULL; }

/* The one rule for CQUANT_NUM_THREADS (cquant's Python import warns with this same function):
 * decimal digits, optionally surrounded by blanks (space, tab, newline, CR), whose value is in
 * 1..CQ_MAX_THREADS. No sign, no other text: "3", " 3 " and "003" are 3; "+3", "3x", "0", "257",
 * "" and "   " are not a thread count. */
static int is_blank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int cq_parse_num_threads(const char *text)
{
    if (!text) return CQ_ERR_NULL;
    const char *p = text;
    while (is_blank(*p)) p++;
    if (*p < '0' || *p > '9') return CQ_ERR_ARG;
    long v = 0;
    while (*p >= '0' && *p <= '9') {
        if (v <= CQ_MAX_THREADS) v = 10 * v + (*p - '0'); /* stops growing once too large */
        p++;
    }
    while (is_blank(*p)) p++;
    if (*p != '\0' || v < 1 || v > CQ_MAX_THREADS) return CQ_ERR_ARG;
    return (int)v;
}

/* OMP_NUM_THREADS, as a scheduler sets it for a worker (Ray: the CPUs the worker holds): its first
 * entry ("4" of "4,2", OpenMP's outermost level), by the rule of cq_parse_num_threads. 0 if unset
 * or not a thread count (then it is ignored, as OpenMP would not use it either). */
static int omp_threads(void)
{
    const char *env = getenv("OMP_NUM_THREADS");
    if (!env || !*env) return 0;
    char first[32];
    size_t n = strcspn(env, ",");
    if (n >= sizeof first) return 0;
    memcpy(first, env, n);
    first[n] = '\0';
    int v = cq_parse_num_threads(first);
    return v > 0 ? v : 0;
}

/* CQUANT_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may use (its affinity mask). */
static int default_threads(void)
{
    const char *env = getenv("CQUANT_NUM_THREADS");
    if (env && *env) {
        int v = cq_parse_num_threads(env);
        if (v > 0) return v;
    }
    int omp = omp_threads();
    if (omp > 0) return omp;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c >= 1) return c > CQ_MAX_THREADS ? CQ_MAX_THREADS : c;
    }
#endif
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c < 1 ? 1 : (c > CQ_MAX_THREADS ? CQ_MAX_THREADS : (int)c);
}

int cq_get_num_threads(void)
{
    int n = __atomic_load_n(&g_num_threads, __ATOMIC_ACQUIRE);
    if (n == 0) {
        n = default_threads();
        int expected = 0;
        __atomic_compare_exchange_n(&g_num_threads, &expected, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        n = __atomic_load_n(&g_num_threads, __ATOMIC_ACQUIRE);
    }
    return n;
}

int cq_set_num_threads(int n)
{
    if (n < 1 || n > CQ_MAX_THREADS) return CQ_ERR_ARG;
    __atomic_store_n(&g_num_threads, n, __ATOMIC_RELEASE);
    return CQ_OK;
}

/* How many threads a job of `work` multiply-adds split in `nunits` units deserves. Waking a sleeping
 * worker costs tens of microseconds (futex), about the whole of a (768 x 768) GEMV (590K MACs,
 * ~20-40 us on one core): measured in `make bench`, 2 threads made that shape slower whenever the
 * worker had gone to sleep between calls, so jobs below 1M multiply-adds stay on the caller. */
int cq_threads_for(double work, int64_t nunits)
{
    int t = cq_get_num_threads();
    if (work < 1.0e6) return 1;
    if (t > nunits) t = (int)nunits;
    return t < 1 ? 1 : t;
}
