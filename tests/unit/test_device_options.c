/* The device options every program shares: --device names, --max-memory sizes (and their
 * errors), --threads bounds (kernels/backend.c). */
#include "../testlib.h"
#include "backend.h"

static const es_option options[] = {ES_DEVICE_OPTIONS, {NULL, 0, NULL, NULL, NULL}};

/* Parses the flags and reads the device options: the error code (0: fine). */
static int read_options(es_device_options *out, es_error *err, const char *device, const char *memory, const char *threads) {
    es_config cfg;
    char *argv[] = {"test", "--device", (char *)device, "--max-memory", (char *)memory, "--threads", (char *)threads, NULL};
    es_error_clear(err);
    int rc = es_config_parse(&cfg, options, 7, argv, err);
    if (!rc) rc = es_device_options_from_config(&cfg, out, err);
    es_config_free(&cfg);
    return rc;
}

TEST(sizes_names_and_bounds) {
    es_device_options o;
    es_error err = {0};
    REQUIRE(read_options(&o, &err, "cpu", "8G", "3") == ES_OK);
    CHECK(o.kind == ES_DEVICE_CPU && o.max_memory == 8ull << 30 && o.threads == 3);
    REQUIRE(read_options(&o, &err, "cuda:2", "1.5GiB", "0") == ES_OK);
    CHECK(o.kind == ES_DEVICE_CUDA && o.ordinal == 2 && o.max_memory == 3ull << 29);
    REQUIRE(read_options(&o, &err, "cuda", "auto", "0") == ES_OK);
    CHECK(o.ordinal == 0 && o.max_memory == 0);
    REQUIRE(read_options(&o, &err, "cpu", "512m", "1") == ES_OK);
    CHECK(o.max_memory == 512ull << 20);
    REQUIRE(read_options(&o, &err, "cpu", "4096", "1") == ES_OK);
    CHECK(o.max_memory == 4096);
    static const struct {
        const char *device, *memory, *threads, *named;
    } bad[] = {{"gpu", "auto", "0", "--device gpu"}, {"cuda:x", "auto", "0", "--device"}, {"cpu", "8X", "0", "--max-memory 8X"},
               {"cpu", "0", "0", "--max-memory 0"},   {"cpu", "0G", "0", "--max-memory 0G"}, {"cpu", "-1G", "0", "--max-memory"},
               {"cpu", "auto", "-2", "--threads: \"-2\" is out of range"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        CHECKF(read_options(&o, &err, bad[i].device, bad[i].memory, bad[i].threads) == ES_ERR_USAGE && strstr(err.msg, bad[i].named),
               "case %zu: %s", i, err.msg);
}

int main(void) {
    RUN(sizes_names_and_bounds);
    return test_summary();
}
