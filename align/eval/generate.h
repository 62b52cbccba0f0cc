/* The model essence-eval measures: a checkpoint on a device with its head, greedy generation
 * over a key/value cache, several prompts side by side, and the cross entropy of a text.
 *
 * Prompts are fed in pieces that fill the decoder's token budget (a prompt longer than the
 * budget takes several forwards), all but each prompt's last token; then every step feeds one
 * token per unfinished prompt (the first step the prompts' last tokens), takes the logits of
 * those rows through the head and picks the first largest, as Hugging Face's greedy search. */
#ifndef ES_EVAL_GENERATE_H
#define ES_EVAL_GENERATE_H

#include <stdint.h>

#include "backend.h"
#include "decoder.h"
#include "model.h"
#include "stream.h"

typedef struct eval_model {
    es_device *dev;
    es_model_store store;
    es_decoder *decoder;
    es_kv_cache *cache;
    es_layer_stream *layers;
    void *final_norm;        // (C) device, weight format
    void *lm_head;           // (V, C) device, weight format
    float *logits;           // (logit_rows, V) device
    float *host_logits;      // (logit_rows, V) host
    int capacity;            /* tokens per forward */
    int slots, max_seq;      /* prompts side by side, and the tokens each may reach (prompt + generated) */
    int logit_rows;
    int32_t stop_ids[16];    /* the end-of-sequence ids (generation_config.json, else config.json) */
    int n_stop;
} eval_model;

/* The checkpoint in dir on dev: slots prompts of up to max_seq tokens each, forwards of up to
 * capacity tokens. */
int eval_model_open(eval_model *m, es_device *dev, const char *dir, int slots, int max_seq, int capacity, es_error *err);
void eval_model_close(eval_model *m);

typedef enum { EVAL_STOP_EOS, EVAL_STOP_LENGTH, EVAL_STOP_CONTEXT } eval_stop;
const char *eval_stop_name(eval_stop stop); /* "eos", "length" (--max-new-tokens), "context" (--max-seq) */

typedef struct eval_generation {
    const int32_t *prompt;   // (prompt_len) host, prompt_len >= 1
    int prompt_len;
    int32_t *ids;            // (max_new) host: the generated tokens, an end-of-sequence token included
    int n;
    eval_stop stop;
} eval_generation;

/* Greedy generation of up to max_new tokens for each of gens[0, n) (n <= slots); ids must
 * have room for max_new. */
int eval_generate(eval_model *m, eval_generation *gens, int n, int max_new, es_error *err);

/* The summed next-token cross entropy of ids[0, n) (n - 1 predictions; n <= max_seq). */
int eval_cross_entropy(eval_model *m, const int32_t *ids, int n, double *ce_sum, es_error *err);

#endif
