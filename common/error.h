/* Errors: every fallible function returns an exit-code class and fills an es_error.
 *
 * The codes are the programs' exit codes (docs/cli.md): a message travels up unchanged
 * and main() prints it as "PROGRAM: MESSAGE". Messages name the file and, where it
 * applies, the line, sample or tensor: "data.jsonl:17: field \"text\" is not a string". */
#ifndef ES_ERROR_H
#define ES_ERROR_H

enum {
    ES_OK = 0,
    ES_ERR_RUNTIME = 1, /* I/O failure, out of memory, a library call that failed */
    ES_ERR_USAGE = 2,   /* bad command line or configuration */
    ES_ERR_DATA = 3,    /* bad input data: a malformed file, a value out of range */
};

typedef struct es_error {
    int code;
    char msg[1024];
} es_error;

/* Sets *err (when err is not NULL and holds no error yet) and returns code. The first
 * error wins, so a cleanup path cannot overwrite the cause. */
int es_fail(es_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to an error already set (e.g. the file name a lower layer did not know). */
void es_error_prefix(es_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void es_error_clear(es_error *err);

#endif
