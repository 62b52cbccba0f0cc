/* The parameter arena (kernels/weights.h). */
#include "weights.h"

#include "ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Each tensor starts on a multiple of ALIGN_FLOATS (256 bytes in fp32, 128 in the bf16 working
 * copy): the products' kernels read their operands with wide loads, and every arena of the same
 * layout (gradients, moments, the working copy) is aligned alike. */
enum { ALIGN_FLOATS = 64 };
static size_t padded(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

/* Points the named table and the per-layer pointers of p into p->arena, in the store's order. */
static int point_tensors(es_params *p, const es_model_store *store, es_error *err) {
    p->tensors = calloc((size_t)store->n_specs + 1, sizeof *p->tensors);
    p->layers = calloc((size_t)store->n_layers + 1, sizeof *p->layers);
    if (!p->tensors || !p->layers) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    p->config = store->config;
    p->n_layers = store->n_layers;
    size_t at = 0;
    for (int i = 0; i < store->n_specs; i++) {
        const es_tensor_spec *spec = &store->specs[i];
        float *data = p->arena + at;
        at += padded(es_tensor_numel(store->found[i]));
        es_named_tensor *named = &p->tensors[p->n_tensors++];
        snprintf(named->name, sizeof named->name, "%s", spec->name);
        named->data = data, named->ndim = spec->ndim;
        named->shape[0] = spec->shape[0], named->shape[1] = spec->shape[1];
        if (spec->layer >= 0) *es_layer_slot(&p->layers[spec->layer], spec->part) = data;
        else if (spec->part == -1) p->embed = data;
        else if (spec->part == -2) p->final_norm = data;
        else p->lm_head = data;
    }
    if (store->lm_head && store->lm_head == store->embed) p->lm_head = p->embed;
    return ES_OK;
}

int es_params_load(es_device *dev, const es_model_store *store, es_params *p, es_error *err) {
    memset(p, 0, sizeof *p);
    size_t total = 0;
    size_t numel = 0;
    for (int i = 0; i < store->n_specs; i++) total += padded(es_tensor_numel(store->found[i])), numel += es_tensor_numel(store->found[i]);
    char what[128];
    snprintf(what, sizeof what, "the %zu parameters of %s", numel, store->dir);
    int rc = es_device_alloc(dev, total * sizeof(float), (void **)&p->arena, what, err);
    if (!rc) p->arena_floats = total, rc = es_device_zero(dev, p->arena, total * sizeof(float), err); /* the padding too */
    if (!rc) rc = point_tensors(p, store, err);
    void **dst = rc ? NULL : malloc((size_t)store->n_specs * sizeof *dst);
    if (!rc && !dst) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < store->n_specs; i++) dst[i] = p->tensors[i].data;
    es_load_job job = {.n = store->n_specs, .src = store->found, .dst = dst, .dtype = ES_DT_F32}; /* master weights */
    if (!rc) rc = es_device_load_begin(dev, &job, err);
    if (!rc) rc = es_device_load_wait(dev, &job, err);
    free(dst);
    if (rc) es_params_free(dev, p);
    return rc;
}

int es_params_alloc_like(es_device *dev, const es_params *like, const char *what, es_params *out, es_error *err) {
    return es_params_alloc_prefix(dev, like, like->arena_floats, what, out, err);
}

int es_params_alloc_prefix(es_device *dev, const es_params *like, size_t floats, const char *what, es_params *out, es_error *err) {
    memset(out, 0, sizeof *out);
    if (floats > like->arena_floats) floats = like->arena_floats;
    int rc = es_device_alloc(dev, floats * sizeof(float), (void **)&out->arena, what, err);
    if (!rc) out->arena_floats = floats;
    if (!rc) rc = es_device_zero(dev, out->arena, floats * sizeof(float), err);
    out->tensors = rc ? NULL : malloc((size_t)like->n_tensors * sizeof *out->tensors + 1);
    out->layers = rc ? NULL : malloc((size_t)like->n_layers * sizeof *out->layers + 1);
    if (!rc && (!out->tensors || !out->layers)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (rc) {
        es_params_free(dev, out);
        return rc;
    }
    out->config = like->config;
    out->n_tensors = like->n_tensors, out->n_layers = like->n_layers;
#define SAME_PLACE(pointer) ((pointer) && (size_t)((const float *)(pointer) - like->arena) < floats ? es_params_at(like, out, (pointer)) : NULL)
    for (int i = 0; i < like->n_tensors; i++) {
        out->tensors[i] = like->tensors[i];
        out->tensors[i].data = SAME_PLACE(like->tensors[i].data);
    }
    for (int l = 0; l < like->n_layers; l++) {
        es_layer_weights source = like->layers[l];
        for (int part = 0; part < ES_LAYER_PARTS; part++)
            *es_layer_slot(&out->layers[l], part) = SAME_PLACE(*es_layer_slot(&source, part));
    }
    out->embed = SAME_PLACE(like->embed), out->final_norm = SAME_PLACE(like->final_norm), out->lm_head = SAME_PLACE(like->lm_head);
#undef SAME_PLACE
    return ES_OK;
}

void es_params_free(es_device *dev, es_params *p) {
    es_device_free(dev, p->arena, p->arena_floats * sizeof(float));
    free(p->tensors), free(p->layers);
    memset(p, 0, sizeof *p);
}

int es_working_create(es_device *dev, const es_params *master, es_working *out, es_error *err) {
    memset(out, 0, sizeof *out);
    out->dtype = dev->weight_dtype, out->n = master->arena_floats, out->n_layers = master->n_layers;
    if (!(out->layers = malloc((size_t)master->n_layers * sizeof *out->layers + 1))) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (dev->weight_dtype == ES_DT_F32) {
        out->arena = master->arena;
        out->embed = master->embed, out->final_norm = master->final_norm, out->lm_head = master->lm_head;
        memcpy(out->layers, master->layers, (size_t)master->n_layers * sizeof *out->layers);
        return ES_OK;
    }
    char what[128];
    snprintf(what, sizeof what, "the working copy (%s) of %zu parameters", es_dtype_name(dev->weight_dtype), master->arena_floats);
    int rc = es_device_alloc(dev, master->arena_floats * es_dtype_size(dev->weight_dtype), &out->arena, what, err);
    if (rc) {
        free(out->layers);
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->owned = 1;
#define WORKING(pointer) ((pointer) ? es_working_at(out, master, (pointer)) : NULL)
    out->embed = WORKING(master->embed), out->final_norm = WORKING(master->final_norm), out->lm_head = WORKING(master->lm_head);
    for (int l = 0; l < master->n_layers; l++) {
        es_layer_weights source = master->layers[l];
        for (int part = 0; part < ES_LAYER_PARTS; part++)
            *es_layer_slot(&out->layers[l], part) = WORKING((const float *)*es_layer_slot(&source, part));
    }
#undef WORKING
    rc = es_working_refresh(dev, master, out, err);
    if (rc) es_working_free(dev, out);
    return rc;
}

int es_working_refresh(es_device *dev, const es_params *master, es_working *working, es_error *err) {
    if (!working->owned) return ES_OK;
    if (es_round_weights(dev, working->arena, master->arena, master->arena_floats)) return es_device_take_error(dev, err);
    return ES_OK;
}

void es_working_free(es_device *dev, es_working *working) {
    if (working->owned) es_device_free(dev, working->arena, working->n * es_dtype_size(working->dtype));
    free(working->layers);
    memset(working, 0, sizeof *working);
}
