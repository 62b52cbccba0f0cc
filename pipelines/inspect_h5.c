/* essence-inspect on HDF5 files: the summary and `stats`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "h5rows.h"
#include "h5zstd.h"
#include "inspect.h"
#include "utf8.h"
#include "progress.h"

/* ---- summary ------------------------------------------------------------------------ */

void inspect_type_name(hid_t type, char *buf, size_t size) { es_h5_type_name(type, buf, size); }

void inspect_dims_text(const hsize_t *dims, int rank, char *buf, size_t size) {
    int n = snprintf(buf, size, "[");
    for (int i = 0; i < rank && n < (int)size; i++)
        n += snprintf(buf + n, size - (size_t)n, "%s%llu", i ? ", " : "", (unsigned long long)dims[i]);
    if (n < (int)size) snprintf(buf + n, size - (size_t)n, "]");
}

static void print_filters(hid_t dcpl, char *buf, size_t size) {
    int n = 0, nfilters = H5Pget_nfilters(dcpl);
    buf[0] = '\0';
    for (int i = 0; i < nfilters && n < (int)size; i++) {
        unsigned flags, cd[8], config;
        size_t n_cd = 8;
        char name[64];
        H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &n_cd, cd, sizeof name, name, &config);
        const char *sep = i ? "+" : "";
        if (id == H5Z_FILTER_SHUFFLE) n += snprintf(buf + n, size - (size_t)n, "%sshuffle", sep);
        else if (id == ES_H5Z_FILTER_ZSTD) n += snprintf(buf + n, size - (size_t)n, "%szstd(%u)", sep, n_cd ? cd[0] : 3);
        else if (id == H5Z_FILTER_DEFLATE) n += snprintf(buf + n, size - (size_t)n, "%sgzip(%u)", sep, n_cd ? cd[0] : 0);
        else n += snprintf(buf + n, size - (size_t)n, "%sfilter %d", sep, (int)id);
    }
    if (!nfilters) snprintf(buf, size, "none");
}

/* A string from the file as it is where it is UTF-8; other bytes (a damaged or foreign file) and
 * control bytes as \xNN, so that what reaches the terminal is text. */
static void print_text(const char *text, size_t len) {
    while (len > 0) {
        size_t bad = es_utf8_invalid_at(text, len), good = bad == (size_t)-1 ? len : bad;
        for (size_t i = 0; i < good; i++)
            if ((unsigned char)text[i] < 0x20 || text[i] == 0x7f) printf("\\x%02x", (unsigned char)text[i]);
            else putchar(text[i]);
        if (good == len) break;
        printf("\\x%02x", (unsigned char)text[good]);
        text += good + 1, len -= good + 1;
    }
}

static void print_attribute_value(hid_t attr) {
    hid_t type = H5Aget_type(attr), space = H5Aget_space(attr);
    hssize_t count = H5Sget_simple_extent_npoints(space);
    H5T_class_t cls = H5Tget_class(type);
    if (cls == H5T_STRING && count == 1) {
        char *text = NULL;
        if (H5Tis_variable_str(type) > 0) {
            hid_t mem = H5Tcopy(H5T_C_S1);
            H5Tset_size(mem, H5T_VARIABLE);
            H5Tset_cset(mem, H5Tget_cset(type));
            if (H5Aread(attr, mem, &text) >= 0 && text) {
                /* Long texts (configs) are shown by their first line and size. */
                const char *newline = strchr(text, '\n');
                size_t len = strlen(text);
                if (newline || len > 100) {
                    print_text(text, newline && newline - text < 100 ? (size_t)(newline - text) : 100);
                    printf(" ... (%zu bytes)", len);
                } else {
                    putchar('"'), print_text(text, len), putchar('"');
                }
                H5free_memory(text);
            }
            H5Tclose(mem);
        } else {
            size_t size = H5Tget_size(type);
            char *fixed = calloc(size + 1, 1);
            if (fixed && H5Aread(attr, type, fixed) >= 0) putchar('"'), print_text(fixed, strlen(fixed)), putchar('"');
            free(fixed);
        }
    } else if ((cls == H5T_INTEGER || cls == H5T_FLOAT) && count >= 1 && count <= 16) {
        double values[16];
        if (H5Aread(attr, H5T_NATIVE_DOUBLE, values) >= 0)
            for (hssize_t i = 0; i < count; i++) printf("%s%.10g", i ? ", " : "", values[i]);
    } else {
        printf("(%lld values)", (long long)count);
    }
    H5Tclose(type);
    H5Sclose(space);
}

static herr_t show_attribute(hid_t obj, const char *name, const H5A_info_t *info, void *data) {
    (void)info;
    const char *indent = data;
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    if (attr < 0) return 0;
    printf("%s@%s = ", indent, name);
    print_attribute_value(attr);
    printf("\n");
    H5Aclose(attr);
    return 0;
}

static herr_t show_object(hid_t root, const char *name, const H5O_info_t *info, void *data) {
    (void)data;
    if (info->type == H5O_TYPE_GROUP && strcmp(name, ".") != 0 && info->num_attrs > 0) {
        hid_t group = H5Gopen2(root, name, H5P_DEFAULT);
        printf("  /%s/\n", name);
        H5Aiterate2(group, H5_INDEX_NAME, H5_ITER_INC, NULL, show_attribute, "      ");
        H5Gclose(group);
    }
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t dataset = H5Dopen2(root, name, H5P_DEFAULT);
    if (dataset < 0) return 0;
    hid_t type = H5Dget_type(dataset), space = H5Dget_space(dataset), dcpl = H5Dget_create_plist(dataset);
    hsize_t dims[8] = {0}, chunk[8] = {0};
    int rank = H5Sget_simple_extent_ndims(space);
    if (rank > 8) rank = 8;
    H5Sget_simple_extent_dims(space, dims, NULL);
    char type_text[64], shape[128], chunk_text[128] = "contiguous", filters[128] = "none";
    inspect_type_name(type, type_text, sizeof type_text);
    inspect_dims_text(dims, rank, shape, sizeof shape);
    if (H5Pget_layout(dcpl) == H5D_CHUNKED) {
        int chunk_rank = H5Pget_chunk(dcpl, 8, chunk);
        inspect_dims_text(chunk, chunk_rank, chunk_text, sizeof chunk_text);
        print_filters(dcpl, filters, sizeof filters);
    }
    printf("  /%-28s %-14s %-16s chunks %-14s %-14s", name, type_text, shape, chunk_text, filters);
    hsize_t stored = H5Dget_storage_size(dataset);
    double logical = (double)H5Sget_simple_extent_npoints(space) * (double)H5Tget_size(type);
    if (H5Tis_variable_str(type) <= 0 && H5Tget_class(type) != H5T_VLEN && stored > 0) {
        double bytes = (double)stored;
        const char *unit = bytes >= 1e9 ? "GB" : bytes >= 1e6 ? "MB" : bytes >= 1e3 ? "kB" : "B";
        double scale = bytes >= 1e9 ? 1e9 : bytes >= 1e6 ? 1e6 : bytes >= 1e3 ? 1e3 : 1;
        printf(" ratio %.2f (%.*f %s stored)", logical / bytes, scale > 1 ? 1 : 0, bytes / scale, unit);
    }
    printf("\n");
    H5Aiterate2(dataset, H5_INDEX_NAME, H5_ITER_INC, NULL, show_attribute, "      ");
    H5Tclose(type);
    H5Sclose(space);
    H5Pclose(dcpl);
    H5Dclose(dataset);
    return 0;
}

/* Rows of a 1-D dataset, or -1 when it is absent. */
static long long dataset_rows(hid_t file, const char *name) {
    /* H5Lexists fails (< 0) when a group on the way is missing: absent too. */
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) return -1;
    hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
    if (dataset < 0) return -1;
    hid_t space = H5Dget_space(dataset);
    hsize_t dims[2] = {0, 0};
    H5Sget_simple_extent_dims(space, dims, NULL);
    H5Sclose(space);
    H5Dclose(dataset);
    return (long long)dims[0];
}

/* Sample s's id (malloc'd), or NULL. */
static char *sample_id(hid_t file, long long s) {
    hid_t dataset = H5Lexists(file, "/samples/id", H5P_DEFAULT) > 0 ? H5Dopen2(file, "/samples/id", H5P_DEFAULT) : -1;
    if (dataset < 0) return NULL;
    char *id = NULL;
    es_error ignored = {0};
    es_h5_read_strings(dataset, "/samples/id", s, 1, &id, &ignored);
    H5Dclose(dataset);
    return id;
}

/* A student.h5's aligned fraction: overall, and the samples with the lowest and highest. */
static int print_alignment(hid_t file, const char *path, es_error *err) {
    es_rows_reader starts, rows;
    int rc = es_rows_open_column(&starts, file, "/samples/token_start", ES_H5_I64, NULL, err);
    if (rc) return rc;
    rc = es_rows_open_column(&rows, file, "/tokens/teacher_row", ES_H5_I64, NULL, err);
    if (rc) {
        es_rows_close_reader(&starts);
        return rc;
    }
    enum { BLOCK = 1 << 16 };
    int64_t pointer[BLOCK + 1], *row = malloc(sizeof(int64_t) * BLOCK);
    long long aligned = 0, total = 0, lowest_sample = -1, highest_sample = -1;
    double lowest = 2, highest = -1;
    int64_t row_block_first = -1, n_samples = starts.rows - 1;
    if (!row) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int64_t first = 0; !rc && first < n_samples; first += BLOCK) {
        int64_t n = n_samples - first < BLOCK ? n_samples - first : BLOCK;
        rc = es_rows_read(&starts, first, n + 1, pointer, err);
        for (int64_t s = 0; !rc && s < n; s++) {
            if (pointer[s + 1] < pointer[s] || pointer[s + 1] > rows.rows) {
                rc = es_fail(err, ES_ERR_DATA, "%s: /samples/token_start is inconsistent at sample %lld", path, (long long)(first + s));
                break;
            }
            long long sample_aligned = 0;
            for (int64_t t = pointer[s]; !rc && t < pointer[s + 1]; t++) {
                if (row_block_first < 0 || t < row_block_first || t >= row_block_first + BLOCK) {
                    row_block_first = t;
                    rc = es_rows_read(&rows, t, rows.rows - t < BLOCK ? rows.rows - t : BLOCK, row, err);
                }
                if (!rc) sample_aligned += row[t - row_block_first] >= 0;
            }
            long long count = pointer[s + 1] - pointer[s];
            aligned += sample_aligned, total += count;
            if (!count) continue;
            double fraction = (double)sample_aligned / (double)count;
            if (fraction < lowest) lowest = fraction, lowest_sample = first + s;
            if (fraction > highest) highest = fraction, highest_sample = first + s;
        }
    }
    if (!rc) {
        printf("aligned: %lld of %lld student tokens (%.1f%%)\n", aligned, total, total ? 100.0 * (double)aligned / (double)total : 0.0);
        if (lowest_sample >= 0) {
            char *low_id = sample_id(file, lowest_sample), *high_id = sample_id(file, highest_sample);
            printf("aligned per sample: lowest %.1f%% (sample %lld \"%s\"), highest %.1f%% (sample %lld \"%s\")\n", 100 * lowest,
                   lowest_sample, low_id ? low_id : "?", 100 * highest, highest_sample, high_id ? high_id : "?");
            free(low_id), free(high_id);
        }
    }
    free(row);
    es_rows_close_reader(&starts);
    es_rows_close_reader(&rows);
    return rc;
}

int inspect_summary(const char *path, es_error *err) {
    es_h5file file;
    int rc = es_h5_open(&file, path, err);
    if (rc) return rc;
    char *format = NULL;
    int64_t version = 0;
    es_error ignored = {0};
    es_h5_attr_get_str(file.id, "format", &format, &ignored);
    es_h5_attr_get_i64(file.id, "format_version", &version, &ignored);
    printf("%s\n", path);
    printf("format: %s", format ? format : "(none: not written by essence)");
    if (format) printf(" (version %lld)", (long long)version);
    printf("\n");
    free(format);
    long long token_start = dataset_rows(file.id, "/samples/token_start");
    long long ids = dataset_rows(file.id, "/samples/id");
    long long samples = token_start > 0 ? token_start - 1 : ids;
    long long tokens = dataset_rows(file.id, "/tokens/id");
    if (samples >= 0) printf("samples: %lld\n", samples);
    if (tokens >= 0) printf("tokens: %lld\n", tokens);
    if (dataset_rows(file.id, "/tokens/teacher_row") >= 0 && token_start > 0) rc = print_alignment(file.id, path, err);
    printf("datasets:\n");
    if (H5Ovisit2(file.id, H5_INDEX_NAME, H5_ITER_INC, show_object, NULL, H5O_INFO_BASIC | H5O_INFO_NUM_ATTRS) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: cannot list the file's objects: %s", path, es_h5_last_error());
    printf("attributes:\n");
    H5Aiterate2(file.id, H5_INDEX_NAME, H5_ITER_INC, NULL, show_attribute, "  ");
    es_h5_close(&file, 0);
    return rc;
}

/* ---- stats -------------------------------------------------------------------------- */

static herr_t collect_layer(hid_t group, const char *name, const H5L_info_t *info, void *data) {
    (void)group, (void)info;
    inspect_layers *layers = data;
    if (strncmp(name, "layer_", 6) == 0 && layers->count < INSPECT_MAX_LAYERS)
        snprintf(layers->names[layers->count++], sizeof layers->names[0], "%s", name);
    return 0;
}

int inspect_list_layers(hid_t file, const char *group_name, inspect_layers *layers) {
    layers->count = 0;
    if (H5Lexists(file, group_name, H5P_DEFAULT) <= 0) return 0;
    hid_t group = H5Gopen2(file, group_name, H5P_DEFAULT);
    if (group < 0) return 0;
    H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, NULL, collect_layer, layers);
    H5Gclose(group);
    return layers->count;
}

static int compare_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int stats_of(hid_t file, const char *dataset, es_pool *pool, es_error *err) {
    es_rows_reader reader;
    int rc = es_rows_open(&reader, file, dataset, pool, err);
    if (rc) return rc;
    if (reader.rank != 2 || !es_rows_is_float(&reader)) {
        char type_name[64];
        es_h5_type_name(reader.stored, type_name, sizeof type_name);
        rc = es_fail(err, ES_ERR_DATA, "%s: not a latent dataset (rows of floats): %d-D %s", reader.name, reader.rank, type_name);
        es_rows_close_reader(&reader);
        return rc;
    }
    const int64_t rows = reader.rows, width = reader.width;
    const int64_t block = reader.chunk_rows * 4 > 0 ? reader.chunk_rows * 4 : 256;
    float *values = malloc(sizeof(float) * (size_t)(block * width));
    float *norms = malloc(sizeof(float) * (size_t)(rows > 0 ? rows : 1));
    double *sum = calloc((size_t)width, sizeof *sum), *sum_sq = calloc((size_t)width, sizeof *sum_sq);
    int64_t *finite = calloc((size_t)width, sizeof *finite);
    if (!values || !norms || !sum || !sum_sq || !finite) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int64_t nan_count = 0, inf_count = 0, n_norms = 0;
    es_progress progress;
    es_progress_start(&progress, dataset, "rows", rows);
    for (int64_t first = 0; !rc && first < rows; first += block) {
        int64_t n = rows - first < block ? rows - first : block;
        rc = es_rows_read_f32(&reader, first, n, values, err);
        for (int64_t r = 0; !rc && r < n; r++) {
            const float *row = values + r * width;
            double norm_sq = 0;
            int row_finite = 1;
            for (int64_t k = 0; k < width; k++) {
                float v = row[k];
                if (isnan(v)) nan_count++, row_finite = 0;
                else if (isinf(v)) inf_count++, row_finite = 0;
                else {
                    /* Plain sums in double: a bf16 dataset's values are far from cancelling
                     * at any size we store, and this keeps the loop vectorisable. */
                    sum[k] += v, sum_sq[k] += (double)v * v, finite[k]++;
                    norm_sq += (double)v * v;
                }
            }
            if (row_finite) norms[n_norms++] = (float)sqrt(norm_sq);
        }
        es_progress_add(&progress, n);
    }
    if (!rc) {
        printf("%s: %lld rows x %lld\n", reader.name, (long long)rows, (long long)width);
        printf("  non-finite values: %lld NaN, %lld Inf\n", (long long)nan_count, (long long)inf_count);
        qsort(norms, (size_t)n_norms, sizeof *norms, compare_float);
        static const double percentiles[] = {0, 1, 5, 25, 50, 75, 95, 99, 100};
        printf("  row L2 norm percentiles:");
        for (size_t i = 0; i < sizeof percentiles / sizeof *percentiles; i++) {
            if (!n_norms) break;
            int64_t at = (int64_t)llround(percentiles[i] / 100.0 * (double)(n_norms - 1));
            printf(" p%g=%.4g", percentiles[i], norms[at]);
        }
        printf("%s\n", n_norms ? "" : " (no finite rows)");
        int64_t mean_min = 0, mean_max = 0, std_min = 0, std_max = 0;
        double *mean = sum, *std = sum_sq; /* reuse the buffers */
        for (int64_t k = 0; k < width; k++) {
            double count = finite[k] ? (double)finite[k] : 1;
            mean[k] = sum[k] / count;
            double variance = sum_sq[k] / count - mean[k] * mean[k];
            std[k] = variance > 0 ? sqrt(variance) : 0;
            if (mean[k] < mean[mean_min]) mean_min = k;
            if (mean[k] > mean[mean_max]) mean_max = k;
            if (std[k] < std[std_min]) std_min = k;
            if (std[k] > std[std_max]) std_max = k;
        }
        printf("  per-dimension mean: min %.4g (dim %lld), max %.4g (dim %lld)\n", mean[mean_min], (long long)mean_min,
               mean[mean_max], (long long)mean_max);
        printf("  per-dimension std:  min %.4g (dim %lld), max %.4g (dim %lld)\n", std[std_min], (long long)std_min,
               std[std_max], (long long)std_max);
    }
    es_progress_finish(&progress);
    free(values), free(norms), free(sum), free(sum_sq), free(finite);
    es_rows_close_reader(&reader);
    return rc;
}

int inspect_stats(const char *path, const es_config *cfg, es_error *err) {
    es_h5file file;
    int rc = es_h5_open(&file, path, err);
    if (rc) return rc;
    es_pool *pool = es_pool_create((int)es_config_int(cfg, "threads"));
    if (!pool) {
        es_h5_close(&file, 0);
        return es_fail(err, ES_ERR_RUNTIME, "cannot start worker threads");
    }
    /* Teacher files hold /latents, student files /targets. */
    static const char *groups[] = {"/latents", "/targets"};
    int found = 0;
    for (int g = 0; !rc && g < 2; g++) {
        inspect_layers layers;
        inspect_list_layers(file.id, groups[g], &layers);
        for (int i = 0; !rc && i < layers.count; i++) {
            if (es_config_is_set(cfg, "layer") && atoll(layers.names[i] + 6) != es_config_int(cfg, "layer")) continue;
            char dataset[160];
            snprintf(dataset, sizeof dataset, "%s/%s", groups[g], layers.names[i]);
            found++;
            rc = stats_of(file.id, dataset, pool, err);
        }
    }
    if (!rc && !found) {
        if (es_config_is_set(cfg, "layer"))
            rc = es_fail(err, ES_ERR_DATA, "%s: no layer %lld in /latents or /targets", path,
                         (long long)es_config_int(cfg, "layer"));
        else
            rc = es_fail(err, ES_ERR_DATA, "%s: no /latents/layer_* or /targets/layer_* datasets", path);
    }
    es_pool_destroy(pool);
    es_h5_close(&file, 0);
    return rc;
}
