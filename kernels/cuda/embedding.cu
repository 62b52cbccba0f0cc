// Embedding forward on CUDA (kernels/ops.h): out[t] = table[ids[t]], the table either device
// memory in the weight format (bf16, or fp32) gathered by a kernel, or a host mapping of the
// checkpoint in any float dtype, converted on the host row by row exactly as the CPU backend
// does (kernels/cpu/ops.c), so the bits are the CPU's for every dtype, NaN and subnormals too
// (bf16 rows are widened on the device instead: the same bits, half the bytes to copy).
//
// The ids are not checked against the vocabulary here (the op is not told V): the decoder
// checks them before it calls, and both paths trust it.
#include <stdlib.h>

#include "cuda_internal.h"

namespace {

/* Host rows are converted and copied in chunks of about this many values, so the staging
 * buffer stays small whatever T · C is. */
constexpr size_t STAGING_VALUES = (size_t)1 << 22;

/* One block per token; bf16 widens exactly (its bits are fp32's upper half), NaN payloads kept. */
__global__ void gather_bf16_kernel(float *out /* (T, C) */, const int32_t *ids /* (T) */, const uint16_t *table /* (V, C) */, int C) {
    const size_t t = blockIdx.x;
    const uint16_t *row = table + (size_t)ids[t] * C; // (C)
    float *dst = out + t * C;                         // (C)
    for (unsigned c = threadIdx.x; c < (unsigned)C; c += blockDim.x) dst[c] = __uint_as_float((uint32_t)row[c] << 16);
}

__global__ void gather_f32_kernel(float *out /* (T, C) */, const int32_t *ids /* (T) */, const float *table /* (V, C) */, int C) {
    const size_t t = blockIdx.x;
    const float *row = table + (size_t)ids[t] * C; // (C)
    float *dst = out + t * C;                      // (C)
    for (unsigned c = threadIdx.x; c < (unsigned)C; c += blockDim.x) dst[c] = row[c];
}

/* n bf16 values widened to fp32 (exact). */
__global__ void widen_bf16_kernel(float *out /* (n) */, const uint16_t *in /* (n) */, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __uint_as_float((uint32_t)in[i] << 16);
}

/* bf16 rows (the checkpoints' own dtype) travel as they are: gathered on the host into pinned
 * memory, copied at the link's speed and widened on the device, which gives the same bits as the
 * host conversion (a shift) with half the bytes and no host arithmetic. Each chunk's copy is
 * waited for before the staging buffer takes the next. */
int bf16_rows_from_host(es_device *dev, float *out /* (T, C) */, const int32_t *host_ids /* (T) host */,
                        const uint16_t *table /* (V, C) host */, int T, int C) {
    cuda_device *cd = cuda_of(dev);
    cudaStream_t stream = cuda_stream(dev);
    /* at most T rows: then the scratch stays within what the workspace plan reserved (T · max_in) */
    size_t rows_per_chunk = STAGING_VALUES / (size_t)C ? STAGING_VALUES / (size_t)C : 1;
    rows_per_chunk = rows_per_chunk < (size_t)T ? rows_per_chunk : (size_t)T;
    const size_t staging_bytes = rows_per_chunk * (size_t)C * sizeof(uint16_t);
    if (cd->embed_staging_bytes < staging_bytes) {
        if (cd->embed_staging) cudaFreeHost(cd->embed_staging);
        cd->embed_staging = NULL, cd->embed_staging_bytes = 0;
        CUDA_TRY(dev, "embedding_forward", cudaHostAlloc(&cd->embed_staging, staging_bytes, cudaHostAllocDefault));
        cd->embed_staging_bytes = staging_bytes;
    }
    uint16_t *staging = (uint16_t *)cd->embed_staging;                       // (rows_per_chunk, C) host
    uint16_t *on_device = (uint16_t *)es_device_scratch(dev, staging_bytes); // (rows_per_chunk, C)
    if (!on_device) return ES_ERR_RUNTIME;
    for (size_t t0 = 0; t0 < (size_t)T; t0 += rows_per_chunk) {
        const size_t rows = (size_t)T - t0 < rows_per_chunk ? (size_t)T - t0 : rows_per_chunk, n = rows * (size_t)C;
        for (size_t r = 0; r < rows; r++) memcpy(staging + r * C, table + (size_t)host_ids[t0 + r] * C, (size_t)C * sizeof *staging);
        CUDA_TRY(dev, "embedding_forward", cudaMemcpyAsync(on_device, staging, n * sizeof *staging, cudaMemcpyHostToDevice, stream));
        widen_bf16_kernel<<<cuda_blocks(n, 256), 256, 0, stream>>>(out + t0 * C, on_device, n);
        CUDA_LAUNCHED(dev, "embedding_forward");
        CUDA_TRY(dev, "embedding_forward", cudaStreamSynchronize(stream));
    }
    return 0;
}

/* Device memory (or managed) is read by the kernels; anything else (a mapped file, malloc'd or
 * pinned host memory) by the host. Old drivers fail the query for an unregistered host pointer
 * and leave the error to be picked up by the next call: clear it. */
bool on_device(const void *table) {
    cudaPointerAttributes attributes;
    if (cudaPointerGetAttributes(&attributes, table) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

int from_device(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C) {
    const unsigned threads = C >= 256 ? 256u : (unsigned)(C + 31) / 32 * 32;
    if (dtype == ES_DT_BF16)
        gather_bf16_kernel<<<(unsigned)T, threads, 0, cuda_stream(dev)>>>(out, ids, (const uint16_t *)table, C);
    else if (dtype == ES_DT_F32)
        gather_f32_kernel<<<(unsigned)T, threads, 0, cuda_stream(dev)>>>(out, ids, (const float *)table, C);
    else
        return es_device_fail(dev, ES_ERR_USAGE, "%s: embedding_forward: a table in device memory must be BF16 or F32, not %s",
                              dev->name, es_dtype_name(dtype));
    CUDA_LAUNCHED(dev, "embedding_forward");
    return 0;
}

/* The rows of host_ids, converted into staging (rows_per_chunk rows) a chunk at a time and
 * copied into out. Each copy is waited for before staging is written again or freed: it is
 * pageable memory, which the copy may still be reading after cudaMemcpyAsync returns. */
int rows_from_host(es_device *dev, float *out /* (T, C) */, const int32_t *host_ids /* (T) host */, const void *table /* (V, C) host */,
                   es_dtype dtype, int T, int C, float *staging /* (rows_per_chunk, C) host */, int rows_per_chunk) {
    const size_t row_bytes = (size_t)C * es_dtype_size(dtype);
    cudaStream_t stream = cuda_stream(dev);
    for (int t0 = 0; t0 < T; t0 += rows_per_chunk) {
        const int rows = T - t0 < rows_per_chunk ? T - t0 : rows_per_chunk;
        for (int r = 0; r < rows; r++) {
            /* a one-row view of the table, converted by the function the CPU backend uses */
            es_tensor row = {};
            row.name = "embedding row";
            row.dtype = dtype;
            row.ndim = 1;
            row.shape[0] = C;
            row.data = (const char *)table + (size_t)host_ids[t0 + r] * row_bytes;
            row.nbytes = row_bytes;
            es_error err = {};
            if (es_tensor_to_f32(&row, staging + (size_t)r * C, &err)) return es_device_fail(dev, err.code, "%s", err.msg);
        }
        CUDA_TRY(dev, "embedding_forward",
                 cudaMemcpyAsync(out + (size_t)t0 * C, staging, (size_t)rows * C * sizeof *staging, cudaMemcpyHostToDevice, stream));
        CUDA_TRY(dev, "embedding_forward", cudaStreamSynchronize(stream));
    }
    return 0;
}

int from_host(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C) {
    cuda_device *cd = cuda_of(dev);
    const size_t ids_bytes = (size_t)T * sizeof *ids;
    size_t chunk = STAGING_VALUES / (size_t)C; // rows
    chunk = chunk < 1 ? 1 : chunk > (size_t)T ? (size_t)T : chunk;
    const int rows_per_chunk = (int)chunk;
    const size_t staging_bytes = (size_t)rows_per_chunk * C * sizeof(float);
    /* the ids in the pinned buffer when they fit (the usual case), else in pageable memory */
    int32_t *host_ids = ids_bytes <= cd->pinned_bytes ? (int32_t *)cd->pinned : (int32_t *)malloc(ids_bytes); // (T)
    float *staging = (float *)malloc(staging_bytes); // (rows_per_chunk, C) host
    int rc = 0;
    if (!host_ids || !staging) {
        rc = es_device_fail(dev, ES_ERR_RUNTIME, "%s: embedding_forward: out of host memory staging %zu bytes", dev->name,
                            ids_bytes + staging_bytes);
    } else {
        /* the ids are ready once the stream reaches this point; the table is not read before */
        cudaError_t copied = cudaMemcpyAsync(host_ids, ids, ids_bytes, cudaMemcpyDeviceToHost, cuda_stream(dev));
        if (copied == cudaSuccess) copied = cudaStreamSynchronize(cuda_stream(dev));
        rc = copied != cudaSuccess ? cuda_fail(dev, "embedding_forward", "copying the ids to the host", copied)
             : dtype == ES_DT_BF16 ? bf16_rows_from_host(dev, out, host_ids, (const uint16_t *)table, T, C)
                                   : rows_from_host(dev, out, host_ids, table, dtype, T, C, staging, rows_per_chunk);
    }
    if (host_ids != cd->pinned) free(host_ids);
    free(staging);
    return rc;
}

} // namespace

int cuda_embedding_forward(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C) {
    if (T <= 0 || C <= 0) return 0;
    return on_device(table) ? from_device(dev, out, ids, table, dtype, T, C) : from_host(dev, out, ids, table, dtype, T, C);
}
