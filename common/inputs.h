/* JSONL samples in their three forms, rendered and tokenised: essence-extract's input, and
 * essence-align's text corpus (align/data.c), so both tokenise a record the same way.
 *   {"id": ..., "text": "..."}                    encoded with add_special_tokens
 *   {"id": ..., "prompt": "...", "response": "..."} rendered with the template, no specials added
 *   {"id": ..., "ids": [1, 2, 3]}                 already tokenised (no text: project refuses it)
 * and, for essence-eval (extract_input.answers set):
 *   {"id": ..., "prompt": "...", "answer": ...}   rendered with the template up to {response} */
#ifndef ES_INPUTS_H
#define ES_INPUTS_H

#include <stdint.h>

#include "error.h"
#include "jsonl.h"
#include "tokenizer.h"

#define EXTRACT_DEFAULT_TEMPLATE "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c><\xef\xbd\x9cUser\xef\xbd\x9c>{prompt}<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>{response}"

typedef struct extract_sample {
    long line;                 /* in the JSONL file, for messages */
    char *id;
    char *text;                /* the rendered text (NULL for the ids form) */
    size_t text_len;
    int add_special_tokens;
    int truncated;
    char *answer;              /* a prompt/answer record's answer (a number is kept as written) */
    int32_t *ids;              /* (n_tokens) */
    int32_t (*spans)[2];       /* (n_tokens) byte spans in text; [0, 0] for the ids form */
    int n_tokens;
} extract_sample;

typedef struct extract_input {
    es_jsonl reader;
    const char *path;
    const char *template_text;
    const char *tokenizer_path;  /* loaded at the first text sample */
    es_tokenizer *tokenizer;
    es_add_bos add_bos;        /* applied to the tokenizer when it is loaded */
    int max_seq;
    int truncate;              /* cut longer samples instead of refusing them */
    int answers;               /* prompts come with an "answer", not a "response" (essence-eval) */
    int vocab_size;
    es_encoding encoding;
    int64_t total;             /* samples (non-blank lines) in the input, counted at open */
} extract_input;

/* Opens the JSONL input (a file, a FIFO, "-" for standard input) and counts its samples
 * (input->total); errors name the file (and line). */
int extract_input_open(extract_input *input, const char *path, const char *tokenizer_path, es_add_bos add_bos,
                       const char *template_text, int max_seq, int truncate, int vocab_size, es_error *err);
/* 1 and the next sample, 0 at the end, or -1 with err set (naming PATH:LINE). */
int extract_input_next(extract_input *input, extract_sample *sample, es_error *err);
/* Skips n samples without tokenising them (a shard's start, a resumed run's done samples). */
int extract_input_skip(extract_input *input, int64_t n, es_error *err);
void extract_sample_free(extract_sample *sample);
void extract_input_close(extract_input *input);

#endif
