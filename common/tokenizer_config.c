/* A model folder's tokenizer_config.json, and the choice of --add-bos (docs/tokenizer.md "BOS").
 * Loading the tokenizer.json itself: tokenizer.c. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

static const cJSON *get(const cJSON *object, const char *key) {
    return cJSON_IsObject(object) ? cJSON_GetObjectItemCaseSensitive(object, key) : NULL;
}

static int get_bool(const cJSON *object, const char *key, int fallback) {
    const cJSON *value = get(object, key);
    return cJSON_IsBool(value) ? cJSON_IsTrue(value) : fallback;
}

/* "<s>", or {"content": "<s>", ...} as AddedToken objects are written. */
static const char *token_text(const cJSON *value) {
    if (cJSON_IsString(value)) return value->valuestring;
    const cJSON *content = get(value, "content");
    return cJSON_IsString(content) ? content->valuestring : NULL;
}

/* transformers' LlamaTokenizerFast (4.x) rebuilds the post-processor from add_bos_token (default
 * true) and add_eos_token (default false): "[BOS] $A [EOS]". Other classes keep the file's. Any
 * class's bos_token is remembered for --add-bos always. */
int tk_apply_tokenizer_config(es_tokenizer *tok, const char *path, es_error *err) {
    char *text = NULL;
    size_t len = 0;
    int rc = tk_read_file(path, &text, &len, err);
    if (rc) return rc;
    cJSON *config = tk_parse_json(text, len, path, err);
    free(text);
    if (!config) return err->code;
    const char *bos = token_text(get(config, "bos_token"));
    const char *eos = token_text(get(config, "eos_token"));
    int32_t bos_id = bos ? es_tokenizer_token_id(tok, bos) : -1, eos_id = eos ? es_tokenizer_token_id(tok, eos) : -1;
    tok->bos_id = bos_id;
    const cJSON *class_name = get(config, "tokenizer_class");
    if (cJSON_IsString(class_name) && !strcmp(class_name->valuestring, "LlamaTokenizerFast")) {
        int add_bos = get_bool(config, "add_bos_token", 1), add_eos = get_bool(config, "add_eos_token", 0);
        if (add_bos && bos_id < 0) rc = es_fail(err, ES_ERR_DATA, "%s: add_bos_token, but bos_token is not a known token", path);
        else if (add_eos && eos_id < 0) rc = es_fail(err, ES_ERR_DATA, "%s: add_eos_token, but eos_token is not a known token", path);
        else {
            tk_clear_template(tok);
            if (add_bos) rc = tk_add_template_item(tok, 0, &bos_id, 1, err);
            if (!rc) rc = tk_add_template_item(tok, 1, NULL, 0, err);
            if (!rc && add_eos) rc = tk_add_template_item(tok, 0, &eos_id, 1, err);
        }
    }
    cJSON_Delete(config);
    return rc;
}

static const char *const mode_names[] = {"auto", "always", "never"};

int es_add_bos_parse(const char *text, es_add_bos *mode, es_error *err) {
    for (int m = 0; m < 3; m++)
        if (text && !strcmp(text, mode_names[m])) {
            *mode = (es_add_bos)m;
            return ES_OK;
        }
    return es_fail(err, ES_ERR_USAGE, "--add-bos %s: expected auto, always or never", text ? text : "(none)");
}

const char *es_add_bos_name(es_add_bos mode) { return mode_names[mode]; }

/* The template's items before the text ($A): where the BOS goes. */
static size_t leading_specials(const es_tokenizer *tok) {
    size_t n = 0;
    while (n < tok->n_template_items && !tok->template_items[n].is_sequence) n++;
    return n;
}

int es_tokenizer_set_add_bos(es_tokenizer *tok, es_add_bos mode, es_error *err) {
    size_t leading = leading_specials(tok);
    if (mode == ES_ADD_BOS_NEVER && leading) {
        for (size_t i = 0; i < leading; i++) free(tok->template_items[i].ids);
        memmove(tok->template_items, tok->template_items + leading,
                (tok->n_template_items - leading) * sizeof *tok->template_items);
        tok->n_template_items -= leading;
    }
    if (mode != ES_ADD_BOS_ALWAYS || (leading && tok->template_items[0].n_ids)) return ES_OK;
    if (tok->bos_id < 0)
        return es_fail(err, ES_ERR_USAGE,
                       "--add-bos always: %s adds no BOS and names none (no bos_token in a tokenizer_config.json beside it)",
                       tok->name);
    /* The text alone becomes [BOS] $A, and a template without a special before $A gains one. */
    if (!tok->n_template_items) {
        int rc = tk_add_template_item(tok, 1, NULL, 0, err);
        if (rc) return rc;
    }
    int rc = tk_add_template_item(tok, 0, &tok->bos_id, 1, err);
    if (rc) return rc;
    tk_template_item bos = tok->template_items[tok->n_template_items - 1];
    memmove(tok->template_items + 1, tok->template_items, (tok->n_template_items - 1) * sizeof *tok->template_items);
    tok->template_items[0] = bos;
    return ES_OK;
}

void es_tokenizer_specials_text(const es_tokenizer *tok, char *out, size_t size) {
    size_t n = (size_t)snprintf(out, size, "%s", tok->n_template_items ? "" : "$A");
    for (size_t i = 0; i < tok->n_template_items && n < size; i++) {
        const tk_template_item *item = &tok->template_items[i];
        if (item->is_sequence) n += (size_t)snprintf(out + n, size - n, "%s$A", n ? "," : "");
        for (size_t k = 0; k < item->n_ids && n < size; k++)
            n += (size_t)snprintf(out + n, size - n, "%s%d", n ? "," : "", item->ids[k]);
    }
}
