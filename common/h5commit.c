#include "h5commit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "log.h"
#include "resume.h"

#define RECORD_GROUP "/_commit"
#define RECORD_MAGIC "essence-commit-1"

int es_commit_record_add(es_commit_record *r, const char *name, const void *data, size_t size, es_error *err) {
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 16;
        es_commit_part *grown = realloc(r->parts, (size_t)cap * sizeof *grown);
        if (!grown) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        r->parts = grown, r->cap = cap;
    }
    es_commit_part *part = &r->parts[r->n];
    part->name = strdup(name);
    part->data = malloc(size ? size : 1);
    if (!part->name || !part->data) {
        free(part->name), free(part->data);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    if (size) memcpy(part->data, data, size);
    part->size = size;
    r->n++;
    return ES_OK;
}

const es_commit_part *es_commit_record_find(const es_commit_record *r, const char *name) {
    for (int i = 0; i < r->n; i++)
        if (!strcmp(r->parts[i].name, name)) return &r->parts[i];
    return NULL;
}

void es_commit_record_free(es_commit_record *r) {
    for (int i = 0; i < r->n; i++) free(r->parts[i].name), free(r->parts[i].data);
    free(r->parts);
    memset(r, 0, sizeof *r);
}

int es_h5_sync(es_h5file *file, es_error *err) {
    int rc = es_h5_flush(file, err);
    if (rc) return rc;
    int fd = open(file->open_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: %s", file->open_path, strerror(errno));
    if (fsync(fd) != 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: fsync: %s", file->open_path, strerror(errno));
    close(fd);
    return rc;
}

/* ---- the record's bytes: magic, then per part [u32 name length][name][u64 size][data] ---- */

static uint8_t *serialise(const es_commit_record *r, size_t *size) {
    size_t total = sizeof RECORD_MAGIC;
    for (int i = 0; i < r->n; i++) total += 4 + strlen(r->parts[i].name) + 8 + r->parts[i].size;
    uint8_t *out = malloc(total), *at = out;
    if (!out) return NULL;
    memcpy(at, RECORD_MAGIC, sizeof RECORD_MAGIC), at += sizeof RECORD_MAGIC;
    for (int i = 0; i < r->n; i++) {
        uint32_t len = (uint32_t)strlen(r->parts[i].name);
        uint64_t n = r->parts[i].size;
        memcpy(at, &len, 4), at += 4;
        memcpy(at, r->parts[i].name, len), at += len;
        memcpy(at, &n, 8), at += 8;
        memcpy(at, r->parts[i].data, n), at += n;
    }
    *size = total;
    return out;
}

static int parse(const uint8_t *in, size_t size, es_commit_record *r, es_error *err) {
    if (size < sizeof RECORD_MAGIC || memcmp(in, RECORD_MAGIC, sizeof RECORD_MAGIC)) return -1;
    size_t at = sizeof RECORD_MAGIC;
    while (at < size) {
        uint32_t len;
        uint64_t n;
        if (size - at < 4) return -1;
        memcpy(&len, in + at, 4), at += 4;
        if (size - at < (size_t)len + 8 || len > 4096) return -1;
        char name[4097];
        memcpy(name, in + at, len), name[len] = '\0', at += len;
        memcpy(&n, in + at, 8), at += 8;
        if (size - at < n) return -1;
        if (es_commit_record_add(r, name, in + at, (size_t)n, err)) return -2;
        at += (size_t)n;
    }
    return 0;
}

static int read_commit_number(hid_t file, int64_t *number, es_error *err) {
    *number = 0;
    htri_t exists = H5Aexists(file, "commit");
    if (exists < 0) return es_fail(err, ES_ERR_DATA, "%s: cannot read the root attributes", es_h5_filename(file));
    return exists ? es_h5_attr_get_i64(file, "commit", number, err) : ES_OK;
}

static herr_t collect_name(hid_t group, const char *name, const H5L_info_t *info, void *data) {
    (void)group, (void)info;
    char ***names = data;
    size_t n = 0;
    while ((*names)[n]) n++;
    char **grown = realloc(*names, (n + 2) * sizeof *grown);
    if (!grown) return -1;
    grown[n] = strdup(name), grown[n + 1] = NULL;
    *names = grown;
    return grown[n] ? 0 : -1;
}

/* Deletes every record in the group but `keep` (NULL: all). */
static int delete_records(hid_t file, const char *keep, es_error *err) {
    if (H5Lexists(file, RECORD_GROUP, H5P_DEFAULT) <= 0) return ES_OK;
    char **names = calloc(1, sizeof *names);
    if (!names) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = H5Literate_by_name(file, RECORD_GROUP, H5_INDEX_NAME, H5_ITER_INC, NULL, collect_name, &names, H5P_DEFAULT) < 0
                 ? es_fail(err, ES_ERR_RUNTIME, "%s: cannot list %s", es_h5_filename(file), RECORD_GROUP)
                 : ES_OK;
    for (size_t i = 0; names[i]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", RECORD_GROUP, names[i]);
        if (!rc && (!keep || strcmp(path, keep)) && H5Ldelete(file, path, H5P_DEFAULT) < 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot delete %s: %s", es_h5_filename(file), path, es_h5_last_error());
        free(names[i]);
    }
    free(names);
    return rc;
}

static int write_record(hid_t file, const char *path, const es_commit_record *record, es_error *err) {
    size_t plain_size = 0;
    uint8_t *plain = serialise(record, &plain_size);
    size_t bound = ZSTD_compressBound(plain_size);
    uint8_t *packed = plain ? malloc(bound) : NULL;
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    int rc = plain && packed && cctx ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    size_t packed_size = 0;
    if (!rc) {
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 1);
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1); /* a torn record is found, not trusted */
        packed_size = ZSTD_compress2(cctx, packed, bound, plain, plain_size);
        if (ZSTD_isError(packed_size)) rc = es_fail(err, ES_ERR_RUNTIME, "commit record: zstd: %s", ZSTD_getErrorName(packed_size));
    }
    hid_t group = rc ? -1 : es_h5_group(file, RECORD_GROUP, err);
    if (!rc && group < 0) rc = err ? err->code : ES_ERR_RUNTIME;
    if (!rc) {
        hsize_t dims = (hsize_t)packed_size;
        hid_t space = H5Screate_simple(1, &dims, NULL);
        hid_t dataset = space < 0 ? -1 : H5Dcreate2(file, path, H5T_STD_U8LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (dataset < 0 || H5Dwrite(dataset, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, packed) < 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write the commit record %s: %s", es_h5_filename(file), path, es_h5_last_error());
        if (dataset >= 0) H5Dclose(dataset);
        if (space >= 0) H5Sclose(space);
    }
    if (group >= 0) H5Gclose(group);
    ZSTD_freeCCtx(cctx);
    free(plain), free(packed);
    return rc;
}

int es_h5_commit_point(es_h5file *file, const es_commit_record *record, const es_commit_mark *marks, int n_marks,
                       es_error *err) {
    int64_t number = 0;
    int rc = read_commit_number(file->id, &number, err);
    char path[128];
    snprintf(path, sizeof path, "%s/record_%lld", RECORD_GROUP, (long long)(number + 1));
    /* 1. Chunks and record on disk; 2. the mark that points at them; 3. the old records go. */
    if (!rc && H5Lexists(file->id, path, H5P_DEFAULT) > 0 && H5Ldelete(file->id, path, H5P_DEFAULT) < 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot replace %s", file->open_path, path); /* left by a killed run */
    if (!rc) rc = write_record(file->id, path, record, err);
    if (!rc) rc = es_h5_sync(file, err);
    for (int i = 0; !rc && i < n_marks; i++) rc = es_h5_attr_set_i64(file->id, marks[i].name, marks[i].value, err);
    if (!rc) rc = es_h5_attr_set_i64(file->id, "commit", number + 1, err);
    if (!rc) rc = es_h5_sync(file, err);
    if (!rc) rc = delete_records(file->id, path, err);
    return rc;
}

int es_h5_read_commit(es_h5file *file, es_commit_record *record, int *found, es_error *err) {
    memset(record, 0, sizeof *record);
    *found = 0;
    int64_t number = 0;
    int rc = read_commit_number(file->id, &number, err);
    if (rc || number == 0) return rc;
    *found = 1;
    char path[128];
    snprintf(path, sizeof path, "%s/record_%lld", RECORD_GROUP, (long long)number);
    hid_t dataset = H5Lexists(file->id, path, H5P_DEFAULT) > 0 ? H5Dopen2(file->id, path, H5P_DEFAULT) : -1;
    hid_t space = dataset >= 0 ? H5Dget_space(dataset) : -1;
    hssize_t n = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    uint8_t *packed = n > 0 ? malloc((size_t)n) : NULL;
    const char *why = NULL;
    char detail[160] = "";
    if (dataset < 0) why = "it is missing";
    else if (!packed || H5Dread(dataset, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, packed) < 0) why = "it cannot be read";
    unsigned long long plain_size = why ? 0 : ZSTD_getFrameContentSize(packed, (size_t)n);
    uint8_t *plain = NULL;
    if (!why && (plain_size == ZSTD_CONTENTSIZE_ERROR || plain_size == ZSTD_CONTENTSIZE_UNKNOWN || plain_size > ((size_t)1 << 34)))
        why = "it is not a zstd frame";
    if (!why && !(plain = malloc(plain_size ? (size_t)plain_size : 1))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!why && !rc) {
        size_t got = ZSTD_decompress(plain, (size_t)plain_size, packed, (size_t)n);
        if (ZSTD_isError(got)) snprintf(detail, sizeof detail, "zstd: %s", ZSTD_getErrorName(got)), why = detail;
        else if (got != plain_size) why = "it is truncated";
        else {
            int parsed = parse(plain, got, record, err);
            if (parsed == -2) rc = err->code;
            else if (parsed < 0) why = "its contents are malformed";
        }
    }
    if (why && !rc)
        rc = es_fail(err, ES_ERR_DATA, "%s: the record of commit %lld (%s) is damaged: %s", file->open_path, (long long)number, path, why);
    if (rc) es_commit_record_free(record);
    free(plain), free(packed);
    if (space >= 0) H5Sclose(space);
    if (dataset >= 0) H5Dclose(dataset);
    return rc;
}

int es_h5_drop_commits(es_h5file *file, const char *const *mark_names, es_error *err) {
    int rc = delete_records(file->id, NULL, err);
    if (!rc && H5Lexists(file->id, RECORD_GROUP, H5P_DEFAULT) > 0 && H5Ldelete(file->id, RECORD_GROUP, H5P_DEFAULT) < 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot delete %s", file->open_path, RECORD_GROUP);
    for (int i = -1; !rc && (i < 0 || (mark_names && mark_names[i])); i++) {
        const char *name = i < 0 ? "commit" : mark_names[i];
        if (H5Aexists(file->id, name) > 0 && H5Adelete(file->id, name) < 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove the commit mark %s", file->open_path, name);
    }
    return rc;
}

int es_h5_check_partial(const char *path, const char *key, es_partial_state *state, es_error *err) {
    *state = ES_PARTIAL_ABSENT;
    int rc = es_h5_init(err);
    if (rc) return rc;
    char partial[4200];
    snprintf(partial, sizeof partial, "%s.partial", path);
    struct stat st;
    if (stat(partial, &st) != 0) return ES_OK;
    hid_t file = H5Fis_hdf5(partial) > 0 ? H5Fopen(partial, H5F_ACC_RDONLY, H5P_DEFAULT) : -1;
    if (file < 0) return es_fail(err, ES_ERR_DATA, "%s: not a readable HDF5 file (it was cut short before its first commit?)", partial);
    int64_t number = 0;
    rc = read_commit_number(file, &number, err);
    int finished = !rc && H5Aexists(file, "created") > 0;
    if (!rc && (number > 0 || finished)) {
        *state = finished ? ES_PARTIAL_FINISHED : ES_PARTIAL_COMMITTED;
        char *stored = NULL;
        es_error ignored = {0};
        if (H5Aexists(file, "resume_key") > 0) es_h5_attr_get_str(file, "resume_key", &stored, &ignored);
        rc = es_resume_key_compare(stored, key, partial, err);
        free(stored);
    } else if (!rc) {
        *state = ES_PARTIAL_UNCOMMITTED;
    }
    H5Fclose(file);
    return rc;
}

int es_h5_finish_partial(const char *path, const char *const *mark_names, es_error *err) {
    es_h5file file;
    int rc = es_h5_open_partial(&file, path, err);
    if (rc) return rc;
    rc = es_h5_drop_commits(&file, mark_names, err);
    if (rc) {
        es_h5_close(&file, 0);
        return rc;
    }
    return es_h5_commit(&file, err);
}

int es_h5_resume_partial(const char *path, const char *key, es_partial_state *state, es_error *err) {
    *state = ES_PARTIAL_ABSENT;
    int checked = es_h5_check_partial(path, key, state, err);
    if (checked == ES_ERR_DATA) {
        es_warn("cannot resume %s.partial (%s): starting again", path, err->msg);
        es_error_clear(err);
        *state = ES_PARTIAL_ABSENT;
        return ES_OK;
    }
    if (checked) return checked;
    if (*state == ES_PARTIAL_ABSENT) {
        es_log("--resume: there is no %s.partial: starting from the first sample", path);
    } else if (*state == ES_PARTIAL_UNCOMMITTED) {
        es_log("--resume: %s.partial has no committed sample yet: starting from the first sample", path);
    } else if (*state == ES_PARTIAL_FINISHED) { /* stopped between its last write and its rename */
        static const char *const marks[] = {"committed_samples", "committed_tokens", NULL};
        int rc = es_h5_finish_partial(path, marks, err);
        if (rc) return rc;
        es_log("--resume: %s.partial was complete, stopped before its rename: wrote %s", path, path);
    }
    return ES_OK;
}
