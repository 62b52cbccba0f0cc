#!/usr/bin/env bash
# make bench: every benchmark, each against its baseline in the same run.
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
for b in "$BUILD"/bench/bench_*; do
    [ -x "$b" ] || continue
    echo "== $(basename "$b")"
    "$b"
done
