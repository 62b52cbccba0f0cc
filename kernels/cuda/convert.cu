// bf16 <-> fp32 conversion on the GPU, bit-identical to common/dtype.h (the CPU reference).
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda.h"

__device__ __forceinline__ uint16_t f32_to_bf16(float value) {
    uint32_t u = __float_as_uint(value);
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return (uint16_t)((sign >> 16) | 0x7fffu);  // NaN
    if (mag == 0x7f800000u) return (uint16_t)(u >> 16);                 // +-inf
    mag += 0x8000u;                                                     // ties away from zero
    if (mag >= 0x7f800000u) mag = 0x7f7f0000u;                          // saturate, as HDF5
    return (uint16_t)((sign | mag) >> 16);
}

__global__ void bf16_to_f32_kernel(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

__global__ void f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = f32_to_bf16(src[i]);
}

static unsigned grid_for(size_t n) {
    size_t blocks = (n + 255) / 256;
    return (unsigned)(blocks < 65535 ? (blocks ? blocks : 1) : 65535);
}

extern "C" {

const char *es_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
int es_cuda_device_count(int *count) { return (int)cudaGetDeviceCount(count); }
int es_cuda_malloc(void **ptr, size_t bytes) { return (int)cudaMalloc(ptr, bytes); }
int es_cuda_free(void *ptr) { return (int)cudaFree(ptr); }
int es_cuda_copy_to_device(void *dst, const void *src, size_t bytes) {
    return (int)cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
int es_cuda_copy_to_host(void *dst, const void *src, size_t bytes) {
    return (int)cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
}
int es_cuda_synchronize(void) { return (int)cudaDeviceSynchronize(); }

int es_cuda_bf16_to_f32(float *dst, const uint16_t *src, size_t n) {
    if (n == 0) return 0;
    bf16_to_f32_kernel<<<grid_for(n), 256>>>(dst, src, n);
    return (int)cudaGetLastError();
}

int es_cuda_f32_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (n == 0) return 0;
    f32_to_bf16_kernel<<<grid_for(n), 256>>>(dst, src, n);
    return (int)cudaGetLastError();
}

}  // extern "C"
