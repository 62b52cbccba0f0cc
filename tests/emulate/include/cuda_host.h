/* The CUDA backend on the host (tests/emulate/): the part of the CUDA runtime, cuda_bf16.h,
 * cuda_fp8.h and cuBLASLt that kernels/cuda/ uses, written for a CPU, so that the backend's own
 * sources (put through tests/emulate/cuda_to_host.py, which rewrites kernel launches and dynamic
 * shared memory) build with g++ into a libessence-cuda.so that runs every op on a machine without
 * a GPU. It checks the backend's logic: its kernels' indexing, reductions and masks, its host
 * code's buffers, workspace and launch configurations (launches beyond CUDA's limits fail as they
 * would on a GPU). It does not check timing, the GPU's memory model or the hardware's own
 * summation orders (tests/gpu/ on a GPU does).
 *
 * Execution: a stream is a queue, run when the host waits for it, in one of the orders CUDA
 * allows ($ESSENCE_EMU_STREAMS: runtime.cpp), so that work missing a wait for another stream, or a
 * host touching a buffer before its copy is done, sees other data. A launch runs the grid's blocks one
 * after another on the host thread that waits, each CUDA thread of a block a fiber with its own stack,
 * switched at __syncthreads and at warp instructions (which meet per warp: every lane posts its
 * operands, then each computes its own result); blocks and threads from the first or from the last
 * ($ESSENCE_EMU_THREADS: cuda_host.cpp). Launches take turns, so a function-local `static` is a
 * block's shared memory (made NaN again for each block: emu_fresh_shared). Device memory is host memory, tracked so that cudaPointerGetAttributes
 * can tell it from host memory. */
#ifndef ES_TESTS_EMULATE_CUDA_HOST_H
#define ES_TESTS_EMULATE_CUDA_HOST_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <type_traits>

/* ---- what nvcc knows --------------------------------------------------------------------------- */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

using std::max;
using std::min;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
extern uint3 threadIdx, blockIdx; // of the one launch running (launches take turns: emu_launch)
extern dim3 blockDim, gridDim;

struct alignas(8) float2 { /* CUDA's vector types are aligned to their size */
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    uint32_t x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
template <typename T> inline T __ldg(const T *p) { return *p; }

/* A vector load or store (float2, float4, uint2, uint4) on a GPU needs an address aligned to its size,
 * else the kernel stops with "misaligned address"; x86 would not mind. cuda_to_host.py rewrites the
 * kernels' reinterpret_casts to these types into emu_vector_cast, which checks. */
[[noreturn]] void emu_misaligned(const void *p, size_t alignment);
inline void emu_check_aligned(const void *p, size_t alignment) {
    if ((uintptr_t)p % alignment) emu_misaligned(p, alignment);
}
template <typename P, typename Q> inline P emu_vector_cast(Q *q) {
    emu_check_aligned((const void *)q, alignof(typename std::remove_pointer<P>::type));
    return reinterpret_cast<P>(q);
}

/* IEEE operations, rounded to nearest: plain C++ operations on the host (built with
 * -ffp-contract=off, so nothing is fused that the source did not fuse). */
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __uint_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
/* sin(πx), cos(πx): in double, then rounded (CUDA's are within 1 ulp; so is this). */
inline void sincospif(float x, float *s, float *c) {
    const double r = 3.14159265358979323846 * (double)x;
    *s = (float)sin(r), *c = (float)cos(r);
}

/* ---- the block's threads: barriers, warp instructions, atomics ---------------------------------- */

void __syncthreads(int line = __builtin_LINE()); /* threads of a block must meet at one line */
/* The warp instructions take their caller's line (__builtin_LINE()), where lanes of one warp must meet. */
float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int line = __builtin_LINE());
double __shfl_xor_sync(unsigned mask, double value, int lane_mask, int line = __builtin_LINE());
bool __any_sync(unsigned mask, bool predicate, int line = __builtin_LINE());
/* The fibers of a block take turns only at the calls above, so an atomic is a plain update. */
inline unsigned long long atomicMin(unsigned long long *p, unsigned long long value) {
    const unsigned long long old = *p;
    if (value < old) *p = value;
    return old;
}
unsigned char *emu_dynamic_smem();
/* A static __shared__ array (rewritten by cuda_to_host.py): NaN bytes at the first thread of each
 * block that declares it. */
void emu_fresh_shared(void *array, size_t bytes);

/* The emulated mma.sync / ldmatrix of kernels/cuda/flash.cuh (built with ES_CUDA_HOST_EMULATION). */
void emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed, int line);
void emu_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int line);
/* cp.async.cg (16 bytes, src_bytes of them read, the rest zeros), commit_group, wait_group: each
 * thread's copies land at its wait, or at once (emulation.h, emu_async_copies_late). */
void emu_cp_async_16(uint32_t address, const void *global, unsigned src_bytes);
void emu_cp_async_commit();
void emu_cp_async_wait(int newest);

/* ---- the runtime -------------------------------------------------------------------------------- */

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchOutOfResources = 701,
} cudaError_t;
typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaMemoryType { cudaMemoryTypeUnregistered, cudaMemoryTypeHost, cudaMemoryTypeDevice, cudaMemoryTypeManaged };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributePreferredSharedMemoryCarveout };
enum { cudaSharedmemCarveoutMaxShared = 100 };
enum { cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2, cudaHostAllocDefault = 0, cudaHostAllocPortable = 1 };

struct cudaDeviceProp {
    char name[256];
    int major, minor;
    int pciDomainID, pciBusID, pciDeviceID;
    size_t sharedMemPerBlockOptin, sharedMemPerBlock, totalGlobalMem;
    int multiProcessorCount, maxThreadsPerBlock, warpSize;
};
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void *devicePointer, *hostPointer;
};
struct cudaFuncAttributes {
    int binaryVersion, ptxVersion, maxThreadsPerBlock, numRegs;
    size_t sharedSizeBytes, maxDynamicSharedSizeBytes;
};

const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
cudaError_t cudaMalloc(void **ptr, size_t bytes);
cudaError_t cudaFree(void *ptr);
cudaError_t cudaHostAlloc(void **ptr, size_t bytes, unsigned flags);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attributes, const void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, const void *kernel);
cudaError_t cudaFuncSetAttribute(const void *kernel, cudaFuncAttribute attribute, int value);
template <typename F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, F *kernel) {
    return cudaFuncGetAttributes(attributes, (const void *)kernel);
}
template <typename F> cudaError_t cudaFuncSetAttribute(F *kernel, cudaFuncAttribute attribute, int value) {
    return cudaFuncSetAttribute((const void *)kernel, attribute, value);
}

/* kernel<<<grid, block, smem, stream>>>(args), as cuda_to_host.py rewrites it. A configuration
 * CUDA would refuse (more than 1024 threads, a grid beyond its limits, more dynamic shared memory
 * than the kernel was allowed) runs nothing and is the next cudaGetLastError. */
void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, const void *kernel, const std::function<void()> &body);
template <typename F>
void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, F *kernel, const std::function<void()> &body) {
    emu_launch(grid, block, smem_bytes, stream, (const void *)kernel, body);
}
inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, std::nullptr_t, const std::function<void()> &body) {
    emu_launch(grid, block, smem_bytes, stream, (const void *)nullptr, body);
}

/* ---- cuda_bf16.h, cuda_fp8.h -------------------------------------------------------------------- */

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline uint16_t emu_bf16_round(float x) { /* to nearest even; NaN stays a NaN */
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {emu_bf16_round(x)}; }
inline float __bfloat162float(__nv_bfloat16 x) { return __uint_as_float((uint32_t)x.bits << 16); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 x) { return x.bits; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }

typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
__nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturate, __nv_fp8_interpretation_t kind);
float emu_fp8_e4m3_value(unsigned char bits);
struct __nv_fp8_e4m3 {
    __nv_fp8_storage_t __x;
};

/* ---- cuBLASLt ----------------------------------------------------------------------------------- */

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_ALLOC_FAILED = 3, CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8, CUBLAS_STATUS_MAPPING_ERROR = 11, CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14, CUBLAS_STATUS_NOT_SUPPORTED = 15, CUBLAS_STATUS_LICENSE_ERROR = 16
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14, CUDA_R_8F_E4M3 = 28 } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 } cublasLtEpilogue_t;
typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUBLASLT_MATMUL_DESC_FAST_ACCUM
} cublasLtMatmulDescAttributes_t;
typedef enum {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    CUBLASLT_MATMUL_PREF_IMPL_MASK
} cublasLtMatmulPreferenceAttributes_t;
typedef enum { CUBLASLT_ALGO_CONFIG_SPLITK_NUM, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME } cublasLtMatmulAlgoConfigAttributes_t;
enum { CUBLASLT_REDUCTION_SCHEME_NONE = 0 };
#define CUBLASLT_NUMERICAL_IMPL_FLAGS_TENSOR_OP_MASK 0x3ull

typedef struct emu_lt *cublasLtHandle_t;
typedef struct emu_lt_desc *cublasLtMatmulDesc_t;
typedef struct emu_lt_layout *cublasLtMatrixLayout_t;
typedef struct emu_lt_preference *cublasLtMatmulPreference_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute, cudaDataType_t scale);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const void *value,
                                              size_t bytes);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                                                    const void *value, size_t bytes);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested, cublasLtMatmulHeuristicResult_t *results,
                                              int *returned);
cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                       cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                       const cublasLtMatmulAlgo_t *algo, cublasLtMatmulHeuristicResult_t *result);
cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute(const cublasLtMatmulAlgo_t *algo, cublasLtMatmulAlgoConfigAttributes_t attribute,
                                                    void *value, size_t bytes, size_t *written);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t *algo,
                              void *workspace, size_t workspace_bytes, cudaStream_t stream);

#endif
