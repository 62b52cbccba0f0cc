/* What is up to date (docs/run.md "Fingerprints"): inputs fingerprinted by content through the
 * lock's cache, stage fingerprints from params and input fingerprints, outputs checked for the
 * fingerprint they store. essence.lock is written atomically beside the pipeline. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "files.h"
#include "h5file.h"
#include "run.h"

#define TOOL_VERSION "essence 0.1"

/* Temporary names of essence.lock's saves: LOCK_TEMP_PREFIX and six characters of mkstemp's. */
#define LOCK_TEMP_PREFIX "essence.lock.partial-"

struct run_lock {
    char *path;
    char *name;     /* the pipeline file's name: its records' key */
    json_t *root;   /* {"version": 1, "files": {...}, "pipelines": {"NAME.yaml": {"stages": {...}}}} */
    json_t *stages; /* this pipeline's records (borrowed from root) */
    json_t *pending; /* this run's input fingerprints per stage, for the records */
    /* What this process changed since its last save, laid over the lock on disk by the next:
     * another essence-run's `status` may have saved its hashes in between. */
    json_t *hashed, *recorded;
    int dirty;
};

int run_lock_open(run_lock **out, const run_plan *plan, es_error *err) {
    run_lock *lock = calloc(1, sizeof *lock);
    if (!lock || asprintf(&lock->path, "%s/essence.lock", plan->dir) < 0 || !(lock->name = strdup(strrchr(plan->pipeline_path, '/') + 1)) ||
        !(lock->hashed = json_object()) || !(lock->recorded = json_object())) {
        if (lock) free(lock->path), free(lock->name), json_decref(lock->hashed);
        free(lock);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    json_error_t problem;
    lock->root = json_load_file(lock->path, 0, &problem);
    if (!lock->root && access(lock->path, F_OK) == 0)
        fprintf(stderr, "essence-run: warning: %s:%d: %s (starting a new lock)\n", lock->path, problem.line, problem.text);
    if (!json_is_object(lock->root)) json_decref(lock->root), lock->root = json_pack("{s:i, s:{}}", "version", 1, "files");
    if (!json_is_object(json_object_get(lock->root, "files"))) json_object_set_new(lock->root, "files", json_object());
    /* Pipelines in one folder share the lock (and its file cache); their records are apart. */
    if (!json_is_object(json_object_get(lock->root, "pipelines"))) json_object_set_new(lock->root, "pipelines", json_object());
    json_object_del(lock->root, "stages");
    json_t *pipelines = json_object_get(lock->root, "pipelines");
    const char *name = strrchr(plan->pipeline_path, '/') + 1;
    if (!json_is_object(json_object_get(pipelines, name))) json_object_set_new(pipelines, name, json_pack("{s:{}}", "stages"));
    lock->stages = json_object_get(json_object_get(pipelines, name), "stages");
    if (!json_is_object(lock->stages)) json_object_set_new(json_object_get(pipelines, name), "stages", json_object()),
        lock->stages = json_object_get(json_object_get(pipelines, name), "stages");
    *out = lock;
    return ES_OK;
}

/* The lock as it is on disk now, with this pipeline's records object; a new one when it is
 * missing or unreadable. */
static json_t *load_disk_lock(const run_lock *lock, json_t **stages) {
    json_error_t problem;
    json_t *root = json_load_file(lock->path, 0, &problem);
    if (!json_is_object(root)) json_decref(root), root = json_pack("{s:i}", "version", 1);
    if (!root) return NULL;
    if (!json_is_object(json_object_get(root, "files"))) json_object_set_new(root, "files", json_object());
    if (!json_is_object(json_object_get(root, "pipelines"))) json_object_set_new(root, "pipelines", json_object());
    json_object_del(root, "stages"); /* the records of before "pipelines", as run_lock_open drops them */
    json_t *pipelines = json_object_get(root, "pipelines");
    if (!json_is_object(json_object_get(pipelines, lock->name))) json_object_set_new(pipelines, lock->name, json_object());
    json_t *mine = json_object_get(pipelines, lock->name);
    if (!json_is_object(json_object_get(mine, "stages"))) json_object_set_new(mine, "stages", json_object());
    *stages = json_object_get(mine, "stages");
    return *stages && json_is_object(json_object_get(root, "files")) ? root : (json_decref(root), NULL);
}

int run_lock_save(run_lock *lock, es_error *err) {
    if (!lock->dirty) return ES_OK;
    json_t *stages = NULL, *root = load_disk_lock(lock, &stages);
    if (!root) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    json_object_update(json_object_get(root, "files"), lock->hashed);
    json_object_update(stages, lock->recorded);
    char *dir = strdup(lock->path), *tmp = NULL;
    if (!dir || !strrchr(dir, '/') || (*strrchr(dir, '/') = '\0', asprintf(&tmp, "%s/" LOCK_TEMP_PREFIX "XXXXXX", dir) < 0)) {
        free(dir), json_decref(root);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    /* A unique name: two writers never share a half-written file; fsync before the rename, so
     * that essence.lock is the old text or the new one, whole, even after a crash. */
    int fd = mkstemp(tmp), rc = ES_OK;
    if (fd < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write: %s", lock->path, strerror(errno));
    else if (fchmod(fd, 0644) != 0 || json_dumpfd(root, fd, JSON_INDENT(1) | JSON_SORT_KEYS) != 0 || es_write_all(fd, "\n", 1) != 0 ||
             fsync(fd) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write %s: %s", lock->path, tmp, strerror(errno ? errno : EIO));
    if (fd >= 0 && close(fd) != 0 && !rc) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write %s: %s", lock->path, tmp, strerror(errno));
    if (!rc && rename(tmp, lock->path) != 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename %s to it: %s", lock->path, tmp, strerror(errno));
    if (!rc) rc = es_fsync_folder(dir, err);
    if (rc && fd >= 0) unlink(tmp);
    if (!rc) {
        json_object_clear(lock->hashed), json_object_clear(lock->recorded);
        lock->dirty = 0;
    }
    free(tmp), free(dir);
    json_decref(root);
    return rc;
}

int run_lock_changed(const run_lock *lock) { return lock->dirty; }

void run_lock_remove_temporaries(const run_plan *plan) {
    DIR *dir = opendir(plan->dir);
    if (!dir) return;
    size_t prefix = strlen(LOCK_TEMP_PREFIX);
    for (struct dirent *entry; (entry = readdir(dir));) {
        const char *name = entry->d_name;
        /* essence.lock.partial: the single temporary name of earlier versions */
        if (!strcmp(name, "essence.lock.partial") || (!strncmp(name, LOCK_TEMP_PREFIX, prefix) && strlen(name) == prefix + 6)) {
            char path[PATH_MAX + 256];
            snprintf(path, sizeof path, "%s/%s", plan->dir, name);
            unlink(path);
        }
    }
    closedir(dir);
}

void run_lock_free(run_lock *lock) {
    if (!lock) return;
    json_decref(lock->root), json_decref(lock->pending), json_decref(lock->hashed), json_decref(lock->recorded);
    free(lock->path), free(lock->name);
    free(lock);
}

/* A file's SHA-256, from the cache when its size and modification time are unchanged. */
static int file_hash(run_lock *lock, const char *path, const struct stat *st, char out[ES_FINGERPRINT_HEX], es_error *err) {
    json_t *files = json_object_get(lock->root, "files"), *entry = json_object_get(files, path);
    long long mtime = (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    if (entry && json_integer_value(json_object_get(entry, "size")) == (long long)st->st_size &&
        json_integer_value(json_object_get(entry, "mtime_ns")) == mtime && json_is_string(json_object_get(entry, "sha256"))) {
        snprintf(out, ES_FINGERPRINT_HEX, "%s", json_string_value(json_object_get(entry, "sha256")));
        return ES_OK;
    }
    int rc = es_sha256_file(path, out, err);
    if (!rc) {
        json_t *fresh = json_pack("{s:I, s:I, s:s}", "size", (json_int_t)st->st_size, "mtime_ns", (json_int_t)mtime, "sha256", out);
        json_object_set(files, path, fresh);
        json_object_set_new(lock->hashed, path, fresh);
        lock->dirty = 1;
    }
    return rc;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A folder's regular files below it, relative paths, appended to *lines as "PATH SHA256\n". */
static int hash_folder(run_lock *lock, const char *root, const char *relative, char **lines, size_t *len, es_error *err) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s%s%s", root, *relative ? "/" : "", relative);
    DIR *dir = opendir(path);
    if (!dir) return es_fail(err, ES_ERR_USAGE, "%s: %s", path, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *entry; (entry = readdir(dir));) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
        if (n == cap) names = realloc(names, (cap = cap ? 2 * cap : 32) * sizeof *names);
        if (names) names[n++] = strdup(entry->d_name);
    }
    closedir(dir);
    qsort(names, n, sizeof *names, by_name);
    int rc = ES_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        char child[PATH_MAX], child_path[PATH_MAX + 8];
        snprintf(child, sizeof child, "%s%s%s", relative, *relative ? "/" : "", names[i]);
        snprintf(child_path, sizeof child_path, "%s/%s", root, child);
        struct stat st;
        if (stat(child_path, &st) != 0) continue; /* a dangling link */
        if (S_ISDIR(st.st_mode)) {
            rc = hash_folder(lock, root, child, lines, len, err);
        } else if (S_ISREG(st.st_mode)) {
            char hash[ES_FINGERPRINT_HEX];
            rc = file_hash(lock, child_path, &st, hash, err);
            size_t need = *len + strlen(child) + ES_FINGERPRINT_HEX + 2;
            char *grown = rc ? NULL : realloc(*lines, need + 1);
            if (!rc && !grown) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            if (!rc) *lines = grown, *len += (size_t)sprintf(*lines + *len, "%s %s\n", child, hash);
        }
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

static int input_fingerprint(run_lock *lock, const char *path, char out[ES_FINGERPRINT_HEX], es_error *err) {
    struct stat st;
    if (stat(path, &st) != 0) return es_fail(err, ES_ERR_USAGE, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return file_hash(lock, path, &st, out, err);
    char *lines = calloc(1, 1);
    size_t len = 0;
    int rc = lines ? hash_folder(lock, path, "", &lines, &len, err) : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) es_sha256_hex(lines, len, out);
    free(lines);
    return rc;
}

/* A JSONL of results (essence-eval's): the "fingerprint" of its last line, the summary. */
static int jsonl_fingerprint(const char *path, char fingerprint[ES_FINGERPRINT_HEX], const char **why) {
    FILE *f = fopen(path, "r");
    if (!f) {
        *why = "unreadable";
        return 0;
    }
    char *line = NULL, *last = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) >= 0)
        if (line[strspn(line, " \t\r\n")]) free(last), last = strdup(line);
    free(line);
    fclose(f);
    json_t *summary = last ? json_loads(last, 0, NULL) : NULL;
    const char *text = json_string_value(json_object_get(summary, "fingerprint"));
    const int found = text && strlen(text) == ES_FINGERPRINT_HEX - 1;
    if (found) memcpy(fingerprint, text, ES_FINGERPRINT_HEX);
    else *why = "without a fingerprint (no summary line)";
    json_decref(summary);
    free(last);
    return found;
}

int run_output_fingerprint(const char *path, char fingerprint[ES_FINGERPRINT_HEX], const char **why) {
    struct stat st;
    char partial[PATH_MAX + 16];
    snprintf(partial, sizeof partial, "%s.partial", path);
    if (stat(path, &st) != 0) {
        *why = access(partial, F_OK) == 0 ? "incomplete" : "missing";
        return 0;
    }
    char *text = NULL;
    if (S_ISDIR(st.st_mode)) {
        char file[PATH_MAX + 16];
        snprintf(file, sizeof file, "%s/fingerprint", path);
        FILE *f = fopen(file, "r");
        char line[128] = "";
        if (f) {
            if (!fgets(line, sizeof line, f)) line[0] = '\0';
            fclose(f);
        }
        line[strcspn(line, "\r\n")] = '\0';
        if (strlen(line) != ES_FINGERPRINT_HEX - 1) {
            *why = "incomplete (no fingerprint file)";
            return 0;
        }
        memcpy(fingerprint, line, ES_FINGERPRINT_HEX);
        return 1;
    }
    const size_t n = strlen(path);
    if (n > 6 && !strcmp(path + n - 6, ".jsonl")) return jsonl_fingerprint(path, fingerprint, why);
    es_h5file file;
    es_error ignored = {0};
    if (es_h5_open(&file, path, &ignored)) {
        *why = "unreadable";
        return 0;
    }
    int found = es_h5_attr_get_str(file.id, "fingerprint", &text, &ignored) == 0 && text && strlen(text) == ES_FINGERPRINT_HEX - 1;
    if (found) memcpy(fingerprint, text, ES_FINGERPRINT_HEX);
    else *why = "without a fingerprint";
    free(text);
    es_h5_close(&file, 0);
    return found;
}

/* What differs from the lock's record, for the reason line. */
static void describe_change(const json_t *record, const json_t *params, const json_t *inputs, char *buf, size_t size) {
    size_t n = 0;
    buf[0] = '\0';
    const json_t *old_params = json_object_get(record, "params"), *old_inputs = json_object_get(record, "input_fingerprints");
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)params, key, value) {
        const json_t *old = json_object_get(old_params, key);
        if (old && json_equal((json_t *)old, value)) continue;
        char *was = old ? json_dumps(old, JSON_ENCODE_ANY) : strdup("unset"), *now = json_dumps(value, JSON_ENCODE_ANY);
        n += (size_t)snprintf(buf + n, n < size ? size - n : 0, "%s%s %s -> %s", n ? ", " : "", key, was ? was : "?", now ? now : "?");
        free(was), free(now);
    }
    json_object_foreach((json_t *)old_params, key, value)
        if (!json_object_get(params, key)) n += (size_t)snprintf(buf + n, n < size ? size - n : 0, "%s%s unset", n ? ", " : "", key);
    json_object_foreach((json_t *)inputs, key, value) {
        const json_t *old = json_object_get(old_inputs, key);
        if (!old || !json_equal((json_t *)old, value))
            n += (size_t)snprintf(buf + n, n < size ? size - n : 0, "%sinput %s changed", n ? ", " : "", key);
    }
    if (!n) snprintf(buf, size, "its program, outputs or shards changed");
}

int run_lock_record(run_lock *lock, const run_plan *plan, int s, es_error *err) {
    const run_stage *stage = &plan->stages[s];
    json_t *stages = lock->stages, *old = json_object_get(stages, stage->name);
    if (old && !strcmp(json_string_value(json_object_get(old, "fingerprint")) ? json_string_value(json_object_get(old, "fingerprint")) : "",
                       stage->fingerprint))
        return ES_OK;
    char finished[64];
    time_t now = time(NULL);
    strftime(finished, sizeof finished, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    json_t *outputs = json_object();
    for (int o = 0; o < stage->n_outputs; o++) json_object_set_new(outputs, stage->outputs[o].flag, json_string(stage->outputs[o].text));
    json_t *inputs = json_object();
    for (int i = 0; i < stage->n_args; i++)
        if (stage->args[i].kind == RUN_INPUT) json_object_set_new(inputs, stage->args[i].flag, json_string(stage->args[i].text));
    json_t *record = json_pack("{s:s, s:O, s:O, s:o, s:o, s:i, s:s}", "fingerprint", stage->fingerprint, "params", stage->params,
                               "input_fingerprints", json_object_get(lock->pending, stage->name), "inputs", inputs, "outputs", outputs,
                               "shards", stage->shards, "finished", finished);
    if (!record) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    json_object_set(stages, stage->name, record);
    json_object_set_new(lock->recorded, stage->name, record);
    lock->dirty = 1;
    return ES_OK;
}

int run_plan_status(run_plan *plan, run_lock *lock, char *const *force, int n_force, es_error *err) {
    json_decref(lock->pending);
    json_t *pending = lock->pending = json_object(); /* each stage's input fingerprints, kept for its record */
    int rc = ES_OK;
    for (int s = 0; !rc && s < plan->n_stages; s++) {
        run_stage *stage = &plan->stages[s];
        const char *program = strrchr(stage->program, '/') ? strrchr(stage->program, '/') + 1 : stage->program;
        json_t *inputs = json_object(), *outputs = json_object();
        for (int i = 0; !rc && i < stage->n_args; i++) {
            const run_arg *arg = &stage->args[i];
            if (arg->kind != RUN_INPUT) continue;
            char fingerprint[ES_FINGERPRINT_HEX];
            if (arg->ref_stage >= 0) { /* what another stage writes: its recipe */
                snprintf(fingerprint, sizeof fingerprint, "%s", plan->stages[arg->ref_stage].fingerprint);
            } else if ((rc = input_fingerprint(lock, arg->value, fingerprint, err))) {
                es_error_prefix(err, "%s:%d: stage %s: input %s", plan->pipeline_path, arg->line, stage->name, arg->flag);
                break;
            }
            json_object_set_new(inputs, arg->flag, json_string(fingerprint));
        }
        for (int o = 0; o < stage->n_outputs; o++) json_object_set_new(outputs, stage->outputs[o].flag, json_string(stage->outputs[o].text));
        json_t *recipe = json_pack("{s:s, s:s, s:O, s:O, s:O, s:i}", "program", program, "tool_version", TOOL_VERSION, "params",
                                   stage->params, "inputs", inputs, "outputs", outputs, "shards", stage->shards);
        if (!rc) rc = es_fingerprint_params(recipe, stage->fingerprint, err);
        json_object_set(pending, stage->name, inputs);
        json_decref(recipe), json_decref(inputs), json_decref(outputs);
        if (rc) break;

        // which outputs (shards) are missing or stale
        free(stage->shards_to_run), free(stage->reason);
        stage->shards_to_run = malloc((size_t)stage->shards * sizeof *stage->shards_to_run);
        stage->n_shards_to_run = 0;
        stage->reason = NULL;
        if (!stage->shards_to_run) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        int forced = 0, stale = 0;
        for (int f = 0; f < n_force; f++) forced |= !strcmp(force[f], stage->name);
        char why_output[PATH_MAX + 128] = "";
        for (int shard = 0; shard < stage->shards; shard++) {
            int needed = forced;
            for (int o = 0; o < stage->n_outputs && !needed; o++) {
                char *path = stage->shards > 1 ? run_shard_path(stage->outputs[o].value, shard, stage->shards) : strdup(stage->outputs[o].value);
                char stored[ES_FINGERPRINT_HEX];
                const char *why = "";
                int found = path ? run_output_fingerprint(path, stored, &why) : 0;
                if (found != 1) needed = 1, snprintf(why_output, sizeof why_output, "output %s %s", path ? path : "?", why);
                else if (strcmp(stored, stage->fingerprint)) needed = 1, stale = 1;
                free(path);
            }
            if (needed) stage->shards_to_run[stage->n_shards_to_run++] = shard;
        }
        stage->will_run = stage->n_shards_to_run > 0;
        char reason[PATH_MAX + 2048] = "";
        const json_t *record = json_object_get(lock->stages, stage->name);
        if (forced) {
            snprintf(reason, sizeof reason, "--force");
        } else if (stale || (stage->will_run && record && strcmp(json_string_value(json_object_get(record, "fingerprint")) ?
                                                                        json_string_value(json_object_get(record, "fingerprint")) : "", stage->fingerprint))) {
            if (record) {
                char change[1800];
                describe_change(record, stage->params, json_object_get(pending, stage->name), change, sizeof change);
                snprintf(reason, sizeof reason, "%s", change);
            } else {
                snprintf(reason, sizeof reason, "%s", why_output[0] ? why_output : "its outputs were made with other parameters or inputs");
            }
        } else if (stage->will_run && !record && stage->n_shards_to_run == stage->shards) {
            snprintf(reason, sizeof reason, "never ran (no record in essence.lock)");
        } else if (stage->will_run) {
            snprintf(reason, sizeof reason, "%s", why_output[0] ? why_output : "never ran");
        }
        if (stage->will_run && stage->shards > 1 && stage->n_shards_to_run < stage->shards) {
            size_t n = strlen(reason);
            n += (size_t)snprintf(reason + n, sizeof reason - n, " (shard%s", stage->n_shards_to_run > 1 ? "s" : "");
            for (int i = 0; i < stage->n_shards_to_run && n < sizeof reason; i++)
                n += (size_t)snprintf(reason + n, sizeof reason - n, "%s%d", i ? "," : " ", stage->shards_to_run[i]);
            if (n < sizeof reason) snprintf(reason + n, sizeof reason - n, ")");
        }
        if (!(stage->reason = strdup(reason))) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (!stage->will_run) rc = run_lock_record(lock, plan, s, err);
    }
    return rc;
}
