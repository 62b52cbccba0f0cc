#include "h5file.h"

#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "h5zstd.h"

static hid_t bf16_type = -1;

static void make_bf16_type(void) {
    hid_t type = H5Tcopy(H5T_IEEE_F32LE);
    /* Narrow the fp32 layout to its top 16 bits: fields first (they must fit the old
     * precision), then precision and size. */
    if (type < 0 || H5Tset_fields(type, 15, 7, 8, 0, 7) < 0 || H5Tset_offset(type, 0) < 0 ||
        H5Tset_precision(type, 16) < 0 || H5Tset_size(type, 2) < 0 || H5Tset_ebias(type, 127) < 0) {
        if (type >= 0) H5Tclose(type);
        return;
    }
    H5Tlock(type);
    bf16_type = type;
}

hid_t es_h5_bf16_type(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, make_bf16_type);
    return bf16_type;
}

int es_h5_init(es_error *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    if (es_h5zstd_register() < 0)
        return es_fail(err, ES_ERR_RUNTIME, "cannot register the zstd HDF5 filter (%d)", ES_H5Z_FILTER_ZSTD);
    if (es_h5_bf16_type() < 0) return es_fail(err, ES_ERR_RUNTIME, "cannot build the HDF5 bf16 type");
    return ES_OK;
}

typedef struct {
    char text[512];
} h5_message;

static herr_t keep_innermost(unsigned n, const H5E_error2_t *entry, void *data) {
    h5_message *message = data;
    if (n != 0 || !entry->desc) return 0;
    /* Failed system calls come as "file write failed: time = ..., errno = 28, error message =
     * 'No space left on device', ...": keep the operation and the system's words. */
    const char *system_words = strstr(entry->desc, "error message = '");
    const char *colon = strchr(entry->desc, ':');
    if (system_words && colon) {
        system_words += strlen("error message = '");
        const char *end = strchr(system_words, '\'');
        snprintf(message->text, sizeof message->text, "%.*s: %.*s", (int)(colon - entry->desc), entry->desc,
                 (int)(end ? end - system_words : 200), system_words);
    } else {
        snprintf(message->text, sizeof message->text, "%s", entry->desc);
    }
    return 0;
}

const char *es_h5_last_error(void) {
    static __thread h5_message message;
    message.text[0] = '\0';
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, keep_innermost, &message);
    if (!message.text[0]) snprintf(message.text, sizeof message.text, "HDF5 error");
    return message.text;
}

const char *es_h5_filename(hid_t obj) {
    static __thread char name[1024];
    if (H5Fget_name(obj, name, sizeof name) < 0) snprintf(name, sizeof name, "?");
    return name;
}

static int set_paths(es_h5file *file, const char *path, int partial, es_error *err) {
    memset(file, 0, sizeof *file);
    file->id = -1;
    file->path = strdup(path);
    if (file->path && asprintf(&file->open_path, partial ? "%s.partial" : "%s", path) < 0) file->open_path = NULL;
    if (!file->path || !file->open_path) {
        free(file->path);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    }
    return ES_OK;
}

static void free_paths(es_h5file *file) {
    free(file->path);
    free(file->open_path);
    file->path = file->open_path = NULL;
}

int es_h5_create(es_h5file *file, const char *path, es_error *err) {
    int rc = es_h5_init(err);
    if (rc || (rc = set_paths(file, path, 1, err))) return rc;
    file->id = H5Fcreate(file->open_path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file->id < 0) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", file->open_path, es_h5_last_error());
        free_paths(file);
        return rc;
    }
    file->writable = 1;
    return ES_OK;
}

static int open_existing(es_h5file *file, const char *path, int partial, es_error *err) {
    int rc = es_h5_init(err);
    if (rc || (rc = set_paths(file, path, partial, err))) return rc;
    struct stat st;
    if (stat(file->open_path, &st) != 0) {
        rc = es_fail(err, ES_ERR_USAGE, "%s: %s", file->open_path, strerror(errno));
    } else if (H5Fis_hdf5(file->open_path) <= 0) {
        rc = es_fail(err, ES_ERR_DATA, "%s: not an HDF5 file (or truncated)", file->open_path);
    } else {
        file->id = H5Fopen(file->open_path, partial ? H5F_ACC_RDWR : H5F_ACC_RDONLY, H5P_DEFAULT);
        if (file->id < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot open: %s", file->open_path, es_h5_last_error());
    }
    if (rc) {
        free_paths(file);
        return rc;
    }
    file->writable = partial;
    return ES_OK;
}

int es_h5_open_partial(es_h5file *file, const char *path, es_error *err) {
    return open_existing(file, path, 1, err);
}

int es_h5_open(es_h5file *file, const char *path, es_error *err) {
    return open_existing(file, path, 0, err);
}

/* HDF5 1.10 crashes at exit (in H5_term_library) on a file whose H5Fclose failed, e.g. when the
 * disk is full. Once that happened, the exit skips HDF5's own handler: what the last commit made
 * durable is on disk already, and the process ends with its status instead of SIGSEGV. */
static void exit_past_hdf5(int status, void *unused) {
    (void)unused;
    fflush(NULL);
    _exit(status);
}

static herr_t close_file(hid_t id) {
    static int guard_installed;
    herr_t status = H5Fclose(id);
    if (status < 0 && !guard_installed) guard_installed = on_exit(exit_past_hdf5, NULL) == 0;
    return status;
}

int es_h5_flush(es_h5file *file, es_error *err) {
    if (H5Fflush(file->id, H5F_SCOPE_GLOBAL) < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: flush failed: %s", file->open_path, es_h5_last_error());
    return ES_OK;
}

static int fsync_file(const char *path, es_error *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: %s", path, strerror(errno));
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    if (rc != 0) return es_fail(err, ES_ERR_RUNTIME, "%s: fsync: %s", path, strerror(saved));
    return ES_OK;
}

int es_h5_commit(es_h5file *file, es_error *err) {
    ssize_t still_open = H5Fget_obj_count(file->id, H5F_OBJ_DATASET | H5F_OBJ_GROUP |
                                                        H5F_OBJ_DATATYPE | H5F_OBJ_ATTR);
    if (still_open != 0) {
        /* A bug of ours, not of the input: HDF5 would keep the file open behind our back. */
        int rc = es_fail(err, ES_ERR_RUNTIME, "%s: %zd objects still open at commit", file->path, still_open);
        es_h5_close(file, 0);
        return rc;
    }
    int rc = es_h5_flush(file, err);
    if (close_file(file->id) < 0 && !rc)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: close failed: %s", file->open_path, es_h5_last_error());
    file->id = -1;
    if (!rc) rc = fsync_file(file->open_path, err);
    if (!rc && rename(file->open_path, file->path) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", file->open_path, file->path,
                     strerror(errno));
    if (!rc) {
        char *copy = strdup(file->path);
        if (!copy) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else {
            rc = es_fsync_folder(dirname(copy), err);
            free(copy);
        }
    }
    free_paths(file);
    return rc;
}

void es_h5_close(es_h5file *file, int remove_partial) {
    if (file->id >= 0) close_file(file->id);
    file->id = -1;
    if (remove_partial && file->writable && file->open_path) unlink(file->open_path);
    free_paths(file);
}

/* ---- attributes ------------------------------------------------------------------- */

static int write_attr(hid_t obj, const char *name, hid_t type, const void *value, es_error *err) {
    if (H5Aexists(obj, name) > 0 && H5Adelete(obj, name) < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot replace attribute %s", es_h5_filename(obj), name);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = space < 0 ? -1 : H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t status = attr < 0 ? -1 : H5Awrite(attr, type, value);
    if (attr >= 0) H5Aclose(attr);
    if (space >= 0) H5Sclose(space);
    if (status < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot write attribute %s: %s", es_h5_filename(obj), name,
                       es_h5_last_error());
    return ES_OK;
}

static hid_t utf8_string_type(void) {
    hid_t type = H5Tcopy(H5T_C_S1);
    if (type >= 0 && (H5Tset_size(type, H5T_VARIABLE) < 0 || H5Tset_cset(type, H5T_CSET_UTF8) < 0)) {
        H5Tclose(type);
        return -1;
    }
    return type;
}

int es_h5_attr_set_str(hid_t obj, const char *name, const char *value, es_error *err) {
    hid_t type = utf8_string_type();
    if (type < 0) return es_fail(err, ES_ERR_RUNTIME, "cannot make an HDF5 string type");
    int rc = write_attr(obj, name, type, &value, err);
    H5Tclose(type);
    return rc;
}

int es_h5_attr_set_i64(hid_t obj, const char *name, int64_t value, es_error *err) {
    return write_attr(obj, name, H5T_STD_I64LE, &value, err);
}

int es_h5_attr_set_f64(hid_t obj, const char *name, double value, es_error *err) {
    return write_attr(obj, name, H5T_IEEE_F64LE, &value, err);
}

static hid_t open_scalar_attr(hid_t obj, const char *name, H5T_class_t want, es_error *err) {
    if (H5Aexists(obj, name) <= 0) {
        es_fail(err, ES_ERR_DATA, "%s: attribute %s is missing", es_h5_filename(obj), name);
        return -1;
    }
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t type = attr < 0 ? -1 : H5Aget_type(attr);
    hid_t space = attr < 0 ? -1 : H5Aget_space(attr);
    int ok = type >= 0 && space >= 0 && H5Tget_class(type) == want && H5Sget_simple_extent_npoints(space) == 1;
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (!ok) {
        if (attr >= 0) H5Aclose(attr);
        es_fail(err, ES_ERR_DATA, "%s: attribute %s is not a single %s", es_h5_filename(obj), name,
                want == H5T_STRING ? "string" : want == H5T_INTEGER ? "integer" : "number");
        return -1;
    }
    return attr;
}

int es_h5_attr_get_str(hid_t obj, const char *name, char **value, es_error *err) {
    *value = NULL;
    hid_t attr = open_scalar_attr(obj, name, H5T_STRING, err);
    if (attr < 0) return err ? err->code : ES_ERR_DATA;
    hid_t file_type = H5Aget_type(attr);
    int rc = ES_OK;
    if (H5Tis_variable_str(file_type) > 0) {
        hid_t mem_type = utf8_string_type();
        char *text = NULL;
        if (mem_type < 0 || H5Aread(attr, mem_type, &text) < 0 || !text)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read attribute %s", es_h5_filename(obj), name);
        else if (!(*value = strdup(text)))
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (text) H5free_memory(text);
        if (mem_type >= 0) H5Tclose(mem_type);
    } else {
        size_t size = H5Tget_size(file_type);
        char *text = calloc(size + 1, 1);
        if (!text) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else if (H5Aread(attr, file_type, text) < 0) {
            free(text);
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read attribute %s", es_h5_filename(obj), name);
        } else
            *value = text;
    }
    H5Tclose(file_type);
    H5Aclose(attr);
    return rc;
}

int es_h5_attr_get_i64(hid_t obj, const char *name, int64_t *value, es_error *err) {
    hid_t attr = open_scalar_attr(obj, name, H5T_INTEGER, err);
    if (attr < 0) return err ? err->code : ES_ERR_DATA;
    herr_t status = H5Aread(attr, H5T_NATIVE_INT64, value);
    H5Aclose(attr);
    if (status < 0) return es_fail(err, ES_ERR_DATA, "%s: cannot read attribute %s", es_h5_filename(obj), name);
    return ES_OK;
}

int es_h5_attr_get_f64(hid_t obj, const char *name, double *value, es_error *err) {
    hid_t attr = open_scalar_attr(obj, name, H5T_FLOAT, err);
    if (attr < 0) return err ? err->code : ES_ERR_DATA;
    herr_t status = H5Aread(attr, H5T_NATIVE_DOUBLE, value);
    H5Aclose(attr);
    if (status < 0) return es_fail(err, ES_ERR_DATA, "%s: cannot read attribute %s", es_h5_filename(obj), name);
    return ES_OK;
}

hid_t es_h5_group(hid_t file, const char *path, es_error *err) {
    char partial[1024];
    if (strlen(path) >= sizeof partial) {
        es_fail(err, ES_ERR_RUNTIME, "group path too long: %s", path);
        return -1;
    }
    /* Walk "/a/b/c" prefix by prefix, creating what is missing. */
    for (const char *p = path + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            size_t len = (size_t)(p - path);
            memcpy(partial, path, len);
            partial[len] = '\0';
            if (len > 1 && H5Lexists(file, partial, H5P_DEFAULT) <= 0) {
                hid_t group = H5Gcreate2(file, partial, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
                if (group < 0) {
                    es_fail(err, ES_ERR_RUNTIME, "%s: cannot create group %s: %s", es_h5_filename(file),
                            partial, es_h5_last_error());
                    return -1;
                }
                H5Gclose(group);
            }
            if (*p == '\0') break;
        }
    }
    hid_t group = H5Gopen2(file, path, H5P_DEFAULT);
    if (group < 0) es_fail(err, ES_ERR_RUNTIME, "%s: cannot open group %s", es_h5_filename(file), path);
    return group;
}
