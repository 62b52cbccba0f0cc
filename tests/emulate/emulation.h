/* What the emulation's own files share (the backend sees include/cuda_host.h only). */
#ifndef ES_TESTS_EMULATE_EMULATION_H
#define ES_TESTS_EMULATE_EMULATION_H

#include "cuda_host.h"

/* Queues work on a stream (nullptr: the legacy default stream); it runs in the stream's turn
 * (runtime.cpp). */
void emu_enqueue(cudaStream_t stream, std::function<void()> work);
/* Whether [ptr, ptr + bytes) lies in device memory. */
bool emu_device_range(const void *ptr, size_t bytes);
/* What the next cudaGetLastError of this host thread returns. */
void emu_set_last_error(cudaError_t error);

#endif
