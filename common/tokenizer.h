/* Hugging Face tokenizer.json (byte-level BPE), id- and offset-exact with the `tokenizers`
 * library (docs/tokenizer.md).
 *
 * Pipeline, as Hugging Face runs it: added tokens are split out (non-normalized ones on the
 * original text, normalized ones after normalization), the normalizer (none, NFC) runs on the
 * rest, the pre-tokenizer (Split regexes via PCRE2, ByteLevel) cuts it into words, the BPE
 * model turns each word into ids, and the post-processor (ByteLevel, TemplateProcessing)
 * adds the specials. Every token carries the UTF-8 byte span [start, end) it came from in the
 * original text: a token holding part of a character gets the whole character's span,
 * inserted specials get [0, 0).
 *
 * A loaded tokenizer is read-only: es_tokenizer_encode may run on many threads at once. */
#ifndef ES_TOKENIZER_H
#define ES_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct es_tokenizer es_tokenizer;

/* PATH: a tokenizer.json file, or a model folder holding one (then the folder's
 * tokenizer_config.json is applied too: LlamaTokenizerFast's add_bos_token/add_eos_token,
 * as transformers applies them). Errors: a missing file is ES_ERR_USAGE; a malformed one is
 * ES_ERR_DATA naming the file and what is wrong (unknown component type, merges naming
 * unknown tokens, an invalid regex, ...). */
int es_tokenizer_load(const char *path, es_tokenizer **out, es_error *err);
/* The same from a tokenizer.json text in memory; `name` is used in messages. */
int es_tokenizer_load_json(const char *json, size_t len, const char *name, es_tokenizer **out, es_error *err);
void es_tokenizer_free(es_tokenizer *tokenizer);

typedef struct es_encoding {
    int32_t *ids;         /* [n] */
    int32_t (*spans)[2];  /* [n] UTF-8 byte span [start, end) of each token in the text */
    size_t n, cap;
} es_encoding;

/* Encodes len bytes of UTF-8 text (NUL bytes allowed), replacing out's contents (reuse one
 * es_encoding across calls to avoid allocations). add_special_tokens: Hugging Face's flag
 * (the post-processor's specials). Text that is not valid UTF-8 is ES_ERR_DATA
 * "invalid UTF-8 at byte N" (the caller adds which sample). */
int es_tokenizer_encode(const es_tokenizer *tokenizer, const char *text, size_t len, int add_special_tokens,
                        es_encoding *out, es_error *err);
void es_encoding_free(es_encoding *encoding);

/* Decodes ids to text as Hugging Face's decode(ids) does (specials kept, invalid UTF-8
 * replaced by U+FFFD). *text is malloc'd and NUL-terminated; *len excludes the NUL.
 * An id outside the vocabulary is ES_ERR_DATA naming it. */
int es_tokenizer_decode(const es_tokenizer *tokenizer, const int32_t *ids, size_t n, char **text, size_t *len,
                        es_error *err);

/* Whether text encoded with add_special_tokens starts with the BOS (docs/tokenizer.md "BOS").
 * AUTO: as loaded (the file's post-processor; in a model folder, LlamaTokenizerFast's
 * add_bos_token as transformers 4 applies it). ALWAYS: the specials start with the BOS (the
 * post-processor's leading special, or else tokenizer_config.json's bos_token). NEVER: the
 * specials the post-processor puts before the text are left out (those after it stay). */
typedef enum { ES_ADD_BOS_AUTO, ES_ADD_BOS_ALWAYS, ES_ADD_BOS_NEVER } es_add_bos;

/* "auto", "always" or "never"; anything else is ES_ERR_USAGE naming --add-bos. */
int es_add_bos_parse(const char *text, es_add_bos *mode, es_error *err);
const char *es_add_bos_name(es_add_bos mode);
/* Applies mode to a loaded tokenizer, before it encodes anything. ALWAYS where there is no BOS
 * to add (no leading special in the post-processor, no bos_token in a tokenizer_config.json
 * beside it) is ES_ERR_USAGE naming the tokenizer. */
int es_tokenizer_set_add_bos(es_tokenizer *tokenizer, es_add_bos mode, es_error *err);

/* Number of ids (model vocabulary and added tokens: the largest id + 1). */
int32_t es_tokenizer_vocab_size(const es_tokenizer *tokenizer);
/* The id of a token's text (added tokens first, then the model vocabulary), or -1. */
int32_t es_tokenizer_token_id(const es_tokenizer *tokenizer, const char *token);
/* The specials the post-processor adds with add_special_tokens (e.g. the BOS), for the
 * record kept in output files: writes up to max ids, returns how many there are. */
size_t es_tokenizer_added_specials(const es_tokenizer *tokenizer, int32_t *ids, size_t max);
/* The post-processor's template as text, for an output file's attribute: ids and "$A" (where
 * the text goes) comma-separated ("128000,$A"; "$A" when nothing is added). Cut to fit size. */
void es_tokenizer_specials_text(const es_tokenizer *tokenizer, char *out, size_t size);

#endif
