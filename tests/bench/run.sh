#!/usr/bin/env bash
# make bench: every benchmark, each against its baseline in the same run.
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
VENV=${VENV:-.venv}
BENCH_VENV=${BENCH_VENV:-.venv-bench}
export ESSENCE_FIXTURES=${ESSENCE_FIXTURES:-$PWD/../shared/fixtures}
echo "== bench_h5store"
"$BUILD"/bench/bench_h5store
echo "== bench_project"
"$BUILD"/bench/bench_project
echo "== bench_tokenizer"
BUILD=$BUILD "$VENV"/bin/python tests/bench/bench_tokenizer.py
echo "== bench_forward"
BUILD=$BUILD "$BENCH_VENV"/bin/python tests/bench/bench_forward.py
