/* What essence-eval checks a generation by (docs/eval.md "Answers"): the answer a rule finds in
 * the generated text, the normal form two answers are compared in, and the 95% interval of an
 * accuracy. */
#ifndef ES_EVAL_ANSWER_H
#define ES_EVAL_ANSWER_H

#include <stddef.h>

#include "error.h"

typedef struct eval_answer_rule eval_answer_rule;

/* The rule: the last match of `regex` (its first group when it has one), or the rest of the
 * line after the last `marker`, or (both NULL) the last number. A bad regex, or both given, is
 * ES_ERR_USAGE naming the flag. */
int eval_answer_rule_create(eval_answer_rule **out, const char *regex, const char *marker, es_error *err);
void eval_answer_rule_free(eval_answer_rule *rule);

/* The answer in text[0, len) (any bytes: invalid UTF-8 is skipped over), malloc'd and
 * normalised; NULL when the rule finds none (or out of memory: *oom set). */
char *eval_answer_extract(const eval_answer_rule *rule, const char *text, size_t len, int *oom);

/* The form answers are compared in, malloc'd: cut at a NUL byte, white space trimmed; a number (sign, digits with
 * or without thousands commas, a fraction) written plainly: no '+', commas, leading zeros or
 * trailing fractional zeros, "-0" as "0". NULL when out of memory. */
char *eval_answer_normalise(const char *text, size_t len);

/* The Wilson score interval of `correct` successes in n trials at 95% (n = 0: [0, 1]). */
void eval_wilson_interval(long correct, long n, double *low, double *high);

#endif
