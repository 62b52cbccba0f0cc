#include "h5file.h"

#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
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

void es_h5_quiet_thread(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

int es_h5_init(es_error *err) {
    es_h5_quiet_thread();
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
    } else if (!(rc = es_h5_check_heap(file->open_path, partial, err))) {
        /* a .partial's rows past its commit may name heap space never written: only attributes */
        file->id = H5Fopen(file->open_path, partial ? H5F_ACC_RDWR : H5F_ACC_RDONLY, H5P_DEFAULT);
        const char *why = file->id < 0 ? es_h5_last_error() : NULL;
        const char *stored_eof = why && strstr(why, "truncated file") ? strstr(why, "stored_eof = ") : NULL;
        if (stored_eof)
            rc = es_fail(err, ES_ERR_DATA, "%s: truncated: the file has %lld bytes, its superblock says %lld (cut short by an "
                         "interrupted copy or a full disk? copy or write it again)", file->open_path, (long long)st.st_size,
                         atoll(stored_eof + strlen("stored_eof = ")));
        else if (why)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot open: %s", file->open_path, why);
    }
    if (rc) {
        free_paths(file);
        return rc;
    }
    file->writable = partial;
    return ES_OK;
}

int es_h5_open_partial(es_h5file *file, const char *path, es_error *err) {
    int rc = open_existing(file, path, 1, err);
    /* A run killed inside a flush can leave metadata on disk that points at space allocated after
     * the superblock's end-of-allocation was last written (HDF5 then refuses to read it: "addr
     * overflow"). The bytes are there: take everything up to the end of the file as allocated
     * (for a file not cut short that way, the same value). */
    if (!rc && H5Fincrement_filesize(file->id, 0) < 0) {
        rc = es_fail(err, ES_ERR_DATA, "%s: cannot take up its written space: %s", file->open_path, es_h5_last_error());
        es_h5_close(file, 0);
    }
    return rc;
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

/* The attribute `name`, opened (caller closes), holding a single value (scalar or one
 * element); *cls is its type's class. Missing or not single: ES_ERR_DATA naming it. */
static hid_t open_single_attr(hid_t obj, const char *name, const char *want, H5T_class_t *cls, es_error *err) {
    if (H5Aexists(obj, name) <= 0) {
        es_fail(err, ES_ERR_DATA, "%s: attribute %s is missing", es_h5_filename(obj), name);
        return -1;
    }
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t type = attr < 0 ? -1 : H5Aget_type(attr);
    hid_t space = attr < 0 ? -1 : H5Aget_space(attr);
    hssize_t points = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    char type_name[64] = "an unreadable type";
    if (type >= 0) es_h5_type_name(type, type_name, sizeof type_name);
    *cls = type >= 0 ? H5Tget_class(type) : H5T_NO_CLASS;
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (attr < 0 || type < 0 || points != 1) {
        if (attr >= 0) H5Aclose(attr);
        if (attr < 0 || type < 0)
            es_fail(err, ES_ERR_DATA, "%s: attribute %s cannot be read: %s", es_h5_filename(obj), name, es_h5_last_error());
        else
            es_fail(err, ES_ERR_DATA, "%s: attribute %s holds %lld values of %s, expected a single %s", es_h5_filename(obj), name,
                    (long long)points, type_name, want);
        return -1;
    }
    return attr;
}

/* Reads a single numeric attribute into mem_type through HDF5's conversion, checked (see
 * es_h5_conversion). H5Aread takes no transfer list, so the stored bytes are read as they are
 * and converted with H5Tconvert. */
static int read_attr_number(hid_t obj, const char *name, hid_t attr, hid_t mem_type, void *value, es_error *err) {
    hid_t file_type = H5Aget_type(attr);
    hid_t from = file_type < 0 ? -1 : H5Tget_class(file_type) == H5T_ENUM ? H5Tget_super(file_type) : H5Tcopy(file_type);
    size_t size = file_type < 0 ? 0 : H5Tget_size(file_type), mem_size = H5Tget_size(mem_type);
    uint8_t *buf = calloc(1, (size > mem_size ? size : mem_size) + 8);
    es_h5_conversion state;
    hid_t xfer = es_h5_conversion_xfer(&state, H5Tget_class(mem_type) == H5T_INTEGER);
    char type_name[64] = "?";
    if (file_type >= 0) es_h5_type_name(file_type, type_name, sizeof type_name);
    int rc = ES_OK;
    if (!buf) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    else if (from < 0 || xfer < 0 || H5Aread(attr, file_type, buf) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s (%s) cannot be read: %s", es_h5_filename(obj), name, type_name,
                     es_h5_last_error());
    else if (H5Tconvert(from, mem_type, 1, buf, NULL, xfer) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s (%s) holds %s", es_h5_filename(obj), name, type_name,
                     state.problem >= 0 ? es_h5_conversion_problem(&state, H5Tget_class(mem_type) == H5T_INTEGER ? "int64" : "float64")
                                        : "a value that cannot be converted to a number");
    else
        memcpy(value, buf, mem_size);
    free(buf);
    if (xfer >= 0) H5Pclose(xfer);
    if (from >= 0) H5Tclose(from);
    if (file_type >= 0) H5Tclose(file_type);
    return rc;
}

static int read_attr_text(hid_t obj, const char *name, hid_t attr, char **value, es_error *err) {
    hid_t file_type = H5Aget_type(attr);
    int rc = ES_OK;
    if (file_type < 0) return es_fail(err, ES_ERR_DATA, "%s: attribute %s cannot be read: %s", es_h5_filename(obj), name, es_h5_last_error());
    if (H5Tis_variable_str(file_type) > 0) {
        hid_t mem_type = H5Tcopy(H5T_C_S1);
        char *text = NULL;
        if (mem_type < 0 || H5Tset_size(mem_type, H5T_VARIABLE) < 0 || H5Tset_cset(mem_type, H5Tget_cset(file_type)) < 0 ||
            H5Aread(attr, mem_type, &text) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s (string (vlen)) cannot be read: %s", es_h5_filename(obj), name,
                         es_h5_last_error());
        else if (!(*value = strdup(text ? text : "")))
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (text) H5free_memory(text);
        if (mem_type >= 0) H5Tclose(mem_type);
    } else {
        /* Fixed-length: read in the stored type itself (no conversion), then cut at the first
         * NUL (null-terminated or null-padded) or drop the padding (space-padded). */
        size_t size = H5Tget_size(file_type);
        char *text = size ? calloc(size + 1, 1) : NULL;
        if (!text) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else if (H5Aread(attr, file_type, text) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s (string[%zu]) cannot be read: %s", es_h5_filename(obj), name, size,
                         es_h5_last_error());
        if (!rc && H5Tget_strpad(file_type) == H5T_STR_SPACEPAD)
            for (size_t len = strlen(text); len > 0 && text[len - 1] == ' '; len--) text[len - 1] = '\0';
        if (rc) free(text);
        else *value = text;
    }
    H5Tclose(file_type);
    return rc;
}

int es_h5_attr_get_str(hid_t obj, const char *name, char **value, es_error *err) {
    *value = NULL;
    H5T_class_t cls;
    hid_t attr = open_single_attr(obj, name, "string", &cls, err);
    if (attr < 0) return err ? err->code : ES_ERR_DATA;
    int rc;
    if (cls != H5T_STRING) {
        char type_name[64] = "?";
        hid_t type = H5Aget_type(attr);
        if (type >= 0) es_h5_type_name(type, type_name, sizeof type_name), H5Tclose(type);
        rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s is %s, expected a string", es_h5_filename(obj), name, type_name);
    } else {
        rc = read_attr_text(obj, name, attr, value, err);
    }
    H5Aclose(attr);
    return rc;
}

/* A string attribute holding a number (surrounding spaces allowed, nothing else). */
static int parse_attr_text(hid_t obj, const char *name, const char *text, int integer, int64_t *i64, double *f64, es_error *err) {
    char *end = NULL;
    errno = 0;
    if (integer) *i64 = strtoll(text, &end, 10);
    else *f64 = strtod(text, &end);
    int digits = end && end != text;
    while (digits && *end == ' ') end++;
    if (!digits || *end || errno == ERANGE)
        return es_fail(err, ES_ERR_DATA, "%s: attribute %s is the string \"%.100s\", not %s", es_h5_filename(obj), name, text,
                       integer ? "an integer (int64)" : "a number");
    return ES_OK;
}

static int get_number(hid_t obj, const char *name, int integer, int64_t *i64, double *f64, es_error *err) {
    H5T_class_t cls;
    hid_t attr = open_single_attr(obj, name, integer ? "integer" : "number", &cls, err);
    if (attr < 0) return err ? err->code : ES_ERR_DATA;
    int rc;
    if (cls == H5T_INTEGER || cls == H5T_FLOAT || cls == H5T_ENUM) {
        rc = integer ? read_attr_number(obj, name, attr, H5T_NATIVE_INT64, i64, err)
                     : read_attr_number(obj, name, attr, H5T_NATIVE_DOUBLE, f64, err);
    } else if (cls == H5T_STRING) {
        char *text = NULL;
        rc = read_attr_text(obj, name, attr, &text, err);
        if (!rc) rc = parse_attr_text(obj, name, text, integer, i64, f64, err);
        free(text);
    } else {
        char type_name[64] = "?";
        hid_t type = H5Aget_type(attr);
        if (type >= 0) es_h5_type_name(type, type_name, sizeof type_name), H5Tclose(type);
        rc = es_fail(err, ES_ERR_DATA, "%s: attribute %s is %s, expected %s", es_h5_filename(obj), name, type_name,
                     integer ? "an integer" : "a number");
    }
    H5Aclose(attr);
    return rc;
}

int es_h5_attr_get_i64(hid_t obj, const char *name, int64_t *value, es_error *err) {
    return get_number(obj, name, 1, value, NULL, err);
}

int es_h5_attr_get_f64(hid_t obj, const char *name, double *value, es_error *err) {
    return get_number(obj, name, 0, NULL, value, err);
}

/* ---- reading datasets written by any tool ---------------------------------------------- */

void es_h5_type_name(hid_t type, char *buf, size_t size) {
    H5T_class_t cls = H5Tget_class(type);
    size_t bytes = H5Tget_size(type);
    const char *order = (cls == H5T_INTEGER || cls == H5T_FLOAT) && H5Tget_order(type) == H5T_ORDER_BE ? " big-endian" : "";
    size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
    switch (cls) {
    case H5T_STRING:
        if (H5Tis_variable_str(type) > 0) snprintf(buf, size, "string (vlen)");
        else snprintf(buf, size, "string[%zu]", bytes);
        return;
    case H5T_FLOAT:
        H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize);
        if (bytes == 2 && spos == 15 && epos == 7 && esize == 8 && mpos == 0 && msize == 7) snprintf(buf, size, "bf16%s", order);
        else snprintf(buf, size, "float%zu%s", bytes * 8, order);
        return;
    case H5T_INTEGER:
        snprintf(buf, size, "%sint%zu%s", H5Tget_sign(type) == H5T_SGN_NONE ? "u" : "", bytes * 8, order);
        return;
    case H5T_ENUM: {
        hid_t base = H5Tget_super(type);
        char base_name[48] = "?";
        if (base >= 0) es_h5_type_name(base, base_name, sizeof base_name), H5Tclose(base);
        snprintf(buf, size, "enum of %s", base_name);
        return;
    }
    case H5T_COMPOUND: snprintf(buf, size, "compound (%zu bytes)", bytes); return;
    case H5T_VLEN: snprintf(buf, size, "vlen"); return;
    case H5T_ARRAY: snprintf(buf, size, "array (%zu bytes)", bytes); return;
    case H5T_OPAQUE: snprintf(buf, size, "opaque (%zu bytes)", bytes); return;
    case H5T_BITFIELD: snprintf(buf, size, "bitfield%zu", bytes * 8); return;
    case H5T_REFERENCE: snprintf(buf, size, "reference"); return;
    default: snprintf(buf, size, "class %d, %zu bytes", (int)cls, bytes); return;
    }
}

/* Names of the registered filters a reader is likely to meet (the HDF Group's list). */
static const char *known_filter_name(H5Z_filter_t id) {
    switch (id) {
    case H5Z_FILTER_DEFLATE: return "deflate (gzip)";
    case H5Z_FILTER_SHUFFLE: return "shuffle";
    case H5Z_FILTER_FLETCHER32: return "fletcher32";
    case H5Z_FILTER_SZIP: return "szip";
    case H5Z_FILTER_NBIT: return "nbit";
    case H5Z_FILTER_SCALEOFFSET: return "scaleoffset";
    case 307: return "bzip2";
    case 32000: return "LZF";
    case 32001: return "Blosc";
    case 32004: return "LZ4";
    case 32008: return "Bitshuffle";
    case 32013: return "ZFP";
    case 32015: return "Zstandard";
    case 32017: return "SZ";
    case 32018: return "FCIDECOMP";
    case 32024: return "SZ3";
    case 32026: return "Blosc2";
    default: return NULL;
    }
}

int es_h5_check_filters(hid_t dataset, const char *name, es_error *err) {
    hid_t dcpl = H5Dget_create_plist(dataset);
    if (dcpl < 0) return es_fail(err, ES_ERR_DATA, "%s: cannot read its creation properties: %s", name, es_h5_last_error());
    int n = H5Pget_nfilters(dcpl), rc = ES_OK;
    if (n < 0) rc = es_fail(err, ES_ERR_DATA, "%s: cannot read its filter pipeline: %s", name, es_h5_last_error());
    for (int i = 0; !rc && i < n; i++) {
        unsigned flags = 0, cd[16], config = 0;
        size_t n_cd = 16;
        char stored_name[128] = "";
        H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &n_cd, cd, sizeof stored_name, stored_name, &config);
        if (id < 0) {
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read filter %d of its pipeline: %s", name, i, es_h5_last_error());
            break;
        }
        const char *label = known_filter_name(id);
        if (!label) label = stored_name[0] ? stored_name : "not a registered filter id";
        /* H5Zfilter_avail also loads the filter from HDF5_PLUGIN_PATH when it can. */
        unsigned info = 0;
        if (H5Zfilter_avail(id) <= 0)
            rc = es_fail(err, ES_ERR_DATA,
                         "%s: stored with HDF5 filter %d (%s), which is not available here: set HDF5_PLUGIN_PATH to a "
                         "folder holding its plugin (hdf5plugin's: python -c \"import hdf5plugin; print(hdf5plugin.PLUGIN_PATH)\")",
                         name, (int)id, label);
        else if (H5Zget_filter_info(id, &info) >= 0 && !(info & H5Z_FILTER_CONFIG_DECODE_ENABLED))
            rc = es_fail(err, ES_ERR_DATA, "%s: stored with HDF5 filter %d (%s), which this HDF5 can encode but not decode", name,
                         (int)id, label);
    }
    H5Pclose(dcpl);
    return rc;
}

static H5T_conv_ret_t conversion_check(H5T_conv_except_t problem, hid_t src, hid_t dst, void *src_buf, void *dst_buf,
                                       void *data) {
    (void)src, (void)dst, (void)src_buf, (void)dst_buf;
    es_h5_conversion *state = data;
    if (!state->to_integer) return H5T_CONV_UNHANDLED; /* floats: HDF5's rounding and infinities */
    if (state->problem < 0) state->problem = (int)problem;
    return H5T_CONV_ABORT;
}

hid_t es_h5_conversion_xfer(es_h5_conversion *state, int to_integer) {
    state->to_integer = to_integer;
    state->problem = -1;
    hid_t xfer = H5Pcreate(H5P_DATASET_XFER);
    if (xfer >= 0 && H5Pset_type_conv_cb(xfer, conversion_check, state) < 0) {
        H5Pclose(xfer);
        return -1;
    }
    return xfer;
}

const char *es_h5_conversion_problem(const es_h5_conversion *state, const char *target_name) {
    static __thread char text[128];
    switch (state->problem) {
    case H5T_CONV_EXCEPT_RANGE_HI: snprintf(text, sizeof text, "a value above the range of %s", target_name); break;
    case H5T_CONV_EXCEPT_RANGE_LOW: snprintf(text, sizeof text, "a value below the range of %s", target_name); break;
    case H5T_CONV_EXCEPT_TRUNCATE: snprintf(text, sizeof text, "a value that is not an integer (a fraction or NaN)"); break;
    case H5T_CONV_EXCEPT_PRECISION: snprintf(text, sizeof text, "a value %s cannot hold exactly", target_name); break;
    case H5T_CONV_EXCEPT_PINF: case H5T_CONV_EXCEPT_NINF: snprintf(text, sizeof text, "an infinite value"); break;
    case H5T_CONV_EXCEPT_NAN: snprintf(text, sizeof text, "NaN"); break;
    default: snprintf(text, sizeof text, "a value that cannot be converted to %s", target_name); break;
    }
    return text;
}

/* The blocks HDF5 allocates for variable-length strings during one read, kept track of here. */
typedef struct {
    void **blocks;
    size_t n, cap;
} string_allocations;

static void *allocate_string(size_t size, void *data) {
    string_allocations *made = data;
    if (made->n == made->cap) {
        size_t cap = made->cap ? 2 * made->cap : 64;
        void **grown = realloc(made->blocks, cap * sizeof *grown);
        if (!grown) return NULL;
        made->blocks = grown, made->cap = cap;
    }
    void *block = malloc(size ? size : 1);
    if (block) made->blocks[made->n++] = block;
    return block;
}

static void free_string(void *block, void *data) {
    string_allocations *made = data;
    for (size_t i = made->n; block && i-- > 0;)
        if (made->blocks[i] == block) {
            made->blocks[i] = made->blocks[--made->n];
            break;
        }
    free(block);
}

int es_h5_read_strings(hid_t dataset, const char *name, int64_t first, int64_t n, char **out, es_error *err) {
    for (int64_t i = 0; i < n; i++) out[i] = NULL;
    hid_t type = H5Dget_type(dataset), space = H5Dget_space(dataset);
    hsize_t dims[1] = {0};
    int rank = space >= 0 ? H5Sget_simple_extent_ndims(space) : -1;
    if (rank == 1) H5Sget_simple_extent_dims(space, dims, NULL);
    char type_name[64] = "an unreadable type";
    if (type >= 0) es_h5_type_name(type, type_name, sizeof type_name);
    int rc = ES_OK;
    if (type < 0 || H5Tget_class(type) != H5T_STRING)
        rc = es_fail(err, ES_ERR_DATA, "%s: holds %s, expected strings", name, type_name);
    else if (rank != 1)
        rc = es_fail(err, ES_ERR_DATA, "%s: a %d-D dataset, expected 1-D strings", name, rank);
    else if (first < 0 || n < 0 || (uint64_t)(first + n) > dims[0])
        rc = es_fail(err, ES_ERR_DATA, "%s: strings %lld..%lld requested, the dataset has %llu", name, (long long)first,
                     (long long)(first + n - 1), (unsigned long long)dims[0]);
    if (!rc) rc = es_h5_check_filters(dataset, name, err);
    hsize_t start = (hsize_t)first, count = (hsize_t)n;
    hid_t memory = !rc && n > 0 ? H5Screate_simple(1, &count, NULL) : -1;
    if (!rc && n > 0 && (memory < 0 || H5Sselect_hyperslab(space, H5S_SELECT_SET, &start, NULL, &count, NULL) < 0))
        rc = es_fail(err, ES_ERR_DATA, "%s: cannot select strings %lld..%lld: %s", name, (long long)first,
                     (long long)(first + n - 1), es_h5_last_error());
    if (!rc && n > 0 && H5Tis_variable_str(type) > 0) {
        hid_t mem_type = H5Tcopy(H5T_C_S1), xfer = H5Pcreate(H5P_DATASET_XFER);
        string_allocations made = {0};
        char **raw = calloc((size_t)n, sizeof *raw);
        if (!raw || xfer < 0 || H5Pset_vlen_mem_manager(xfer, allocate_string, &made, free_string, &made) < 0)
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else if (mem_type < 0 || H5Tset_size(mem_type, H5T_VARIABLE) < 0 || H5Tset_cset(mem_type, H5Tget_cset(type)) < 0 ||
                 H5Dread(dataset, mem_type, memory, space, xfer, raw) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read strings %lld..%lld (%s): %s", name, (long long)first,
                         (long long)(first + n - 1), type_name, es_h5_last_error());
        for (int64_t i = 0; !rc && i < n; i++)
            if (!(out[i] = strdup(raw[i] ? raw[i] : ""))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        /* every string HDF5 made, also those of a read that failed halfway (it loses track of them) */
        for (size_t i = 0; i < made.n; i++) free(made.blocks[i]);
        free(made.blocks);
        free(raw);
        if (xfer >= 0) H5Pclose(xfer);
        if (mem_type >= 0) H5Tclose(mem_type);
    } else if (!rc && n > 0) {
        size_t size = H5Tget_size(type);
        if (size > ((size_t)1 << 20)) { /* n copies are read at once: a corrupt size must not allocate gigabytes */
            rc = es_fail(err, ES_ERR_DATA, "%s: fixed-length strings of %zu bytes each, longer than any id (at most 1 MiB)", name, size);
            size = 0;
        }
        int space_padded = H5Tget_strpad(type) == H5T_STR_SPACEPAD;
        char *raw = !rc && size && (size_t)n <= SIZE_MAX / size ? malloc((size_t)n * size) : NULL;
        if (!rc && !raw) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory for %lld strings of %zu bytes", name, (long long)n, size);
        else if (H5Dread(dataset, type, memory, space, H5P_DEFAULT, raw) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read strings %lld..%lld (%s): %s", name, (long long)first,
                         (long long)(first + n - 1), type_name, es_h5_last_error());
        for (int64_t i = 0; !rc && i < n; i++) {
            const char *text = raw + (size_t)i * size;
            size_t len = strnlen(text, size);
            while (space_padded && len > 0 && text[len - 1] == ' ') len--;
            /* not strndup: a full-width string has no NUL inside the element to stop at */
            if (!(out[i] = malloc(len + 1))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            else memcpy(out[i], text, len), out[i][len] = '\0';
        }
        free(raw);
    }
    if (rc)
        for (int64_t i = 0; i < n; i++) free(out[i]), out[i] = NULL;
    if (memory >= 0) H5Sclose(memory);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    return rc;
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
