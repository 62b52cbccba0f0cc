/* libFuzzer target: essence-eval's answer extraction (align/eval/answer.c) over any bytes, as a
 * model may generate them (invalid UTF-8, NUL bytes, truncated text). The first byte picks the
 * rule: the last number, a marker, or a regex with a group. Whatever the bytes: no crash, no
 * leak; an answer is its own normal form; the last-number rule's answers are numbers that
 * normalise to themselves with no '+', ',' or leading zero. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../align/eval/answer.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    static eval_answer_rule *rules[3];
    es_error err = {0};
    if (!rules[0] && (eval_answer_rule_create(&rules[0], NULL, NULL, &err) || eval_answer_rule_create(&rules[1], NULL, "Answer:", &err) ||
                      eval_answer_rule_create(&rules[2], "=\\s*(\\S+)", NULL, &err)))
        abort();
    const int which = data[0] % 3;
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;
    int oom = 0;
    char *answer = eval_answer_extract(rules[which], text, len, &oom);
    if (oom) abort();
    if (answer) {
        char *again = eval_answer_normalise(answer, strlen(answer));
        if (!again || strcmp(again, answer)) abort();
        if (which == 0 && (!is_number(answer, strlen(answer)) || strchr(answer, '+') || strchr(answer, ',') ||
                           (answer[answer[0] == '-'] == '0' && answer[(answer[0] == '-') + 1] && answer[(answer[0] == '-') + 1] != '.')))
            abort();
        free(again);
        free(answer);
    }
    return 0;
}
