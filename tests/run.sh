#!/usr/bin/env bash
# Runs every test (C unit tests, CLI scripts, Python interoperability tests, short fuzz runs)
# and ends with one line: "N passed, M failed[, K skipped] (S s)". Each test prints lines
# "PASS name", "FAIL name: why" or "SKIP name: why"; a test program that dies without
# saying FAIL counts as one failure.
#
# Tests run TEST_JOBS at a time (default: the cores, at most 4), each reported whole, in the
# order listed, once it ends. Most of a test's time is spent starting programs and in Python,
# on one core; the few whose checks depend on how long a run takes (kills at moments spread over
# a measured run) run alone, marked --alone below, before the others; then the long ones
# (--long) start first, so that none of them is left running by itself at the end.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-build}
VENV=${VENV:-.venv}
export ESSENCE_ROOT=$ROOT ESSENCE_BUILD=$ROOT/$BUILD
# The fixtures: the in-repo set (tests/fixtures/README.md), always there, and the large shared set
# beside the checkout, which the tests also run where that folder exists (each test family prints
# one SKIP line where it does not).
export ESSENCE_FIXTURES=${ESSENCE_FIXTURES:-$ROOT/tests/fixtures}
export ESSENCE_SHARED_FIXTURES=${ESSENCE_SHARED_FIXTURES-$ROOT/../shared/fixtures}
export ESSENCE_PYTHON=${ESSENCE_PYTHON:-$ROOT/$VENV/bin/python}
export HDF5_PLUGIN_PATH_BUILT=$ROOT/$BUILD/plugins
export TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/essence-tests.XXXXXX")
trap 'rm -rf "$TMPDIR"' EXIT
results=$TMPDIR/results  # one folder per test: its output, exit status, seconds, sanitizer reports
mkdir -p "$results"
cores=$(nproc 2>/dev/null || echo 1)
TEST_JOBS=${TEST_JOBS:-$((cores < 4 ? cores : 4))}
[[ $TEST_JOBS =~ ^[1-9][0-9]*$ ]] || { echo "tests/run.sh: TEST_JOBS must be a positive number, not '$TEST_JOBS'" >&2; exit 2; }

# make sanitize: programs built with ASan + UBSan write every report to a file of the test's own,
# so that a report fails the test that ran the program even where the test only looked at the exit
# code.
sanitize=${ESSENCE_SANITIZE:-}
asan_options=${ASAN_OPTIONS:-} ubsan_options=${UBSAN_OPTIONS:-}

passed=0 failed=0 skipped=0
skips=()
skip() { # label: why (a test family that cannot run here)
    skipped=$((skipped + 1)); skips+=("$1")
}

labels=() commands=() alone=() long=()
add() { # [--alone | --long] label command...
    local solo=0 lengthy=0
    case $1 in --alone) solo=1; shift ;; --long) lengthy=1; shift ;; esac
    labels+=("$1"); shift
    commands+=("$(printf '%q ' "$@")"); alone+=("$solo"); long+=("$lengthy")
}

start() { # index
    local i=$1 dir=$results/$1
    mkdir -p "$dir/reports"
    (
        if [ -n "$sanitize" ]; then
            export ASAN_OPTIONS="${asan_options:+$asan_options:}log_path=$dir/reports/asan"
            export UBSAN_OPTIONS="${ubsan_options:+$ubsan_options:}log_path=$dir/reports/ubsan"
        fi
        began=$SECONDS
        eval "${commands[$i]}" >"$dir/out" 2>&1 </dev/null
        echo $? >"$dir/rc.tmp"
        echo $((SECONDS - began)) >"$dir/seconds"
        mv "$dir/rc.tmp" "$dir/rc"
    ) &
}

report() { # index: counts and prints a finished test
    local i=$1 dir=$results/$1 label=${labels[$1]}
    local out rc took p f s
    out=$(cat "$dir/out"); rc=$(cat "$dir/rc"); took="$(cat "$dir/seconds") s"
    p=$(grep -c '^PASS ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out"); s=$(grep -c '^SKIP ' <<<"$out")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1; out+=$'\n'"FAIL $label: exited with status $rc"
    fi
    local found
    for found in "$dir"/reports/*; do
        [ -e "$found" ] || continue
        # A process the test killed on purpose (SIGKILL) can leave the file its report was to go
        # to, empty: nothing was reported.
        [ -s "$found" ] || continue
        f=$((f + 1)); out+=$'\n'"FAIL $label: sanitizer report $(basename "$found"):"$'\n'"$(head -n 40 "$found")"
        mkdir -p "$ROOT/$BUILD/sanitizer-reports" && mv "$found" "$ROOT/$BUILD/sanitizer-reports/$label-$(basename "$found")"
    done
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    if [ "$f" -gt 0 ]; then
        echo "== $label: $f failed ($took)"; echo "$out" | sed 's/^/   /'
    else
        echo "== $label: $p passed${s:+, $s skipped} ($took)" | sed 's/, 0 skipped//'
    fi
    while IFS= read -r line; do skips+=("$label: ${line#SKIP }"); done < <(grep '^SKIP ' <<<"$out")
}

run_all() {
    local n=${#labels[@]} next=0 shown=0 running=0 solo_running=0 i
    local state=()  # "" queued, r running, d done
    local order=()  # the indices in the order they start: alone, long, the rest
    for ((i = 0; i < n; i++)); do [ "${alone[$i]}" = 1 ] && order+=("$i"); done
    for ((i = 0; i < n; i++)); do [ "${long[$i]}" = 1 ] && order+=("$i"); done
    for ((i = 0; i < n; i++)); do [ "${alone[$i]}${long[$i]}" = 00 ] && order+=("$i"); done
    while [ "$shown" -lt "$n" ]; do
        while [ "$next" -lt "$n" ] && [ "$solo_running" -eq 0 ]; do
            i=${order[$next]}
            if [ "${alone[$i]}" = 1 ]; then
                [ "$running" -eq 0 ] || break
                solo_running=1
            elif [ "$running" -ge "$TEST_JOBS" ]; then
                break
            fi
            start "$i"; state[$i]=r; running=$((running + 1)); next=$((next + 1))
        done
        for ((i = 0; i < n; i++)); do
            if [ "${state[$i]:-}" = r ] && [ -e "$results/$i/rc" ]; then
                state[$i]=d; running=$((running - 1))
                [ "${alone[$i]}" = 1 ] && solo_running=0
            fi
        done
        while [ "$shown" -lt "$n" ] && [ "${state[$shown]:-}" = d ]; do
            report "$shown"; shown=$((shown + 1))
        done
        [ "$shown" -lt "$n" ] && sleep 0.1
    done
    wait
}

# These read one fixture set, $ESSENCE_FIXTURES: they run once more on the shared set. (A test that
# loops over test_shared_fixtures() itself, as test_tokenizer does, is not listed here.)
one_set_tests=" test_forward test_train_step "
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    add "$name" timeout 600 "$t"
    [[ $one_set_tests == *" $name "* ]] || continue
    if [ -n "$ESSENCE_SHARED_FIXTURES" ] && [ -d "$ESSENCE_SHARED_FIXTURES/models" ]; then
        add "$name[shared]" env ESSENCE_FIXTURES="$ESSENCE_SHARED_FIXTURES" timeout 600 "$t"
    else
        skip "$name[shared]: no shared fixtures at ${ESSENCE_SHARED_FIXTURES:-(ESSENCE_SHARED_FIXTURES is empty)}; the in-repo set ran"
    fi
done
# The CUDA backend built for the host (tests/emulate/, docs/engine.md "The CUDA backend on the
# host"): the GPU checks that fit a CPU, against build/emu/libessence-cuda.so. Built where the
# CUDA-capable libessence is (nvcc found). Each check runs twice, in two of the orders CUDA allows:
# the streams lazy (tests/emulate/runtime.cpp: work that misses a wait for another stream reads stale
# data) with each launch's blocks and threads forward (tests/emulate/cuda_host.cpp: from the first),
# then the streams eager (a stream that overwrites what another still reads does so first) with the
# blocks and threads reversed (from the last): a missing barrier shows under one of the two.
if [ -n "$sanitize" ]; then
    skip "emulated-cuda: not under the sanitizers (make sanitize builds no build/emu: its fibers switch stacks by hand, which ASan cannot follow; make test runs it)"
elif compgen -G "$BUILD/emu/test_*" >/dev/null; then
    for t in "$BUILD"/emu/test_*; do
        [ -x "$t" ] || continue
        for order in lazy,forward eager,reverse; do
            add "emulated-cuda[$order]:$(basename "$t")" env ESSENCE_EMU_STREAMS="${order%,*}" ESSENCE_EMU_THREADS="${order#*,}" \
                timeout 900 "$t"
        done
    done
    # one Llama-70B layer over 4 x 4096 tokens, as tests/gpu/run.sh benchmarks it, in the dry mode
    # (launches, products and allocations checked, nothing run): the launch limits at a GPU's sizes,
    # which no tiny model reaches (tests/gpu/dry.sh runs the other benchmarks so)
    if [ -x "$BUILD/gpu/bench_layer" ]; then
        add "emulated-cuda[dry]:bench_layer" env ESSENCE_CUDA_BACKEND="$(cd "$BUILD" && pwd)/emu/libessence-cuda.so" ESSENCE_EMU_DRY=1 \
            timeout 600 bash -c 'out=$(mktemp -d) && "$0" "$out" "$1"; rc=$?; rm -rf "$out"; [ $rc -eq 0 ] && echo "PASS dry_bench_layer"; exit $rc' \
            "$BUILD/gpu/bench_layer" "$ROOT/tests/fixtures/configs/deepseek-r1-distill-llama-70b.config.json"
    else
        skip "emulated-cuda[dry]: no $BUILD/gpu/bench_layer (built with the GPU checks where nvcc is found)"
    fi
else
    skip "emulated-cuda: no $BUILD/emu/test_* (built on x86-64 where nvcc is found, which gives libessence its CUDA loader)"
fi
# essence-run --executor slurm on a one-node Slurm the test starts (root, slurm-wlm and munge;
# otherwise it prints SKIP).
for t in tests/slurm/test_*.sh; do
    [ -f "$t" ] || continue
    add --long "$(basename "$t")" timeout 600 bash "$t"
done
# Alone: kills at moments spread over a run timed just before (test_extract's resume, the fault
# matrix, essence-run's interrupted stages): another test's load between the timing and the kills
# would move them.
timed_tests=" test_extract.py test_faults_kill.py test_run.py "
# Long (a minute or more on 2 cores): started first.
long_tests=" test_align.py test_cuda_emulated.py test_h5_read.py test_threads.py "
for t in tests/python/test_*.py; do
    [ -f "$t" ] || continue
    name=$(basename "$t")
    if [ ! -x "$ESSENCE_PYTHON" ]; then
        skip "$name: no Python venv at $ESSENCE_PYTHON (run make deps)"
    elif [[ $timed_tests == *" $name "* ]]; then
        add --alone "$name" timeout 600 "$ESSENCE_PYTHON" "$t"
    elif [[ $long_tests == *" $name "* ]]; then
        add --long "$name" timeout 600 "$ESSENCE_PYTHON" "$t"
    else
        add "$name" timeout 600 "$ESSENCE_PYTHON" "$t"
    fi
done
# Short fuzz runs (make fuzz runs each for FUZZ_SECONDS): a crash here is a failure.
for f in "$BUILD"/fuzz/fuzz_*; do
    [ -x "$f" ] || continue
    name=$(basename "$f")
    add "$name" bash -c "
        corpus=\$(mktemp -d); seeds=tests/fuzz/corpus/${name#fuzz_}
        [ -d \"\$seeds\" ] && cp -r \"\$seeds\"/. \"\$corpus\"/
        if \"$f\" -max_total_time=${TEST_FUZZ_SECONDS:-10} -rss_limit_mb=2048 -malloc_limit_mb=1048576 -max_len=65536 -artifact_prefix=\"\$TMPDIR/$name-\" \"\$corpus\" >\"\$TMPDIR/$name.log\" 2>&1
        then echo 'PASS $name (${TEST_FUZZ_SECONDS:-10} s)'
        else echo 'FAIL $name: finding, see log:'; tail -n 30 \"\$TMPDIR/$name.log\"; fi"
done

suite_started=$SECONDS
echo "tests/run.sh: ${#labels[@]} tests, $TEST_JOBS at a time"
run_all

if [ ${#skips[@]} -gt 0 ]; then
    echo "skipped:"; printf '  %s\n' "${skips[@]}"
fi
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped ($((SECONDS - suite_started)) s)"
else
    echo "$passed passed, $failed failed ($((SECONDS - suite_started)) s)"
fi
[ "$failed" -eq 0 ]
