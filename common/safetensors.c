#include "safetensors.h"

#include "files.h"

#include "utf8.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

/* ---- helpers ------------------------------------------------------------------------ */

static uint64_t read_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static char *join_path(const char *dir, const char *name) {
    size_t dl = strlen(dir), nl = strlen(name);
    int slash = dl > 0 && dir[dl - 1] != '/';
    char *p = malloc(dl + slash + nl + 1);
    if (!p) return NULL;
    memcpy(p, dir, dl);
    if (slash) p[dl] = '/';
    memcpy(p + dl + slash, name, nl + 1);
    return p;
}

size_t es_tensor_numel(const es_tensor *t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

char *es_tensor_shape_str(const es_tensor *t, char *buf, size_t size) {
    size_t used = 0;
    if (size == 0) return buf;
    buf[0] = '\0';
    for (int i = -1; i <= t->ndim && used < size; i++) {
        int w;
        if (i < 0) w = snprintf(buf + used, size - used, "[");
        else if (i == t->ndim) w = snprintf(buf + used, size - used, "]");
        else w = snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        if (w < 0) break;
        used += (size_t)w;
    }
    return buf;
}

/* ---- parsing ------------------------------------------------------------------------ */

/* Names and metadata strings go into one arena sized by the header: every decoded JSON
 * string plus its NUL is no longer than its quoted text, so the header length bounds it. */
typedef struct {
    char *buf;
    size_t used, cap;
} arena;

static const char *arena_put(arena *a, const char *s) {
    size_t len = strlen(s) + 1;
    if (len > a->cap - a->used) return NULL;
    char *p = a->buf + a->used;
    memcpy(p, s, len);
    a->used += len;
    return p;
}

typedef struct {
    uint64_t begin, end;
    const char *name;
} span;

static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const es_tensor *)a)->name, ((const es_tensor *)b)->name);
}

static int parse_metadata(es_safetensors *st, json_t *obj, arena *ar, es_error *err) {
    const char *file = st->path;
    if (json_is_null(obj)) return ES_OK;
    if (!json_is_object(obj)) return es_fail(err, ES_ERR_DATA, "%s: __metadata__ is not an object", file);
    st->meta = calloc(json_object_size(obj) + 1, sizeof *st->meta);
    if (!st->meta) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", file);
    const char *key;
    json_t *value;
    json_object_foreach(obj, key, value) {
        if (!json_is_string(value))
            return es_fail(err, ES_ERR_DATA, "%s: __metadata__ \"%s\" is not a string", file, key);
        es_meta_kv *kv = &st->meta[st->n_meta];
        kv->key = arena_put(ar, key);
        kv->value = kv->key ? arena_put(ar, json_string_value(value)) : NULL;
        if (!kv->value) return es_fail(err, ES_ERR_DATA, "%s: header strings exceed the header size", file);
        st->n_meta++;
    }
    return ES_OK;
}

/* Fills *t from one header entry; begin/end are the raw data_offsets. */
static int parse_entry(const char *file, const char *name, json_t *entry, uint64_t data_size,
                       es_tensor *t, uint64_t *begin, uint64_t *end, es_error *err) {
    if (!json_is_object(entry))
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": entry is not an object", file, name);

    json_t *dt = json_object_get(entry, "dtype");
    if (!json_is_string(dt))
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": \"dtype\" is missing or not a string", file, name);
    if (es_dtype_from_name(json_string_value(dt), &t->dtype) != 0)
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": unsupported dtype \"%s\"", file, name,
                       json_string_value(dt));

    json_t *shape = json_object_get(entry, "shape");
    if (!json_is_array(shape))
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": \"shape\" is missing or not an array", file, name);
    size_t ndim = json_array_size(shape);
    if (ndim > ES_ST_MAX_DIMS)
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": shape has %zu dimensions, at most %d are supported",
                       file, name, ndim, ES_ST_MAX_DIMS);
    t->ndim = (int)ndim;
    size_t numel = 1;
    int overflow = 0;
    for (size_t i = 0; i < ndim; i++) {
        json_t *d = json_array_get(shape, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": shape[%zu] is not a non-negative integer",
                           file, name, i);
        t->shape[i] = json_integer_value(d);
        if ((uint64_t)t->shape[i] > SIZE_MAX || __builtin_mul_overflow(numel, (size_t)t->shape[i], &numel))
            overflow = 1;
    }
    size_t nbytes;
    /* A zero dimension makes the product 0 whatever overflowed before it. */
    for (size_t i = 0; i < ndim; i++)
        if (t->shape[i] == 0) overflow = 0, numel = 0;
    if (overflow || __builtin_mul_overflow(numel, es_dtype_size(t->dtype), &nbytes))
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": shape size overflows", file, name);

    json_t *offs = json_object_get(entry, "data_offsets");
    json_t *b = json_array_get(offs, 0), *e = json_array_get(offs, 1);
    if (!json_is_array(offs) || json_array_size(offs) != 2 || !json_is_integer(b) || !json_is_integer(e) ||
        json_integer_value(b) < 0 || json_integer_value(e) < 0)
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": \"data_offsets\" is not two non-negative integers",
                       file, name);
    *begin = (uint64_t)json_integer_value(b);
    *end = (uint64_t)json_integer_value(e);
    if (*begin > *end)
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": data_offsets [%llu, %llu): begin is after end",
                       file, name, (unsigned long long)*begin, (unsigned long long)*end);
    if (*end > data_size)
        return es_fail(err, ES_ERR_DATA,
                       "%s: tensor \"%s\": data_offsets [%llu, %llu) run past the end of the data section "
                       "(%llu bytes): truncated file?",
                       file, name, (unsigned long long)*begin, (unsigned long long)*end,
                       (unsigned long long)data_size);
    if ((uint64_t)nbytes != *end - *begin) {
        char sh[256];
        return es_fail(err, ES_ERR_DATA,
                       "%s: tensor \"%s\": shape %s of %s needs %zu bytes but data_offsets [%llu, %llu) hold %llu",
                       file, name, es_tensor_shape_str(t, sh, sizeof sh), es_dtype_name(t->dtype), nbytes,
                       (unsigned long long)*begin, (unsigned long long)*end,
                       (unsigned long long)(*end - *begin));
    }
    t->nbytes = nbytes;
    return ES_OK;
}

static int check_overlaps(const char *file, span *spans, size_t n, es_error *err) {
    qsort(spans, n, sizeof *spans, cmp_span);
    /* Empty tensors occupy nothing, so they never overlap; among the others, the one
     * reaching furthest so far is the only one a later tensor can collide with. */
    const span *reach = NULL;
    for (size_t i = 0; i < n; i++) {
        const span *s = &spans[i];
        if (s->begin == s->end) continue;
        if (reach && reach->end > s->begin)
            return es_fail(err, ES_ERR_DATA,
                           "%s: tensor \"%s\": data_offsets [%llu, %llu) overlap tensor \"%s\" [%llu, %llu)",
                           file, s->name, (unsigned long long)s->begin, (unsigned long long)s->end, reach->name,
                           (unsigned long long)reach->begin, (unsigned long long)reach->end);
        if (!reach || s->end > reach->end) reach = s;
    }
    return ES_OK;
}

static int parse_into(es_safetensors *st, const unsigned char *buf, size_t size, es_error *err) {
    const char *file = st->path;
    if (size < 8)
        return es_fail(err, ES_ERR_DATA, "%s: file is %zu bytes, too short for the 8-byte header length", file, size);
    uint64_t hlen = read_le64(buf);
    if (hlen > ES_ST_MAX_HEADER)
        return es_fail(err, ES_ERR_DATA, "%s: header length %llu is over the limit of %llu bytes", file,
                       (unsigned long long)hlen, ES_ST_MAX_HEADER);
    if (hlen > size - 8)
        return es_fail(err, ES_ERR_DATA, "%s: header length %llu runs past the end of the file (%zu bytes)", file,
                       (unsigned long long)hlen, size);
    const unsigned char *header = buf + 8;
    size_t bad = es_utf8_invalid_at(header, (size_t)hlen);
    if (bad != SIZE_MAX)
        return es_fail(err, ES_ERR_DATA, "%s: header is not valid UTF-8 at byte offset %zu (file offset %zu)", file,
                       bad, bad + 8);

    json_error_t jerr;
    json_t *root = json_loadb((const char *)header, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return es_fail(err, ES_ERR_DATA, "%s: header is not valid JSON: %s (line %d, column %d)", file, jerr.text,
                       jerr.line, jerr.column);
    int rc = ES_OK;
    span *spans = NULL;
    if (!json_is_object(root)) {
        rc = es_fail(err, ES_ERR_DATA, "%s: header is not a JSON object", file);
        goto done;
    }
    size_t n = json_object_size(root);
    arena ar = {malloc((size_t)hlen + 1), 0, (size_t)hlen + 1};
    st->strings = ar.buf;
    st->tensors = calloc(n + 1, sizeof *st->tensors);
    spans = calloc(n + 1, sizeof *spans);
    if (!ar.buf || !st->tensors || !spans) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", file);
        goto done;
    }
    const unsigned char *data = header + hlen;
    uint64_t data_size = size - 8 - hlen;
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            if ((rc = parse_metadata(st, value, &ar, err))) goto done;
            continue;
        }
        if (key[0] == '\0') {
            rc = es_fail(err, ES_ERR_DATA, "%s: a tensor has an empty name", file);
            goto done;
        }
        es_tensor *t = &st->tensors[st->n_tensors];
        uint64_t begin = 0, end = 0;
        if ((rc = parse_entry(file, key, value, data_size, t, &begin, &end, err))) goto done;
        t->name = arena_put(&ar, key);
        if (!t->name) {
            rc = es_fail(err, ES_ERR_DATA, "%s: header strings exceed the header size", file);
            goto done;
        }
        t->data = data + begin;
        t->file = st->path;
        spans[st->n_tensors] = (span){begin, end, t->name};
        st->n_tensors++;
    }
    if ((rc = check_overlaps(file, spans, st->n_tensors, err))) goto done;
    qsort(st->tensors, st->n_tensors, sizeof *st->tensors, cmp_tensor_name);
done:
    free(spans);
    json_decref(root);
    return rc;
}

int es_safetensors_parse(const void *buf, size_t size, const char *name, es_safetensors **out,
                         es_error *err) {
    *out = NULL;
    es_safetensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(name))) {
        free(st);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", name);
    }
    int rc = parse_into(st, buf, size, err);
    if (rc) {
        es_safetensors_close(st);
        return rc;
    }
    *out = st;
    return ES_OK;
}

int es_safetensors_open(const char *path, es_safetensors **out, es_error *err) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block the open: it is refused below */
    if (fd < 0) {
        int e = errno;
        return es_fail(err, e == ENOENT || e == ENOTDIR ? ES_ERR_DATA : ES_ERR_RUNTIME, "%s: cannot open: %s", path,
                       strerror(e));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return es_fail(err, ES_ERR_DATA, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return es_fail(err, ES_ERR_RUNTIME, "%s: cannot mmap: %s", path, strerror(e));
        }
    }
    close(fd); /* the mapping keeps the file */
    es_safetensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(path))) {
        free(st);
        if (map) munmap(map, size);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    }
    st->map = map;
    st->map_size = size;
    static const unsigned char empty[1];
    int rc = parse_into(st, map ? map : empty, size, err);
    if (rc) {
        es_safetensors_close(st);
        return rc;
    }
    *out = st;
    return ES_OK;
}

void es_safetensors_close(es_safetensors *st) {
    if (!st) return;
    if (st->map) munmap(st->map, st->map_size);
    free(st->tensors);
    free(st->meta);
    free(st->strings);
    free(st->path);
    free(st);
}

const es_tensor *es_safetensors_find(const es_safetensors *st, const char *name) {
    es_tensor key = {.name = name};
    return bsearch(&key, st->tensors, st->n_tensors, sizeof *st->tensors, cmp_tensor_name);
}

const char *es_safetensors_meta(const es_safetensors *st, const char *key) {
    for (size_t i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta[i].key, key) == 0) return st->meta[i].value;
    return NULL;
}

/* ---- conversion --------------------------------------------------------------------- */

int es_tensor_to_f32(const es_tensor *t, float *out, es_error *err) {
    size_t n = es_tensor_numel(t);
    const unsigned char *src = t->data;
    switch (t->dtype) {
    case ES_DT_F32:
        if (n) memcpy(out, src, n * sizeof(float));
        return ES_OK;
    case ES_DT_BF16:
    case ES_DT_F16: {
        /* The mapping gives no alignment guarantee: copy blocks into an aligned buffer. */
        uint16_t block[1024];
        for (size_t i = 0; i < n; i += 1024) {
            size_t m = n - i < 1024 ? n - i : 1024;
            memcpy(block, src + 2 * i, 2 * m);
            if (t->dtype == ES_DT_BF16) es_bf16_to_f32_array(out + i, block, m);
            else
                for (size_t k = 0; k < m; k++) out[i + k] = es_f16_to_f32(block[k]);
        }
        return ES_OK;
    }
    case ES_DT_F8_E4M3:
        for (size_t i = 0; i < n; i++) out[i] = es_f8e4m3_to_f32(src[i]);
        return ES_OK;
    default:
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": dtype %s is not a floating-point type",
                       t->file ? t->file : "?", t->name, es_dtype_name(t->dtype));
    }
}

/* ---- model folders ------------------------------------------------------------------ */

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_tensor_ptr(const void *a, const void *b) {
    return strcmp((*(const es_tensor *const *)a)->name, (*(const es_tensor *const *)b)->name);
}

static int add_file(es_weights *w, const char *path, es_error *err) {
    es_safetensors **files = realloc(w->files, (w->n_files + 1) * sizeof *files);
    if (!files) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    w->files = files;
    int rc = es_safetensors_open(path, &w->files[w->n_files], err);
    if (rc == ES_OK) w->n_files++;
    return rc;
}

/* A shard must be a plain file name in the index's folder: anything else could make a
 * downloaded index read arbitrary files. (A symbolic link in the folder is followed: the
 * Hugging Face cache links every file of a snapshot to ../../blobs; the folder's owner made it.) */
static int check_shard_name(const char *index, const char *entry, const json_t *value, es_error *err) {
    static const char suffix[] = ".safetensors";
    const char *shard = json_string_value(value);
    size_t len = strlen(shard), sl = sizeof suffix - 1;
    if (json_string_length(value) != len)
        return es_fail(err, ES_ERR_DATA, "%s: weight_map entry \"%s\": the shard name holds a NUL character", index, entry);
    if (len == 0 || strcmp(shard, ".") == 0 || strcmp(shard, "..") == 0 || strchr(shard, '/') || strchr(shard, '\\'))
        return es_fail(err, ES_ERR_DATA, "%s: weight_map entry \"%s\": shard \"%s\" is outside the model folder", index, entry,
                       shard);
    if (len < sl || strcmp(shard + len - sl, suffix) != 0)
        return es_fail(err, ES_ERR_DATA, "%s: weight_map entry \"%s\": shard \"%s\" is not a .safetensors file", index, entry,
                       shard);
    return ES_OK;
}

/* The shards an index names, checked, sorted and deduplicated (pointers into root's strings):
 * each shard is opened once and found by bsearch (a long weight_map stays cheap). */
static int index_shards(const json_t *root, const char *index, const char ***out, size_t *count, es_error *err) {
    *out = NULL, *count = 0;
    if (!json_is_object(root)) return es_fail(err, ES_ERR_DATA, "%s: not a JSON object", index);
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0)
        return es_fail(err, ES_ERR_DATA, "%s: \"weight_map\" is missing, empty or not an object", index);
    const char **shards = calloc(json_object_size(map), sizeof *shards);
    if (!shards) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", index);
    size_t n = 0;
    const char *name;
    json_t *value;
    json_object_foreach(map, name, value) {
        int rc = !json_is_string(value) ? es_fail(err, ES_ERR_DATA, "%s: weight_map entry \"%s\" is not a string", index, name)
                                        : check_shard_name(index, name, value, err);
        if (rc) {
            free(shards);
            return rc;
        }
        shards[n++] = json_string_value(value);
    }
    qsort(shards, n, sizeof *shards, cmp_str_ptr);
    size_t unique = 0;
    for (size_t k = 0; k < n; k++)
        if (unique == 0 || strcmp(shards[unique - 1], shards[k]) != 0) shards[unique++] = shards[k];
    *out = shards, *count = unique;
    return ES_OK;
}

/* jansson's failure to load an index, as our error. */
static int index_load_error(const char *index, const json_error_t *jerr, es_error *err) {
    if (json_error_code(jerr) == json_error_out_of_memory) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory while reading it", index);
    if (jerr->line < 0) return es_fail(err, ES_ERR_DATA, "%s: %s", index, jerr->text);
    return es_fail(err, ES_ERR_DATA, "%s: not valid JSON: %s (line %d, column %d)", index, jerr->text, jerr->line, jerr->column);
}

int es_safetensors_index_parse(const char *text, size_t len, const char *name, char ***shards, size_t *n_shards, es_error *err) {
    *shards = NULL, *n_shards = 0;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return index_load_error(name, &jerr, err);
    const char **found = NULL;
    size_t n = 0;
    int rc = index_shards(root, name, &found, &n, err);
    char **copy = rc ? NULL : calloc(n + 1, sizeof *copy);
    if (!rc && !copy) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", name);
    for (size_t k = 0; !rc && k < n; k++)
        if (!(copy[k] = strdup(found[k]))) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", name);
    free(found);
    json_decref(root);
    if (rc) {
        for (size_t k = 0; copy && copy[k]; k++) free(copy[k]);
        free(copy);
        return rc;
    }
    *shards = copy, *n_shards = n;
    return ES_OK;
}

static int open_index(es_weights *w, const char *dir, const char *index, es_error *err) {
    json_error_t jerr;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return index_load_error(index, &jerr, err);
    const char **shards = NULL;
    size_t n_shards = 0;
    char *shard_path = NULL;
    int rc = index_shards(root, index, &shards, &n_shards, err);
    for (size_t k = 0; !rc && k < n_shards; k++) {
        free(shard_path);
        if (!(shard_path = join_path(dir, shards[k]))) {
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", index);
            break;
        }
        struct stat sb;
        if (stat(shard_path, &sb) != 0 && errno == ENOENT) {
            rc = es_fail(err, ES_ERR_DATA, "%s: shard \"%s\" is missing (%s)", index, shards[k], shard_path);
            break;
        }
        rc = add_file(w, shard_path, err);
    }
    /* Files were added in shard order, so shard k is w->files[k]. */
    const char *name;
    json_t *value;
    json_object_foreach(rc ? NULL : json_object_get(root, "weight_map"), name, value) {
        const char *shard = json_string_value(value);
        const char **hit = bsearch(&shard, shards, n_shards, sizeof *shards, cmp_str_ptr);
        if (!es_safetensors_find(w->files[hit - shards], name)) {
            rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" is not in shard \"%s\"", index, name, shard);
            break;
        }
    }
    free(shard_path);
    free(shards);
    json_decref(root);
    return rc;
}

static int build_table(es_weights *w, es_error *err) {
    size_t n = 0;
    for (size_t f = 0; f < w->n_files; f++) n += w->files[f]->n_tensors;
    w->tensors = malloc((n + 1) * sizeof *w->tensors);
    if (!w->tensors) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", w->path);
    for (size_t f = 0; f < w->n_files; f++)
        for (size_t i = 0; i < w->files[f]->n_tensors; i++) w->tensors[w->n_tensors++] = &w->files[f]->tensors[i];
    qsort(w->tensors, w->n_tensors, sizeof *w->tensors, cmp_tensor_ptr);
    for (size_t i = 1; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i - 1]->name, w->tensors[i]->name) == 0)
            return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" is in two shards: %s and %s", w->path,
                           w->tensors[i]->name, w->tensors[i - 1]->file, w->tensors[i]->file);
    return ES_OK;
}

int es_weights_open(const char *path, es_weights **out, es_error *err) {
    *out = NULL;
    es_weights *w = calloc(1, sizeof *w);
    if (!w || !(w->path = strdup(path))) {
        free(w);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    }
    int rc = ES_OK;
    char *index = NULL, *single = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        int e = errno;
        rc = es_fail(err, e == ENOENT || e == ENOTDIR ? ES_ERR_DATA : ES_ERR_RUNTIME, "%s: %s", path, strerror(e));
        goto done;
    }
    if (!S_ISDIR(sb.st_mode)) {
        rc = add_file(w, path, err);
        if (rc == ES_OK) rc = build_table(w, err);
        goto done;
    }
    index = join_path(path, INDEX_NAME);
    single = join_path(path, SINGLE_NAME);
    if (!index || !single) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
        goto done;
    }
    if (stat(index, &sb) == 0) rc = open_index(w, path, index, err);
    else if (stat(single, &sb) == 0) rc = add_file(w, single, err);
    else rc = es_fail(err, ES_ERR_DATA, "no %s or %s in %s", SINGLE_NAME, INDEX_NAME, path);
    if (rc == ES_OK) rc = build_table(w, err);
done:
    free(index);
    free(single);
    if (rc) es_weights_close(w);
    else *out = w;
    return rc;
}

void es_weights_close(es_weights *w) {
    if (!w) return;
    for (size_t f = 0; f < w->n_files; f++) es_safetensors_close(w->files[f]);
    free(w->files);
    free(w->tensors);
    free(w->path);
    free(w);
}

const es_tensor *es_weights_find(const es_weights *w, const char *name) {
    es_tensor key = {.name = name};
    const es_tensor *kp = &key;
    const es_tensor *const *hit = bsearch(&kp, w->tensors, w->n_tensors, sizeof *w->tensors, cmp_tensor_ptr);
    return hit ? *hit : NULL;
}

/* ---- writing ------------------------------------------------------------------------ */

static int check_entries(const char *path, const es_tensor *e, size_t n, const es_meta_kv *meta,
                         size_t n_meta, es_error *err) {
    for (size_t i = 0; i < n; i++) {
        const char *name = e[i].name;
        if (!name || !name[0] || strcmp(name, "__metadata__") == 0 ||
            es_utf8_invalid_at((const unsigned char *)name, strlen(name)) != SIZE_MAX)
            return es_fail(err, ES_ERR_DATA, "%s: entry %zu: tensor name \"%s\" is empty, reserved or not UTF-8", path,
                           i, name ? name : "");
        if ((unsigned)e[i].dtype >= ES_DT_COUNT || e[i].ndim < 0 || e[i].ndim > ES_ST_MAX_DIMS)
            return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": bad dtype or number of dimensions", path, name);
        size_t numel = 1, nbytes;
        int overflow = 0;
        for (int d = 0; d < e[i].ndim; d++) {
            if (e[i].shape[d] < 0)
                return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": negative shape", path, name);
            if ((uint64_t)e[i].shape[d] > SIZE_MAX || __builtin_mul_overflow(numel, (size_t)e[i].shape[d], &numel))
                overflow = 1;
        }
        for (int d = 0; d < e[i].ndim; d++)
            if (e[i].shape[d] == 0) overflow = 0, numel = 0;
        if (overflow || __builtin_mul_overflow(numel, es_dtype_size(e[i].dtype), &nbytes) || nbytes != e[i].nbytes)
            return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": nbytes %zu does not match its shape and dtype", path,
                           name, e[i].nbytes);
        if (nbytes > 0 && !e[i].data)
            return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": no data", path, name);
    }
    for (size_t i = 0; i < n_meta; i++) {
        const char *k = meta[i].key, *v = meta[i].value;
        if (!k || !v || es_utf8_invalid_at((const unsigned char *)k, strlen(k)) != SIZE_MAX ||
            es_utf8_invalid_at((const unsigned char *)v, strlen(v)) != SIZE_MAX)
            return es_fail(err, ES_ERR_DATA, "%s: metadata entry %zu is NULL or not UTF-8", path, i);
        for (size_t j = 0; j < i; j++)
            if (strcmp(meta[j].key, k) == 0)
                return es_fail(err, ES_ERR_DATA, "%s: metadata key \"%s\" given twice", path, k);
    }
    const char **names = malloc((n + 1) * sizeof *names);
    if (!names) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    for (size_t i = 0; i < n; i++) names[i] = e[i].name;
    qsort(names, n, sizeof *names, cmp_str_ptr);
    int rc = ES_OK;
    for (size_t i = 1; i < n && rc == ES_OK; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" given twice", path, names[i]);
    free(names);
    return rc;
}

/* The header text, padded with spaces so that the data section starts 8-byte aligned. */
static char *build_header(const char *path, const es_tensor *e, size_t n, const es_meta_kv *meta,
                          size_t n_meta, size_t *len, es_error *err) {
    json_t *root = json_object();
    int bad = !root;
    if (!bad && n_meta > 0) {
        json_t *m = json_object();
        bad = json_object_set_new(root, "__metadata__", m) != 0;
        for (size_t i = 0; i < n_meta && !bad; i++)
            bad = json_object_set_new(m, meta[i].key, json_string(meta[i].value)) != 0;
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n && !bad; i++) {
        json_t *shape = json_array();
        for (int d = 0; d < e[i].ndim && shape; d++)
            if (json_array_append_new(shape, json_integer(e[i].shape[d])) != 0) json_decref(shape), shape = NULL;
        /* "o" steals shape, also when packing fails. */
        json_t *entry = !shape ? NULL
                               : json_pack("{s:s, s:o, s:[I, I]}", "dtype", es_dtype_name(e[i].dtype), "shape", shape,
                                           "data_offsets", (json_int_t)offset, (json_int_t)(offset + e[i].nbytes));
        bad = !entry || json_object_set_new(root, e[i].name, entry) != 0;
        offset += e[i].nbytes;
    }
    char *text = bad ? NULL : json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text) {
        es_fail(err, ES_ERR_RUNTIME, "%s: cannot build the header", path);
        return NULL;
    }
    size_t tl = strlen(text), padded = (tl + 7) / 8 * 8;
    char *out = realloc(text, padded + 1);
    if (!out) {
        free(text);
        es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
        return NULL;
    }
    memset(out + tl, ' ', padded - tl);
    out[padded] = '\0';
    *len = padded;
    return out;
}



int es_safetensors_write(const char *path, const es_tensor *entries, size_t n,
                         const es_meta_kv *meta, size_t n_meta, es_error *err) {
    int rc = check_entries(path, entries, n, meta, n_meta, err);
    if (rc) return rc;
    size_t hlen;
    char *header = build_header(path, entries, n, meta, n_meta, &hlen, err);
    if (!header) return ES_ERR_RUNTIME;
    char *partial = malloc(strlen(path) + sizeof ".partial");
    if (!partial) {
        free(header);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    }
    sprintf(partial, "%s.partial", path);

    int fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", partial, strerror(errno));
        goto done;
    }
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    int bad = es_write_all(fd, lenbuf, 8) || es_write_all(fd, header, hlen);
    for (size_t i = 0; i < n && !bad; i++)
        if (entries[i].nbytes) bad = es_write_all(fd, entries[i].data, entries[i].nbytes);
    if (bad) rc = es_fail(err, ES_ERR_RUNTIME, "%s: write failed: %s", partial, strerror(errno));
    else if (fsync(fd) != 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: fsync failed: %s", partial, strerror(errno));
    if (close(fd) != 0 && rc == ES_OK)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: close failed: %s", partial, strerror(errno));
    if (rc == ES_OK && rename(partial, path) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", partial, path, strerror(errno));
    if (rc) unlink(partial);
    else rc = es_fsync_parent(path, err);
done:
    free(partial);
    free(header);
    return rc;
}
