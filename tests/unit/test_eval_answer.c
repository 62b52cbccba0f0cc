/* essence-eval's answers (align/eval/answer.h): the last number, a marker, a regex with and
 * without a group; malformed, empty and truncated generations; the normal form; the Wilson
 * interval against values computed by hand. */
#include <math.h>

#include "../testlib.h"
#include "answer.h"

/* The rule's answer in text (len bytes), or "(none)". */
static const char *extract(const eval_answer_rule *rule, const char *text, size_t len, char *buf, size_t size) {
    int oom = 0;
    char *got = eval_answer_extract(rule, text, len, &oom);
    snprintf(buf, size, "%s", got ? got : oom ? "(oom)" : "(none)");
    free(got);
    return buf;
}
#define EXPECT(rule, text, want)                                                                                 \
    do {                                                                                                         \
        char buf_[256];                                                                                          \
        const char *got_ = extract((rule), (text), sizeof(text) - 1, buf_, sizeof buf_);                       \
        CHECKF(!strcmp(got_, (want)), "%s: got \"%s\", want \"%s\"", #text, got_, (want));                    \
    } while (0)

TEST(last_number) {
    es_error err = {0};
    eval_answer_rule *rule;
    REQUIRE(eval_answer_rule_create(&rule, NULL, NULL, &err) == ES_OK);
    EXPECT(rule, "3 + 4 = 7", "7");
    EXPECT(rule, "so 12 apples, then 1,234.50 in all.", "1234.5");
    EXPECT(rule, "the answer is -0.000", "0");
    EXPECT(rule, "x = +0042", "42");
    EXPECT(rule, "no digits here", "(none)");
    EXPECT(rule, "", "(none)");                                 /* an empty generation */
    EXPECT(rule, "the total is 4", "4");                        /* truncated mid-number: what is there */
    EXPECT(rule, "\xff\xfe 17 \xc3( 9\xe2\x82", "9");            /* invalid UTF-8 around and between numbers */
    EXPECT(rule, "\xed\xa0\x80" "5\xf8\x88\x80\x80\x80", "5"); /* a surrogate and a 5-byte form */
    EXPECT(rule, "12,34", "34");                                 /* not a thousands group: two numbers */
    EXPECT(rule, "pi is 3.14159.", "3.14159");
    EXPECT(rule, "\x00" "8", "8");                               /* a NUL byte inside the text */
    eval_answer_rule_free(rule);
}

TEST(marker_and_regex) {
    es_error err = {0};
    eval_answer_rule *marker, *grouped, *plain;
    REQUIRE(eval_answer_rule_create(&marker, NULL, "Answer:", &err) == ES_OK);
    EXPECT(marker, "Answer: 3\nwait. Answer:  1,000 \nmore", "1000");
    EXPECT(marker, "Answer: yes please  ", "yes please");
    EXPECT(marker, "ends with Answer:", "(none)");              /* a marker and nothing after it */
    EXPECT(marker, "Answer:   \n", "(none)");
    EXPECT(marker, "no marker 5", "(none)");
    EXPECT(marker, "Answer: \xff\xfe", "\xff\xfe");              /* bytes as they are */
    REQUIRE(eval_answer_rule_create(&grouped, "\\\\boxed\\{([^}]*)\\}", NULL, &err) == ES_OK);
    EXPECT(grouped, "so \\boxed{12} or \\boxed{ 13 }", "13");
    EXPECT(grouped, "\\boxed{12", "(none)");                      /* truncated before the brace closes */
    REQUIRE(eval_answer_rule_create(&plain, "[A-D]\\)", NULL, &err) == ES_OK);
    EXPECT(plain, "B) no, C) yes", "C)");
    EXPECT(plain, "\xc3\xa9 A) \xff", "A)");
    eval_answer_rule_free(marker), eval_answer_rule_free(grouped), eval_answer_rule_free(plain);
}

TEST(bad_rules_are_usage_errors) {
    es_error err = {0};
    eval_answer_rule *rule = NULL;
    CHECK(eval_answer_rule_create(&rule, "([0-9]", NULL, &err) == ES_ERR_USAGE);
    CHECKF(strstr(err.msg, "--answer-regex") && strstr(err.msg, "offset"), "%s", err.msg);
    err = (es_error){0};
    CHECK(eval_answer_rule_create(&rule, "x", "y", &err) == ES_ERR_USAGE);
    CHECKF(strstr(err.msg, "--answer-marker"), "%s", err.msg);
    err = (es_error){0};
    CHECK(eval_answer_rule_create(&rule, NULL, "", &err) == ES_ERR_USAGE);
    CHECK(rule == NULL);
}

TEST(normal_form) {
    static const char *const cases[][2] = {
        {"  42 ", "42"}, {"+7", "7"}, {"-0", "0"}, {"007", "7"}, {"0", "0"}, {"0.50", "0.5"}, {"-12.000", "-12"},
        {"1,000,000", "1000000"}, {"-0.25", "-0.25"}, {"12a", "12a"}, {" Paris\n", "Paris"}, {"", ""}, {"1,00", "1,00"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *got = eval_answer_normalise(cases[i][0], strlen(cases[i][0]));
        CHECKF(got && !strcmp(got, cases[i][1]), "\"%s\": got \"%s\", want \"%s\"", cases[i][0], got ? got : "(null)", cases[i][1]);
        free(got);
    }
}

TEST(wilson_interval) {
    /* p̂ = 0.8, n = 10, z = 1.96: centre (0.8 + 0.19208) / 1.38415, half 1.96 sqrt(0.016 + 0.0096040) / 1.38415 */
    double low, high;
    eval_wilson_interval(8, 10, &low, &high);
    CHECKF(fabs(low - 0.490162) < 1e-5 && fabs(high - 0.943318) < 1e-5, "8/10: [%f, %f]", low, high);
    eval_wilson_interval(0, 10, &low, &high);
    CHECKF(low == 0 && fabs(high - 0.277533) < 1e-5, "0/10: [%f, %f]", low, high);
    eval_wilson_interval(10, 10, &low, &high);
    CHECKF(fabs(low - 0.722467) < 1e-5 && high == 1, "10/10: [%f, %f]", low, high);
    eval_wilson_interval(0, 0, &low, &high);
    CHECK(low == 0 && high == 1);
}

int main(void) {
    RUN(last_number);
    RUN(marker_and_regex);
    RUN(bad_rules_are_usage_errors);
    RUN(normal_form);
    RUN(wilson_interval);
    return test_summary();
}
