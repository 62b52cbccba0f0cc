/* The tokenizer against Hugging Face `tokenizers` goldens: every line of every goldens file of the
 * in-repo fixtures and, when present, the shared ones. ids exact for both add_special_tokens
 * settings; byte spans exact where NFC leaves the text unchanged; decode(ids) equal to the golden
 * decoded text. And the table of code points Hugging Face's normalizers do not know fits the
 * utf8proc linked. */
#include <dirent.h>
#include <jansson.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "../testlib.h"
#include "jsonl.h"
#include "tokenizer.h"
#include "unicode_norm_new.h"

static int nfc_unchanged(const char *text, size_t len) {
    utf8proc_uint8_t *mapped = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)len, &mapped,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    int same = n >= 0 && (size_t)n == len && memcmp(mapped, text, len) == 0;
    free(mapped);
    return same;
}

/* Checks the tokenizer at `tokenizer_path` (a file or a model folder) against the goldens
 * file `goldens_path` (`name` labels the messages). */
static void check_goldens_of(const char *tl_name, const char *tokenizer_path, const char *goldens_path, const char *name) {
    es_error err = {0};
    es_tokenizer *tok = NULL;
    REQUIRE(es_tokenizer_load(tokenizer_path, &tok, &err) == ES_OK);
    es_jsonl reader;
    REQUIRE(es_jsonl_open(&reader, goldens_path, &err) == ES_OK);
    es_encoding enc = {0};
    json_t *line;
    int lines = 0, id_bad = 0, span_bad = 0, span_checked = 0, decode_bad = 0, decoded_checked = 0, errors = 0;
    while (es_jsonl_next(&reader, &line, &err) == 1) {
        lines++;
        const json_t *text = json_object_get(line, "text"), *ids = json_object_get(line, "ids");
        const json_t *offsets = json_object_get(line, "byte_offsets"), *decoded = json_object_get(line, "decoded");
        int add_special = json_is_true(json_object_get(line, "add_special_tokens"));
        const char *t = json_string_value(text);
        size_t t_len = json_string_length(text);
        if (es_tokenizer_encode(tok, t, t_len, add_special, &enc, &err) != ES_OK) {
            if (errors++ < 3) printf("  %s:%ld: encode failed: %s\n", name, reader.line, err.msg);
            es_error_clear(&err);
            json_decref(line);
            continue;
        }
        int same = enc.n == json_array_size(ids);
        for (size_t k = 0; same && k < enc.n; k++) same = enc.ids[k] == json_integer_value(json_array_get(ids, k));
        if (!same && id_bad++ < 3) {
            printf("  %s:%ld: ids differ (%zu vs %zu tokens): ours", name, reader.line, enc.n, json_array_size(ids));
            for (size_t k = 0; k < enc.n && k < 12; k++) printf(" %d", enc.ids[k]);
            printf(" | golden");
            for (size_t k = 0; k < json_array_size(ids) && k < 12; k++) printf(" %lld", json_integer_value(json_array_get(ids, k)));
            printf("\n");
        }
        if (same && nfc_unchanged(t, t_len)) {
            span_checked++;
            int spans_same = 1;
            size_t k = 0;
            for (; spans_same && k < enc.n; k++) {
                const json_t *pair = json_array_get(offsets, k);
                spans_same = enc.spans[k][0] == json_integer_value(json_array_get(pair, 0)) &&
                             enc.spans[k][1] == json_integer_value(json_array_get(pair, 1));
            }
            if (!spans_same && span_bad++ < 3)
                printf("  %s:%ld: span %zu differs: ours [%d, %d)\n", name, reader.line, k - 1, enc.spans[k - 1][0],
                       enc.spans[k - 1][1]);
        }
        if (json_is_string(decoded)) {
            decoded_checked++;
            int32_t *golden_ids = malloc((json_array_size(ids) + 1) * sizeof *golden_ids);
            for (size_t k = 0; k < json_array_size(ids); k++) golden_ids[k] = (int32_t)json_integer_value(json_array_get(ids, k));
            char *back = NULL;
            size_t back_len = 0;
            int ok = es_tokenizer_decode(tok, golden_ids, json_array_size(ids), &back, &back_len, &err) == ES_OK &&
                     back_len == json_string_length(decoded) && memcmp(back, json_string_value(decoded), back_len) == 0;
            if (!ok && decode_bad++ < 3) printf("  %s:%ld: decode differs\n", name, reader.line);
            free(back), free(golden_ids);
        }
        json_decref(line);
    }
    CHECKF(err.code == ES_OK, "%s", err.msg);
    CHECKF(lines > 0 && errors == 0 && id_bad == 0, "%s: %d lines, %d encode errors, %d with different ids", name,
           lines, errors, id_bad);
    CHECKF(span_bad == 0, "%s: %d of %d NFC-stable lines with different spans", name, span_bad, span_checked);
    CHECKF(decode_bad == 0, "%s: %d of %d decodes differ", name, decode_bad, decoded_checked);
    printf("  %s: %d lines, ids all equal: %s, spans checked on %d lines, decodes checked %d\n", name, lines,
           id_bad ? "no" : "yes", span_checked, decoded_checked);
    es_encoding_free(&enc);
    es_jsonl_close(&reader);
    es_tokenizer_free(tok);
}

/* A plain copy of a .zst file in the scratch folder (the shipped tokenizers are compressed with
 * a long window, hence --long; through stdin, since zstd refuses a symbolic link as input). */
static int decompress(const char *path, const char *out) {
    char command[4096];
    snprintf(command, sizeof command, "zstd -dq --long=27 < '%s' > '%s'", path, out);
    return system(command);
}

/* tokenizer-goldens/NAME.jsonl of fixture folder `root` against tokenizers/NAME.json, or
 * NAME.json.zst decompressed. */
static void check_goldens(const char *tl_name, const char *root, const char *label, const char *name) {
    char tokenizer_path[1200], goldens_path[1200], plain[300];
    snprintf(goldens_path, sizeof goldens_path, "%s/tokenizer-goldens/%s.jsonl", root, name);
    snprintf(tokenizer_path, sizeof tokenizer_path, "%s/tokenizers/%s.json", root, name);
    struct stat st;
    if (stat(tokenizer_path, &st) != 0) {
        strcat(tokenizer_path, ".zst");
        int found = stat(tokenizer_path, &st) == 0;
        CHECKF(found, "%s: neither %s nor .json found for these goldens", goldens_path, tokenizer_path);
        if (!found) return;
        snprintf(plain, sizeof plain, "%s-%s.json", label, name);
        REQUIRE(decompress(tokenizer_path, test_path(plain)) == 0);
        snprintf(tokenizer_path, sizeof tokenizer_path, "%s", test_path(plain));
    }
    check_goldens_of(tl_name, tokenizer_path, goldens_path, name);
}

static int compare_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* One case per goldens file of the set, named goldens_NAME[label]. */
static void check_set(const char *root, const char *label) {
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/tokenizer-goldens", root);
    DIR *d = opendir(dir);
    char *names[64];
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d)) && n < 64;) {
        size_t len = strlen(e->d_name);
        if (len > 6 && !strcmp(e->d_name + len - 6, ".jsonl")) names[n++] = strndup(e->d_name, len - 6);
    }
    if (d) closedir(d);
    qsort(names, n, sizeof *names, compare_names);
    char case_name[300];
    snprintf(case_name, sizeof case_name, "goldens_found[%s]", label);
    RUN_AS(case_name, CHECKF(n > 0, "no goldens in %s", dir));
    for (int i = 0; i < n; i++) {
        snprintf(case_name, sizeof case_name, "goldens_%s[%s]", names[i], label);
        RUN_AS(case_name, check_goldens(tl_name, root, label, names[i]));
        free(names[i]);
    }
}

/* A model folder: the teacher's tokenizer.json with a post-processor that adds nothing (the
 * BOS template dropped from a Sequence), beside the R1-Distill tokenizer_config.json flags, must
 * add the BOS as transformers' LlamaTokenizerFast does, which is exactly what the goldens with
 * specials hold: in-repo tiny-llama3 (whose own template adds it), shared llama3_1. The BOS id
 * is the teacher checkpoint's bos_token_id. */
static void check_tokenizer_config_adds_bos(const char *tl_name, const char *root, const char *source_name,
                                            const char *goldens_name, const char *bos) {
    char source[1200], folder[1200], path[1300], goldens_path[1200];
    snprintf(source, sizeof source, "%s/tokenizers/%s.json", root, source_name);
    snprintf(path, sizeof path, "%s/models/tiny-llama3/config.json", root);
    json_t *tokenizer = json_load_file(source, 0, NULL), *config = json_load_file(path, 0, NULL);
    REQUIRE(tokenizer && config);
    json_int_t bos_id = json_integer_value(json_object_get(config, "bos_token_id"));
    json_decref(config);
    json_t *post = json_object_get(tokenizer, "post_processor");
    const char *type = json_string_value(json_object_get(post, "type"));
    if (type && !strcmp(type, "Sequence"))
        json_object_set(tokenizer, "post_processor", json_array_get(json_object_get(post, "processors"), 0));
    snprintf(folder, sizeof folder, "%s", test_path(source_name));
    REQUIRE(mkdir(folder, 0755) == 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", folder);
    REQUIRE(json_dump_file(tokenizer, path, 0) == 0);
    json_decref(tokenizer);
    es_error err = {0};
    es_tokenizer *tok = NULL;
    int32_t specials[4];
    REQUIRE(es_tokenizer_load(path, &tok, &err) == ES_OK); /* the file alone adds nothing, */
    CHECKF(es_tokenizer_added_specials(tok, specials, 4) == 0, "%s adds specials itself", path);
    es_tokenizer_free(tok);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", folder);
    FILE *f = fopen(path, "w");
    REQUIRE(f);
    fprintf(f, "{\"add_bos_token\": true, \"add_eos_token\": false, \"tokenizer_class\": \"LlamaTokenizerFast\",\n"
               " \"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"%s\"}}\n", bos);
    fclose(f);
    REQUIRE(es_tokenizer_load(folder, &tok, &err) == ES_OK); /* the folder adds the BOS */
    int n_folder = es_tokenizer_added_specials(tok, specials, 4);
    CHECKF(n_folder == 1 && specials[0] == bos_id, "%d specials added, first %d, want %lld", n_folder, specials[0],
           (long long)bos_id);
    es_tokenizer_free(tok);
    snprintf(goldens_path, sizeof goldens_path, "%s/tokenizer-goldens/%s.jsonl", root, goldens_name);
    check_goldens_of(tl_name, folder, goldens_path, goldens_name);
}

/* common/unicode_norm_new.h lists what utf8proc normalizes and Hugging Face (Unicode 9.0) does
 * not: made from one utf8proc, a newer one normalizes more code points that must be listed. */
TEST(normalization_table_fits_utf8proc) {
    CHECKF(!strcmp(utf8proc_unicode_version(), ES_UNICODE_NORM_UTF8PROC_VERSION),
           "libutf8proc has Unicode %s, common/unicode_norm_new.h was made for %s: make it again with "
           "tests/tools/gen_unicode_norm_new.py",
           utf8proc_unicode_version(), ES_UNICODE_NORM_UTF8PROC_VERSION);
    size_t n = sizeof es_unicode_norm_new / sizeof *es_unicode_norm_new;
    for (size_t i = 0; i < n; i++) /* sorted and disjoint: the tokenizer searches it by halves */
        CHECKF(es_unicode_norm_new[i].first <= es_unicode_norm_new[i].last &&
                   (i == 0 || es_unicode_norm_new[i - 1].last < es_unicode_norm_new[i].first),
               "range %zu", i);
}

int main(void) {
    RUN(normalization_table_fits_utf8proc);
    check_set(test_fixtures(), "repo");
    RUN_AS("model_folder_tokenizer_config_adds_bos[repo]",
           check_tokenizer_config_adds_bos(tl_name, test_fixtures(), "tiny-llama3", "tiny-llama3", "<｜begin▁of▁sentence｜>"));
    const char *shared = test_shared_fixtures();
    if (!shared) {
        test_skip_shared("tokenizer_goldens");
        return test_summary();
    }
    check_set(shared, "shared");
    RUN_AS("model_folder_tokenizer_config_adds_bos[shared]",
           check_tokenizer_config_adds_bos(tl_name, shared, "llama3", "llama3_1", "<|begin_of_text|>"));
    return test_summary();
}
