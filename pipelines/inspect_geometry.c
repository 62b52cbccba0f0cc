/* essence-inspect geometry STUDENT.h5 [--teacher T.h5,...]: how well a student file's targets keep the
 * teacher's geometry (docs/geometry.md). Per mapped layer pair, on a seeded sample of aligned rows:
 *   (a) kernel fidelity: t·t'/D against k = exp(-σ²‖x̂-x̂'‖²/(2d)), measured error beside the error
 *       random-feature theory predicts for m = D/2 frequencies;
 *   (b) neighbourhood preservation: mutual k-NN overlap between x̂ and t, linear CKA, each beside
 *       its value with the targets' rows shuffled (the chance level);
 *   (d) --sigma-sweep: the overlap, CKA and the best input-independent MSEs for σ = 0.25 ... 8.
 * Everything is computed in double; the Gram matrices by OpenBLAS. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fourier.h"
#include "h5file.h"
#include "h5rows.h"
#include "inspect.h"
#include "teacher_set.h"

static uint64_t splitmix(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static int64_t below(uint64_t *state, int64_t n) { return (int64_t)(splitmix(state) % (uint64_t)n); }

typedef struct sampled_row {
    int64_t token, teacher_row;
} sampled_row;

static int by_teacher_row(const void *a, const void *b) {
    const sampled_row *x = a, *y = b;
    return (x->teacher_row > y->teacher_row) - (x->teacher_row < y->teacher_row);
}

/* What one layer pair's (or one σ's) neighbourhood figures are. */
typedef struct neighbourhood {
    double overlap, overlap_null, cka, cka_null;
} neighbourhood;

/* G = A Aᵀ for A (n, w) row-major. */
static void gram(const double *a, int n, int w, double *g) {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, w, 1.0, a, w, a, w, 0.0, g, n);
}

/* The k nearest neighbours (squared Euclidean distance from the Gram matrix, ties by index) of
 * every row but itself: nn (n, k). */
static void knn(const double *g, int n, int k, int *nn, double *dist) {
    for (int i = 0; i < n; i++) {
        int *list = nn + (size_t)i * k;
        double *best = dist; /* k distances, ascending */
        int have = 0;
        for (int j = 0; j < n; j++) {
            if (j == i) continue;
            double d2 = g[(size_t)i * n + i] + g[(size_t)j * n + j] - 2 * g[(size_t)i * n + j];
            if (have == k && d2 >= best[k - 1]) continue;
            int at = have < k ? have++ : k - 1;
            while (at > 0 && best[at - 1] > d2) best[at] = best[at - 1], list[at] = list[at - 1], at--;
            best[at] = d2, list[at] = j;
        }
    }
}

/* mean_i |A(i) ∩ B(i)| / k, where B(i) = inverse(perm)(nn_b(perm(i))) (perm NULL: the identity). */
static double overlap(const int *nn_a, const int *nn_b, const int *perm, const int *inverse, int n, int k) {
    double total = 0;
    for (int i = 0; i < n; i++) {
        const int *a = nn_a + (size_t)i * k, *b = nn_b + (size_t)(perm ? perm[i] : i) * k;
        int common = 0;
        for (int p = 0; p < k; p++)
            for (int q = 0; q < k; q++) common += a[p] == (perm ? inverse[b[q]] : b[q]);
        total += (double)common / k;
    }
    return total / n;
}

/* Centres a Gram matrix in place: H G H with H = I - 11ᵀ/n. */
static void centre(double *g, int n) {
    double *row_mean = calloc((size_t)n, sizeof *row_mean), all = 0;
    if (!row_mean) return;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) row_mean[i] += g[(size_t)i * n + j];
        row_mean[i] /= n, all += row_mean[i];
    }
    all /= n;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) g[(size_t)i * n + j] += all - row_mean[i] - row_mean[j];
    free(row_mean);
}

/* Linear CKA from centred Grams K, L: <K, L> / (‖K‖ ‖L‖), L's rows and columns permuted. */
static double cka(const double *kc, const double *lc, const int *perm, int n) {
    double kl = 0, kk = 0, ll = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double a = kc[(size_t)i * n + j], b = lc[(size_t)(perm ? perm[i] : i) * n + (perm ? perm[j] : j)];
            kl += a * b, kk += a * a, ll += b * b;
        }
    return kk > 0 && ll > 0 ? kl / sqrt(kk * ll) : 0;
}

/* Neighbourhood figures of targets t (n, D) against the teacher's k-NN lists and centred Gram. */
static int neighbourhood_of(const double *t, int n, int width, int k, const int *nn_x, const double *kx, const int *perm,
                            const int *inverse, neighbourhood *out) {
    double *g = malloc((size_t)n * n * sizeof *g), *dist = malloc((size_t)k * sizeof *dist);
    int *nn_t = malloc((size_t)n * k * sizeof *nn_t);
    if (!g || !dist || !nn_t) {
        free(g), free(dist), free(nn_t);
        return -1;
    }
    gram(t, n, width, g);
    knn(g, n, k, nn_t, dist);
    out->overlap = overlap(nn_x, nn_t, NULL, NULL, n, k);
    out->overlap_null = overlap(nn_x, nn_t, perm, inverse, n, k);
    centre(g, n);
    out->cka = cka(kx, g, NULL, n);
    out->cka_null = cka(kx, g, perm, n);
    free(g), free(dist), free(nn_t);
    return 0;
}

/* The best input-independent MSEs of targets t (n, D): by the mean target (the targets' variance,
 * mean over dimensions) and by the one constant of norm √D (an RMS-normalised student's best
 * constant: 1 + mean‖t‖²/D − 2‖mean t‖/√D, DESIGN.md "Training objective"). */
static void constant_mse(const double *t, int n, int width, double *variance, double *const_mse) {
    double var = 0, mean_norm_sq = 0, sq = 0;
    for (int c = 0; c < width; c++) {
        double sum = 0, sum_sq = 0;
        for (int i = 0; i < n; i++) sum += t[(size_t)i * width + c], sum_sq += t[(size_t)i * width + c] * t[(size_t)i * width + c];
        double mean = sum / n;
        var += sum_sq / n - mean * mean, mean_norm_sq += mean * mean, sq += sum_sq / n;
    }
    *variance = var / width;
    *const_mse = 1 + sq / width - 2 * sqrt(mean_norm_sq) / sqrt((double)width);
}

/* The student file and what it says about its teacher. */
typedef struct geometry_input {
    const char *path;
    es_h5file file;
    int64_t tokens;         /* student tokens */
    int64_t *teacher_row;   /* (tokens) */
    int width, m, d;        /* D, D/2, the teacher's d */
    double sigma;
    int64_t seed;
    int rms;                /* input_norm = "rms" */
    int n_pairs, teacher_layers[INSPECT_MAX_LAYERS], student_layers[INSPECT_MAX_LAYERS];
    float *omega;           /* (m, d) */
} geometry_input;

/* The teacher paths the student file records: the `in` line of its stored configuration. */
static char *recorded_teacher(hid_t file) {
    es_error ignored = {0};
    char *config = NULL, *found = NULL;
    if (es_h5_attr_get_str(file, "config", &config, &ignored)) return NULL;
    for (char *line = config; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, "in:", 3)) continue;
        char *value = line + 3, *end = strchr(value, '\n');
        if (end) *end = 0;
        while (*value == ' ') value++;
        size_t n = strlen(value);
        while (n && value[n - 1] == ' ') value[--n] = 0;
        if (n >= 2 && (value[0] == '"' || value[0] == '\'') && value[n - 1] == value[0]) value[n - 1] = 0, value++;
        found = *value ? strdup(value) : NULL;
        break;
    }
    free(config);
    return found;
}

static int read_input(geometry_input *in, const es_config *cfg, es_error *err) {
    hid_t f = in->file.id;
    char *format = NULL, *map = NULL, *norm = NULL;
    int rc = es_h5_attr_get_str(f, "format", &format, err);
    if (!rc && strcmp(format, "essence.student"))
        rc = es_fail(err, ES_ERR_DATA, "%s: format is \"%s\", not essence.student: geometry reads a student.h5", in->path, format);
    if (!rc) rc = es_h5_attr_get_str(f, "layer_map", &map, err);
    if (!rc) rc = es_h5_attr_get_f64(f, "sigma", &in->sigma, err);
    if (!rc) rc = es_h5_attr_get_i64(f, "seed", &in->seed, err);
    if (!rc) rc = es_h5_attr_get_str(f, "input_norm", &norm, err);
    if (!rc) in->rms = !strcmp(norm, "rms");
    for (char *p = map; !rc && p && *p;) {
        int t, s, used = 0;
        if (sscanf(p, "%d:%d%n", &t, &s, &used) != 2 || in->n_pairs == INSPECT_MAX_LAYERS) {
            rc = es_fail(err, ES_ERR_DATA, "%s: attribute layer_map \"%s\" is not TEACHER:STUDENT pairs", in->path, map);
            break;
        }
        p += used;
        if (*p == ',') p++;
        if (es_config_is_set(cfg, "layer") && s != es_config_int(cfg, "layer")) continue;
        in->teacher_layers[in->n_pairs] = t, in->student_layers[in->n_pairs++] = s;
    }
    if (!rc && !in->n_pairs)
        rc = es_fail(err, es_config_is_set(cfg, "layer") ? ES_ERR_USAGE : ES_ERR_DATA, "%s: no layer pair%s in layer_map \"%s\"",
                     in->path, es_config_is_set(cfg, "layer") ? " with that student --layer" : "", map);
    free(format), free(map), free(norm);
    if (rc) return rc;
    /* Ω's shape gives m and d */
    if (H5Lexists(f, "/projection", H5P_DEFAULT) <= 0 || H5Lexists(f, "/projection/omega", H5P_DEFAULT) <= 0)
        return es_fail(err, ES_ERR_DATA, "%s: /projection/omega is missing", in->path);
    es_rows_reader omega;
    if ((rc = es_rows_open(&omega, f, "/projection/omega", NULL, err))) return rc;
    in->m = (int)omega.rows, in->d = (int)omega.width, in->width = 2 * in->m;
    if (omega.rank != 2 || !es_rows_is_float(&omega) || in->m < 1 || in->d < 1)
        rc = es_fail(err, ES_ERR_DATA, "%s: /projection/omega is not an (m, d) float matrix", in->path);
    if (!rc && !(in->omega = malloc((size_t)in->m * in->d * sizeof(float)))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_rows_read_f32(&omega, 0, in->m, in->omega, err);
    es_rows_close_reader(&omega);
    for (int64_t i = 0; !rc && i < (int64_t)in->m * in->d; i++)
        if (!isfinite(in->omega[i])) rc = es_fail(err, ES_ERR_DATA, "%s: /projection/omega holds a non-finite value", in->path);
    if (rc) return rc;
    if (H5Lexists(f, "/tokens", H5P_DEFAULT) <= 0 || H5Lexists(f, "/tokens/teacher_row", H5P_DEFAULT) <= 0)
        return es_fail(err, ES_ERR_DATA, "%s: /tokens/teacher_row is missing", in->path);
    es_rows_reader rows;
    if ((rc = es_rows_open_column(&rows, f, "/tokens/teacher_row", ES_H5_I64, NULL, err))) return rc;
    in->tokens = rows.rows;
    if (!(in->teacher_row = malloc((size_t)(in->tokens > 0 ? in->tokens : 1) * sizeof(int64_t))))
        rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_rows_read(&rows, 0, in->tokens, in->teacher_row, err);
    es_rows_close_reader(&rows);
    return rc;
}

/* The teacher files: shards that are the ones the student file was made from (fingerprints, where
 * recorded) and that hold every row teacher_row names. */
static int check_teacher(const geometry_input *in, const teacher_set *set, const char *paths, es_error *err) {
    if (set->width != in->d)
        return es_fail(err, ES_ERR_DATA, "%s: hidden size %d, but %s's /projection/omega is for d = %d: not its teacher", paths,
                       set->width, in->path, in->d);
    char *recorded = NULL;
    es_error ignored = {0};
    if (!es_h5_attr_get_str(in->file.id, "teacher_fingerprints", &recorded, &ignored)) {
        size_t size = 1;
        for (int i = 0; i < set->n_shards; i++) size += strlen(set->shards[i].fingerprint) + 1;
        char *joined = calloc(size, 1);
        if (!joined) return free(recorded), es_fail(err, ES_ERR_RUNTIME, "out of memory");
        for (int i = 0; i < set->n_shards; i++) strcat(strcat(joined, i ? "," : ""), set->shards[i].fingerprint);
        int differ = strcmp(joined, recorded) != 0;
        free(joined), free(recorded);
        if (differ)
            return es_fail(err, ES_ERR_DATA, "%s: fingerprint differs from the teacher_fingerprints %s records: not the teacher files it was made from",
                           paths, in->path);
    }
    for (int64_t i = 0; i < in->tokens; i++)
        if (in->teacher_row[i] < -1 || in->teacher_row[i] >= set->tokens)
            return es_fail(err, ES_ERR_DATA, "%s: /tokens/teacher_row[%lld] = %lld, but %s has %lld teacher rows: not its teacher", in->path,
                           (long long)i, (long long)in->teacher_row[i], paths, (long long)set->tokens);
    return ES_OK;
}

/* A seeded sample of up to `want` aligned student tokens with distinct teacher rows, in teacher-row order. */
static int sample_rows(const geometry_input *in, const teacher_set *set, int64_t want, uint64_t *rng, sampled_row **out,
                       int *n_out, int64_t *n_unique, es_error *err) {
    uint8_t *seen = calloc((size_t)(set->tokens / 8 + 1), 1);
    sampled_row *all = malloc((size_t)(in->tokens > 0 ? in->tokens : 1) * sizeof *all);
    if (!seen || !all) return free(seen), free(all), es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int64_t n = 0;
    for (int64_t i = 0; i < in->tokens; i++) {
        int64_t r = in->teacher_row[i];
        if (r < 0 || (seen[r / 8] >> (r % 8) & 1)) continue;
        seen[r / 8] |= (uint8_t)(1u << (r % 8));
        all[n++] = (sampled_row){i, r};
    }
    free(seen);
    *n_unique = n;
    int64_t take = n < want ? n : want;
    for (int64_t i = 0; i < take; i++) { /* partial Fisher-Yates */
        int64_t j = i + below(rng, n - i);
        sampled_row swap = all[i];
        all[i] = all[j], all[j] = swap;
    }
    qsort(all, (size_t)take, sizeof *all, by_teacher_row);
    *out = all, *n_out = (int)take;
    return ES_OK;
}

/* x̂ (n, d) and t (n, D) in double for one layer pair. */
static int read_pair(const geometry_input *in, const teacher_set *set, int teacher_layer, int student_layer,
                     const sampled_row *rows, int n, double *x_hat, double *t, es_error *err) {
    const int d = in->d, width = in->width;
    char name[96], mean_name[96], scale_name[96];
    snprintf(mean_name, sizeof mean_name, "/projection/layer_%03d/input_mean", teacher_layer);
    snprintf(scale_name, sizeof scale_name, "/projection/layer_%03d/input_scale", teacher_layer);
    float *mean = malloc((size_t)d * sizeof *mean), *scale = malloc((size_t)d * sizeof *scale);
    float *buf = malloc((size_t)(d > width ? d : width) * sizeof *buf);
    int rc = !mean || !scale || !buf ? es_fail(err, ES_ERR_RUNTIME, "out of memory") : ES_OK;
    const char *names[2] = {mean_name, scale_name};
    float *into[2] = {mean, scale};
    for (int v = 0; !rc && v < 2; v++) {
        char group[64];
        snprintf(group, sizeof group, "/projection/layer_%03d", teacher_layer);
        if (H5Lexists(in->file.id, group, H5P_DEFAULT) <= 0 || H5Lexists(in->file.id, names[v], H5P_DEFAULT) <= 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s is missing", in->path, names[v]);
        else
            rc = es_rows_read_column(in->file.id, names[v], ES_H5_F32, 0, d, into[v], err);
    }
    for (int k = 0; !rc && k < d; k++)
        if (!isfinite(mean[k]) || !(scale[k] > 0) || !isfinite(scale[k]))
            rc = es_fail(err, ES_ERR_DATA, "%s: %s or input_scale[%d] is not finite (or the scale not positive)", in->path, mean_name, k);
    /* the teacher's rows, shard by shard */
    snprintf(name, sizeof name, "/latents/layer_%03d", teacher_layer);
    es_rows_reader reader;
    int open_shard = -1;
    for (int i = 0; !rc && i < n; i++) {
        int s = 0;
        while (s + 1 < set->n_shards && rows[i].teacher_row >= set->shards[s + 1].first_row) s++;
        const teacher_shard *shard = &set->shards[s];
        if (s != open_shard) {
            if (open_shard >= 0) es_rows_close_reader(&reader);
            open_shard = -1;
            if (H5Lexists(shard->file.id, "/latents", H5P_DEFAULT) <= 0 || H5Lexists(shard->file.id, name, H5P_DEFAULT) <= 0) {
                rc = es_fail(err, ES_ERR_DATA, "%s: %s is missing", shard->path, name);
                break;
            }
            if ((rc = es_rows_open(&reader, shard->file.id, name, set->pool, err))) break;
            open_shard = s;
            if (reader.rank != 2 || reader.width != d || reader.rows != shard->tokens || !es_rows_is_float(&reader))
                rc = es_fail(err, ES_ERR_DATA, "%s: %s is not [%lld, %d] floats", shard->path, name, (long long)shard->tokens, d);
        }
        if (!rc) rc = es_rows_read_f32(&reader, rows[i].teacher_row - shard->first_row, 1, buf, err);
        double rms = 0;
        for (int k = 0; !rc && k < d; k++) {
            if (!isfinite(buf[k])) {
                rc = es_fail(err, ES_ERR_DATA, "%s: %s row %lld holds a non-finite value", shard->path, name,
                             (long long)(rows[i].teacher_row - shard->first_row));
                break;
            }
            x_hat[(size_t)i * d + k] = ((double)buf[k] - mean[k]) / scale[k];
            rms += x_hat[(size_t)i * d + k] * x_hat[(size_t)i * d + k];
        }
        rms = sqrt(rms / d);
        for (int k = 0; !rc && in->rms && k < d; k++) x_hat[(size_t)i * d + k] /= rms > 1e-6 ? rms : 1e-6;
    }
    if (open_shard >= 0) es_rows_close_reader(&reader);
    /* the student's targets */
    snprintf(name, sizeof name, "/targets/layer_%03d", student_layer);
    if (!rc && (H5Lexists(in->file.id, "/targets", H5P_DEFAULT) <= 0 || H5Lexists(in->file.id, name, H5P_DEFAULT) <= 0))
        rc = es_fail(err, ES_ERR_DATA, "%s: %s is missing", in->path, name);
    if (!rc && !(rc = es_rows_open(&reader, in->file.id, name, set->pool, err))) {
        if (reader.rank != 2 || reader.width != width || reader.rows != in->tokens || !es_rows_is_float(&reader))
            rc = es_fail(err, ES_ERR_DATA, "%s: %s is not [%lld, %d] floats", in->path, name, (long long)in->tokens, width);
        for (int i = 0; !rc && i < n; i++) {
            rc = es_rows_read_f32(&reader, rows[i].token, 1, buf, err);
            for (int k = 0; !rc && k < width; k++) {
                if (!isfinite(buf[k]))
                    rc = es_fail(err, ES_ERR_DATA, "%s: %s row %lld holds a non-finite value", in->path, name, (long long)rows[i].token);
                t[(size_t)i * width + k] = buf[k];
            }
        }
        es_rows_close_reader(&reader);
    }
    free(mean), free(scale), free(buf);
    return rc;
}

static const double sweep_sigmas[] = {0.25, 0.5, 1, 2, 4, 8};
#define N_SWEEP (sizeof sweep_sigmas / sizeof *sweep_sigmas)

typedef struct pair_result {
    int64_t kernel_pairs;
    double k_mean, error_mean, error_rms, predicted_rms;
    neighbourhood nb;
    neighbourhood sweep[N_SWEEP];
    double sweep_var[N_SWEEP], sweep_const[N_SWEEP];
    double var, const_mse;
} pair_result;

/* Everything for one layer pair, from x̂ and t in memory. */
static int measure(const geometry_input *in, const double *x_hat, const double *t, int n, int k, int64_t pairs, int sweep,
                   uint64_t *rng, pair_result *r, es_error *err) {
    const int d = in->d, width = in->width, m = in->m;
    /* (a) kernel fidelity on random pairs of distinct sampled rows */
    double sum_err = 0, sum_sq = 0, sum_var = 0, sum_k = 0;
    for (int64_t p = 0; p < pairs; p++) {
        int i = (int)below(rng, n), j = (int)below(rng, n - 1);
        j += j >= i;
        double dist = 0, dot = 0;
        for (int c = 0; c < d; c++) {
            double diff = x_hat[(size_t)i * d + c] - x_hat[(size_t)j * d + c];
            dist += diff * diff;
        }
        for (int c = 0; c < width; c++) dot += t[(size_t)i * width + c] * t[(size_t)j * width + c];
        double kernel = exp(-in->sigma * in->sigma * dist / (2.0 * d)), estimate = dot / width, e = estimate - kernel;
        sum_k += kernel, sum_err += e, sum_sq += e * e;
        sum_var += ((1 + pow(kernel, 4)) / 2 - kernel * kernel) / m; /* Var of (1/m) Σ cos(ω_j·δ) */
    }
    r->kernel_pairs = pairs;
    r->k_mean = sum_k / pairs, r->error_mean = sum_err / pairs, r->error_rms = sqrt(sum_sq / pairs);
    r->predicted_rms = sqrt(sum_var / pairs);
    /* (b) neighbourhoods: the teacher's side once */
    double *kx = malloc((size_t)n * n * sizeof *kx), *dist = malloc((size_t)k * sizeof *dist);
    int *nn_x = malloc((size_t)n * k * sizeof *nn_x), *perm = malloc((size_t)n * sizeof *perm), *inverse = malloc((size_t)n * sizeof *inverse);
    double *phase = NULL, *ts = NULL;
    float *omega1 = NULL;
    int rc = !kx || !dist || !nn_x || !perm || !inverse ? es_fail(err, ES_ERR_RUNTIME, "out of memory") : ES_OK;
    if (!rc) {
        for (int i = 0; i < n; i++) perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = (int)below(rng, i + 1), swap = perm[i];
            perm[i] = perm[j], perm[j] = swap;
        }
        for (int i = 0; i < n; i++) inverse[perm[i]] = i;
        gram(x_hat, n, d, kx);
        knn(kx, n, k, nn_x, dist);
        centre(kx, n);
        if (neighbourhood_of(t, n, width, k, nn_x, kx, perm, inverse, &r->nb)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        constant_mse(t, n, width, &r->var, &r->const_mse);
    }
    /* (d) σ sweep: Ω_σ = σ Ω_1 (es_fourier_omega scales one standard normal draw by σ/√d), so the
     * phases are σ (x̂ Ω_1ᵀ), computed once */
    if (!rc && sweep) {
        omega1 = malloc((size_t)m * d * sizeof *omega1);
        phase = malloc((size_t)n * m * sizeof *phase), ts = malloc((size_t)n * width * sizeof *ts);
        double *omega_d = omega1 ? malloc((size_t)m * d * sizeof *omega_d) : NULL;
        if (!omega1 || !phase || !ts || !omega_d) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (!rc) {
            es_fourier_omega(omega1, m, d, 1.0, (uint64_t)in->seed);
            for (size_t i = 0; i < (size_t)m * d; i++) omega_d[i] = omega1[i];
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, d, 1.0, x_hat, d, omega_d, d, 0.0, phase, m);
        }
        free(omega_d);
        for (size_t s = 0; !rc && s < N_SWEEP; s++) {
            for (int i = 0; i < n; i++)
                for (int j = 0; j < m; j++) {
                    double phi = sweep_sigmas[s] * phase[(size_t)i * m + j];
                    ts[(size_t)i * width + j] = M_SQRT2 * cos(phi), ts[(size_t)i * width + m + j] = M_SQRT2 * sin(phi);
                }
            if (neighbourhood_of(ts, n, width, k, nn_x, kx, perm, inverse, &r->sweep[s]))
                rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            constant_mse(ts, n, width, &r->sweep_var[s], &r->sweep_const[s]);
        }
    }
    free(kx), free(dist), free(nn_x), free(perm), free(inverse), free(phase), free(ts), free(omega1);
    return rc;
}

/* (c) A student checkpoint's normalised states h (n, D) at the sampled tokens: the latent MSE it
 * reaches against the targets and its R² against the norm-√D constant (align's eval_r2), and its
 * neighbourhoods against the targets' and the teacher's. */
typedef struct model_result {
    double mse, r2;
    neighbourhood targets, teacher;
} model_result;

static int measure_model(const geometry_input *in, const double *h, const double *x_hat, const double *t, int n, int k, double const_mse,
                         uint64_t *rng, model_result *r, es_error *err) {
    const int width = in->width;
    double sq = 0;
    for (size_t i = 0; i < (size_t)n * width; i++) sq += (h[i] - t[i]) * (h[i] - t[i]);
    r->mse = sq / ((double)n * width), r->r2 = const_mse > 0 ? 1 - r->mse / const_mse : 0;
    double *kh = malloc((size_t)n * n * sizeof *kh), *dist = malloc((size_t)k * sizeof *dist);
    int *nn_h = malloc((size_t)n * k * sizeof *nn_h), *perm = malloc((size_t)n * sizeof *perm), *inverse = malloc((size_t)n * sizeof *inverse);
    int rc = !kh || !dist || !nn_h || !perm || !inverse ? es_fail(err, ES_ERR_RUNTIME, "out of memory") : ES_OK;
    if (!rc) {
        for (int i = 0; i < n; i++) perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = (int)below(rng, i + 1), swap = perm[i];
            perm[i] = perm[j], perm[j] = swap;
        }
        for (int i = 0; i < n; i++) inverse[perm[i]] = i;
        gram(h, n, width, kh);
        knn(kh, n, k, nn_h, dist);
        centre(kh, n);
        if (neighbourhood_of(t, n, width, k, nn_h, kh, perm, inverse, &r->targets) ||
            neighbourhood_of(x_hat, n, in->d, k, nn_h, kh, perm, inverse, &r->teacher))
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    free(kh), free(dist), free(nn_h), free(perm), free(inverse);
    return rc;
}

static void print_model(const char *model, const model_result *m) {
    printf("  student checkpoint %s at this layer (states normalised as align's latent loss):\n", model);
    printf("    latent MSE %.4f against the targets, R^2 %.4f (against the norm-sqrt(D) constant)\n", m->mse, m->r2);
    printf("    with the targets: mutual k-NN overlap %.4f, rows shuffled %.4f; linear CKA %.4f, rows shuffled %.4f\n",
           m->targets.overlap, m->targets.overlap_null, m->targets.cka, m->targets.cka_null);
    printf("    with the teacher's x^: mutual k-NN overlap %.4f, rows shuffled %.4f; linear CKA %.4f, rows shuffled %.4f\n",
           m->teacher.overlap, m->teacher.overlap_null, m->teacher.cka, m->teacher.cka_null);
}

static void print_text(const geometry_input *in, int l, int n, int k, int sweep, const pair_result *r) {
    printf("layer pair %d:%d (teacher layer %d -> student layer %d): sigma %g, d %d, D %d\n", in->teacher_layers[l],
           in->student_layers[l], in->teacher_layers[l], in->student_layers[l], in->sigma, in->d, in->width);
    printf("  kernel fidelity (%lld random pairs of sampled rows; mean k = exp(-sigma^2 |x^-x^'|^2 / (2d)) %.4f):\n",
           (long long)r->kernel_pairs, r->k_mean);
    printf("    t.t'/D - k: mean %+.5f, rms %.5f; predicted rms %.5f (random features, m = %d); measured/predicted %.3f\n",
           r->error_mean, r->error_rms, r->predicted_rms, in->m, r->predicted_rms > 0 ? r->error_rms / r->predicted_rms : 0);
    printf("  neighbourhoods (%d rows, k = %d):\n", n, k);
    printf("    mutual k-NN overlap %.4f, rows shuffled %.4f (chance k/(N-1) = %.4f)\n", r->nb.overlap, r->nb.overlap_null,
           (double)k / (n - 1));
    printf("    linear CKA %.4f, rows shuffled %.4f\n", r->nb.cka, r->nb.cka_null);
    printf("  input-independent MSE: by the mean target %.4f; by a norm-sqrt(D) constant %.4f\n", r->var, r->const_mse);
    if (!sweep) return;
    printf("  sigma sweep (targets recomputed from x^, seed %lld):\n", (long long)in->seed);
    printf("    %7s %9s %9s %9s %9s %10s %10s\n", "sigma", "overlap", "shuffled", "cka", "shuffled", "mean_mse", "const_mse");
    for (size_t s = 0; s < N_SWEEP; s++)
        printf("    %7g %9.4f %9.4f %9.4f %9.4f %10.4f %10.4f\n", sweep_sigmas[s], r->sweep[s].overlap, r->sweep[s].overlap_null,
               r->sweep[s].cka, r->sweep[s].cka_null, r->sweep_var[s], r->sweep_const[s]);
}

static json_t *nb_json(const neighbourhood *nb) {
    return json_pack("{s:f,s:f,s:f,s:f}", "overlap", nb->overlap, "overlap_null", nb->overlap_null, "cka", nb->cka, "cka_null",
                     nb->cka_null);
}

static json_t *pair_json(const geometry_input *in, int l, int n, int k, int sweep, const pair_result *r) {
    json_t *o = json_pack("{s:i,s:i,s:f,s:i,s:i,s:I,s:f,s:f,s:f,s:f,s:f,s:i,s:i,s:f,s:o,s:f,s:f}", "teacher_layer",
                          in->teacher_layers[l], "student_layer", in->student_layers[l], "sigma", in->sigma, "d", in->d, "D",
                          in->width, "kernel_pairs", (json_int_t)r->kernel_pairs, "k_mean", r->k_mean, "error_mean", r->error_mean,
                          "error_rms", r->error_rms, "predicted_rms", r->predicted_rms, "ratio",
                          r->predicted_rms > 0 ? r->error_rms / r->predicted_rms : 0.0, "rows", n, "k", k, "chance",
                          (double)k / (n - 1), "neighbourhood", nb_json(&r->nb), "mean_mse", r->var, "const_mse", r->const_mse);
    if (o && sweep) {
        json_t *list = json_array();
        for (size_t s = 0; s < N_SWEEP; s++) {
            json_t *e = nb_json(&r->sweep[s]);
            json_object_set_new(e, "sigma", json_real(sweep_sigmas[s]));
            json_object_set_new(e, "mean_mse", json_real(r->sweep_var[s]));
            json_object_set_new(e, "const_mse", json_real(r->sweep_const[s]));
            json_array_append_new(list, e);
        }
        json_object_set_new(o, "sweep", list);
    }
    return o;
}

int inspect_geometry(const char *path, const es_config *cfg, es_error *err) {
    const int64_t want = es_config_int(cfg, "rows"), pairs = es_config_int(cfg, "pairs");
    const int k = (int)es_config_int(cfg, "k"), sweep = es_config_bool(cfg, "sigma-sweep"), as_json = es_config_bool(cfg, "json");
    geometry_input in;
    memset(&in, 0, sizeof in);
    in.path = path;
    int rc = es_h5_open(&in.file, path, err);
    if (rc) return rc;
    rc = read_input(&in, cfg, err);
    char *teacher_paths = NULL;
    if (!rc) {
        const char *given = es_config_str(cfg, "teacher");
        teacher_paths = given ? strdup(given) : recorded_teacher(in.file.id);
        if (!teacher_paths)
            rc = es_fail(err, ES_ERR_USAGE, "%s records no teacher files (no \"in\" in its config attribute): give --teacher T.h5[,...]", path);
    }
    es_pool *pool = rc ? NULL : es_pool_create((int)es_config_int(cfg, "threads"));
    if (!rc && !pool) rc = es_fail(err, ES_ERR_RUNTIME, "cannot start worker threads");
    teacher_set set;
    int set_open = 0;
    if (!rc && !(rc = teacher_set_open(&set, teacher_paths, pool, err))) set_open = 1;
    if (!rc) rc = check_teacher(&in, &set, teacher_paths, err);
    uint64_t rng = (uint64_t)es_config_int(cfg, "seed") ^ 0x67656f6d65747279ull; /* "geometry" */
    sampled_row *rows = NULL;
    int n = 0;
    int64_t unique = 0;
    if (!rc) rc = sample_rows(&in, &set, want, &rng, &rows, &n, &unique, err);
    if (!rc && n < k + 2)
        rc = es_fail(err, ES_ERR_DATA, "%s: %d aligned tokens with distinct teacher rows: too few for --k %d (need k + 2)", path, n, k);
    double *x_hat = NULL, *t = NULL;
    if (!rc && (!(x_hat = malloc((size_t)n * in.d * sizeof *x_hat)) || !(t = malloc((size_t)n * in.width * sizeof *t))))
        rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    json_t *doc = NULL, *list = NULL;
    if (!rc && as_json) {
        doc = json_pack("{s:s,s:s,s:I,s:I,s:i,s:I}", "student", path, "teacher", teacher_paths, "student_tokens",
                        (json_int_t)in.tokens, "aligned_teacher_rows", (json_int_t)unique, "rows", n, "seed",
                        (json_int_t)es_config_int(cfg, "seed"));
        json_object_set_new(doc, "pairs", list = json_array());
    } else if (!rc) {
        printf("geometry of %s against %s: %d of %lld aligned teacher rows sampled (--seed %lld), %lld student tokens\n", path,
               teacher_paths, n, (long long)unique, (long long)es_config_int(cfg, "seed"), (long long)in.tokens);
    }
    // (c) the checkpoint's states at the sampled tokens, every mapped layer in one pass
    const char *model = es_config_is_set(cfg, "model") ? es_config_str(cfg, "model") : NULL;
    double *states[INSPECT_MAX_LAYERS] = {0};
    int64_t *sampled = NULL;
    if (!rc && model) {
        sampled = malloc((size_t)n * sizeof *sampled);
        for (int l = 0; l < in.n_pairs; l++) states[l] = malloc((size_t)n * in.width * sizeof **states);
        for (int l = 0; l < in.n_pairs; l++)
            if (!states[l]) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        if (!rc && !sampled) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        for (int i = 0; !rc && i < n; i++) sampled[i] = rows[i].token;
        if (!rc) rc = geometry_model_states(model, path, in.file.id, sampled, n, in.student_layers, in.n_pairs, in.width,
                                            (int)es_config_int(cfg, "threads"), states, err);
    }
    for (int l = 0; !rc && l < in.n_pairs; l++) {
        pair_result r;
        model_result m;
        memset(&r, 0, sizeof r);
        rc = read_pair(&in, &set, in.teacher_layers[l], in.student_layers[l], rows, n, x_hat, t, err);
        if (!rc) rc = measure(&in, x_hat, t, n, k, pairs, sweep, &rng, &r, err);
        if (!rc && model) rc = measure_model(&in, states[l], x_hat, t, n, k, r.const_mse, &rng, &m, err);
        if (!rc && as_json) {
            json_t *o = pair_json(&in, l, n, k, sweep, &r);
            if (model)
                json_object_set_new(o, "model", json_pack("{s:s,s:f,s:f,s:o,s:o}", "path", model, "latent_mse", m.mse, "r2", m.r2,
                                                          "targets", nb_json(&m.targets), "teacher", nb_json(&m.teacher)));
            json_array_append_new(list, o);
        } else if (!rc) {
            print_text(&in, l, n, k, sweep, &r);
            if (model) print_model(model, &m);
        }
    }
    for (int l = 0; l < in.n_pairs; l++) free(states[l]);
    free(sampled);
    if (!rc && doc) {
        char *text = json_dumps(doc, JSON_INDENT(1) | JSON_REAL_PRECISION(10));
        if (!text) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else puts(text);
        free(text);
    }
    json_decref(doc);
    free(x_hat), free(t), free(rows), free(teacher_paths), free(in.teacher_row), free(in.omega);
    if (set_open) teacher_set_close(&set);
    if (pool) es_pool_destroy(pool);
    es_h5_close(&in.file, 0);
    return rc;
}
