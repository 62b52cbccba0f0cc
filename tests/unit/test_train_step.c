/* The golden training step of tiny-qwen2 (Hugging Face transformers + torch, fixtures README):
 * loss = 1.0 · latent_mse(rmsnorm(h₂), target over masked tokens) + 0.5 · CE over 2 × 23
 * positions. Checks the loss terms (1e-5 relative), every gradient (max |Δ| / max |ref| ≤ 1e-4,
 * embedding and head on the stored rows plus their full norms) and the parameters after two
 * AdamW steps on the same gradients (1e-6). */
#include <math.h>
#include <stdint.h>

#include "../testlib.h"
#include "ops.h"
#include "safetensors.h"
#include "test_device.h"
#include "train.h"

static const float *f32(const es_safetensors *st, const char *name) {
    const es_tensor *t = es_safetensors_find(st, name);
    return t && t->dtype == ES_DT_F32 ? (const float *)t->data : NULL;
}

/* max |a − b| / max |b| over n values */
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
    es_device *dev = test_cpu_device(2);
    train_model tm;
    const int mapped[1] = {2};
    enum { B = 2, L = 24, T = B * L, C = 48 };
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
    double latent = sums.latent[0] / (double)aligned, ce = sums.ce / (B * (L - 1)), loss = latent + 0.5 * ce;
    const float *want_loss = f32(golden, "loss"), *want_latent = f32(golden, "latent_mse"), *want_ce = f32(golden, "ce");
    REQUIRE(want_loss && want_latent && want_ce);
    CHECKF(fabs(loss / want_loss[0] - 1) < 1e-5, "loss %.9g vs %.9g", loss, want_loss[0]);
    CHECKF(fabs(latent / want_latent[0] - 1) < 1e-5, "latent %.9g vs %.9g", latent, want_latent[0]);
    CHECKF(fabs(ce / want_ce[0] - 1) < 1e-5, "ce %.9g vs %.9g", ce, want_ce[0]);

    // every gradient
    double worst = 0;
    const es_params *m = &tm.params;
    for (int i = 0; i < m->n_tensors; i++) {
        const es_named_tensor *t = &m->tensors[i];
        char name[160];
        snprintf(name, sizeof name, "grad/%s", t->name);
        const es_tensor *want = es_safetensors_find(golden, name);
        CHECKF(want != NULL, "%s missing in the golden", name);
        if (!want) continue;
        const float *grad = train_grad_of(&tm, t->data);
        const int cols = t->ndim == 2 ? (int)t->shape[1] : 1;
        double error;
        const char *rows_name = !strcmp(t->name, "model.embed_tokens.weight") ? "embed_rows"
                                : !strcmp(t->name, "lm_head.weight")          ? "lm_head_rows"
                                                                              : NULL;
        if (rows_name) {
            const es_tensor *rows = es_safetensors_find(golden, rows_name);
            REQUIRE(rows && rows->dtype == ES_DT_I64);
            size_t n_rows = es_tensor_numel(rows);
            float *picked = malloc(n_rows * cols * sizeof *picked);
            for (size_t r = 0; r < n_rows; r++)
                memcpy(picked + r * cols, grad + ((const int64_t *)rows->data)[r] * cols, cols * sizeof *picked);
            error = normalised_error(picked, want->data, n_rows * cols);
            free(picked);
            double norm = 0;
            REQUIRE(es_sum_squares(dev, &norm, grad, (size_t)t->shape[0] * cols) == 0);
            norm = sqrt(norm);
            snprintf(name, sizeof name, "gradnorm/%s", t->name);
            const float *want_norm = f32(golden, name);
            CHECKF(want_norm && fabs(norm / want_norm[0] - 1) < 1e-4, "%s: norm %.7g vs %.7g", t->name, norm, want_norm ? want_norm[0] : 0);
        } else {
            error = normalised_error(grad, want->data, es_tensor_numel(want));
        }
        CHECKF(error <= 1e-4, "%s: normalised gradient error %.3g", t->name, error);
        worst = fmax(worst, error);
    }
    printf("  golden step: loss %.8f (HF %.8f), worst normalised gradient error %.2e\n", loss, want_loss[0], worst);

    /* Two AdamW steps on the same gradients, every parameter decayed (one torch param group).
     * On the golden's own gradients, so the optimizer is checked alone: Adam divides by |g|, and
     * where |g| is near eps a 1e-6 gradient difference moves the update by percents of lr. */
    float *mom = calloc(m->arena_floats, sizeof *mom), *vel = calloc(m->arena_floats, sizeof *vel);
    float *initial = malloc(m->arena_floats * sizeof *initial);
    memcpy(initial, m->arena, m->arena_floats * sizeof *initial);
    es_adamw_config config = {1e-3, 0.9, 0.95, 1e-8, 0.1};
    double worst_param = 0, worst_ours = 0;
    for (int pass = 0; pass < 2; pass++) { /* 0: the golden's gradients, 1: ours */
        memcpy(m->arena, initial, m->arena_floats * sizeof *initial);
        memset(mom, 0, m->arena_floats * sizeof *mom), memset(vel, 0, m->arena_floats * sizeof *vel);
        for (int i = 0; i < m->n_tensors; i++) {
            const es_named_tensor *t = &m->tensors[i];
            char name[160];
            snprintf(name, sizeof name, "adamw2/%s", t->name);
            const es_tensor *want = es_safetensors_find(golden, name);
            if (!want) continue; /* embedding and head are not stored */
            snprintf(name, sizeof name, "grad/%s", t->name);
            const float *grad = pass == 0 ? f32(golden, name) : train_grad_of(&tm, t->data);
            size_t n = es_tensor_numel(want), offset = (size_t)(t->data - m->arena);
            for (int step = 1; step <= 2; step++) CHECK(es_adamw_update(dev, t->data, NULL, grad, mom + offset, vel + offset, n, step, 1e-3, &config) == 0);
            const float *want_values = want->data;
            for (size_t k = 0; k < n; k++) {
                double delta = fabs((double)t->data[k] - want_values[k]);
                if (pass == 0) worst_param = fmax(worst_param, delta);
                else worst_ours = fmax(worst_ours, delta);
            }
        }
    }
    CHECKF(worst_param <= 1e-6, "parameters after two AdamW steps differ by %.3g", worst_param);
    printf("  after two AdamW steps: max |Δ| %.2e on the golden's gradients, %.2e on ours\n", worst_param, worst_ours);
    free(mom), free(vel), free(initial);
    train_model_free(&tm);
    es_device_close(dev);
    es_safetensors_close(golden);
}

TEST(golden_train_step) { check_golden_step(tl_name, test_fixtures()); }

/* --recompute: every gradient and loss term the same bits as keeping the activations, in every
 * layer (CE on: all layers run), and a smaller activation arena. */
static void check_recompute(const char *tl_name, const char *fixtures) {
    char model_dir[4096];
    snprintf(model_dir, sizeof model_dir, "%s/models/tiny-qwen2", fixtures);
    es_device *dev = test_cpu_device(2);
    enum { B = 3, L = 40, T = B * L };
    int32_t ids[T], labels[T], seq_start[B + 1] = {0, L, 2 * L, 3 * L};
    uint8_t mask[T];
    float *target = malloc((size_t)T * 64 * sizeof *target);
    uint64_t state = 5;
    for (int t = 0; t < T; t++) ids[t] = (int32_t)((state = state * 6364136223846793005ull + 1442695040888963407ull) >> 40) % 200;
    for (int t = 0; t < T; t++) labels[t] = t % L == L - 1 ? -1 : ids[t + 1], mask[t] = t % 3 != 0;
    float *grads[2] = {NULL, NULL};
    size_t n = 0, held[2] = {0, 0};
    double losses[2][2];
    for (int recompute = 0; recompute <= 1; recompute++) {
        train_model tm;
        es_error err = {0};
        const size_t before = dev->used;
        const int mapped[2] = {1, 2};
        REQUIRE(train_model_init(&tm, dev, model_dir, mapped, 2, 1.0f, 0.5f, 0, T, L, recompute, &err) == 0);
        held[recompute] = dev->used - before;
        const int C = tm.params.config.hidden_size;
        REQUIRE(C <= 64);
        for (int i = 0; i < T * C; i++) target[i] = (float)((int)(i * 7919 % 101) - 50) / 50.0f;
        float *targets[2] = {target, target};
        int64_t aligned = 0;
        for (int t = 0; t < T; t++) aligned += mask[t];
        align_batch batch = {T, B, seq_start, ids, labels, mask, targets, T, aligned, B * (L - 1), NULL};
        train_sums sums;
        REQUIRE(train_forward_backward(&tm, &batch, 1, 1.0f, NULL, NULL, &sums, &err) == 0);
        losses[recompute][0] = sums.latent[0] + sums.latent[1], losses[recompute][1] = sums.ce;
        n = tm.grads.arena_floats;
        grads[recompute] = malloc(n * sizeof(float));
        memcpy(grads[recompute], tm.grads.arena, n * sizeof(float));
        train_model_free(&tm);
    }
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += memcmp(&grads[0][i], &grads[1][i], sizeof(float)) != 0;
    CHECKF(differ == 0, "with --recompute %zu of %zu gradients differ", differ, n);
    CHECKF(losses[0][0] == losses[1][0] && losses[0][1] == losses[1][1], "losses differ: %.17g/%.17g vs %.17g/%.17g", losses[0][0],
           losses[0][1], losses[1][0], losses[1][1]);
    CHECKF(held[1] < held[0], "recompute holds %zu bytes, keeping everything %zu", held[1], held[0]);
    printf("  recompute: the same %zu gradients bit for bit; device memory %zu -> %zu bytes\n", n, held[0], held[1]);
    free(grads[0]), free(grads[1]), free(target);
    es_device_close(dev);
}

TEST(recompute_gives_the_same_bits) { check_recompute(tl_name, test_fixtures()); }

/* Latent only, deepest mapped layer 1 of 3: gradients are held for the embedding and layer 0 only
 * (the tensors past them never train), and es_params_alloc_prefix holds exactly what it says. */
static void check_trained_prefix(const char *tl_name, const char *fixtures) {
    char model_dir[4096];
    snprintf(model_dir, sizeof model_dir, "%s/models/tiny-qwen2", fixtures);
    es_device *dev = test_cpu_device(1);
    train_model tm;
    es_error err = {0};
    const int mapped[1] = {1};
    REQUIRE(train_model_init(&tm, dev, model_dir, mapped, 1, 1.0f, 0.0f, 0, 16, 16, 0, &err) == 0);
    CHECK(tm.run_layers == 1 && tm.params.config.n_layers == 3);
    size_t trained = 0, frozen = 0; /* padded floats, counted from the names */
    for (int i = 0; i < tm.params.n_tensors; i++) {
        const es_named_tensor *t = &tm.params.tensors[i];
        const size_t numel = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1), padded = (numel + 63) / 64 * 64;
        const int trains = !strncmp(t->name, "model.embed_tokens.", 19) || !strncmp(t->name, "model.layers.0.", 15);
        CHECKF(train_tensor_trains(&tm, t->name) == trains, "%s", t->name);
        CHECKF(trains ? tm.grads.tensors[i].data == train_grad_of(&tm, t->data) : tm.grads.tensors[i].data == NULL, "%s", t->name);
        if (trains) trained += padded;
        else frozen += padded;
    }
    CHECKF(tm.trained_floats == trained && tm.grads.arena_floats == trained, "%zu trained floats, gradients for %zu, expected %zu",
           tm.trained_floats, tm.grads.arena_floats, trained);
    CHECK(frozen > 0 && tm.params.arena_floats == trained + frozen);
    CHECK(tm.grads.layers[0].q != NULL && tm.grads.layers[1].q == NULL && tm.grads.layers[2].down == NULL);
    CHECK(tm.grads.final_norm == NULL && tm.grads.lm_head == NULL && tm.grads.embed == tm.grads.arena);
    es_params m;
    const size_t before = dev->used;
    REQUIRE(es_params_alloc_prefix(dev, &tm.params, tm.trained_floats, "moments", &m, &err) == 0);
    CHECKF(dev->used - before == trained * sizeof(float), "%zu bytes held for %zu floats", dev->used - before, trained);
    es_params_free(dev, &m);
    CHECK(dev->used == before);
    train_model_free(&tm);
    es_device_close(dev);
}

TEST(latent_only_holds_gradients_of_the_trained_tensors) { check_trained_prefix(tl_name, test_fixtures()); }

int main(void) {
    RUN(golden_train_step);
    RUN(recompute_gives_the_same_bits);
    RUN(latent_only_holds_gradients_of_the_trained_tensors);
    return test_summary();
}
