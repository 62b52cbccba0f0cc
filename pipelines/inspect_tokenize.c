/* essence-inspect tokenize: the tokenizer as a command.
 *   --tokenizer PATH [--jsonl FILE] [--add-special-tokens]   {"text": ...} (or plain lines on stdin)
 *                                                          -> {"ids": [...], "byte_offsets": [[s, e], ...]}
 *   --decode                                               {"ids": [...]} -> {"text": ...} */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "inspect.h"
#include "jsonl.h"
#include "tokenizer.h"

static int print_json(json_t *value, es_error *err) {
    char *text = value ? json_dumps(value, JSON_COMPACT | JSON_ENSURE_ASCII * 0) : NULL;
    json_decref(value);
    if (!text) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int failed = puts(text) < 0;
    free(text);
    return failed ? es_fail(err, ES_ERR_RUNTIME, "cannot write to standard output") : ES_OK;
}

static int encode_one(const es_tokenizer *tok, const char *where, long line, const char *text, size_t len, int add_special,
                      es_encoding *encoding, es_error *err) {
    if (es_tokenizer_encode(tok, text, len, add_special, encoding, err)) {
        es_error_prefix(err, "%s:%ld", where, line);
        return err->code;
    }
    json_t *ids = json_array(), *offsets = json_array();
    for (size_t i = 0; ids && offsets && i < encoding->n; i++) {
        json_array_append_new(ids, json_integer(encoding->ids[i]));
        json_array_append_new(offsets, json_pack("[ii]", encoding->spans[i][0], encoding->spans[i][1]));
    }
    return print_json(json_pack("{soso}", "ids", ids, "byte_offsets", offsets), err);
}

static int decode_one(const es_tokenizer *tok, const char *where, long line, const json_t *object, es_error *err) {
    const json_t *ids = json_object_get(object, "ids");
    if (!json_is_array(ids)) return es_fail(err, ES_ERR_DATA, "%s:%ld: field \"ids\" is not a list", where, line);
    size_t n = json_array_size(ids);
    int32_t *values = malloc((n ? n : 1) * sizeof *values);
    if (!values) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (size_t i = 0; !rc && i < n; i++) {
        const json_t *id = json_array_get(ids, i);
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > INT32_MAX)
            rc = es_fail(err, ES_ERR_DATA, "%s:%ld: ids[%zu] is not a token id", where, line, i);
        else values[i] = (int32_t)json_integer_value(id);
    }
    char *text = NULL;
    size_t len = 0;
    if (!rc && es_tokenizer_decode(tok, values, n, &text, &len, err)) {
        es_error_prefix(err, "%s:%ld", where, line);
        rc = err->code;
    }
    free(values);
    if (!rc) rc = print_json(json_pack("{ss%}", "text", text, len), err);
    free(text);
    return rc;
}

int inspect_tokenize(const es_config *cfg, es_error *err) {
    if (!es_config_is_set(cfg, "tokenizer"))
        return es_fail(err, ES_ERR_USAGE, "usage: essence-inspect tokenize --tokenizer DIR_OR_JSON [--jsonl FILE] "
                                          "[--add-special-tokens [--add-bos auto|always|never]] [--decode]");
    es_add_bos add_bos;
    int rc = es_add_bos_parse(es_config_str(cfg, "add-bos"), &add_bos, err);
    if (rc) return rc;
    es_tokenizer *tok = NULL;
    rc = es_tokenizer_load(es_config_str(cfg, "tokenizer"), &tok, err);
    if (!rc) rc = es_tokenizer_set_add_bos(tok, add_bos, err);
    if (rc) {
        es_tokenizer_free(tok);
        return rc;
    }
    const int add_special = es_config_bool(cfg, "add-special-tokens"), decode = es_config_bool(cfg, "decode");
    es_encoding encoding = {0};
    if (es_config_is_set(cfg, "jsonl") || decode) {
        /* JSONL, from the file or (for --decode without --jsonl) standard input */
        const char *path = es_config_is_set(cfg, "jsonl") ? es_config_str(cfg, "jsonl") : "-";
        es_jsonl reader;
        rc = es_jsonl_open(&reader, path, err);
        json_t *object = NULL;
        int got = 0;
        while (!rc && (got = es_jsonl_next(&reader, &object, err)) == 1) {
            if (decode) {
                rc = decode_one(tok, reader.path, reader.line, object, err);
            } else {
                const json_t *text = json_object_get(object, "text");
                if (!json_is_string(text)) rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"text\" is not a string", reader.path, reader.line);
                else rc = encode_one(tok, reader.path, reader.line, json_string_value(text), json_string_length(text), add_special, &encoding, err);
            }
            json_decref(object);
        }
        if (!rc && got < 0) rc = err->code;
        es_jsonl_close(&reader);
    } else {
        /* plain text on standard input: one text per line, without its newline */
        char *line = NULL;
        size_t cap = 0;
        ssize_t len;
        long number = 0;
        while (!rc && (len = getline(&line, &cap, stdin)) >= 0) {
            number++;
            if (len > 0 && line[len - 1] == '\n') len--;
            rc = encode_one(tok, "<stdin>", number, line, (size_t)len, add_special, &encoding, err);
        }
        free(line);
    }
    es_encoding_free(&encoding);
    es_tokenizer_free(tok);
    return rc;
}
