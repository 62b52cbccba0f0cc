/* The choice of OpenBLAS kernels at start (kernels/cpu/blas_core.c): a family below what the CPU
 * supports is replaced by the best one it supports; one at or above it is kept. */
#include "../testlib.h"
#include "cpu/cpu.h"

static const char *upgrade(const char *core, int avx, int avx2, int avx512, int bf16) {
    const cpu_features cpu = {avx, avx2, avx512, bf16};
    const char *better = cpu_blas_upgrade(core, &cpu);
    return better ? better : "(kept)";
}

TEST(generic_kernels_are_replaced) {
    CHECK(!strcmp(upgrade("Prescott", 1, 1, 1, 1), "Cooperlake")); /* Sapphire Rapids under OpenBLAS 0.3.21 */
    CHECK(!strcmp(upgrade("Prescott", 1, 1, 1, 0), "SkylakeX"));
    CHECK(!strcmp(upgrade("Haswell", 1, 1, 1, 1), "Cooperlake"));  /* AVX2 kernels on an AVX-512 CPU */
    CHECK(!strcmp(upgrade("Zen", 1, 1, 1, 0), "SkylakeX"));
    CHECK(!strcmp(upgrade("Core2", 1, 1, 0, 0), "Haswell"));
    CHECK(!strcmp(upgrade("Nehalem", 1, 0, 0, 0), "Sandybridge"));
}

TEST(kernels_as_good_as_the_cpu_are_kept) {
    CHECK(!strcmp(upgrade("SkylakeX", 1, 1, 1, 0), "(kept)"));
    CHECK(!strcmp(upgrade("Cooperlake", 1, 1, 1, 1), "(kept)"));
    CHECK(!strcmp(upgrade("SAPPHIRERAPIDS", 1, 1, 1, 1), "(kept)"));
    CHECK(!strcmp(upgrade("Haswell", 1, 1, 0, 0), "(kept)"));
    CHECK(!strcmp(upgrade("Zen", 1, 1, 0, 0), "(kept)"));
    CHECK(!strcmp(upgrade("Prescott", 0, 0, 0, 0), "(kept)")); /* nothing better to run */
}

int main(void) {
    RUN(generic_kernels_are_replaced);
    RUN(kernels_as_good_as_the_cpu_are_kept);
    return test_summary();
}
