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
set -eu
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
BUILD=build-gpu
ARCH=${GPU_ARCH:-"-gencode arch=compute_90a,code=sm_90a"}
make -j"$(nproc)" BUILD=$BUILD CUDA_ARCHS="$ARCH" $BUILD/essence-extract $BUILD/essence-project $BUILD/essence-align $BUILD/essence-eval \
    $BUILD/essence-inspect $BUILD/libessence-cuda.so \
    $(ls tests/gpu/*.c | sed "s|tests/gpu/\(.*\)\.c|$BUILD/gpu/\1|")
rm -rf gpu-carry && mkdir -p gpu-carry/bin gpu-carry/llama70b gpu-carry/qwen1.5b
cp $BUILD/essence-extract $BUILD/essence-project $BUILD/essence-align $BUILD/essence-eval $BUILD/essence-inspect $BUILD/libessence-cuda.so $BUILD/gpu/* gpu-carry/bin/
strip gpu-carry/bin/*
"$SHARED/tools/gpu-bundle.sh" gpu-carry gpu-carry/bin/* /usr/bin/orterun
ompi=gpu-carry/ompi
mkdir -p $ompi/bin $ompi/lib/x86_64-linux-gnu $ompi/share $ompi/pmix
cp /usr/bin/orterun /usr/bin/orted $ompi/bin/
cp -a /usr/lib/x86_64-linux-gnu/openmpi $ompi/lib/x86_64-linux-gnu/ && rm -rf $ompi/lib/x86_64-linux-gnu/openmpi/include
cp -a /usr/share/openmpi $ompi/share/
cp -a /usr/lib/x86_64-linux-gnu/pmix2/. $ompi/pmix/
tar -C gpu-carry -cJf gpu-carry/ompi.tar.xz ompi && rm -rf $ompi
cp tests/gpu/eval_vs_golden.py tests/gpu/align_parity.py tests/gpu/ranks_parity.py gpu-carry/
cp "$SHARED/tools/gpu_baselines.py" "$SHARED/tools/gpu_offload_baselines.py" gpu-carry/
cp "$SHARED/fixtures/configs/deepseek-r1-distill-llama-70b.config.json" gpu-carry/llama70b/config.json
cp "$SHARED/fixtures/configs/deepseek-r1-distill-qwen-1.5b.config.json" gpu-carry/qwen1.5b/config.json
du -sh gpu-carry
