#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char program_name[64] = "essence";
static int quiet;

void es_set_program(const char *name) {
    const char *slash = strrchr(name, '/');
    snprintf(program_name, sizeof program_name, "%s", slash ? slash + 1 : name);
}

const char *es_program(void) { return program_name; }

void es_set_quiet(int q) { quiet = q; }

static void vlog(const char *kind, const char *fmt, va_list ap) {
    char line[2048];
    vsnprintf(line, sizeof line, fmt, ap);
    /* One fprintf per line keeps lines whole when threads log at once. */
    fprintf(stderr, "%s: %s%s\n", program_name, kind, line);
}

void es_log(const char *fmt, ...) {
    if (quiet) return;
    va_list ap;
    va_start(ap, fmt);
    vlog("", fmt, ap);
    va_end(ap);
}

void es_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog("warning: ", fmt, ap);
    va_end(ap);
}

void es_exit_error(const es_error *err) {
    int code = err && err->code ? err->code : ES_ERR_RUNTIME;
    fprintf(stderr, "%s: %s\n", program_name, err && err->code ? err->msg : "unknown error");
    exit(code);
}
