#!/usr/bin/env bash
# make fuzz: runs every libFuzzer target for FUZZ_SECONDS (default 60) from its seed corpus.
# A crash, leak or timeout leaves its input in build/fuzz/findings/ and fails the run.
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
SECONDS_EACH=${FUZZ_SECONDS:-60}
findings=$BUILD/fuzz/findings
mkdir -p "$findings"
status=0
for f in "$BUILD"/fuzz/fuzz_*; do
    [ -x "$f" ] || continue
    name=$(basename "$f")
    corpus=$BUILD/fuzz/corpus/${name#fuzz_}
    mkdir -p "$corpus"
    [ -d "tests/fuzz/corpus/${name#fuzz_}" ] && cp -rn "tests/fuzz/corpus/${name#fuzz_}"/. "$corpus"/
    log=$BUILD/fuzz/$name.log
    if "$f" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -malloc_limit_mb=1048576 -max_len=65536 \
            -artifact_prefix="$findings/$name-" "$corpus" >"$log" 2>&1; then
        runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1)
        echo "$name: ${runs:-done} in $SECONDS_EACH s, no finding"
    else
        echo "$name: FINDING (see $log and $findings/)"; tail -n 20 "$log"; status=1
    fi
done
exit $status
