/* GPU check (tests/gpu/run.sh, on a GPU machine only): the CUDA bf16 conversions equal the
 * CPU reference bit for bit, on every bf16 value and on fp32 values with every rounding case. */
#include <stdint.h>
#include <stdlib.h>

#include "../testlib.h"
#include "cuda.h"
#include "dtype.h"

#define CUDA_OK(call)                                                                         \
    do {                                                                                      \
        int cuda_rc = (call);                                                                 \
        if (cuda_rc) {                                                                        \
            printf("FAIL %s: %s: %s\n", tl_name, #call, es_cuda_error_string(cuda_rc));       \
            tl_case_failed = 1;                                                               \
            return;                                                                           \
        }                                                                                     \
    } while (0)

TEST(cuda_bf16_to_f32_all_values) {
    enum { N = 65536 };
    static uint16_t host_in[N];
    static float host_out[N];
    for (int i = 0; i < N; i++) host_in[i] = (uint16_t)i;
    uint16_t *dev_in;
    float *dev_out;
    CUDA_OK(es_cuda_malloc((void **)&dev_in, sizeof host_in));
    CUDA_OK(es_cuda_malloc((void **)&dev_out, sizeof host_out));
    CUDA_OK(es_cuda_copy_to_device(dev_in, host_in, sizeof host_in));
    CUDA_OK(es_cuda_bf16_to_f32(dev_out, dev_in, N));
    CUDA_OK(es_cuda_copy_to_host(host_out, dev_out, sizeof host_out));
    int mismatches = 0;
    for (int i = 0; i < N; i++) {
        float cpu = es_bf16_to_f32(host_in[i]);
        mismatches += memcmp(&cpu, &host_out[i], 4) != 0;
    }
    CHECKF(mismatches == 0, "%d mismatches", mismatches);
    es_cuda_free(dev_in), es_cuda_free(dev_out);
}

TEST(cuda_f32_to_bf16_rounding) {
    enum { N = 1 << 22 };
    uint32_t *host_in = malloc(N * sizeof *host_in);
    uint16_t *host_out = malloc(N * sizeof *host_out);
    uint64_t state = 12345;
    for (int i = 0; i < N; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t u = (uint32_t)(state >> 32);
        if (i % 3 == 1) u = (u & 0xffff0000u) | 0x8000u; /* ties */
        host_in[i] = u;
    }
    uint32_t specials[] = {0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u};
    memcpy(host_in, specials, sizeof specials);
    float *dev_in;
    uint16_t *dev_out;
    CUDA_OK(es_cuda_malloc((void **)&dev_in, N * sizeof *host_in));
    CUDA_OK(es_cuda_malloc((void **)&dev_out, N * sizeof *host_out));
    CUDA_OK(es_cuda_copy_to_device(dev_in, host_in, N * sizeof *host_in));
    CUDA_OK(es_cuda_f32_to_bf16(dev_out, dev_in, N));
    CUDA_OK(es_cuda_copy_to_host(host_out, dev_out, N * sizeof *host_out));
    int mismatches = 0;
    for (int i = 0; i < N; i++) {
        float value;
        memcpy(&value, &host_in[i], 4);
        mismatches += es_f32_to_bf16(value) != host_out[i];
    }
    CHECKF(mismatches == 0, "%d of %d mismatches", mismatches, N);
    es_cuda_free(dev_in), es_cuda_free(dev_out);
    free(host_in), free(host_out);
}

int main(void) {
    int devices = 0;
    if (es_cuda_device_count(&devices) || devices == 0) {
        printf("SKIP cuda: no CUDA device visible\n");
        return 0;
    }
    RUN(cuda_bf16_to_f32_all_values);
    RUN(cuda_f32_to_bf16_rounding);
    return test_summary();
}
