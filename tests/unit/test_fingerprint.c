/* Fingerprints: SHA-256 known answers (FIPS 180-2), files streamed in pieces, and the
 * canonical JSON of parameter sets (key order, nesting, numbers, escapes). */
#include <math.h>

#include "fingerprint.h"
#include "../testlib.h"

static int contains(const char *msg, const char *sub) { return strstr(msg, sub) != NULL; }

TEST(sha256_known_answers) {
    char hex[ES_FINGERPRINT_HEX];
    es_sha256_hex("", 0, hex);
    CHECK(!strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    es_sha256_hex(NULL, 0, hex);
    CHECK(!strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    es_sha256_hex("abc", 3, hex);
    CHECK(!strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    es_sha256_hex(two, strlen(two), hex);
    CHECK(!strcmp(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    CHECK(strlen(hex) == 64);
}

TEST(sha256_file) {
    char path[1024];
    snprintf(path, sizeof path, "%s/blob.bin", test_tmpdir());
    size_t n = 5 * 1000 * 1000 + 17; /* several MB, not a multiple of the read size */
    unsigned char *buf = malloc(n);
    REQUIRE(buf);
    unsigned x = 12345;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (unsigned char)(x >> 16);
    }
    FILE *f = fopen(path, "wb");
    REQUIRE(f && fwrite(buf, 1, n, f) == n && fclose(f) == 0);
    char a[ES_FINGERPRINT_HEX], b[ES_FINGERPRINT_HEX];
    es_error err = {0};
    REQUIRE(es_sha256_file(path, a, &err) == ES_OK);
    es_sha256_hex(buf, n, b);
    CHECK(!strcmp(a, b));
    free(buf);

    /* An empty file and a known answer. */
    snprintf(path, sizeof path, "%s/abc.txt", test_tmpdir());
    f = fopen(path, "wb");
    REQUIRE(f && fputs("abc", f) >= 0 && fclose(f) == 0);
    REQUIRE(es_sha256_file(path, a, &err) == ES_OK);
    CHECK(!strcmp(a, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));

    snprintf(path, sizeof path, "%s/missing.bin", test_tmpdir());
    CHECK(es_sha256_file(path, a, &err) == ES_ERR_RUNTIME);
    CHECK(contains(err.msg, path));
    es_error_clear(&err);
    CHECK(es_sha256_file(test_tmpdir(), a, &err) == ES_ERR_RUNTIME); /* a folder */
    CHECK(contains(err.msg, test_tmpdir()));
}

static char *canon(const char *json) {
    json_error_t jerr;
    json_t *v = json_loads(json, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!v) return NULL;
    es_error err = {0};
    char *s = es_json_canonical(v, NULL, &err);
    json_decref(v);
    return s;
}

static void fp_of(const char *json, char out[ES_FINGERPRINT_HEX]) {
    json_error_t jerr;
    json_t *v = json_loads(json, 0, &jerr);
    es_error err = {0};
    out[0] = '\0';
    if (v && es_fingerprint_params(v, out, &err) != ES_OK) out[0] = '\0';
    json_decref(v);
}

TEST(canonical_form) {
    struct {
        const char *in, *out;
    } cases[] = {
        {"{\"b\": 1, \"a\": [true, false, null], \"c\": {\"z\": 1, \"y\": 2}}",
         "{\"a\":[true,false,null],\"b\":1,\"c\":{\"y\":2,\"z\":1}}"},
        {"{\"B\": 1, \"a\": 2, \"\": 3, \"aa\": 4, \"\xc3\xa9\": 5}", "{\"\":3,\"B\":1,\"a\":2,\"aa\":4,\"\xc3\xa9\":5}"},
        {"{\"s\": \"q\\\" b\\\\ \\/ \\n\\t\\r\\b\\f \\u0001 \\u001f \\u007f \\u00e9 \\ud83d\\ude00\"}",
         "{\"s\":\"q\\\" b\\\\ / \\n\\t\\r\\b\\f \\u0001 \\u001f \x7f \xc3\xa9 \xf0\x9f\x98\x80\"}"},
        {"{\"nul\": \"a\\u0000b\"}", "{\"nul\":\"a\\u0000b\"}"},
        {"[1, 1.0, -0.0, 0.1, 1e21, 1.5e-7, 123456789012345678, 3.141592653589793, 100.0, -2]",
         "[1,1.0,-0.0,0.1,1e+21,1.5e-07,123456789012345678,3.141592653589793,1e+02,-2]"},
        {"[0.30000000000000004, 1e300, 2.5, 9007199254740993]",
         "[0.30000000000000004,1e+300,2.5,9007199254740993]"},
        {"{}", "{}"},
        {"[]", "[]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *got = canon(cases[i].in);
        CHECKF(got && !strcmp(got, cases[i].out), "case %zu: %s", i, got ? got : "(null)");
        free(got);
    }
    /* Every real prints in a form that reads back exactly. */
    double reals[] = {0.1, 1.0 / 3, 2.0 / 3, 1e-300, 5e-324, 1.7976931348623157e308, 123.456, -7.25e-5};
    for (size_t i = 0; i < sizeof reals / sizeof *reals; i++) {
        json_t *r = json_real(reals[i]);
        char *s = es_json_canonical(r, NULL, NULL);
        CHECKF(s && strtod(s, NULL) == reals[i] && strpbrk(s, ".e"), "%.17g -> %s", reals[i], s);
        free(s);
        json_decref(r);
    }
}

TEST(params_fingerprint) {
    char a[ES_FINGERPRINT_HEX], b[ES_FINGERPRINT_HEX], c[ES_FINGERPRINT_HEX];
    fp_of("{\"lr\": 0.001, \"layers\": [20, 40], \"model\": \"m\", \"opt\": {\"b\": 1, \"a\": 2}}", a);
    fp_of("{\"opt\": {\"a\": 2, \"b\": 1}, \"model\": \"m\", \"layers\": [20, 40], \"lr\": 0.001}", b);
    CHECK(strlen(a) == 64 && !strcmp(a, b));
    /* Built in another insertion order: the same. */
    json_t *o = json_object();
    json_object_set_new(o, "model", json_string("m"));
    json_t *inner = json_object();
    json_object_set_new(inner, "b", json_integer(1));
    json_object_set_new(inner, "a", json_integer(2));
    json_object_set_new(o, "opt", inner);
    json_object_set_new(o, "layers", json_pack("[ii]", 20, 40));
    json_object_set_new(o, "lr", json_real(0.001));
    es_error err = {0};
    REQUIRE(es_fingerprint_params(o, c, &err) == ES_OK);
    CHECK(!strcmp(a, c));
    json_decref(o);
    /* The fingerprint is the SHA-256 of the canonical text. */
    char *text = canon("{\"b\": 1, \"a\": 2}");
    REQUIRE(text);
    es_sha256_hex(text, strlen(text), b);
    fp_of("{\"b\": 1, \"a\": 2}", c);
    CHECK(!strcmp(b, c));
    free(text);

    /* Integer 1 and real 1.0 differ; so do array orders and nested values. */
    fp_of("{\"x\": 1}", a);
    fp_of("{\"x\": 1.0}", b);
    CHECK(a[0] && b[0] && strcmp(a, b));
    fp_of("{\"x\": [1, 2]}", a);
    fp_of("{\"x\": [2, 1]}", b);
    CHECK(strcmp(a, b));
    fp_of("{\"x\": {\"a\": 1}}", a);
    fp_of("{\"x\": {\"a\": 2}}", b);
    CHECK(strcmp(a, b));
    fp_of("{\"x\": \"1\"}", c);
    fp_of("{\"x\": 1}", a);
    CHECK(strcmp(a, c));

    /* Not an object, or a cycle: an error, not a crash. */
    json_t *arr = json_array();
    es_error_clear(&err);
    CHECK(es_fingerprint_params(arr, a, &err) == ES_ERR_RUNTIME && contains(err.msg, "object"));
    CHECK(es_fingerprint_params(NULL, a, &err) == ES_ERR_RUNTIME);
    json_decref(arr);
    json_t *x = json_object(), *y = json_object();
    json_object_set(x, "y", y);
    json_object_set(y, "x", x);
    es_error_clear(&err);
    CHECK(es_fingerprint_params(x, a, &err) == ES_ERR_RUNTIME && contains(err.msg, "deeper"));
    json_object_del(y, "x"); /* break the cycle so both are freed */
    json_decref(x);
    json_decref(y);
}

int main(void) {
    RUN(sha256_known_answers);
    RUN(sha256_file);
    RUN(canonical_form);
    RUN(params_fingerprint);
    return test_summary();
}
