#include "inspect_safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "safetensors.h"

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

int inspect_safetensors(const char *path, es_error *err) {
    es_weights *w = NULL;
    int rc = es_weights_open(path, &w, err);
    if (rc) return rc;

    /* Two passes: column widths first, so the table lines up however long the names are. */
    int name_w = 0, dtype_w = 0, shape_w = 0;
    char shape[256];
    for (size_t i = 0; i < w->n_tensors; i++) {
        const es_tensor *t = w->tensors[i];
        int n = (int)strlen(t->name), d = (int)strlen(es_dtype_name(t->dtype));
        int s = (int)strlen(es_tensor_shape_str(t, shape, sizeof shape));
        if (n > name_w) name_w = n;
        if (d > dtype_w) dtype_w = d;
        if (s > shape_w) shape_w = s;
    }
    unsigned long long params = 0, bytes = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const es_tensor *t = w->tensors[i];
        printf("%-*s  %-*s  %-*s  %s\n", name_w, t->name, dtype_w, es_dtype_name(t->dtype), shape_w,
               es_tensor_shape_str(t, shape, sizeof shape), base_name(t->file));
        params += es_tensor_numel(t);
        bytes += t->nbytes;
    }
    printf("total: %zu tensors, %llu parameters, %llu bytes in %zu file%s\n", w->n_tensors, params, bytes,
           w->n_files, w->n_files == 1 ? "" : "s");
    es_weights_close(w);
    if (fflush(stdout) != 0 || ferror(stdout))
        return es_fail(err, ES_ERR_RUNTIME, "stdout: write failed: %s", strerror(errno));
    return ES_OK;
}
