/* libFuzzer: arbitrary bytes through a small tokenizer with every feature the encoder has
 * (NFC, a Llama-3-style split, byte-level BPE, added tokens with every flag, a template).
 * Invalid UTF-8 must be refused; otherwise every span lies inside the text, starts never
 * decrease, ids are in the vocabulary, and decoding the ids works. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"
#include "utf8.h"

static es_tokenizer *tok;

static void add_token(json_t *list, int id, const char *content, int special, int lstrip, int rstrip, int single, int normalized) {
    json_array_append_new(list, json_pack("{si ss sb sb sb sb sb}", "id", id, "content", content, "special", special, "lstrip",
                                          lstrip, "rstrip", rstrip, "single_word", single, "normalized", normalized));
}

static es_tokenizer *build(void) {
    json_t *vocab = json_object();
    for (int b = 0, extra = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        unsigned c = printable ? (unsigned)b : 256u + (unsigned)extra++;
        char utf8[4] = {0};
        if (c < 0x80) utf8[0] = (char)c;
        else utf8[0] = (char)(0xc0 | (c >> 6)), utf8[1] = (char)(0x80 | (c & 0x3f));
        json_object_set_new(vocab, utf8, json_integer(b));
    }
    const char *merges[][2] = {{"\xc4\xa0", "t"}, {"h", "e"}, {"\xc4\xa0t", "he"}, {"i", "n"}, {"a", "n"}, {"an", "d"}};
    json_t *merge_list = json_array();
    int next = 256;
    for (int i = 0; i < 6; i++) {
        char merged[16];
        snprintf(merged, sizeof merged, "%s%s", merges[i][0], merges[i][1]);
        if (!json_object_get(vocab, merged)) json_object_set_new(vocab, merged, json_integer(next++));
        json_array_append_new(merge_list, json_pack("[ss]", merges[i][0], merges[i][1]));
    }
    json_t *added = json_array();
    add_token(added, next, "<s>", 1, 0, 0, 0, 0);
    add_token(added, next + 1, "<think>", 0, 1, 1, 0, 1);
    add_token(added, next + 2, "x y", 0, 0, 1, 1, 0);
    add_token(added, next + 3, "caf\xc3\xa9", 0, 1, 0, 1, 1);
    const char *pattern = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    json_t *split = json_pack("{ss s{ss} ss sb}", "type", "Split", "pattern", "Regex", pattern, "behavior", "Isolated", "invert", 0);
    json_t *byte_level = json_pack("{ss sb sb sb}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 0);
    json_t *pre = json_pack("{ss s[oo]}", "type", "Sequence", "pretokenizers", split, byte_level);
    json_t *single = json_pack("[{s{ss si}} {s{ss si}}]", "SpecialToken", "id", "<s>", "type_id", 0, "Sequence", "id", "A", "type_id", 0);
    json_t *specials = json_pack("{s{ss s[i] s[s]}}", "<s>", "id", "<s>", "ids", next, "tokens", "<s>");
    json_t *post = json_pack("{ss so so}", "type", "TemplateProcessing", "single", single, "special_tokens", specials);
    json_t *model = json_pack("{ss sO sO sb}", "type", "BPE", "vocab", vocab, "merges", merge_list, "ignore_merges", 0);
    json_t *root = json_pack("{so s{ss} so so s{ss} so}", "added_tokens", added, "normalizer", "type", "NFC", "pre_tokenizer", pre,
                             "post_processor", post, "decoder", "type", "ByteLevel", "model", model);
    char *text = root ? json_dumps(root, 0) : NULL;
    es_error err = {0};
    es_tokenizer *loaded = NULL;
    if (!text || es_tokenizer_load_json(text, strlen(text), "fuzz.json", &loaded, &err)) {
        fprintf(stderr, "fuzz_tokenizer_encode: cannot build the tokenizer: %s\n", err.msg);
        abort();
    }
    free(text);
    json_decref(root), json_decref(vocab), json_decref(merge_list);
    return loaded;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tok) tok = build();
    es_encoding encoding = {0};
    for (int add_special = 0; add_special < 2; add_special++) {
        es_error err = {0};
        int rc = es_tokenizer_encode(tok, (const char *)data, size, add_special, &encoding, &err);
        if (!es_utf8_valid(data, size)) {
            if (rc != ES_ERR_DATA) abort();
            continue;
        }
        if (rc) abort();
        int32_t previous = 0;
        for (size_t i = 0; i < encoding.n; i++) {
            int32_t start = encoding.spans[i][0], end = encoding.spans[i][1];
            if (start < 0 || end < start || (size_t)end > size || encoding.ids[i] < 0 ||
                encoding.ids[i] >= es_tokenizer_vocab_size(tok))
                abort();
            if (start < previous && !(start == 0 && end == 0)) abort();
            if (end > start) previous = start;
        }
        char *text = NULL;
        size_t len = 0;
        if (es_tokenizer_decode(tok, encoding.ids, encoding.n, &text, &len, &err)) abort();
        free(text);
    }
    es_encoding_free(&encoding);
    return 0;
}
