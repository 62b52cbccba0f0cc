/* GPU benchmark (tests/gpu/run.sh): training steps of the real Qwen2-1.5B shape (random weights,
 * a checkpoint made by essence-inspect mkmodel --like the 1.5B config) on CUDA, 4 × 2048 tokens a
 * step, latent MSE at layer 14 plus 0.5 · CE: the workload of ../shared/tools/gpu_baselines.py's
 * "qwen2_1p5b_train" (its FLOP formula, so its TFLOPS and ours compare), and the latent-only mode
 * (--ce-weight 0: layers ≤ 14 run, nothing above trains), and the first with --recompute.
 *   bench_train OUT_DIR MODEL_DIR
 * A step is essence-align's: forward keeping activations, the loss terms, the backward, the global
 * gradient norm, AdamW over the trained tensors with the bf16 working copy refreshed, gradients
 * zeroed. Writes OUT_DIR/bench_train.json. No CUDA device: "SKIP bench_train: ..." and exit 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_report.h"
#include "optimizer.h"
#include "train.h"

#define SEQS 4
#define SEQ_LEN 2048
#define TOKENS (SEQS * SEQ_LEN)
#define LATENT_LAYER 14
#define DENSE_BF16_PEAK_TFLOPS 989.0 /* H100/H200 SXM, without the 2x sparsity figure */

typedef struct step_run {
    es_device *dev;
    train_model *tm;
    align_batch *batch;
    es_param_group *groups;
    int n_groups;
    int64_t step;
} step_run;

static void run_step(void *ctx) {
    step_run *r = ctx;
    train_sums sums;
    check(train_forward_backward(r->tm, r->batch, 1, 1.0f, NULL, NULL, &sums, &err));
    double norm = 0;
    check(es_grad_norm(r->dev, r->groups, r->n_groups, &norm, &err));
    const es_adamw_config config = {1e-5, 0.9, 0.95, 1e-8, 0.1};
    check(es_adamw_step(r->dev, r->groups, r->n_groups, norm > 1.0 ? (float)(1.0 / (norm + 1e-6)) : 1.0f, ++r->step, 1e-5, &config, &err));
}

/* The trained tensors as AdamW groups (adjacent ranges merged), as essence-align forms them. */
static int trained_groups(const train_model *tm, const es_params *m, const es_params *v, es_param_group *groups) {
    int n = 0;
    for (int i = 0; i < tm->params.n_tensors; i++) {
        const es_named_tensor *t = &tm->params.tensors[i];
        if (!train_tensor_trains(tm, t->name)) continue;
        const size_t numel = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
        if (n && groups[n - 1].params + groups[n - 1].n == t->data) {
            groups[n - 1].n += numel;
            continue;
        }
        groups[n++] = (es_param_group){t->data, train_grad_of(tm, t->data), es_params_at(&tm->params, m, t->data),
                                       es_params_at(&tm->params, v, t->data), numel, es_working_at(&tm->working, &tm->params, t->data)};
    }
    return n;
}

static void bench_mode(es_device *dev, const char *model_dir, const char *mode, float ce_weight, int recompute) {
    dev->peak = dev->used;
    train_model tm;
    const int mapped[1] = {LATENT_LAYER};
    check(train_model_init(&tm, dev, model_dir, mapped, 1, 1.0f, ce_weight, 0, TOKENS, SEQ_LEN, recompute, &err));
    const es_model_config *c = &tm.params.config;
    es_params m, v;
    check(es_params_alloc_prefix(dev, &tm.params, tm.trained_floats, "AdamW's first moments", &m, &err));
    check(es_params_alloc_prefix(dev, &tm.params, tm.trained_floats, "AdamW's second moments", &v, &err));
    es_param_group *groups = calloc((size_t)tm.params.n_tensors + 1, sizeof *groups);
    const int n_groups = trained_groups(&tm, &m, &v, groups);

    static int32_t ids[TOKENS], labels[TOKENS], seq_start[SEQS + 1];
    static uint8_t mask[TOKENS];
    uint64_t seed = 11;
    for (int t = 0; t < TOKENS; t++) ids[t] = (int32_t)(splitmix64(&seed) % 151643u), mask[t] = 1;
    for (int t = 0; t < TOKENS; t++) labels[t] = t % SEQ_LEN == SEQ_LEN - 1 ? -1 : ids[t + 1];
    for (int s = 0; s <= SEQS; s++) seq_start[s] = s * SEQ_LEN;
    float *target = malloc((size_t)TOKENS * c->hidden_size * sizeof *target);
    for (size_t i = 0; i < (size_t)TOKENS * c->hidden_size; i++)
        target[i] = (float)((double)(splitmix64(&seed) >> 11) / 9007199254740992.0 * 2 - 1);
    float *targets[1] = {target};
    align_batch batch = {TOKENS, SEQS, seq_start, ids, labels, mask, targets, TOKENS, TOKENS, SEQS * (SEQ_LEN - 1), NULL};
    step_run run = {dev, &tm, &batch, groups, n_groups, 0};
    const double seconds = timed(dev, run_step, &run, 3);

    double params = 0;
    for (int i = 0; i < tm.params.n_tensors; i++)
        params += (double)tm.params.tensors[i].shape[0] * (tm.params.tensors[i].ndim == 2 ? (double)tm.params.tensors[i].shape[1] : 1);
    /* the baseline's count: 6 N per token plus causal attention, forward and backward */
    const double flops = 6 * params * TOKENS + 6.0 * c->n_layers * c->hidden_size * SEQ_LEN * (double)TOKENS;
    char key[96], what[160];
    snprintf(key, sizeof key, "qwen2_%s_step_s", mode), snprintf(what, sizeof what, "%s: seconds per step (%d tokens)", mode, TOKENS);
    figure(key, seconds, what);
    snprintf(key, sizeof key, "qwen2_%s_tok_per_s", mode), snprintf(what, sizeof what, "%s: tokens/s", mode);
    figure(key, TOKENS / seconds, what);
    if (ce_weight != 0 && !recompute) {
        snprintf(key, sizeof key, "qwen2_%s_tflops", mode), snprintf(what, sizeof what, "%s: TFLOPS (the baseline's formula)", mode);
        figure(key, flops / seconds / 1e12, what);
        snprintf(key, sizeof key, "qwen2_%s_mfu", mode), snprintf(what, sizeof what, "%s: MFU against %g dense bf16 TFLOPS", mode,
                                                                 DENSE_BF16_PEAK_TFLOPS);
        figure(key, flops / seconds / 1e12 / DENSE_BF16_PEAK_TFLOPS, what);
    }
    snprintf(key, sizeof key, "qwen2_%s_peak_GiB", mode), snprintf(what, sizeof what, "%s: device memory held at most (GiB)", mode);
    figure(key, (double)dev->peak / GIB, what);
    free(target), free(groups);
    es_params_free(dev, &m), es_params_free(dev, &v);
    train_model_free(&tm);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: bench_train OUT_DIR MODEL_DIR\n");
        return 2;
    }
    bench_start("bench_train", argv[1]);
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    es_device *dev;
    if (es_device_open(&dev, &options, &err)) {
        printf("SKIP bench_train: %s\n", err.msg);
        return 0;
    }
    bench_str("device", dev->name);
    bench_mode(dev, argv[2], "latent_ce", 0.5f, 0);
    bench_mode(dev, argv[2], "latent_ce_recompute", 0.5f, 1);
    bench_mode(dev, argv[2], "latent_only", 0.0f, 0);
    es_device_close(dev);
    return 0;
}
