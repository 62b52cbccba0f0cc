/* es_h5_check_heap: every variable-length value of a file read once in a child process, so
 * that libhdf5's own failures on a damaged global heap end as an error, never as our crash.
 *
 * Why a child: libhdf5 1.10.8 does not check a global heap collection against the references
 * into it. A damaged collection or reference makes H5Aread / H5Dread of a variable-length
 * string read past the collection's table (SIGSEGV in H5HG_read), loop forever (a free-space
 * object of size 0 in H5HG__cache_heap_deserialize), or allocate whatever length a reference
 * claims (H5T__conv_vlen). Nothing in the public API reaches those references before HDF5 follows
 * them, and h5py meets the same. So the child reads what we would read, and the parent looks only
 * at how it ended: a clean exit means every read either succeeded or failed with an HDF5 error
 * (the parent then gets the same error, reading the same bytes); a signal, a sanitizer's death,
 * memory beyond a bound, or CPU spent without progress means the file is damaged.
 *
 * The child is this same program started afresh (posix_spawn of its own executable, which a
 * constructor here recognises by ESSENCE_H5_HEAP_CHECK in its environment and turns into the
 * check before main runs): a forked copy would inherit every lock another thread held at the fork
 * (HDF5's, the sanitizer allocator's: a deadlock seen under ASan) and the parent's HDF5 caches. */
#include "h5file.h"
#include "utf8.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Present only in sanitizer builds (ASan/UBSan/libFuzzer runtimes). */
void __sanitizer_set_report_path(const char *path) __attribute__((weak));
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

enum {
    CHILD_DONE = 0,
    CHILD_DIED = 97,        /* a sanitizer stopped it: the same as a signal */
    CHILD_NO_MEMORY = 98,   /* a value needs more memory than the bound: a damaged length */
    CHILD_BAD_START = 99,   /* started without what it needs */
    ROWS_PER_READ = 256,    /* one progress line per this many elements */
    STALL_SECONDS = 600,    /* no progress line at all (a hung filesystem, or a held lock) */
};
/* CPU without a progress line: libhdf5 is looping (a line comes at every attribute and every 256
 * rows, milliseconds apart even under valgrind). */
double es_h5_heap_spin_seconds = 3;
/* What a reference may make the child allocate beyond what it uses already. */
#define CHILD_MEMORY_HEADROOM ((rlim_t)2 << 30)

/* ---- the child ---------------------------------------------------------------------------- */

typedef struct {
    int fd; /* progress lines to the parent */
    int attributes_only;
} walk;

static void say(const walk *w, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void say(const walk *w, const char *format, ...) {
    char line[1200];
    va_list ap;
    va_start(ap, format);
    int n = vsnprintf(line, sizeof line - 1, format, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
    /* Names come from the (damaged) file: what is not UTF-8, or is a control byte, becomes '?'. */
    for (size_t at; (at = es_utf8_invalid_at(line, (size_t)n)) != (size_t)-1;) line[at] = '?';
    for (int i = 0; i < n; i++)
        if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f) line[i] = '?';
    line[n++] = '\n';
    for (ssize_t off = 0, k; off < n; off += k)
        if ((k = write(w->fd, line + off, (size_t)(n - off))) <= 0) _exit(CHILD_DONE); /* the parent is gone */
}

static herr_t find_allocation_failure(unsigned n, const H5E_error2_t *entry, void *data) {
    (void)n;
    if (entry->maj_num == H5E_RESOURCE) *(int *)data = 1;
    return 0;
}

/* After a failed read: HDF5 gave up for want of memory (the bound of limit_memory). The parent,
 * without that bound, would allocate what a damaged length claims, so that is the end. */
static void stop_if_out_of_memory(const walk *w) {
    int failed = 0;
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, find_allocation_failure, &failed);
    if (failed) {
        say(w, "no memory");
        _exit(CHILD_NO_MEMORY);
    }
}

static int has_variable_data(hid_t type) {
    return type >= 0 && (H5Tdetect_class(type, H5T_VLEN) > 0 || H5Tis_variable_str(type) > 0);
}

static void read_attribute(const walk *w, hid_t attr, const char *object) {
    char name[256] = "?";
    H5Aget_name(attr, sizeof name, name);
    hid_t type = H5Aget_type(attr), space = H5Aget_space(attr);
    hid_t memory_type = has_variable_data(type) ? H5Tget_native_type(type, H5T_DIR_ASCEND) : -1;
    hssize_t n = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    size_t size = memory_type >= 0 ? H5Tget_size(memory_type) : 0;
    if (memory_type >= 0 && n > 0 && size > 0 && (size_t)n <= ((size_t)1 << 30) / size) {
        say(w, "attribute %s of %s", name, object);
        void *buffer = calloc((size_t)n, size);
        if (buffer && H5Aread(attr, memory_type, buffer) >= 0) H5Dvlen_reclaim(memory_type, space, H5P_DEFAULT, buffer);
        else stop_if_out_of_memory(w);
        free(buffer);
    }
    /* a failed read is the parent's error to report, if it reads that attribute */
    if (memory_type >= 0) H5Tclose(memory_type);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
}

/* Rows along the first dimension, ROWS_PER_READ at a time; a block that fails is read again
 * one row at a time, so that every row is either read or refused by HDF5. */
static void read_dataset(const walk *w, hid_t dataset, const char *name) {
    hid_t type = H5Dget_type(dataset), space = H5Dget_space(dataset);
    hid_t memory_type = has_variable_data(type) ? H5Tget_native_type(type, H5T_DIR_ASCEND) : -1;
    int rank = space >= 0 ? H5Sget_simple_extent_ndims(space) : -1;
    hsize_t dims[H5S_MAX_RANK];
    size_t size = memory_type >= 0 ? H5Tget_size(memory_type) : 0;
    if (memory_type < 0 || rank < 1 || H5Sget_simple_extent_dims(space, dims, NULL) < 0 || size == 0) goto done;
    double row_elements = 1;
    for (int i = 1; i < rank; i++) row_elements *= (double)dims[i];
    if (row_elements * size * ROWS_PER_READ > (double)(1 << 30)) goto done; /* no essence file holds such rows */
    void *buffer = malloc((size_t)row_elements * size * ROWS_PER_READ + 1);
    for (hsize_t first = 0; buffer && first < dims[0]; first += ROWS_PER_READ) {
        hsize_t rows = dims[0] - first < ROWS_PER_READ ? dims[0] - first : ROWS_PER_READ;
        for (hsize_t row = first, step = rows; row < first + rows;) {
            say(w, "rows %llu..%llu of %s", (unsigned long long)row, (unsigned long long)(row + step - 1), name);
            hsize_t start[H5S_MAX_RANK] = {row}, count[H5S_MAX_RANK] = {step};
            for (int i = 1; i < rank; i++) count[i] = dims[i];
            hid_t memory = H5Screate_simple(rank, count, NULL);
            int ok = memory >= 0 && H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
                     H5Dread(dataset, memory_type, memory, space, H5P_DEFAULT, buffer) >= 0;
            if (ok) H5Dvlen_reclaim(memory_type, memory, H5P_DEFAULT, buffer);
            else stop_if_out_of_memory(w);
            if (memory >= 0) H5Sclose(memory);
            if (!ok && step > 1) step = 1; /* again from this row, one at a time */
            else row += step;
        }
    }
    free(buffer);
done:
    if (memory_type >= 0) H5Tclose(memory_type);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
}

static void read_dataset_if_variable(const walk *w, hid_t file, const char *path) {
    hid_t dataset = H5Dopen2(file, path, H5P_DEFAULT);
    if (dataset < 0) return;
    hid_t type = H5Dget_type(dataset);
    int wanted = has_variable_data(type);
    if (type >= 0) H5Tclose(type);
    /* A filter we lack: the parent names it (es_h5_check_filters) rather than read it. */
    es_error ignored = {0};
    if (wanted && es_h5_check_filters(dataset, path, &ignored) != ES_OK) wanted = 0;
    if (wanted) read_dataset(w, dataset, path);
    H5Dclose(dataset);
}

/* Every object reachable by hard links, one at a time, so that a damaged one does not hide the
 * others (H5Ovisit stops at the first): its attributes, its rows when a dataset, its members when
 * a group. Each object once (by address), MAX_DEPTH deep at most. */
enum { MAX_DEPTH = 32, MAX_OBJECTS = 1 << 16 };

/* Every attribute name the programs look up by name (grep es_h5_attr_get_ and H5Aopen): kept in
 * step with them, since a lookup by name can succeed where listing fails. */
static const char *const attributes_read_by_name[] = {
    "format", "format_version", "layers", "fingerprint", "model_fingerprint", "tokenizer_fingerprint", "resume_key",
    "hidden_size", "commit", "committed_samples", "committed_tokens", "config", "model_config", "layer_map", "sigma",
    "seed", "created", "tool_version", "specials_template", "add_bos",
};

typedef struct {
    haddr_t addresses[MAX_OBJECTS];
    int n;
} seen_objects;

static void visit(const walk *w, hid_t file, const char *path, int depth, seen_objects *seen) {
    H5O_info_t info, counted;
    if (depth > MAX_DEPTH || seen->n == MAX_OBJECTS || H5Oget_info_by_name2(file, path, &info, H5O_INFO_BASIC, H5P_DEFAULT) < 0)
        return;
    for (int i = 0; i < seen->n; i++)
        if (seen->addresses[i] == info.addr) return;
    seen->addresses[seen->n++] = info.addr;
    hsize_t n_attributes = H5Oget_info_by_name2(file, path, &counted, H5O_INFO_NUM_ATTRS, H5P_DEFAULT) >= 0 ? counted.num_attrs : 0;
    for (hsize_t i = 0; i < n_attributes; i++) {
        hid_t attr = H5Aopen_by_idx(file, path, H5_INDEX_NAME, H5_ITER_INC, i, H5P_DEFAULT, H5P_DEFAULT);
        if (attr < 0) continue;
        read_attribute(w, attr, path);
        H5Aclose(attr);
    }
    /* A damaged attribute table may hide attributes from listing that a lookup by name still
     * finds: those essence reads by name are read by name too. */
    for (size_t i = 0; i < sizeof attributes_read_by_name / sizeof *attributes_read_by_name; i++) {
        if (H5Aexists_by_name(file, path, attributes_read_by_name[i], H5P_DEFAULT) <= 0) continue;
        hid_t attr = H5Aopen_by_name(file, path, attributes_read_by_name[i], H5P_DEFAULT, H5P_DEFAULT);
        if (attr < 0) continue;
        read_attribute(w, attr, path);
        H5Aclose(attr);
    }
    if (info.type == H5O_TYPE_DATASET && !w->attributes_only) read_dataset_if_variable(w, file, path);
    if (info.type != H5O_TYPE_GROUP) return;
    H5G_info_t group;
    if (H5Gget_info_by_name(file, path, &group, H5P_DEFAULT) < 0) return;
    for (hsize_t i = 0; i < group.nlinks && i < MAX_OBJECTS; i++) {
        char name[512], member[1100];
        if (H5Lget_name_by_idx(file, path, H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT) <= 0) continue;
        snprintf(member, sizeof member, "%s%s%s", path, strcmp(path, "/") ? "/" : "", name);
        H5L_info_t link;
        if (H5Lget_info(file, member, &link, H5P_DEFAULT) >= 0 && link.type == H5L_TYPE_HARD) visit(w, file, member, depth + 1, seen);
    }
}

static void child_died(void) {
    _exit(CHILD_DIED);
}

static void limit_memory(void) {
    long pages = 0;
    FILE *statm = fopen("/proc/self/statm", "r");
    if (statm) {
        if (fscanf(statm, "%ld", &pages) != 1) pages = 0;
        fclose(statm);
    }
    if (pages <= 0) return;
    rlim_t now = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE);
    struct rlimit limit;
    if (getrlimit(RLIMIT_AS, &limit) != 0) return;
    rlim_t wanted = now + CHILD_MEMORY_HEADROOM;
    if (limit.rlim_cur == RLIM_INFINITY || limit.rlim_cur > wanted) {
        limit.rlim_cur = wanted;
        setrlimit(RLIMIT_AS, &limit);
    }
}

static void child_main(const char *path, int attributes_only, int fd) {
    /* A crash must end this process as a signal, not run the parent's handlers (a fuzzer's,
     * a sanitizer's report into the parent's log). */
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, STDERR_FILENO), dup2(devnull, STDOUT_FILENO);
    if (__sanitizer_set_report_path) __sanitizer_set_report_path("stderr");
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(child_died);
    static const int crashes[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (size_t i = 0; i < sizeof crashes / sizeof *crashes; i++) signal(crashes[i], SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    limit_memory();
    walk w = {.fd = fd, .attributes_only = attributes_only};
    say(&w, "started");
    es_error ignored = {0};
    es_h5_init(&ignored); /* silent, and the zstd filter */
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file >= 0) {
        static seen_objects seen;
        visit(&w, file, "/", 0, &seen);
        /* and by name what the readers open by name, should the walk not have reached it (a
         * group whose member list is damaged while a lookup by name still finds the object) */
        static const char *by_name[] = {"/samples/id", "/samples", "/tokens", "/latents", "/targets", "/stats"};
        for (size_t i = 0; i < sizeof by_name / sizeof *by_name; i++) visit(&w, file, by_name[i], 1, &seen);
    }
    say(&w, "done");
    _exit(CHILD_DONE);
}

#define CHILD_ENVIRONMENT "ESSENCE_H5_HEAP_CHECK"
#define CHILD_NAME "essence-h5-heap-check"

/* The child's entry: "ESSENCE_H5_HEAP_CHECK=FD,ATTRIBUTES_ONLY" and argv {name, PATH}. */
__attribute__((constructor)) static void heap_check_entry(int argc, char **argv) {
    const char *spec = getenv(CHILD_ENVIRONMENT);
    if (!spec || argc < 1 || strcmp(argv[0], CHILD_NAME)) return; /* both, or an ordinary start */
    int fd = -1, attributes_only = 0;
    if (sscanf(spec, "%d,%d", &fd, &attributes_only) != 2 || fd < 0 || argc != 2) _exit(CHILD_BAD_START);
    child_main(argv[1], attributes_only, fd);
}

/* ---- the parent --------------------------------------------------------------------------- */

static double cpu_seconds(pid_t pid) {
    clockid_t clock;
    struct timespec t;
    if (clock_getcpuclockid(pid, &clock) != 0 || clock_gettime(clock, &t) != 0) return 0;
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static double wall_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Whether this process has PATH open in HDF5 already (checked when first opened): then the file
 * on disk may lag what this process has written, and the child would read that. */
static int already_open(const char *path) {
    struct stat wanted;
    if (stat(path, &wanted) != 0) return 0;
    ssize_t n = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_FILE);
    if (n <= 0) return 0;
    hid_t *files = calloc((size_t)n, sizeof *files);
    int found = 0;
    if (files) n = H5Fget_obj_ids(H5F_OBJ_ALL, H5F_OBJ_FILE, (size_t)n, files);
    for (ssize_t i = 0; files && i < n && !found; i++) {
        int *fd = NULL;
        struct stat open_file;
        found = H5Fget_vfd_handle(files[i], H5P_DEFAULT, (void **)&fd) >= 0 && fd && fstat(*fd, &open_file) == 0 &&
                open_file.st_dev == wanted.st_dev && open_file.st_ino == wanted.st_ino;
    }
    free(files);
    return found;
}

int es_h5_check_heap(const char *path, int attributes_only, es_error *err) {
    if (already_open(path)) return ES_OK;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot check the file: pipe: %s", path, strerror(errno));
    /* Our own executable (readlink, not /proc/self/exe itself: under valgrind that is valgrind),
     * its write end of the pipe on a descriptor that survives the exec, one BLAS thread. */
    char self[4096];
    ssize_t self_len = readlink("/proc/self/exe", self, sizeof self - 1);
    int child_fd = fds[1] == 3 ? 4 : 3;
    char spec[64], **env = NULL;
    extern char **environ;
    size_t n_env = 0;
    while (environ[n_env]) n_env++;
    env = calloc(n_env + 4, sizeof *env);
    posix_spawn_file_actions_t actions;
    int spawn_rc = posix_spawn_file_actions_init(&actions);
    pid_t pid = -1;
    if (self_len > 0 && env && !spawn_rc) {
        self[self_len] = '\0';
        size_t k = 0;
        for (size_t i = 0; i < n_env; i++)
            if (strncmp(environ[i], CHILD_ENVIRONMENT "=", sizeof CHILD_ENVIRONMENT) && strncmp(environ[i], "OPENBLAS_NUM_THREADS=", 21))
                env[k++] = environ[i];
        snprintf(spec, sizeof spec, CHILD_ENVIRONMENT "=%d,%d", child_fd, attributes_only ? 1 : 0);
        env[k++] = spec;
        env[k++] = "OPENBLAS_NUM_THREADS=1";
        env[k] = NULL;
        char *argv[] = {CHILD_NAME, (char *)path, NULL};
        spawn_rc = posix_spawn_file_actions_adddup2(&actions, fds[1], child_fd);
        if (!spawn_rc) spawn_rc = posix_spawn(&pid, self, &actions, NULL, argv, env);
    } else if (!spawn_rc) {
        spawn_rc = self_len <= 0 ? errno : ENOMEM;
    }
    posix_spawn_file_actions_destroy(&actions);
    free(env);
    if (spawn_rc || pid < 0) {
        close(fds[0]), close(fds[1]);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot start the check of its variable-length data: %s", path,
                       strerror(spawn_rc ? spawn_rc : EAGAIN));
    }
    close(fds[1]);
    char last[1200] = "the file", pending[1200];
    size_t have = 0;
    int started = 0, finished = 0, no_memory = 0, stuck = 0;
    double progress_cpu = cpu_seconds(pid), progress_wall = wall_seconds();
    for (;;) {
        struct pollfd p = {.fd = fds[0], .events = POLLIN};
        int ready = poll(&p, 1, 100);
        if (ready < 0 && errno == EINTR) continue;
        if (ready > 0) {
            ssize_t k = read(fds[0], pending + have, sizeof pending - 1 - have);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) break; /* the child ended */
            have += (size_t)k;
            char *newline;
            while ((newline = memchr(pending, '\n', have))) {
                *newline = '\0';
                if (!strcmp(pending, "started")) started = 1;
                else if (!strcmp(pending, "done")) finished = 1;
                else if (!strcmp(pending, "no memory")) no_memory = 1;
                else snprintf(last, sizeof last, "%s", pending);
                size_t used = (size_t)(newline - pending) + 1;
                memmove(pending, newline + 1, have - used);
                have -= used;
            }
            if (have == sizeof pending - 1) have = 0; /* a line longer than any we write: drop it */
            progress_cpu = cpu_seconds(pid), progress_wall = wall_seconds();
        } else if (cpu_seconds(pid) - progress_cpu > es_h5_heap_spin_seconds) {
            stuck = 1;
        } else if (wall_seconds() - progress_wall > STALL_SECONDS) {
            stuck = 2;
        }
        if (stuck) {
            kill(pid, SIGKILL);
            break;
        }
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (stuck == 1)
        return es_fail(err, ES_ERR_DATA, "%s: damaged: libhdf5 loops without end reading the variable-length data of %s "
                       "(a damaged global heap); the file cannot be read: write it again", path, last);
    if (stuck == 2)
        return es_fail(err, ES_ERR_RUNTIME, "%s: reading the variable-length data of %s made no progress in %d s "
                       "(a hung filesystem?)", path, last, STALL_SECONDS);
    if (WIFEXITED(status) && WEXITSTATUS(status) == CHILD_DONE && finished) return ES_OK;
    if (!started)
        return es_fail(err, ES_ERR_RUNTIME, "%s: the check of its variable-length data did not start (%s, status %d)", path,
                       self, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    if (WIFEXITED(status) && WEXITSTATUS(status) == CHILD_NO_MEMORY && no_memory)
        return es_fail(err, ES_ERR_DATA, "%s: damaged: reading the variable-length data of %s needs more than %d GiB of "
                       "memory (a damaged length in a reference into the global heap); the file cannot be read: write it again",
                       path, last, (int)(CHILD_MEMORY_HEADROOM >> 30));
    char how[64];
    if (WIFSIGNALED(status)) snprintf(how, sizeof how, "crashes (%s)", strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status) && WEXITSTATUS(status) == CHILD_DIED) snprintf(how, sizeof how, "crashes (a sanitizer stopped it)");
    else snprintf(how, sizeof how, "fails (status %d)", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return es_fail(err, ES_ERR_DATA, "%s: damaged: libhdf5 %s reading the variable-length data of %s (a damaged "
                   "global heap, or a length beyond memory); the file cannot be read: write it again", path, how, last);
}
