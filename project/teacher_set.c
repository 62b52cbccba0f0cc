#include "teacher_set.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5rows.h"

/* All n values of a 1-D dataset, read as elem (HDF5 converts and we check, h5rows.h). */
static int read_whole(hid_t file, const char *path, const char *name, es_h5_elem elem, int64_t n, void *out, es_error *err) {
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) return es_fail(err, ES_ERR_DATA, "%s: %s is missing", path, name);
    es_rows_reader reader;
    int rc = es_rows_open_column(&reader, file, name, elem, NULL, err);
    if (rc) return rc;
    if (reader.rows != n)
        rc = es_fail(err, ES_ERR_DATA, "%s: %s has %lld values, expected %lld", path, name, (long long)reader.rows, (long long)n);
    else
        rc = es_rows_read(&reader, 0, n, out, err);
    es_rows_close_reader(&reader);
    return rc;
}

/* The length of a 1-D dataset, or -1 when it is missing or not 1-D. */
static int64_t dataset_length(hid_t file, const char *name) {
    hid_t dataset = H5Lexists(file, name, H5P_DEFAULT) > 0 ? H5Dopen2(file, name, H5P_DEFAULT) : -1;
    if (dataset < 0) return -1;
    hid_t space = H5Dget_space(dataset);
    hsize_t dims[2] = {0, 0};
    int rank = space >= 0 ? H5Sget_simple_extent_dims(space, dims, NULL) : -1;
    if (space >= 0) H5Sclose(space);
    H5Dclose(dataset);
    return rank == 1 ? (int64_t)dims[0] : -1;
}

/* A row pointer: starts at 0, never decreases, ends at `total`. */
static int check_pointer(const int64_t *pointer, int64_t samples, int64_t total, const char *path, const char *name, es_error *err) {
    if (pointer[0] != 0) return es_fail(err, ES_ERR_DATA, "%s: %s[0] is %lld, not 0", path, name, (long long)pointer[0]);
    for (int64_t s = 0; s < samples; s++)
        if (pointer[s + 1] < pointer[s])
            return es_fail(err, ES_ERR_DATA, "%s: %s decreases at sample %lld", path, name, (long long)s);
    if (pointer[samples] != total)
        return es_fail(err, ES_ERR_DATA, "%s: %s ends at %lld but the data has %lld", path, name, (long long)pointer[samples],
                       (long long)total);
    return ES_OK;
}

static int parse_layers(const char *text, int **layers, int *count) {
    *layers = malloc((strlen(text) / 2 + 2) * sizeof **layers);
    *count = 0;
    if (!*layers) return -1;
    for (const char *p = text; *p;) {
        char *end;
        long layer = strtol(p, &end, 10);
        if (end == p || layer < 0 || layer > 9999 || (*end && *end != ',')) return -1;
        (*layers)[(*count)++] = (int)layer;
        p = *end ? end + 1 : end;
    }
    return *count ? 0 : -1;
}

/* The root attribute layers: the string "20,40" we write, or an array of integers. */
static int read_layers(hid_t file, const char *path, int **layers, int *count, es_error *err) {
    *layers = NULL, *count = 0;
    hid_t attr = H5Aexists(file, "layers") > 0 ? H5Aopen(file, "layers", H5P_DEFAULT) : -1;
    hid_t type = attr >= 0 ? H5Aget_type(attr) : -1, space = attr >= 0 ? H5Aget_space(attr) : -1;
    hssize_t points = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    int rc = ES_OK;
    if (attr < 0) {
        rc = es_fail(err, ES_ERR_DATA, "%s: root attribute layers is missing", path);
    } else if (type >= 0 && H5Tget_class(type) == H5T_INTEGER && points >= 1 && points <= 10000) {
        int64_t *values = malloc((size_t)points * sizeof *values);
        *layers = malloc((size_t)points * sizeof **layers);
        if (!values || !*layers) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else if (H5Aread(attr, H5T_NATIVE_INT64, values) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: root attribute layers cannot be read: %s", path, es_h5_last_error());
        for (hssize_t i = 0; !rc && i < points; i++) {
            if (values[i] < 0 || values[i] > 9999)
                rc = es_fail(err, ES_ERR_DATA, "%s: root attribute layers holds %lld, not a layer", path, (long long)values[i]);
            else
                (*layers)[(*count)++] = (int)values[i];
        }
        free(values);
    } else {
        char *text = NULL;
        rc = es_h5_attr_get_str(file, "layers", &text, err);
        if (!rc && parse_layers(text, layers, count))
            rc = es_fail(err, ES_ERR_DATA, "%s: root attribute layers is \"%.100s\", not a list of layers like \"20,40\"", path, text);
        free(text);
    }
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (attr >= 0) H5Aclose(attr);
    if (rc) free(*layers), *layers = NULL, *count = 0;
    return rc;
}

static int open_shard(teacher_set *set, teacher_shard *shard, int index, es_error *err) {
    const char *path = shard->path;
    hid_t file = shard->file.id;
    char *format = NULL;
    int64_t version = 0, committed;
    int rc = ES_OK;
    es_error why = {0}; /* why an attribute could not be read, for the message */
    if (es_h5_attr_get_str(file, "format", &format, &why) || strcmp(format, "essence.teacher"))
        rc = es_fail(err, ES_ERR_DATA, "%s: not an essence teacher file (format = \"%s\", expected \"essence.teacher\")%s%s", path,
                     format ? format : "none", why.code ? "; " : "", why.msg);
    if (!rc && (es_h5_attr_get_i64(file, "format_version", &version, &why) || version != 1)) {
        if (why.code) rc = es_fail(err, why.code, "%s", why.msg);
        else rc = es_fail(err, ES_ERR_DATA, "%s: format_version %lld is not supported (expected 1)", path, (long long)version);
    }
    if (!rc && H5Aexists(file, "committed_samples") > 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: an unfinished extraction (finish it with essence-extract --resume)", path);
    /* hidden_size: int64 (older files: a string of digits; es_h5_attr_get_i64 takes both). */
    int64_t hidden = 0;
    if (!rc) rc = es_h5_attr_get_i64(file, "hidden_size", &hidden, err);
    if (!rc && (hidden < 1 || hidden > (1 << 24)))
        rc = es_fail(err, ES_ERR_DATA, "%s: root attribute hidden_size is %lld, not a hidden size", path, (long long)hidden);
    int *layers = NULL, n_layers = 0;
    if (!rc) rc = read_layers(file, path, &layers, &n_layers, err);
    if (!rc && index == 0) {
        set->width = (int)hidden;
        set->layers = layers, set->n_layers = n_layers;
        layers = NULL;
    } else if (!rc) {
        int same = hidden == set->width && n_layers == set->n_layers;
        for (int i = 0; same && i < n_layers; i++) same = layers[i] == set->layers[i];
        if (!same)
            rc = es_fail(err, ES_ERR_DATA, "%s: hidden size %lld and layers differ from %s's (shards of one extraction agree)",
                         path, (long long)hidden, set->shards[0].path);
    }
    free(layers), free(format);
    (void)committed;

    // The row pointers, checked against the datasets they index.
    shard->samples = rc ? 0 : dataset_length(file, "/samples/id");
    if (!rc && shard->samples < 0) rc = es_fail(err, ES_ERR_DATA, "%s: /samples/id is missing", path);
    int64_t text_bytes = rc ? 0 : dataset_length(file, "/samples/text_bytes");
    shard->tokens = rc ? 0 : dataset_length(file, "/tokens/id");
    if (!rc && (text_bytes < 0 || shard->tokens < 0))
        rc = es_fail(err, ES_ERR_DATA, "%s: /samples/text_bytes or /tokens/id is missing", path);
    if (!rc) {
        shard->text_start = malloc((size_t)(shard->samples + 1) * sizeof(int64_t));
        shard->token_start = malloc((size_t)(shard->samples + 1) * sizeof(int64_t));
        if (!shard->text_start || !shard->token_start) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    if (!rc) rc = read_whole(file, path, "/samples/text_start", ES_H5_I64, shard->samples + 1, shard->text_start, err);
    if (!rc) rc = read_whole(file, path, "/samples/token_start", ES_H5_I64, shard->samples + 1, shard->token_start, err);
    if (!rc) rc = check_pointer(shard->text_start, shard->samples, text_bytes, path, "/samples/text_start", err);
    if (!rc) rc = check_pointer(shard->token_start, shard->samples, shard->tokens, path, "/samples/token_start", err);
    const char *per_sample[] = {"/samples/truncated", "/samples/add_special_tokens"};
    const char *per_token[] = {"/tokens/byte_start", "/tokens/byte_end"};
    for (int i = 0; !rc && i < 2; i++)
        if (dataset_length(file, per_sample[i]) != shard->samples || dataset_length(file, per_token[i]) != shard->tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s or %s is missing or of the wrong length", path, per_sample[i], per_token[i]);
    for (int i = 0; !rc && i < set->n_layers; i++) {
        char name[64];
        snprintf(name, sizeof name, "/latents/layer_%03d", set->layers[i]);
        es_rows_reader reader;
        if (H5Lexists(file, "/latents", H5P_DEFAULT) <= 0 || H5Lexists(file, name, H5P_DEFAULT) <= 0) {
            rc = es_fail(err, ES_ERR_DATA, "%s: %s is missing (the file's layers attribute lists it)", path, name);
            break;
        }
        if ((rc = es_rows_open(&reader, file, name, NULL, err))) break; /* its message names the type or filter */
        char type_name[64];
        es_h5_type_name(reader.stored, type_name, sizeof type_name);
        if (!es_rows_is_float(&reader))
            rc = es_fail(err, ES_ERR_DATA, "%s: %s holds %s, expected floats (bf16, float16, float32 or float64)", path, name,
                         type_name);
        else if (reader.rank != 2 || reader.width != set->width || reader.rows != shard->tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s is [%lld, %lld], expected [%lld, %d]", path, name, (long long)reader.rows,
                         (long long)reader.width, (long long)shard->tokens, set->width);
        es_rows_close_reader(&reader);
    }
    if (!rc && es_h5_attr_get_str(file, "fingerprint", &shard->fingerprint, err)) {
        es_error_clear(err);
        shard->fingerprint = strdup("");
    }
    return rc;
}

int teacher_set_open(teacher_set *set, const char *paths, es_pool *pool, es_error *err) {
    memset(set, 0, sizeof *set);
    set->pool = pool;
    char *list = strdup(paths);
    if (!list) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int n = 1;
    for (const char *p = list; *p; p++) n += *p == ',';
    set->shards = calloc((size_t)n, sizeof *set->shards);
    if (!set->shards) {
        free(list);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    int rc = ES_OK;
    char *save = NULL;
    for (char *path = strtok_r(list, ",", &save); !rc && path; path = strtok_r(NULL, ",", &save)) {
        teacher_shard *shard = &set->shards[set->n_shards];
        shard->file.id = -1;
        if (!(shard->path = strdup(path))) {
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            break;
        }
        set->n_shards++;
        rc = es_h5_open(&shard->file, path, err);
        if (!rc) rc = open_shard(set, shard, set->n_shards - 1, err);
        if (!rc) {
            shard->first_sample = set->samples, shard->first_row = set->tokens;
            set->samples += shard->samples, set->tokens += shard->tokens;
        }
    }
    if (!rc && !set->n_shards) rc = es_fail(err, ES_ERR_USAGE, "--in names no file");
    /* Shards of one extraction come from one model and tokenizer. */
    for (int i = 1; !rc && i < set->n_shards; i++) {
        const char *keys[] = {"model_fingerprint", "tokenizer_fingerprint"};
        for (int k = 0; !rc && k < 2; k++) {
            char *first = NULL, *other = NULL;
            es_h5_attr_get_str(set->shards[0].file.id, keys[k], &first, err);
            es_h5_attr_get_str(set->shards[i].file.id, keys[k], &other, err);
            es_error_clear(err);
            if ((first || other) && (!first || !other || strcmp(first, other)))
                rc = es_fail(err, ES_ERR_DATA, "%s: %s differs from %s's: not a shard of the same extraction", set->shards[i].path,
                             keys[k], set->shards[0].path);
            free(first), free(other);
        }
    }
    free(list);
    if (rc) teacher_set_close(set);
    return rc;
}

void teacher_set_close(teacher_set *set) {
    for (int i = 0; set->shards && i < set->n_shards; i++) {
        teacher_shard *shard = &set->shards[i];
        if (shard->file.id >= 0) es_h5_close(&shard->file, 0);
        free(shard->text_start), free(shard->token_start), free(shard->fingerprint), free((char *)shard->path);
    }
    free(set->shards), free(set->layers);
    memset(set, 0, sizeof *set);
}

int teacher_set_has_layer(const teacher_set *set, int layer) {
    for (int i = 0; i < set->n_layers; i++)
        if (set->layers[i] == layer) return 1;
    return 0;
}

int teacher_set_standardisation(const teacher_set *set, int layer, float *mean_out, float *scale_out, es_error *err) {
    const int d = set->width;
    double *mean = calloc((size_t)d, sizeof *mean), *m2 = calloc((size_t)d, sizeof *m2);
    double *shard_mean = malloc((size_t)d * sizeof *shard_mean), *shard_m2 = malloc((size_t)d * sizeof *shard_m2);
    int rc = mean && m2 && shard_mean && shard_m2 ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int64_t count = 0;
    for (int i = 0; !rc && i < set->n_shards; i++) {
        const teacher_shard *shard = &set->shards[i];
        char group[64], name[96];
        snprintf(group, sizeof group, "/stats/layer_%03d", layer);
        if (H5Lexists(shard->file.id, "/stats", H5P_DEFAULT) <= 0 || H5Lexists(shard->file.id, group, H5P_DEFAULT) <= 0) {
            rc = es_fail(err, ES_ERR_DATA, "%s: %s is missing: --input-norm standardize needs the file's statistics (or use --input-norm rms)",
                         shard->path, group);
            break;
        }
        int64_t shard_count = 0;
        snprintf(name, sizeof name, "%s/count", group);
        rc = read_whole(shard->file.id, shard->path, name, ES_H5_I64, 1, &shard_count, err);
        snprintf(name, sizeof name, "%s/mean", group);
        if (!rc) rc = read_whole(shard->file.id, shard->path, name, ES_H5_F64, d, shard_mean, err);
        snprintf(name, sizeof name, "%s/m2", group);
        if (!rc) rc = read_whole(shard->file.id, shard->path, name, ES_H5_F64, d, shard_m2, err);
        if (!rc && shard_count != shard->tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s/count is %lld but the file has %lld tokens", shard->path, group,
                         (long long)shard_count, (long long)shard->tokens);
        for (int k = 0; !rc && k < d; k++)
            if (!isfinite(shard_mean[k]) || !isfinite(shard_m2[k]) || shard_m2[k] < 0)
                rc = es_fail(err, ES_ERR_DATA, "%s: %s has a non-finite or negative value at dimension %d", shard->path, group, k);
        if (rc || shard_count == 0) continue;
        /* Chan et al.: merge (count, mean, m2) with the shard's. */
        double total = (double)(count + shard_count);
        for (int k = 0; k < d; k++) {
            double delta = shard_mean[k] - mean[k];
            mean[k] += delta * (double)shard_count / total;
            m2[k] += shard_m2[k] + delta * delta * (double)count * (double)shard_count / total;
        }
        count += shard_count;
    }
    for (int k = 0; !rc && k < d; k++) {
        double scale = count ? sqrt(m2[k] / (double)count) : 0;
        mean_out[k] = (float)mean[k];
        scale_out[k] = (float)(scale > 1e-6 ? scale : 1e-6);
    }
    free(mean), free(m2), free(shard_mean), free(shard_m2);
    return rc;
}


static int read_ids(const teacher_shard *shard, int64_t first, int64_t count, char **ids, es_error *err) {
    char name[4200];
    snprintf(name, sizeof name, "%s:/samples/id", shard->path);
    hid_t dataset = H5Lexists(shard->file.id, "/samples/id", H5P_DEFAULT) > 0 ? H5Dopen2(shard->file.id, "/samples/id", H5P_DEFAULT) : -1;
    if (dataset < 0) return es_fail(err, ES_ERR_DATA, "%s: cannot open: %s", name, es_h5_last_error());
    int rc = es_h5_read_strings(dataset, name, first, count, ids, err);
    H5Dclose(dataset);
    return rc;
}

int teacher_block_read(const teacher_set *set, const teacher_shard *shard, int64_t first, int64_t count, teacher_block *block,
                       es_error *err) {
    (void)set;
    memset(block, 0, sizeof *block);
    block->shard = shard, block->first = first, block->count = count;
    int64_t text0 = shard->text_start[first], text_len = shard->text_start[first + count] - text0;
    int64_t row0 = shard->token_start[first];
    block->tokens = shard->token_start[first + count] - row0;
    block->first_row = shard->first_row + row0;
    block->ids = calloc((size_t)count, sizeof *block->ids);
    block->text = malloc((size_t)text_len + 1);
    block->text_offset = malloc((size_t)(count + 1) * sizeof *block->text_offset);
    block->token_offset = malloc((size_t)(count + 1) * sizeof *block->token_offset);
    block->truncated = malloc((size_t)count + 1);
    block->add_special_tokens = malloc((size_t)count + 1);
    block->byte_start = malloc((size_t)(block->tokens + 1) * sizeof *block->byte_start);
    block->byte_end = malloc((size_t)(block->tokens + 1) * sizeof *block->byte_end);
    if (!block->ids || !block->text || !block->text_offset || !block->token_offset || !block->truncated ||
        !block->add_special_tokens || !block->byte_start || !block->byte_end)
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int64_t i = 0; i <= count; i++) {
        block->text_offset[i] = shard->text_start[first + i] - text0;
        block->token_offset[i] = shard->token_start[first + i] - row0;
    }
    hid_t file = shard->file.id;
    int rc = read_ids(shard, first, count, block->ids, err);
    if (!rc) rc = es_rows_read_column(file, "/samples/text_bytes", ES_H5_U8, text0, text_len, block->text, err);
    if (!rc) rc = es_rows_read_column(file, "/samples/truncated", ES_H5_U8, first, count, block->truncated, err);
    if (!rc) rc = es_rows_read_column(file, "/samples/add_special_tokens", ES_H5_U8, first, count, block->add_special_tokens, err);
    if (!rc) rc = es_rows_read_column(file, "/tokens/byte_start", ES_H5_I32, row0, block->tokens, block->byte_start, err);
    if (!rc) rc = es_rows_read_column(file, "/tokens/byte_end", ES_H5_I32, row0, block->tokens, block->byte_end, err);
    if (!rc) block->text[text_len] = '\0';
    /* Spans must lie in their sample's text: they index it. */
    for (int64_t i = 0; !rc && i < count; i++) {
        int64_t length = block->text_offset[i + 1] - block->text_offset[i];
        for (int64_t t = block->token_offset[i]; !rc && t < block->token_offset[i + 1]; t++)
            if (block->byte_start[t] < 0 || block->byte_start[t] > block->byte_end[t] || block->byte_end[t] > length)
                rc = es_fail(err, ES_ERR_DATA, "%s: sample %lld (\"%s\"): token %lld has span [%d, %d) outside its %lld-byte text",
                             shard->path, (long long)(first + i), block->ids[i], (long long)(t - block->token_offset[i]),
                             block->byte_start[t], block->byte_end[t], (long long)length);
    }
    return rc;
}

int teacher_block_latents(const teacher_set *set, const teacher_block *block, int layer, float *rows, es_error *err) {
    char name[64];
    snprintf(name, sizeof name, "/latents/layer_%03d", layer);
    es_rows_reader reader;
    int rc = es_rows_open(&reader, block->shard->file.id, name, set->pool, err);
    if (rc) return rc;
    rc = es_rows_read_f32(&reader, block->shard->token_start[block->first], block->tokens, rows, err);
    es_rows_close_reader(&reader);
    return rc;
}

void teacher_block_free(teacher_block *block) {
    for (int64_t i = 0; block->ids && i < block->count; i++) free(block->ids[i]);
    free(block->ids), free(block->text), free(block->text_offset), free(block->token_offset), free(block->truncated);
    free(block->add_special_tokens), free(block->byte_start), free(block->byte_end);
    memset(block, 0, sizeof *block);
}
