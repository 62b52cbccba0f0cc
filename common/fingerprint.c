/* SHA-256 fingerprints and canonical JSON (see fingerprint.h; the canonical form is
 * described in docs/config.md, "Fingerprints"). */
#include "fingerprint.h"

#include <errno.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 4096 /* deeper (or cyclic) values are refused; jansson parses up to 2048 */

static void to_hex(const unsigned char *md, char out[ES_FINGERPRINT_HEX]) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
}

void es_sha256_hex(const void *data, size_t len, char out[ES_FINGERPRINT_HEX]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    if (!EVP_Digest(len ? data : "", len, md, &md_len, EVP_sha256(), NULL) || md_len != 32) {
        /* Only an allocation failure inside OpenSSL can get here. */
        fputs("essence: SHA-256 failed (OpenSSL)\n", stderr);
        abort();
    }
    to_hex(md, out);
}

int es_sha256_file(const char *path, char out[ES_FINGERPRINT_HEX], es_error *err) {
    out[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open: %s", path, strerror(errno));
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char *buf = malloc(1 << 20);
    int rc = ES_OK;
    if (!ctx || !buf || !EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot start SHA-256 (out of memory)", path);
    } else {
        size_t got;
        while ((got = fread(buf, 1, 1 << 20, f)) > 0) {
            if (!EVP_DigestUpdate(ctx, buf, got)) {
                rc = es_fail(err, ES_ERR_RUNTIME, "%s: SHA-256 failed", path);
                break;
            }
        }
        if (!rc && ferror(f)) rc = es_fail(err, ES_ERR_RUNTIME, "%s: read error: %s", path, strerror(errno));
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int md_len = 0;
        if (!rc && (!EVP_DigestFinal_ex(ctx, md, &md_len) || md_len != 32))
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: SHA-256 failed", path);
        if (!rc) to_hex(md, out);
    }
    free(buf);
    EVP_MD_CTX_free(ctx);
    fclose(f);
    return rc;
}

/* ---- canonical JSON --------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} cbuf;

static void put(cbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void put_string(cbuf *b, const char *s, size_t n) {
    put(b, "\"", 1);
    size_t run = 0; /* bytes copied as they are, flushed in one go */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        put(b, s + run, i - run);
        run = i + 1;
        char esc[8];
        switch (c) {
        case '"': put(b, "\\\"", 2); break;
        case '\\': put(b, "\\\\", 2); break;
        case '\b': put(b, "\\b", 2); break;
        case '\f': put(b, "\\f", 2); break;
        case '\n': put(b, "\\n", 2); break;
        case '\r': put(b, "\\r", 2); break;
        case '\t': put(b, "\\t", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            put(b, esc, 6);
        }
    }
    put(b, s + run, n - run);
    put(b, "\"", 1);
}

/* The shortest "%.Pg" (P = 1..17) that reads back as the same double, with ".0" added when
 * it would otherwise read as an integer. */
static void put_real(cbuf *b, double v) {
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (strtod(tmp, NULL) == v) break;
    }
    if (!strpbrk(tmp, ".eEni")) strcat(tmp, ".0");
    put(b, tmp, strlen(tmp));
}

typedef struct {
    const char *key;
    size_t len;
    json_t *value;
} member;

static int member_cmp(const void *a, const void *b) {
    const member *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->key, y->key, n);
    if (c) return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

static int put_value(cbuf *b, const json_t *v, int depth, es_error *err) {
    if (depth > MAX_DEPTH)
        return es_fail(err, ES_ERR_RUNTIME, "canonical JSON: nested deeper than %d levels (or cyclic)", MAX_DEPTH);
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(v), k = 0;
        member *m = malloc((n ? n : 1) * sizeof *m);
        if (!m) return es_fail(err, ES_ERR_RUNTIME, "canonical JSON: out of memory");
        for (void *it = json_object_iter((json_t *)v); it && k < n; it = json_object_iter_next((json_t *)v, it)) {
            m[k].key = json_object_iter_key(it);
            m[k].len = json_object_iter_key_len(it);
            m[k].value = json_object_iter_value(it);
            k++;
        }
        qsort(m, k, sizeof *m, member_cmp);
        put(b, "{", 1);
        int rc = ES_OK;
        for (size_t i = 0; i < k && !rc; i++) {
            if (i) put(b, ",", 1);
            put_string(b, m[i].key, m[i].len);
            put(b, ":", 1);
            rc = put_value(b, m[i].value, depth + 1, err);
        }
        put(b, "}", 1);
        free(m);
        return rc;
    }
    case JSON_ARRAY: {
        put(b, "[", 1);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) put(b, ",", 1);
            int rc = put_value(b, json_array_get(v, i), depth + 1, err);
            if (rc) return rc;
        }
        put(b, "]", 1);
        return ES_OK;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        return ES_OK;
    case JSON_INTEGER:
        snprintf(tmp, sizeof tmp, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        put(b, tmp, strlen(tmp));
        return ES_OK;
    case JSON_REAL:
        if (!isfinite(json_real_value(v)))
            return es_fail(err, ES_ERR_RUNTIME, "canonical JSON: a real that is not finite");
        put_real(b, json_real_value(v));
        return ES_OK;
    case JSON_TRUE: put(b, "true", 4); return ES_OK;
    case JSON_FALSE: put(b, "false", 5); return ES_OK;
    case JSON_NULL: put(b, "null", 4); return ES_OK;
    }
    return es_fail(err, ES_ERR_RUNTIME, "canonical JSON: unknown value type");
}

char *es_json_canonical(const json_t *value, size_t *len, es_error *err) {
    if (len) *len = 0;
    if (!value) {
        es_fail(err, ES_ERR_RUNTIME, "canonical JSON: no value");
        return NULL;
    }
    cbuf b = {0};
    int rc = put_value(&b, value, 0, err);
    if (!rc && b.oom) rc = es_fail(err, ES_ERR_RUNTIME, "canonical JSON: out of memory");
    if (rc) {
        free(b.p);
        return NULL;
    }
    if (len) *len = b.len;
    return b.p;
}

int es_fingerprint_params(const json_t *params, char out[ES_FINGERPRINT_HEX], es_error *err) {
    out[0] = '\0';
    if (!json_is_object(params))
        return es_fail(err, ES_ERR_RUNTIME, "fingerprint: the parameters must be a JSON object");
    size_t len;
    char *text = es_json_canonical(params, &len, err);
    if (!text) return err && err->code ? err->code : ES_ERR_RUNTIME;
    es_sha256_hex(text, len, out);
    free(text);
    return ES_OK;
}

int es_fingerprint_valid(const char *text) {
    size_t n = 0;
    for (; text[n]; n++)
        if (!((text[n] >= '0' && text[n] <= '9') || (text[n] >= 'a' && text[n] <= 'f'))) return 0;
    return n == ES_FINGERPRINT_HEX - 1;
}
