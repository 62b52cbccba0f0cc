/* essence-eval: measures a model (docs/eval.md): greedy generation with an exact-match answer
 * check for {"prompt", "answer"} records, cross entropy and perplexity for {"text"} (or {"ids"})
 * records, one JSON line per sample and a summary line.
 *
 * main() is the story: read the configuration, open the tasks and the model, then take the
 * records in order: texts one at a time, prompts gathered --batch at a time and generated side
 * by side; write each result as it is known, the summary last, and rename the finished file. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "answer.h"
#include "backend.h"
#include "config.h"
#include "files.h"
#include "fingerprint.h"
#include "generate.h"
#include "inputs.h"
#include "log.h"
#include "progress.h"
#include "resume.h"
#include "tokenizer.h"

#define TOOL_VERSION "essence 0.1"

static const es_option options[] = {
    {"model", ES_OPT_STRING, NULL, "model folder (config.json, safetensors, tokenizer.json)", NULL},
    {"data", ES_OPT_STRING, NULL, "tasks, JSONL: {\"id\", \"prompt\", \"answer\"} to generate, {\"id\", \"text\"} or {\"id\", \"ids\"} to score", NULL},
    {"out", ES_OPT_STRING, NULL, "results, JSONL: a line per sample, then a summary line", NULL},
    {"tokenizer", ES_OPT_STRING, NULL, "tokenizer.json or folder (default: the model folder)", NULL},
    {"template", ES_OPT_STRING, EXTRACT_DEFAULT_TEMPLATE, "template for prompts (the text up to {response} is the model's prompt)", NULL},
    {"add-bos", ES_OPT_STRING, "auto", "text records: auto (the tokenizer's own rule), always or never start with the BOS", NULL},
    {"max-new-tokens", ES_OPT_INT, "256", "tokens generated per prompt at most", "[1,2147483647]"},
    {"answer-regex", ES_OPT_STRING, NULL, "the answer is the last match of this PCRE2 pattern (its first group if it has one; default: the last number)", NULL},
    {"answer-marker", ES_OPT_STRING, NULL, "the answer is the rest of the line after the last occurrence of this text", NULL},
    {"batch", ES_OPT_INT, "8", "prompts generated side by side", "[1,4096]"},
    {"batch-tokens", ES_OPT_INT, "4096", "tokens per forward pass (longer prompts and texts take several)", "[1,2147483647]"},
    {"max-seq", ES_OPT_INT, "4096", "longest prompt plus generation, and longest text, in tokens", "[2,2147483647]"},
    ES_DEVICE_OPTIONS,
    {"fingerprint", ES_OPT_STRING, NULL, "the pipeline stage's fingerprint to store in the summary (set by essence-run; default: computed)", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

static const char usage[] = "essence-eval --model DIR --data tasks.jsonl --out results.jsonl [options]";

typedef struct tally {
    long prompts, correct, answered, eos;
    long texts, predicted;
    double ce_sum;
} tally;

/* A record's result line, written and flushed (an error writing is a runtime error naming the file). */
static int put_line(FILE *out, const char *path, json_t *line, es_error *err) {
    char *text = line ? json_dumps(line, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
    json_decref(line);
    if (!text) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    const int bad = fputs(text, out) < 0 || fputc('\n', out) < 0;
    free(text);
    return bad ? es_fail(err, ES_ERR_RUNTIME, "%s.partial: %s", path, strerror(errno)) : ES_OK;
}

static json_t *ids_array(const int32_t *ids, int n) {
    json_t *array = json_array();
    for (int i = 0; array && i < n; i++) json_array_append_new(array, json_integer(ids[i]));
    return array;
}

/* The prompts gathered so far, generated side by side, their lines written in input order. */
typedef struct prompt_batch {
    extract_sample *samples;
    eval_generation *gens;
    int n, cap;
} prompt_batch;

static int run_prompts(prompt_batch *b, eval_model *m, const es_tokenizer *tok, const eval_answer_rule *rule, int max_new, FILE *out,
                       const char *out_path, tally *t, es_error *err) {
    for (int i = 0; i < b->n; i++) b->gens[i].prompt = b->samples[i].ids, b->gens[i].prompt_len = b->samples[i].n_tokens;
    int rc = eval_generate(m, b->gens, b->n, max_new, err);
    for (int i = 0; !rc && i < b->n; i++) {
        const extract_sample *s = &b->samples[i];
        const eval_generation *g = &b->gens[i];
        char *text = NULL;
        size_t len = 0;
        rc = es_tokenizer_decode(tok, g->ids, (size_t)g->n, &text, &len, err);
        int oom = 0;
        char *found = rc ? NULL : eval_answer_extract(rule, text, len, &oom);
        char *expected = rc ? NULL : eval_answer_normalise(s->answer, strlen(s->answer));
        if (!rc && (oom || !expected)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        const int correct = !rc && found && !strcmp(found, expected);
        if (!rc) {
            t->prompts++, t->correct += correct, t->answered += found != NULL, t->eos += g->stop == EVAL_STOP_EOS;
            json_t *line = json_pack("{s:s, s:s, s:i, s:o, s:s%, s:s, s:o, s:s, s:b}", "id", s->id, "kind", "generate", "prompt_tokens",
                                     s->n_tokens, "generated_ids", ids_array(g->ids, g->n), "generated", text, len, "stop",
                                     eval_stop_name(g->stop), "extracted", found ? json_string(found) : json_null(), "answer", expected,
                                     "correct", correct);
            rc = put_line(out, out_path, line, err);
        }
        free(text), free(found), free(expected);
    }
    for (int i = 0; i < b->n; i++) extract_sample_free(&b->samples[i]);
    b->n = 0;
    return rc;
}

static int run_text(const extract_sample *s, eval_model *m, FILE *out, const char *out_path, tally *t, es_error *err) {
    double ce_sum = 0;
    int rc = s->n_tokens >= 2 ? eval_cross_entropy(m, s->ids, s->n_tokens, &ce_sum, err) : ES_OK;
    if (rc) return rc;
    const int predicted = s->n_tokens - 1;
    t->texts++, t->predicted += predicted, t->ce_sum += ce_sum;
    json_t *line = json_pack("{s:s, s:s, s:i, s:i, s:f, s:o, s:o}", "id", s->id, "kind", "text", "tokens", s->n_tokens, "predicted",
                             predicted, "ce_sum", ce_sum, "ce", predicted ? json_real(ce_sum / predicted) : json_null(), "perplexity",
                             predicted ? json_real(exp(ce_sum / predicted)) : json_null());
    return put_line(out, out_path, line, err);
}

static json_t *summary_line(const tally *t, const char *fingerprint, const char *model_fp, const char *data_fp) {
    double low, high;
    eval_wilson_interval(t->correct, t->prompts, &low, &high);
    json_t *generate = json_pack("{s:I, s:I, s:I, s:I, s:o, s:[f, f]}", "samples", (json_int_t)t->prompts, "correct", (json_int_t)t->correct,
                                 "answered", (json_int_t)t->answered, "stopped_at_eos", (json_int_t)t->eos, "accuracy",
                                 t->prompts ? json_real((double)t->correct / t->prompts) : json_null(), "wilson95", low, high);
    const double mean = t->predicted ? t->ce_sum / t->predicted : 0;
    json_t *text = json_pack("{s:I, s:I, s:o, s:o}", "samples", (json_int_t)t->texts, "predicted", (json_int_t)t->predicted, "mean_ce",
                             t->predicted ? json_real(mean) : json_null(), "perplexity", t->predicted ? json_real(exp(mean)) : json_null());
    return json_pack("{s:b, s:o, s:o, s:s, s:s, s:s, s:s}", "summary", 1, "generate", generate, "text", text, "fingerprint", fingerprint,
                     "model_fingerprint", model_fp, "data_fingerprint", data_fp, "tool_version", TOOL_VERSION);
}

int main(int argc, char **argv) {
    es_set_program("essence-eval");
    es_device_prepare(argv);
    es_config cfg;
    es_error err = {0};
    static const char *const required[] = {"model", "data", "out", NULL};
    int begun = es_config_start(&cfg, options, argc, argv, usage,
                                "Measures a model: greedy generation checked against answers, and cross entropy of texts.", required, &err);
    if (begun > 0) es_exit_error(&err);
    if (begun == ES_CONFIG_DONE) {
        es_config_free(&cfg);
        return 0;
    }
    const char *model_dir = es_config_str(&cfg, "model"), *data = es_config_str(&cfg, "data"), *out_path = es_config_str(&cfg, "out");
    const char *tokenizer_path = es_config_is_set(&cfg, "tokenizer") ? es_config_str(&cfg, "tokenizer") : model_dir;
    const int max_new = (int)es_config_int(&cfg, "max-new-tokens"), batch = (int)es_config_int(&cfg, "batch");
    const int batch_tokens = (int)es_config_int(&cfg, "batch-tokens"), max_seq = (int)es_config_int(&cfg, "max-seq");
    const es_named_path inputs[] = {{"data", data}, {"model", model_dir}, {"tokenizer", tokenizer_path}};
    if (es_check_output_clear("out", out_path, 1, inputs, 3, &err)) es_exit_error(&err);
    if (es_config_is_set(&cfg, "fingerprint") && !es_fingerprint_valid(es_config_str(&cfg, "fingerprint"))) {
        es_fail(&err, ES_ERR_USAGE, "--fingerprint %s: expected 64 lowercase hexadecimal digits", es_config_str(&cfg, "fingerprint"));
        es_exit_error(&err);
    }
    if (batch_tokens < batch) {
        es_fail(&err, ES_ERR_USAGE, "--batch-tokens %d is less than --batch %d: each step feeds one token per prompt", batch_tokens, batch);
        es_exit_error(&err);
    }
    es_add_bos add_bos;
    eval_answer_rule *rule = NULL;
    if (es_add_bos_parse(es_config_str(&cfg, "add-bos"), &add_bos, &err) ||
        eval_answer_rule_create(&rule, es_config_is_set(&cfg, "answer-regex") ? es_config_str(&cfg, "answer-regex") : NULL,
                                es_config_is_set(&cfg, "answer-marker") ? es_config_str(&cfg, "answer-marker") : NULL, &err))
        es_exit_error(&err);

    // 1. The tasks, and what the results are made from.
    es_model_config model_config;
    char *config_text = NULL;
    if (es_model_config_load(model_dir, &model_config, &config_text, &err)) es_exit_error(&err);
    free(config_text);
    extract_input input;
    if (extract_input_open(&input, data, tokenizer_path, add_bos, es_config_str(&cfg, "template"), max_seq, 0, model_config.vocab_size, &err))
        es_exit_error(&err);
    input.answers = 1;
    char model_fp[ES_FINGERPRINT_HEX] = "", data_fp[ES_FINGERPRINT_HEX] = "", fingerprint[ES_FINGERPRINT_HEX] = "";
    char tokenizer_fp[ES_FINGERPRINT_HEX] = "", tokenizer_config_fp[ES_FINGERPRINT_HEX] = "", tokenizer_file[4200];
    struct stat st;
    snprintf(tokenizer_file, sizeof tokenizer_file, "%s/tokenizer.json", tokenizer_path);
    if (stat(tokenizer_file, &st) != 0 || !S_ISREG(st.st_mode)) snprintf(tokenizer_file, sizeof tokenizer_file, "%s", tokenizer_path);
    const int have_tokenizer = stat(tokenizer_file, &st) == 0 && S_ISREG(st.st_mode); /* ids records need none */
    if (es_model_fingerprint(model_dir, model_fp, &err) || es_jsonl_sha256(&input.reader, data_fp, &err) ||
        (have_tokenizer && es_sha256_file(tokenizer_file, tokenizer_fp, &err)) ||
        es_tokenizer_config_sha256(tokenizer_path, tokenizer_config_fp, &err))
        es_exit_error(&err);
    char *yaml = es_config_to_yaml_without(&cfg, ES_RUN_ONLY_OPTIONS);
    char *recipe = NULL;
    if (!yaml || asprintf(&recipe, "%s\n%s\n%s\n%s\n%s\n%s", yaml, model_fp, data_fp, tokenizer_fp, tokenizer_config_fp, TOOL_VERSION) < 0) {
        es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        es_exit_error(&err);
    }
    es_sha256_hex(recipe, strlen(recipe), fingerprint);
    if (es_config_is_set(&cfg, "fingerprint")) snprintf(fingerprint, sizeof fingerprint, "%s", es_config_str(&cfg, "fingerprint"));
    free(yaml), free(recipe);

    // 2. The model on the device.
    es_device_options device_options;
    if (es_device_options_from_config(&cfg, &device_options, &err)) es_exit_error(&err);
    es_device *dev;
    if (es_device_open(&dev, &device_options, &err)) es_exit_error(&err);
    es_device_log(dev);
    eval_model model;
    if (eval_model_open(&model, dev, model_dir, batch, max_seq, batch_tokens, &err)) es_exit_error(&err);

    // 3. The records in order, into OUT.partial.
    char partial[4200];
    snprintf(partial, sizeof partial, "%s.partial", out_path);
    es_make_parent_dirs(partial);
    FILE *out = fopen(partial, "w");
    if (!out) {
        es_fail(&err, ES_ERR_RUNTIME, "%s: %s", partial, strerror(errno));
        es_exit_error(&err);
    }
    prompt_batch b = {calloc((size_t)batch, sizeof *b.samples), calloc((size_t)batch, sizeof *b.gens), 0, batch};
    int rc = b.samples && b.gens ? ES_OK : es_fail(&err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < batch; i++)
        if (!(b.gens[i].ids = malloc((size_t)max_new * sizeof *b.gens[i].ids))) rc = es_fail(&err, ES_ERR_RUNTIME, "out of memory");
    tally t = {0};
    es_progress progress;
    es_progress_start(&progress, "eval", "samples", input.total);
    while (!rc) {
        extract_sample sample;
        int got = extract_input_next(&input, &sample, &err);
        if (got < 0) rc = err.code;
        if (got <= 0) break;
        if (!sample.answer) { /* a text to score: the prompts before it are written first, to keep the order */
            if (b.n) rc = run_prompts(&b, &model, input.tokenizer, rule, max_new, out, out_path, &t, &err);
            if (!rc) rc = run_text(&sample, &model, out, out_path, &t, &err);
            es_progress_add_tokens(&progress, sample.n_tokens), es_progress_add(&progress, 1);
            extract_sample_free(&sample);
            continue;
        }
        b.samples[b.n++] = sample;
        if (b.n == b.cap) {
            const int n = b.n;
            rc = run_prompts(&b, &model, input.tokenizer, rule, max_new, out, out_path, &t, &err);
            es_progress_add(&progress, n);
        }
    }
    if (!rc && b.n) {
        const int n = b.n;
        rc = run_prompts(&b, &model, input.tokenizer, rule, max_new, out, out_path, &t, &err);
        es_progress_add(&progress, n);
    }
    es_progress_finish(&progress);

    // 4. The summary, and the finished file under its name.
    if (!rc) rc = put_line(out, out_path, summary_line(&t, fingerprint, model_fp, data_fp), &err);
    if (!rc && (fflush(out) || fsync(fileno(out)))) rc = es_fail(&err, ES_ERR_RUNTIME, "%s: %s", partial, strerror(errno));
    if (fclose(out) && !rc) rc = es_fail(&err, ES_ERR_RUNTIME, "%s: %s", partial, strerror(errno));
    if (!rc && rename(partial, out_path)) rc = es_fail(&err, ES_ERR_RUNTIME, "cannot rename %s to %s: %s", partial, out_path, strerror(errno));
    if (!rc) es_fsync_parent(out_path, &err);
    if (rc) unlink(partial); /* nothing half-written is left to look like results */
    if (!rc) {
        double low, high;
        eval_wilson_interval(t.correct, t.prompts, &low, &high);
        if (t.prompts) es_log("%ld prompts: accuracy %.4f (95%% interval %.4f..%.4f)", t.prompts, (double)t.correct / t.prompts, low, high);
        if (t.predicted) es_log("%ld texts: mean cross entropy %.4f over %ld predictions", t.texts, t.ce_sum / t.predicted, t.predicted);
        es_log("wrote %s", out_path);
    }
    for (int i = 0; i < b.n; i++) extract_sample_free(&b.samples[i]);
    for (int i = 0; b.gens && i < batch; i++) free(b.gens[i].ids);
    free(b.samples), free(b.gens);
    eval_model_close(&model);
    es_device_close(dev);
    extract_input_close(&input);
    eval_answer_rule_free(rule);
    es_config_free(&cfg);
    if (rc) es_exit_error(&err);
    return 0;
}
