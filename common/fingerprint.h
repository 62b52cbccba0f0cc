/* SHA-256 fingerprints (OpenSSL libcrypto), as 64 lowercase hex digits + NUL. */
#ifndef ES_FINGERPRINT_H
#define ES_FINGERPRINT_H

#include <jansson.h>
#include <stddef.h>

#include "error.h"

#define ES_FINGERPRINT_HEX 65

void es_sha256_hex(const void *data, size_t len, char out[ES_FINGERPRINT_HEX]);
/* 1 when text is 64 lowercase hexadecimal digits. */
int es_fingerprint_valid(const char *text);
/* Streams the whole file. ES_ERR_RUNTIME (naming the file) when it cannot be read. */
int es_sha256_file(const char *path, char out[ES_FINGERPRINT_HEX], es_error *err);
/* A canonical parameter set: a JSON object serialised with sorted keys, no white space,
 * UTF-8 unescaped, integers as integers and reals in the shortest round-trip form, then hashed.
 * Two sets with the same keys and values give the same fingerprint whatever their order. */
int es_fingerprint_params(const json_t *params, char out[ES_FINGERPRINT_HEX], es_error *err);
/* The canonical text that es_fingerprint_params hashes (any JSON value; docs/config.md,
 * "Fingerprints", gives the exact form). Caller frees; NULL and *err set on failure.
 * `len` (may be NULL) receives the length. */
char *es_json_canonical(const json_t *value, size_t *len, es_error *err);

#endif
