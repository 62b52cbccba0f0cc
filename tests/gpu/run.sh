#!/usr/bin/env bash
# The one prepared GPU script (run on the device machine, from the project root):
#   1. builds with nvcc (or uses a build carried from a Debian machine: see below),
#   2. runs every CUDA check in build/gpu/ against the CPU reference,
#   3. runs the GPU benchmarks against ../shared/tools/gpu_baselines.py in the same call
#      (copied into gpu-carry/ beforehand, since ../shared does not travel).
# Results go to $OUT (or gpu-out/). Prepare on the Debian machine:
#   make && mkdir -p gpu-carry && ../shared/tools/gpu-bundle.sh gpu-carry build/gpu/* \
#     && cp ../shared/tools/gpu_baselines.py gpu-carry/
# then run with carry = [build, gpu-carry].
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -f gpu-carry/libs.tar.xz ]; then
    tar xJf gpu-carry/libs.tar.xz -C gpu-carry && export LD_LIBRARY_PATH=$PWD/gpu-carry/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
passed=0 failed=0
for t in "$BUILD"/gpu/test_*; do
    [ -x "$t" ] || continue
    out=$("$t" 2>&1); rc=$?
    echo "$out" | tee -a "$OUT/checks.txt"
    passed=$((passed + $(grep -c '^PASS ' <<<"$out"))); f=$(grep -c '^FAIL ' <<<"$out")
    [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    failed=$((failed + f))
done
# build/gpu/test_ops runs the per-op harness (docs/ops-harness.md) on a CUDA device against the CPU
# and the double reference; it prints SKIP while the CUDA backend's ops are not written.
# GPU benchmarks: none exist yet (the CUDA backend so far is the bf16 conversion kernel).
# When they do, run them here beside: python3 gpu-carry/gpu_baselines.py "$OUT"
echo "$passed passed, $failed failed" | tee -a "$OUT/checks.txt"
[ "$failed" -eq 0 ]
