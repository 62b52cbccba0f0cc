/* libFuzzer target: the JSONL reader, and the canonical JSON of every object it returns.
 * Whatever the bytes: no crash, no leak; every rejected line is ES_ERR_DATA naming
 * "fuzz.jsonl:LINE:" with LINE the reader's line count; reading goes on after a bad line
 * and the line count only grows. Each object's canonical text must parse back (jansson) to
 * an equal value, and be its own canonical form. The line limit is lowered to 1 KiB so that
 * a line too long is reached: it ends the input with ES_ERR_DATA naming its line, and every
 * later call repeats the failure. es_jsonl_count, called first, counts exactly the lines that
 * are then returned or rejected. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fingerprint.h"
#include "jsonl.h"

static void check_canonical(json_t *v) {
    size_t len;
    es_error err = {0};
    char *text = es_json_canonical(v, &len, &err);
    if (!text) abort(); /* parsed values are finite and at most 2048 levels deep */
    json_error_t jerr;
    json_t *back = json_loadb(text, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!back || !json_equal(v, back)) abort();
    size_t len2;
    char *again = es_json_canonical(back, &len2, &err);
    if (!again || len2 != len || memcmp(text, again, len) != 0) abort();
    free(again);
    free(text);
    json_decref(back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    es_jsonl r;
    es_error err = {0};
    if (es_jsonl_open_memory(&r, buf, size, "fuzz.jsonl", &err) != ES_OK) abort();
    r.max_line = 1024;
    int64_t counted = 0, seen = 0;
    int count_rc = es_jsonl_count(&r, &counted, &err);
    if (count_rc != ES_OK) {
        if (count_rc != ES_ERR_DATA || !strstr(err.msg, "longer than 1024 bytes")) abort();
        es_jsonl_close(&r);
        if (es_jsonl_open_memory(&r, buf, size, "fuzz.jsonl", &err) != ES_OK) abort();
        r.max_line = 1024;
    }
    long last = 0;
    for (;;) {
        json_t *v = NULL;
        es_error_clear(&err);
        int rc = es_jsonl_next(&r, &v, &err);
        if (rc == 0) break;
        if (r.failed) { /* the line too long: the input ends here, and stays ended */
            json_t *again = NULL;
            if (rc != -1 || err.code != ES_ERR_DATA || !strstr(err.msg, "longer than 1024 bytes") || count_rc == ES_OK) abort();
            if (es_jsonl_next(&r, &again, &err) != -1 || again) abort();
            break;
        }
        seen++;
        if (r.line <= last) abort();
        last = r.line;
        if (rc == 1) {
            if (!json_is_object(v)) abort();
            check_canonical(v);
            json_decref(v);
            continue;
        }
        char want[64];
        snprintf(want, sizeof want, "fuzz.jsonl:%ld: ", r.line);
        if (rc != -1 || err.code != ES_ERR_DATA || v || strncmp(err.msg, want, strlen(want)) != 0) abort();
    }
    if (count_rc == ES_OK && !r.failed && seen != counted) abort();
    es_jsonl_close(&r);
    free(buf);
    return 0;
}
