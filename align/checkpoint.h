/* essence-align's checkpoints (docs/align.md), in the Hugging Face Trainer's layout:
 *
 *   OUT/checkpoint-STEP/        one per save, complete or absent:
 *       config.json             copied from the input model folder
 *       model.safetensors       bf16, the input model's tensor names and shapes
 *       tokenizer files         tokenizer.json, tokenizer_config.json, special_tokens_map.json,
 *                               generation_config.json: whichever the input folder has
 *       student_head.safetensors  (with --student-head linear) fp32 D×D maps, one per mapped layer
 *       essence-state/          state.safetensors (fp32 master weights, AdamW m and v, named
 *                               "master/NAME", "m/NAME", "v/NAME"), state.json (step, data
 *                               position, anything the caller puts there)
 *   OUT/config.json, model.safetensors, tokenizer files, student_head.safetensors:
 *                               the newest checkpoint's, so OUT itself loads with from_pretrained
 *
 * A checkpoint is written as OUT/checkpoint-STEP.partial/, every file fsync'd, then renamed; only
 * then are older checkpoints beyond `keep` removed and the top-level files replaced (each by
 * its own write-then-rename). A failure at any point (a full disk) leaves the previous
 * checkpoint valid and no .partial folder behind, and is ES_ERR_RUNTIME naming the file.
 * Saving a step that already has a checkpoint (a resumed run) replaces it: the old folder is
 * removed only once the new one is in place. The top-level model.safetensors and
 * student_head.safetensors are hard links to the checkpoint's (copies where the file system
 * has no links), so they cost no extra space. */
#ifndef ES_ALIGN_CHECKPOINT_H
#define ES_ALIGN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* One fp32 tensor to save under its Hugging Face name. */
typedef struct checkpoint_tensor {
    const char *name;
    const float *data;
    int ndim;                 /* 1 or 2 */
    int64_t shape[2];
} checkpoint_tensor;

typedef struct checkpoint_content {
    const char *model_dir;            /* where config.json and the tokenizer files are copied from */
    const checkpoint_tensor *weights; /* the model, saved as bf16, in this order */
    int n_weights;
    const checkpoint_tensor *head;    /* the student heads, saved fp32 (n_head 0: none) */
    int n_head;
    /* essence-state: three fp32 tensors per weight (and head) tensor, same names and shapes */
    const checkpoint_tensor *master, *m, *v;
    int n_state;
    const char *state_json;           /* the caller's JSON object (step, data position, ...) */
} checkpoint_content;

/* keep: how many checkpoint-N folders to leave (the newest by N, and always the one just
 * saved); keep <= 0 removes none. OUT is created when missing (not its parents). */
int checkpoint_save(const char *out_dir, int64_t step, const checkpoint_content *content, int keep, es_error *err);

/* The newest complete OUT/checkpoint-STEP/ (one with essence-state/state.json; STEP plain
 * decimal digits without leading zeros), or *path NULL and ES_OK when there is none (also when
 * OUT does not exist). .partial folders and other names are ignored. *path is malloc'd. */
int checkpoint_find_latest(const char *out_dir, char **path, int64_t *step, es_error *err);

/* Reads essence-state/ of a checkpoint back into the caller's buffers: each "master/NAME",
 * "m/NAME", "v/NAME" must exist with the shape given (ES_ERR_DATA naming the tensor otherwise).
 * *state_json receives state.json's text (malloc'd). */
typedef struct checkpoint_buffer {
    const char *name;
    float *data;              /* NULL: the tensor is checked but not kept (the moments of one that does not train) */
    int64_t numel;            /* must equal the saved tensor's element count */
} checkpoint_buffer;
int checkpoint_load_state(const char *checkpoint_dir, const checkpoint_buffer *master, const checkpoint_buffer *m,
                          const checkpoint_buffer *v, int n_state, char **state_json, es_error *err);

/* What a save does after its checkpoint is in place, done again for a resumed run (a run stopped
 * in the middle of it): older checkpoints beyond `keep` removed, OUT's model files made the
 * checkpoint's. */
int checkpoint_tidy(const char *out_dir, const char *checkpoint, int64_t step, int keep, es_error *err);
/* How many checkpoint-N folders OUT holds (complete or not) and the newest N (-1: none). */
int checkpoint_survey(const char *out_dir, size_t *count, int64_t *newest, es_error *err);
/* Removes every checkpoint-N folder (and checkpoint-N.partial) of OUT and the model files
 * published from them: a fresh run told to clear a used --out (--force). */
int checkpoint_remove_all(const char *out_dir, es_error *err);

#endif
