/* essence-extract: runs the teacher over texts and writes chosen layers' hidden states to
 * teacher.h5 (docs/teacher-h5.md).
 *
 * main() is the story: read the configuration, find this shard's samples, open (or resume)
 * the output, load the teacher up to its deepest requested layer, then batch by a token
 * budget: tokenise, forward, store, commit; finally record what produced the file. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "backend.h"
#include "config.h"
#include "decoder.h"
#include "files.h"
#include "fingerprint.h"
#include "h5commit.h"
#include "inputs.h"
#include "log.h"
#include "model.h"
#include "progress.h"
#include "resume.h"
#include "stream.h"
#include "teacher.h"
#include "batches.h"

#define TOOL_VERSION "essence 0.1"

static const es_option options[] = {
    {"model", ES_OPT_STRING, NULL, "teacher model folder (config.json, safetensors, tokenizer.json)", NULL},
    {"data", ES_OPT_STRING, NULL, "input samples, JSONL", NULL},
    {"layers", ES_OPT_STRING, NULL, "layers to store, e.g. 20,40,60,80 (0 = embedding output)", NULL},
    {"out", ES_OPT_STRING, NULL, "output teacher.h5", NULL},
    {"tokenizer", ES_OPT_STRING, NULL, "tokenizer.json or folder (default: the model folder)", NULL},
    {"template", ES_OPT_STRING, EXTRACT_DEFAULT_TEMPLATE, "template for prompt/response samples", NULL},
    {"add-bos", ES_OPT_STRING, "auto", "text samples: auto (the tokenizer's own rule), always or never start with the BOS", NULL},
    {"max-seq", ES_OPT_INT, "4096", "longest sample in tokens; a longer one is an error unless --truncate", "[1,2147483647]"},
    {"truncate", ES_OPT_BOOL, "false", "cut samples longer than --max-seq (flagged in /samples/truncated)", NULL},
    {"batch-tokens", ES_OPT_INT, "8192", "tokens per forward batch (whole samples)", "[1,2147483647]"},
    {"shard", ES_OPT_STRING, "0/1", "I/N: this run takes the I-th of N contiguous ranges of samples", NULL},
    {"resume", ES_OPT_BOOL, "false", "continue OUT.partial from its last committed sample", NULL},
    ES_DEVICE_OPTIONS,
    {"chunk-rows", ES_OPT_INT, "0", "latent rows per HDF5 chunk (0: about 1 MiB)", "[0,2147483647]"},
    {"zstd-level", ES_OPT_INT, "3", "Zstandard level of the latent chunks", "[1,22]"},
    {"fingerprint", ES_OPT_STRING, NULL, "the pipeline stage's fingerprint to store in the output (set by essence-run; default: computed)", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

static const char usage[] = "essence-extract --model DIR --data FILE.jsonl --layers 20,40 --out teacher.h5 [options]";

/* Parses "20,40,60" into sorted unique layer indices within [0, n_layers]. */
static int parse_layers(const char *text, int n_layers, int **layers, int *count, es_error *err) {
    *layers = malloc((strlen(text) / 2 + 2) * sizeof **layers);
    *count = 0;
    if (!*layers) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (const char *p = text; *p;) {
        char *end;
        errno = 0;
        long layer = strtol(p, &end, 10);
        if (!isdigit((unsigned char)*p) || errno == ERANGE || end == p || (*end && *end != ',') || (*end == ',' && !end[1])) return es_fail(err, ES_ERR_USAGE, "--layers: \"%s\" is not a list of layer numbers", text);
        if (layer < 0 || layer > n_layers)
            return es_fail(err, ES_ERR_USAGE, "--layers: layer %ld is out of range (the model has layers 0..%d)", layer, n_layers);
        int seen = 0;
        for (int i = 0; i < *count; i++) seen |= (*layers)[i] == layer;
        if (!seen) (*layers)[(*count)++] = (int)layer;
        p = *end ? end + 1 : end;
    }
    if (!*count) return es_fail(err, ES_ERR_USAGE, "--layers: no layers given");
    for (int i = 1; i < *count; i++) /* insertion sort: a handful of layers */
        for (int j = i; j > 0 && (*layers)[j - 1] > (*layers)[j]; j--) {
            int swap = (*layers)[j];
            (*layers)[j] = (*layers)[j - 1], (*layers)[j - 1] = swap;
        }
    return ES_OK;
}

/* The checkpoint up to the deepest stored layer, activations for the largest batch (the token
 * budget, or one sample of --max-seq), the workspace, the layers in what memory is left, then
 * room for the stored layers' copies to the host if any is left. */
static int teacher_open(teacher_model *t, es_device *dev, const char *dir, int deepest, int n_stored, int batch_tokens, int max_seq,
                        es_error *err) {
    memset(t, 0, sizeof *t);
    t->dev = dev, t->deepest = deepest;
    int rc = es_model_open(dir, deepest, 0, &t->store, err);
    const int capacity = batch_tokens > max_seq ? batch_tokens : max_seq;
    if (!rc) rc = es_decoder_create(&t->decoder, dev, &t->store.config, capacity, max_seq, 0, err);
    es_workspace_plan plan = {0};
    if (!rc) es_decoder_plan(t->decoder, &plan), rc = es_device_reserve(dev, &plan, err);
    if (!rc) rc = es_stream_open(&t->layers, dev, &t->store, deepest, err);
    /* the stored layers' copies to the host overlap the compute when what the layers left has room
     * for their snapshots: two in flight, else one, else none (each copy then waits for the GPU) */
    const size_t one_copy = ((size_t)capacity * t->store.config.hidden_size * sizeof(float) + 255) / 256 * 256; /* as the backend pads */
    for (int copies = n_stored < 2 ? n_stored : 2; !rc && copies > 0; copies--) {
        es_error ignored = {0};
        if (!es_device_download_reserve(dev, copies * one_copy, &ignored)) break;
        if (copies == 1) es_log("no room left under --max-memory for copies of the stored layers: each copy to the host waits for the GPU");
    }
    return rc;
}

static void teacher_close(teacher_model *t) {
    es_stream_close(t->layers);
    es_decoder_free(t->decoder);
    es_model_close(&t->store);
}

int main(int argc, char **argv) {
    es_set_program("essence-extract");
    es_device_prepare(argv);
    es_config cfg;
    es_error err = {0};
    static const char *const required[] = {"model", "data", "layers", "out", NULL};
    int begun = es_config_start(&cfg, options, argc, argv, usage,
                                "Runs the teacher over texts and stores chosen layers' hidden states (bf16, zstd) in HDF5.", required, &err);
    if (begun > 0) es_exit_error(&err);
    if (begun == ES_CONFIG_DONE) {
        es_config_free(&cfg);
        return 0;
    }
    const char *model_dir = es_config_str(&cfg, "model"), *data = es_config_str(&cfg, "data"), *out = es_config_str(&cfg, "out");
    es_device_options device_options;
    if (es_device_options_from_config(&cfg, &device_options, &err)) es_exit_error(&err);
    int shard = 0, n_shards = 1;
    if (es_parse_shard(es_config_str(&cfg, "shard"), &shard, &n_shards)) {
        es_fail(&err, ES_ERR_USAGE, "--shard %s: expected I/N with 0 <= I < N", es_config_str(&cfg, "shard"));
        es_exit_error(&err);
    }
    const char *tokenizer_path = es_config_is_set(&cfg, "tokenizer") ? es_config_str(&cfg, "tokenizer") : model_dir;
    const es_named_path inputs[] = {{"data", data}, {"model", model_dir}, {"tokenizer", tokenizer_path}};
    if (es_check_output_clear("out", out, 1, inputs, 3, &err)) es_exit_error(&err);
    if (es_config_is_set(&cfg, "fingerprint") && !es_fingerprint_valid(es_config_str(&cfg, "fingerprint"))) {
        es_fail(&err, ES_ERR_USAGE, "--fingerprint %s: expected 64 lowercase hexadecimal digits", es_config_str(&cfg, "fingerprint"));
        es_exit_error(&err);
    }
    es_add_bos add_bos;
    if (es_add_bos_parse(es_config_str(&cfg, "add-bos"), &add_bos, &err)) es_exit_error(&err);
    int batch_tokens = (int)es_config_int(&cfg, "batch-tokens"), max_seq = (int)es_config_int(&cfg, "max-seq");
    if (batch_tokens < 1 || max_seq < 1) {
        es_fail(&err, ES_ERR_USAGE, "--batch-tokens and --max-seq must be positive");
        es_exit_error(&err);
    }

    // 1. The teacher's shape and the layers to keep.
    es_model_config model_config;
    char *config_text = NULL;
    int *layers = NULL, n_layers = 0;
    if (es_model_config_load(model_dir, &model_config, &config_text, &err) ||
        parse_layers(es_config_str(&cfg, "layers"), model_config.n_layers, &layers, &n_layers, &err))
        es_exit_error(&err);

    // 2. This shard's samples: a contiguous range (counted as the input opens: a pipe is read once).
    extract_input input;
    if (extract_input_open(&input, data, tokenizer_path, add_bos, es_config_str(&cfg, "template"), max_seq, es_config_bool(&cfg, "truncate"),
                           model_config.vocab_size, &err))
        es_exit_error(&err);
    const int64_t total = input.total;
    int64_t first = total * shard / n_shards, end = total * (shard + 1) / n_shards;

    // 3. What the output is made from (its resume key), the device, and the output, new or resumed.
    char model_fp[ES_FINGERPRINT_HEX] = "", tokenizer_fp[ES_FINGERPRINT_HEX] = "", data_fp[ES_FINGERPRINT_HEX] = "";
    char layers_text[1024] = "", tokenizer_file[4200], tokenizer_config_fp[ES_FINGERPRINT_HEX] = "";
    for (int i = 0, n = 0; i < n_layers; i++) n += snprintf(layers_text + n, sizeof layers_text - (size_t)n, "%s%d", i ? "," : "", layers[i]);
    struct stat st;
    snprintf(tokenizer_file, sizeof tokenizer_file, "%s/tokenizer.json", tokenizer_path);
    if (stat(tokenizer_file, &st) != 0 || !S_ISREG(st.st_mode)) snprintf(tokenizer_file, sizeof tokenizer_file, "%s", tokenizer_path);
    /* ids-only input needs no tokenizer: then it has no fingerprint */
    const int have_tokenizer = stat(tokenizer_file, &st) == 0 && S_ISREG(st.st_mode);
    if (es_model_fingerprint(model_dir, model_fp, &err) || es_jsonl_sha256(&input.reader, data_fp, &err) ||
        (have_tokenizer && es_sha256_file(tokenizer_file, tokenizer_fp, &err)) ||
        es_tokenizer_config_sha256(tokenizer_path, tokenizer_config_fp, &err))
        es_exit_error(&err);
    json_t *key = es_resume_key_from_config(&cfg, (const char *const[]){"model", "data", "tokenizer", NULL});
    if (key)
        json_object_set_new(key, "model", json_string(model_fp)), json_object_set_new(key, "data", json_string(data_fp)),
            json_object_set_new(key, "tokenizer", json_string(tokenizer_fp)),
            json_object_set_new(key, "tokenizer_config.json", json_string(tokenizer_config_fp)), json_object_set_new(key, "layers", json_string(layers_text)),
            json_object_set_new(key, "tool version", json_string(TOOL_VERSION));
    char *key_text = key ? es_resume_key_text(key, &err) : NULL;
    json_decref(key);
    if (!key_text) {
        es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        es_exit_error(&err);
    }
    es_partial_state partial = ES_PARTIAL_ABSENT;
    if (es_config_bool(&cfg, "resume")) {
        if (es_h5_resume_partial(out, key_text, &partial, &err)) es_exit_error(&err);
        if (partial == ES_PARTIAL_FINISHED) return 0;
    }
    es_pool *pool = es_pool_create(device_options.threads);
    if (!pool) {
        es_fail(&err, ES_ERR_RUNTIME, "cannot start the worker threads (out of memory, or the limit of processes)");
        es_exit_error(&err);
    }
    device_options.pool = pool;
    es_device *dev;
    if (es_device_open(&dev, &device_options, &err)) es_exit_error(&err);
    es_device_log(dev);
    teacher_options writer_options = {layers, n_layers, model_config.hidden_size, es_config_int(&cfg, "chunk-rows"),
                                      (int)es_config_int(&cfg, "zstd-level"), pool, key_text};
    teacher_writer writer;
    int64_t done = 0;
    if (partial == ES_PARTIAL_COMMITTED) {
        if (teacher_resume(&writer, out, &writer_options, &done, &err)) {
            /* Committed samples it cannot use: say so, and keep the file for a look. */
            es_error_prefix(&err, "cannot resume %s.partial (kept; remove it or run without --resume to start again)", out);
            es_exit_error(&err);
        }
        es_log("resuming %s.partial after %lld committed samples", out, (long long)done);
    } else if (teacher_create(&writer, out, &writer_options, &err)) {
        es_exit_error(&err);
    }

    // 4. The teacher on the device, up to its deepest requested layer.
    teacher_model teacher;
    int rc = teacher_open(&teacher, dev, model_dir, layers[n_layers - 1], n_layers, batch_tokens, max_seq, &err);
    if (rc) {
        teacher_abandon(&writer, writer.committed == 0);
        es_exit_error(&err);
    }

    // 5. Batches of whole samples under the token budget, committed one by one.
    rc = extract_input_skip(&input, first + done, &err);
    extract_batch b = {0};
    extract_batches *batches = NULL;
    if (!rc)
        rc = extract_batches_start(&batches, &teacher, &writer, layers, n_layers, model_config.hidden_size,
                                   batch_tokens > max_seq ? batch_tokens : max_seq, data, model_dir, &err);
    es_progress progress;
    es_progress_start(&progress, "extract", "samples", end - first);
    es_progress_add(&progress, done);
    for (int64_t index = first + done; !rc && index < end; index++) {
        extract_sample sample;
        int got = extract_input_next(&input, &sample, &err);
        if (got <= 0) {
            rc = got < 0 ? err.code : es_fail(&err, ES_ERR_DATA, "%s: ended early", data);
            break;
        }
        if (b.n && b.tokens + sample.n_tokens > batch_tokens) {
            int n = b.n;
            es_progress_add_tokens(&progress, b.tokens);
            rc = extract_batches_run(batches, &b, &err);
            es_progress_add(&progress, n);
        }
        if (rc) {
            extract_sample_free(&sample);
            break;
        }
        rc = extract_batch_add(&b, &sample, &err);
    }
    if (!rc && b.n) {
        int n = b.n;
        es_progress_add_tokens(&progress, b.tokens);
        rc = extract_batches_run(batches, &b, &err);
        es_progress_add(&progress, n);
    }
    if (batches) rc = extract_batches_finish(batches, rc, &err); /* the writer's last commit */
    es_progress_finish(&progress);

    // 6. What made this file.
    char created[64];
    char *yaml = es_config_to_yaml(&cfg);
    /* Options that only describe this run (--resume, --out, ...) leave the fingerprint alone: a resumed
     * file carries the uninterrupted one's. */
    char *yaml_results = es_config_to_yaml_without(&cfg, ES_RUN_ONLY_OPTIONS);
    time_t now = time(NULL);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    char specials[256] = "";
    if (input.tokenizer) es_tokenizer_specials_text(input.tokenizer, specials, sizeof specials);
    /* The tokenizer was used when some sample came as text (ids samples store no text), in this run
     * or in the one it resumes. */
    if (!input.tokenizer && writer.samples.text_total == 0) tokenizer_fp[0] = '\0';
    char fingerprint_input[8192];
    int fp_len = snprintf(fingerprint_input, sizeof fingerprint_input, "%s\n%s\n%s\n%s", yaml_results ? yaml_results : "", model_fp,
                          tokenizer_fp, TOOL_VERSION);
    char fingerprint[ES_FINGERPRINT_HEX];
    es_sha256_hex(fingerprint_input, (size_t)(fp_len < (int)sizeof fingerprint_input ? fp_len : (int)sizeof fingerprint_input - 1), fingerprint);
    if (es_config_is_set(&cfg, "fingerprint")) snprintf(fingerprint, sizeof fingerprint, "%s", es_config_str(&cfg, "fingerprint"));
    const char *attributes[] = {"model_config", config_text, "model_fingerprint", model_fp, "tokenizer_fingerprint", tokenizer_fp,
                                "layers", layers_text, "config", yaml ? yaml : "",
                                "fingerprint", fingerprint, "tool_version", TOOL_VERSION, "created", created,
                                "add_bos", es_add_bos_name(add_bos), "specials_template", specials};
    int64_t tokens_written = writer.samples.tokens;
    /* The one integer attribute (docs/formats.md: integers are int64); the strings follow. */
    if (!rc) rc = es_h5_attr_set_i64(writer.file.id, "hidden_size", model_config.hidden_size, &err);
    if (!rc) rc = teacher_finish(&writer, attributes, (int)(sizeof attributes / sizeof *attributes / 2), &err);
    else teacher_abandon(&writer, err.code == ES_ERR_DATA || writer.committed == 0); /* docs/extract.md: what a failed run keeps */
    if (!rc) es_log("wrote %s: %lld samples, %lld tokens", out, (long long)(end - first), (long long)tokens_written);
    extract_batch_free(&b); /* a batch an error left unrun */
    free(yaml), free(yaml_results), free(config_text), free(layers), free(key_text);
    extract_input_close(&input);
    teacher_close(&teacher);
    if (!rc) es_device_log_peak(dev);
    es_device_close(dev);
    es_pool_destroy(pool);
    es_config_free(&cfg);
    if (rc) es_exit_error(&err);
    return 0;
}
