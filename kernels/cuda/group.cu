// Collectives on CUDA (kernels/backend.h "collectives"): NCCL, one GPU per process. libnccl is
// loaded with dlopen when a group is first asked for, so a single-GPU run, and a machine without
// NCCL, never need it; the few entry points are looked up by name. cuda_group_allreduce is
// queued on the compute stream (the ops before and after it are ordered with it); the
// collectives of cuda_group_start run on a stream of their own, each after what the compute
// stream held when it was started, so that a layer's gradients are summed while the backward
// goes on below it. Every rank issues the same calls in the same order.
#include <dlfcn.h>
#include <string.h>

#include "cuda_internal.h"

// (The host emulation of tests/emulate/ has no NCCL: one rank, as a toolkit without nccl.h.)
#if __has_include(<nccl.h>) && !defined(ES_CUDA_HOST_EMULATION)
#include <nccl.h>

namespace {

static_assert(sizeof(ncclUniqueId) <= ES_GROUP_ID_BYTES, "an NCCL id must fit the seam's group id");

struct nccl_api {
    void *library;
    ncclResult_t (*get_unique_id)(ncclUniqueId *);
    ncclResult_t (*comm_init_rank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    const char *(*error_string)(ncclResult_t);
};

nccl_api api;
ncclComm_t group_comm;
int group_device = -1;
/* The collectives overlapped with the backward run here, ordered after the compute stream by
 * `queued` (recorded there before each start), and the compute stream after them by `finished`. */
cudaStream_t group_stream;
cudaEvent_t queued, finished;

int load_nccl(es_device *dev) {
    if (api.library) return 0;
    const char *names[] = {"libnccl.so.2", "libnccl.so"};
    for (const char *name : names)
        if ((api.library = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!api.library)
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: more than one rank needs NCCL, and libnccl.so.2 is not found (%s)", dev->name,
                              dlerror());
    api.get_unique_id = (decltype(api.get_unique_id))dlsym(api.library, "ncclGetUniqueId");
    api.comm_init_rank = (decltype(api.comm_init_rank))dlsym(api.library, "ncclCommInitRank");
    api.all_reduce = (decltype(api.all_reduce))dlsym(api.library, "ncclAllReduce");
    api.reduce = (decltype(api.reduce))dlsym(api.library, "ncclReduce");
    api.broadcast = (decltype(api.broadcast))dlsym(api.library, "ncclBroadcast");
    api.comm_destroy = (decltype(api.comm_destroy))dlsym(api.library, "ncclCommDestroy");
    api.error_string = (decltype(api.error_string))dlsym(api.library, "ncclGetErrorString");
    if (!api.get_unique_id || !api.comm_init_rank || !api.all_reduce || !api.reduce || !api.broadcast || !api.comm_destroy || !api.error_string) {
        dlclose(api.library);
        memset(&api, 0, sizeof api);
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: libnccl lacks an entry point this build calls", dev->name);
    }
    return 0;
}

int nccl_fail(es_device *dev, const char *what, ncclResult_t rc) {
    return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: %s", dev->name, what, api.error_string ? api.error_string(rc) : "NCCL error");
}

} // namespace

int cuda_group_id(es_device *dev, unsigned char *id) {
    int rc = load_nccl(dev);
    if (rc) return rc;
    ncclUniqueId unique;
    const ncclResult_t made = api.get_unique_id(&unique);
    if (made != ncclSuccess) return nccl_fail(dev, "ncclGetUniqueId", made);
    memset(id, 0, ES_GROUP_ID_BYTES);
    memcpy(id, &unique, sizeof unique);
    return 0;
}

int cuda_group_join(es_device *dev, const unsigned char *id, int rank, int world) {
    int rc = load_nccl(dev);
    if (rc) return rc;
    if (group_comm) return es_device_fail(dev, ES_ERR_RUNTIME, "%s: this process is in a group already", dev->name);
    ncclUniqueId unique;
    memcpy(&unique, id, sizeof unique);
    CUDA_TRY(dev, "group", cudaSetDevice(cuda_of(dev)->ordinal));
    const ncclResult_t joined = api.comm_init_rank(&group_comm, world, unique, rank);
    if (joined != ncclSuccess) {
        group_comm = nullptr;
        return nccl_fail(dev, "ncclCommInitRank", joined);
    }
    group_device = cuda_of(dev)->ordinal;
    CUDA_TRY(dev, "group", cudaStreamCreateWithFlags(&group_stream, cudaStreamNonBlocking));
    CUDA_TRY(dev, "group", cudaEventCreateWithFlags(&queued, cudaEventDisableTiming));
    CUDA_TRY(dev, "group", cudaEventCreateWithFlags(&finished, cudaEventDisableTiming));
    return 0;
}

int cuda_group_allreduce(es_device *dev, void *data, size_t n, es_group_op op) {
    if (!group_comm) return es_device_fail(dev, ES_ERR_RUNTIME, "%s: an all-reduce outside a group", dev->name);
    const ncclDataType_t type = op == ES_GROUP_SUM_F32 ? ncclFloat32 : op == ES_GROUP_SUM_F64 ? ncclFloat64 : ncclInt32;
    const ncclRedOp_t reduce = op == ES_GROUP_MAX_I32 ? ncclMax : ncclSum;
    const ncclResult_t done = api.all_reduce(data, data, n, type, reduce, group_comm, cuda_stream(dev));
    return done == ncclSuccess ? 0 : nccl_fail(dev, "ncclAllReduce", done);
}

int cuda_group_start(es_device *dev, es_group_call call, float *data, size_t n, int root) {
    if (!group_comm) return es_device_fail(dev, ES_ERR_RUNTIME, "%s: a collective outside a group", dev->name);
    CUDA_TRY(dev, "group", cudaEventRecord(queued, cuda_stream(dev)));
    CUDA_TRY(dev, "group", cudaStreamWaitEvent(group_stream, queued, 0));
    ncclResult_t done;
    if (call == ES_GROUP_ALLREDUCE) done = api.all_reduce(data, data, n, ncclFloat32, ncclSum, group_comm, group_stream);
    else if (call == ES_GROUP_REDUCE) done = api.reduce(data, data, n, ncclFloat32, ncclSum, root, group_comm, group_stream);
    else done = api.broadcast(data, data, n, ncclFloat32, root, group_comm, group_stream);
    return done == ncclSuccess ? 0 : nccl_fail(dev, "an NCCL collective", done);
}

int cuda_group_wait(es_device *dev) {
    if (!group_comm) return 0;
    CUDA_TRY(dev, "group", cudaEventRecord(finished, group_stream));
    CUDA_TRY(dev, "group", cudaStreamWaitEvent(cuda_stream(dev), finished, 0));
    return 0;
}

void cuda_group_leave(void) {
    if (group_stream) cudaStreamSynchronize(group_stream);
    if (group_comm) api.comm_destroy(group_comm);
    if (group_stream) cudaStreamDestroy(group_stream);
    if (queued) cudaEventDestroy(queued);
    if (finished) cudaEventDestroy(finished);
    group_comm = nullptr, group_device = -1, group_stream = nullptr, queued = finished = nullptr;
}

#else // a CUDA toolkit without NCCL's header: one GPU per run only

int cuda_group_id(es_device *dev, unsigned char *id) {
    (void)id;
    return es_device_fail(dev, ES_ERR_RUNTIME, "%s: this build has no NCCL (nccl.h was not found at build time): one GPU per run",
                          dev->name);
}
int cuda_group_join(es_device *dev, const unsigned char *id, int rank, int world) {
    (void)rank, (void)world;
    return cuda_group_id(dev, (unsigned char *)id);
}
int cuda_group_allreduce(es_device *dev, void *data, size_t n, es_group_op op) {
    (void)data, (void)n, (void)op;
    return cuda_group_id(dev, NULL);
}
int cuda_group_start(es_device *dev, es_group_call call, float *data, size_t n, int root) {
    (void)call, (void)data, (void)n, (void)root;
    return cuda_group_id(dev, NULL);
}
int cuda_group_wait(es_device *dev) {
    (void)dev;
    return 0;
}
void cuda_group_leave(void) {}

#endif
