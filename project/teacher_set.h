/* The teacher files essence-project reads: one teacher.h5, or the shards of one extraction
 * (`--in a.h5,b.h5`) read in order as one file. Sample s of the set is sample s - first of
 * the shard that holds it; teacher row r likewise (rows are numbered across the shards).
 *
 * Opening checks what project relies on: the format, one hidden size, one model and
 * tokenizer, and consistent row pointers. Reading is by blocks of whole samples of one shard. */
#ifndef ES_PROJECT_TEACHER_SET_H
#define ES_PROJECT_TEACHER_SET_H

#include <hdf5.h>
#include <stdint.h>

#include "error.h"
#include "h5file.h"
#include "threadpool.h"

typedef struct teacher_shard {
    es_h5file file;
    const char *path;
    int64_t samples, tokens;    /* in this shard */
    int64_t first_sample, first_row; /* of the set */
    int64_t *text_start;        /* (samples + 1) */
    int64_t *token_start;       /* (samples + 1) */
    char *fingerprint;          /* the shard's root attribute "fingerprint" ("" when absent) */
} teacher_shard;

typedef struct teacher_set {
    teacher_shard *shards;
    int n_shards;
    int width;                  /* d, the teacher's hidden size */
    int64_t samples, tokens;    /* over all shards */
    int *layers;                /* the layers every shard stores, ascending */
    int n_layers;
    es_pool *pool;
} teacher_set;

/* Opens the comma-separated list of files. Errors name the file: missing (ES_ERR_USAGE),
 * not HDF5 or truncated, not an essence teacher file, shards that disagree (ES_ERR_DATA). */
int teacher_set_open(teacher_set *set, const char *paths, es_pool *pool, es_error *err);
void teacher_set_close(teacher_set *set);
int teacher_set_has_layer(const teacher_set *set, int layer);

/* Per-dimension mean and scale = max(sqrt(m2 / count), 1e-6) of a layer over every token of
 * the set, merging the shards' /stats (Chan et al.'s pairwise update, in double). A shard
 * without /stats/layer_LLL is ES_ERR_DATA naming it. */
int teacher_set_standardisation(const teacher_set *set, int layer, float *mean, float *scale, es_error *err);

/* A block: samples [first, first + count) of one shard. */
typedef struct teacher_block {
    const teacher_shard *shard;
    int64_t first, count;       /* shard-local samples */
    char **ids;                 /* (count) sample ids */
    uint8_t *text;              /* the block's text bytes; sample i's text at text + text_offset[i] */
    int64_t *text_offset;       /* (count + 1), relative to the block */
    uint8_t *truncated, *add_special_tokens; /* (count) */
    int64_t *token_offset;      /* (count + 1), teacher rows relative to the block */
    int32_t *byte_start, *byte_end; /* (tokens) teacher token spans */
    int64_t tokens;             /* teacher rows in the block */
    int64_t first_row;          /* the block's first row in the set */
} teacher_block;

/* Reads the samples' metadata and token spans. */
int teacher_block_read(const teacher_set *set, const teacher_shard *shard, int64_t first, int64_t count,
                       teacher_block *block, es_error *err);
/* Reads the block's rows of one layer as fp32: rows (block->tokens, width). */
int teacher_block_latents(const teacher_set *set, const teacher_block *block, int layer, float *rows, es_error *err);
void teacher_block_free(teacher_block *block);

#endif
