/* essence-align's checkpoints: see checkpoint.h for the layout and the guarantees.
 *
 * Everything of one save goes into OUT/checkpoint-STEP.partial/ first; nothing outside it is
 * touched until every file there is written and fsync'd, so a failure up to that point only
 * has to remove the .partial folder. The big files reach the top level as hard links (a copy
 * only where the file system refuses links), so a save costs one model's worth of disk. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"

#include "files.h"
#include "dtype.h"
#include "safetensors.h"

/* Copied from the model folder when present (config.json must be). */
static const char *const tokenizer_files[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                              "generation_config.json"};
#define N_TOKENIZER_FILES (sizeof tokenizer_files / sizeof tokenizer_files[0])

static const char checkpoint_prefix[] = "checkpoint-";

/* A malloc'd formatted string, or NULL when out of memory. */
static char *path_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *path_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *out = NULL;
    if (vasprintf(&out, fmt, ap) < 0) out = NULL;
    va_end(ap);
    return out;
}

static int out_of_memory(const char *where, es_error *err) {
    return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", where);
}



/* Finishes a file written through fd: fsync and close, either failure naming path. */
static int finish_file(int fd, const char *path, int rc, es_error *err) {
    if (rc == ES_OK && fsync(fd) != 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: fsync failed: %s", path, strerror(errno));
    if (close(fd) != 0 && rc == ES_OK) rc = es_fail(err, ES_ERR_RUNTIME, "%s: close failed: %s", path, strerror(errno));
    return rc;
}

static int write_file(const char *path, const void *data, size_t n, es_error *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", path, strerror(errno));
    int rc = es_write_all(fd, data, n) ? es_fail(err, ES_ERR_RUNTIME, "%s: write failed: %s", path, strerror(errno)) : ES_OK;
    return finish_file(fd, path, rc, err);
}

/* Copies src to dst byte for byte and fsyncs dst. With missing_ok, an absent src is no
 * error: *copied tells. */
static int copy_file(const char *src, const char *dst, int missing_ok, int *copied, es_error *err) {
    if (copied) *copied = 0;
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        if (missing_ok && errno == ENOENT) return ES_OK;
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open: %s", src, strerror(errno));
    }
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        int saved = errno;
        close(in);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", dst, strerror(saved));
    }
    enum { CHUNK = 1 << 20 };
    char *buf = malloc(CHUNK);
    int rc = buf ? ES_OK : out_of_memory(dst, err);
    while (rc == ES_OK) {
        ssize_t got = read(in, buf, CHUNK);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: read failed: %s", src, strerror(errno));
        else if (got == 0) break;
        else if (es_write_all(out, buf, (size_t)got))
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: write failed: %s", dst, strerror(errno));
    }
    free(buf);
    close(in);
    rc = finish_file(out, dst, rc, err);
    if (rc == ES_OK && copied) *copied = 1;
    return rc;
}

/* Removes a file or a folder with everything under it; an absent path is fine. Symbolic
 * links are removed, never followed. */
static int remove_tree(const char *path, es_error *err) {
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT) return ES_OK;
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove: %s", path, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) != 0 && errno != ENOENT)
            return es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove: %s", path, strerror(errno));
        return ES_OK;
    }
    DIR *dir = opendir(path);
    if (!dir) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open folder: %s", path, strerror(errno));
    int rc = ES_OK;
    struct dirent *entry;
    while (rc == ES_OK && (entry = readdir(dir)) != NULL) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
        char *child = path_printf("%s/%s", path, entry->d_name);
        rc = child ? remove_tree(child, err) : out_of_memory(path, err);
        free(child);
    }
    closedir(dir);
    if (rc == ES_OK && rmdir(path) != 0 && errno != ENOENT)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove: %s", path, strerror(errno));
    return rc;
}

/* "checkpoint-N" with N plain decimal digits (no sign, no leading zero, no suffix such as
 * ".partial"): 1 and *step, else 0. */
static int parse_checkpoint_name(const char *name, int64_t *step) {
    size_t prefix = sizeof checkpoint_prefix - 1;
    if (strncmp(name, checkpoint_prefix, prefix) != 0) return 0;
    const char *digits = name + prefix;
    if (!digits[0] || (digits[0] == '0' && digits[1])) return 0;
    int64_t value = 0;
    for (const char *p = digits; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        if (value > (INT64_MAX - (*p - '0')) / 10) return 0;
        value = value * 10 + (*p - '0');
    }
    *step = value;
    return 1;
}

typedef struct found_checkpoint {
    int64_t step;
    int complete; /* has essence-state/state.json */
} found_checkpoint;

static int by_step_descending(const void *a, const void *b) {
    int64_t x = ((const found_checkpoint *)a)->step, y = ((const found_checkpoint *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The checkpoint-N folders of out_dir, newest first. A missing out_dir has none. */
static int list_checkpoints(const char *out_dir, found_checkpoint **list, size_t *count, es_error *err) {
    *list = NULL;
    *count = 0;
    DIR *dir = opendir(out_dir);
    if (!dir) {
        if (errno == ENOENT) return ES_OK;
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open folder: %s", out_dir, strerror(errno));
    }
    size_t cap = 0;
    int rc = ES_OK;
    struct dirent *entry;
    while (rc == ES_OK && (entry = readdir(dir)) != NULL) {
        int64_t step;
        if (!parse_checkpoint_name(entry->d_name, &step)) continue;
        char *path = path_printf("%s/%s", out_dir, entry->d_name);
        char *state = path_printf("%s/%s/essence-state/state.json", out_dir, entry->d_name);
        struct stat st;
        if (!path || !state) rc = out_of_memory(out_dir, err);
        else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            if (*count == cap) {
                size_t grown = cap ? 2 * cap : 16;
                found_checkpoint *bigger = realloc(*list, grown * sizeof *bigger);
                if (!bigger) rc = out_of_memory(out_dir, err);
                else *list = bigger, cap = grown;
            }
            if (rc == ES_OK) {
                (*list)[*count].step = step;
                (*list)[*count].complete = stat(state, &st) == 0 && S_ISREG(st.st_mode);
                ++*count;
            }
        }
        free(path);
        free(state);
    }
    closedir(dir);
    if (rc) {
        free(*list);
        *list = NULL;
        *count = 0;
        return rc;
    }
    if (*count > 1) qsort(*list, *count, sizeof **list, by_step_descending);
    return ES_OK;
}

/* Elements of a tensor given by the caller; -1 for a shape the checkpoint cannot hold. */
static int64_t tensor_numel(const checkpoint_tensor *t) {
    if (!t->name || (t->ndim != 1 && t->ndim != 2)) return -1;
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0 || __builtin_mul_overflow(numel, t->shape[d], &numel)) return -1;
    return numel;
}

static int fill_entry(es_tensor *entry, const char *name, es_dtype dtype, const checkpoint_tensor *t, const void *data,
                      const char *file, es_error *err) {
    int64_t numel = tensor_numel(t);
    if (numel < 0 || (uint64_t)numel > SIZE_MAX / es_dtype_size(dtype))
        return es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": bad shape", file, t->name ? t->name : "");
    memset(entry, 0, sizeof *entry);
    entry->name = name;
    entry->dtype = dtype;
    entry->ndim = t->ndim;
    entry->shape[0] = t->shape[0];
    entry->shape[1] = t->ndim == 2 ? t->shape[1] : 0;
    entry->data = data;
    entry->nbytes = (size_t)numel * es_dtype_size(dtype);
    return ES_OK;
}

static const es_meta_kv pt_format = {"format", "pt"}; /* what transformers writes and expects */

/* model.safetensors: the weights converted to bf16 in one buffer, in the caller's order. */
static int write_model(const char *path, const checkpoint_content *c, es_error *err) {
    es_tensor *entries = calloc(c->n_weights > 0 ? (size_t)c->n_weights : 1, sizeof *entries);
    if (!entries) return out_of_memory(path, err);
    int rc = ES_OK;
    size_t total = 0;
    for (int i = 0; rc == ES_OK && i < c->n_weights; i++) {
        rc = fill_entry(&entries[i], c->weights[i].name, ES_DT_BF16, &c->weights[i], NULL, path, err);
        if (rc == ES_OK && (__builtin_add_overflow(total, entries[i].nbytes / 2, &total) || total > SIZE_MAX / 2))
            rc = es_fail(err, ES_ERR_DATA, "%s: the model is too large", path);
    }
    uint16_t *bf16 = rc ? NULL : malloc(total ? total * sizeof *bf16 : 1);
    if (rc == ES_OK && !bf16) rc = out_of_memory(path, err);
    size_t at = 0;
    for (int i = 0; rc == ES_OK && i < c->n_weights; i++) {
        size_t numel = entries[i].nbytes / 2;
        if (numel && !c->weights[i].data) {
            rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\": no data", path, c->weights[i].name);
            break;
        }
        es_f32_to_bf16_array(bf16 + at, c->weights[i].data, numel);
        entries[i].data = bf16 + at;
        at += numel;
    }
    if (rc == ES_OK) rc = es_safetensors_write(path, entries, (size_t)c->n_weights, &pt_format, 1, err);
    free(bf16);
    free(entries);
    return rc;
}

/* student_head.safetensors: fp32 straight from the caller's buffers. */
static int write_head(const char *path, const checkpoint_content *c, es_error *err) {
    es_tensor *entries = calloc((size_t)c->n_head, sizeof *entries);
    if (!entries) return out_of_memory(path, err);
    int rc = ES_OK;
    for (int i = 0; rc == ES_OK && i < c->n_head; i++)
        rc = fill_entry(&entries[i], c->head[i].name, ES_DT_F32, &c->head[i], c->head[i].data, path, err);
    if (rc == ES_OK) rc = es_safetensors_write(path, entries, (size_t)c->n_head, &pt_format, 1, err);
    free(entries);
    return rc;
}

/* essence-state/state.safetensors: "master/NAME", "m/NAME", "v/NAME" for every state tensor. */
static int write_state(const char *path, const checkpoint_content *c, es_error *err) {
    static const char *const prefixes[3] = {"master/", "m/", "v/"};
    const checkpoint_tensor *groups[3] = {c->master, c->m, c->v};
    size_t n = 3 * (size_t)c->n_state;
    es_tensor *entries = calloc(n ? n : 1, sizeof *entries);
    char **names = calloc(n ? n : 1, sizeof *names);
    int rc = entries && names ? ES_OK : out_of_memory(path, err);
    for (size_t k = 0; rc == ES_OK && k < n; k++) {
        const checkpoint_tensor *t = &groups[k / (size_t)c->n_state][k % (size_t)c->n_state];
        names[k] = t->name ? path_printf("%s%s", prefixes[k / (size_t)c->n_state], t->name) : NULL;
        if (t->name && !names[k]) rc = out_of_memory(path, err);
        else rc = fill_entry(&entries[k], names[k], ES_DT_F32, t, t->data, path, err);
    }
    if (rc == ES_OK) rc = es_safetensors_write(path, entries, n, NULL, 0, err);
    for (size_t k = 0; names && k < n; k++) free(names[k]);
    free(names);
    free(entries);
    return rc;
}

static int make_dir(const char *path, es_error *err) {
    if (mkdir(path, 0755) != 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create folder: %s", path, strerror(errno));
    return ES_OK;
}

/* Everything of one checkpoint inside the (new, empty) folder dir. */
static int write_checkpoint_files(const char *dir, const checkpoint_content *c, es_error *err) {
    char *state_dir = path_printf("%s/essence-state", dir);
    char *src = NULL, *dst = NULL;
    int rc = state_dir ? make_dir(dir, err) : out_of_memory(dir, err);
    if (rc == ES_OK) rc = make_dir(state_dir, err);
    for (size_t i = 0; rc == ES_OK && i <= N_TOKENIZER_FILES; i++) {
        const char *name = i == 0 ? "config.json" : tokenizer_files[i - 1];
        free(src), free(dst);
        src = path_printf("%s/%s", c->model_dir, name);
        dst = path_printf("%s/%s", dir, name);
        rc = src && dst ? copy_file(src, dst, i > 0, NULL, err) : out_of_memory(dir, err);
    }
    free(dst);
    dst = path_printf("%s/model.safetensors", dir);
    if (rc == ES_OK) rc = dst ? write_model(dst, c, err) : out_of_memory(dir, err);
    if (rc == ES_OK && c->n_head > 0) {
        free(dst);
        dst = path_printf("%s/student_head.safetensors", dir);
        rc = dst ? write_head(dst, c, err) : out_of_memory(dir, err);
    }
    if (rc == ES_OK) {
        free(dst);
        dst = path_printf("%s/state.safetensors", state_dir);
        rc = dst ? write_state(dst, c, err) : out_of_memory(dir, err);
    }
    if (rc == ES_OK) {
        free(dst);
        /* last, so that a folder holding state.json holds everything else too */
        dst = path_printf("%s/state.json", state_dir);
        rc = dst ? write_file(dst, c->state_json, strlen(c->state_json), err) : out_of_memory(dir, err);
    }
    if (rc == ES_OK) rc = es_fsync_folder(state_dir, err);
    if (rc == ES_OK) rc = es_fsync_folder(dir, err);
    free(src);
    free(dst);
    free(state_dir);
    return rc;
}

/* Puts the finished partial folder at final. An existing final (the same step saved again)
 * is swapped atomically where the file system can (RENAME_EXCHANGE), else renamed away to
 * FINAL.replaced first and put back if the second rename fails; either way it is removed
 * only once the new one is in place. */
static int install_checkpoint(const char *partial, const char *final, const char *out_dir, es_error *err) {
    if (renameat2(AT_FDCWD, partial, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
        int rc = es_fsync_folder(out_dir, err);
        int removed = remove_tree(partial, err); /* the old one, now under the partial name */
        return rc ? rc : removed;
    }
    if (errno == ENOENT) { /* no checkpoint of this step yet */
        if (rename(partial, final) != 0)
            return es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", partial, final, strerror(errno));
        return es_fsync_folder(out_dir, err);
    }
    if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", partial, final, strerror(errno));
    char *old = path_printf("%s.replaced", final);
    if (!old) return out_of_memory(final, err);
    int rc = remove_tree(old, err);
    if (rc == ES_OK && rename(final, old) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", final, old, strerror(errno));
    if (rc == ES_OK && rename(partial, final) != 0) {
        int saved = errno;
        if (rename(old, final) == 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", partial, final, strerror(saved));
        else
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s (the previous checkpoint is left at %s)",
                         partial, final, strerror(saved), old);
    }
    if (rc == ES_OK) rc = es_fsync_folder(out_dir, err);
    if (rc == ES_OK) rc = remove_tree(old, err);
    free(old);
    return rc;
}

/* Removes checkpoint-N folders beyond the newest `keep`, never the one just saved. */
static int prune_checkpoints(const char *out_dir, int64_t saved_step, int keep, es_error *err) {
    if (keep <= 0) return ES_OK;
    found_checkpoint *list;
    size_t count;
    int rc = list_checkpoints(out_dir, &list, &count, err);
    for (size_t i = (size_t)keep; rc == ES_OK && i < count; i++) {
        if (list[i].step == saved_step) continue;
        /* Renamed away first: a removal cut short must not leave a folder that looks complete. */
        char *path = path_printf("%s/%s%lld", out_dir, checkpoint_prefix, (long long)list[i].step);
        char *doomed = path ? path_printf("%s.partial", path) : NULL;
        rc = doomed ? remove_tree(doomed, err) : out_of_memory(out_dir, err);
        if (rc == ES_OK && rename(path, doomed) != 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", path, doomed, strerror(errno));
        if (rc == ES_OK) rc = remove_tree(doomed, err);
        free(path), free(doomed);
    }
    free(list);
    return rc;
}

/* OUT/NAME becomes the checkpoint's NAME through OUT/NAME.partial and a rename: a hard link
 * where allowed (big files), else a copy. A NAME the checkpoint lacks is removed from OUT so
 * that OUT matches the newest checkpoint (a student head from an earlier run, say). */
static int publish_file(const char *out_dir, const char *checkpoint, const char *name, int may_link, es_error *err) {
    char *src = path_printf("%s/%s", checkpoint, name), *dst = path_printf("%s/%s", out_dir, name);
    char *tmp = path_printf("%s/%s.partial", out_dir, name);
    int rc = src && dst && tmp ? ES_OK : out_of_memory(out_dir, err);
    struct stat st;
    if (rc == ES_OK && lstat(src, &st) != 0) {
        if (errno != ENOENT) rc = es_fail(err, ES_ERR_RUNTIME, "%s: %s", src, strerror(errno));
        else if (unlink(dst) != 0 && errno != ENOENT)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove: %s", dst, strerror(errno));
        goto done;
    }
    if (rc == ES_OK && unlink(tmp) != 0 && errno != ENOENT)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove: %s", tmp, strerror(errno));
    if (rc == ES_OK && !(may_link && link(src, tmp) == 0)) rc = copy_file(src, tmp, 0, NULL, err);
    if (rc == ES_OK && rename(tmp, dst) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", tmp, dst, strerror(errno));
    /* rename() leaves both names when they are links to one file already (a checkpoint published
     * again by a resumed run) */
    if (tmp) unlink(tmp);
done:
    free(src);
    free(dst);
    free(tmp);
    return rc;
}

static int publish_top_level(const char *out_dir, const char *checkpoint, es_error *err) {
    int rc = publish_file(out_dir, checkpoint, "config.json", 0, err);
    for (size_t i = 0; rc == ES_OK && i < N_TOKENIZER_FILES; i++)
        rc = publish_file(out_dir, checkpoint, tokenizer_files[i], 0, err);
    if (rc == ES_OK) rc = publish_file(out_dir, checkpoint, "model.safetensors", 1, err);
    if (rc == ES_OK) rc = publish_file(out_dir, checkpoint, "student_head.safetensors", 1, err);
    if (rc == ES_OK) rc = es_fsync_folder(out_dir, err);
    return rc;
}

static int check_content(const char *out_dir, int64_t step, const checkpoint_content *c, es_error *err) {
    if (!out_dir || !*out_dir || step < 0 || !c || !c->model_dir || c->n_weights < 0 || c->n_head < 0 || c->n_state < 0 ||
        (c->n_weights > 0 && !c->weights) || (c->n_head > 0 && !c->head) ||
        (c->n_state > 0 && (!c->master || !c->m || !c->v)) || !c->state_json)
        return es_fail(err, ES_ERR_USAGE, "%s: checkpoint_save: missing content or a negative step", out_dir ? out_dir : "");
    /* find_latest trusts any folder with state.json: make sure it will parse */
    json_error_t jerr;
    json_t *state = json_loads(c->state_json, 0, &jerr);
    int is_object = json_is_object(state);
    json_decref(state);
    if (!is_object) return es_fail(err, ES_ERR_DATA, "%s: the training state is not a JSON object", out_dir);
    return ES_OK;
}

int checkpoint_save(const char *out_dir, int64_t step, const checkpoint_content *content, int keep, es_error *err) {
    int rc = check_content(out_dir, step, content, err);
    if (rc) return rc;
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create folder: %s", out_dir, strerror(errno));
    char *final = path_printf("%s/%s%lld", out_dir, checkpoint_prefix, (long long)step);
    char *partial = final ? path_printf("%s.partial", final) : NULL;
    if (!partial) {
        free(final);
        return out_of_memory(out_dir, err);
    }
    rc = remove_tree(partial, err); /* a save that died half way */
    if (rc == ES_OK) rc = write_checkpoint_files(partial, content, err);
    if (rc == ES_OK) rc = install_checkpoint(partial, final, out_dir, err);
    if (rc) {
        remove_tree(partial, NULL);
    } else {
        /* The new checkpoint is in place: try both steps, report the first failure. */
        rc = prune_checkpoints(out_dir, step, keep, err);
        int published = publish_top_level(out_dir, final, err);
        if (rc == ES_OK) rc = published;
    }
    free(partial);
    free(final);
    return rc;
}

int checkpoint_find_latest(const char *out_dir, char **path, int64_t *step, es_error *err) {
    *path = NULL;
    *step = -1;
    found_checkpoint *list;
    size_t count;
    int rc = list_checkpoints(out_dir, &list, &count, err);
    for (size_t i = 0; rc == ES_OK && i < count; i++) {
        if (!list[i].complete) continue;
        *path = path_printf("%s/%s%lld", out_dir, checkpoint_prefix, (long long)list[i].step);
        if (!*path) rc = out_of_memory(out_dir, err);
        else *step = list[i].step;
        break;
    }
    free(list);
    return rc;
}

/* The whole of a small text file, NUL-terminated. */
static int read_text(const char *path, char **text, es_error *err) {
    *text = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return es_fail(err, errno == ENOENT ? ES_ERR_DATA : ES_ERR_RUNTIME, "%s: cannot open: %s", path, strerror(errno));
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    int rc = buf ? ES_OK : out_of_memory(path, err);
    while (rc == ES_OK) {
        if (len + 1 == cap) {
            char *bigger = cap < SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
            if (!bigger) {
                rc = out_of_memory(path, err);
                break;
            }
            buf = bigger, cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f)) rc = es_fail(err, ES_ERR_RUNTIME, "%s: read failed: %s", path, strerror(errno));
            break;
        }
    }
    fclose(f);
    if (rc == ES_OK && memchr(buf, '\0', len)) rc = es_fail(err, ES_ERR_DATA, "%s: holds a NUL byte", path);
    if (rc) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *text = buf;
    return ES_OK;
}

static int load_group(const es_safetensors *st, const char *file, const char *prefix, const checkpoint_buffer *buffers,
                      int n, es_error *err) {
    for (int i = 0; i < n; i++) {
        char *name = path_printf("%s%s", prefix, buffers[i].name ? buffers[i].name : "");
        if (!name) return out_of_memory(file, err);
        const es_tensor *t = es_safetensors_find(st, name);
        int rc = ES_OK;
        if (!t) rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" is missing", file, name);
        else if (t->dtype != ES_DT_F32)
            rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" is %s, expected F32", file, name, es_dtype_name(t->dtype));
        else if (buffers[i].numel < 0 || es_tensor_numel(t) != (size_t)buffers[i].numel)
            rc = es_fail(err, ES_ERR_DATA, "%s: tensor \"%s\" has %zu elements, expected %lld", file, name,
                         es_tensor_numel(t), (long long)buffers[i].numel);
        else if (t->nbytes && buffers[i].data) memcpy(buffers[i].data, t->data, t->nbytes);
        free(name);
        if (rc) return rc;
    }
    return ES_OK;
}

int checkpoint_load_state(const char *checkpoint_dir, const checkpoint_buffer *master, const checkpoint_buffer *m,
                          const checkpoint_buffer *v, int n_state, char **state_json, es_error *err) {
    *state_json = NULL;
    char *file = path_printf("%s/essence-state/state.safetensors", checkpoint_dir);
    char *json_path = path_printf("%s/essence-state/state.json", checkpoint_dir);
    es_safetensors *st = NULL;
    int rc = file && json_path ? ES_OK : out_of_memory(checkpoint_dir, err);
    if (rc == ES_OK) rc = es_safetensors_open(file, &st, err);
    if (rc == ES_OK) rc = load_group(st, file, "master/", master, n_state, err);
    if (rc == ES_OK) rc = load_group(st, file, "m/", m, n_state, err);
    if (rc == ES_OK) rc = load_group(st, file, "v/", v, n_state, err);
    if (rc == ES_OK) rc = read_text(json_path, state_json, err);
    es_safetensors_close(st);
    free(file);
    free(json_path);
    return rc;
}

int checkpoint_survey(const char *out_dir, size_t *count, int64_t *newest, es_error *err) {
    found_checkpoint *list;
    int rc = list_checkpoints(out_dir, &list, count, err);
    *newest = !rc && *count ? list[0].step : -1;
    free(list);
    return rc;
}

int checkpoint_remove_all(const char *out_dir, es_error *err) {
    DIR *dir = opendir(out_dir);
    if (!dir) return errno == ENOENT ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "%s: cannot open folder: %s", out_dir, strerror(errno));
    int rc = ES_OK;
    struct dirent *entry;
    while (rc == ES_OK && (entry = readdir(dir)) != NULL) {
        int64_t step;
        const char *name = entry->d_name;
        size_t len = strlen(name);
        char base[256];
        /* checkpoint-N, a save that died half way (checkpoint-N.partial), the published model files */
        snprintf(base, sizeof base, "%.*s", len > 8 && !strcmp(name + len - 8, ".partial") ? (int)(len - 8) : (int)len, name);
        if (!parse_checkpoint_name(base, &step) && strcmp(name, "model.safetensors") && strcmp(name, "student_head.safetensors"))
            continue;
        char *path = path_printf("%s/%s", out_dir, name);
        rc = path ? remove_tree(path, err) : out_of_memory(out_dir, err);
        free(path);
    }
    closedir(dir);
    return rc ? rc : es_fsync_folder(out_dir, err);
}

/* Removes the checkpoint-N.partial folders a stopped save or prune left. */
static int remove_partials(const char *out_dir, es_error *err) {
    DIR *dir = opendir(out_dir);
    if (!dir) return errno == ENOENT ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "%s: cannot open folder: %s", out_dir, strerror(errno));
    int rc = ES_OK;
    struct dirent *entry;
    while (rc == ES_OK && (entry = readdir(dir)) != NULL) {
        size_t len = strlen(entry->d_name);
        if (strncmp(entry->d_name, checkpoint_prefix, sizeof checkpoint_prefix - 1) || len < 8 || strcmp(entry->d_name + len - 8, ".partial"))
            continue;
        char *path = path_printf("%s/%s", out_dir, entry->d_name);
        rc = path ? remove_tree(path, err) : out_of_memory(out_dir, err);
        free(path);
    }
    closedir(dir);
    return rc;
}

int checkpoint_tidy(const char *out_dir, const char *checkpoint, int64_t step, int keep, es_error *err) {
    int rc = remove_partials(out_dir, err);
    if (rc == ES_OK) rc = prune_checkpoints(out_dir, step, keep, err);
    int published = publish_top_level(out_dir, checkpoint, err);
    return rc ? rc : published;
}
