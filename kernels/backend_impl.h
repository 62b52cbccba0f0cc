/* What a backend fills in (after ggml's ggml-backend-impl.h): memory, streams, the workspace
 * estimate, and one entry per op of kernels/ops.h with the same arguments. Only backends and
 * kernels/backend.c, kernels/ops.c include this. An op left NULL is "not supported on this
 * backend": its wrapper fails with a message saying so (tests/unit/test_ops.c lists them).
 *
 * A backend's open function sets dev->ops, dev->name, dev->impl and dev->max_memory (the
 * automatic budget when options->max_memory is 0) and returns ES_OK or an error. */
#ifndef ES_KERNELS_BACKEND_IMPL_H
#define ES_KERNELS_BACKEND_IMPL_H

#include "backend.h"
#include "ops.h"

struct es_backend {
    const char *name;
    void (*close)(es_device *dev);

    /* memory: alloc returns NULL when the device has no more; the budget is checked before */
    void *(*alloc)(es_device *dev, size_t bytes);
    void (*free)(es_device *dev, void *ptr);
    int (*upload)(es_device *dev, void *dst, const void *src, size_t bytes);
    int (*download)(es_device *dev, void *dst, const void *src, size_t bytes);
    int (*zero)(es_device *dev, void *ptr, size_t bytes);
    int (*sync)(es_device *dev);
    /* the copy stream */
    int (*load_begin)(es_device *dev, es_load_job *job);
    int (*load_wait)(es_device *dev, es_load_job *job);
    /* Optional: these tensors will be loaded again and again (a layer stream through slots);
     * keep them where the copy stream reads them fastest (CUDA: pinned host memory). */
    int (*load_prepare)(es_device *dev, const es_tensor *const *tensors, int n, es_dtype dtype);
    void (*load_forget)(es_device *dev);
    size_t (*workspace_estimate)(const es_device *dev, const es_workspace_plan *plan);
    /* Optional (NULL: malloc, and downloads that wait): host memory for copies, and copies to the
     * host that overlap the ops queued after them. */
    void *(*host_alloc)(es_device *dev, size_t bytes);
    void (*host_free)(es_device *dev, void *ptr);
    int (*download_begin)(es_device *dev, void *dst, const void *src, size_t bytes);
    int (*download_wait)(es_device *dev);
    int (*download_reserve)(es_device *dev, size_t bytes);
    /* Optional (NULL: no collectives), backend.h "collectives"; the group is left at close. */
    int (*group_id)(es_device *dev, unsigned char *id);
    int (*group_join)(es_device *dev, const unsigned char *id, int rank, int world);
    int (*group_allreduce)(es_device *dev, void *data, size_t n, es_group_op op);
    int (*group_start)(es_device *dev, es_group_call call, float *data, size_t n, int root);
    int (*group_wait)(es_device *dev);

    /* ops */
    int (*embedding_forward)(es_device *, float *, const int32_t *, const void *, es_dtype, int, int);
    int (*rmsnorm_forward)(es_device *, float *, const float *, const void *, int, int, float);
    int (*matmul_forward)(es_device *, float *, const float *, const void *, const void *, int, int, int);
    /* Optional (NULL: one matmul_forward per part). */
    int (*matmul_forward_group)(es_device *, const es_matmul_part *, int, const float *, int, int);
    /* Optional (NULL: matmul_forward, then add). */
    int (*matmul_forward_residual)(es_device *, float *, const float *, const float *, const void *, const void *, int, int, int);
    int (*rope_forward)(es_device *, float *, const int32_t *, const double *, int, int, int);
    int (*attention_forward)(es_device *, float *, const float *, const float *, const float *, const int32_t *, int, int, int,
                             int);
    int (*attention_cached_forward)(es_device *, float *, float *, float *, const float *, const float *, const float *,
                                    const int32_t *, const int32_t *, const int32_t *, int, int, int, int, int);
    int (*swiglu_forward)(es_device *, float *, const float *, const float *, size_t);
    int (*swiglu_down_forward)(es_device *, float *, const float *, const float *, const float *, const void *, const void *, int, int,
                               int);
    int (*add)(es_device *, float *, const float *, const float *, size_t);

    int (*embedding_backward)(es_device *, float *, const int32_t *, const float *, int, int);
    int (*rmsnorm_backward)(es_device *, float *, float *, const float *, const float *, const void *, int, int, float);
    int (*matmul_backward)(es_device *, float *, float *, float *, const float *, const float *, const void *, int, int, int);
    int (*matmul_backward_group)(es_device *, float *, const es_matmul_part_grad *, const es_matmul_part *, int, const float *, int,
                                 int);
    int (*rope_backward)(es_device *, float *, const int32_t *, const double *, int, int, int);
    int (*attention_backward)(es_device *, float *, float *, float *, const float *, const float *, const float *, const float *,
                              const int32_t *, int, int, int, int);
    int (*swiglu_backward)(es_device *, float *, float *, const float *, const float *, const float *, size_t);
    int (*swiglu_down_backward)(es_device *, float *, float *, float *, float *, const float *, const float *, const float *,
                                const void *, int, int, int);

    int (*latent_mse)(es_device *, double *, double *, float *, float *, const float *, const float *, const uint8_t *,
                      const float *, int, int, float, float);
    int (*cross_entropy)(es_device *, double *, float *, float *, const float *, const void *, const int32_t *, int, int, int,
                         float);

    int (*adamw_update)(es_device *, float *, void *, const float *, float *, float *, size_t, int64_t, double,
                        const es_adamw_config *);
    int (*round_weights)(es_device *, void *, const float *, size_t);
    int (*sum_squares)(es_device *, double *, const float *, size_t);
    int (*scale)(es_device *, float *, size_t, float);

    int (*round_precision)(es_device *, float *, size_t, es_precision);
    int (*standardise)(es_device *, float *, int64_t *, const float *, const int64_t *, const float *, const float *, int64_t, int,
                       es_precision);
    int (*fourier_features)(es_device *, float *, const float *, const float *, float, int, int, int, es_precision,
                            es_fourier_timing *);
};

/* The backends' open functions (kernels/cpu/backend.c; kernels/cuda/backend.cu, in the CUDA
 * backend's shared library, found by kernels/backend.c with dlsym). */
int es_cpu_open(es_device *dev, const es_device_options *options, es_error *err);
int es_cuda_open(es_device *dev, const es_device_options *options, es_error *err);

#endif
