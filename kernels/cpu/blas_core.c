/* OpenBLAS's kernels: Debian's OpenBLAS 0.3.21 does not know every CPU and then runs kernels
 * far below what the CPU can do (its generic Prescott kernels on Sapphire Rapids). It reads OPENBLAS_CORETYPE only when it loads, before main(),
 * so es_device_prepare sets it and runs the program again. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cpu.h"
#include "log.h"

char *openblas_get_corename(void);

const char *cpu_blas_core(void) { return openblas_get_corename(); }

/* The instruction sets OpenBLAS's cores are written for, by name (0: SSE and below). */
static int core_level(const char *core) {
    static const char *const avx512[] = {"skylakex", "cooperlake", "sapphirerapids"};
    static const char *const avx2[] = {"haswell", "zen", "excavator"};
    static const char *const avx[] = {"sandybridge", "bulldozer", "piledriver", "steamroller"};
    char lower[64];
    size_t n = 0;
    for (; core[n] && n + 1 < sizeof lower; n++) lower[n] = (char)(core[n] >= 'A' && core[n] <= 'Z' ? core[n] + 32 : core[n]);
    lower[n] = '\0';
    for (size_t i = 0; i < sizeof avx512 / sizeof *avx512; i++)
        if (!strcmp(lower, avx512[i])) return 3;
    for (size_t i = 0; i < sizeof avx2 / sizeof *avx2; i++)
        if (!strcmp(lower, avx2[i])) return 2;
    for (size_t i = 0; i < sizeof avx / sizeof *avx; i++)
        if (!strcmp(lower, avx[i])) return 1;
    return 0;
}

const char *cpu_blas_upgrade(const char *current, const cpu_features *cpu) {
    const int level = core_level(current);
    if (cpu->avx512 && level < 3) return cpu->avx512_bf16 ? "Cooperlake" : "SkylakeX";
    if (cpu->avx2_fma && level < 2) return "Haswell";
    if (cpu->avx && level < 1) return "Sandybridge";
    return NULL;
}

/* What the CPU and the OS support (gcc's checks include the OS saving the wider registers). */
static cpu_features this_cpu(void) {
    __builtin_cpu_init();
    cpu_features cpu = {0};
    cpu.avx = __builtin_cpu_supports("avx");
    cpu.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    cpu.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
    cpu.avx512_bf16 = cpu.avx512 && __builtin_cpu_supports("avx512bf16");
    return cpu;
}

#define REPLACED_VARIABLE "ESSENCE_BLAS_REPLACED"

void es_device_prepare(char **argv) {
    const char *replaced = getenv(REPLACED_VARIABLE);
    if (replaced) { /* the second start: say once what was done, and not to the programs this one starts */
        es_log("BLAS: OpenBLAS chose its %s kernels for this CPU; running its %s ones (set OPENBLAS_CORETYPE to choose)",
               replaced, cpu_blas_core());
        unsetenv(REPLACED_VARIABLE);
        return;
    }
    const char *preload = getenv("LD_PRELOAD");
    if (preload && strstr(preload, "vgpreload")) return; /* valgrind */
    /* OpenBLAS also starts its own threads as it loads, each taking a 128 MiB buffer; the programs
     * never use them (the pool tiles every product, openblas_set_num_threads(1)), and under an
     * address-space limit one can loop forever in OpenBLAS's allocator, then hang the exit that
     * joins it. So the restart also asks for one thread from the start. */
    const char *threads = getenv("OPENBLAS_NUM_THREADS");
    const int one_thread = threads && !strcmp(threads, "1");
    const cpu_features cpu = this_cpu();
    const char *better = getenv("OPENBLAS_CORETYPE") ? NULL : cpu_blas_upgrade(cpu_blas_core(), &cpu); /* NULL: the user's choice */
    if (!better && one_thread) return;
    if (better) setenv("OPENBLAS_CORETYPE", better, 1), setenv(REPLACED_VARIABLE, cpu_blas_core(), 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    execv("/proc/self/exe", argv);
    if (better) es_warn("BLAS: cannot restart with OpenBLAS's %s kernels; going on with %s", better, cpu_blas_core());
    unsetenv("OPENBLAS_CORETYPE"), unsetenv(REPLACED_VARIABLE);
}
