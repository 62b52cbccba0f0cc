/* The gradient buckets and ZeRO-1's shards (align/reduce.h). */
#include "reduce.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "weights.h"

/* Tensors closer than this in the arena are one bucket: the gap is padding, zero on every rank.
 * A shard's buckets start this many floats apart too (aligned for the device's vector loads). */
enum { BUCKET_GAP_FLOATS = 64 };
/* The most floats of another rank's moments on their way to rank 0 at once (grad_reducer_gather). */
enum { STAGING_FLOATS = 1 << 20 };

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

/* Whether a tensor of the arena starts in [begin, end) (a gap holding one is not padding). */
static int tensor_in(const es_params *params, const float *begin, const float *end) {
    for (int i = 0; i < params->n_tensors; i++)
        if (params->tensors[i].data >= begin && params->tensors[i].data < end) return 1;
    return 0;
}

static int bucket_order(const void *a, const void *b) {
    const grad_bucket *x = a, *y = b;
    if (x->ready != y->ready) return x->ready > y->ready ? -1 : 1;
    return x->range.grads < y->range.grads ? -1 : x->range.grads > y->range.grads;
}

/* The piece [at, at + n) of a group. */
static grad_bucket piece_of(const es_param_group *group, const train_model *tm, size_t at, size_t n, int ready) {
    es_param_group range = {group->params + at, group->grads + at, group->m + at, group->v + at, n, NULL};
    if (group->working) range.working = es_working_at(&tm->working, &tm->params, range.params);
    return (grad_bucket){range, ready};
}

/* The trained ranges cut where the tensors under them change, ordered, neighbours merged. */
static int cut_buckets(grad_reducer *r, const train_model *tm, const es_param_group *groups, int n_groups, es_error *err) {
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
            pieces[n++] = (grad_bucket){*group, tm->run_layers + 1}; /* the heads: final before the layers */
            continue;
        }
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
            pieces[n++] = piece_of(group, tm, at, end - at, ready);
            at = end;
        }
    }
    qsort(pieces, n, sizeof *pieces, bucket_order);
    /* neighbours in the arena that become final together, with only padding between: one bucket
     * (the optimizer may run over the padding: zeros stay zeros) */
    const float *grads_begin = tm->grads.arena, *grads_end = tm->grads.arena + tm->grads.arena_floats;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        grad_bucket *last = kept ? &pieces[kept - 1] : NULL;
        const es_param_group *next = &pieces[i].range;
        const int in_arena = last && last->range.grads >= grads_begin && last->range.grads < grads_end &&
                             next->grads >= grads_begin && next->grads < grads_end;
        if (in_arena && last->ready == pieces[i].ready && next->grads >= last->range.grads + last->range.n &&
            next->grads <= last->range.grads + last->range.n + BUCKET_GAP_FLOATS &&
            !tensor_in(params, last->range.params + last->range.n, next->params))
            last->range.n = (size_t)(next->grads + next->n - last->range.grads);
        else
            pieces[kept++] = pieces[i];
    }
    r->buckets = pieces, r->n_buckets = (int)kept;
    return ES_OK;
}

/* ZeRO-1's owners: the largest bucket first to the rank with the fewest floats so far (ties: the
 * earlier bucket, the lower rank); every rank computes the same. */
static int share_buckets(grad_reducer *r, es_error *err) {
    const int world = r->comm->world, n = r->n_buckets;
    size_t *load = calloc((size_t)world, sizeof *load);
    int *by_size = malloc((size_t)n * sizeof *by_size + 1);
    r->owner = malloc((size_t)n * sizeof *r->owner + 1), r->offset = calloc((size_t)n + 1, sizeof *r->offset);
    r->owned = calloc((size_t)n + 1, sizeof *r->owned);
    if (!load || !by_size || !r->owner || !r->offset || !r->owned) {
        free(load), free(by_size);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory for ZeRO-1's shards");
    }
    for (int i = 0; i < n; i++) by_size[i] = i;
    for (int i = 1; i < n; i++) /* insertion sort: stable, largest first */
        for (int j = i; j > 0 && r->buckets[by_size[j]].range.n > r->buckets[by_size[j - 1]].range.n; j--) {
            int swap = by_size[j];
            by_size[j] = by_size[j - 1], by_size[j - 1] = swap;
        }
    for (int k = 0; k < n; k++) {
        int least = 0;
        for (int rank = 1; rank < world; rank++)
            if (load[rank] < load[least]) least = rank;
        r->owner[by_size[k]] = least;
        load[least] += r->buckets[by_size[k]].range.n;
    }
    free(load), free(by_size);
    /* the pieces the moments travel in: the same on every rank, so that the broadcasts match */
    size_t largest_elsewhere = 0;
    for (int i = 0; i < n; i++) {
        const es_param_group *range = &r->buckets[i].range;
        if (r->owner[i] != 0 && range->n > largest_elsewhere) largest_elsewhere = range->n;
        if (r->owner[i] != r->comm->rank) continue;
        r->offset[i] = r->shard_n;
        r->shard_n += (range->n + BUCKET_GAP_FLOATS - 1) / BUCKET_GAP_FLOATS * BUCKET_GAP_FLOATS;
    }
    r->staging_n = largest_elsewhere < STAGING_FLOATS ? largest_elsewhere : STAGING_FLOATS;
    const size_t bytes = r->shard_n * sizeof(float);
    if ((bytes && (es_device_alloc(r->dev, bytes, (void **)&r->m, "ZeRO-1's share of AdamW's first moments", err) ||
                   es_device_alloc(r->dev, bytes, (void **)&r->v, "ZeRO-1's share of AdamW's second moments", err) ||
                   es_device_zero(r->dev, r->m, bytes, err) || es_device_zero(r->dev, r->v, bytes, err))) ||
        (r->staging_n && es_device_alloc(r->dev, r->staging_n * sizeof(float), (void **)&r->staging,
                                         "ZeRO-1's moments on their way to rank 0", err)))
        return err->code;
    for (int i = 0; i < n; i++)
        if (r->owner[i] == r->comm->rank) {
            es_param_group group = r->buckets[i].range;
            group.m = r->m + r->offset[i], group.v = r->v + r->offset[i];
            r->owned[r->n_owned++] = group;
        }
    return ES_OK;
}

int grad_reducer_init(grad_reducer *r, const train_model *tm, const es_param_group *groups, int n_groups, align_comm *comm,
                      int zero1, es_error *err) {
    memset(r, 0, sizeof *r);
    r->comm = comm, r->dev = tm->dev;
    if (comm->world == 1) return ES_OK;
    int rc = cut_buckets(r, tm, groups, n_groups, err);
    r->sums = rc ? NULL : calloc((size_t)r->n_buckets + 1, sizeof *r->sums);
    if (!rc && !r->sums) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the gradient buckets");
    r->zero1 = zero1;
    if (!rc && zero1) rc = share_buckets(r, err);
    if (rc) grad_reducer_free(r);
    return rc;
}

/* A bucket summed over the ranks (onto its owner with zero1). */
static int start_bucket(grad_reducer *r, int i, es_error *err) {
    const es_param_group *range = &r->buckets[i].range;
    if (r->zero1 && !r->to_all) return comm_start(r->comm, ES_GROUP_REDUCE, range->grads, range->n, r->owner[i], err);
    return comm_start(r->comm, ES_GROUP_ALLREDUCE, range->grads, range->n, 0, err);
}

int grad_reducer_layer_done(void *ctx, int layer, es_error *err) {
    grad_reducer *r = ctx;
    for (; r->started < r->n_buckets && r->buckets[r->started].ready >= layer; r->started++) {
        int rc = start_bucket(r, r->started, err);
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

int grad_reducer_norm(grad_reducer *r, double *norm, es_error *err) {
    for (int i = 0; i < r->n_buckets; i++) {
        r->sums[i] = 0;
        const int counted = r->zero1 ? r->owner[i] == r->comm->rank : 1;
        if (counted && es_sum_squares(r->dev, &r->sums[i], r->buckets[i].range.grads, r->buckets[i].range.n))
            return es_device_take_error(r->dev, err);
    }
    /* x + 0 is x: the shared sums are the owners' bits */
    int rc = r->zero1 ? comm_allreduce_f64(r->comm, r->sums, (size_t)r->n_buckets, err) : ES_OK;
    double total = 0;
    for (int i = 0; !rc && i < r->n_buckets; i++) total += r->sums[i];
    *norm = sqrt(total);
    return rc;
}

int grad_reducer_step(grad_reducer *r, float clip_scale, int64_t step, double lr, const es_adamw_config *config, es_error *err) {
    if (!r->zero1) {
        for (int i = 0; i < r->n_buckets; i++) {
            int rc = es_adamw_step(r->dev, &r->buckets[i].range, 1, clip_scale, step, lr, config, err);
            if (rc) return rc;
        }
        return ES_OK;
    }
    int rc = es_adamw_step(r->dev, r->owned, r->n_owned, clip_scale, step, lr, config, err);
    for (int i = 0; !rc && i < r->n_buckets; i++) {
        const es_param_group *range = &r->buckets[i].range;
        if (r->owner[i] != r->comm->rank && es_scale(r->dev, range->grads, range->n, 0.0f)) rc = es_device_take_error(r->dev, err);
        if (!rc) rc = comm_start(r->comm, ES_GROUP_BROADCAST, range->params, range->n, r->owner[i], err);
    }
    if (!rc) rc = comm_wait(r->comm, err);
    /* the working copy of weights updated elsewhere, rounded as the owner's AdamW rounded it */
    for (int i = 0; !rc && i < r->n_buckets; i++) {
        const es_param_group *range = &r->buckets[i].range;
        if (r->owner[i] != r->comm->rank && range->working && es_round_weights(r->dev, range->working, range->params, range->n))
            rc = es_device_take_error(r->dev, err);
    }
    return rc;
}

/* Bucket i's moments (m, then v) from its owner into the host's m and v on rank 0. */
static int gather_bucket(grad_reducer *r, int i, es_error *err) {
    const es_param_group *range = &r->buckets[i].range;
    const int rank = r->comm->rank, owner = r->owner[i];
    for (int part = 0; part < 2; part++) {
        float *host = part ? range->v : range->m, *shard = (part ? r->v : r->m) + (owner == rank ? r->offset[i] : 0);
        if (owner == 0) {
            if (rank == 0 && es_device_download(r->dev, host, shard, range->n * sizeof(float), err)) return err->code;
            continue;
        }
        for (size_t done = 0; done < range->n; done += r->staging_n) {
            const size_t n = range->n - done < r->staging_n ? range->n - done : r->staging_n;
            float *piece = owner == rank ? shard + done : r->staging;
            int rc = comm_start(r->comm, ES_GROUP_BROADCAST, piece, n, owner, err);
            if (!rc) rc = comm_wait(r->comm, err);
            if (!rc && rank == 0) rc = es_device_download(r->dev, host + done, r->staging, n * sizeof(float), err);
            if (rc) return rc;
        }
    }
    return ES_OK;
}

int grad_reducer_gather(grad_reducer *r, es_error *err) {
    for (int i = 0; r->zero1 && i < r->n_buckets; i++) {
        int rc = gather_bucket(r, i, err);
        if (rc) return rc;
    }
    return ES_OK;
}

int grad_reducer_scatter(grad_reducer *r, es_error *err) {
    for (int i = 0; r->zero1 && i < r->n_buckets; i++) {
        const es_param_group *range = &r->buckets[i].range;
        if (r->owner[i] != r->comm->rank) continue;
        const size_t bytes = range->n * sizeof(float);
        if (es_device_upload(r->dev, r->m + r->offset[i], range->m, bytes, err) ||
            es_device_upload(r->dev, r->v + r->offset[i], range->v, bytes, err))
            return err->code;
    }
    return ES_OK;
}

void grad_reducer_free(grad_reducer *r) {
    const size_t bytes = r->shard_n * sizeof(float);
    if (r->m) es_device_free(r->dev, r->m, bytes);
    if (r->v) es_device_free(r->dev, r->v, bytes);
    if (r->staging) es_device_free(r->dev, r->staging, r->staging_n * sizeof(float));
    free(r->buckets), free(r->sums), free(r->owner), free(r->offset), free(r->owned);
    memset(r, 0, sizeof *r);
}
