/* essence-align: fine-tunes the student to match the projected teacher latents (docs/align.md),
 * or trains it on a JSONL of texts with the next-token cross entropy alone.
 *
 * main() is the story: read the configuration, join the other ranks, open student.h5 and the
 * student, resume from the newest checkpoint if asked, then step by step: accumulate gradients
 * over micro-batches, sum them over ranks, clip, update with AdamW; log a metrics line, evaluate
 * and save checkpoints as configured; finally plot the metrics. */
#include <errno.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "backend.h"
#include "checkpoint.h"
#include "comm.h"
#include "config.h"
#include "data.h"
#include "files.h"
#include "fingerprint.h"
#include "h5file.h"
#include "log.h"
#include "optimizer.h"
#include "progress.h"
#include "reduce.h"
#include "resume.h"
#include "state.h"
#include "safetensors.h"
#include "train.h"

extern char **environ;

static const es_option options[] = {
    {"model", ES_OPT_STRING, NULL, "student model folder (config.json, safetensors, tokenizer files)", NULL},
    {"data", ES_OPT_STRING, NULL, "student.h5 written by essence-project, or texts.jsonl (tokenised with --model's tokenizer; cross entropy only)", NULL},
    {"out", ES_OPT_STRING, NULL, "output folder: checkpoint-STEP/ folders, the final model, metrics.jsonl, loss.png", NULL},
    {"steps", ES_OPT_INT, "500", "optimizer steps", "[1,)"},
    {"lr", ES_OPT_FLOAT, "1e-4", "peak learning rate", "(0,)"},
    {"warmup", ES_OPT_INT, "20", "steps of linear warmup before the cosine decay", "[0,)"},
    {"batch-tokens", ES_OPT_INT, "8192", "tokens per micro-batch and rank", "[1,2147483647]"},
    {"seq-len", ES_OPT_INT, "2048", "longest attention sequence: longer samples are cut into pieces", "[2,2147483647]"},
    {"grad-accum", ES_OPT_INT, "1", "micro-batches per optimizer step", "[1,2147483647]"},
    {"latent-weight", ES_OPT_FLOAT, "1.0", "weight of the latent MSE (mean over mapped layers; texts.jsonl: 0, the only value allowed)", "[0,)"},
    {"ce-weight", ES_OPT_FLOAT, "0.0", "weight of the next-token cross entropy (0: only layers up to the deepest mapped one run; texts.jsonl: default 1, must be > 0)", "[0,)"},
    {"student-head", ES_OPT_STRING, "none", "none, or linear: a learned D×D map per mapped layer (identity at start)", NULL},
    {"weight-decay", ES_OPT_FLOAT, "0.1", "AdamW decoupled weight decay", "[0,)"},
    {"beta1", ES_OPT_FLOAT, "0.9", "AdamW β1", "[0,1)"},
    {"beta2", ES_OPT_FLOAT, "0.95", "AdamW β2", "[0,1)"},
    {"adam-eps", ES_OPT_FLOAT, "1e-8", "AdamW ε", "(0,)"},
    {"grad-clip", ES_OPT_FLOAT, "1.0", "global gradient norm limit (0: no clipping)", "[0,)"},
    {"save-every", ES_OPT_INT, "500", "steps between checkpoints (a checkpoint is also written at the end)", "[0,2147483647]"},
    {"keep-checkpoints", ES_OPT_INT, "2", "checkpoint folders kept", "[1,2147483647]"},
    {"resume", ES_OPT_BOOL, "false", "continue from the newest checkpoint in --out (begun with the same inputs and options)", NULL},
    {"recompute", ES_OPT_BOOL, "false", "keep only each layer's input and recompute the rest in the backward (less memory, ~1/3 more time; the same bits)", NULL},
    {"zero1", ES_OPT_BOOL, "false", "with several ranks, shard AdamW's moments over them (ZeRO-1: less device memory, the same training; docs/align.md)", NULL},
    {"force", ES_OPT_BOOL, "false", "start afresh in a --out that holds checkpoints: they are removed first", NULL},
    {"eval-every", ES_OPT_INT, "100", "steps between evaluations (and one at the end)", "[0,2147483647]"},
    {"eval-fraction", ES_OPT_FLOAT, "0.05", "share of samples held out for evaluation", "[0,1)"},
    {"no-shuffle", ES_OPT_BOOL, "false", "train in file order", NULL},
    {"seed", ES_OPT_INT, "0", "seed of the eval split and the shuffling", NULL},
    {"dump-step", ES_OPT_STRING, NULL, "after the first step's backward, write loss terms and gradients (fp32) to FILE.safetensors", NULL},
    {"fingerprint", ES_OPT_STRING, NULL, "the pipeline stage's fingerprint, written to OUT/fingerprint at the end (set by essence-run; default: computed)", NULL},
    ES_DEVICE_OPTIONS,
    {NULL, 0, NULL, NULL, NULL},
};

static const char usage[] = "essence-align --model DIR --data student.h5|texts.jsonl --out DIR [options]";

/* Everything the optimizer owns: the AdamW moments of the master weights (the parameter arena's
 * layout) and of the heads; device memory, or with --zero1 over several ranks host memory, the
 * checkpoint's view of the moments that align/reduce.h shards over the devices. */
typedef struct optimizer {
    es_params m, v;
    float *head_m, *head_v;     // (n_mapped, C, C) or NULL
    int on_host;
    es_adamw_config config;
} optimizer;

static int optimizer_alloc(optimizer *opt, es_device *dev, const es_params *like, size_t trained_floats, size_t n_head, int on_host,
                           es_error *err) {
    opt->on_host = on_host;
    if (on_host) {
        opt->m = (es_params){.arena = calloc(like->arena_floats + 1, sizeof(float)), .arena_floats = like->arena_floats};
        opt->v = (es_params){.arena = calloc(like->arena_floats + 1, sizeof(float)), .arena_floats = like->arena_floats};
        opt->head_m = n_head ? calloc(n_head, sizeof(float)) : NULL, opt->head_v = n_head ? calloc(n_head, sizeof(float)) : NULL;
        if (!opt->m.arena || !opt->v.arena || (n_head && (!opt->head_m || !opt->head_v)))
            return es_fail(err, ES_ERR_RUNTIME, "out of host memory for AdamW's moments (%zu floats)", 2 * (like->arena_floats + n_head));
        return ES_OK;
    }
    if (es_params_alloc_prefix(dev, like, trained_floats, "AdamW's first moments", &opt->m, err) ||
        es_params_alloc_prefix(dev, like, trained_floats, "AdamW's second moments", &opt->v, err) ||
        (n_head && (es_device_alloc(dev, n_head * sizeof(float), (void **)&opt->head_m, "the heads' AdamW moments", err) ||
                    es_device_alloc(dev, n_head * sizeof(float), (void **)&opt->head_v, "the heads' AdamW moments", err) ||
                    es_device_zero(dev, opt->head_m, n_head * sizeof(float), err) ||
                    es_device_zero(dev, opt->head_v, n_head * sizeof(float), err))))
        return err->code;
    return ES_OK;
}

static void optimizer_free(optimizer *opt, es_device *dev, size_t n_head) {
    if (opt->on_host) {
        free(opt->m.arena), free(opt->v.arena), free(opt->head_m), free(opt->head_v);
    } else {
        es_params_free(dev, &opt->m), es_params_free(dev, &opt->v);
        es_device_free(dev, opt->head_m, n_head * sizeof(float)), es_device_free(dev, opt->head_v, n_head * sizeof(float));
    }
}

/* The checkpoint's tensors: the model's (bf16 in the file), the heads, and the optimizer state
 * under the same names. Arrays malloc'd by the caller's sizes. */
typedef struct saved_tensors {
    checkpoint_tensor *weights, *head, *master, *m, *v;
    checkpoint_buffer *load_master, *load_m, *load_v;
    float *zeros;               /* the moments saved for the tensors that do not train (none held) */
    char (*head_names)[64];
    int n_weights, n_head, n_state;
} saved_tensors;

/* The checkpoint reads and writes the host's view of the state (align/state.h). */
static int build_saved(saved_tensors *s, const train_model *tm, const optimizer *opt, const host_state *host, es_error *err) {
    const es_params *model = &tm->params;
    const int C = model->config.hidden_size;
    s->n_weights = model->n_tensors, s->n_head = tm->heads ? tm->n_mapped : 0, s->n_state = s->n_weights + s->n_head;
    s->weights = calloc((size_t)s->n_weights + 1, sizeof *s->weights);
    s->head = calloc((size_t)s->n_head + 1, sizeof *s->head);
    s->head_names = calloc((size_t)s->n_head + 1, sizeof *s->head_names);
    s->master = calloc((size_t)s->n_state, sizeof *s->master), s->m = calloc((size_t)s->n_state, sizeof *s->m);
    s->v = calloc((size_t)s->n_state, sizeof *s->v);
    s->load_master = calloc((size_t)s->n_state, sizeof *s->load_master);
    s->load_m = calloc((size_t)s->n_state, sizeof *s->load_m), s->load_v = calloc((size_t)s->n_state, sizeof *s->load_v);
    s->zeros = calloc(model->arena_floats - opt->m.arena_floats + 1, sizeof *s->zeros); /* never written: no memory taken */
    if (!s->weights || !s->head || !s->head_names || !s->master || !s->m || !s->v || !s->load_master || !s->load_m || !s->load_v ||
        !s->zeros)
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; i < s->n_state; i++) {
        checkpoint_tensor t;
        float *data, *m, *v;
        if (i < s->n_weights) {
            const es_named_tensor *named = &model->tensors[i];
            t = (checkpoint_tensor){named->name, named->data, named->ndim, {named->shape[0], named->shape[1]}};
            const int has_moments = (size_t)(named->data - model->arena) < opt->m.arena_floats;
            data = named->data;
            m = has_moments ? es_params_at(model, &opt->m, data) : NULL, v = has_moments ? es_params_at(model, &opt->v, data) : NULL;
            s->weights[i] = t;
        } else {
            int h = i - s->n_weights;
            snprintf(s->head_names[h], sizeof s->head_names[h], "student_head.layer_%03d.weight", tm->mapped[h]);
            data = tm->heads + (size_t)h * C * C, m = opt->head_m + (size_t)h * C * C, v = opt->head_v + (size_t)h * C * C;
            t = (checkpoint_tensor){s->head_names[h], data, 2, {C, C}};
            s->head[h] = t;
        }
        int64_t numel = t.ndim == 2 ? t.shape[0] * t.shape[1] : t.shape[0];
        data = host_state_at(host, data), m = m ? host_state_at(host, m) : NULL, v = v ? host_state_at(host, v) : NULL;
        t.data = data;
        if (i < s->n_weights) s->weights[i] = t;
        else s->head[i - s->n_weights] = t;
        s->master[i] = t, s->m[i] = t, s->v[i] = t;
        s->m[i].data = m ? m : s->zeros, s->v[i].data = v ? v : s->zeros; /* a tensor that does not train: zeros, as ever */
        s->load_master[i] = (checkpoint_buffer){t.name, data, numel};
        s->load_m[i] = (checkpoint_buffer){t.name, m, numel};
        s->load_v[i] = (checkpoint_buffer){t.name, v, numel};
    }
    return ES_OK;
}

static void free_saved(saved_tensors *s) {
    free(s->weights), free(s->head), free(s->head_names), free(s->master), free(s->m), free(s->v);
    free(s->load_master), free(s->load_m), free(s->load_v), free(s->zeros);
}

/* The metrics of one evaluation over the held-out samples (every rank takes its share). */
typedef struct eval_result {
    double latent_mse, cosine, ce, const_mse, r2;
    int64_t aligned, labelled;
} eval_result;

static int evaluate(train_model *tm, align_data *data, align_comm *comm, eval_result *out, es_error *err) {
    const int C = tm->params.config.hidden_size, n = tm->n_mapped;
    /* per layer: Σ latent, Σ cosine, Σ‖t‖², Σ t (C values); then Σ ce, aligned, labelled */
    const size_t per_layer = 3 + (size_t)C, total = (size_t)n * per_layer + 3;
    double *acc = calloc(total, sizeof *acc);
    if (!acc) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = align_data_eval_begin(data, err);
    align_batch batch;
    int got;
    while (!rc && (got = align_data_eval_next(data, &batch, err)) == 1) {
        train_sums sums;
        rc = train_forward_backward(tm, &batch, 0, 1.0f, NULL, NULL, &sums, err);
        for (int i = 0; !rc && i < n; i++) {
            double *layer = acc + (size_t)i * per_layer;
            layer[0] += sums.latent[i], layer[1] += sums.cosine[i];
            for (int t = 0; t < batch.T; t++) {
                if (!batch.mask[t]) continue;
                const float *target = batch.targets[i] + (size_t)t * C;
                for (int k = 0; k < C; k++) layer[2] += (double)target[k] * target[k], layer[3 + k] += target[k];
            }
        }
        acc[total - 3] += sums.ce, acc[total - 2] += (double)sums.aligned, acc[total - 1] += (double)sums.labelled;
    }
    if (!rc && got < 0) rc = err->code;
    if (!rc) rc = comm_allreduce_f64(comm, acc, total, err);
    if (!rc) {
        double aligned = acc[total - 2], labelled = acc[total - 1];
        memset(out, 0, sizeof *out);
        out->aligned = (int64_t)aligned, out->labelled = (int64_t)labelled;
        for (int i = 0; i < n && aligned > 0; i++) {
            const double *layer = acc + (size_t)i * per_layer;
            double mean_norm_sq = 0;
            for (int k = 0; k < C; k++) mean_norm_sq += (layer[3 + k] / aligned) * (layer[3 + k] / aligned);
            /* the best input-independent answer: one direction of norm √D (DESIGN.md) */
            double const_mse = 1.0 + layer[2] / aligned / C - 2.0 * sqrt(mean_norm_sq) / sqrt((double)C);
            out->latent_mse += layer[0] / aligned / n, out->cosine += layer[1] / aligned / n, out->const_mse += const_mse / n;
        }
        out->ce = labelled > 0 ? acc[total - 3] / labelled : 0;
        out->r2 = out->const_mse > 0 ? 1.0 - out->latent_mse / out->const_mse : 0;
    }
    free(acc);
    return rc;
}

/* --dump-step: the loss terms and every gradient (fp32, Hugging Face names) of the first step. */
static int dump_step(const char *path, const train_model *tm, host_state *host, double loss, double latent, double ce,
                     es_error *err) {
    const es_params *model = &tm->params;
    const int C = model->config.hidden_size;
    int pulled = host_state_pull_grads(host, tm->grads.arena, tm->grads.arena_floats, err);
    if (!pulled && tm->heads) pulled = host_state_pull_grads(host, tm->head_grads, (size_t)tm->n_mapped * C * C, err);
    if (pulled) return pulled;
    int n = model->n_tensors + (tm->heads ? tm->n_mapped : 0) + 3;
    es_tensor *entries = calloc((size_t)n, sizeof *entries);
    char (*names)[128] = calloc((size_t)n, sizeof *names);
    float *zeros = calloc(model->arena_floats - tm->grads.arena_floats + 1, sizeof *zeros); /* the tensors that do not train */
    float scalars[3] = {(float)loss, (float)latent, (float)ce};
    if (!entries || !names || !zeros) {
        free(entries), free(names), free(zeros);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    const char *scalar_names[3] = {"loss", "latent_mse", "ce"};
    int k = 0;
    for (int i = 0; i < 3; i++, k++)
        entries[k] = (es_tensor){.name = scalar_names[i], .dtype = ES_DT_F32, .ndim = 1, .shape = {1}, .data = &scalars[i], .nbytes = 4};
    for (int i = 0; i < model->n_tensors; i++, k++) {
        const es_named_tensor *t = &model->tensors[i];
        snprintf(names[k], sizeof names[k], "grad/%s", t->name);
        size_t numel = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
        const float *grad = tm->grads.tensors[i].data; /* NULL: a tensor that does not train */
        entries[k] = (es_tensor){.name = names[k], .dtype = ES_DT_F32, .ndim = t->ndim, .shape = {t->shape[0], t->shape[1]},
                                 .data = grad ? host_state_at(host, grad) : zeros, .nbytes = numel * 4};
    }
    for (int i = 0; tm->heads && i < tm->n_mapped; i++, k++) {
        snprintf(names[k], sizeof names[k], "grad/student_head.layer_%03d.weight", tm->mapped[i]);
        entries[k] = (es_tensor){.name = names[k], .dtype = ES_DT_F32, .ndim = 2, .shape = {C, C},
                                 .data = host_state_at(host, tm->head_grads + (size_t)i * C * C), .nbytes = (size_t)C * C * 4};
    }
    int rc = es_safetensors_write(path, entries, (size_t)k, NULL, 0, err);
    free(entries), free(names), free(zeros);
    return rc;
}

/* loss.png beside metrics.jsonl, drawn by essence-inspect (next to this program) with gnuplot. */
static void plot_metrics(const char *out_dir) {
    char self[4096], inspect[4200], metrics[4200], png[4200];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) return;
    self[len] = '\0';
    char *slash = strrchr(self, '/');
    if (slash) *slash = '\0';
    snprintf(inspect, sizeof inspect, "%s/essence-inspect", self);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", out_dir);
    snprintf(png, sizeof png, "%s/loss.png", out_dir);
    char *args[] = {inspect, "plot", metrics, "-o", png, NULL};
    pid_t pid;
    int status = 0;
    if (posix_spawn(&pid, inspect, NULL, NULL, args, environ) != 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0)
        es_warn("%s was not drawn (essence-inspect plot failed; see above)", png);
    else
        es_log("plotted %s", png);
}

/* On resume, metrics.jsonl keeps only the lines of steps the checkpoint had done. */
static int trim_metrics(const char *path, int64_t done, es_error *err) {
    FILE *in = fopen(path, "r");
    if (!in) return ES_OK;
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.partial", path);
    FILE *out = fopen(tmp, "w");
    if (!out) {
        fclose(in);
        return es_fail(err, ES_ERR_RUNTIME, "%s: %s", tmp, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, in) > 0) {
        long long step = -1;
        const char *at = strstr(line, "\"step\":");
        if (at) step = atoll(at + 7);
        if (step >= 0 && step <= done) fputs(line, out);
    }
    free(line);
    fclose(in);
    if (fclose(out) || rename(tmp, path)) return es_fail(err, ES_ERR_RUNTIME, "%s: %s", path, strerror(errno));
    return ES_OK;
}

/* OUT/fingerprint: the stage's (given by essence-run) or the SHA-256 of the effective
 * configuration but the options that change no bit; written last, through a rename, so it marks
 * a complete output. */
static int write_fingerprint(const char *path, const es_config *cfg, es_error *err) {
    char fingerprint[ES_FINGERPRINT_HEX], tmp[4400];
    if (es_config_is_set(cfg, "fingerprint")) {
        snprintf(fingerprint, sizeof fingerprint, "%s", es_config_str(cfg, "fingerprint"));
    } else {
        /* nor those that only describe this run: --resume, --force, --out (common/resume.h) */
        char *yaml = es_config_to_yaml_without(cfg, ES_RUN_ONLY_OPTIONS);
        es_sha256_hex(yaml ? yaml : "", yaml ? strlen(yaml) : 0, fingerprint);
        free(yaml);
    }
    snprintf(tmp, sizeof tmp, "%s.partial", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%s\n", fingerprint) < 0 || fflush(f) || fsync(fileno(f)) || fclose(f) || rename(tmp, path)) {
        int saved = errno;
        unlink(tmp);
        return es_fail(err, ES_ERR_RUNTIME, "%s: %s", path, strerror(saved));
    }
    return ES_OK;
}

/* What a --resume must share with the run that wrote the checkpoint (common/resume.h): the options
 * that shape the training, the model's files and the data by their content (student.h5 by its
 * resume_key attribute, a JSONL by its SHA-256 and, as the model folder's tokenizer encodes it,
 * tokenizer.json and tokenizer_config.json by theirs), and the number of ranks. Not the device: the
 * state is fp32 master weights and moments on every backend, so a run may continue on another
 * (docs/align.md "Resuming"). NULL and *err set on failure. */
static char *align_resume_key(const es_config *cfg, int world, es_error *err) {
    const char *model = es_config_str(cfg, "model"), *data = es_config_str(cfg, "data");
    char model_fp[ES_FINGERPRINT_HEX], data_fp[ES_FINGERPRINT_HEX] = "", ranks[32];
    if (es_model_fingerprint(model, model_fp, err)) return NULL;
    size_t len = strlen(data);
    if (len > 3 && !strcmp(data + len - 3, ".h5")) {
        es_h5file file = {.id = -1};
        char *stored = NULL;
        int rc = es_h5_open(&file, data, err);
        /* what essence-project made it from, by content (its resume key), else its fingerprint */
        const char *attribute = !rc && H5Aexists(file.id, "resume_key") > 0 ? "resume_key" : "fingerprint";
        if (!rc && H5Aexists(file.id, attribute) > 0) rc = es_h5_attr_get_str(file.id, attribute, &stored, err);
        if (!rc && stored) es_sha256_hex(stored, strlen(stored), data_fp);
        free(stored);
        if (file.id >= 0) es_h5_close(&file, 0);
        if (!rc && !data_fp[0]) rc = es_sha256_file(data, data_fp, err); /* not from essence-project: its bytes */
        if (rc) return NULL;
    } else if (es_sha256_file(data, data_fp, err)) {
        return NULL;
    }
    /* texts are tokenised by the model folder's tokenizer, which the model's fingerprint leaves out */
    char tokenizer_fp[ES_FINGERPRINT_HEX] = "", tokenizer_config_fp[ES_FINGERPRINT_HEX] = "";
    const int texts = align_data_path_is_text(data);
    if (texts) {
        char path[4200];
        struct stat st;
        snprintf(path, sizeof path, "%s/tokenizer.json", model);
        if ((stat(path, &st) == 0 && es_sha256_file(path, tokenizer_fp, err)) || es_tokenizer_config_sha256(model, tokenizer_config_fp, err))
            return NULL;
    }
    snprintf(ranks, sizeof ranks, "%d", world);
    json_t *key = es_resume_key_from_config(cfg, (const char *const[]){"model", "data", "save-every", "keep-checkpoints", "dump-step", "device", "recompute", "zero1", NULL});
    char *text = NULL;
    if (key) {
        json_object_set_new(key, "model", json_string(model_fp)), json_object_set_new(key, "data", json_string(data_fp));
        json_object_set_new(key, "number of ranks", json_string(ranks));
        if (texts)
            json_object_set_new(key, "tokenizer.json", json_string(tokenizer_fp)),
                json_object_set_new(key, "tokenizer_config.json", json_string(tokenizer_config_fp));
        text = es_resume_key_text(key, err);
    } else {
        es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    json_decref(key);
    return text;
}

/* Given by the user (a flag or the YAML file), not the table's default. */
static int given(const es_config *cfg, const char *name) {
    for (int i = 0; i < cfg->n_options; i++)
        if (!strcmp(cfg->options[i].name, name)) return cfg->sources[i] == ES_SRC_FILE || cfg->sources[i] == ES_SRC_FLAG;
    return 0;
}

static _Noreturn void fail(align_comm *comm, const es_error *err) {
    fprintf(stderr, "%s: %s\n", es_program(), err->msg);
    comm_abort(comm, err->code ? err->code : 1);
    exit(err->code ? err->code : 1);
}

int main(int argc, char **argv) {
    es_set_program("essence-align");
    es_device_prepare(argv); /* before MPI starts: it may run the program again */
    align_comm comm;
    es_error err = {0};
    if (comm_init(&comm, &argc, &argv, &err)) es_exit_error(&err);
    es_config cfg;
    static const char *const required[] = {"model", "data", "out", NULL};
    int begun = es_config_start(&cfg, options, argc, argv, usage,
                                "Fine-tunes the student to match the projected teacher latents (latent MSE, optionally + next-token CE), "
                                "or, from a JSONL of texts, with the next-token CE alone.",
                                required, &err);
    if (begun > 0) fail(&comm, &err);
    if (begun == ES_CONFIG_DONE) {
        es_config_free(&cfg);
        comm_finalize(&comm);
        return 0;
    }
    es_device_options device_options;
    if (es_device_options_from_config(&cfg, &device_options, &err)) fail(&comm, &err);
    const char *head_kind = es_config_str(&cfg, "student-head");
    if (strcmp(head_kind, "none") && strcmp(head_kind, "linear"))
        es_fail(&err, ES_ERR_USAGE, "--student-head %s: expected none or linear", head_kind), fail(&comm, &err);
    const char *model_dir = es_config_str(&cfg, "model"), *out_dir = es_config_str(&cfg, "out");
    /* Texts have no targets: CE alone. The effective weights are written into the configuration
     * so the resume key and the fingerprint hold what trains. */
    const int texts = align_data_path_is_text(es_config_str(&cfg, "data"));
    if (texts) {
        if (given(&cfg, "latent-weight") && es_config_float(&cfg, "latent-weight") != 0)
            es_fail(&err, ES_ERR_USAGE, "--latent-weight %g: %s is a JSONL of texts, which has no teacher targets (cross entropy only; "
                    "leave --latent-weight out or give 0)", es_config_float(&cfg, "latent-weight"), es_config_str(&cfg, "data")),
                fail(&comm, &err);
        if (!strcmp(head_kind, "linear"))
            es_fail(&err, ES_ERR_USAGE, "--student-head linear: %s is a JSONL of texts, which has no teacher targets for a head to map to",
                    es_config_str(&cfg, "data")),
                fail(&comm, &err);
        if (given(&cfg, "ce-weight") && !(es_config_float(&cfg, "ce-weight") > 0))
            es_fail(&err, ES_ERR_USAGE, "--ce-weight %g: a JSONL of texts trains on the cross entropy alone, so it must be > 0",
                    es_config_float(&cfg, "ce-weight")),
                fail(&comm, &err);
        if ((!given(&cfg, "ce-weight") && es_config_set(&cfg, "ce-weight", "1", &err)) ||
            es_config_set(&cfg, "latent-weight", "0", &err))
            fail(&comm, &err);
    }
    const es_named_path inputs[] = {{"model", model_dir}, {"data", es_config_str(&cfg, "data")}};
    if (es_check_output_clear("out", out_dir, 0, inputs, 2, &err)) fail(&comm, &err);
    const int64_t steps = es_config_int(&cfg, "steps"), warmup = es_config_int(&cfg, "warmup");
    const int accum = (int)es_config_int(&cfg, "grad-accum"), save_every = (int)es_config_int(&cfg, "save-every");
    const int eval_every = (int)es_config_int(&cfg, "eval-every");
    const double eval_fraction = es_config_float(&cfg, "eval-fraction"), clip = es_config_float(&cfg, "grad-clip");
    const double lr = es_config_float(&cfg, "lr");
    if (steps < 1 || warmup < 0 || accum < 1 || es_config_int(&cfg, "batch-tokens") < 1 || es_config_int(&cfg, "seq-len") < 2 ||
        !(eval_fraction >= 0 && eval_fraction < 1) || !(lr > 0) || clip < 0 || save_every < 0 || eval_every < 0)
        es_fail(&err, ES_ERR_USAGE, "--steps, --grad-accum, --batch-tokens must be >= 1, --seq-len >= 2, --lr > 0, "
                                    "--eval-fraction in [0, 1), --warmup, --grad-clip, --save-every, --eval-every >= 0"),
            fail(&comm, &err);

    // 1. The data: its target layers decide which student layers run.
    es_model_config student;
    if (es_model_config_load(model_dir, &student, NULL, &err)) fail(&comm, &err);
    align_data_options data_options = {es_config_str(&cfg, "data"), student.hidden_size, student.n_layers, student.vocab_size,
                                       eval_fraction, (uint64_t)es_config_int(&cfg, "seed"), !es_config_bool(&cfg, "no-shuffle"),
                                       (int)es_config_int(&cfg, "seq-len"), (int)es_config_int(&cfg, "batch-tokens"),
                                       comm.rank, comm.world, model_dir};
    align_data *data;
    if (align_data_open(&data, &data_options, &err)) fail(&comm, &err);
    const int *mapped;
    int n_mapped = align_data_target_layers(data, &mapped);

    // 2. The student on its device, and the optimizer's state.
    es_device *dev;
    if (es_device_open(&dev, &device_options, &err)) fail(&comm, &err);
    es_device_log(dev);
    /* more than one rank: a device group where the device has one (NCCL), else MPI on the host */
    if (comm_join_device(&comm, dev, out_dir, &err)) fail(&comm, &err);
    const int seq_len = (int)es_config_int(&cfg, "seq-len"), batch_tokens = (int)es_config_int(&cfg, "batch-tokens");
    /* a rank's micro-batch: the token budget, one piece more when the global batch is cut over ranks */
    const int max_tokens = comm.world == 1 ? (batch_tokens > seq_len ? batch_tokens : seq_len) : batch_tokens + seq_len;
    train_model tm;
    if (train_model_init(&tm, dev, model_dir, mapped, n_mapped, (float)es_config_float(&cfg, "latent-weight"),
                         (float)es_config_float(&cfg, "ce-weight"), !strcmp(head_kind, "linear"), max_tokens, seq_len,
                         es_config_bool(&cfg, "recompute"), &err))
        fail(&comm, &err);
    const int C = student.hidden_size;
    const size_t n_head = tm.heads ? (size_t)n_mapped * C * C : 0;
    optimizer opt = {.config = {lr, es_config_float(&cfg, "beta1"), es_config_float(&cfg, "beta2"), es_config_float(&cfg, "adam-eps"),
                                es_config_float(&cfg, "weight-decay")}};
    const int zero1 = es_config_bool(&cfg, "zero1") && comm.world > 1;
    if (optimizer_alloc(&opt, dev, &tm.params, tm.trained_floats, n_head, zero1, &err)) fail(&comm, &err);
    /* what checkpoints, the all-reduce and --dump-step see of the state on the host */
    host_state host;
    {
        const size_t arena = tm.params.arena_floats;
        float *const arrays[HOST_ARRAYS] = {tm.params.arena, opt.m.arena, opt.v.arena, tm.grads.arena,
                                            tm.heads, opt.head_m, opt.head_v, tm.head_grads};
        const size_t sizes[HOST_ARRAYS] = {arena, opt.m.arena_floats, opt.v.arena_floats, tm.grads.arena_floats,
                                           n_head, n_head, n_head, n_head};
        const unsigned moments = 1u << HOST_M | 1u << HOST_V | 1u << HOST_HEAD_M | 1u << HOST_HEAD_V;
        if (host_state_init(&host, dev, arrays, sizes, zero1 ? moments : 0, &err)) fail(&comm, &err);
    }
    saved_tensors saved;
    if (build_saved(&saved, &tm, &opt, &host, &err)) fail(&comm, &err);
    if (n_mapped)
        es_log("rank %d/%d: %lld train and %lld eval samples; target layers %d..%d; %d of %d layers run", comm.rank, comm.world,
               (long long)align_data_train_samples(data), (long long)align_data_eval_samples(data), mapped[0], mapped[n_mapped - 1],
               tm.run_layers, student.n_layers);
    else
        es_log("rank %d/%d: %lld train and %lld eval texts (%s): cross entropy only (weight %g), all %d layers run", comm.rank,
               comm.world, (long long)align_data_train_samples(data), (long long)align_data_eval_samples(data),
               es_config_str(&cfg, "data"), tm.ce_weight, student.n_layers);

    // 3. Resume: weights, moments, step and data position from the newest checkpoint.
    int64_t step = 0;
    char metrics_path[4200];
    snprintf(metrics_path, sizeof metrics_path, "%s/metrics.jsonl", out_dir);
    if (comm.rank == 0 && mkdir(out_dir, 0777) && errno != EEXIST)
        es_fail(&err, ES_ERR_RUNTIME, "%s: %s", out_dir, strerror(errno)), fail(&comm, &err);
    /* OUT/fingerprint marks a finished run: gone until this one finishes. */
    char fingerprint_path[4300];
    snprintf(fingerprint_path, sizeof fingerprint_path, "%s/fingerprint", out_dir);
    if (comm.rank == 0) unlink(fingerprint_path);
    if (es_config_is_set(&cfg, "fingerprint") && !es_fingerprint_valid(es_config_str(&cfg, "fingerprint")))
        es_fail(&err, ES_ERR_USAGE, "--fingerprint %s: expected 64 lowercase hexadecimal digits", es_config_str(&cfg, "fingerprint")),
            fail(&comm, &err);
    char *key_text = align_resume_key(&cfg, comm.world, &err);
    if (!key_text) fail(&comm, &err);
    if (es_config_bool(&cfg, "resume")) {
        char *checkpoint = NULL, *state = NULL;
        int64_t saved_step = 0;
        if (checkpoint_find_latest(out_dir, &checkpoint, &saved_step, &err)) fail(&comm, &err);
        if (!checkpoint) {
            es_log("--resume: no checkpoint in %s yet: starting from the model", out_dir);
            /* the stopped run's lines of steps that no checkpoint kept */
            if (comm.rank == 0 && trim_metrics(metrics_path, 0, &err)) fail(&comm, &err);
        } else {
            if (checkpoint_load_state(checkpoint, saved.load_master, saved.load_m, saved.load_v, saved.n_state, &state, &err) ||
                host_state_push(&host, &err) || es_working_refresh(dev, &tm.params, &tm.working, &err))
                fail(&comm, &err);
            json_t *root = json_loads(state, 0, NULL);
            /* Another run's checkpoint (other data, model or options) is refused, naming what differs. */
            const json_t *stored = json_object_get(root, "resume_key");
            char what[4300];
            snprintf(what, sizeof what, "%s", checkpoint);
            if (es_resume_key_compare(json_is_string(stored) ? json_string_value(stored) : NULL, key_text, what, &err))
                fail(&comm, &err);
            align_data_position position = {json_integer_value(json_object_get(root, "epoch")),
                                             json_integer_value(json_object_get(root, "index")),
                                             json_integer_value(json_object_get(root, "piece"))};
            step = json_integer_value(json_object_get(root, "step"));
            json_decref(root);
            if (step != saved_step || align_data_set_position(data, position, &err)) {
                if (!err.code) es_fail(&err, ES_ERR_DATA, "%s: essence-state/state.json disagrees with the folder name", checkpoint);
                fail(&comm, &err);
            }
            if (comm.rank == 0 && (trim_metrics(metrics_path, step, &err) ||
                                   checkpoint_tidy(out_dir, checkpoint, step, (int)es_config_int(&cfg, "keep-checkpoints"), &err)))
                fail(&comm, &err);
            es_log("resumed from %s at step %lld", checkpoint, (long long)step);
        }
        free(checkpoint), free(state);
    } else if (comm.rank == 0) {
        /* A fresh run must not leave another run's checkpoints where --resume would find them. */
        size_t found = 0;
        int64_t newest = -1;
        if (checkpoint_survey(out_dir, &found, &newest, &err)) fail(&comm, &err);
        if (found && !es_config_bool(&cfg, "force"))
            es_fail(&err, ES_ERR_USAGE,
                    "%s holds %zu checkpoint folder%s (the newest checkpoint-%lld) of an earlier run: --resume continues it, --force "
                    "starts afresh and removes them",
                    out_dir, found, found == 1 ? "" : "s", (long long)newest),
                fail(&comm, &err);
        if (found) {
            if (checkpoint_remove_all(out_dir, &err)) fail(&comm, &err);
            es_log("--force: removed %zu checkpoint folder%s of an earlier run from %s", found, found == 1 ? "" : "s", out_dir);
        }
        remove(metrics_path);
    }
    FILE *metrics = comm.rank == 0 ? fopen(metrics_path, "a") : NULL;
    if (comm.rank == 0 && !metrics) es_fail(&err, ES_ERR_RUNTIME, "%s: %s", metrics_path, strerror(errno)), fail(&comm, &err);

    // 4. The steps, over the trained tensors' ranges of the arena (merged where adjacent), the heads first.
    es_param_group *groups = calloc((size_t)tm.params.n_tensors + 2, sizeof *groups);
    int n_groups = 0;
    if (!groups) es_fail(&err, ES_ERR_RUNTIME, "out of memory"), fail(&comm, &err);
    if (n_head) groups[n_groups++] = (es_param_group){tm.heads, tm.head_grads, opt.head_m, opt.head_v, n_head, NULL}; /* fp32 */
    for (int i = 0; i < tm.params.n_tensors; i++) {
        const es_named_tensor *t = &tm.params.tensors[i];
        if (!train_tensor_trains(&tm, t->name)) continue;
        const size_t numel = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
        int merged = 0; /* a tied head is the embedding: the same range once */
        for (int g = n_head ? 1 : 0; g < n_groups && !merged; g++)
            if (groups[g].params == t->data) merged = 1;
            else if (groups[g].params + groups[g].n == t->data) groups[g].n += numel, merged = 1;
        if (!merged)
            groups[n_groups++] = (es_param_group){t->data, train_grad_of(&tm, t->data), es_params_at(&tm.params, &opt.m, t->data),
                                                  es_params_at(&tm.params, &opt.v, t->data), numel,
                                                  es_working_at(&tm.working, &tm.params, t->data)};
    }
    grad_reducer reducer;
    /* with --zero1 this rank's share of the moments (a resumed run's, or zeros) goes to the device */
    if (grad_reducer_init(&reducer, &tm, groups, n_groups, &comm, zero1, &err) || grad_reducer_scatter(&reducer, &err))
        fail(&comm, &err);
    if (zero1) {
        size_t owned = 0, trained = 0;
        for (int i = 0; i < reducer.n_buckets; i++) trained += reducer.buckets[i].range.n;
        for (int i = 0; i < reducer.n_owned; i++) owned += reducer.owned[i].n;
        es_log("rank %d/%d: --zero1: AdamW's moments of %zu of the %zu trained floats on this device", comm.rank, comm.world, owned,
               trained);
    }
    es_progress progress;
    es_progress_start(&progress, "align", "steps", steps);
    es_progress_add(&progress, step);
    const char *dump = es_config_str(&cfg, "dump-step");
    int rc = ES_OK;
    while (!rc && step < steps) {
        double started = es_now();
        double totals[3 + TRAIN_MAX_MAPPED] = {0}; /* Σ ce, tokens, labelled, Σ latent per layer */
        int64_t aligned = 0;
        reducer.to_all = dump && step == 0; /* rank 0 dumps every gradient */
        for (int micro = 0; !rc && micro < accum; micro++) {
            align_batch batch;
            train_sums sums;
            rc = align_data_next_train(data, &batch, &err);
            /* the last micro-batch's gradients are final as its backward passes each layer: summed over the ranks meanwhile */
            const int last = micro == accum - 1;
            if (!rc) rc = train_forward_backward(&tm, &batch, 1, 1.0f / (float)accum, last ? grad_reducer_layer_done : NULL, &reducer,
                                                 &sums, &err);
            if (rc) break;
            totals[0] += sums.ce / (double)(batch.global_labels ? batch.global_labels : 1) / accum;
            totals[1] += (double)batch.T, totals[2] += (double)batch.global_tokens;
            for (int i = 0; i < n_mapped; i++)
                totals[3 + i] += sums.latent[i] / (double)(batch.global_aligned ? batch.global_aligned : 1) / accum;
            aligned += batch.global_aligned;
        }
        // sum over ranks: the gradients' buckets still in flight, and the loss terms (each already divided by global counts)
        if (!rc) rc = grad_reducer_finish(&reducer, &err);
        if (!rc) rc = comm_allreduce_f64(&comm, totals, 3 + (size_t)n_mapped, &err);
        if (rc) break;
        double latent = 0, ce = totals[0];
        for (int i = 0; i < n_mapped; i++) latent += totals[3 + i] / n_mapped;
        double loss = tm.latent_weight * latent + tm.ce_weight * ce;
        if (!isfinite(loss)) {
            rc = es_fail(&err, ES_ERR_DATA, "step %lld: the loss is not finite (%g): lower --lr or check the data", (long long)step + 1, loss);
            break;
        }
        if (dump && step == 0 && comm.rank == 0) {
            rc = dump_step(dump, &tm, &host, loss, latent, ce, &err);
            if (rc) break;
            es_log("wrote the first step's loss and gradients to %s", dump);
        }
        // clip, then update what trains
        double norm = 0;
        if ((rc = comm.world > 1 ? grad_reducer_norm(&reducer, &norm, &err) : es_grad_norm(dev, groups, n_groups, &norm, &err))) break;
        const float clip_scale = clip > 0 && norm > clip ? (float)(clip / (norm + 1e-6)) : 1.0f;
        const double step_lr = es_lr_at(step, warmup, steps, lr);
        if ((rc = comm.world > 1 ? grad_reducer_step(&reducer, clip_scale, step + 1, step_lr, &opt.config, &err)
                                 : es_adamw_step(dev, groups, n_groups, clip_scale, step + 1, step_lr, &opt.config, &err)))
            break;
        step++;
        double seconds = es_now() - started;
        if (metrics) {
            fprintf(metrics, "{\"step\":%lld,\"loss\":%.9g,\"latent_mse\":%.9g,\"ce\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens_per_s\":%.6g}\n",
                    (long long)step, loss, latent, ce, step_lr, norm, totals[2] / accum * accum / (seconds > 0 ? seconds : 1e-9));
            fflush(metrics);
        }
        es_progress_add_tokens(&progress, (int64_t)totals[2]);
        es_progress_add(&progress, 1);
        // eval and checkpoints
        if ((eval_every && step % eval_every == 0) || step == steps) {
            eval_result result;
            if (align_data_eval_samples(data) > 0 && !(rc = evaluate(&tm, data, &comm, &result, &err)) && metrics && !n_mapped) {
                fprintf(metrics, "{\"step\":%lld,\"eval_ce\":%.9g}\n", (long long)step, result.ce);
                fflush(metrics);
                es_log("step %lld: eval CE %.4f", (long long)step, result.ce);
            } else if (!rc && align_data_eval_samples(data) > 0 && metrics) {
                fprintf(metrics, "{\"step\":%lld,\"eval_latent_mse\":%.9g,\"eval_cosine\":%.9g,\"eval_ce\":%.9g,\"eval_const_mse\":%.9g,\"eval_r2\":%.9g}\n",
                        (long long)step, result.latent_mse, result.cosine, result.ce, result.const_mse, result.r2);
                fflush(metrics);
                es_log("step %lld: eval latent MSE %.5f (constant baseline %.5f, R² %.4f), cosine %.4f, CE %.4f", (long long)step,
                       result.latent_mse, result.const_mse, result.r2, result.cosine, result.ce);
            }
        }
        if (!rc && ((save_every && step % save_every == 0) || step == steps)) {
            align_data_position position = align_data_get_position(data);
            json_t *state_json = json_pack("{sI sI sI sI si ss}", "step", (json_int_t)step, "epoch", (json_int_t)position.epoch,
                                           "index", (json_int_t)position.index, "piece", (json_int_t)position.piece, "world",
                                           comm.world, "resume_key", key_text);
            char *state = state_json ? json_dumps(state_json, JSON_COMPACT) : NULL;
            json_decref(state_json);
            if (!state) {
                rc = es_fail(&err, ES_ERR_RUNTIME, "out of memory");
                break;
            }
            checkpoint_content content = {model_dir, saved.weights, saved.n_weights, saved.head, saved.n_head,
                                          saved.master, saved.m, saved.v, saved.n_state, state};
            /* every rank: the shards' moments onto rank 0 (--zero1) */
            if ((rc = grad_reducer_gather(&reducer, &err))) {
                free(state);
                break;
            }
            int failed = comm.rank == 0 ? host_state_pull(&host, &err) : 0;
            if (!failed && comm.rank == 0) failed = checkpoint_save(out_dir, step, &content, (int)es_config_int(&cfg, "keep-checkpoints"), &err);
            free(state);
            failed = comm_max_int(&comm, failed);
            if (failed) rc = comm.rank == 0 ? failed : es_fail(&err, failed, "rank 0 could not write the checkpoint");
        }
    }
    es_progress_finish(&progress);
    if (metrics) fclose(metrics);
    if (rc) fail(&comm, &err);
    if (comm.rank == 0) {
        plot_metrics(out_dir);
        if (write_fingerprint(fingerprint_path, &cfg, &err)) fail(&comm, &err);
    }
    free_saved(&saved);
    host_state_free(&host);
    grad_reducer_free(&reducer);
    free(groups), free(key_text);
    optimizer_free(&opt, dev, n_head);
    train_model_free(&tm);
    es_device_log_peak(dev);
    comm_leave_device(&comm);
    es_device_close(dev);
    align_data_close(data);
    es_config_free(&cfg);
    comm_finalize(&comm);
    return 0;
}
