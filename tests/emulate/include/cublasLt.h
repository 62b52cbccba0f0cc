/* tests/emulate: the CUDA backend on the host (cuda_host.h). */
#include "cuda_host.h"
