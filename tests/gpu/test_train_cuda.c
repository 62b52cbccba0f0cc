/* GPU check (tests/gpu/run.sh): the golden training step of tiny-qwen2 (the one tests/unit/
 * test_train_step.c checks on the CPU) on the CUDA device: the loss and its two terms within 1e-2
 * relative of Hugging Face's fp32 step, every gradient within max |ours − golden| / max |golden| <=
 * 5e-2 (bf16 working weights and bf16 tensor-core inputs in every product, against fp32 goldens:
 * docs/engine.md "Training on CUDA"), and two AdamW steps on the device's own gradients against
 * the same steps on the CPU. Prints one SKIP when no CUDA device opens. */
#include <math.h>
#include <stdint.h>

#include "../testlib.h"
#include "ops.h"
#include "safetensors.h"
#include "train.h"

#define LOSS_TOLERANCE 1e-2
#define GRAD_TOLERANCE 5e-2

static const float *f32(const es_safetensors *st, const char *name) {
    const es_tensor *t = es_safetensors_find(st, name);
    return t && t->dtype == ES_DT_F32 ? (const float *)t->data : NULL;
}

static double normalised_error(const float *a, const float *b, size_t n) {
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - b[i])), scale = fmax(scale, fabs((double)b[i]));
    return scale > 0 ? worst / scale : worst;
}

static void check_golden_step(const char *tl_name, const char *fixtures) {
    char model_dir[4096], golden_path[4200];
    snprintf(model_dir, sizeof model_dir, "%s/models/tiny-qwen2", fixtures);
    snprintf(golden_path, sizeof golden_path, "%s/golden_train_step.safetensors", model_dir);
    es_safetensors *golden = NULL;
    es_error err = {0};
    if (es_safetensors_open(golden_path, &golden, &err)) SKIP("no golden fixture (%s)", err.msg);
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    es_device *dev;
    if (es_device_open(&dev, &options, &err)) SKIP("no CUDA device: %s", err.msg);
    train_model tm;
    const int mapped[1] = {2};
    enum { B = 2, L = 24, T = B * L };
    REQUIRE(train_model_init(&tm, dev, model_dir, mapped, 1, 1.0f, 0.5f, 0, T, L, 0, &err) == 0);
    const es_tensor *ids_tensor = es_safetensors_find(golden, "input_ids");
    REQUIRE(ids_tensor && ids_tensor->dtype == ES_DT_I64 && es_tensor_numel(ids_tensor) == T);
    const int64_t *ids64 = ids_tensor->data;
    const float *mask_f = f32(golden, "mask"), *target = f32(golden, "target");
    REQUIRE(mask_f && target);
    int32_t ids[T], labels[T], seq_start[B + 1] = {0, L, 2 * L};
    uint8_t mask[T];
    int64_t aligned = 0;
    for (int t = 0; t < T; t++) {
        ids[t] = (int32_t)ids64[t];
        labels[t] = t % L == L - 1 ? -1 : (int32_t)ids64[t + 1];
        mask[t] = mask_f[t] != 0;
        aligned += mask[t];
    }
    float *targets[1] = {(float *)target};
    align_batch batch = {T, B, seq_start, ids, labels, mask, targets, T, aligned, B * (L - 1), NULL};
    train_sums sums;
    REQUIRE(train_forward_backward(&tm, &batch, 1, 1.0f, NULL, NULL, &sums, &err) == 0);
    const double latent = sums.latent[0] / (double)aligned, ce = sums.ce / (B * (L - 1)), loss = latent + 0.5 * ce;
    const float *want_loss = f32(golden, "loss"), *want_latent = f32(golden, "latent_mse"), *want_ce = f32(golden, "ce");
    REQUIRE(want_loss && want_latent && want_ce);
    CHECKF(fabs(loss / want_loss[0] - 1) < LOSS_TOLERANCE, "loss %.9g vs %.9g", loss, want_loss[0]);
    CHECKF(fabs(latent / want_latent[0] - 1) < LOSS_TOLERANCE, "latent %.9g vs %.9g", latent, want_latent[0]);
    CHECKF(fabs(ce / want_ce[0] - 1) < LOSS_TOLERANCE, "ce %.9g vs %.9g", ce, want_ce[0]);

    const es_params *m = &tm.params;
    float *grads = malloc(m->arena_floats * sizeof *grads);
    REQUIRE(grads && es_device_download(dev, grads, tm.grads.arena, m->arena_floats * sizeof *grads, &err) == 0);
    double worst = 0;
    char worst_name[160] = "";
    for (int i = 0; i < m->n_tensors; i++) {
        const es_named_tensor *t = &m->tensors[i];
        char name[160];
        snprintf(name, sizeof name, "grad/%s", t->name);
        const es_tensor *want = es_safetensors_find(golden, name);
        CHECKF(want != NULL, "%s missing in the golden", name);
        if (!want) continue;
        const float *grad = grads + (t->data - m->arena);
        const int cols = t->ndim == 2 ? (int)t->shape[1] : 1;
        const char *rows_name = !strcmp(t->name, "model.embed_tokens.weight") ? "embed_rows"
                                : !strcmp(t->name, "lm_head.weight")          ? "lm_head_rows"
                                                                              : NULL;
        double error;
        if (rows_name) {
            const es_tensor *rows = es_safetensors_find(golden, rows_name);
            REQUIRE(rows && rows->dtype == ES_DT_I64);
            const size_t n_rows = es_tensor_numel(rows);
            float *picked = malloc(n_rows * cols * sizeof *picked);
            for (size_t r = 0; r < n_rows; r++)
                memcpy(picked + r * cols, grad + ((const int64_t *)rows->data)[r] * cols, cols * sizeof *picked);
            error = normalised_error(picked, want->data, n_rows * cols);
            free(picked);
        } else {
            error = normalised_error(grad, want->data, es_tensor_numel(want));
        }
        CHECKF(error <= GRAD_TOLERANCE, "%s: normalised gradient error %.3g (tolerance %g)", t->name, error, GRAD_TOLERANCE);
        if (error > worst || isnan(error)) worst = error, snprintf(worst_name, sizeof worst_name, "%s", t->name);
    }
    printf("  cuda golden step: loss %.8f (HF %.8f), worst normalised gradient error %.2e (%s)\n", loss, want_loss[0], worst,
           worst_name);

    /* Two AdamW steps on these gradients on the device (master, moments and the bf16 working
     * copy in one pass) against the same two steps on the host's reference arithmetic. */
    const size_t n = m->arena_floats;
    float *params = malloc(n * sizeof *params), *mom = calloc(n, sizeof *mom), *vel = calloc(n, sizeof *vel);
    float *device_params = malloc(n * sizeof *device_params);
    REQUIRE(params && mom && vel && device_params);
    REQUIRE(es_device_download(dev, params, m->arena, n * sizeof *params, &err) == 0);
    float *d_m, *d_v;
    REQUIRE(es_device_alloc(dev, n * sizeof(float), (void **)&d_m, "moments", &err) == 0);
    REQUIRE(es_device_alloc(dev, n * sizeof(float), (void **)&d_v, "moments", &err) == 0);
    REQUIRE(es_device_zero(dev, d_m, n * sizeof(float), &err) == 0 && es_device_zero(dev, d_v, n * sizeof(float), &err) == 0);
    es_adamw_config config = {1e-3, 0.9, 0.95, 1e-8, 0.1};
    for (int step = 1; step <= 2; step++)
        CHECK(es_adamw_update(dev, m->arena, tm.working.arena, tm.grads.arena, d_m, d_v, n, step, 1e-3, &config) == 0);
    REQUIRE(es_device_download(dev, device_params, m->arena, n * sizeof *device_params, &err) == 0);
    es_device_options cpu_options = {.kind = ES_DEVICE_CPU, .threads = 2};
    es_device *cpu;
    REQUIRE(es_device_open(&cpu, &cpu_options, &err) == 0);
    for (int step = 1; step <= 2; step++) CHECK(es_adamw_update(cpu, params, NULL, grads, mom, vel, n, step, 1e-3, &config) == 0);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += memcmp(&params[i], &device_params[i], sizeof *params) != 0;
    CHECKF(differ == 0, "after two AdamW steps %zu of %zu parameters differ from the CPU's bits", differ, n);
    printf("  cuda AdamW: %zu of %zu parameters differ from the CPU's after two steps\n", differ, n);
    es_device_close(cpu);
    es_device_free(dev, d_m, n * sizeof(float)), es_device_free(dev, d_v, n * sizeof(float));
    free(params), free(mom), free(vel), free(device_params), free(grads);
    train_model_free(&tm);
    es_device_close(dev);
    es_safetensors_close(golden);
}

TEST(cuda_golden_train_step) { check_golden_step(tl_name, test_fixtures()); }

int main(void) {
    RUN(cuda_golden_train_step);
    return test_summary();
}
