#include "inputs.h"

#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int extract_input_open(extract_input *input, const char *path, const char *tokenizer_path, es_add_bos add_bos,
                       const char *template_text, int max_seq, int truncate, int vocab_size, es_error *err) {
    memset(input, 0, sizeof *input);
    input->path = path;
    input->tokenizer_path = tokenizer_path;
    input->add_bos = add_bos;
    input->template_text = template_text;
    input->max_seq = max_seq;
    input->truncate = truncate;
    input->vocab_size = vocab_size;
    int rc = es_jsonl_open(&input->reader, path, err);
    /* Counted here, on the stream that is then read: a pipe or FIFO is read once. */
    if (!rc) rc = es_jsonl_count(&input->reader, &input->total, err);
    return rc;
}

static char *render(const char *template_text, const char *prompt, size_t prompt_len, const char *response, size_t response_len,
                    size_t *len) {
    size_t cap = strlen(template_text) + prompt_len + response_len + 1, n = 0;
    char *out = malloc(cap);
    if (!out) return NULL;
    for (const char *p = template_text; *p;) {
        if (!strncmp(p, "{prompt}", 8)) memcpy(out + n, prompt, prompt_len), n += prompt_len, p += 8;
        else if (!strncmp(p, "{response}", 10)) memcpy(out + n, response, response_len), n += response_len, p += 10;
        else out[n++] = *p++;
        if (n + 1 > cap) break; /* cannot happen: each placeholder appears once per its length */
    }
    out[n] = '\0';
    *len = n;
    return out;
}

static const char *string_field(const json_t *object, const char *key, size_t *len, int *wrong_type) {
    const json_t *value = json_object_get(object, key);
    *wrong_type = value && !json_is_string(value);
    if (!json_is_string(value)) return NULL;
    *len = json_string_length(value);
    return json_string_value(value);
}

/* The tokenizer, at the first text sample. A model folder without tokenizer.json is a data
 * error naming the missing file (an ids-only corpus needs none, so it is not checked earlier). */
static int load_tokenizer(extract_input *input, long line, es_error *err) {
    struct stat st;
    if (stat(input->tokenizer_path, &st) == 0 && S_ISDIR(st.st_mode)) {
        char *file = NULL;
        if (asprintf(&file, "%s/tokenizer.json", input->tokenizer_path) < 0) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        int missing = stat(file, &st) != 0;
        int rc = missing ? es_fail(err, ES_ERR_DATA, "%s: missing (needed by the text sample on %s:%ld; --tokenizer names another)",
                                   file, input->path, line)
                         : ES_OK;
        free(file);
        if (rc) return rc;
    }
    int rc = es_tokenizer_load(input->tokenizer_path, &input->tokenizer, err);
    if (rc) es_error_prefix(err, "tokenizer");
    else if ((rc = es_tokenizer_set_add_bos(input->tokenizer, input->add_bos, err))) {
        es_tokenizer_free(input->tokenizer);
        input->tokenizer = NULL;
    }
    return rc;
}

int extract_input_next(extract_input *input, extract_sample *sample, es_error *err) {
    memset(sample, 0, sizeof *sample);
    json_t *object = NULL;
    int got = es_jsonl_next(&input->reader, &object, err);
    if (got <= 0) return got;
    sample->line = input->reader.line;
    const char *where = input->path;
    long line = sample->line;
    int rc = ES_OK;
    const json_t *id = json_object_get(object, "id");
    if (json_is_string(id)) sample->id = strdup(json_string_value(id));
    else if (json_is_integer(id)) rc = asprintf(&sample->id, "%lld", (long long)json_integer_value(id)) < 0;
    else if (!id) rc = asprintf(&sample->id, "%ld", line) < 0; /* no id: the line number */
    else rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"id\" is not a string or an integer", where, line);
    if (!rc && !sample->id) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");

    size_t text_len = 0, prompt_len = 0, response_len = 0;
    int bad_text, bad_prompt, bad_response;
    const char *text = string_field(object, "text", &text_len, &bad_text);
    const char *prompt = string_field(object, "prompt", &prompt_len, &bad_prompt);
    const char *response = string_field(object, "response", &response_len, &bad_response);
    const json_t *ids = json_object_get(object, "ids");
    if (rc) {
    } else if (bad_text || bad_prompt || bad_response) {
        rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"%s\" is not a string", where, line,
                     bad_text ? "text" : bad_prompt ? "prompt" : "response");
    } else if (ids) {
        if (!json_is_array(ids) || json_array_size(ids) == 0)
            rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"ids\" is not a non-empty list", where, line);
        size_t n = rc ? 0 : json_array_size(ids);
        sample->ids = malloc((n ? n : 1) * sizeof *sample->ids);
        sample->spans = calloc(n ? n : 1, sizeof *sample->spans);
        if (!rc && (!sample->ids || !sample->spans)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        for (size_t i = 0; !rc && i < n; i++) {
            const json_t *value = json_array_get(ids, i);
            if (!json_is_integer(value) || json_integer_value(value) < 0 || json_integer_value(value) >= input->vocab_size)
                rc = es_fail(err, ES_ERR_DATA, "%s:%ld: ids[%zu] is not a token id of the model (0..%d)", where, line, i,
                             input->vocab_size - 1);
            else sample->ids[i] = (int32_t)json_integer_value(value);
        }
        sample->n_tokens = (int)n;
    } else {
        if (text) {
            sample->text = malloc(text_len + 1);
            if (sample->text) memcpy(sample->text, text, text_len), sample->text[text_len] = '\0';
            sample->text_len = text_len;
            sample->add_special_tokens = 1;
        } else if (prompt && input->answers) {
            const json_t *answer = json_object_get(object, "answer");
            if (response) {
                rc = es_fail(err, ES_ERR_DATA, "%s:%ld: a prompt to evaluate has an \"answer\", not a \"response\"", where, line);
            } else if (json_is_string(answer)) {
                sample->answer = strdup(json_string_value(answer));
            } else if (json_is_number(answer)) {
                sample->answer = json_dumps(answer, JSON_ENCODE_ANY); /* as the number's JSON text */
            } else {
                rc = es_fail(err, ES_ERR_DATA, "%s:%ld: a prompt needs an \"answer\" (a string or a number)", where, line);
            }
            /* the text the model continues: the template up to where the response would go */
            const char *cut = strstr(input->template_text, "{response}");
            const size_t head = cut ? (size_t)(cut - input->template_text) : strlen(input->template_text);
            char *prefix = strndup(input->template_text, head);
            if (!rc && (!sample->answer || !prefix)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            if (!rc) sample->text = render(prefix, prompt, prompt_len, "", 0, &sample->text_len);
            free(prefix);
        } else if (prompt && response) {
            sample->text = render(input->template_text, prompt, prompt_len, response, response_len, &sample->text_len);
        } else {
            rc = es_fail(err, ES_ERR_DATA, input->answers ? "%s:%ld: a sample needs \"text\", \"prompt\" and \"answer\", or \"ids\""
                                                          : "%s:%ld: a sample needs \"text\", \"prompt\" and \"response\", or \"ids\"",
                         where, line);
        }
        if (!rc && !sample->text) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (!rc && sample->text_len == 0) rc = es_fail(err, ES_ERR_DATA, "%s:%ld: the text is empty", where, line);
        if (!rc && !input->tokenizer) rc = load_tokenizer(input, line, err);
        if (!rc && es_tokenizer_encode(input->tokenizer, sample->text, sample->text_len, sample->add_special_tokens,
                                       &input->encoding, err)) {
            es_error_prefix(err, "%s:%ld", where, line);
            rc = err->code;
        }
        size_t n = rc ? 0 : input->encoding.n;
        if (!rc && n == 0) rc = es_fail(err, ES_ERR_DATA, "%s:%ld: the text makes no tokens", where, line);
        if (!rc) {
            sample->ids = malloc(n * sizeof *sample->ids);
            sample->spans = malloc(n * sizeof *sample->spans);
            if (!sample->ids || !sample->spans) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        }
        if (!rc) {
            memcpy(sample->ids, input->encoding.ids, n * sizeof *sample->ids);
            memcpy(sample->spans, input->encoding.spans, n * sizeof *sample->spans);
            sample->n_tokens = (int)n;
        }
        for (size_t i = 0; !rc && i < n; i++)
            if (sample->ids[i] >= input->vocab_size)
                rc = es_fail(err, ES_ERR_DATA, "%s:%ld: token id %d is outside the model's vocabulary (%d)", where, line,
                             sample->ids[i], input->vocab_size);
    }
    if (!rc && input->max_seq > 0 && sample->n_tokens > input->max_seq && !input->truncate) {
        rc = es_fail(err, ES_ERR_DATA, "%s:%ld: sample \"%s\" has %d tokens, more than --max-seq %d (--truncate cuts it)", where,
                     line, sample->id, sample->n_tokens, input->max_seq);
    } else if (!rc && input->max_seq > 0 && sample->n_tokens > input->max_seq) {
        es_warn("%s:%ld: sample \"%s\" has %d tokens; cut to --max-seq %d (flagged in /samples/truncated)", where, line,
                sample->id, sample->n_tokens, input->max_seq);
        sample->n_tokens = input->max_seq;
        sample->truncated = 1;
    }
    json_decref(object);
    if (rc) {
        extract_sample_free(sample);
        return -1;
    }
    return 1;
}

int extract_input_skip(extract_input *input, int64_t n, es_error *err) {
    for (int64_t i = 0; i < n; i++) {
        json_t *object = NULL;
        int got = es_jsonl_next(&input->reader, &object, err);
        if (got < 0) return err->code;
        if (got == 0) return es_fail(err, ES_ERR_DATA, "%s: ended after %lld samples, expected more", input->path, (long long)i);
        json_decref(object);
    }
    return ES_OK;
}

void extract_sample_free(extract_sample *sample) {
    free(sample->id), free(sample->text), free(sample->ids), free(sample->spans), free(sample->answer);
    memset(sample, 0, sizeof *sample);
}

void extract_input_close(extract_input *input) {
    es_jsonl_close(&input->reader);
    es_tokenizer_free(input->tokenizer);
    es_encoding_free(&input->encoding);
}
