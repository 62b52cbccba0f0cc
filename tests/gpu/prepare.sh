#!/usr/bin/env bash
# Gets gpu-carry/ ready for tests/gpu/run.sh on a GPU machine, which has CUDA and Python with
# PyTorch + transformers but none of our Debian libraries and no ../shared. Run on the Debian
# build machine, from the project root, with ../shared beside it:
#   tests/gpu/prepare.sh            # then: run "bash tests/gpu/run.sh" with carry = [gpu-carry]
# What it puts there (well under the 64 MiB a carry may hold):
#   bin/          the programs, the CUDA backend (libessence-cuda.so) and the build/gpu checks and
#                 benchmarks, built for sm_90a only (smaller)
#   libs.tar.xz   the shared libraries they load (../shared/tools/gpu-bundle.sh)
#   gpu_baselines.py, gpu_offload_baselines.py   the Hugging Face / PyTorch baselines
#   llama70b/config.json, qwen1.5b/config.json    the teacher's and the student's shapes, for the benchmarks
#   ompi.tar.xz   Debian's Open MPI launcher, components and PMIx (~2 MB), relocated there with
#                 OPAL_PREFIX: two ranks on one GPU sum through MPI (NCCL takes one rank per GPU)
#   EMULATED=1 CARRY=gpu-rehearsal tests/gpu/prepare.sh   the same from the host build, with the CUDA
#                 backend built for the host (build/emu/) and its checks: tests/gpu/rehearse.sh runs run.sh
#                 on it here, without a GPU
set -eu
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
CARRY=${CARRY:-gpu-carry}
PROGRAMS="essence-extract essence-project essence-align essence-eval essence-inspect"
if [ -n "${EMULATED:-}" ]; then
    BUILD=build
    make -j"$(nproc)" $(printf "$BUILD/%s " $PROGRAMS) $BUILD/emu/libessence-cuda.so
    backend=$BUILD/emu/libessence-cuda.so checks=$(ls $BUILD/emu/test_*)
else
    BUILD=build-gpu
    ARCH=${GPU_ARCH:-"-gencode arch=compute_90a,code=sm_90a"}
    make -j"$(nproc)" BUILD=$BUILD CUDA_ARCHS="$ARCH" $(printf "$BUILD/%s " $PROGRAMS) $BUILD/libessence-cuda.so \
        $(ls tests/gpu/*.c | sed "s|tests/gpu/\(.*\)\.c|$BUILD/gpu/\1|")
    backend=$BUILD/libessence-cuda.so checks=$(ls $BUILD/gpu/*)
fi
rm -rf "$CARRY" && mkdir -p "$CARRY/bin" "$CARRY/llama70b" "$CARRY/qwen1.5b"
cp $(printf "$BUILD/%s " $PROGRAMS) $backend $checks "$CARRY/bin/"
strip "$CARRY"/bin/*
"$SHARED/tools/gpu-bundle.sh" "$CARRY" "$CARRY"/bin/* /usr/bin/orterun
ompi=$CARRY/ompi
mkdir -p $ompi/bin $ompi/lib/x86_64-linux-gnu $ompi/share $ompi/pmix
cp /usr/bin/orterun /usr/bin/orted $ompi/bin/
cp -a /usr/lib/x86_64-linux-gnu/openmpi $ompi/lib/x86_64-linux-gnu/ && rm -rf $ompi/lib/x86_64-linux-gnu/openmpi/include
cp -a /usr/share/openmpi $ompi/share/
cp -a /usr/lib/x86_64-linux-gnu/pmix2/. $ompi/pmix/
tar -C "$CARRY" -cJf "$CARRY/ompi.tar.xz" ompi && rm -rf $ompi
cp tests/gpu/eval_vs_golden.py tests/gpu/align_parity.py tests/gpu/ranks_parity.py "$CARRY/"
cp "$SHARED/tools/gpu_baselines.py" "$SHARED/tools/gpu_offload_baselines.py" "$CARRY/"
cp tests/fixtures/configs/deepseek-r1-distill-llama-70b.config.json "$CARRY/llama70b/config.json"
cp tests/fixtures/configs/deepseek-r1-distill-qwen-1.5b.config.json "$CARRY/qwen1.5b/config.json"
du -sh "$CARRY"
