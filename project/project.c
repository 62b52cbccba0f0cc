/* essence-project: maps teacher hidden states through a fixed random Fourier-feature map into
 * the student's width and aligns them to the student's tokens (docs/project.md).
 *
 * main() is the story: read the configuration, check the precision against σ, open the
 * student's config and tokenizer and the teacher files, resolve the layer map, take the
 * standardisation from the teacher's statistics, draw Ω, then block by block of samples:
 * tokenise with the student's tokenizer, align, project, store; finally record what made the
 * file. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alignment.h"
#include "backend.h"
#include "config.h"
#include "fingerprint.h"
#include "fourier.h"
#include "files.h"
#include "h5commit.h"
#include "log.h"
#include "model.h"
#include "ops.h"
#include "precision.h"
#include "progress.h"
#include "resume.h"
#include "student.h"
#include "teacher_set.h"
#include "tokenizer.h"

#define TOOL_VERSION "essence 0.1"

static const es_option options[] = {
    {"in", ES_OPT_STRING, NULL, "teacher.h5, or its shards in order: a.h5,b.h5,...", NULL},
    {"student", ES_OPT_STRING, NULL, "student model folder (config.json and tokenizer.json are enough)", NULL},
    {"out", ES_OPT_STRING, NULL, "output student.h5", NULL},
    {"layer-map", ES_OPT_STRING, NULL, "TEACHER:STUDENT layer pairs, e.g. 20:7,40:14", NULL},
    {"sigma", ES_OPT_FLOAT, "1.0", "phase standard deviation in radians (Ω_ij ~ N(0, σ²/d))", "(0,)"},
    {"seed", ES_OPT_INT, "0", "seed of Ω (docs/project.md gives the generator)", NULL},
    {"input-norm", ES_OPT_STRING, "standardize", "standardize (the teacher's /stats) or rms (each vector by its RMS)", NULL},
    {"align", ES_OPT_STRING, "exact", "exact or causal token alignment", NULL},
    {"precision", ES_OPT_STRING, "fp32", "GEMM inputs: fp32, tf32, bf16 or fp8 (accumulation is fp32)", NULL},
    {"add-bos", ES_OPT_STRING, "auto", "text samples: auto (the student tokenizer's own rule), always or never start with the BOS", NULL},
    {"force-precision", ES_OPT_BOOL, "false", "use --precision even where its predicted error exceeds 1%", NULL},
    {"resume", ES_OPT_BOOL, "false", "continue OUT.partial from its last committed block", NULL},
    ES_DEVICE_OPTIONS,
    {"fingerprint", ES_OPT_STRING, NULL, "the pipeline stage's fingerprint to store in the output (set by essence-run; default: computed)", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

static const char usage[] = "essence-project --in teacher.h5[,shard2.h5,...] --student DIR --out student.h5 --layer-map 20:7,40:14 [options]";

enum { BLOCK_TOKENS = 2048 }; /* teacher rows per block of whole samples */

/* One entry of the layer map: teacher layer -> student layer, and how its inputs are scaled. */
typedef struct layer_pair {
    int teacher, student;
    float *input_mean, *input_scale; /* (d) host, as stored */
    float *mean, *scale;             /* (d) device, or NULL (rms) */
} layer_pair;

/* Parses "20:7,40:14" and checks it against the teacher file and the student's depth. */
static int parse_layer_map(const char *text, const teacher_set *teacher, const char *teacher_paths, int student_layers,
                           layer_pair **pairs, int *count, es_error *err) {
    *count = 0;
    *pairs = calloc(strlen(text) / 2 + 1, sizeof **pairs);
    if (!*pairs) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (const char *p = text; *p;) {
        char *colon, *end = NULL;
        long from = strtol(p, &colon, 10), to = *colon == ':' ? strtol(colon + 1, &end, 10) : -1;
        /* Digits only: strtol alone would take " 7", "+7" or a value past LONG_MAX. */
        if (!isdigit((unsigned char)*p) || colon == p || *colon != ':' || !isdigit((unsigned char)colon[1]) || end == colon + 1 ||
            (*end && *end != ',') || (*end == ',' && !end[1]) || from > 1000000 || to > 1000000)
            return es_fail(err, ES_ERR_USAGE, "--layer-map: \"%s\" is not a list of TEACHER:STUDENT layer pairs", text);
        if (!teacher_set_has_layer(teacher, (int)from)) {
            char stored[512] = "";
            for (int i = 0, n = 0; i < teacher->n_layers && n < (int)sizeof stored; i++)
                n += snprintf(stored + n, sizeof stored - (size_t)n, "%s%d", i ? "," : "", teacher->layers[i]);
            return es_fail(err, ES_ERR_DATA, "--layer-map: teacher layer %ld is not in %s (it stores layers %s)", from, teacher_paths,
                           stored);
        }
        if (to < 1 || to > student_layers)
            return es_fail(err, ES_ERR_USAGE, "--layer-map: student layer %ld is out of range (the student has layers 1..%d)", to,
                           student_layers);
        for (int i = 0; i < *count; i++)
            if ((*pairs)[i].student == to) return es_fail(err, ES_ERR_USAGE, "--layer-map: student layer %ld appears twice", to);
        (*pairs)[(*count)++] = (layer_pair){(int)from, (int)to, NULL, NULL, NULL, NULL};
        p = *end ? end + 1 : end;
    }
    if (!*count) return es_fail(err, ES_ERR_USAGE, "--layer-map: no layer pairs given");
    return ES_OK;
}

/* Everything a block needs, set up once. */
typedef struct projector {
    const teacher_set *teacher;
    const es_tokenizer *tokenizer;
    es_pool *pool;
    es_device *dev;
    layer_pair *pairs;
    int n_pairs;
    int d, m;                  /* teacher width, phases (student width D = 2m) */
    const float *omega;        // (m, d) device, rounded to --precision (fp8: scaled by 1 / omega_scale first)
    float omega_scale;         /* the phases' factor: 1, or for fp8 the power of two undoing Ω's scaling */
    es_precision precision;
    int rms;                   /* --input-norm rms */
    align_rule rule;
    student_writer *out;
    es_encoding *encodings;    /* one per sample of the block */
    /* device buffers for the largest block, and host copies where the device's memory is not the host's */
    int64_t capacity;          /* teacher rows */
    float *rows, *x_hat, *features;   // (capacity, d), (capacity, d), (capacity, D) device
    int64_t *ref_index;        // (capacity) device
    float *host_rows, *host_features; /* host staging, or the device buffers themselves */
    int64_t student_tokens, aligned_tokens;
    es_fourier_timing timing;
    double io_seconds, tokenize_seconds, standardise_seconds;
} projector;

typedef struct tokenize_job {
    projector *p;
    const teacher_block *block;
    es_error *errors;          /* per sample */
} tokenize_job;

static void tokenize_sample(void *arg, size_t i, int worker) {
    (void)worker;
    tokenize_job *job = arg;
    const teacher_block *b = job->block;
    const char *text = (const char *)b->text + b->text_offset[i];
    size_t len = (size_t)(b->text_offset[i + 1] - b->text_offset[i]);
    es_tokenizer_encode(job->p->tokenizer, text, len, b->add_special_tokens[i], &job->p->encodings[i], &job->errors[i]);
}

static void free_encodings(projector *p, int64_t count) {
    for (int64_t i = 0; i < count; i++) es_encoding_free(&p->encodings[i]);
}

/* The block's student tokens: each sample's text through the student's tokenizer (in
 * parallel; a sample's tokens do not depend on the others), the same add_special_tokens. */
static int tokenize_block(projector *p, const teacher_block *b, es_error *err) {
    for (int64_t i = 0; i < b->count; i++)
        if (b->text_offset[i + 1] == b->text_offset[i])
            return es_fail(err, ES_ERR_DATA,
                           "%s: sample %lld (\"%s\") has no text: it was given as token ids, and project needs the text to align "
                           "the student's tokens",
                           b->shard->path, (long long)(b->first + i), b->ids[i]);
    es_encoding *grown = realloc(p->encodings, (size_t)b->count * sizeof *grown);
    es_error *errors = calloc((size_t)b->count, sizeof *errors);
    if (!grown || !errors) {
        if (grown) p->encodings = grown;
        free(errors);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    p->encodings = grown;
    memset(p->encodings, 0, (size_t)b->count * sizeof *p->encodings);
    tokenize_job job = {p, b, errors};
    es_pool_for(p->pool, (size_t)b->count, tokenize_sample, &job);
    int rc = ES_OK;
    for (int64_t i = 0; i < b->count && !rc; i++)
        if (errors[i].code) {
            *err = errors[i];
            es_error_prefix(err, "%s: sample %lld (\"%s\")", b->shard->path, (long long)(b->first + i), b->ids[i]);
            rc = err->code;
        }
    free(errors);
    if (rc) free_encodings(p, b->count); /* the samples that did tokenise hold theirs */
    return rc;
}

/* x̂ for the referenced teacher rows (checked finite, rounded to the GEMM precision), then their
 * features: both on the device. */
static int project_rows(projector *p, const layer_pair *pair, const int64_t *ref_rows, int64_t n_ref, const teacher_block *b,
                        es_error *err) {
    int64_t first_bad = n_ref;
    const double start = es_now();
    if (es_standardise(p->dev, p->x_hat, &first_bad, p->rows, p->ref_index, pair->mean, pair->scale, n_ref, p->d, p->precision))
        return es_device_take_error(p->dev, err);
    p->standardise_seconds += es_now() - start;
    if (first_bad < n_ref) {
        int64_t row = ref_rows[first_bad], sample = 0;
        while (b->token_offset[sample + 1] <= row) sample++;
        return es_fail(err, ES_ERR_DATA, "%s: /latents/layer_%03d row %lld (sample %lld \"%s\") is not finite: the teacher file holds inf/NaN "
                       "there; extract it again (essence-extract refuses such hidden states, naming the layer)", b->shard->path,
                       pair->teacher, (long long)(b->shard->token_start[b->first] + row), (long long)(b->first + sample),
                       b->ids[sample]);
    }
    if (es_fourier_features(p->dev, p->features, p->x_hat, p->omega, p->omega_scale, (int)n_ref, p->d, p->m, p->precision, &p->timing))
        return es_device_take_error(p->dev, err);
    return ES_OK;
}

/* One block: student tokens, alignment, then per layer pair the targets of the aligned
 * tokens (features of each referenced teacher row computed once), zero rows elsewhere. */
static int project_block(projector *p, const teacher_block *b, es_error *err) {
    double start = es_now();
    int rc = tokenize_block(p, b, err);
    p->tokenize_seconds += es_now() - start;
    if (rc) return rc;

    // 1. Alignment: student token -> teacher row of the block (-1 when none).
    int64_t n_student = 0;
    for (int64_t i = 0; i < b->count; i++) n_student += (int64_t)p->encodings[i].n;
    int64_t *local_row = malloc((size_t)(n_student + 1) * sizeof *local_row);   // (n_student)
    int64_t *set_row = malloc((size_t)(n_student + 1) * sizeof *set_row);       // (n_student) rows of the teacher set
    int64_t *slot = malloc((size_t)(b->tokens + 1) * sizeof *slot);             // (block rows) -> index in ref_rows
    int64_t *ref_rows = malloc((size_t)(b->tokens + 1) * sizeof *ref_rows);     // (n_ref) referenced teacher rows
    int64_t *sample_tokens = malloc((size_t)b->count * sizeof *sample_tokens);  // (count) student tokens kept
    if (!local_row || !set_row || !slot || !ref_rows || !sample_tokens) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int64_t at = 0, n_ref = 0;
    for (int64_t r = 0; !rc && r < b->tokens; r++) slot[r] = -1;
    for (int64_t i = 0; !rc && i < b->count; i++) {
        const es_encoding *e = &p->encodings[i];
        int64_t t0 = b->token_offset[i], n_teacher = b->token_offset[i + 1] - t0, n = (int64_t)e->n;
        if (b->truncated[i]) {
            /* The teacher read only a prefix of the text: the student keeps the tokens that end within it. */
            int32_t covered = 0;
            for (int64_t t = 0; t < n_teacher; t++) covered = b->byte_end[t0 + t] > covered ? b->byte_end[t0 + t] : covered;
            int64_t kept = 0;
            while (kept < n && e->spans[kept][1] <= covered) kept++;
            n = kept;
        }
        sample_tokens[i] = n;
        int32_t *starts = malloc((size_t)(n + 1) * 2 * sizeof *starts), *ends = starts ? starts + n + 1 : NULL;
        if (!starts) {
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            break;
        }
        for (int64_t t = 0; t < n; t++) starts[t] = e->spans[t][0], ends[t] = e->spans[t][1];
        if (align_tokens(local_row + at, starts, ends, (int)n, b->byte_start + t0, b->byte_end + t0, (int)n_teacher, p->rule))
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        free(starts);
        for (int64_t t = 0; !rc && t < n; t++) {
            int64_t row = local_row[at + t];
            if (row < 0) {
                set_row[at + t] = -1;
                continue;
            }
            local_row[at + t] = row += t0;
            set_row[at + t] = b->first_row + row;
            if (slot[row] < 0) slot[row] = n_ref, ref_rows[n_ref++] = row;
            p->aligned_tokens++;
        }
        at += n;
    }
    n_student = at;
    p->student_tokens += n_student;

    // 2. The samples and student tokens.
    start = es_now();
    for (int64_t i = 0, first = 0; !rc && i < b->count; first += sample_tokens[i], i++)
        rc = student_add_sample(p->out, b->ids[i], (const char *)b->text + b->text_offset[i],
                                (size_t)(b->text_offset[i + 1] - b->text_offset[i]), b->truncated[i], b->add_special_tokens[i],
                                p->encodings[i].ids, (const int32_t(*)[2])p->encodings[i].spans, set_row + first,
                                (int)sample_tokens[i], err);
    p->io_seconds += es_now() - start;

    // 3. Targets, layer pair by layer pair.
    const int d = p->d, D = 2 * p->m;
    float *targets = rc ? NULL : malloc((size_t)(n_student + 1) * D * sizeof *targets); // (n_student, D) host
    if (!rc && !targets) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_device_upload(p->dev, p->ref_index, ref_rows, (size_t)n_ref * sizeof *ref_rows, err);
    int loaded_layer = -1;
    for (int l = 0; !rc && l < p->n_pairs; l++) {
        const layer_pair *pair = &p->pairs[l];
        if (pair->teacher != loaded_layer) {
            start = es_now();
            rc = teacher_block_latents(p->teacher, b, pair->teacher, p->host_rows, err);
            if (!rc && p->host_rows != p->rows) rc = es_device_upload(p->dev, p->rows, p->host_rows, (size_t)b->tokens * d * sizeof(float), err);
            p->io_seconds += es_now() - start;
            loaded_layer = pair->teacher;
            if (!rc) rc = project_rows(p, pair, ref_rows, n_ref, b, err);
            if (!rc && p->host_features != p->features)
                rc = es_device_download(p->dev, p->host_features, p->features, (size_t)n_ref * D * sizeof(float), err);
        }
        for (int64_t t = 0; !rc && t < n_student; t++) {
            float *target = targets + (size_t)t * D;
            if (local_row[t] < 0) memset(target, 0, (size_t)D * sizeof *target);
            else memcpy(target, p->host_features + (size_t)slot[local_row[t]] * D, (size_t)D * sizeof *target);
        }
        start = es_now();
        if (!rc) rc = student_add_targets(p->out, l, targets, n_student, err);
        p->io_seconds += es_now() - start;
    }
    free_encodings(p, b->count);
    free(local_row), free(set_row), free(slot), free(ref_rows), free(sample_tokens), free(targets);
    return rc;
}

/* Samples of the block starting at `first`: whole samples up to BLOCK_TOKENS teacher rows (a
 * longer sample makes a block of its own). */
static int64_t block_count(const teacher_shard *shard, int64_t first) {
    int64_t count = 1;
    while (first + count < shard->samples && shard->token_start[first + count + 1] - shard->token_start[first] <= BLOCK_TOKENS)
        count++;
    return count;
}

/* The device's buffers for the largest block, the layers' standardisation and Ω (rounded to
 * the GEMM precision on the device), and the ops' workspace: all allocated once. */
static int projector_prepare(projector *p, const float *omega, es_error *err) {
    es_device *dev = p->dev;
    const int d = p->d, D = 2 * p->m;
    for (int s = 0; s < p->teacher->n_shards; s++) {
        const teacher_shard *shard = &p->teacher->shards[s];
        for (int64_t first = 0, count; first < shard->samples; first += count) {
            count = block_count(shard, first);
            const int64_t rows = shard->token_start[first + count] - shard->token_start[first];
            p->capacity = rows > p->capacity ? rows : p->capacity;
        }
    }
    const size_t n = (size_t)(p->capacity ? p->capacity : 1);
    int rc = es_device_alloc(dev, n * d * sizeof(float), (void **)&p->rows, "a block of teacher rows", err);
    if (!rc) rc = es_device_alloc(dev, n * d * sizeof(float), (void **)&p->x_hat, "a block of standardised rows", err);
    if (!rc) rc = es_device_alloc(dev, n * D * sizeof(float), (void **)&p->features, "a block of features", err);
    if (!rc) rc = es_device_alloc(dev, n * sizeof(int64_t), (void **)&p->ref_index, "a block's row index", err);
    p->host_rows = dev->host_memory ? p->rows : malloc(n * d * sizeof(float));
    p->host_features = dev->host_memory ? p->features : malloc(n * D * sizeof(float));
    if (!rc && (!p->host_rows || !p->host_features)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int l = 0; !rc && l < p->n_pairs; l++) {
        layer_pair *pair = &p->pairs[l];
        if (p->rms) continue; /* es_standardise divides each row by its own RMS */
        rc = es_device_alloc(dev, (size_t)d * sizeof(float), (void **)&pair->mean, "the standardisation", err);
        if (!rc) rc = es_device_alloc(dev, (size_t)d * sizeof(float), (void **)&pair->scale, "the standardisation", err);
        if (!rc) rc = es_device_upload(dev, pair->mean, pair->input_mean, (size_t)d * sizeof(float), err);
        if (!rc) rc = es_device_upload(dev, pair->scale, pair->input_scale, (size_t)d * sizeof(float), err);
    }
    float *omega_device = NULL;
    const size_t omega_bytes = (size_t)p->m * d * sizeof(float);
    if (!rc) rc = es_device_alloc(dev, omega_bytes, (void **)&omega_device, "Ω", err);
    if (!rc) rc = es_device_upload(dev, omega_device, omega, omega_bytes, err);
    /* fp8: Ω is scaled into e4m3's range first (es_fourier_omega_prescale), the phases back */
    const float prescale = es_fourier_omega_prescale(omega, (size_t)p->m * d, p->precision);
    p->omega_scale = 1.0f / prescale;
    if (!rc && prescale != 1.0f && es_scale(dev, omega_device, (size_t)p->m * d, prescale)) rc = es_device_take_error(dev, err);
    if (!rc && es_round_precision(dev, omega_device, (size_t)p->m * d, p->precision)) rc = es_device_take_error(dev, err);
    p->omega = omega_device;
    es_workspace_plan plan = {.tokens = (int)(p->capacity < INT32_MAX ? p->capacity : INT32_MAX), .feature_in = d, .feature_phases = p->m};
    if (!rc) rc = es_device_reserve(dev, &plan, err);
    return rc;
}

static void projector_free(projector *p) {
    es_device *dev = p->dev;
    const size_t n = (size_t)(p->capacity ? p->capacity : 1), d = (size_t)p->d, D = 2 * (size_t)p->m;
    if (p->host_rows != p->rows) free(p->host_rows);
    if (p->host_features != p->features) free(p->host_features);
    es_device_free(dev, p->rows, n * d * sizeof(float)), es_device_free(dev, p->x_hat, n * d * sizeof(float));
    es_device_free(dev, p->features, n * D * sizeof(float)), es_device_free(dev, p->ref_index, n * sizeof(int64_t));
    es_device_free(dev, (float *)p->omega, (size_t)p->m * d * sizeof(float));
    for (int l = 0; l < p->n_pairs; l++)
        es_device_free(dev, p->pairs[l].mean, d * sizeof(float)), es_device_free(dev, p->pairs[l].scale, d * sizeof(float));
}

/* What a --resume must share with the run that began OUT.partial (common/resume.h): the options
 * that shape the result, each teacher file by its resume key (or fingerprint), samples and tokens, and the
 * student's config.json, tokenizer.json and tokenizer_config.json by their SHA-256. NULL and *err set on failure. */
static char *resume_key(const es_config *cfg, const teacher_set *teacher, const char *model_fp, const char *tokenizer_fp,
                        const char *tokenizer_config_fp, es_error *err) {
    json_t *key = es_resume_key_from_config(cfg, (const char *const[]){"in", "student", NULL});
    json_t *shards = json_array();
    for (int s = 0; key && shards && s < teacher->n_shards; s++) {
        const teacher_shard *shard = &teacher->shards[s];
        /* Its resume key says what it was made from by content (its fingerprint also holds paths). */
        char fingerprint[ES_FINGERPRINT_HEX], *made_from = NULL, *text = NULL;
        es_error ignored = {0};
        if (H5Aexists(shard->file.id, "resume_key") > 0) es_h5_attr_get_str(shard->file.id, "resume_key", &made_from, &ignored);
        if (asprintf(&text, "%s %lld %lld", made_from ? made_from : shard->fingerprint ? shard->fingerprint : "",
                     (long long)shard->samples, (long long)shard->token_start[shard->samples]) < 0)
            text = NULL;
        es_sha256_hex(text ? text : "", text ? strlen(text) : 0, fingerprint);
        free(made_from), free(text);
        json_array_append_new(shards, json_string(fingerprint));
    }
    char *text = NULL;
    if (key && shards) {
        char joined[ES_FINGERPRINT_HEX];
        char *list = json_dumps(shards, JSON_COMPACT);
        es_sha256_hex(list ? list : "", list ? strlen(list) : 0, joined);
        free(list);
        json_object_set_new(key, "in", json_string(joined));
        json_object_set_new(key, "student", json_string(model_fp));
        json_object_set_new(key, "student tokenizer.json", json_string(tokenizer_fp));
        json_object_set_new(key, "student tokenizer_config.json", json_string(tokenizer_config_fp));
        json_object_set_new(key, "tool version", json_string(TOOL_VERSION));
        text = es_resume_key_text(key, err);
    } else {
        es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    json_decref(key), json_decref(shards);
    return text;
}

static void fail_usage(es_error *err, const char *fmt, const char *value) {
    es_fail(err, ES_ERR_USAGE, fmt, value);
    es_exit_error(err);
}

/* --out must not be (nor hold, nor lie in) a teacher file of --in's list or the student folder. */
static int check_out_clear(const char *in, const char *student_dir, const char *out, es_error *err) {
    char *list = strdup(in), *save = NULL;
    if (!list) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (char *path = strtok_r(list, ",", &save); !rc && path; path = strtok_r(NULL, ",", &save))
        rc = es_check_output_clear("out", out, 1, &(es_named_path){"in", path}, 1, err);
    free(list);
    return rc ? rc : es_check_output_clear("out", out, 1, &(es_named_path){"student", student_dir}, 1, err);
}

int main(int argc, char **argv) {
    es_set_program("essence-project");
    es_device_prepare(argv);
    double started = es_now();
    es_config cfg;
    es_error err = {0};
    static const char *const required[] = {"in", "student", "out", "layer-map", NULL};
    int begun = es_config_start(&cfg, options, argc, argv, usage,
                                "Maps teacher hidden states through a seeded random Fourier-feature map into the student's width and "
                                "aligns them to the student's tokens.",
                                required, &err);
    if (begun > 0) es_exit_error(&err);
    if (begun == ES_CONFIG_DONE) {
        es_config_free(&cfg);
        return 0;
    }
    const char *in = es_config_str(&cfg, "in"), *student_dir = es_config_str(&cfg, "student"), *out = es_config_str(&cfg, "out");
    if (check_out_clear(in, student_dir, out, &err)) es_exit_error(&err);
    const char *input_norm = es_config_str(&cfg, "input-norm"), *align = es_config_str(&cfg, "align");
    if (strcmp(input_norm, "standardize") && strcmp(input_norm, "rms"))
        fail_usage(&err, "--input-norm %s: expected standardize or rms", input_norm);
    if (strcmp(align, "exact") && strcmp(align, "causal")) fail_usage(&err, "--align %s: expected exact or causal", align);
    es_add_bos add_bos;
    if (es_add_bos_parse(es_config_str(&cfg, "add-bos"), &add_bos, &err)) es_exit_error(&err);
    if (es_config_is_set(&cfg, "fingerprint") && !es_fingerprint_valid(es_config_str(&cfg, "fingerprint")))
        fail_usage(&err, "--fingerprint %s: expected 64 lowercase hexadecimal digits", es_config_str(&cfg, "fingerprint"));
    double sigma = es_config_float(&cfg, "sigma");
    if (!(sigma > 0) || !isfinite(sigma)) fail_usage(&err, "--sigma %s: expected a positive number", es_config_str(&cfg, "sigma"));

    // 1. The GEMM precision must keep the features accurate at this σ (DESIGN.md's table).
    es_precision precision;
    if (precision_parse(es_config_str(&cfg, "precision"), &precision))
        fail_usage(&err, "--precision %s: expected fp32, tf32, bf16 or fp8", es_config_str(&cfg, "precision"));
    double predicted = precision_predicted_error(precision, sigma);
    if (predicted > 0.01 && !es_config_bool(&cfg, "force-precision")) {
        es_fail(&err, ES_ERR_USAGE,
                "--precision %s at --sigma %g: the features' predicted relative error is %.3g, above 1%% (phases of size σ lose "
                "precision in narrow GEMM inputs); use a wider precision, a smaller σ, or --force-precision",
                precision_name(precision), sigma, predicted);
        es_exit_error(&err);
    }

    // 2. The student: its width D = 2m and depth, and its tokenizer.
    es_model_config student;
    char *student_config_text = NULL;
    es_tokenizer *tokenizer = NULL;
    if (es_model_config_load(student_dir, &student, &student_config_text, &err)) es_exit_error(&err);
    if (student.hidden_size % 2) {
        es_fail(&err, ES_ERR_DATA, "%s/config.json: hidden_size %d is odd: the targets are cos/sin pairs, so D must be even",
                student_dir, student.hidden_size);
        es_exit_error(&err);
    }
    char student_tokenizer_path[4200];
    snprintf(student_tokenizer_path, sizeof student_tokenizer_path, "%s/tokenizer.json", student_dir);
    FILE *probe = fopen(student_tokenizer_path, "rb");
    if (!probe) {
        es_fail(&err, ES_ERR_DATA, "%s: missing: the student folder has no tokenizer.json (project tokenises the texts with it)",
                student_tokenizer_path);
        es_exit_error(&err);
    }
    fclose(probe);
    if (es_tokenizer_load(student_dir, &tokenizer, &err) || es_tokenizer_set_add_bos(tokenizer, add_bos, &err)) {
        es_tokenizer_free(tokenizer);
        es_exit_error(&err);
    }
    char specials[256];
    es_tokenizer_specials_text(tokenizer, specials, sizeof specials);

    // 3. The teacher files, as one, and the layer map; the device.
    es_device_options device_options;
    if (es_device_options_from_config(&cfg, &device_options, &err)) es_exit_error(&err);
    es_pool *pool = es_pool_create(device_options.threads);
    if (!pool) {
        es_fail(&err, ES_ERR_RUNTIME, "cannot start the worker threads (out of memory, or the limit of processes)");
        es_exit_error(&err);
    }
    device_options.pool = pool;
    es_device *dev;
    if (es_device_open(&dev, &device_options, &err)) es_exit_error(&err);
    es_device_log(dev);
    teacher_set teacher;
    if (teacher_set_open(&teacher, in, pool, &err)) es_exit_error(&err);
    layer_pair *pairs = NULL;
    int n_pairs = 0;
    if (parse_layer_map(es_config_str(&cfg, "layer-map"), &teacher, in, student.n_layers, &pairs, &n_pairs, &err))
        es_exit_error(&err);
    const int d = teacher.width, m = student.hidden_size / 2;

    // 4. The standardisation of each mapped teacher layer.
    int rms = !strcmp(input_norm, "rms"), rc = ES_OK;
    for (int l = 0; !rc && l < n_pairs; l++) {
        pairs[l].input_mean = malloc((size_t)d * sizeof(float));
        pairs[l].input_scale = malloc((size_t)d * sizeof(float));
        if (!pairs[l].input_mean || !pairs[l].input_scale) rc = es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        else if (rms)
            for (int k = 0; k < d; k++) pairs[l].input_mean[k] = 0, pairs[l].input_scale[k] = 1;
        else rc = teacher_set_standardisation(&teacher, pairs[l].teacher, pairs[l].input_mean, pairs[l].input_scale, &err);
    }
    if (rc) es_exit_error(&err);

    // 5. Ω, stored as drawn; the GEMM sees it rounded to --precision.
    float *omega = malloc((size_t)m * d * sizeof *omega);
    if (!omega) {
        es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        es_exit_error(&err);
    }
    uint64_t seed = (uint64_t)es_config_int(&cfg, "seed");
    es_fourier_omega(omega, m, d, sigma, seed);

    // 6. The output, then every sample of every shard in order, block by block.
    int *student_layers = malloc((size_t)n_pairs * sizeof *student_layers), *teacher_layers = malloc((size_t)n_pairs * sizeof *teacher_layers);
    const float **means = malloc((size_t)n_pairs * sizeof *means), **scales = malloc((size_t)n_pairs * sizeof *scales);
    if (!student_layers || !teacher_layers || !means || !scales) {
        es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        es_exit_error(&err);
    }
    for (int l = 0; l < n_pairs; l++)
        student_layers[l] = pairs[l].student, teacher_layers[l] = pairs[l].teacher, means[l] = pairs[l].input_mean,
        scales[l] = pairs[l].input_scale;
    // The output: new, or resumed where another run of the same inputs and options stopped.
    char model_fp[ES_FINGERPRINT_HEX] = "", tokenizer_fp[ES_FINGERPRINT_HEX] = "", config_path[4200];
    snprintf(config_path, sizeof config_path, "%s/config.json", student_dir);
    char *key_text = NULL;
    if (!rc) rc = es_sha256_file(config_path, model_fp, &err);
    if (!rc) rc = es_sha256_file(student_tokenizer_path, tokenizer_fp, &err);
    char tokenizer_config_fp[ES_FINGERPRINT_HEX] = "";
    if (!rc) rc = es_tokenizer_config_sha256(student_dir, tokenizer_config_fp, &err);
    if (!rc) key_text = resume_key(&cfg, &teacher, model_fp, tokenizer_fp, tokenizer_config_fp, &err);
    if (!key_text) es_exit_error(&err);
    es_partial_state partial = ES_PARTIAL_ABSENT;
    if (es_config_bool(&cfg, "resume")) {
        if (es_h5_resume_partial(out, key_text, &partial, &err)) es_exit_error(&err);
        if (partial == ES_PARTIAL_FINISHED) return 0;
    }
    student_writer writer;
    int64_t done = 0;
    if (partial == ES_PARTIAL_COMMITTED) {
        rc = student_resume(&writer, out, student_layers, n_pairs, student.hidden_size, pool, &done, &err);
        if (rc) {
            es_error_prefix(&err, "cannot resume %s.partial (kept; remove it or run without --resume to start again)", out);
            es_exit_error(&err);
        }
        es_log("resuming %s.partial after %lld committed samples", out, (long long)done);
    } else {
        rc = student_create(&writer, out, student_layers, n_pairs, student.hidden_size, pool, &err);
        if (!rc) rc = student_write_projection(&writer, omega, m, d, teacher_layers, means, scales, n_pairs, &err);
        if (!rc) rc = student_set_resume_key(&writer, key_text, &err);
        if (rc) {
            if (writer.file.path) student_abandon(&writer, 1);
            es_exit_error(&err);
        }
    }
    projector p = {.teacher = &teacher, .tokenizer = tokenizer, .pool = pool, .dev = dev, .pairs = pairs, .n_pairs = n_pairs,
                   .d = d, .m = m, .precision = precision, .rms = rms,
                   .rule = strcmp(align, "causal") ? ALIGN_EXACT : ALIGN_CAUSAL, .out = &writer};
    if (!rc) rc = projector_prepare(&p, omega, &err);
    if (rc) {
        student_abandon(&writer, partial != ES_PARTIAL_COMMITTED);
        es_exit_error(&err);
    }
    es_progress progress;
    es_progress_start(&progress, "project", "samples", teacher.samples);
    es_progress_add(&progress, done);
    /* Blocks start where the uninterrupted run's do (block_count depends only on where a block
     * starts), and every commit ends a block: a resumed run skips whole blocks. */
    int64_t skip = done;
    for (int s = 0; !rc && s < teacher.n_shards; s++) {
        const teacher_shard *shard = &teacher.shards[s];
        for (int64_t first = 0; !rc && first < shard->samples;) {
            const int64_t count = block_count(shard, first);
            if (skip >= count) {
                skip -= count, first += count;
                continue;
            }
            if (skip) {
                rc = es_fail(&err, ES_ERR_DATA, "%s.partial: its last commit (%lld samples) does not end a block", out, (long long)done);
                break;
            }
            teacher_block block;
            double start = es_now();
            rc = teacher_block_read(&teacher, shard, first, count, &block, &err);
            p.io_seconds += es_now() - start;
            if (!rc) rc = project_block(&p, &block, &err);
            start = es_now();
            if (!rc) rc = student_commit(&writer, &err);
            p.io_seconds += es_now() - start;
            es_progress_add_tokens(&progress, block.tokens);
            es_progress_add(&progress, count);
            teacher_block_free(&block);
            first += count;
        }
    }
    es_progress_finish(&progress);

    // 7. What made this file (the fingerprint leaves out what only describes this run: --resume, --out).
    char *yaml = es_config_to_yaml(&cfg);
    char *yaml_results = es_config_to_yaml_without(&cfg, ES_RUN_ONLY_OPTIONS);
    char created[64];
    size_t fps_size = (size_t)teacher.n_shards * ES_FINGERPRINT_HEX + 1, text_size = fps_size + (yaml ? strlen(yaml) : 0) + 512;
    char *teacher_fps = calloc(1, fps_size), *fingerprint_input = malloc(text_size);
    char layer_map[1024] = "", layers_text[1024] = "", fingerprint[ES_FINGERPRINT_HEX];
    for (int s = 0; teacher_fps && s < teacher.n_shards; s++)
        strcat(strcat(teacher_fps, s ? "," : ""), teacher.shards[s].fingerprint ? teacher.shards[s].fingerprint : "");
    for (int l = 0, n = 0, k = 0; l < n_pairs; l++) {
        n += snprintf(layer_map + n, sizeof layer_map - (size_t)n, "%s%d:%d", l ? "," : "", pairs[l].teacher, pairs[l].student);
        k += snprintf(layers_text + k, sizeof layers_text - (size_t)k, "%s%d", l ? "," : "", pairs[l].student);
    }
    time_t now = time(NULL);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    if (!rc && (!teacher_fps || !fingerprint_input)) rc = es_fail(&err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) {
        int n = snprintf(fingerprint_input, text_size, "%s\n%s\n%s\n%s\n%s", yaml_results ? yaml_results : "", teacher_fps, model_fp, tokenizer_fp, TOOL_VERSION);
        es_sha256_hex(fingerprint_input, (size_t)n, fingerprint);
        if (es_config_is_set(&cfg, "fingerprint")) snprintf(fingerprint, sizeof fingerprint, "%s", es_config_str(&cfg, "fingerprint"));
        const student_attribute attributes[] = {
            {"model_config", 's', student_config_text, 0, 0}, {"model_fingerprint", 's', model_fp, 0, 0},
            {"tokenizer_fingerprint", 's', tokenizer_fp, 0, 0}, {"layers", 's', layers_text, 0, 0},
            {"hidden_size", 'i', NULL, 0, student.hidden_size}, {"config", 's', yaml ? yaml : "", 0, 0},
            {"fingerprint", 's', fingerprint, 0, 0}, {"tool_version", 's', TOOL_VERSION, 0, 0},
            {"created", 's', created, 0, 0}, {"teacher_fingerprints", 's', teacher_fps, 0, 0},
            {"layer_map", 's', layer_map, 0, 0}, {"sigma", 'f', NULL, sigma, 0},
            {"seed", 'i', NULL, 0, (int64_t)seed}, {"input_norm", 's', input_norm, 0, 0},
            {"align", 's', align, 0, 0}, {"precision", 's', precision_name(precision), 0, 0},
            {"add_bos", 's', es_add_bos_name(add_bos), 0, 0}, {"specials_template", 's', specials, 0, 0},
        };
        rc = student_finish(&writer, attributes, (int)(sizeof attributes / sizeof *attributes), &err);
    } else {
        /* Kept for --resume when it holds a commit, unless the input was bad: the same inputs would
         * fail again, and others cannot resume it. */
        student_abandon(&writer, err.code == ES_ERR_DATA || writer.committed == 0);
    }
    if (!rc) {
        double gemm_rate = p.timing.gemm_seconds > 0 ? p.timing.gemm_flops / p.timing.gemm_seconds / 1e9 : 0;
        es_log("wrote %s: %lld samples, %lld student tokens, %lld aligned (%.1f%%)", out, (long long)teacher.samples,
               (long long)p.student_tokens, (long long)p.aligned_tokens,
               p.student_tokens ? 100.0 * (double)p.aligned_tokens / (double)p.student_tokens : 0.0);
        es_log("time: gemm %.3f s (%.1f GFLOP/s), standardise %.3f s, features %.3f s, hdf5+zstd %.3f s, tokenize %.3f s, total %.3f s",
               p.timing.gemm_seconds, gemm_rate, p.standardise_seconds, p.timing.epilogue_seconds, p.io_seconds, p.tokenize_seconds,
               es_now() - started);
    }
    for (int l = 0; l < n_pairs; l++) free(pairs[l].input_mean), free(pairs[l].input_scale);
    projector_free(&p);
    if (!rc) es_device_log_peak(dev);
    es_device_close(dev);
    free(pairs), free(omega), free(student_layers), free(teacher_layers), free(means), free(scales);
    free(yaml), free(yaml_results), free(teacher_fps), free(fingerprint_input), free(student_config_text), free(p.encodings), free(key_text);
    teacher_set_close(&teacher);
    es_tokenizer_free(tokenizer);
    es_pool_destroy(pool);
    es_config_free(&cfg);
    if (rc) es_exit_error(&err);
    return 0;
}
