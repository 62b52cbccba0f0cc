/* essence-inspect sample FILE --index I: one sample's tokens, their text pieces, and the
 * L2 norm of each stored layer's row for every token. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "h5rows.h"
#include "inspect.h"

/* Rows [first, first + n) of a 1-D dataset as elem, whatever type the file stores. */
static int read_range(hid_t file, const char *name, es_h5_elem elem, int64_t first, int64_t n, void *out, es_error *err) {
    es_rows_reader reader;
    int rc = es_rows_open_column(&reader, file, name, elem, NULL, err);
    if (!rc) rc = es_rows_read(&reader, first, n, out, err);
    es_rows_close_reader(&reader);
    return rc;
}

/* Prints text as a quoted, escaped piece. */
static void print_piece(const unsigned char *text, int64_t len) {
    putchar('"');
    for (int64_t i = 0; i < len; i++) {
        unsigned char c = text[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') printf("\\n");
        else if (c == '\t') printf("\\t");
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('"');
}

int inspect_sample(const char *path, const es_config *cfg, es_error *err) {
    if (!es_config_is_set(cfg, "index")) return es_fail(err, ES_ERR_USAGE, "usage: essence-inspect sample FILE.h5 --index I");
    int64_t index = es_config_int(cfg, "index");
    es_h5file file;
    int rc = es_h5_open(&file, path, err);
    if (rc) return rc;
    es_rows_reader starts;
    rc = es_rows_open_column(&starts, file.id, "/samples/token_start", ES_H5_I64, NULL, err);
    int64_t bounds[2] = {0, 0}, text_bounds[2] = {0, 0};
    if (!rc && (index < 0 || starts.rows < 1 || index >= starts.rows - 1)) /* index + 1 would overflow at INT64_MAX */
        rc = es_fail(err, ES_ERR_USAGE, "%s: --index %lld: the file has %lld samples", path, (long long)index,
                     (long long)(starts.rows - 1));
    if (!rc) rc = es_rows_read(&starts, index, 2, bounds, err);
    if (starts.dataset >= 0) es_rows_close_reader(&starts);
    int has_text = !rc && H5Lexists(file.id, "/samples/text_start", H5P_DEFAULT) > 0;
    if (has_text) rc = read_range(file.id, "/samples/text_start", ES_H5_I64, index, 2, text_bounds, err);
    const int64_t n = bounds[1] - bounds[0], text_len = text_bounds[1] - text_bounds[0];
    int32_t *ids = malloc((size_t)(n + 1) * sizeof *ids), *begin = malloc((size_t)(n + 1) * sizeof *begin);
    int32_t *end = malloc((size_t)(n + 1) * sizeof *end);
    unsigned char *text = malloc((size_t)text_len + 1);
    if (!rc && (!ids || !begin || !end || !text)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = read_range(file.id, "/tokens/id", ES_H5_I32, bounds[0], n, ids, err);
    if (!rc) rc = read_range(file.id, "/tokens/byte_start", ES_H5_I32, bounds[0], n, begin, err);
    if (!rc) rc = read_range(file.id, "/tokens/byte_end", ES_H5_I32, bounds[0], n, end, err);
    if (!rc && text_len) rc = read_range(file.id, "/samples/text_bytes", ES_H5_U8, text_bounds[0], text_len, text, err);
    /* the latent layers: /latents in a teacher file, /targets in a student file */
    inspect_layers layers = {.count = 0};
    const char *group_name = H5Lexists(file.id, "/latents", H5P_DEFAULT) > 0 ? "/latents" : "/targets";
    if (!rc) inspect_list_layers(file.id, group_name, &layers);
    float *norms = calloc((size_t)(layers.count ? layers.count : 1) * (size_t)(n + 1), sizeof *norms);
    for (int l = 0; !rc && l < layers.count; l++) {
        char name[160];
        snprintf(name, sizeof name, "%s/%s", group_name, layers.names[l]);
        es_rows_reader reader;
        rc = es_rows_open(&reader, file.id, name, NULL, err);
        float *rows = rc ? NULL : malloc((size_t)(n + 1) * (size_t)reader.width * sizeof *rows);
        if (!rc && !rows) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (!rc) rc = es_rows_read_f32(&reader, bounds[0], n, rows, err);
        for (int64_t t = 0; !rc && t < n; t++) {
            double sum = 0;
            for (int64_t k = 0; k < reader.width; k++) sum += (double)rows[t * reader.width + k] * rows[t * reader.width + k];
            norms[(size_t)t * layers.count + l] = (float)sqrt(sum);
        }
        free(rows);
        if (reader.dataset >= 0) es_rows_close_reader(&reader);
    }
    if (!rc) {
        printf("%s: sample %lld, tokens %lld..%lld, %lld text bytes\n", path, (long long)index, (long long)bounds[0],
               (long long)bounds[1] - 1, (long long)text_len);
        printf("%6s %8s %14s  %-24s", "token", "id", "bytes", "text");
        for (int l = 0; l < layers.count; l++) printf(" %10s", layers.names[l] + 6);
        printf("   (L2 norm of each %s row)\n", group_name + 1);
        for (int64_t t = 0; t < n; t++) {
            char span[32];
            snprintf(span, sizeof span, "[%d, %d)", begin[t], end[t]);
            printf("%6lld %8d %14s  ", (long long)t, ids[t], span);
            int64_t piece_start = begin[t], piece_end = end[t];
            if (piece_start >= 0 && piece_end <= text_len && piece_start <= piece_end) print_piece(text + piece_start, piece_end - piece_start);
            else printf("(outside the text)");
            for (int l = 0; l < layers.count; l++) printf(" %10.4g", norms[(size_t)t * layers.count + l]);
            printf("\n");
        }
    }
    free(ids), free(begin), free(end), free(text), free(norms);
    es_h5_close(&file, 0);
    return rc;
}
