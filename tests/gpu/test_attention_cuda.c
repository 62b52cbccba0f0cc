/* GPU check (tests/gpu/run.sh): the flash attention kernels behind es_attention_forward and
 * es_attention_backward against the plain fp32 kernels they are checked by
 * (es_cuda_attention_forward_plain, es_cuda_attention_backward_plain), on the shapes the harness's
 * grid is too small for: the 70B teacher's heads (64 query heads, 8 KV heads, hd 128) over 4 x 4096
 * tokens (forward), the student's (12 / 2, hd 128) over 4 x 2048 (backward: a training step's) and
 * with ragged sequences, and hd 64 and 96 with lengths around the tile sizes. nmse <= 2e-5 forward
 * (bf16 q, k, v and probabilities), <= 6e-5 backward (P and dS rounded to bf16 again for the
 * second products); docs/ops-harness.md. Prints SKIP when no CUDA device opens. */
#include <math.h>
#include <stdint.h>

#include "../ops/rng.h"
#include "../testlib.h"
#include "backend.h"
#include "cuda.h"
#include "ops.h"

#define THRESHOLD 2e-5          /* HARNESS_BF16_PRODUCT */
#define BACKWARD_THRESHOLD 6e-5 /* HARNESS_BF16_CHAIN */

/* Values of sd ~1.5 in q·k/sqrt(hd): softmaxes neither flat nor one-hot. */
static void fill(float *x, size_t n, uint64_t seed, double scale) {
    rng r = rng_seeded(seed);
    for (size_t i = 0; i < n; i++) x[i] = (float)((rng_uniform(&r) * 2 - 1) * scale);
}

static void check_shape(const char *tl_name, es_device *dev, const int *lengths, int n_seqs, int H, int KV, int hd) {
    int32_t seq_start[64];
    seq_start[0] = 0;
    for (int s = 0; s < n_seqs; s++) seq_start[s + 1] = seq_start[s] + lengths[s];
    const int T = seq_start[n_seqs];
    const size_t nq = (size_t)T * H * hd, nkv = (size_t)T * KV * hd;
    float *host_q = malloc(nq * sizeof(float)), *host_k = malloc(nkv * sizeof(float)), *host_v = malloc(nkv * sizeof(float));
    float *fast = malloc(nq * sizeof(float)), *plain = malloc(nq * sizeof(float));
    REQUIRE(host_q && host_k && host_v && fast && plain);
    fill(host_q, nq, 1, 1.3), fill(host_k, nkv, 2, 1.3), fill(host_v, nkv, 3, 1.0);
    es_error err = {0};
    float *q, *k, *v, *out_fast, *out_plain;
    int32_t *starts;
    REQUIRE(es_device_alloc(dev, nq * 4, (void **)&q, "q", &err) == ES_OK);
    REQUIRE(es_device_alloc(dev, nkv * 4, (void **)&k, "k", &err) == ES_OK);
    REQUIRE(es_device_alloc(dev, nkv * 4, (void **)&v, "v", &err) == ES_OK);
    REQUIRE(es_device_alloc(dev, nq * 4, (void **)&out_fast, "out", &err) == ES_OK);
    REQUIRE(es_device_alloc(dev, nq * 4, (void **)&out_plain, "out", &err) == ES_OK);
    REQUIRE(es_device_alloc(dev, sizeof seq_start, (void **)&starts, "seq_start", &err) == ES_OK);
    CHECKF(es_device_upload(dev, q, host_q, nq * 4, &err) == ES_OK && es_device_upload(dev, k, host_k, nkv * 4, &err) == ES_OK &&
               es_device_upload(dev, v, host_v, nkv * 4, &err) == ES_OK &&
               es_device_upload(dev, starts, seq_start, sizeof seq_start, &err) == ES_OK,
           "%s", err.msg);
    int rc = es_attention_forward(dev, out_fast, q, k, v, starts, n_seqs, H, KV, hd);
    if (rc) es_device_take_error(dev, &err);
    CHECKF(rc == ES_OK, "flash: %s", err.msg);
    rc = es_cuda_attention_forward_plain(dev, out_plain, q, k, v, starts, n_seqs, H, KV, hd);
    if (rc) es_device_take_error(dev, &err);
    CHECKF(rc == ES_OK, "plain: %s", err.msg);
    CHECKF(es_device_download(dev, fast, out_fast, nq * 4, &err) == ES_OK && es_device_download(dev, plain, out_plain, nq * 4, &err) == ES_OK,
           "%s", err.msg);
    double diff = 0, ref = 0;
    size_t bad = 0;
    for (size_t i = 0; i < nq; i++) {
        if (!isfinite(fast[i])) bad++;
        diff += ((double)fast[i] - plain[i]) * ((double)fast[i] - plain[i]), ref += (double)plain[i] * plain[i];
    }
    const double nmse = ref > 0 ? diff / ref : diff;
    printf("  attention T=%d seqs=%d H=%d KV=%d hd=%d: flash vs plain nmse %.2e\n", T, n_seqs, H, KV, hd, nmse);
    CHECKF(bad == 0 && nmse <= THRESHOLD, "T=%d H=%d KV=%d hd=%d: nmse %.3g (threshold %g), %zu non-finite", T, H, KV, hd, nmse,
           THRESHOLD, bad);
    es_device_free(dev, q, nq * 4), es_device_free(dev, k, nkv * 4), es_device_free(dev, v, nkv * 4);
    es_device_free(dev, out_fast, nq * 4), es_device_free(dev, out_plain, nq * 4), es_device_free(dev, starts, sizeof seq_start);
    free(host_q), free(host_k), free(host_v), free(fast), free(plain);
}

static double nmse_of(const float *got, const float *want, size_t n, size_t *bad) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) ++*bad;
        diff += ((double)got[i] - want[i]) * ((double)got[i] - want[i]), ref += (double)want[i] * want[i];
    }
    return ref > 0 ? diff / ref : diff;
}

/* dq, dk, dv of the flash backward against the plain one's. */
static void check_backward(const char *tl_name, es_device *dev, const int *lengths, int n_seqs, int H, int KV, int hd) {
    int32_t seq_start[64];
    seq_start[0] = 0;
    for (int s = 0; s < n_seqs; s++) seq_start[s + 1] = seq_start[s] + lengths[s];
    const int T = seq_start[n_seqs];
    const size_t n[3] = {(size_t)T * H * hd, (size_t)T * KV * hd, (size_t)T * KV * hd}; /* dq, dk, dv */
    const char *names[3] = {"dq", "dk", "dv"};
    float *host_in[4], *host_fast[3], *host_plain[3];             /* q, k, v, dout */
    const size_t in_n[4] = {n[0], n[1], n[1], n[0]};
    float *in[4], *fast[3], *plain[3];
    int32_t *starts;
    es_error err = {0};
    for (int i = 0; i < 4; i++) {
        REQUIRE((host_in[i] = malloc(in_n[i] * sizeof(float))));
        fill(host_in[i], in_n[i], 11 + (uint64_t)i, i == 0 || i == 1 ? 1.3 : 1.0);
        REQUIRE(es_device_alloc(dev, in_n[i] * 4, (void **)&in[i], "input", &err) == ES_OK);
        CHECKF(es_device_upload(dev, in[i], host_in[i], in_n[i] * 4, &err) == ES_OK, "%s", err.msg);
    }
    for (int i = 0; i < 3; i++) {
        REQUIRE((host_fast[i] = malloc(n[i] * sizeof(float))) && (host_plain[i] = malloc(n[i] * sizeof(float))));
        REQUIRE(es_device_alloc(dev, n[i] * 4, (void **)&fast[i], names[i], &err) == ES_OK);
        REQUIRE(es_device_alloc(dev, n[i] * 4, (void **)&plain[i], names[i], &err) == ES_OK);
    }
    REQUIRE(es_device_alloc(dev, sizeof seq_start, (void **)&starts, "seq_start", &err) == ES_OK);
    CHECKF(es_device_upload(dev, starts, seq_start, sizeof seq_start, &err) == ES_OK, "%s", err.msg);
    int rc = es_attention_backward(dev, fast[0], fast[1], fast[2], in[3], in[0], in[1], in[2], starts, n_seqs, H, KV, hd);
    if (rc) es_device_take_error(dev, &err);
    CHECKF(rc == ES_OK, "flash backward: %s", err.msg);
    rc = es_cuda_attention_backward_plain(dev, plain[0], plain[1], plain[2], in[3], in[0], in[1], in[2], starts, n_seqs, H, KV, hd);
    if (rc) es_device_take_error(dev, &err);
    CHECKF(rc == ES_OK, "plain backward: %s", err.msg);
    for (int i = 0; i < 3; i++) {
        CHECKF(es_device_download(dev, host_fast[i], fast[i], n[i] * 4, &err) == ES_OK &&
                   es_device_download(dev, host_plain[i], plain[i], n[i] * 4, &err) == ES_OK,
               "%s", err.msg);
        size_t bad = 0;
        const double nmse = nmse_of(host_fast[i], host_plain[i], n[i], &bad);
        printf("  attention backward T=%d seqs=%d H=%d KV=%d hd=%d: %s flash vs plain nmse %.2e\n", T, n_seqs, H, KV, hd, names[i], nmse);
        CHECKF(bad == 0 && nmse <= BACKWARD_THRESHOLD, "T=%d H=%d KV=%d hd=%d %s: nmse %.3g (threshold %g), %zu non-finite", T, H, KV,
               hd, names[i], nmse, BACKWARD_THRESHOLD, bad);
    }
    for (int i = 0; i < 4; i++) es_device_free(dev, in[i], in_n[i] * 4), free(host_in[i]);
    for (int i = 0; i < 3; i++) {
        es_device_free(dev, fast[i], n[i] * 4), es_device_free(dev, plain[i], n[i] * 4);
        free(host_fast[i]), free(host_plain[i]);
    }
    es_device_free(dev, starts, sizeof seq_start);
}

TEST(cuda_flash_attention_matches_plain) {
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    es_device *dev = NULL;
    es_error err = {0};
    if (es_device_open(&dev, &options, &err)) SKIP("no CUDA device: %s", err.msg);
    static const int teacher[] = {4096, 4096, 4096, 4096};
    check_shape(tl_name, dev, teacher, 4, 64, 8, 128);
    static const int ragged[] = {1, 129, 0, 2000, 64, 300, 2, 127, 4095};
    check_shape(tl_name, dev, ragged, 9, 12, 2, 128);
    static const int around_tiles[] = {63, 64, 65, 127, 128, 129, 255, 256, 257};
    check_shape(tl_name, dev, around_tiles, 9, 8, 4, 64);
    check_shape(tl_name, dev, around_tiles, 9, 4, 1, 96);
    es_device_close(dev);
}

TEST(cuda_flash_attention_backward_matches_plain) {
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    es_device *dev = NULL;
    es_error err = {0};
    if (es_device_open(&dev, &options, &err)) SKIP("no CUDA device: %s", err.msg);
    static const int student[] = {2048, 2048, 2048, 2048};
    check_backward(tl_name, dev, student, 4, 12, 2, 128);
    static const int ragged[] = {1, 129, 0, 700, 64, 300, 2, 127};
    check_backward(tl_name, dev, ragged, 8, 12, 2, 128);
    static const int around_tiles[] = {63, 64, 65, 127, 128, 129, 255, 256, 257};
    check_backward(tl_name, dev, around_tiles, 9, 8, 4, 64);
    check_backward(tl_name, dev, around_tiles, 9, 4, 4, 96);
    es_device_close(dev);
}

int main(void) {
    RUN(cuda_flash_attention_matches_plain);
    RUN(cuda_flash_attention_backward_matches_plain);
    return test_summary();
}
