/* The tokenizer's private structures, shared by tokenizer.c (loading) and
 * tokenizer_encode.c (encoding, decoding). Not part of the public API. */
#ifndef ES_TOKENIZER_INTERNAL_H
#define ES_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

/* Byte strings -> int32, open addressing; keys live in one arena. */
typedef struct tk_strmap {
    uint32_t *slots;   /* index+1 into entries, 0 = empty */
    size_t n_slots;    /* power of two */
    struct tk_strmap_entry {
        uint32_t offset, length; /* key bytes in arena */
        uint64_t hash;
        int32_t value;
    } *entries;
    size_t n_entries, cap_entries;
    char *arena;
    size_t arena_len, arena_cap;
} tk_strmap;

int tk_strmap_put(tk_strmap *map, const void *key, size_t len, int32_t value); /* 0, or -1: out of memory */
int32_t tk_strmap_get(const tk_strmap *map, const void *key, size_t len);   /* -1 when absent */
int tk_strmap_reserve(tk_strmap *map, size_t n); /* room for n entries without rehashing */
void tk_strmap_free(tk_strmap *map);
uint64_t tk_hash(const void *key, size_t len);

/* (left id, right id) -> (rank, merged id) */
typedef struct tk_pair {
    uint64_t key; /* (left << 32) | right, +1 so that 0 means empty */
    int32_t rank, merged;
} tk_pair;

typedef enum { TK_SPLIT_ISOLATED, TK_SPLIT_REMOVED, TK_SPLIT_MERGED_PREVIOUS, TK_SPLIT_MERGED_NEXT } tk_split_behavior;

typedef struct tk_split {
    pcre2_code *regex;
    tk_split_behavior behavior;
} tk_split;

typedef struct tk_added {
    int32_t id;
    char *content;          /* as in the file */
    char *match;            /* what is matched: content, normalized when `normalized` */
    size_t match_len;
    int special, single_word, lstrip, rstrip, normalized;
} tk_added;

/* A byte trie over added-token texts for leftmost-longest matching. */
typedef struct tk_trie_node {
    int32_t first_child, next_sibling; /* -1 = none */
    int32_t added;                     /* index into added[], -1 = no token ends here */
    uint8_t byte;
} tk_trie_node;

typedef struct tk_trie {
    tk_trie_node *nodes;
    size_t n_nodes, cap_nodes;
    uint8_t can_start[256];
} tk_trie;

typedef enum { TK_NORM_NONE = 0, TK_NORM_NFC, TK_NORM_NFD, TK_NORM_NFKC, TK_NORM_NFKD } tk_normal_form;

typedef struct tk_template_item {
    int is_sequence;  /* 1: the encoded text ($A); 0: the special ids below */
    int32_t *ids;
    size_t n_ids;
} tk_template_item;

struct es_tokenizer {
    char *name;                      /* file name, for messages */
    /* normalizer: a chain of Unicode normal forms (a Sequence is flattened) */
    tk_normal_form normal_forms[8];
    int n_normal_forms;
    /* pre-tokenizer */
    tk_split *splits;
    int n_splits;
    int byte_level;                  /* a ByteLevel pre-tokenizer is present */
    /* BPE model on raw bytes (byte-level alphabet decoded at load) */
    tk_strmap vocab;                 /* raw bytes -> id */
    tk_strmap plain_vocab;           /* vocabulary entries outside the byte-level alphabet, as written */
    int32_t vocab_count;             /* entries in the vocabulary (Hugging Face's vocab size) */
    int32_t byte_token[256];         /* id of each single byte, -1 when absent */
    tk_pair *pairs;
    size_t n_pair_slots;             /* power of two */
    int ignore_merges;
    /* id -> text: raw bytes for decoding (byte-level tokens decoded, others as written) */
    int64_t *id_text_at;             /* offset in text_arena, -1 = no such id */
    uint32_t *id_text_len;
    char *text_arena;
    size_t text_arena_len, text_arena_cap;
    int32_t n_ids;                   /* largest id + 1 */
    /* added tokens */
    tk_added *added;
    size_t n_added;
    int32_t *added_by_id;            /* [n_ids]: index into added[], or -1 */
    tk_trie raw_trie, normalized_trie;
    /* post-processor */
    tk_template_item *template_items;
    size_t n_template_items;
    int trim_offsets;                /* ByteLevel post-processor's trim_offsets */
    int trim_prefix_space;           /* its add_prefix_space: a first token keeps one leading space */
    int32_t bos_id;                  /* tokenizer_config.json's bos_token, -1 when none names a known token */
    /* per-thread workspaces (word caches, buffers), all listed so that freeing the tokenizer
     * frees those of threads still alive */
    pthread_key_t cache_key;
    int has_cache_key;
    pthread_mutex_t workspaces_lock;
    struct tk_workspace *workspaces;
};

/* The text of an id (raw bytes), or NULL when the id has none. */
static inline const char *tk_id_text(const es_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_ids || tok->id_text_at[id] < 0) return NULL;
    *len = tok->id_text_len[id];
    return tok->text_arena + tok->id_text_at[id];
}

/* Applies the tokenizer's normalizer to a whole text (for added-token contents).
 * *out is malloc'd. Returns 0, or -1 when out of memory. */
int tk_normalize_text(const es_tokenizer *tok, const char *text, size_t len, char **out, size_t *out_len);

/* Loading helpers shared by tokenizer.c and tokenizer_config.c. */
struct cJSON;
/* Reads a whole file (malloc'd; a missing one is ES_ERR_USAGE). */
int tk_read_file(const char *path, char **data, size_t *len, es_error *err);
/* Parses JSON text; a syntax error is ES_ERR_DATA naming the file, line and column. */
struct cJSON *tk_parse_json(const char *text, size_t len, const char *name, es_error *err);
/* The post-processor's template: items in order ($A, or special ids). */
int tk_add_template_item(es_tokenizer *tok, int is_sequence, const int32_t *ids, size_t n_ids, es_error *err);
void tk_clear_template(es_tokenizer *tok);
/* A model folder's tokenizer_config.json (tokenizer_config.c): its bos_token, and
 * LlamaTokenizerFast's add_bos_token/add_eos_token rule. */
int tk_apply_tokenizer_config(es_tokenizer *tok, const char *path, es_error *err);

/* The cache key's destructor: a thread that ends frees its workspace. */
void tk_workspace_release(void *workspace);
/* Frees every workspace still listed (es_tokenizer_free, after deleting the key). */
void tk_workspaces_free_all(es_tokenizer *tok);

/* Rewrites a Rust regex for PCRE2 (\\s, \\S and \\p{..} classes as Rust reads them); malloc'd. */
char *tk_translate_regex(const char *pattern);

/* Unicode White_Space, as Rust's \s (not PCRE2's, which adds U+180E). */
int tk_is_white_space(uint32_t codepoint);
/* Rust's \w: alphabetic, marks, decimal digits, connector punctuation, join controls. */
int tk_is_word_char(uint32_t codepoint);

#endif
