/* essence-inspect compare: the root attributes. Files made by the same run at different times
 * differ in `created` (and a stage with other parameters in `config` and `fingerprint`), so
 * these are listed for information and never judged. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "inspect_compare.h"

typedef struct attr_names {
    char **names;
    size_t count, cap;
} attr_names;

static herr_t collect_name(hid_t obj, const char *name, const H5A_info_t *info, void *data) {
    (void)obj, (void)info;
    attr_names *list = data;
    if (list->count == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 32;
        char **bigger = realloc(list->names, cap * sizeof *bigger);
        if (!bigger) return -1;
        list->names = bigger, list->cap = cap;
    }
    if (!(list->names[list->count] = strdup(name))) return -1;
    list->count++;
    return 0;
}

static int by_name(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

static void free_names(attr_names *list) {
    for (size_t i = 0; i < list->count; i++) free(list->names[i]);
    free(list->names);
}

/* The texts of a string attribute (fixed-length ones without their padding), or NULL. */
static char **read_texts(hid_t attr, hid_t type, hid_t space, size_t n) {
    char **texts = calloc(n ? n : 1, sizeof *texts);
    if (!texts) return NULL;
    int ok = 0;
    if (H5Tis_variable_str(type) > 0) {
        hid_t mem = H5Tcopy(H5T_C_S1);
        char **raw = calloc(n ? n : 1, sizeof *raw);
        if (mem >= 0 && raw && H5Tset_size(mem, H5T_VARIABLE) >= 0 && H5Tset_cset(mem, H5Tget_cset(type)) >= 0 &&
            H5Aread(attr, mem, raw) >= 0) {
            ok = 1;
            for (size_t i = 0; i < n; i++) ok = ok && (texts[i] = strdup(raw[i] ? raw[i] : "")) != NULL;
            compare_reclaim(mem, space, raw);
        }
        free(raw);
        if (mem >= 0) H5Tclose(mem);
    } else {
        size_t size = H5Tget_size(type);
        char *raw = calloc(n ? n : 1, size);
        if (raw && H5Aread(attr, type, raw) >= 0) {
            ok = 1;
            for (size_t i = 0; i < n; i++) {
                const char *text = raw + i * size;
                size_t len = size;
                if (H5Tget_strpad(type) == H5T_STR_SPACEPAD) while (len > 0 && text[len - 1] == ' ') len--;
                else len = strnlen(text, size);
                /* not strndup: a full-width string has no NUL inside the element to stop at */
                ok = ok && (texts[i] = malloc(len + 1)) != NULL;
                if (ok) memcpy(texts[i], text, len), texts[i][len] = '\0';
            }
        }
        free(raw);
    }
    if (!ok) {
        for (size_t i = 0; i < n; i++) free(texts[i]);
        free(texts);
        return NULL;
    }
    return texts;
}

static int texts_equal(hid_t x, hid_t tx, hid_t sx, hid_t y, hid_t ty, hid_t sy, size_t n) {
    char **a = read_texts(x, tx, sx, n), **b = read_texts(y, ty, sy, n);
    int equal = a && b;
    for (size_t i = 0; equal && i < n; i++) equal = strcmp(a[i], b[i]) == 0;
    for (size_t i = 0; i < n; i++) {
        if (a) free(a[i]);
        if (b) free(b[i]);
    }
    free(a), free(b);
    return equal;
}

/* Same values: strings by text, any other type only when of the same type and bytes. An
 * attribute that cannot be read counts as differing (this is information, not a verdict). */
static int attribute_equal(hid_t obj_a, hid_t obj_b, const char *name) {
    hid_t x = H5Aopen(obj_a, name, H5P_DEFAULT), y = H5Aopen(obj_b, name, H5P_DEFAULT);
    hid_t tx = x < 0 ? -1 : H5Aget_type(x), ty = y < 0 ? -1 : H5Aget_type(y);
    hid_t sx = x < 0 ? -1 : H5Aget_space(x), sy = y < 0 ? -1 : H5Aget_space(y);
    int equal = 0;
    hssize_t n = sx < 0 ? -1 : H5Sget_simple_extent_npoints(sx);
    if (tx >= 0 && ty >= 0 && n >= 0 && sy >= 0 && n == H5Sget_simple_extent_npoints(sy)) {
        if (H5Tget_class(tx) == H5T_STRING && H5Tget_class(ty) == H5T_STRING) {
            equal = texts_equal(x, tx, sx, y, ty, sy, (size_t)n);
        } else if (H5Tequal(tx, ty) > 0 && H5Tdetect_class(tx, H5T_VLEN) <= 0 && H5Tis_variable_str(tx) <= 0) {
            size_t bytes = (size_t)n * H5Tget_size(tx);
            uint8_t *va = calloc(bytes ? bytes : 1, 1), *vb = calloc(bytes ? bytes : 1, 1);
            equal = va && vb && H5Aread(x, tx, va) >= 0 && H5Aread(y, ty, vb) >= 0 && memcmp(va, vb, bytes) == 0;
            free(va), free(vb);
        }
    }
    if (tx >= 0) H5Tclose(tx);
    if (ty >= 0) H5Tclose(ty);
    if (sx >= 0) H5Sclose(sx);
    if (sy >= 0) H5Sclose(sy);
    if (x >= 0) H5Aclose(x);
    if (y >= 0) H5Aclose(y);
    return equal;
}

static int list_attributes(hid_t obj, const char *path, attr_names *list, es_error *err) {
    memset(list, 0, sizeof *list);
    hsize_t at = 0;
    if (H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, &at, collect_name, list) < 0) {
        free_names(list);
        return es_fail(err, ES_ERR_DATA, "%s: cannot list the root attributes", path);
    }
    if (list->count) qsort(list->names, list->count, sizeof *list->names, by_name); /* whatever order the file keeps */
    return ES_OK;
}

int compare_root_attributes(hid_t a, const char *path_a, hid_t b, const char *path_b, es_error *err) {
    attr_names names_a, names_b;
    int rc = list_attributes(a, path_a, &names_a, err);
    if (rc) return rc;
    if ((rc = list_attributes(b, path_b, &names_b, err))) {
        free_names(&names_a);
        return rc;
    }
    /* Three lists in one pass over the two sorted name lists. */
    char changed[2048] = "", only_a[1024] = "", only_b[1024] = "";
    size_t i = 0, j = 0;
    while (i < names_a.count || j < names_b.count) {
        int order = i == names_a.count ? 1 : j == names_b.count ? -1 : strcmp(names_a.names[i], names_b.names[j]);
        char *list = order < 0 ? only_a : order > 0 ? only_b : changed;
        size_t size = order == 0 ? sizeof changed : sizeof only_a;
        const char *name = order <= 0 ? names_a.names[i] : names_b.names[j];
        if (order != 0 || !attribute_equal(a, b, name)) {
            size_t used = strlen(list);
            snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
        }
        i += order <= 0, j += order >= 0;
    }
    if (!changed[0] && !only_a[0] && !only_b[0]) {
        printf("root attributes: the same\n");
    } else {
        const char *sep = " ";
        printf("root attributes that differ (information, not counted):");
        if (changed[0]) printf("%s%s", sep, changed), sep = "; ";
        if (only_a[0]) printf("%sonly in %s: %s", sep, path_a, only_a), sep = "; ";
        if (only_b[0]) printf("%sonly in %s: %s", sep, path_b, only_b);
        printf("\n");
    }
    free_names(&names_a);
    free_names(&names_b);
    return ES_OK;
}
