/* The layer stream (kernels/stream.h). */
#include "stream.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

typedef struct slot {
    char *arena;                     // (bytes) device memory, weights in dev->weight_dtype
    size_t bytes;
    int layer;                       /* the layer it holds or is bringing in; 0: none */
    int loading, held;
    es_layer_weights weights;        /* into arena */
    const es_tensor *src[ES_LAYER_PARTS];
    void *dst[ES_LAYER_PARTS];
    es_load_job job;
} slot;

struct es_layer_stream {
    es_device *dev;
    const es_model_store *store;
    int last_layer;
    int streaming;                   /* 0: every layer in a slot of its own, for good */
    slot *slots;
    int n_slots;
    es_layer_weights *external;      /* es_stream_resident's */
    int prepared;                    /* es_device_load_prepare was told of the layers */
};

/* A tensor's room in a slot: its elements in the weight format, rounded up to 256 bytes so
 * that every tensor starts aligned for vector loads and tensor-core products. */
static size_t tensor_bytes(const es_tensor *t, size_t element) { return (es_tensor_numel(t) * element + 255) / 256 * 256; }

static size_t layer_bytes(const es_layer_view *view, size_t element) {
    size_t bytes = 0;
    for (int part = 0; part < ES_LAYER_PARTS; part++)
        if (view->part[part]) bytes += tensor_bytes(view->part[part], element);
    return bytes;
}

/* Starts bringing `layer` into s. */
static int begin_load(es_layer_stream *stream, slot *s, int layer, es_error *err) {
    const es_layer_view *view = &stream->store->layers[layer - 1];
    const size_t element = es_dtype_size(stream->dev->weight_dtype);
    int n = 0;
    size_t at = 0;
    memset(&s->weights, 0, sizeof s->weights);
    for (int part = 0; part < ES_LAYER_PARTS; part++) {
        const es_tensor *t = view->part[part];
        if (!t) continue;
        void *dst = s->arena + at;
        at += tensor_bytes(t, element);
        *es_layer_slot(&s->weights, part) = dst;
        s->src[n] = t, s->dst[n] = dst, n++;
    }
    assert(at <= s->bytes);
    s->job = (es_load_job){.n = n, .src = s->src, .dst = s->dst, .dtype = stream->dev->weight_dtype};
    s->layer = layer;
    int rc = es_device_load_begin(stream->dev, &s->job, err);
    s->loading = !rc;
    if (rc) s->layer = 0;
    return rc;
}

static int finish_load(es_layer_stream *stream, slot *s, es_error *err) {
    if (!s->loading) return ES_OK;
    s->loading = 0;
    int rc = es_device_load_wait(stream->dev, &s->job, err);
    if (rc) {
        es_error_prefix(err, "%s: layer %d", stream->store->dir, s->layer);
        s->layer = 0;
    }
    return rc;
}

/* Layers that pass through slots come in again for every batch: the backend may keep them
 * where its copy stream reads them fastest. */
static int prepare_layers(es_layer_stream *stream, es_error *err) {
    size_t n = 0;
    for (int l = 0; l < stream->last_layer; l++)
        for (int part = 0; part < ES_LAYER_PARTS; part++) n += stream->store->layers[l].part[part] != NULL;
    const es_tensor **tensors = malloc(n * sizeof *tensors + 1);
    if (!tensors) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    n = 0;
    for (int l = 0; l < stream->last_layer; l++)
        for (int part = 0; part < ES_LAYER_PARTS; part++)
            if (stream->store->layers[l].part[part]) tensors[n++] = stream->store->layers[l].part[part];
    int rc = es_device_load_prepare(stream->dev, tensors, (int)n, stream->dev->weight_dtype, err);
    free(tensors);
    stream->prepared = !rc;
    return rc;
}

int es_stream_open(es_layer_stream **out, es_device *dev, const es_model_store *store, int last_layer, es_error *err) {
    *out = NULL;
    assert(last_layer >= 0 && last_layer <= store->n_layers);
    es_layer_stream *stream = calloc(1, sizeof *stream);
    if (!stream) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    stream->dev = dev, stream->store = store, stream->last_layer = last_layer;
    const size_t element = es_dtype_size(dev->weight_dtype);
    size_t largest = 0, total = 0;
    for (int l = 0; l < last_layer; l++) {
        const size_t bytes = layer_bytes(&store->layers[l], element);
        largest = bytes > largest ? bytes : largest;
        total += bytes;
    }
    const size_t left = dev->max_memory > dev->used ? dev->max_memory - dev->used : 0;
    char need[32], one[32], room[32];
    es_format_size(total, need, sizeof need);
    es_format_size(largest, one, sizeof one);
    es_format_size(left, room, sizeof room);
    if (total <= left) stream->n_slots = last_layer;
    else if (2 * largest <= left) stream->n_slots = 2, stream->streaming = 1;
    else if (largest <= left) stream->n_slots = 1, stream->streaming = 1;
    else {
        free(stream);
        return es_fail(err, ES_ERR_RUNTIME, "%s: one decoder layer needs %s, and %s is left of --max-memory after the activations",
                       store->dir, one, room);
    }
    stream->slots = calloc((size_t)stream->n_slots + 1, sizeof *stream->slots);
    int rc = stream->slots ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < stream->n_slots; i++) {
        slot *s = &stream->slots[i];
        s->bytes = stream->streaming ? largest : layer_bytes(&store->layers[i], element);
        rc = es_device_alloc(dev, s->bytes, (void **)&s->arena, "a decoder layer's weights", err);
        /* resident: every layer starts coming in now, in order */
        if (!rc && !stream->streaming) rc = begin_load(stream, s, i + 1, err);
    }
    if (!rc && stream->streaming) rc = prepare_layers(stream, err);
    if (!rc && stream->streaming) rc = begin_load(stream, &stream->slots[0], 1, err);
    if (rc) {
        es_stream_close(stream);
        return rc;
    }
    if (stream->streaming)
        es_log("layers 1..%d need %s, %s is left of --max-memory: they pass through %d slot%s of %s", last_layer, need, room,
               stream->n_slots, stream->n_slots > 1 ? "s" : "", one);
    *out = stream;
    return ES_OK;
}

int es_stream_resident(es_layer_stream **out, es_layer_weights *layers, int n_layers, es_error *err) {
    es_layer_stream *stream = calloc(1, sizeof *stream);
    if (!stream) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    stream->external = layers, stream->last_layer = n_layers;
    *out = stream;
    return ES_OK;
}

void es_stream_close(es_layer_stream *stream) {
    if (!stream) return;
    for (int i = 0; i < stream->n_slots && stream->slots; i++) {
        slot *s = &stream->slots[i];
        es_error ignored = {0};
        finish_load(stream, s, &ignored); /* the copy stream must be done with the memory */
        es_device_free(stream->dev, s->arena, s->bytes);
    }
    if (stream->prepared) es_device_load_forget(stream->dev);
    free(stream->slots);
    free(stream);
}

int es_stream_acquire(es_layer_stream *stream, int layer, const es_layer_weights **weights, es_error *err) {
    assert(layer >= 1 && layer <= stream->last_layer);
    if (stream->external) {
        *weights = &stream->external[layer - 1];
        return ES_OK;
    }
    if (!stream->streaming) {
        slot *s = &stream->slots[layer - 1];
        int rc = finish_load(stream, s, err);
        if (!rc) *weights = &s->weights, s->held = 1;
        return rc;
    }
    slot *s = NULL, *other = NULL;
    for (int i = 0; i < stream->n_slots; i++)
        if (stream->slots[i].layer == layer) s = &stream->slots[i];
    for (int i = 0; i < stream->n_slots && !s; i++)
        if (!stream->slots[i].held) s = &stream->slots[i];
    assert(s && !s->held);
    int rc = ES_OK;
    if (s->layer != layer) {
        if ((rc = finish_load(stream, s, err))) return rc; /* a prefetch that was not wanted */
        rc = begin_load(stream, s, layer, err);
    }
    if (!rc) rc = finish_load(stream, s, err);
    if (rc) return rc;
    s->held = 1;
    *weights = &s->weights;
    /* the next layer (after the last: the first, for the next batch) into the other slot */
    for (int i = 0; i < stream->n_slots; i++)
        if (&stream->slots[i] != s) other = &stream->slots[i];
    const int next = layer % stream->last_layer + 1;
    if (other && !other->held && other->layer != next && next != layer) {
        if (!(rc = finish_load(stream, other, err))) rc = begin_load(stream, other, next, err);
    }
    return rc;
}

void es_stream_release(es_layer_stream *stream, int layer) {
    for (int i = 0; i < stream->n_slots; i++)
        if (stream->slots[i].layer == layer) stream->slots[i].held = 0;
}

int es_stream_slots(const es_layer_stream *stream) { return stream->streaming ? stream->n_slots : 0; }
