/* essence-inspect plot METRICS.jsonl -o OUT.png: essence-align's training curves, drawn by gnuplot.
 *
 * The series go to files in a private mkdtemp folder and the script to gnuplot's standard input
 * (posix_spawnp, no shell). Every name in the script is a single-quoted gnuplot string, in which
 * only the quote itself is special (doubled); control characters cannot be quoted and are
 * refused; relative paths get "./" so that gnuplot never takes "|cmd" or "<cmd" for a pipe.
 * The PNG is drawn into OUT.png.partial and renamed once gnuplot has succeeded. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "files.h"
#include "inspect.h"
#include "jsonl.h"

extern char **environ;

/* What the plot draws; the other fields essence-align writes are only checked to be numbers. */
enum { S_LOSS, S_LATENT, S_CE, S_EVAL_LATENT, S_EVAL_CONST, S_LR, N_SERIES };
static const char *const series_fields[N_SERIES] = {"loss", "latent_mse", "ce", "eval_latent_mse", "eval_const_mse", "lr"};
static const char *const other_fields[] = {"grad_norm", "tokens_per_s", "eval_cosine", "eval_ce", "eval_r2"};

typedef struct point {
    int64_t step;
    size_t order; /* line order: of two points at one step, the later wins (a resumed run) */
    double value;
} point;

typedef struct series {
    point *points;
    size_t n, cap;
} series;

static int add_point(series *s, int64_t step, size_t order, double value) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        point *grown = realloc(s->points, cap * sizeof *grown);
        if (!grown) return -1;
        s->points = grown, s->cap = cap;
    }
    s->points[s->n++] = (point){step, order, value};
    return 0;
}

static int by_step_then_order(const void *a, const void *b) {
    const point *x = a, *y = b;
    if (x->step != y->step) return x->step < y->step ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Sorted by step, one point a step (the last written). */
static void settle(series *s) {
    if (s->n < 2) return;
    qsort(s->points, s->n, sizeof *s->points, by_step_then_order);
    size_t kept = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (kept > 0 && s->points[kept - 1].step == s->points[i].step) kept--;
        s->points[kept++] = s->points[i];
    }
    s->n = kept;
}

/* A field's value: 1 and *value for a number, 0 when absent or null, -1 for anything else. */
static int number_field(const json_t *object, const char *field, double *value) {
    const json_t *v = json_object_get(object, field);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return -1;
    *value = json_number_value(v);
    return 1;
}

static int read_metrics(const char *path, series s[N_SERIES], size_t *plotted_lines, es_error *err) {
    es_jsonl reader;
    int rc = es_jsonl_open(&reader, path, err);
    if (rc) return rc;
    json_t *object = NULL;
    int got;
    size_t order = 0;
    while (rc == ES_OK && (got = es_jsonl_next(&reader, &object, err)) == 1) {
        const json_t *step = json_object_get(object, "step");
        if (!json_is_integer(step) || json_integer_value(step) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"step\" is missing or not a non-negative integer", reader.path,
                         reader.line);
        int used = 0;
        for (size_t i = 0; rc == ES_OK && i < N_SERIES + sizeof other_fields / sizeof *other_fields; i++) {
            const char *field = i < N_SERIES ? series_fields[i] : other_fields[i - N_SERIES];
            double value;
            int have = number_field(object, field, &value);
            if (have < 0) rc = es_fail(err, ES_ERR_DATA, "%s:%ld: field \"%s\" is not a number", reader.path, reader.line, field);
            else if (have && i < N_SERIES) {
                if (add_point(&s[i], (int64_t)json_integer_value(step), order++, value))
                    rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
                used = 1;
            }
        }
        *plotted_lines += (size_t)used;
        json_decref(object);
    }
    if (rc == ES_OK && got < 0) rc = err->code;
    es_jsonl_close(&reader);
    for (int i = 0; rc == ES_OK && i < N_SERIES; i++) settle(&s[i]);
    return rc;
}

/* A gnuplot string literal: single quotes, where only '' (a quote) is an escape. */
static void put_quoted(FILE *out, const char *text) {
    fputc('\'', out);
    for (const char *p = text; *p; p++) {
        if (*p == '\'') fputc('\'', out);
        fputc(*p, out);
    }
    fputc('\'', out);
}

/* A file name for the script. gnuplot reads a name starting with '<' (data) or '|' (output)
 * as a shell command, and may expand a leading '~': a relative name gets "./" before it. */
static void put_path(FILE *out, const char *path) {
    if (path[0] == '/') {
        put_quoted(out, path);
        return;
    }
    char *prefixed = NULL;
    if (asprintf(&prefixed, "./%s", path) < 0) {
        fputs("''", out); /* out of memory: an empty name fails gnuplot, never something else */
        return;
    }
    put_quoted(out, prefixed);
    free(prefixed);
}

/* The names that go into the script: a control character would end gnuplot's line. */
static int quotable(const char *text) {
    for (const unsigned char *p = (const unsigned char *)text; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return 0;
    return 1;
}

typedef struct scratch {
    char dir[4096];
    char *files[N_SERIES + 1]; /* the series' data files, then gnuplot's messages (malloc'd) */
} scratch;

static void scratch_remove(scratch *t) {
    for (int i = 0; i <= N_SERIES; i++)
        if (t->files[i]) unlink(t->files[i]), free(t->files[i]);
    if (t->dir[0]) rmdir(t->dir);
}

static int write_series(const char *path, const series *s, es_error *err) {
    FILE *f = fopen(path, "w");
    if (!f) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", path, strerror(errno));
    for (size_t i = 0; i < s->n; i++) fprintf(f, "%lld %.9g\n", (long long)s->points[i].step, s->points[i].value);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) return es_fail(err, ES_ERR_RUNTIME, "%s: write failed: %s", path, strerror(errno));
    return ES_OK;
}

static const char *const series_titles[N_SERIES] = {"loss", "latent_mse", "ce", "eval_latent_mse", "eval_const_mse", "lr"};

static void plot_command(FILE *out, const scratch *t, const series s[N_SERIES], const int *which, int n) {
    fputs("plot ", out);
    for (int k = 0; k < n; k++) {
        int i = which[k];
        if (k) fputs(", \\\n     ", out);
        put_path(out, t->files[i]);
        fputs(" using 1:2", out);
        /* eval runs are sparse: points; a single training point would not show as a line */
        if (i == S_EVAL_LATENT || i == S_EVAL_CONST || s[i].n == 1) fputs(" with points pt 7 ps 1.3", out);
        else fputs(" with lines lw 2", out);
        fputs(" title ", out);
        put_quoted(out, series_titles[i]);
    }
    fputc('\n', out);
}

/* The whole script; NULL when out of memory. */
static char *build_script(const char *metrics, const char *partial, const scratch *t, const series s[N_SERIES],
                          int show_ce) {
    int top[5], n_top = 0;
    for (int i = 0; i < N_SERIES; i++)
        if (i != S_LR && s[i].n > 0 && (i != S_CE || show_ce)) top[n_top++] = i;
    int positive = 1;
    for (int k = 0; k < n_top; k++)
        for (size_t j = 0; j < s[top[k]].n; j++) positive = positive && s[top[k]].points[j].value > 0;
    const int panels = (n_top > 0) + (s[S_LR].n > 0);
    const char *base = strrchr(metrics, '/') ? strrchr(metrics, '/') + 1 : metrics;

    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    if (!out) return NULL;
    /* pngcairo draws better; gnuplot-nox has it, other builds may only have png */
    fprintf(out,
            "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
            "    set terminal pngcairo noenhanced size 1000,%d\n"
            "} else {\n"
            "    set terminal png noenhanced size 1000,%d\n"
            "}\n",
            420 * panels, 420 * panels);
    fputs("set output ", out);
    put_path(out, partial);
    fprintf(out, "\nset multiplot layout %d,1 title ", panels);
    put_quoted(out, base);
    /* a fixed left margin lines the panels' step axes up whatever their tick labels */
    fputs("\nset grid\nset key top right\nset xlabel 'step'\nset lmargin 12\n", out);
    if (n_top > 0) {
        fputs("set ylabel 'loss'\n", out);
        if (positive) fputs("set logscale y\n", out);
        plot_command(out, t, s, top, n_top);
        fputs("unset logscale y\n", out);
    }
    if (s[S_LR].n > 0) {
        int lr = S_LR;
        /* room above the plateau so the line is not drawn on the frame */
        fputs("set ylabel 'learning rate'\nset offsets 0, 0, graph 0.05, 0\n", out);
        plot_command(out, t, s, &lr, 1);
    }
    fputs("unset multiplot\nunset output\n", out);
    int bad = ferror(out);
    if (fclose(out) != 0 || bad) {
        free(text);
        return NULL;
    }
    return text;
}


/* The end of gnuplot's messages, for the error (gnuplot names the line that failed). */
static void last_messages(const char *log, char *buf, size_t size) {
    buf[0] = '\0';
    FILE *f = fopen(log, "r");
    if (!f) return;
    char text[4096];
    if (fseek(f, -(long)(sizeof text - 1), SEEK_END) != 0) rewind(f); /* a short log: from its start */
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    char *start = text;
    while (*start == '\n' || *start == ' ') start++;
    size_t len = strlen(start);
    while (len > 0 && (start[len - 1] == '\n' || start[len - 1] == ' ')) start[--len] = '\0';
    if (len + 1 > size) start += len + 1 - size, len = size - 1;
    memcpy(buf, start, len + 1);
}

static int run_gnuplot(const char *script, const char *log, es_error *err) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return es_fail(err, ES_ERR_RUNTIME, "cannot create a pipe: %s", strerror(errno));
    posix_spawn_file_actions_t actions;
    int rc = posix_spawn_file_actions_init(&actions);
    if (!rc) rc = posix_spawn_file_actions_adddup2(&actions, fds[0], 0);
    if (!rc) rc = posix_spawn_file_actions_addopen(&actions, 2, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (!rc) rc = posix_spawn_file_actions_adddup2(&actions, 2, 1);
    pid_t pid = -1;
    /* -d: no ~/.gnuplot, so the plot is the same for every user */
    char *argv[] = {(char *)"gnuplot", (char *)"-d", NULL};
    if (!rc) rc = posix_spawnp(&pid, "gnuplot", &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[0]);
    if (rc) {
        close(fds[1]);
        if (rc == ENOENT)
            return es_fail(err, ES_ERR_RUNTIME, "gnuplot not found on PATH: install it (Debian/Ubuntu: apt-get install gnuplot-nox)");
        return es_fail(err, ES_ERR_RUNTIME, "cannot start gnuplot: %s", strerror(rc));
    }
    /* gnuplot may die before reading everything: that is its exit status, not our SIGPIPE */
    struct sigaction ignore = {.sa_handler = SIG_IGN}, old;
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGPIPE, &ignore, &old);
    int write_failed = es_write_all(fds[1], script, strlen(script)) ? errno : 0;
    close(fds[1]);
    sigaction(SIGPIPE, &old, NULL);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return es_fail(err, ES_ERR_RUNTIME, "gnuplot: waitpid failed: %s", strerror(errno));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && !write_failed) return ES_OK;
    char messages[600];
    last_messages(log, messages, sizeof messages);
    if (WIFSIGNALED(status))
        return es_fail(err, ES_ERR_RUNTIME, "gnuplot was killed by signal %d: %s", WTERMSIG(status), messages);
    return es_fail(err, ES_ERR_RUNTIME, "gnuplot failed (exit status %d): %s", WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                   messages[0] ? messages : write_failed ? strerror(write_failed) : "no message");
}

/* The drawn file must be a PNG; then fsync, rename, fsync the folder. */
static int finish_png(const char *partial, const char *path, es_error *err) {
    int fd = open(partial, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open: %s", partial, strerror(errno));
    static const unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    unsigned char head[8];
    int rc = ES_OK;
    if (read(fd, head, 8) != 8 || memcmp(head, signature, 8) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: gnuplot did not write a PNG", partial);
    else if (fsync(fd) != 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: fsync failed: %s", partial, strerror(errno));
    close(fd);
    if (rc == ES_OK && rename(partial, path) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot rename to %s: %s", partial, path, strerror(errno));
    if (rc == ES_OK) {
        char *dir = strdup(path), *slash = dir ? strrchr(dir, '/') : NULL;
        if (slash) slash[slash == dir] = '\0';
        int dfd = open(dir && slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) fsync(dfd), close(dfd); /* best effort: the PNG is only a picture */
        free(dir);
    }
    return rc;
}

int inspect_plot(const char *metrics, const es_config *cfg, es_error *err) {
    const char *out = es_config_str(cfg, "out");
    if (!out || !*out) return es_fail(err, ES_ERR_USAGE, "usage: essence-inspect plot METRICS.jsonl -o OUT.png");
    if (!quotable(out) || !quotable(metrics))
        return es_fail(err, ES_ERR_USAGE, "plot: file names with control characters (newline, tab) cannot be given to gnuplot");
    series s[N_SERIES] = {{0}};
    size_t plotted = 0;
    int rc = read_metrics(metrics, s, &plotted, err);
    int show_ce = 0;
    for (size_t j = 0; j < s[S_CE].n; j++) show_ce = show_ce || s[S_CE].points[j].value != 0;
    size_t points = 0;
    for (int i = 0; i < N_SERIES; i++) points += i == S_CE && !show_ce ? 0 : s[i].n;
    if (rc == ES_OK && points == 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: no plottable lines (lines with \"step\" and \"loss\", \"latent_mse\", "
                                       "\"lr\", \"eval_latent_mse\" or \"eval_const_mse\")", metrics);

    char *partial = rc ? NULL : malloc(strlen(out) + sizeof ".partial");
    if (rc == ES_OK && !partial) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (partial) sprintf(partial, "%s.partial", out);
    int created = 0;
    if (rc == ES_OK) { /* an unwritable output is our message, not gnuplot's */
        int fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", partial, strerror(errno));
        else close(fd), created = 1;
    }
    scratch *t = rc ? NULL : calloc(1, sizeof *t);
    if (rc == ES_OK && !t) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (rc == ES_OK) {
        const char *tmp = getenv("TMPDIR");
        snprintf(t->dir, sizeof t->dir, "%s/essence-plot-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!quotable(t->dir)) rc = es_fail(err, ES_ERR_USAGE, "TMPDIR holds a control character");
        else if (!mkdtemp(t->dir)) {
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create a folder: %s", t->dir, strerror(errno));
            t->dir[0] = '\0';
        }
    }
    for (int i = 0; rc == ES_OK && i < N_SERIES; i++) {
        if (s[i].n == 0) continue;
        if (asprintf(&t->files[i], "%s/%s.dat", t->dir, series_fields[i]) < 0) {
            t->files[i] = NULL;
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        } else {
            rc = write_series(t->files[i], &s[i], err);
        }
    }
    char *script = NULL;
    if (rc == ES_OK) {
        if (asprintf(&t->files[N_SERIES], "%s/gnuplot.log", t->dir) < 0) t->files[N_SERIES] = NULL;
        script = t->files[N_SERIES] ? build_script(metrics, partial, t, s, show_ce) : NULL;
        if (!script) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    if (rc == ES_OK) rc = run_gnuplot(script, t->files[N_SERIES], err);
    if (rc == ES_OK) rc = finish_png(partial, out, err);
    if (rc && created) unlink(partial);
    if (rc == ES_OK)
        printf("%s: plotted from %zu metrics lines: %zu training steps, %zu eval points\n", out, plotted, s[S_LOSS].n,
               s[S_EVAL_LATENT].n);
    if (t) scratch_remove(t);
    free(t);
    free(script);
    free(partial);
    for (int i = 0; i < N_SERIES; i++) free(s[i].points);
    if (rc && err->code == ES_ERR_RUNTIME && strncmp(err->msg, "gnuplot", 7) == 0) es_error_prefix(err, "%s", out);
    return rc;
}
