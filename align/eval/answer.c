#include "answer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <ctype.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A number as a person writes one in an answer: a sign, digits (thousands may be grouped with
 * commas), a fraction. ASCII digits only (no PCRE2_UCP). */
#define NUMBER_PATTERN "[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\\.[0-9]+)?"

struct eval_answer_rule {
    pcre2_code *regex;  /* NULL with a marker */
    char *marker;
};

static pcre2_code *compile(const char *pattern, char *why, size_t size) {
    int code;
    PCRE2_SIZE offset;
    /* generated text may hold invalid UTF-8 (a byte-level model can emit half a character): matches skip it */
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, &code, &offset, NULL);
    if (!re) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(code, message, sizeof message);
        snprintf(why, size, "%s at offset %zu", (const char *)message, (size_t)offset);
    }
    return re;
}

int eval_answer_rule_create(eval_answer_rule **out, const char *regex, const char *marker, es_error *err) {
    *out = NULL;
    if (regex && marker) return es_fail(err, ES_ERR_USAGE, "--answer-regex and --answer-marker: give one or the other");
    if (marker && !*marker) return es_fail(err, ES_ERR_USAGE, "--answer-marker: empty");
    eval_answer_rule *rule = calloc(1, sizeof *rule);
    if (!rule) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    char why[300] = "";
    if (marker) rule->marker = strdup(marker);
    else rule->regex = compile(regex ? regex : NUMBER_PATTERN, why, sizeof why);
    if (marker ? !rule->marker : !rule->regex) {
        eval_answer_rule_free(rule);
        return marker ? es_fail(err, ES_ERR_RUNTIME, "out of memory") : es_fail(err, ES_ERR_USAGE, "--answer-regex \"%s\": %s", regex, why);
    }
    *out = rule;
    return ES_OK;
}

void eval_answer_rule_free(eval_answer_rule *rule) {
    if (!rule) return;
    pcre2_code_free(rule->regex);
    free(rule->marker);
    free(rule);
}

/* The last match of the rule's regex in text: [*start, *end), its first group when it has one. */
static int last_match(const pcre2_code *re, const char *text, size_t len, size_t *start, size_t *end) {
    pcre2_match_data *match = pcre2_match_data_create_from_pattern(re, NULL);
    if (!match) return -1;
    uint32_t groups = 0;
    pcre2_pattern_info(re, PCRE2_INFO_CAPTURECOUNT, &groups);
    int found = 0;
    for (size_t at = 0; at <= len;) {
        int rc = pcre2_match(re, (PCRE2_SPTR)text, len, at, 0, match, NULL);
        if (rc < 0) break;
        const PCRE2_SIZE *ovector = pcre2_get_ovector_pointer(match);
        const int group = groups >= 1 && rc >= 2 && ovector[2] != PCRE2_UNSET ? 1 : 0;
        if (group || !groups) *start = ovector[2 * group], *end = ovector[2 * group + 1], found = 1;
        /* an empty match moves on by one byte; the invalid-UTF mode makes any offset a valid start */
        at = ovector[1] > ovector[0] ? ovector[1] : ovector[0] + 1;
    }
    pcre2_match_data_free(match);
    return found;
}

/* The start of the last occurrence of needle in text, or NULL. */
static const char *last_occurrence(const char *text, size_t len, const char *needle) {
    const size_t n = strlen(needle);
    for (size_t at = len >= n ? len - n + 1 : 0; at-- > 0;)
        if (!memcmp(text + at, needle, n)) return text + at;
    return NULL;
}

char *eval_answer_extract(const eval_answer_rule *rule, const char *text, size_t len, int *oom) {
    *oom = 0;
    size_t start = 0, end = 0;
    if (rule->marker) {
        const char *at = last_occurrence(text, len, rule->marker);
        if (!at) return NULL;
        start = (size_t)(at - text) + strlen(rule->marker);
        end = start;
        while (end < len && text[end] != '\n') end++;
    } else {
        int found = last_match(rule->regex, text, len, &start, &end);
        if (found < 0) *oom = 1;
        if (found <= 0) return NULL;
    }
    char *answer = eval_answer_normalise(text + start, end - start);
    if (!answer) *oom = 1;
    else if (!*answer) free(answer), answer = NULL; /* a marker followed by nothing: no answer */
    return answer;
}

/* text[0, len) is a whole number as NUMBER_PATTERN reads one. */
static int is_number(const char *text, size_t len) {
    pcre2_code *re = NULL;
    int code;
    PCRE2_SIZE offset;
    re = pcre2_compile((PCRE2_SPTR) "^" NUMBER_PATTERN "$", PCRE2_ZERO_TERMINATED, 0, &code, &offset, NULL);
    pcre2_match_data *match = re ? pcre2_match_data_create_from_pattern(re, NULL) : NULL;
    const int yes = match && pcre2_match(re, (PCRE2_SPTR)text, len, 0, 0, match, NULL) >= 0;
    pcre2_match_data_free(match);
    pcre2_code_free(re);
    return yes;
}

char *eval_answer_normalise(const char *text, size_t len) {
    len = strnlen(text, len); /* answers are C strings: a NUL byte ends one */
    while (len && isspace((unsigned char)*text)) text++, len--;
    while (len && isspace((unsigned char)text[len - 1])) len--;
    char *out = malloc(len + 2);
    if (!out) return NULL;
    if (!is_number(text, len)) {
        memcpy(out, text, len);
        out[len] = '\0';
        return out;
    }
    size_t n = 0, i = 0;
    const int negative = text[0] == '-';
    if (text[0] == '-' || text[0] == '+') i++;
    if (negative) out[n++] = '-';
    const size_t digits = n;
    for (; i < len && text[i] != '.'; i++) /* the whole part without its commas or leading zeros, "0" at least */
        if (text[i] != ',' && !(n == digits && text[i] == '0')) out[n++] = text[i];
    if (n == digits) out[n++] = '0';
    if (i < len) { /* the fraction, without trailing zeros */
        size_t last = len;
        while (last > i + 1 && text[last - 1] == '0') last--;
        if (last > i + 1) memcpy(out + n, text + i, last - i), n += last - i;
    }
    out[n] = '\0';
    if (negative && !strcmp(out + digits, "0")) memmove(out, out + 1, n); /* "-0" and "-0.000" are 0 */
    return out;
}

void eval_wilson_interval(long correct, long n, double *low, double *high) {
    if (n <= 0) {
        *low = 0, *high = 1;
        return;
    }
    const double z = 1.959963984540054, p = (double)correct / (double)n, z2n = z * z / (double)n;
    const double centre = (p + z2n / 2) / (1 + z2n);
    const double half = z * sqrt(p * (1 - p) / (double)n + z2n / (4.0 * (double)n)) / (1 + z2n);
    /* at p̂ = 0 or 1 the bound is exactly 0 or 1, which rounding would miss by an ulp */
    *low = correct <= 0 || centre - half < 0 ? 0 : centre - half;
    *high = correct >= n || centre + half > 1 ? 1 : centre + half;
}
