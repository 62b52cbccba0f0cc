#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int es_fail(es_error *err, int code, const char *fmt, ...) {
    if (err && err->code == ES_OK) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void es_error_prefix(es_error *err, const char *fmt, ...) {
    if (!err || err->code == ES_OK) return;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    /* Shift the old message right to make room for "prefix: " (its tail may be cut). */
    size_t prefix_len = strlen(prefix) + 2, cap = sizeof err->msg;
    if (prefix_len >= cap) prefix_len = cap - 1;
    size_t old_len = strlen(err->msg);
    if (old_len > cap - 1 - prefix_len) old_len = cap - 1 - prefix_len;
    memmove(err->msg + prefix_len, err->msg, old_len);
    err->msg[prefix_len + old_len] = '\0';
    memcpy(err->msg, prefix, prefix_len - 2);
    memcpy(err->msg + prefix_len - 2, ": ", 2);
}

void es_error_clear(es_error *err) {
    if (!err) return;
    err->code = ES_OK;
    err->msg[0] = '\0';
}
