/* Resume keys: what a resumed run must share with the run that began its output.
 *
 * A key is a JSON object, written (canonical text, common/fingerprint.h) into a .partial output
 * or a checkpoint when it is begun: every result-affecting option by its name with its value,
 * and the inputs by the same option name with their content fingerprint in place of their path
 * ("data": "3fa2..."); other entries have names with a space or '_' ("tool version"). A run asked to --resume compares its own key with the stored one and
 * refuses (ES_ERR_USAGE) what another run began, naming each option or input that differs. */
#ifndef ES_RESUME_H
#define ES_RESUME_H

#include <jansson.h>

#include "config.h"
#include "error.h"

/* Options that never change a result bit and only describe this run: left out of resume keys
 * and of the fingerprints stored in outputs (beside kernels/backend.h's
 * ES_RESULT_NEUTRAL_OPTIONS, which the two lists repeat). */
#define ES_RUN_ONLY_OPTIONS ((const char *const[]){"threads", "max-memory", "resume", "force", "out", "fingerprint", NULL})

/* Every set option of cfg but ES_RUN_ONLY_OPTIONS and `also_leave_out` (NULL-terminated, may be
 * NULL: the inputs the caller adds by their fingerprint), as {"name": "text value"}. NULL when out
 * of memory. */
json_t *es_resume_key_from_config(const es_config *cfg, const char *const *also_leave_out);

/* The canonical text of a key (malloc'd), NULL and *err set on failure. */
char *es_resume_key_text(const json_t *key, es_error *err);

/* ES_OK when the stored key (text) equals `now` (text); otherwise ES_ERR_USAGE:
 * "WHAT was begun with other inputs or options: --data (its content differs), --layers (0,2 there,
 * 1 now); resume with the same ones, or start again without --resume". `what` names the output. */
int es_resume_key_compare(const char *stored, const char *now, const char *what, es_error *err);

/* SHA-256 over the lines "NAME SHA256" of a model folder's config.json, safetensors index and
 * weight files, in name order: the checkpoint's content, not its modification times
 * (docs/teacher-h5.md, model_fingerprint). */
int es_model_fingerprint(const char *dir, char out[65], es_error *err);

/* SHA-256 of the tokenizer_config.json beside a tokenizer (`tokenizer` a folder, as
 * es_tokenizer_load takes it), which can decide the BOS token; "" when there is none. */
int es_tokenizer_config_sha256(const char *tokenizer, char out[65], es_error *err);

#endif
