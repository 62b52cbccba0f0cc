/* The tokenizer against Hugging Face `tokenizers` goldens: every line of every goldens file.
 * ids exact for both add_special_tokens settings; byte spans exact where NFC leaves the text
 * unchanged; decode(ids) equal to the golden decoded text. */
#include <jansson.h>
#include <utf8proc.h>

#include "../testlib.h"
#include "jsonl.h"
#include "tokenizer.h"

static int nfc_unchanged(const char *text, size_t len) {
    utf8proc_uint8_t *mapped = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)len, &mapped,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    int same = n >= 0 && (size_t)n == len && memcmp(mapped, text, len) == 0;
    free(mapped);
    return same;
}

/* Checks the tokenizer at `tokenizer_path` (a file or a model folder) against the goldens
 * of fixture `name`. */
static void check_goldens_of(const char *tl_name, const char *tokenizer_path, const char *name) {
    char goldens_path[900];
    snprintf(goldens_path, sizeof goldens_path, "%s/tokenizer-goldens/%s.jsonl", test_fixtures(), name);
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

static void check_goldens(const char *tl_name, const char *name) {
    char tokenizer_path[900];
    snprintf(tokenizer_path, sizeof tokenizer_path, "%s/tokenizers/%s.json", test_fixtures(), name);
    FILE *probe = fopen(tokenizer_path, "r");
    if (!probe) SKIP("%s not found (set ESSENCE_FIXTURES)", tokenizer_path);
    fclose(probe);
    check_goldens_of(tl_name, tokenizer_path, name);
}

/* A model folder: llama3.json (whose post-processor adds nothing) with the R1-Distill
 * tokenizer_config.json flags must add the BOS as transformers does, which is exactly what
 * the llama3_1 goldens hold. */
TEST(model_folder_tokenizer_config_adds_bos) {
    char source[900], folder[700], command[3000];
    snprintf(source, sizeof source, "%s/tokenizers/llama3.json", test_fixtures());
    FILE *probe = fopen(source, "r");
    if (!probe) SKIP("%s not found (set ESSENCE_FIXTURES)", source);
    fclose(probe);
    snprintf(folder, sizeof folder, "%s/model", test_tmpdir());
    snprintf(command, sizeof command, "mkdir -p '%s' && cp '%s' '%s/tokenizer.json'", folder, source, folder);
    REQUIRE(system(command) == 0);
    snprintf(command, sizeof command, "%s/tokenizer_config.json", folder);
    FILE *config = fopen(command, "w");
    REQUIRE(config);
    fputs("{\"add_bos_token\": true, \"add_eos_token\": false, \"tokenizer_class\": \"LlamaTokenizerFast\",\n"
          " \"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<|begin_of_text|>\"},\n"
          " \"eos_token\": \"<|end_of_text|>\"}\n", config);
    fclose(config);
    es_error err = {0};
    es_tokenizer *tok = NULL;
    REQUIRE(es_tokenizer_load(folder, &tok, &err) == ES_OK);
    int32_t specials[4];
    CHECK(es_tokenizer_added_specials(tok, specials, 4) == 1 && specials[0] == 128000);
    es_tokenizer_free(tok);
    check_goldens_of(tl_name, folder, "llama3_1");
}

TEST(goldens_llama3) { check_goldens(tl_name, "llama3"); }
TEST(goldens_llama3_1) { check_goldens(tl_name, "llama3_1"); }
TEST(goldens_qwen3) { check_goldens(tl_name, "qwen3"); }
TEST(goldens_deepseek_v3) { check_goldens(tl_name, "deepseek_v3"); }

int main(void) {
    RUN(goldens_llama3);
    RUN(goldens_llama3_1);
    RUN(goldens_qwen3);
    RUN(goldens_deepseek_v3);
    RUN(model_folder_tokenizer_config_adds_bos);
    return test_summary();
}
