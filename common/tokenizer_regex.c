/* Rust regex semantics on PCRE2 for the tokenizer's pre-tokenizer patterns, and the Unicode
 * classes Hugging Face's Rust code uses (white space, word characters). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer_internal.h"
#include "unicode_new.h"

/* ---- Unicode classes that Rust's regex and Hugging Face use ------------------------- */

int tk_is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

int tk_is_word_char(uint32_t c) {
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
    if (c == 0x200c || c == 0x200d) return 1;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC: return 1;
    default: return 0;
    }
}

/* ---- regexes: Rust's regex semantics on PCRE2 ------------------------------------------- */

/* PCRE2 10.42 knows Unicode 14; Hugging Face's Rust regex a newer version, so letters and
 * symbols assigned since (e.g. U+1FACE, an emoji of Unicode 15) would fall outside \p{L},
 * \p{S}, ... Every \p{..} class gets the newer characters of its category added
 * (common/unicode_new.h, generated; a newer PCRE2 makes the additions redundant, not wrong). */
static size_t append_new_chars(char *out, const char *name) {
    size_t n = 0, name_len = strlen(name);
    for (size_t i = 0; i < sizeof es_unicode_new / sizeof *es_unicode_new; i++) {
        if (strncmp(es_unicode_new[i].category, name, name_len) != 0) continue;
        n += (size_t)sprintf(out + n, "\\x{%x}-\\x{%x}", es_unicode_new[i].first, es_unicode_new[i].last);
    }
    return n;
}

static int is_general_category(const char *name) {
    static const char *const categories[] = {"L", "Lu", "Ll", "Lt", "Lm", "Lo", "M", "Mn", "Mc", "Me", "N", "Nd", "Nl",
                                             "No", "P", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S", "Sm", "Sc", "Sk",
                                             "So", "Z", "Zs", "Zl", "Zp"};
    for (size_t i = 0; i < sizeof categories / sizeof *categories; i++)
        if (!strcmp(name, categories[i])) return 1;
    return 0;
}

/* Rewrites a Rust regex for PCRE2: \s and \S as Unicode White_Space (PCRE2's \s adds
 * U+180E), and \p{..} general categories extended with newly assigned characters.
 * Returns a malloc'd pattern. */
char *tk_translate_regex(const char *pattern) {
    static const char white_space[] =
        "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}";
    size_t len = strlen(pattern), n = 0;
    size_t n_new_chars = sizeof es_unicode_new / sizeof *es_unicode_new;
    /* every byte may become a class; every \p{..} may gain all new characters */
    char *out = malloc(len * (sizeof white_space + 4) + (len / 4 + 1) * (n_new_chars * 24 + 16) + 1);
    if (!out) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < len; i++) {
        char c = pattern[i];
        if (c == '\\' && i + 1 < len) {
            char next = pattern[++i];
            if (next == 's') n += (size_t)sprintf(out + n, in_class ? "%s" : "[%s]", white_space);
            else if (next == 'S' && !in_class) n += (size_t)sprintf(out + n, "[^%s]", white_space);
            else if ((next == 'p' || (next == 'P' && !in_class)) && i + 1 < len) {
                char name[16] = {0};
                size_t name_end = i + 1;
                if (pattern[i + 1] == '{') {
                    const char *close = strchr(pattern + i + 2, '}');
                    if (close && close - (pattern + i + 2) < (long)sizeof name) {
                        memcpy(name, pattern + i + 2, (size_t)(close - (pattern + i + 2)));
                        name_end = (size_t)(close - pattern);
                    }
                } else {
                    name[0] = pattern[i + 1];
                }
                if (!is_general_category(name)) {
                    out[n++] = c, out[n++] = next;
                    continue;
                }
                if (!in_class) n += (size_t)sprintf(out + n, next == 'P' ? "[^" : "[");
                n += (size_t)sprintf(out + n, "\\p{%s}", name);
                n += append_new_chars(out + n, name);
                if (!in_class) out[n++] = ']';
                i = name_end;
            } else {
                out[n++] = c, out[n++] = next;
            }
            continue;
        }
        out[n++] = c;
        if (c == '[' && !in_class) {
            in_class = 1;
            if (i + 1 < len && pattern[i + 1] == '^') out[n++] = pattern[++i];
            if (i + 1 < len && pattern[i + 1] == ']') out[n++] = pattern[++i]; /* a literal ] first */
        } else if (c == ']' && in_class) {
            in_class = 0;
        }
    }
    out[n] = '\0';
    return out;
}

