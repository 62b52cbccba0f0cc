/* libFuzzer target: the YAML configuration loader and the flag parser.
 *
 * Mode 1 (any input not starting with byte 0x01): the bytes are a YAML file. Loading must
 * not crash or leak; a rejection is ES_ERR_USAGE naming "fuzz.yaml:LINE:"; an accepted file
 * must print (es_config_to_yaml) as YAML that loads back to exactly the same values.
 * Mode 2 (first byte 0x01): the rest is a NUL-separated argument list for es_config_parse
 * (inputs mentioning "config" are skipped, so no file is read); on success the printed
 * configuration must load back to the same values too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

static const es_option OPTS[] = {
    {"model", ES_OPT_STRING, NULL, "a string", NULL},
    {"layers", ES_OPT_STRING, "20,40", "a list", NULL},
    {"template", ES_OPT_STRING, "{{text}}", "a string with a default", NULL},
    {"batch-tokens", ES_OPT_INT, "4096", "an integer", NULL},
    {"seed", ES_OPT_INT, NULL, "an integer without default", NULL},
    {"lr", ES_OPT_FLOAT, "0.001", "a real", NULL},
    {"sigma", ES_OPT_FLOAT, NULL, "a real without default", NULL},
    {"resume", ES_OPT_BOOL, "false", "a bool", NULL},
    {"no-shuffle", ES_OPT_BOOL, NULL, "a bool named no-...", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

static void check_round_trip(const es_config *cfg) {
    char *yaml = es_config_to_yaml(cfg);
    es_config back;
    es_error err = {0};
    if (es_config_init(&back, OPTS, &err) != ES_OK) abort();
    if (es_config_load_yaml(&back, yaml, strlen(yaml), "printed.yaml", &err) != ES_OK) abort();
    for (int i = 0; i < cfg->n_options; i++) {
        const char *a = cfg->values[i], *b = back.values[i];
        if ((a == NULL) != (b == NULL)) abort();
        if (a && strcmp(a, b) != 0) abort();
    }
    es_config_free(&back);
    free(yaml);
}

static void fuzz_file(const uint8_t *data, size_t size) {
    /* A private copy sized exactly, so a read past the end is caught. */
    char *buf = malloc(size ? size : 1);
    if (!buf) return;
    if (size) memcpy(buf, data, size);
    es_config cfg;
    es_error err = {0};
    if (es_config_init(&cfg, OPTS, &err) != ES_OK) abort();
    int rc = es_config_load_yaml(&cfg, buf, size, "fuzz.yaml", &err);
    if (rc == ES_OK) {
        check_round_trip(&cfg);
        /* Typed getters on validated values. */
        (void)es_config_int_or(&cfg, "seed", 0);
        (void)es_config_float_or(&cfg, "sigma", 0.0);
        (void)es_config_bool_or(&cfg, "no-shuffle", 0);
    } else if (rc != ES_ERR_USAGE || strncmp(err.msg, "fuzz.yaml:", 10) != 0) {
        abort();
    }
    es_config_free(&cfg);
    free(buf);
}

static void fuzz_args(const uint8_t *data, size_t size) {
    if (memmem(data, size, "onfig", 5)) return;
    char *copy = malloc(size + 1);
    if (!copy) return;
    memcpy(copy, data, size);
    copy[size] = '\0';
    char *argv[66];
    int argc = 0;
    argv[argc++] = "fuzz";
    for (size_t i = 0; i <= size && argc < 65;) {
        argv[argc++] = copy + i;
        i += strlen(copy + i) + 1;
    }
    argv[argc] = NULL;
    es_config cfg;
    es_error err = {0};
    int rc = es_config_parse(&cfg, OPTS, argc, argv, &err);
    if (rc == ES_OK) check_round_trip(&cfg);
    else if (rc != ES_ERR_USAGE || !err.msg[0]) abort();
    es_config_free(&cfg);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 0 && data[0] == 0x01) fuzz_args(data + 1, size - 1);
    else fuzz_file(data, size);
    return 0;
}
