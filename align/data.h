/* essence-align's input: student.h5 (docs/student-h5.md) streamed in batches, or a JSONL of texts
 * (a path ending in .jsonl): every record tokenised at open with the student's own tokenizer
 * (common/inputs.h, the rules essence-extract uses) into ids held in memory (int32, 4 bytes a
 * token); it has no targets (no target layers, mask 0 everywhere, global_aligned 0), and every
 * rule below applies to its records, in file order, as to student.h5's samples.
 *
 * Samples are split once into train and eval sets (a seeded choice of round(eval_fraction · S)
 * samples, at least one when eval_fraction > 0 and S > 1). Train samples are visited epoch
 * after epoch, in a seeded permutation per epoch (seed, epoch) or in file order with
 * shuffle = 0. A sample longer than seq_len is cut into pieces of seq_len tokens; each piece is
 * its own attention sequence (positions restart at 0; no attention across samples or pieces).
 *
 * A global batch takes pieces in order until adding the next would pass world · batch_tokens
 * tokens (one piece at least); rank r gets a contiguous run of those pieces, cut so each rank
 * has about batch_tokens tokens. Every rank computes the same global batch, so the global counts
 * (aligned tokens, next-token labels) are known without communication.
 *
 * A prefetch thread reads the next batch while the current one trains; memory stays bounded by
 * two batches plus the per-sample index (token_start, 8 bytes a sample, and the epoch's order,
 * 8 bytes a training sample) whatever the file size. align/data.c states the exact rules (the
 * seeded choices, the rank cut); with fewer pieces than ranks a rank gets an empty batch (T = 0),
 * which still carries the global counts. */
#ifndef ES_ALIGN_DATA_H
#define ES_ALIGN_DATA_H

#include <stdint.h>

#include "error.h"

typedef struct align_data align_data;

typedef struct align_data_options {
    const char *path;         /* student.h5, or texts.jsonl (align_data_path_is_text) */
    int hidden_size;          /* the student's D: every /targets/layer_LLL must be [M, D] */
    int n_layers;             /* the student's depth: every target layer must be <= it */
    int vocab_size;           /* token ids must be < it */
    double eval_fraction;
    uint64_t seed;
    int shuffle;
    int seq_len;
    int batch_tokens;         /* per rank */
    int rank, world;
    const char *model_dir;    /* texts: the student folder whose tokenizer.json (+ tokenizer_config.json) encodes them */
} align_data_options;

typedef struct align_batch {
    int T;                    /* tokens on this rank */
    int n_seqs;
    int32_t *seq_start;       /* (n_seqs + 1) attention sequences */
    int32_t *ids;             /* (T) */
    int32_t *labels;          /* (T) the next token of the same sequence, -1 at each sequence's end */
    uint8_t *mask;            /* (T) 1 where the token has a target (teacher_row >= 0) */
    float **targets;          /* [n_target_layers] (T, D), fp32 */
    int64_t global_tokens, global_aligned, global_labels; /* over the whole global batch */
    int64_t *sample;          /* (n_seqs) the sample index in the file each sequence comes from */
} align_batch;

/* Opens and validates the file: format, an empty dataset, target width != hidden_size, a target
 * layer > n_layers, token ids outside the vocabulary, inconsistent pointers -> ES_ERR_DATA
 * naming the file (and dataset); a missing file -> ES_ERR_USAGE. Texts: a bad record (not JSON, no
 * "text", "prompt"+"response" or "ids", an id outside the vocabulary, no tokens) -> ES_ERR_DATA
 * naming FILE:LINE; no records -> ES_ERR_DATA naming the file. */
int align_data_open(align_data **data, const align_data_options *options, es_error *err);
/* 1 when --data names a JSONL of texts (it ends in .jsonl), 0 for student.h5. */
int align_data_path_is_text(const char *path);
void align_data_close(align_data *data);

/* The student layers that have targets, ascending (the file's /targets/layer_LLL). */
int align_data_target_layers(const align_data *data, const int **layers);
int64_t align_data_train_samples(const align_data *data);
int64_t align_data_eval_samples(const align_data *data);

/* The next training batch (rolls over into the next epoch). A NaN or infinite target is
 * ES_ERR_DATA naming the file, the sample index and its id. The batch stays valid until the
 * next call to align_data_next_train or align_data_close. */
int align_data_next_train(align_data *data, align_batch *batch, es_error *err);

/* Where training stands in the data, for checkpoints: the epoch and the next sample position
 * in that epoch's order (and the piece within it). Restoring it makes the following batches
 * exactly those an uninterrupted run would have seen, given the same file, seed, shuffle,
 * eval_fraction, seq_len and world · batch_tokens. get_position is the position after the batch
 * last returned; set_position drops any prefetched batch, and a position this data cannot have
 * (past the training samples, or a piece past its sample's end) is ES_ERR_DATA. */
typedef struct align_data_position {
    int64_t epoch, index, piece;
} align_data_position;
align_data_position align_data_get_position(const align_data *data);
int align_data_set_position(align_data *data, align_data_position position, es_error *err);

/* Eval: the eval samples in file order, in batches like training ones (this rank's share).
 * eval_begin stops the prefetcher (the training position is kept; the next training call reads
 * its batch again) and eval batches are read on the caller's thread. The last training batch
 * stays valid during eval. */
int align_data_eval_begin(align_data *data, es_error *err);
/* 1 and a batch, 0 at the end, -1 on error. The batch stays valid until the next call. */
int align_data_eval_next(align_data *data, align_batch *batch, es_error *err);

#endif
