/* What the harness's op files (tests/ops/cases_*.c) share with tests/ops/harness.c: a case
 * (one shape of one op, its host inputs and reference outputs), the op specs, and the helpers
 * that move a case through a device. */
#ifndef ES_TESTS_OPS_HARNESS_INTERNAL_H
#define ES_TESTS_OPS_HARNESS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "backend_impl.h"
#include "harness.h"
#include "ops.h"
#include "reference.h"
#include "rng.h"

enum { HC_PARAMS = 8, HC_OUTPUTS = 6 };

/* The thresholds most ops share (nmse against the double reference; docs/ops-harness.md lists
 * what was measured). An element-wise op's values are each one to a few fp32 roundings of an
 * exact function of their inputs: nmse below ~(3 · 2^-24)² ≈ 5e-14, measured at most 1e-14, so
 * 1e-12. A reduction (a product, a softmax, a sum over tokens) carries ~sqrt(K) · 2^-24 relative
 * error over K terms: measured at most 2.5e-13 with K up to 1536, and a backend free to pick
 * its own order (tiles, atomics, FMA) has errors of that size too, so 1e-10. Either is orders of
 * magnitude below what a wrong index, a missing term, a lost boundary or an unwritten value gives
 * (1e-6 and up; see the broken-op tests in tests/unit/test_ops.c).
 *
 * Against a reference device (also fp32): two results each within τ of the truth are within
 * (√τ + √τ)² = 4τ of one another, so 4x; exact ops stay exact. */
#define HARNESS_ELEMENTWISE 1e-12
#define HARNESS_REDUCTION 1e-10
#define HARNESS_DEVICE_FACTOR 4
/* On a bf16 device (docs/ops-harness.md): one rounding to bf16 of an operand gives nmse
 * (2^-9)^2 / 3 = 1.3e-6, a product of two rounded operands about twice that; ~8x room. */
#define HARNESS_BF16_ROUNDING 1e-5
#define HARNESS_BF16_PRODUCT 2e-5
/* Products whose operands are themselves results of bf16 products (attention's backward: P and dS
 * go to bf16 for the second products): 2.3e-5 measured on the CUDA backend built for the host
 * (tests/emulate/), 3.8e-5 on a case of 6 tokens; 6e-5 leaves room for a GPU's summation order. */
#define HARNESS_BF16_CHAIN 6e-5

typedef struct hout {
    const char *name;
    size_t n;
    double *ref;
    int exact; /* any difference fails whatever the op's threshold (an index, a count) */
} hout;

/* One shape of one op. make() fills it once per cache; call() reads it. */
typedef struct hcase {
    int made;
    int n_params;
    const char *param_name[HC_PARAMS];
    long param[HC_PARAMS];
    char note[112];   /* what else distinguishes the shape: "bias", "out = in", "bf16 table" */
    int n_out;
    hout out[HC_OUTPUTS];
    int expect_rc;    /* 0, or the error code the op must return (no output is compared then) */
    void *data;       /* the op's own struct of inputs */
    void **allocs, **temps;
    int n_allocs, cap_allocs, n_temps, cap_temps;
} hcase;

/* Zeroed memory owned by the case (freed with the cache); exits the test when out of memory. */
void *hc_alloc(hcase *c, size_t bytes);
float *hc_floats(hcase *c, size_t n);
double *hc_doubles(hcase *c, size_t n);
/* A double copy of x for the reference: freed once make() has returned. */
double *hc_widen(hcase *c, const float *x, size_t n);
float *hc_normals(hcase *c, rng *r, size_t n, double sd);
void hc_param(hcase *c, const char *name, long value);
void hc_note(hcase *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Declares output k (in call order) and returns its reference array (n zeroed doubles). */
double *hc_output(hcase *c, const char *name, size_t n, int exact);

/* The start of an accumulated output: random values of the size of the gradient the op will add
 * (its reference, computed from zero), so the check sees both an overwrite and a wrong gradient;
 * the reference becomes start + gradient. */
float *hc_accumulate_start(hcase *c, rng *r, double *ref, size_t n);

typedef struct op_spec {
    const char *name;
    int n_cases;
    double threshold;        /* nmse against the double reference */
    double device_threshold; /* nmse against the reference device */
    /* Against both, on a device whose weights and products are bf16 (dev->weight_dtype, the CUDA
     * backend), for the ops that round their inputs there; 0: the same as on fp32 devices.
     * docs/ops-harness.md "Thresholds on a bf16 device" says why each. */
    double bf16_threshold;
    int (*present)(const es_backend *ops);
    void (*make)(hcase *c, int index);
    /* Runs case c on dev and writes its outputs, widened to double, into got[k] (out[k].n each).
     * Returns the op's code (ES_OK or its error, with the message in err) or, when the harness
     * itself could not move the data, an error with a message saying so. */
    int (*call)(es_device *dev, const hcase *c, double *const *got, es_error *err);
    /* For ops that promise a row's result does not depend on the other rows of the call: makes
     * sub the first T rows of full (its outputs sized, their references left zero). NULL otherwise. */
    void (*rows)(hcase *sub, const hcase *full, int T);
} op_spec;

extern const op_spec harness_layer_ops[];
extern const int harness_n_layer_ops;
extern const op_spec harness_train_ops[];
extern const int harness_n_train_ops;
extern const op_spec harness_product_ops[];
extern const int harness_n_product_ops;

/* The cases of every op in a cache, made on first use. */
hcase *harness_case(harness_cache *cache, const op_spec *op, int index);
/* Every op of the grid, in report order. */
int harness_ops(const op_spec **ops, int max);
/* "T=257 C=24 OC=513, bias": the case's parameters and note. */
void harness_shape(const hcase *c, char *buf, size_t size);
/* Room for a case's outputs (HC_OUTPUTS pointers, out[k].n doubles each); NULL when out of memory. */
double **harness_new_outputs(const hcase *c);
void harness_free_outputs(double **outs);
/* Frees what a case holds (not the case itself). */
void harness_drop_case(hcase *c);

/* ---- moving data through a device: everything allocated in a scope is freed at its end ---- */

enum { DS_MAX = 24 };
typedef struct dscope {
    es_device *dev;
    es_error *err;
    int n;
    void *ptr[DS_MAX];
    size_t bytes[DS_MAX];
} dscope;

void ds_begin(dscope *s, es_device *dev, es_error *err);
/* Device memory holding n weights of host in the device's weight format; NULL on failure. */
void *ds_put_weights(dscope *s, const float *host, size_t n);
/* Device memory holding bytes of host (host NULL: uninitialised); NULL on failure. */
void *ds_put(dscope *s, const void *host, size_t bytes);
/* An output of n floats starting as start (NULL: every value NaN, to see that all are written). */
float *ds_out(dscope *s, const float *start, size_t n);
/* got[0..n) = the n floats at device pointer src; 0, or -1 with err set. */
int ds_get(dscope *s, double *got, const float *src, size_t n);
/* Frees the scope; returns rc, or the harness's own error when rc is 0 and one occurred. */
int ds_end(dscope *s, int rc);
/* An op returned rc: its message into err, then ds_end. */
int ds_op_failed(dscope *s, int rc);

#define PUT(s, var, host, bytes)                                                                    \
    do {                                                                                            \
        if (!((var) = ds_put((s), (host), (bytes)))) return ds_end((s), ES_ERR_RUNTIME);            \
    } while (0)
#define PUT_WEIGHTS(s, var, host, n)                                                                \
    do {                                                                                            \
        if (!((var) = ds_put_weights((s), (host), (n)))) return ds_end((s), ES_ERR_RUNTIME);        \
    } while (0)
#define OUT(s, var, start, n)                                                                       \
    do {                                                                                            \
        if (!((var) = ds_out((s), (start), (n)))) return ds_end((s), ES_ERR_RUNTIME);               \
    } while (0)
#define OP(s, call)                                                                                 \
    do {                                                                                            \
        const int op_rc_ = (call);                                                                  \
        if (op_rc_) return ds_op_failed((s), op_rc_);                                               \
    } while (0)
#define GET(s, got, src, n)                                                                         \
    do {                                                                                            \
        if (ds_get((s), (got), (src), (n))) return ds_end((s), ES_ERR_RUNTIME);                     \
    } while (0)

#endif
