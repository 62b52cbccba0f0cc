/* What the emulation's own files share (the backend sees include/cuda_host.h only). */
#ifndef ES_TESTS_EMULATE_EMULATION_H
#define ES_TESTS_EMULATE_EMULATION_H

#include "cuda_host.h"

/* Queues work on a stream (nullptr: the legacy default stream); it runs in the stream's turn
 * (runtime.cpp). */
void emu_enqueue(cudaStream_t stream, std::function<void()> work);
/* Whether [ptr, ptr + bytes) lies in device memory. */
bool emu_device_range(const void *ptr, size_t bytes);
/* $ESSENCE_EMU_DRY=1: launches and products are checked as ever but not run, device memory is not
 * filled, copies within the device and memsets over 1 MiB are skipped (copies to and from the host
 * still happen: the host logic reads small tables back), and the device has an H100's 80 GiB. For
 * running the programs sized for a GPU (tests/gpu/'s benchmarks) through every launch
 * configuration, allocation and product shape they make, without the hours the kernels would
 * take here; their results are garbage. */
bool emu_dry();
/* Whether a kernel's cp.async copies land at the latest moment CUDA allows (the thread's
 * cp.async.wait_group that covers them; $ESSENCE_EMU_STREAMS lazy, the default) or at once when
 * issued (eager, now): a thread that reads a copy it has not waited for, or another thread's copy
 * without a barrier after that thread's wait, reads the data of before under the first; a copy
 * issued into a buffer that other threads may still be reading overwrites it first under the second. */
bool emu_async_copies_late();
/* What the next cudaGetLastError of this host thread returns. */
void emu_set_last_error(cudaError_t error);

#endif
