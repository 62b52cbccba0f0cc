/* Logging: plain lines on stderr, each starting with the program's name, so that
 * interleaved Slurm logs stay readable. */
#ifndef ES_LOG_H
#define ES_LOG_H

#include "error.h"

void es_set_program(const char *name); /* argv[0] or a fixed name; the basename is kept */
const char *es_program(void);

void es_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* informational */
void es_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2))); /* "warning: ..." */
void es_set_quiet(int quiet);                                             /* silences es_log only */

/* Prints "PROGRAM: MESSAGE" and exits with err->code (1 if none was set). */
_Noreturn void es_exit_error(const es_error *err);

#endif
