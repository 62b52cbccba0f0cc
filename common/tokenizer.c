/* Loading a Hugging Face tokenizer.json: components, vocabulary, merges, added tokens.
 * Encoding lives in tokenizer_encode.c. */
#include <errno.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "tokenizer_internal.h"
#include "utf8.h"

/* ---- the byte-level alphabet (GPT-2): every byte has a printable stand-in character --- */

static uint32_t byte_char[256]; /* byte -> code point */
static int16_t char_byte[512];  /* code point (< 512) -> byte, -1 if none */

static void build_byte_alphabet(void) {
    int extra = 0;
    for (int c = 0; c < 512; c++) char_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        byte_char[b] = printable ? (uint32_t)b : (uint32_t)(256 + extra++);
        char_byte[byte_char[b]] = (int16_t)b;
    }
}

static void init_byte_alphabet(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, build_byte_alphabet);
}

/* Decodes a token written in the byte-level alphabet into raw bytes (out holds at least
 * len bytes). Returns the byte count, or -1 when a character is not in the alphabet. */
static long decode_byte_level(const char *text, size_t len, char *out) {
    size_t i = 0, n = 0;
    while (i < len) {
        utf8proc_int32_t codepoint;
        utf8proc_ssize_t step = utf8proc_iterate((const utf8proc_uint8_t *)text + i, (utf8proc_ssize_t)(len - i), &codepoint);
        if (step <= 0 || codepoint >= 512 || char_byte[codepoint] < 0) return -1;
        out[n++] = (char)char_byte[codepoint];
        i += (size_t)step;
    }
    return (long)n;
}

/* ---- loading helpers ------------------------------------------------------------------ */

#define BAD(...) es_fail(err, ES_ERR_DATA, __VA_ARGS__)

/* ---- reading the JSON tree (cJSON: it parses an 11 MB tokenizer.json several times
 * faster than jansson, which decides the load time) ---------------------------------- */

static const cJSON *get(const cJSON *object, const char *key) {
    return cJSON_IsObject(object) ? cJSON_GetObjectItemCaseSensitive(object, key) : NULL;
}
static int is_integer(const cJSON *value) {
    /* range first: converting a huge double to an integer type is undefined */
    return cJSON_IsNumber(value) && value->valuedouble >= -9.0e15 && value->valuedouble <= 9.0e15 &&
           value->valuedouble == (double)(long long)value->valuedouble;
}
static long long integer_value(const cJSON *value) { return (long long)value->valuedouble; }
static double number_value(const cJSON *value) { return value->valuedouble; }
static const char *string_value(const cJSON *value) { return value->valuestring; }
static size_t string_length(const cJSON *value) { return strlen(value->valuestring); }

static const char *type_of(const cJSON *component) {
    const cJSON *type = get(component, "type");
    return cJSON_IsString(type) ? string_value(type) : NULL;
}

static int get_bool(const cJSON *object, const char *key, int fallback) {
    const cJSON *value = get(object, key);
    return cJSON_IsBool(value) ? cJSON_IsTrue(value) : fallback;
}

static int add_split(es_tokenizer *tok, const char *pattern, int literal, const char *behavior, es_error *err) {
    tk_split_behavior kind;
    if (!strcmp(behavior, "Isolated")) kind = TK_SPLIT_ISOLATED;
    else if (!strcmp(behavior, "Removed")) kind = TK_SPLIT_REMOVED;
    else if (!strcmp(behavior, "MergedWithPrevious")) kind = TK_SPLIT_MERGED_PREVIOUS;
    else if (!strcmp(behavior, "MergedWithNext")) kind = TK_SPLIT_MERGED_NEXT;
    else return BAD("%s: pre_tokenizer Split: unsupported behavior \"%s\"", tok->name, behavior);
    char *translated = literal ? strdup(pattern) : tk_translate_regex(pattern);
    if (!translated) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int code;
    PCRE2_SIZE offset;
    pcre2_code *regex = pcre2_compile((PCRE2_SPTR)translated, PCRE2_ZERO_TERMINATED,
                                      PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP), &code, &offset, NULL);
    free(translated);
    if (!regex) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(code, message, sizeof message);
        return BAD("%s: pre_tokenizer Split: invalid regex \"%s\": %s", tok->name, pattern, (char *)message);
    }
    pcre2_jit_compile(regex, PCRE2_JIT_COMPLETE); /* falls back to the interpreter if JIT is unavailable */
    tk_split *grown = realloc(tok->splits, (size_t)(tok->n_splits + 1) * sizeof *grown);
    if (!grown) {
        pcre2_code_free(regex);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    tok->splits = grown;
    tok->splits[tok->n_splits++] = (tk_split){regex, kind};
    return ES_OK;
}

/* GPT-2's split, which a ByteLevel pre-tokenizer with use_regex applies. */
static const char gpt2_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pre_tokenizer(es_tokenizer *tok, const cJSON *component, es_error *err) {
    if (cJSON_IsNull(component) || !component) return ES_OK;
    const char *type = type_of(component);
    if (!type) return BAD("%s: pre_tokenizer: missing \"type\"", tok->name);
    if (tok->byte_level && strcmp(type, "Sequence"))
        return BAD("%s: pre_tokenizer: %s after ByteLevel is not supported", tok->name, type);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = get(component, "pretokenizers");
        if (!cJSON_IsArray(list)) return BAD("%s: pre_tokenizer Sequence: \"pretokenizers\" is not a list", tok->name);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            int rc = load_pre_tokenizer(tok, item, err);
            if (rc) return rc;
        }
        return ES_OK;
    }
    if (!strcmp(type, "Split")) {
        const cJSON *pattern = get(component, "pattern");
        const cJSON *regex = get(pattern, "Regex"), *literal = get(pattern, "String");
        const cJSON *behavior = get(component, "behavior");
        if (get_bool(component, "invert", 0)) return BAD("%s: pre_tokenizer Split: invert=true is not supported", tok->name);
        if (!cJSON_IsString(behavior)) return BAD("%s: pre_tokenizer Split: \"behavior\" is not a string", tok->name);
        if (cJSON_IsString(regex)) return add_split(tok, string_value(regex), 0, string_value(behavior), err);
        if (cJSON_IsString(literal)) return add_split(tok, string_value(literal), 1, string_value(behavior), err);
        return BAD("%s: pre_tokenizer Split: \"pattern\" has neither a Regex nor a String", tok->name);
    }
    if (!strcmp(type, "ByteLevel")) {
        if (get_bool(component, "add_prefix_space", 0))
            return BAD("%s: pre_tokenizer ByteLevel: add_prefix_space=true is not supported", tok->name);
        int rc = get_bool(component, "use_regex", 1) ? add_split(tok, gpt2_pattern, 0, "Isolated", err) : ES_OK;
        tok->byte_level = 1;
        return rc;
    }
    return BAD("%s: unsupported pre_tokenizer type \"%s\"", tok->name, type);
}

static int load_normalizer(es_tokenizer *tok, const cJSON *component, es_error *err) {
    if (cJSON_IsNull(component) || !component) return ES_OK;
    const char *type = type_of(component);
    if (!type) return BAD("%s: normalizer: missing \"type\"", tok->name);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = get(component, "normalizers");
        if (!cJSON_IsArray(list)) return BAD("%s: normalizer Sequence: \"normalizers\" is not a list", tok->name);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            int rc = load_normalizer(tok, item, err);
            if (rc) return rc;
        }
        return ES_OK;
    }
    tk_normal_form form = !strcmp(type, "NFC")    ? TK_NORM_NFC
                          : !strcmp(type, "NFD")  ? TK_NORM_NFD
                          : !strcmp(type, "NFKC") ? TK_NORM_NFKC
                          : !strcmp(type, "NFKD") ? TK_NORM_NFKD
                                                  : TK_NORM_NONE;
    if (form == TK_NORM_NONE) return BAD("%s: unsupported normalizer type \"%s\"", tok->name, type);
    if (tok->n_normal_forms == 8) return BAD("%s: normalizer: too many steps", tok->name);
    tok->normal_forms[tok->n_normal_forms++] = form;
    return ES_OK;
}

/* ---- the BPE model ------------------------------------------------------------------- */

/* Id texts live in one arena: 150k small mallocs would cost more than the parsing. */
static int set_id_text(es_tokenizer *tok, int32_t id, const char *text, size_t len) {
    if (!tok->text_arena || tok->text_arena_len + len > tok->text_arena_cap) {
        size_t cap = tok->text_arena_cap ? tok->text_arena_cap * 2 : 1 << 20;
        while (cap < tok->text_arena_len + len) cap *= 2;
        char *grown = realloc(tok->text_arena, cap);
        if (!grown) return -1;
        tok->text_arena = grown;
        tok->text_arena_cap = cap;
    }
    if (len) memcpy(tok->text_arena + tok->text_arena_len, text, len);
    tok->id_text_at[id] = (int64_t)tok->text_arena_len;
    tok->id_text_len[id] = (uint32_t)len;
    tok->text_arena_len += len;
    return 0;
}

static int pair_put(es_tokenizer *tok, int32_t left, int32_t right, int32_t rank, int32_t merged) {
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    size_t mask = tok->n_pair_slots - 1;
    for (size_t at = tk_hash(&key, sizeof key) & mask;; at = (at + 1) & mask) {
        if (tok->pairs[at].key == 0 || tok->pairs[at].key == key) {
            tok->pairs[at] = (tk_pair){key, rank, merged}; /* a repeated merge: the later rank wins */
            return 0;
        }
    }
}

/* Decodes one merge side ("Ġt") to raw bytes and finds its id. */
static int32_t merge_part_id(es_tokenizer *tok, const char *text, size_t len, char *scratch, long *scratch_len) {
    *scratch_len = decode_byte_level(text, len, scratch);
    return *scratch_len < 0 ? -1 : tk_strmap_get(&tok->vocab, scratch, (size_t)*scratch_len);
}

static int load_model(es_tokenizer *tok, const cJSON *model, size_t n_added, es_error *err) {
    const char *type = type_of(model);
    if (!model || !cJSON_IsObject(model)) return BAD("%s: missing \"model\"", tok->name);
    if (!type || strcmp(type, "BPE")) return BAD("%s: unsupported model type \"%s\"", tok->name, type ? type : "(none)");
    const cJSON *vocab = get(model, "vocab"), *merges = get(model, "merges");
    if (!cJSON_IsObject(vocab)) return BAD("%s: model: \"vocab\" is not an object", tok->name);
    if (!cJSON_IsArray(merges)) return BAD("%s: model: \"merges\" is not a list", tok->name);
    const cJSON *dropout = get(model, "dropout");
    if (cJSON_IsNumber(dropout) && number_value(dropout) > 0)
        return BAD("%s: model: BPE dropout is not supported", tok->name);
    if (get_bool(model, "byte_fallback", 0)) return BAD("%s: model: byte_fallback is not supported", tok->name);
    const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *affix = get(model, affixes[i]);
        if (cJSON_IsString(affix) && string_length(affix) > 0)
            return BAD("%s: model: %s is not supported", tok->name, affixes[i]);
    }
    tok->ignore_merges = get_bool(model, "ignore_merges", 0);

    /* Ids: the vocabulary's, then room for added tokens numbered after it (assign_added_ids). */
    int32_t max_id = -1;
    const char *key;
    const cJSON *value;
    cJSON_ArrayForEach(value, vocab) {
        key = value->string;
        if (!is_integer(value) || integer_value(value) < 0 || integer_value(value) > 100000000)
            return BAD("%s: model: vocab entry \"%s\" has no valid id", tok->name, key);
        if (integer_value(value) > max_id) max_id = (int32_t)integer_value(value);
    }
    tok->vocab_count = (int32_t)cJSON_GetArraySize(vocab);
    tok->n_ids = (max_id + 1 > tok->vocab_count ? max_id + 1 : tok->vocab_count) + (int32_t)n_added + 1;
    tok->id_text_at = malloc((size_t)tok->n_ids * sizeof *tok->id_text_at);
    tok->id_text_len = calloc((size_t)tok->n_ids, sizeof *tok->id_text_len);
    if (!tok->id_text_at || !tok->id_text_len) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int32_t id = 0; id < tok->n_ids; id++) tok->id_text_at[id] = -1;
    if (tk_strmap_reserve(&tok->vocab, cJSON_GetArraySize(vocab))) return es_fail(err, ES_ERR_RUNTIME, "out of memory");

    char *scratch = malloc(65536);
    if (!scratch) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (int b = 0; b < 256; b++) tok->byte_token[b] = -1;
    cJSON_ArrayForEach(value, vocab) {
        key = value->string;
        size_t key_len = strlen(key);
        int32_t id = (int32_t)integer_value(value);
        long raw_len = key_len < 65536 ? decode_byte_level(key, key_len, scratch) : -1;
        /* Tokens outside the byte-level alphabet (e.g. specials written plainly) can never
         * come out of byte-level words; they are kept for decoding only. */
        if (raw_len >= 0) {
            if (tk_strmap_put(&tok->vocab, scratch, (size_t)raw_len, id) || set_id_text(tok, id, scratch, (size_t)raw_len)) {
                rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
                break;
            }
            if (raw_len == 1) tok->byte_token[(unsigned char)scratch[0]] = id;
        } else if (tk_strmap_put(&tok->plain_vocab, key, key_len, id) || set_id_text(tok, id, key, key_len)) {
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            break;
        }
    }
    size_t n_merges = cJSON_GetArraySize(merges);
    tok->n_pair_slots = 1024;
    while (tok->n_pair_slots < 2 * n_merges + 2) tok->n_pair_slots *= 2;
    tok->pairs = calloc(tok->n_pair_slots, sizeof *tok->pairs);
    if (!rc && !tok->pairs) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    const cJSON *merge = merges->child;
    for (size_t rank = 0; !rc && rank < n_merges; rank++, merge = merge->next) {
        const char *left, *right;
        size_t left_len, right_len;
        if (cJSON_IsString(merge)) {
            /* "a b": exactly one space, since byte-level tokens hold none */
            left = string_value(merge);
            const char *space = strchr(left, ' ');
            if (!space || strchr(space + 1, ' ')) {
                rc = BAD("%s: model: merge %zu (\"%s\") is not two tokens separated by a space", tok->name, rank, left);
                break;
            }
            left_len = (size_t)(space - left), right = space + 1, right_len = strlen(right);
        } else if (cJSON_IsArray(merge) && cJSON_IsString(merge->child) && cJSON_IsString(merge->child->next) &&
                   !merge->child->next->next) {
            left = string_value(merge->child), left_len = string_length(merge->child);
            right = string_value(merge->child->next), right_len = string_length(merge->child->next);
        } else {
            rc = BAD("%s: model: merge %zu is neither \"a b\" nor [\"a\", \"b\"]", tok->name, rank);
            break;
        }
        if (left_len + right_len >= 32768) {
            rc = BAD("%s: model: merge %zu is too long", tok->name, rank);
            break;
        }
        long left_raw, right_raw;
        int32_t left_id = merge_part_id(tok, left, left_len, scratch, &left_raw);
        int32_t right_id = left_id < 0 ? -1 : merge_part_id(tok, right, right_len, scratch + left_raw, &right_raw);
        if (left_id < 0 || right_id < 0) {
            rc = BAD("%s: model: merge %zu names a token not in the vocabulary: \"%.*s\"", tok->name, rank,
                     (int)(left_id < 0 ? left_len : right_len), left_id < 0 ? left : right);
            break;
        }
        /* scratch now holds left's bytes followed by right's: the merged token */
        int32_t merged = tk_strmap_get(&tok->vocab, scratch, (size_t)(left_raw + right_raw));
        if (merged < 0) {
            rc = BAD("%s: model: merge %zu (\"%.*s\" + \"%.*s\") makes a token not in the vocabulary", tok->name, rank,
                     (int)left_len, left, (int)right_len, right);
            break;
        }
        pair_put(tok, left_id, right_id, (int32_t)rank, merged);
    }
    free(scratch);
    return rc;
}

/* ---- added tokens ---------------------------------------------------------------------- */

static int trie_node(tk_trie *trie, uint8_t byte) {
    if (trie->n_nodes == trie->cap_nodes) {
        size_t cap = trie->cap_nodes ? trie->cap_nodes * 2 : 256;
        tk_trie_node *grown = realloc(trie->nodes, cap * sizeof *grown);
        if (!grown) return -1;
        trie->nodes = grown;
        trie->cap_nodes = cap;
    }
    trie->nodes[trie->n_nodes] = (tk_trie_node){-1, -1, -1, byte};
    return (int)trie->n_nodes++;
}

static int trie_insert(tk_trie *trie, const char *text, size_t len, int32_t added_index) {
    if (len == 0) return 0;
    if (!trie->n_nodes && trie_node(trie, 0) < 0) return -1; /* the root */
    int32_t node = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t byte = (uint8_t)text[i];
        int32_t child = trie->nodes[node].first_child;
        while (child >= 0 && trie->nodes[child].byte != byte) child = trie->nodes[child].next_sibling;
        if (child < 0) {
            child = trie_node(trie, byte);
            if (child < 0) return -1;
            trie->nodes[child].next_sibling = trie->nodes[node].first_child;
            trie->nodes[node].first_child = child;
        }
        node = child;
    }
    /* The same text twice: the first token keeps it (Hugging Face builds its matcher from
     * specials first, then the others, and the first pattern wins). */
    if (trie->nodes[node].added < 0) trie->nodes[node].added = added_index;
    trie->can_start[(uint8_t)text[0]] = 1;
    return 0;
}

static int load_added_tokens(es_tokenizer *tok, const cJSON *list, es_error *err) {
    if (!list || cJSON_IsNull(list)) return ES_OK;
    if (!cJSON_IsArray(list)) return BAD("%s: \"added_tokens\" is not a list", tok->name);
    tok->added = calloc(cJSON_GetArraySize(list) + 1, sizeof *tok->added);
    if (!tok->added) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    size_t i = (size_t)-1;
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        i++;
        const cJSON *id = get(item, "id"), *content = get(item, "content");
        if (!is_integer(id) || !cJSON_IsString(content))
            return BAD("%s: added_tokens[%zu]: needs an integer \"id\" and a string \"content\"", tok->name, i);
        tk_added *added = &tok->added[tok->n_added++];
        added->id = -1; /* assigned by assign_added_ids, as Hugging Face assigns it */
        added->content = strdup(string_value(content));
        if (!added->content) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        added->special = get_bool(item, "special", 0);
        added->single_word = get_bool(item, "single_word", 0);
        added->lstrip = get_bool(item, "lstrip", 0);
        added->rstrip = get_bool(item, "rstrip", 0);
        added->normalized = get_bool(item, "normalized", !added->special);
    }
    return ES_OK;
}

static int same_added(const tk_added *a, const tk_added *b) {
    return !strcmp(a->content, b->content) && a->special == b->special && a->single_word == b->single_word &&
           a->lstrip == b->lstrip && a->rstrip == b->rstrip && a->normalized == b->normalized;
}

/* Hugging Face ignores the ids written in added_tokens: a token whose text is already known
 * (an earlier added token, or the model vocabulary) takes that id; a new one the next id
 * after the vocabulary (or after the largest added id past it). Repeats of an identical
 * token are dropped; the last token given an id decides its flags. */
static int assign_added_ids(es_tokenizer *tok, es_error *err) {
    tk_strmap by_text = {0};
    int32_t max_added = -1;
    size_t kept = 0;
    int rc = ES_OK;
    for (size_t i = 0; i < tok->n_added && !rc; i++) {
        tk_added token = tok->added[i];
        int duplicate = !token.content[0];
        for (size_t k = 0; k < kept && !duplicate; k++) duplicate = same_added(&tok->added[k], &token);
        if (duplicate) {
            free(token.content);
            continue;
        }
        int32_t id = tk_strmap_get(&by_text, token.content, strlen(token.content));
        if (id < 0) id = es_tokenizer_token_id(tok, token.content);
        if (id < 0) id = max_added < 0 ? tok->vocab_count : max_added >= tok->vocab_count ? max_added + 1 : tok->vocab_count;
        if (id >= tok->n_ids) rc = BAD("%s: added_tokens: too many tokens", tok->name);
        else if (tk_strmap_put(&by_text, token.content, strlen(token.content), id)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (id > max_added) max_added = id;
        token.id = id;
        tok->added[kept++] = token;
    }
    for (size_t i = kept; i < tok->n_added; i++) tok->added[i].content = NULL;
    tok->n_added = kept;
    tk_strmap_free(&by_text);
    /* Trim the id range to what is used. */
    int32_t n_ids = 0;
    for (int32_t id = 0; id < tok->n_ids; id++)
        if (tok->id_text_at[id] >= 0) n_ids = id + 1;
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].id + 1 > n_ids) n_ids = tok->added[i].id + 1;
    tok->n_ids = n_ids;
    return rc;
}

/* After the normalizer is known: the texts to match, and the two tries. */
static int build_added_matchers(es_tokenizer *tok, es_error *err) {
    tok->added_by_id = malloc((size_t)tok->n_ids * sizeof *tok->added_by_id);
    if (!tok->added_by_id) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int32_t id = 0; id < tok->n_ids; id++) tok->added_by_id[id] = -1;
    /* Specials go into the tries before the others, as Hugging Face orders its patterns. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < tok->n_added; i++) {
            tk_added *added = &tok->added[i];
            if (added->special != (pass == 0)) continue;
            tok->added_by_id[added->id] = (int32_t)i; /* each pass in file order: the last one wins */
            if (!added->match) {
                int rc = added->normalized ? tk_normalize_text(tok, added->content, strlen(added->content), &added->match,
                                                               &added->match_len)
                                           : 0;
                if (!added->normalized) {
                    added->match = strdup(added->content);
                    added->match_len = strlen(added->content);
                }
                if (rc || !added->match) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
            }
            /* Decoding maps an added token through the byte-level alphabet when it can
             * (as Hugging Face's ByteLevel decoder does), else keeps its text. */
            size_t content_len = strlen(added->content);
            char *decoded = malloc(content_len + 1);
            long decoded_len = decoded ? decode_byte_level(added->content, content_len, decoded) : -1;
            int failed = decoded_len >= 0 ? set_id_text(tok, added->id, decoded, (size_t)decoded_len)
                                          : set_id_text(tok, added->id, added->content, content_len);
            free(decoded);
            if (failed ||
                trie_insert(added->normalized ? &tok->normalized_trie : &tok->raw_trie, added->match, added->match_len,
                            (int32_t)i))
                return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        }
    }
    return ES_OK;
}

/* ---- post-processor ------------------------------------------------------------------- */

int tk_add_template_item(es_tokenizer *tok, int is_sequence, const int32_t *ids, size_t n_ids, es_error *err) {
    tk_template_item *grown = realloc(tok->template_items, (tok->n_template_items + 1) * sizeof *grown);
    if (!grown) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    tok->template_items = grown;
    tk_template_item *item = &tok->template_items[tok->n_template_items++];
    item->is_sequence = is_sequence;
    item->n_ids = n_ids;
    item->ids = n_ids ? malloc(n_ids * sizeof *ids) : NULL;
    if (n_ids && !item->ids) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (n_ids) memcpy(item->ids, ids, n_ids * sizeof *ids);
    return ES_OK;
}

void tk_clear_template(es_tokenizer *tok) {
    for (size_t i = 0; i < tok->n_template_items; i++) free(tok->template_items[i].ids);
    free(tok->template_items);
    tok->template_items = NULL;
    tok->n_template_items = 0;
}

static int load_template(es_tokenizer *tok, const cJSON *component, es_error *err) {
    const cJSON *single = get(component, "single"), *specials = get(component, "special_tokens");
    if (!cJSON_IsArray(single)) return BAD("%s: post_processor TemplateProcessing: \"single\" is not a list", tok->name);
    tk_clear_template(tok);
    size_t i = (size_t)-1;
    const cJSON *item;
    cJSON_ArrayForEach(item, single) {
        i++;
        const cJSON *special = get(item, "SpecialToken");
        if (get(item, "Sequence")) {
            int rc = tk_add_template_item(tok, 1, NULL, 0, err);
            if (rc) return rc;
            continue;
        }
        const cJSON *name = get(special, "id");
        const cJSON *entry = cJSON_IsString(name) ? get(specials, string_value(name)) : NULL;
        const cJSON *ids = get(entry, "ids");
        if (!cJSON_IsArray(ids))
            return BAD("%s: post_processor TemplateProcessing: item %zu names no special token with \"ids\"", tok->name, i);
        int32_t values[16];
        size_t n = cJSON_GetArraySize(ids);
        if (n > 16) return BAD("%s: post_processor TemplateProcessing: too many ids in item %zu", tok->name, i);
        size_t k = 0;
        for (const cJSON *id = ids->child; id; id = id->next, k++) {
            if (!is_integer(id) || integer_value(id) < 0 || integer_value(id) >= tok->n_ids)
                return BAD("%s: post_processor TemplateProcessing: item %zu: id outside the vocabulary", tok->name, i);
            values[k] = (int32_t)integer_value(id);
        }
        int rc = tk_add_template_item(tok, 0, values, n, err);
        if (rc) return rc;
    }
    return ES_OK;
}

static int load_post_processor(es_tokenizer *tok, const cJSON *component, es_error *err) {
    if (!component || cJSON_IsNull(component)) return ES_OK;
    const char *type = type_of(component);
    if (!type) return BAD("%s: post_processor: missing \"type\"", tok->name);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = get(component, "processors");
        if (!cJSON_IsArray(list)) return BAD("%s: post_processor Sequence: \"processors\" is not a list", tok->name);
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            int rc = load_post_processor(tok, item, err);
            if (rc) return rc;
        }
        return ES_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        tok->trim_offsets = get_bool(component, "trim_offsets", 0);
        tok->trim_prefix_space = get_bool(component, "add_prefix_space", 1);
        return ES_OK;
    }
    if (!strcmp(type, "TemplateProcessing")) return load_template(tok, component, err);
    return BAD("%s: unsupported post_processor type \"%s\"", tok->name, type);
}

static int check_decoder(es_tokenizer *tok, const cJSON *component, es_error *err) {
    if (!component || cJSON_IsNull(component)) return ES_OK;
    const char *type = type_of(component);
    if (type && !strcmp(type, "ByteLevel")) return ES_OK;
    return BAD("%s: unsupported decoder type \"%s\"", tok->name, type ? type : "(none)");
}

/* Parses JSON text; a syntax error names the file, line and column. */
cJSON *tk_parse_json(const char *text, size_t len, const char *name, es_error *err) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (root) {
        /* only white space may follow the value */
        size_t at = (size_t)(end - text);
        while (at < len && (text[at] == ' ' || text[at] == '\n' || text[at] == '\r' || text[at] == '\t')) at++;
        if (at == len || text[at] == '\0') return root;
        cJSON_Delete(root);
    }
    size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : len;
    long line = 1, column = 1;
    for (size_t k = 0; k < at; k++) line += text[k] == '\n', column = text[k] == '\n' ? 1 : column + 1;
    es_fail(err, ES_ERR_DATA, "%s:%ld:%ld: invalid JSON%s", name, line, column, at >= len ? " (truncated?)" : "");
    return NULL;
}

/* ---- loading ------------------------------------------------------------------------- */

static int load_components(es_tokenizer *tok, cJSON *root, es_error *err) {
    if (!cJSON_IsObject(root)) return BAD("%s: not a JSON object", tok->name);
    const cJSON *model = get(root, "model");
    if (!model) return BAD("%s: missing \"model\"", tok->name);
    int rc = load_added_tokens(tok, get(root, "added_tokens"), err);
    if (!rc) rc = load_normalizer(tok, get(root, "normalizer"), err);
    if (!rc) rc = load_pre_tokenizer(tok, get(root, "pre_tokenizer"), err);
    if (!rc && !tok->byte_level)
        rc = BAD("%s: pre_tokenizer: only byte-level BPE is supported (no ByteLevel pre-tokenizer found)", tok->name);
    if (!rc) rc = load_model(tok, model, tok->n_added, err);
    if (!rc) rc = assign_added_ids(tok, err);
    if (!rc) rc = build_added_matchers(tok, err);
    if (!rc) rc = load_post_processor(tok, get(root, "post_processor"), err);
    if (!rc) rc = check_decoder(tok, get(root, "decoder"), err);
    if (!rc)
        for (int b = 0; b < 256 && !rc; b++)
            if (tok->byte_token[b] < 0) rc = BAD("%s: model: byte-level vocabulary lacks the token for byte 0x%02x", tok->name, b);
    return rc;
}



int es_tokenizer_load_json(const char *json, size_t len, const char *name, es_tokenizer **out, es_error *err) {
    *out = NULL;
    init_byte_alphabet();
    es_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok || !(tok->name = strdup(name))) {
        free(tok);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    tok->bos_id = -1;
    pthread_mutex_init(&tok->workspaces_lock, NULL);
    if (pthread_key_create(&tok->cache_key, tk_workspace_release) == 0) tok->has_cache_key = 1;
    cJSON *root = tk_parse_json(json, len, name, err);
    int rc = root ? load_components(tok, root, err) : err->code;
    cJSON_Delete(root);
    if (rc) {
        es_tokenizer_free(tok);
        return rc;
    }
    *out = tok;
    return ES_OK;
}

int tk_read_file(const char *path, char **data, size_t *len, es_error *err) {
    FILE *file = fopen(path, "rb");
    if (!file) return es_fail(err, errno == ENOENT ? ES_ERR_USAGE : ES_ERR_RUNTIME, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(file), &st) != 0 || !(*data = malloc((size_t)st.st_size + 1))) {
        fclose(file);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot read", path);
    }
    *len = fread(*data, 1, (size_t)st.st_size, file);
    int failed = ferror(file);
    fclose(file);
    if (failed) {
        free(*data);
        return es_fail(err, ES_ERR_RUNTIME, "%s: read error", path);
    }
    return ES_OK;
}

int es_tokenizer_load(const char *path, es_tokenizer **out, es_error *err) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0) return es_fail(err, ES_ERR_USAGE, "%s: %s", path, strerror(errno));
    int is_folder = S_ISDIR(st.st_mode);
    char *file_path = NULL, *config_path = NULL;
    if (is_folder && (asprintf(&file_path, "%s/tokenizer.json", path) < 0 ||
                      asprintf(&config_path, "%s/tokenizer_config.json", path) < 0))
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    char *data = NULL;
    size_t len = 0;
    int rc = tk_read_file(is_folder ? file_path : path, &data, &len, err);
    if (!rc) rc = es_tokenizer_load_json(data, len, is_folder ? file_path : path, out, err);
    if (!rc && is_folder && stat(config_path, &st) == 0) rc = tk_apply_tokenizer_config(*out, config_path, err);
    if (rc && *out) {
        es_tokenizer_free(*out);
        *out = NULL;
    }
    free(data), free(file_path), free(config_path);
    return rc;
}

void es_tokenizer_free(es_tokenizer *tok) {
    if (!tok) return;
    for (int i = 0; i < tok->n_splits; i++) pcre2_code_free(tok->splits[i].regex);
    free(tok->splits);
    tk_strmap_free(&tok->vocab);
    tk_strmap_free(&tok->plain_vocab);
    free(tok->pairs);
    free(tok->id_text_at), free(tok->id_text_len), free(tok->text_arena);
    for (size_t i = 0; i < tok->n_added; i++) free(tok->added[i].content), free(tok->added[i].match);
    free(tok->added), free(tok->added_by_id);
    free(tok->raw_trie.nodes), free(tok->normalized_trie.nodes);
    tk_clear_template(tok);
    if (tok->has_cache_key) {
        pthread_key_delete(tok->cache_key); /* no destructor runs after this */
        tk_workspaces_free_all(tok);       /* every thread's, this one's included */
    }
    pthread_mutex_destroy(&tok->workspaces_lock);
    free(tok->name);
    free(tok);
}

int32_t es_tokenizer_vocab_size(const es_tokenizer *tok) { return tok->n_ids; }

int32_t es_tokenizer_token_id(const es_tokenizer *tok, const char *token) {
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].id >= 0 && !strcmp(tok->added[i].content, token)) return tok->added[i].id;
    size_t len = strlen(token);
    char *raw = malloc(len + 1);
    long raw_len = raw ? decode_byte_level(token, len, raw) : -1;
    int32_t id = raw_len >= 0 ? tk_strmap_get(&tok->vocab, raw, (size_t)raw_len) : -1;
    free(raw);
    return id >= 0 ? id : tk_strmap_get(&tok->plain_vocab, token, len);
}

size_t es_tokenizer_added_specials(const es_tokenizer *tok, int32_t *ids, size_t max) {
    size_t n = 0;
    for (size_t i = 0; i < tok->n_template_items; i++)
        for (size_t k = 0; !tok->template_items[i].is_sequence && k < tok->template_items[i].n_ids; k++, n++)
            if (n < max) ids[n] = tok->template_items[i].ids[k];
    return n;
}
