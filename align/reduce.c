/* The gradient buckets (align/reduce.h). */
#include "reduce.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tensors closer than this in the arena are one bucket: the gap is padding, zero on every rank. */
enum { BUCKET_GAP_FLOATS = 64 };

/* The layer after whose backward a tensor's gradient is final. */
static int ready_of(const es_named_tensor *t, int run_layers) {
    int layer;
    if (sscanf(t->name, "model.layers.%d.", &layer) == 1) return layer + 1;
    if (!strncmp(t->name, "model.embed_tokens", 18)) return 0;
    return run_layers + 1; /* the final norm and an output head of its own: before the layers */
}

static size_t numel_of(const es_named_tensor *t) { return (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1); }

/* Of the tensors holding element p of the arena, the lowest `ready` (a tied head is the
 * embedding: final only after the embedding's backward); -1 when none holds it. */
static int ready_at(const es_params *params, const float *p, int run_layers) {
    int ready = -1;
    for (int i = 0; i < params->n_tensors; i++) {
        const es_named_tensor *t = &params->tensors[i];
        if (p >= t->data && p < t->data + numel_of(t)) {
            const int r = ready_of(t, run_layers);
            if (ready < 0 || r < ready) ready = r;
        }
    }
    return ready;
}

static int bucket_order(const void *a, const void *b) {
    const grad_bucket *x = a, *y = b;
    if (x->ready != y->ready) return x->ready > y->ready ? -1 : 1;
    return x->grads < y->grads ? -1 : x->grads > y->grads;
}

int grad_reducer_init(grad_reducer *r, const train_model *tm, const es_param_group *groups, int n_groups, align_comm *comm,
                      host_state *host, es_error *err) {
    memset(r, 0, sizeof *r);
    r->comm = comm, r->host = host;
    if (comm->world == 1) return ES_OK;
    const es_params *params = &tm->params;
    const float *arena_end = params->arena + params->arena_floats;
    /* at most one piece per tensor boundary in each group, and one per group outside the arena */
    const size_t most = (size_t)n_groups * (2 * (size_t)params->n_tensors + 1);
    grad_bucket *pieces = calloc(most ? most : 1, sizeof *pieces);
    if (!pieces) return es_fail(err, ES_ERR_RUNTIME, "out of memory for the gradient buckets");
    size_t n = 0;
    for (int g = 0; g < n_groups; g++) {
        const es_param_group *group = &groups[g];
        if (group->params < params->arena || group->params >= arena_end) {
            pieces[n++] = (grad_bucket){group->grads, group->n, tm->run_layers + 1}; /* the heads: final before the layers */
            continue;
        }
        /* cut the group where the tensors under it change */
        for (size_t at = 0; at < group->n;) {
            const float *p = group->params + at;
            size_t end = group->n;
            for (int i = 0; i < params->n_tensors; i++) {
                const es_named_tensor *t = &params->tensors[i];
                const float *stop = t->data + numel_of(t);
                if (p >= t->data && p < stop && (size_t)(stop - group->params) < end) end = (size_t)(stop - group->params);
                if (t->data > p && (size_t)(t->data - group->params) < end) end = (size_t)(t->data - group->params);
            }
            const int ready = ready_at(params, p, tm->run_layers);
            if (ready < 0 || n == most) {
                free(pieces);
                return es_fail(err, ES_ERR_RUNTIME, "a trained range outside the model's tensors (an internal error)");
            }
            pieces[n++] = (grad_bucket){group->grads + at, end - at, ready};
            at = end;
        }
    }
    qsort(pieces, n, sizeof *pieces, bucket_order);
    /* neighbours in the gradient arena that become final together: one bucket */
    const float *grads_begin = tm->grads.arena, *grads_end = tm->grads.arena + tm->grads.arena_floats;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        grad_bucket *last = kept ? &pieces[kept - 1] : NULL;
        const grad_bucket *next = &pieces[i];
        const int in_arena = last && last->grads >= grads_begin && last->grads < grads_end && next->grads >= grads_begin &&
                             next->grads < grads_end;
        if (in_arena && last->ready == next->ready && next->grads >= last->grads + last->n &&
            next->grads <= last->grads + last->n + BUCKET_GAP_FLOATS)
            last->n = (size_t)(next->grads + next->n - last->grads);
        else
            pieces[kept++] = *next;
    }
    r->buckets = pieces, r->n_buckets = (int)kept;
    return ES_OK;
}

/* A bucket summed over the ranks: started on the group or MPI; through the host, at once, on a
 * device without collectives whose memory is not the host's. */
static int start_bucket(grad_reducer *r, const grad_bucket *b, es_error *err) {
    if (r->host->copies && !r->comm->group) return host_state_allreduce_grads(r->host, r->comm, b->grads, b->n, err);
    return comm_start(r->comm, ES_GROUP_ALLREDUCE, b->grads, b->n, 0, err);
}

int grad_reducer_layer_done(void *ctx, int layer, es_error *err) {
    grad_reducer *r = ctx;
    for (; r->started < r->n_buckets && r->buckets[r->started].ready >= layer; r->started++) {
        int rc = start_bucket(r, &r->buckets[r->started], err);
        if (rc) return rc;
    }
    return ES_OK;
}

int grad_reducer_finish(grad_reducer *r, es_error *err) {
    int rc = grad_reducer_layer_done(r, -1, err);
    r->started = 0;
    if (!rc) rc = comm_wait(r->comm, err);
    return rc;
}

void grad_reducer_free(grad_reducer *r) {
    free(r->buckets);
    memset(r, 0, sizeof *r);
}
