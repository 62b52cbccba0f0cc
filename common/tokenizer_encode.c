/* Encoding and decoding with a loaded tokenizer (loading: tokenizer.c).
 *
 * encode: added tokens on the original text -> normalizer -> added tokens on the normalized
 * text -> pre-tokenizer splits -> BPE per word -> post-processor. Spans are carried as one
 * original [start, end) per normalized byte, so every token maps back to the text. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer_internal.h"
#include "unicode_norm_new.h"
#include "utf8.h"

typedef int32_t span_t[2];

typedef struct piece {
    size_t start, end; /* bytes of the normalized buffer */
} piece;

/* Per-thread scratch and word cache: a loaded tokenizer stays read-only. */
typedef struct tk_workspace {
    es_tokenizer *owner;
    struct tk_workspace *prev, *next; /* the owner's list */
    tk_strmap cache;          /* word bytes -> index into cache_tokens */
    int32_t *cache_tokens;    /* per word: count, then (id, end offset in the word) pairs */
    size_t cache_len, cache_cap;
    char *norm;               /* normalized text of the current segment */
    span_t *norm_span;        /* original span of each normalized byte */
    size_t norm_cap;
    piece *pieces, *next_pieces; /* the pre-tokenizer's pieces, before and after a split */
    size_t pieces_cap, next_cap;
    pcre2_match_data *match;
    /* a regex that failed to run (not "no match"): PCRE2's error, where, which Split */
    int match_error, match_error_split;
    int32_t match_error_at;
    int32_t *sym_id, *sym_start, *sym_end, *sym_prev, *sym_next;
    size_t sym_cap;
} tk_workspace;

enum { CACHE_MAX_WORDS = 1 << 18, CACHE_MAX_WORD_BYTES = 256 };

static void workspace_free(tk_workspace *ws) {
    tk_strmap_free(&ws->cache);
    free(ws->cache_tokens), free(ws->norm), free(ws->norm_span), free(ws->pieces), free(ws->next_pieces);
    pcre2_match_data_free(ws->match);
    free(ws->sym_id), free(ws->sym_start), free(ws->sym_end), free(ws->sym_prev), free(ws->sym_next);
    free(ws);
}

void tk_workspace_release(void *p) {
    tk_workspace *ws = p;
    if (!ws) return;
    es_tokenizer *tok = ws->owner;
    pthread_mutex_lock(&tok->workspaces_lock);
    if (ws->prev) ws->prev->next = ws->next;
    else tok->workspaces = ws->next;
    if (ws->next) ws->next->prev = ws->prev;
    pthread_mutex_unlock(&tok->workspaces_lock);
    workspace_free(ws);
}

void tk_workspaces_free_all(es_tokenizer *tok) {
    for (tk_workspace *ws = tok->workspaces, *next; ws; ws = next) {
        next = ws->next;
        workspace_free(ws);
    }
    tok->workspaces = NULL;
}

static tk_workspace *workspace(const es_tokenizer *tok) {
    tk_workspace *ws = tok->has_cache_key ? pthread_getspecific(tok->cache_key) : NULL;
    if (ws) return ws;
    if (!tok->has_cache_key) return NULL;
    ws = calloc(1, sizeof *ws);
    if (!ws || !(ws->match = pcre2_match_data_create(16, NULL))) {
        free(ws);
        return NULL;
    }
    /* The list is the one mutable part of a loaded tokenizer, behind its lock. */
    es_tokenizer *owner = (es_tokenizer *)tok;
    ws->owner = owner;
    pthread_mutex_lock(&owner->workspaces_lock);
    ws->next = owner->workspaces;
    if (owner->workspaces) owner->workspaces->prev = ws;
    owner->workspaces = ws;
    pthread_mutex_unlock(&owner->workspaces_lock);
    pthread_setspecific(tok->cache_key, ws);
    return ws;
}

static int grow(void **buffer, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *grown = realloc(*buffer, n * elem);
    if (!grown) return -1;
    *buffer = grown;
    *cap = n;
    return 0;
}

static int push_token(es_encoding *out, int32_t id, int32_t start, int32_t end) {
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 256;
        int32_t *ids = realloc(out->ids, cap * sizeof *ids);
        if (ids) out->ids = ids;
        span_t *spans = realloc(out->spans, cap * sizeof *spans);
        if (spans) out->spans = spans;
        if (!ids || !spans) return -1;
        out->cap = cap;
    }
    out->ids[out->n] = id;
    out->spans[out->n][0] = start;
    out->spans[out->n][1] = end;
    out->n++;
    return 0;
}

static uint32_t next_codepoint(const char *text, size_t len, size_t *at) {
    utf8proc_int32_t codepoint = 0;
    utf8proc_ssize_t step = utf8proc_iterate((const utf8proc_uint8_t *)text + *at, (utf8proc_ssize_t)(len - *at), &codepoint);
    *at += step > 0 ? (size_t)step : 1;
    return (uint32_t)codepoint;
}

static uint32_t previous_codepoint(const char *text, size_t at) {
    size_t start = at;
    do start--;
    while (start > 0 && ((unsigned char)text[start] & 0xc0) == 0x80);
    return next_codepoint(text, at, &start);
}

/* ---- normalization -------------------------------------------------------------------- */

/* Where text may be cut into chunks that normalize on their own: before a code point whose
 * full decomposition (canonical; compatibility under NFKC/NFKD) starts with a starter (class 0)
 * that no canonical composition takes as its second part. So not before a mark, a Hangul vowel
 * or U+0BBE (they compose with what precedes), U+0F73 (it decomposes to marks that reorder with
 * the marks before it) or, under NFKC, U+FF9E (it becomes the mark U+3099). Computed once from
 * utf8proc's data; from U+20000 on, class-0 code points decompose to single ideographs at most. */
enum { BOUNDARY_LIMIT = 0x20000 };
static uint8_t no_boundary_before[2][BOUNDARY_LIMIT / 8]; /* [compatibility][code point] bits */

static void set_bit(uint8_t *bits, utf8proc_int32_t c) { bits[c / 8] |= (uint8_t)(1u << (c % 8)); }
static int bit(const uint8_t *bits, utf8proc_int32_t c) { return bits[c / 8] >> (c % 8) & 1; }
static int combining_class(utf8proc_int32_t c) { return utf8proc_get_property(c)->combining_class; }

static void build_boundaries(void) {
    static uint8_t composition_second[BOUNDARY_LIMIT / 8];
    utf8proc_int32_t parts[32]; /* the longest full decomposition has 18 code points */
    int boundclass;
    for (utf8proc_int32_t c = 0; c < BOUNDARY_LIMIT; c++) {
        /* a composite's second part is the last code point of its full decomposition */
        utf8proc_ssize_t n = utf8proc_decompose_char(c, parts, 32, UTF8PROC_DECOMPOSE, &boundclass);
        if (n >= 2 && n <= 32 && parts[n - 1] < BOUNDARY_LIMIT && combining_class(parts[n - 1]) == 0)
            set_bit(composition_second, parts[n - 1]);
    }
    for (int compatibility = 0; compatibility < 2; compatibility++) {
        utf8proc_option_t options = UTF8PROC_DECOMPOSE | (compatibility ? UTF8PROC_COMPAT : 0);
        for (utf8proc_int32_t c = 0; c < BOUNDARY_LIMIT; c++) {
            utf8proc_ssize_t n = utf8proc_decompose_char(c, parts, 32, options, &boundclass);
            utf8proc_int32_t first = n >= 1 && n <= 32 ? parts[0] : c;
            /* (a few CJK compatibility ideographs decompose to ideographs past U+20000: starters) */
            if (combining_class(c) || combining_class(first) || (first < BOUNDARY_LIMIT && bit(composition_second, first)))
                set_bit(no_boundary_before[compatibility], c);
        }
    }
}

/* Code points that utf8proc (Unicode 15) normalizes but Hugging Face's normalizers (Unicode 9.0
 * tables) do not know: there they behave as unassigned (class 0, no decomposition, no
 * composition), so they are kept verbatim and the text between them is normalized on its own,
 * which gives what Hugging Face's normalization of the whole text gives (common/unicode_norm_new.h). */
static int unknown_to_hf(uint32_t c) {
    size_t low = 0, high = sizeof es_unicode_norm_new / sizeof *es_unicode_norm_new;
    if (c < es_unicode_norm_new[0].first) return 0;
    while (low < high) {
        size_t mid = low + (high - low) / 2;
        if (c < es_unicode_norm_new[mid].first) high = mid;
        else if (c > es_unicode_norm_new[mid].last) low = mid + 1;
        else return 1;
    }
    return 0;
}

static int chunk_can_start(uint32_t c, int compatibility) {
    if (c < 0x80 || unknown_to_hf(c)) return 1;
    if (c >= BOUNDARY_LIMIT) return combining_class((utf8proc_int32_t)c) == 0;
    return !bit(no_boundary_before[compatibility], (utf8proc_int32_t)c);
}

static utf8proc_option_t form_options(tk_normal_form form) {
    switch (form) {
    case TK_NORM_NFC: return UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    case TK_NORM_NFD: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE;
    case TK_NORM_NFKC: return UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    case TK_NORM_NFKD: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    default: return 0;
    }
}

static int reserve_norm(tk_workspace *ws, size_t need) {
    if (need <= ws->norm_cap) return 0;
    size_t cap = ws->norm_cap ? ws->norm_cap : 256;
    while (cap < need) cap *= 2;
    char *norm = realloc(ws->norm, cap);
    if (!norm) return -1;
    ws->norm = norm;
    span_t *spans = realloc(ws->norm_span, cap * sizeof *spans);
    if (!spans) return -1;
    ws->norm_span = spans;
    ws->norm_cap = cap;
    return 0;
}

/* Copies unchanged text to ws->norm[out...]: each byte gets its character's span. */
static void copy_with_spans(tk_workspace *ws, size_t out, const char *text, size_t len, size_t base) {
    memcpy(ws->norm + out, text, len);
    span_t *spans = ws->norm_span + out;
    for (size_t k = 0; k < len;) {
        if ((unsigned char)text[k] < 0x80) {
            spans[k][0] = (int32_t)(base + k), spans[k][1] = (int32_t)(base + k + 1);
            k++;
            continue;
        }
        size_t char_start = k;
        next_codepoint(text, len, &k);
        for (size_t b = char_start; b < k; b++) spans[b][0] = (int32_t)(base + char_start), spans[b][1] = (int32_t)(base + k);
    }
}

static int all_ascii(const char *text, size_t len) {
    for (size_t k = 0; k < len; k++)
        if ((unsigned char)text[k] >= 0x80) return 0;
    return 1;
}

/* Applies every normal form of the normalizer to one chunk; NULL when out of memory. */
static utf8proc_uint8_t *normalize_chunk(const es_tokenizer *tok, const char *chunk, size_t len, size_t *out_len) {
    utf8proc_uint8_t *mapped = NULL;
    *out_len = len;
    for (int f = 0; f < tok->n_normal_forms; f++) {
        utf8proc_uint8_t *next = NULL;
        utf8proc_ssize_t n = utf8proc_map(mapped ? mapped : (const utf8proc_uint8_t *)chunk, (utf8proc_ssize_t)*out_len,
                                          &next, form_options(tok->normal_forms[f]));
        free(mapped);
        if (n < 0) return NULL;
        mapped = next;
        *out_len = (size_t)n;
    }
    return mapped;
}

/* Normalizes text[0, len) (whose first byte is at `base` in the original) into ws->norm
 * with each output byte's original span. Text is cut into chunks that normalize on their
 * own (a starter and what may compose with it; a code point Hugging Face's tables lack is a
 * chunk of its own, kept verbatim); an unchanged chunk keeps per-character
 * spans, a changed one maps all its output to the chunk's span. Returns the normalized
 * length, or -1 when out of memory. */
static long normalize(const es_tokenizer *tok, tk_workspace *ws, const char *text, size_t len, size_t base) {
    if (reserve_norm(ws, len + 1)) return -1;
    if (!tok->n_normal_forms || all_ascii(text, len)) { /* ASCII is invariant under every normal form */
        copy_with_spans(ws, 0, text, len, base);
        return (long)len;
    }
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, build_boundaries);
    int compatibility = 0;
    for (int f = 0; f < tok->n_normal_forms; f++)
        compatibility |= tok->normal_forms[f] == TK_NORM_NFKC || tok->normal_forms[f] == TK_NORM_NFKD;
    size_t out = 0, at = 0;
    while (at < len) {
        size_t chunk_start = at;
        int verbatim = unknown_to_hf(next_codepoint(text, len, &at)); /* a chunk of its own, kept as it is */
        while (!verbatim && at < len) {
            size_t probe = at;
            if (chunk_can_start(next_codepoint(text, len, &probe), compatibility)) break;
            at = probe;
        }
        const char *chunk = text + chunk_start;
        size_t chunk_len = at - chunk_start, mapped_len = chunk_len;
        int unchanged = verbatim || all_ascii(chunk, chunk_len);
        utf8proc_uint8_t *mapped = unchanged ? NULL : normalize_chunk(tok, chunk, chunk_len, &mapped_len);
        if (!mapped && !unchanged) return -1;
        int changed = mapped && (mapped_len != chunk_len || memcmp(mapped, chunk, chunk_len));
        if (reserve_norm(ws, out + (changed ? mapped_len : chunk_len) + 1)) {
            free(mapped);
            return -1;
        }
        if (changed) {
            memcpy(ws->norm + out, mapped, mapped_len);
            for (size_t k = 0; k < mapped_len; k++)
                ws->norm_span[out + k][0] = (int32_t)(base + chunk_start), ws->norm_span[out + k][1] = (int32_t)(base + at);
            out += mapped_len;
        } else {
            copy_with_spans(ws, out, chunk, chunk_len, base + chunk_start);
            out += chunk_len;
        }
        free(mapped);
    }
    return (long)out;
}

int tk_normalize_text(const es_tokenizer *tok, const char *text, size_t len, char **out, size_t *out_len) {
    tk_workspace scratch = {0};
    long n = normalize(tok, &scratch, text, len, 0);
    if (n >= 0 && (*out = malloc((size_t)n + 1))) {
        memcpy(*out, scratch.norm, (size_t)n);
        (*out)[n] = '\0';
        *out_len = (size_t)n;
    }
    free(scratch.norm), free(scratch.norm_span);
    return n >= 0 && *out ? 0 : -1;
}

/* ---- added tokens --------------------------------------------------------------------- */

static size_t previous_char_start(const char *text, size_t at) {
    do at--;
    while (at > 0 && ((unsigned char)text[at] & 0xc0) == 0x80);
    return at;
}

/* The longest added token starting at s[pos] (its index, or -1) and where it ends. */
static int32_t longest_added(const tk_trie *trie, const char *s, size_t n, size_t pos, size_t *end) {
    int32_t node = 0, best = -1;
    for (size_t k = pos; k < n; k++) {
        int32_t child = trie->nodes[node].first_child;
        while (child >= 0 && trie->nodes[child].byte != (uint8_t)s[k]) child = trie->nodes[child].next_sibling;
        if (child < 0) break;
        node = child;
        if (trie->nodes[node].added >= 0) best = trie->nodes[node].added, *end = k + 1;
    }
    return best;
}

typedef int (*segment_fn)(const es_tokenizer *tok, tk_workspace *ws, void *ctx, size_t start, size_t end, int32_t added);

/* Cuts s[0, n) at added tokens as Hugging Face does: leftmost-longest matches, scanned
 * left to right without overlap; single_word matches need non-word characters (or the
 * edge) on both sides; lstrip/rstrip pull neighbouring white space into the token. Every
 * piece goes to emit() in order (added = index into tok->added, or -1 for plain text). */
static int split_added(const es_tokenizer *tok, tk_workspace *ws, const tk_trie *trie, const char *s, size_t n,
                       segment_fn emit, void *ctx) {
    if (!trie->n_nodes) return n ? emit(tok, ws, ctx, 0, n, -1) : 0;
    size_t start_offset = 0, pos = 0;
    int rc = 0;
    while (pos < n && !rc) {
        size_t match_end = 0;
        int32_t added = trie->can_start[(uint8_t)s[pos]] ? longest_added(trie, s, n, pos, &match_end) : -1;
        if (added < 0) {
            pos++;
            continue;
        }
        /* The flags are those of the token last given this id (Hugging Face keeps one per id). */
        const tk_added *token = &tok->added[tok->added_by_id[tok->added[added].id]];
        size_t start = pos, stop = match_end;
        pos = match_end; /* the next search starts after this match, whatever happens to it */
        if (token->single_word) {
            size_t after = stop;
            int word_before = start > 0 && tk_is_word_char(previous_codepoint(s, start));
            int word_after = stop < n && tk_is_word_char(next_codepoint(s, n, &after));
            if (word_before || word_after) continue;
        }
        if (token->lstrip) {
            size_t new_start = start;
            while (new_start > 0 && tk_is_white_space(previous_codepoint(s, new_start)))
                new_start = previous_char_start(s, new_start);
            start = new_start > start_offset ? new_start : start_offset;
        }
        if (token->rstrip) {
            while (stop < n) {
                size_t after = stop;
                if (!tk_is_white_space(next_codepoint(s, n, &after))) break;
                stop = after;
            }
        }
        if (start_offset < start) rc = emit(tok, ws, ctx, start_offset, start, -1);
        if (!rc) rc = emit(tok, ws, ctx, start, stop, added);
        start_offset = stop;
    }
    if (!rc && start_offset < n) rc = emit(tok, ws, ctx, start_offset, n, -1);
    return rc;
}

/* ---- pre-tokenizer -------------------------------------------------------------------- */

static int add_piece(piece **pieces, size_t *n, size_t *cap, size_t start, size_t end) {
    if (start >= end) return 0;
    if (grow((void **)pieces, cap, *n + 1, sizeof **pieces)) return -1;
    (*pieces)[(*n)++] = (piece){start, end};
    return 0;
}

/* One regex search. JIT first; when its stack (32 KiB) runs out, as patterns that backtrack
 * through long repeats make it, the interpreter, whose backtracking lives on the heap. Returns
 * PCRE2's result: a match (> 0), PCRE2_ERROR_NOMATCH, or an error (match or depth limit,
 * no memory, ...) that the caller must report: taking it as "no more matches" would make the
 * rest of the text one piece and give other ids than Hugging Face's (whose regexes never fail). */
static int search(const tk_split *split, tk_workspace *ws, const char *subject, size_t len, size_t offset) {
    int rc = pcre2_match(split->regex, (PCRE2_SPTR)subject, len, offset, PCRE2_NO_UTF_CHECK, ws->match, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(split->regex, (PCRE2_SPTR)subject, len, offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, ws->match, NULL);
    return rc;
}

/* Splits one piece by one regex into `out`, with the Split behaviour's rule for matches.
 * Returns 0, or -1 when out of memory or when the regex failed (ws->match_error set). */
static int split_piece(const es_tokenizer *tok, const tk_split *split, tk_workspace *ws, piece whole, piece **out,
                       size_t *n_out, size_t *cap) {
    const char *subject = ws->norm + whole.start;
    size_t len = whole.end - whole.start, offset = 0, last = 0;
    size_t pending_start = 0;
    int pending = 0; /* MergedWithNext: a match waiting for the text after it */
    while (offset <= len) {
        int rc = search(split, ws, subject, len, offset);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            ws->match_error = rc;
            ws->match_error_split = (int)(split - tok->splits) + 1;
            ws->match_error_at = ws->norm_span[whole.start + (offset < len ? offset : len - 1)][0];
            return -1;
        }
        PCRE2_SIZE *ovector = pcre2_get_ovector_pointer(ws->match);
        size_t match_start = ovector[0], match_end = ovector[1];
        if (match_end == match_start) { /* empty matches split nothing */
            if (match_start >= len) break;
            offset = match_start;
            next_codepoint(subject, len, &offset);
            continue;
        }
        size_t gap_start = pending ? pending_start : last;
        switch (split->behavior) {
        case TK_SPLIT_ISOLATED:
            if (add_piece(out, n_out, cap, whole.start + last, whole.start + match_start) ||
                add_piece(out, n_out, cap, whole.start + match_start, whole.start + match_end))
                return -1;
            break;
        case TK_SPLIT_REMOVED:
            if (add_piece(out, n_out, cap, whole.start + last, whole.start + match_start)) return -1;
            break;
        case TK_SPLIT_MERGED_PREVIOUS: /* the match ends the text before it */
            if (add_piece(out, n_out, cap, whole.start + last, whole.start + match_end)) return -1;
            break;
        case TK_SPLIT_MERGED_NEXT: /* the match starts the text after it */
            if (add_piece(out, n_out, cap, whole.start + gap_start, whole.start + match_start)) return -1;
            pending = 1, pending_start = match_start;
            break;
        }
        last = offset = match_end;
    }
    size_t tail_start = split->behavior == TK_SPLIT_MERGED_NEXT && pending ? pending_start : last;
    return add_piece(out, n_out, cap, whole.start + tail_start, whole.start + len);
}

/* ---- BPE -------------------------------------------------------------------------------- */

static int32_t pair_rank(const es_tokenizer *tok, int32_t left, int32_t right, int32_t *merged) {
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    size_t mask = tok->n_pair_slots - 1;
    for (size_t at = tk_hash(&key, sizeof key) & mask;; at = (at + 1) & mask) {
        const tk_pair *pair = &tok->pairs[at];
        if (pair->key == key) {
            *merged = pair->merged;
            return pair->rank;
        }
        if (pair->key == 0) return -1;
    }
}

typedef struct heap_entry {
    int32_t rank, pos;
} heap_entry;

static int heap_less(heap_entry a, heap_entry b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void heap_push(heap_entry *heap, size_t *n, heap_entry entry) {
    size_t at = (*n)++;
    while (at > 0 && heap_less(entry, heap[(at - 1) / 2])) {
        heap[at] = heap[(at - 1) / 2];
        at = (at - 1) / 2;
    }
    heap[at] = entry;
}

static heap_entry heap_pop(heap_entry *heap, size_t *n) {
    heap_entry top = heap[0], last = heap[--(*n)];
    size_t at = 0;
    for (;;) {
        size_t child = 2 * at + 1;
        if (child >= *n) break;
        if (child + 1 < *n && heap_less(heap[child + 1], heap[child])) child++;
        if (!heap_less(heap[child], last)) break;
        heap[at] = heap[child];
        at = child;
    }
    if (*n) heap[at] = last;
    return top;
}

/* Merges the bytes of one word, lowest-ranked pair first (leftmost among equals), as
 * Hugging Face's BPE does. Symbols form a linked list over ws->sym_*; returns the head. */
static int bpe_merge(const es_tokenizer *tok, tk_workspace *ws, const char *word, size_t n) {
    size_t cap = ws->sym_cap;
    if (grow((void **)&ws->sym_id, &cap, n, sizeof *ws->sym_id)) return -1;
    int32_t **arrays[] = {&ws->sym_start, &ws->sym_end, &ws->sym_prev, &ws->sym_next};
    for (int a = 0; a < 4; a++) {
        size_t array_cap = ws->sym_cap;
        if (grow((void **)arrays[a], &array_cap, n, sizeof(int32_t))) return -1;
    }
    ws->sym_cap = cap;
    int32_t *id = ws->sym_id, *end = ws->sym_end, *prev = ws->sym_prev, *next = ws->sym_next;
    for (size_t i = 0; i < n; i++) {
        id[i] = tok->byte_token[(uint8_t)word[i]];
        ws->sym_start[i] = (int32_t)i, end[i] = (int32_t)i + 1;
        prev[i] = (int32_t)i - 1, next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    if (n <= 48) { /* short words: a scan per merge beats a heap */
        for (;;) {
            int32_t best = -1, best_rank = INT32_MAX, best_merged = -1, merged;
            for (int32_t i = 0; i >= 0 && next[i] >= 0; i = next[i]) {
                int32_t rank = pair_rank(tok, id[i], id[next[i]], &merged);
                if (rank >= 0 && rank < best_rank) best = i, best_rank = rank, best_merged = merged;
            }
            if (best < 0) break;
            int32_t right = next[best];
            id[best] = best_merged, end[best] = end[right], next[best] = next[right];
            if (next[right] >= 0) prev[next[right]] = best;
        }
        return 0;
    }
    heap_entry *heap = malloc(n * 2 * sizeof *heap);
    if (!heap) return -1;
    size_t heap_n = 0;
    int32_t merged;
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t rank = pair_rank(tok, id[i], id[i + 1], &merged);
        if (rank >= 0) heap_push(heap, &heap_n, (heap_entry){rank, (int32_t)i});
    }
    while (heap_n) {
        heap_entry top = heap_pop(heap, &heap_n);
        int32_t pos = top.pos, right = next[pos];
        /* Stale entries: the symbol was absorbed, or its pair has changed since. */
        if (id[pos] < 0 || right < 0 || pair_rank(tok, id[pos], id[right], &merged) != top.rank) continue;
        id[pos] = merged, end[pos] = end[right], next[pos] = next[right];
        id[right] = -1;
        if (next[right] >= 0) prev[next[right]] = pos;
        if (heap_n + 2 > n * 2) continue; /* cannot happen: at most one push per merge side */
        int32_t rank;
        if (next[pos] >= 0 && (rank = pair_rank(tok, id[pos], id[next[pos]], &merged)) >= 0)
            heap_push(heap, &heap_n, (heap_entry){rank, pos});
        if (prev[pos] >= 0 && (rank = pair_rank(tok, id[prev[pos]], id[pos], &merged)) >= 0)
            heap_push(heap, &heap_n, (heap_entry){rank, prev[pos]});
    }
    free(heap);
    return 0;
}

static void cache_reset(tk_workspace *ws) {
    tk_strmap_free(&ws->cache);
    ws->cache_len = 0;
}

/* Emits the tokens of one word ws->norm[start, end). */
static int encode_word(const es_tokenizer *tok, tk_workspace *ws, size_t start, size_t end, es_encoding *out) {
    const char *word = ws->norm + start;
    const span_t *spans = ws->norm_span + start;
    size_t n = end - start;
    if (tok->ignore_merges) { /* a whole word in the vocabulary is one token */
        int32_t id = tk_strmap_get(&tok->vocab, word, n);
        if (id >= 0) return push_token(out, id, spans[0][0], spans[n - 1][1]);
    }
    int32_t cached = n <= CACHE_MAX_WORD_BYTES ? tk_strmap_get(&ws->cache, word, n) : -1;
    if (cached >= 0) {
        const int32_t *entry = ws->cache_tokens + cached;
        int32_t token_start = 0;
        for (int32_t k = 0; k < entry[0]; k++) {
            int32_t id = entry[1 + 2 * k], token_end = entry[2 + 2 * k];
            if (push_token(out, id, spans[token_start][0], spans[token_end - 1][1])) return -1;
            token_start = token_end;
        }
        return 0;
    }
    if (bpe_merge(tok, ws, word, n)) return -1;
    size_t first = out->n;
    for (int32_t i = 0; i >= 0; i = ws->sym_next[i])
        if (push_token(out, ws->sym_id[i], spans[ws->sym_start[i]][0], spans[ws->sym_end[i] - 1][1])) return -1;
    if (n > CACHE_MAX_WORD_BYTES) return 0;
    /* Remember the word: token count, then (id, end within the word) per token. */
    size_t count = out->n - first;
    if (ws->cache.n_entries >= CACHE_MAX_WORDS) cache_reset(ws);
    if (grow((void **)&ws->cache_tokens, &ws->cache_cap, ws->cache_len + 1 + 2 * count, sizeof(int32_t))) return 0;
    int32_t *entry = ws->cache_tokens + ws->cache_len;
    entry[0] = (int32_t)count;
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = ws->sym_next[i], k++) entry[1 + 2 * k] = ws->sym_id[i], entry[2 + 2 * k] = ws->sym_end[i];
    if (tk_strmap_put(&ws->cache, word, n, (int32_t)ws->cache_len) == 0) ws->cache_len += 1 + 2 * count;
    return 0;
}

/* ---- the pipeline ------------------------------------------------------------------------- */

/* Plain text of the normalized buffer: pre-tokenize, then BPE each word. */
static int encode_normalized(const es_tokenizer *tok, tk_workspace *ws, void *ctx, size_t start, size_t end,
                             int32_t added) {
    es_encoding *out = ctx;
    if (added >= 0) return push_token(out, tok->added[added].id, ws->norm_span[start][0], ws->norm_span[end - 1][1]);
    size_t n_pieces = 0;
    if (add_piece(&ws->pieces, &n_pieces, &ws->pieces_cap, start, end)) return -1;
    for (int s = 0; s < tok->n_splits; s++) {
        size_t n_next = 0;
        for (size_t p = 0; p < n_pieces; p++)
            if (split_piece(tok, &tok->splits[s], ws, ws->pieces[p], &ws->next_pieces, &n_next, &ws->next_cap))
                return -1;
        piece *swap = ws->pieces;
        size_t swap_cap = ws->pieces_cap;
        ws->pieces = ws->next_pieces, ws->pieces_cap = ws->next_cap;
        ws->next_pieces = swap, ws->next_cap = swap_cap;
        n_pieces = n_next;
    }
    for (size_t p = 0; p < n_pieces; p++)
        if (encode_word(tok, ws, ws->pieces[p].start, ws->pieces[p].end, out)) return -1;
    return 0;
}

typedef struct {
    es_encoding *out;
    const char *text; /* the original text */
} raw_context;

/* A piece of the original text: an added token matched before normalization, or text to
 * normalize and split further. */
static int encode_raw(const es_tokenizer *tok, tk_workspace *ws, void *ctx, size_t start, size_t end, int32_t added) {
    raw_context *raw = ctx;
    if (added >= 0) return push_token(raw->out, tok->added[added].id, (int32_t)start, (int32_t)end);
    long n = normalize(tok, ws, raw->text + start, end - start, start);
    if (n < 0) return -1;
    return split_added(tok, ws, &tok->normalized_trie, ws->norm, (size_t)n, encode_normalized, raw->out);
}

/* ByteLevel post-processor with trim_offsets: spans lose the spaces a token starts or ends with. */
static void trim_offsets(const es_tokenizer *tok, es_encoding *out) {
    for (size_t i = 0; i < out->n; i++) {
        size_t len = 0, leading = 0, trailing = 0;
        const char *text = tk_id_text(tok, out->ids[i], &len);
        if (!text) continue;
        while (leading < len && text[leading] == ' ') leading++;
        while (trailing < len && text[len - 1 - trailing] == ' ') trailing++;
        int32_t *span = out->spans[i];
        if (leading == 1 && tok->trim_prefix_space && (i == 0 || span[0] == 0)) leading = 0;
        if (leading) span[0] = span[0] + (int32_t)leading < span[1] ? span[0] + (int32_t)leading : span[1];
        if (trailing && span[1] >= (int32_t)trailing)
            span[1] = span[1] - (int32_t)trailing > span[0] ? span[1] - (int32_t)trailing : span[0];
    }
}

static int apply_template(const es_tokenizer *tok, es_encoding *out) {
    es_encoding text = *out, result = {0};
    for (size_t i = 0; i < tok->n_template_items; i++) {
        const tk_template_item *item = &tok->template_items[i];
        if (item->is_sequence) {
            for (size_t k = 0; k < text.n; k++)
                if (push_token(&result, text.ids[k], text.spans[k][0], text.spans[k][1])) goto fail;
        } else {
            for (size_t k = 0; k < item->n_ids; k++)
                if (push_token(&result, item->ids[k], 0, 0)) goto fail; /* inserted: an empty span */
        }
    }
    es_encoding_free(&text);
    *out = result;
    return 0;
fail:
    es_encoding_free(&result);
    return -1;
}

int es_tokenizer_encode(const es_tokenizer *tok, const char *text, size_t len, int add_special_tokens, es_encoding *out,
                        es_error *err) {
    out->n = 0;
    size_t bad = es_utf8_invalid_at(text, len);
    if (bad != (size_t)-1) return es_fail(err, ES_ERR_DATA, "invalid UTF-8 at byte %zu", bad);
    if (len > INT32_MAX) return es_fail(err, ES_ERR_DATA, "text of %zu bytes is too long", len);
    tk_workspace *ws = workspace(tok);
    raw_context raw = {out, text};
    if (ws) ws->match_error = 0;
    if (!ws || split_added(tok, ws, &tok->raw_trie, text, len, encode_raw, &raw)) {
        out->n = 0; /* no partial encoding that could pass for a whole one */
        if (!ws || !ws->match_error) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(ws->match_error, message, sizeof message);
        return es_fail(err, ES_ERR_DATA, "%s: pre_tokenizer regex %d failed on the text at byte %d: %s", tok->name,
                       ws->match_error_split, ws->match_error_at, (char *)message);
    }
    if (tok->trim_offsets) trim_offsets(tok, out);
    if (add_special_tokens && tok->n_template_items && apply_template(tok, out))
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    return ES_OK;
}

void es_encoding_free(es_encoding *encoding) {
    free(encoding->ids);
    free(encoding->spans);
    memset(encoding, 0, sizeof *encoding);
}

/* ---- decoding ------------------------------------------------------------------------------ */

/* Length of the well-formed prefix of a UTF-8 sequence at s (Unicode's "maximal subpart"):
 * 0 when s[0] cannot start one. *complete is set when the whole sequence is there. */
static size_t utf8_prefix(const unsigned char *s, size_t n, int *complete) {
    unsigned char c = s[0];
    size_t need;
    unsigned char low = 0x80, high = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 2;
    else if (c >= 0xe0 && c <= 0xef) need = 3, low = c == 0xe0 ? 0xa0 : 0x80, high = c == 0xed ? 0x9f : 0xbf;
    else if (c >= 0xf0 && c <= 0xf4) need = 4, low = c == 0xf0 ? 0x90 : 0x80, high = c == 0xf4 ? 0x8f : 0xbf;
    else return *complete = 0, 0;
    size_t k = 1;
    for (; k < need && k < n; k++) {
        unsigned char lo = k == 1 ? low : 0x80, hi = k == 1 ? high : 0xbf;
        if (s[k] < lo || s[k] > hi) break;
    }
    *complete = k == need;
    return k;
}

int es_tokenizer_decode(const es_tokenizer *tok, const int32_t *ids, size_t n, char **text, size_t *len, es_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = 0;
        if (!tk_id_text(tok, ids[i], &len))
            return es_fail(err, ES_ERR_DATA, "id %d (position %zu) is not in the vocabulary", ids[i], i);
        total += len;
    }
    /* Invalid bytes become U+FFFD (3 bytes for each bad byte at worst). */
    unsigned char *bytes = malloc(total + 1);
    char *result = malloc(3 * total + 1);
    if (!bytes || !result) {
        free(bytes), free(result);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = 0;
        const char *text = tk_id_text(tok, ids[i], &len);
        memcpy(bytes + at, text, len);
        at += len;
    }
    size_t out = 0;
    for (size_t k = 0; k < total;) {
        if (bytes[k] < 0x80) {
            result[out++] = (char)bytes[k++];
            continue;
        }
        int complete;
        size_t prefix = utf8_prefix(bytes + k, total - k, &complete);
        if (complete) {
            memcpy(result + out, bytes + k, prefix);
            out += prefix, k += prefix;
        } else {
            memcpy(result + out, "\xef\xbf\xbd", 3);
            out += 3, k += prefix ? prefix : 1;
        }
    }
    result[out] = '\0';
    free(bytes);
    *text = result;
    *len = out;
    return ES_OK;
}
