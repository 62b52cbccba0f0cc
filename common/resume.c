#include "resume.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fingerprint.h"
#include "safetensors.h"

static int listed(const char *name, const char *const *names) {
    for (; names && *names; names++)
        if (!strcmp(name, *names)) return 1;
    return 0;
}

json_t *es_resume_key_from_config(const es_config *cfg, const char *const *also_leave_out) {
    json_t *key = json_object();
    for (int i = 0; key && i < cfg->n_options; i++) {
        const char *name = cfg->options[i].name, *value = cfg->values[i];
        if (!value || listed(name, ES_RUN_ONLY_OPTIONS) || listed(name, also_leave_out)) continue;
        if (json_object_set_new(key, name, json_string(value))) {
            json_decref(key);
            return NULL;
        }
    }
    return key;
}

char *es_resume_key_text(const json_t *key, es_error *err) { return es_json_canonical(key, NULL, err); }

/* How one entry reads in a message: an input by its fingerprint, an option by its values. */
static void describe(char *out, size_t size, const char *name, const json_t *then, const json_t *now, int is_option) {
    const char *a = json_is_string(then) ? json_string_value(then) : NULL, *b = json_is_string(now) ? json_string_value(now) : NULL;
    const char *prefix = is_option ? "--" : "";
    if ((a && es_fingerprint_valid(a)) || (b && es_fingerprint_valid(b)))
        snprintf(out, size, "%s%s (its content differs)", prefix, name);
    else
        snprintf(out, size, "%s%s (%s there, %s now)", prefix, name, a ? a : "unset", b ? b : "unset");
}

int es_resume_key_compare(const char *stored, const char *now, const char *what, es_error *err) {
    if (stored && !strcmp(stored, now)) return ES_OK;
    if (!stored)
        return es_fail(err, ES_ERR_USAGE,
                       "%s records no resume key (begun by an older essence?): it cannot be shown to come from these inputs; "
                       "start again without --resume",
                       what);
    json_t *a = json_loads(stored, 0, NULL), *b = json_loads(now, 0, NULL);
    char list[768] = "";
    size_t used = 0;
    int n = 0;
    const char *name;
    json_t *value;
    /* Options and inputs of either key, each once. */
    json_t *all = json_object();
    if (a) json_object_foreach(a, name, value) json_object_set(all, name, json_null());
    if (b) json_object_foreach(b, name, value) json_object_set(all, name, json_null());
    json_object_foreach(all, name, value) {
        json_t *then = a ? json_object_get(a, name) : NULL, *current = b ? json_object_get(b, name) : NULL;
        if (then && current && json_equal(then, current)) continue;
        char one[256];
        describe(one, sizeof one, name, then, current, !strpbrk(name, " _"));
        if (used < sizeof list) used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", n++ ? ", " : "", one);
    }
    json_decref(all), json_decref(a), json_decref(b);
    if (!n) snprintf(list, sizeof list, "its resume key is unreadable");
    return es_fail(err, ES_ERR_USAGE,
                   "%s was begun with other inputs or options: %s; resume with the same ones, or start again without --resume",
                   what, list);
}

/* A model file's SHA-256; only a regular file is read (a FIFO would block, a folder fail late). */
static int hash_model_file(const char *path, char hex[ES_FINGERPRINT_HEX], es_error *err) {
    struct stat st;
    if (stat(path, &st) != 0) return es_fail(err, ES_ERR_DATA, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return es_fail(err, ES_ERR_DATA, "%s: not a regular file", path);
    return es_sha256_file(path, hex, err);
}

/* SHA-256 over the SHA-256s of the model's files (config.json, safetensors, the index), in
 * name order: the weights' content, not their modification times. The index is read by the
 * loader's own parser, so a shard outside the folder is refused here as it is there. */
int es_model_fingerprint(const char *dir, char out[ES_FINGERPRINT_HEX], es_error *err) {
    char listing[64 * 1024] = "";
    static const char *patterns[] = {"config.json", "model.safetensors.index.json", "model.safetensors"};
    size_t n = 0;
    for (size_t i = 0; i < 3; i++) {
        char path[4200], hex[ES_FINGERPRINT_HEX];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, patterns[i]);
        if (lstat(path, &st) != 0) continue;
        int rc = hash_model_file(path, hex, err);
        if (rc) return rc;
        n += (size_t)snprintf(listing + n, sizeof listing - n, "%s %s\n", patterns[i], hex);
    }
    char index_path[4200];
    snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(index_path, "rb");
    if (!f) {
        if (errno == ENOENT) {
            es_sha256_hex(listing, n, out);
            return ES_OK;
        }
        return es_fail(err, ES_ERR_DATA, "%s: cannot open: %s", index_path, strerror(errno));
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    int rc = ES_OK;
    for (;;) {
        if (len + 65536 > cap) {
            char *grown = realloc(text, cap = cap ? 2 * cap : 1 << 16);
            if (!grown) {
                rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", index_path);
                break;
            }
            text = grown;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f)) rc = es_fail(err, ES_ERR_RUNTIME, "%s: read error: %s", index_path, strerror(errno));
            break;
        }
    }
    fclose(f);
    char **shards = NULL;
    size_t n_shards = 0;
    if (!rc) rc = es_safetensors_index_parse(text, len, index_path, &shards, &n_shards, err);
    free(text);
    for (size_t i = 0; !rc && i < n_shards; i++) {
        char path[4200], hex[ES_FINGERPRINT_HEX];
        snprintf(path, sizeof path, "%s/%s", dir, shards[i]);
        rc = hash_model_file(path, hex, err);
        if (!rc) n += (size_t)snprintf(listing + n, sizeof listing - n, "%s %s\n", shards[i], hex);
    }
    for (size_t i = 0; shards && i < n_shards; i++) free(shards[i]);
    free(shards);
    if (!rc) es_sha256_hex(listing, n, out);
    return rc;
}


int es_tokenizer_config_sha256(const char *tokenizer, char out[65], es_error *err) {
    out[0] = '\0';
    struct stat st;
    if (stat(tokenizer, &st) != 0 || !S_ISDIR(st.st_mode)) return ES_OK;
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", tokenizer);
    if (stat(path, &st) != 0) return ES_OK;
    return es_sha256_file(path, out, err);
}
