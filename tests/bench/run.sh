#!/usr/bin/env bash
# make bench: every benchmark, each against its baseline in the same run, with the OpenBLAS
# kernels the programs run named beside every figure.
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
VENV=${VENV:-.venv}
BENCH_VENV=${BENCH_VENV:-.venv-bench}
export ESSENCE_FIXTURES=${ESSENCE_FIXTURES:-$PWD/tests/fixtures}
core=$("$BUILD"/bench/bench_forward --blas-core 2>/dev/null)
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); OpenBLAS $core kernels (OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset})"
echo "== bench_h5store (no BLAS)"
"$BUILD"/bench/bench_h5store
echo "== bench_project (OpenBLAS $core)"
"$BUILD"/bench/bench_project
echo "== bench_tokenizer (no BLAS)"
BUILD=$BUILD "$VENV"/bin/python tests/bench/bench_tokenizer.py
echo "== bench_forward (OpenBLAS $core)"
BUILD=$BUILD "$BENCH_VENV"/bin/python tests/bench/bench_forward.py
echo "== stream_memory (OpenBLAS $core)"
BUILD=$BUILD tests/bench/stream_memory.sh
