/* test_concurrency.c - the C API from several threads at once: CALLERS threads run cq_linear (both
 * modes) and cq_gemm_s8s8s32 on one shared packed weight while another thread keeps changing
 * cq_set_num_threads; every result must be bit-identical to a single-threaded run (the pool
 * partitions outputs, never reduces across threads). Built and run under ThreadSanitizer by
 * `make asan` (data races), and under ASan/UBSan there too. Ends with "N passed, N failed". */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cquant.h"

#define CALLERS 4
#define ITERS 12
enum { M = 40, K = 300, N = 70 };

static float w[N * K], x[M * K], scales[N], bias[N];
static int8_t q[N * K], *packed;
static float expect[2][M * N];
static int32_t expect_c[M * N];
static int8_t qx[M * K];
static int stop_flag = 0, failures = 0, checks = 0;
static pthread_mutex_t count_mu = PTHREAD_MUTEX_INITIALIZER;

static void record(int ok, const char *what, int caller, int iter)
{
    pthread_mutex_lock(&count_mu);
    checks++;
    if (!ok) {
        failures++;
        fprintf(stderr, "FAIL: %s (caller %d, iteration %d)\n", what, caller, iter);
    }
    pthread_mutex_unlock(&count_mu);
}

static void *caller(void *arg)
{
    int id = (int)(intptr_t)arg;
    float *y = malloc(sizeof(float) * M * N);
    int32_t *c = malloc(sizeof(int32_t) * M * N);
    for (int it = 0; it < ITERS; it++) {
        int mode = (id + it) % 2;
        int st = cq_linear(mode, x, M, K, packed, scales, CQ_PER_CHANNEL, 0, N, bias, y);
        record(st == CQ_OK && memcmp(y, expect[mode], sizeof(float) * M * N) == 0, "cq_linear result", id, it);
        st = cq_gemm_s8s8s32(qx, q, M, N, K, c);
        record(st == CQ_OK && memcmp(c, expect_c, sizeof(int32_t) * M * N) == 0, "cq_gemm_s8s8s32 result", id, it);
    }
    free(y);
    free(c);
    return NULL;
}

static void *changer(void *arg)
{
    (void)arg;
    int n = 0;
    while (!__atomic_load_n(&stop_flag, __ATOMIC_ACQUIRE)) {
        cq_set_num_threads(1 + n % 3);
        (void)cq_get_num_threads();
        (void)cq_get_isa();
        n++;
    }
    return NULL;
}

int main(void)
{
    if (cq_get_isa() < 0) {
        printf("CQUANT_ISA names a path this CPU/build lacks: skipped\n");
        return 77;
    }
    uint32_t s = 7;
    for (int i = 0; i < N * K; i++) { s = s * 1664525u + 1013904223u; w[i] = (float)(s >> 8) / 16777216.0f - 0.5f; }
    for (int i = 0; i < M * K; i++) { s = s * 1664525u + 1013904223u; x[i] = (float)(s >> 8) / 8388608.0f - 1.0f; }
    for (int i = 0; i < N; i++) bias[i] = 0.01f * (float)i;
    float sx[M];
    packed = malloc((size_t)cq_packed_size(CQ_FORMAT_AUTO, N, K, 0));
    if (!packed || cq_quantize(w, N, K, CQ_PER_CHANNEL, 0, q, scales) || cq_pack(CQ_FORMAT_AUTO, q, N, K, 0, packed) ||
        cq_quantize_rows(x, M, K, qx, sx)) {
        fprintf(stderr, "setup failed\n");
        return 1;
    }
    printf("test_concurrency on path %s: %d callers x %d iterations, thread count changing\n",
           cq_isa_name(cq_get_isa()), CALLERS, ITERS);
    cq_set_num_threads(1);
    for (int mode = 0; mode < 2; mode++)
        cq_linear(mode, x, M, K, packed, scales, CQ_PER_CHANNEL, 0, N, bias, expect[mode]);
    cq_gemm_s8s8s32(qx, q, M, N, K, expect_c);
    cq_set_num_threads(2);

    pthread_t th[CALLERS], ch;
    pthread_create(&ch, NULL, changer, NULL);
    for (int i = 0; i < CALLERS; i++) pthread_create(&th[i], NULL, caller, (void *)(intptr_t)i);
    for (int i = 0; i < CALLERS; i++) pthread_join(th[i], NULL);
    __atomic_store_n(&stop_flag, 1, __ATOMIC_RELEASE);
    pthread_join(ch, NULL);
    free(packed);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
