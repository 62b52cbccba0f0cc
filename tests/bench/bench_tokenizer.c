/* Tokenizer benchmark, our side: bench_tokenizer TOKENIZER.json TEXTS.jsonl REPEATS
 * loads the tokenizer (timed), encodes every {"text": ...} line REPEATS times on one thread
 * without special tokens, and prints one JSON line: load_s, mb_per_s, tokens_per_s.
 * tests/bench/bench_tokenizer.py runs it beside Hugging Face `tokenizers` on the same texts. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsonl.h"
#include "log.h"
#include "progress.h"
#include "tokenizer.h"

int main(int argc, char **argv) {
    es_set_program("bench_tokenizer");
    if (argc != 4) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER.json TEXTS.jsonl REPEATS\n");
        return ES_ERR_USAGE;
    }
    es_error err = {0};
    es_jsonl reader;
    if (es_jsonl_open(&reader, argv[2], &err)) es_exit_error(&err);
    size_t n = 0, cap = 1024, bytes = 0;
    char **texts = malloc(cap * sizeof *texts);
    size_t *lengths = malloc(cap * sizeof *lengths);
    json_t *line;
    while (es_jsonl_next(&reader, &line, &err) == 1) {
        const json_t *text = json_object_get(line, "text");
        if (n == cap) {
            cap *= 2;
            texts = realloc(texts, cap * sizeof *texts);
            lengths = realloc(lengths, cap * sizeof *lengths);
        }
        lengths[n] = json_string_length(text);
        texts[n] = malloc(lengths[n] + 1);
        memcpy(texts[n], json_string_value(text), lengths[n]);
        bytes += lengths[n++];
        json_decref(line);
    }
    es_jsonl_close(&reader);
    double start = es_now();
    es_tokenizer *tok = NULL;
    if (es_tokenizer_load(argv[1], &tok, &err)) es_exit_error(&err);
    double load = es_now() - start;
    int repeats = atoi(argv[3]);
    es_encoding encoding = {0};
    size_t tokens = 0;
    start = es_now();
    for (int r = 0; r < repeats; r++)
        for (size_t i = 0; i < n; i++) {
            if (es_tokenizer_encode(tok, texts[i], lengths[i], 0, &encoding, &err)) es_exit_error(&err);
            tokens += encoding.n;
        }
    double seconds = es_now() - start;
    printf("{\"load_s\": %.4f, \"mb_per_s\": %.3f, \"tokens_per_s\": %.0f, \"texts\": %zu, \"mb\": %.3f}\n", load,
           (double)bytes * repeats / 1e6 / seconds, (double)tokens / seconds, n, (double)bytes / 1e6);
    es_encoding_free(&encoding);
    es_tokenizer_free(tok);
    for (size_t i = 0; i < n; i++) free(texts[i]);
    free(texts), free(lengths);
    return 0;
}
