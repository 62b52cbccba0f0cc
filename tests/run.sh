#!/usr/bin/env bash
# Runs every test (C unit tests, CLI scripts, Python interoperability tests, short fuzz runs)
# and ends with one line: "N passed, M failed[, K skipped]". Each test prints lines
# "PASS name", "FAIL name: why" or "SKIP name: why"; a test program that dies without
# saying FAIL counts as one failure.
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

# make sanitize: programs built with ASan + UBSan write every report to a file here, so that a
# report fails the test that ran the program even where the test only looked at the exit code.
sanitizer_reports=
if [ -n "${ESSENCE_SANITIZE:-}" ]; then
    sanitizer_reports=$TMPDIR/sanitizer-reports
    mkdir -p "$sanitizer_reports"
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}log_path=$sanitizer_reports/asan"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}log_path=$sanitizer_reports/ubsan"
fi

passed=0 failed=0 skipped=0
skips=()
run_one() { # label, command...
    local label=$1; shift
    local out rc
    out=$("$@" 2>&1); rc=$?
    local p f s
    p=$(grep -c '^PASS ' <<<"$out"); f=$(grep -c '^FAIL ' <<<"$out"); s=$(grep -c '^SKIP ' <<<"$out")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1; out+=$'\n'"FAIL $label: exited with status $rc"
    fi
    if [ -n "$sanitizer_reports" ] && [ -n "$(ls -A "$sanitizer_reports")" ]; then
        local report
        for report in "$sanitizer_reports"/*; do
            # A process the test killed on purpose (SIGKILL) can leave the file its report was to go
            # to, empty: nothing was reported.
            if [ ! -s "$report" ]; then rm -f "$report"; continue; fi
            f=$((f + 1)); out+=$'\n'"FAIL $label: sanitizer report $(basename "$report"):"$'\n'"$(head -n 40 "$report")"
            mkdir -p "$ROOT/$BUILD/sanitizer-reports" && mv "$report" "$ROOT/$BUILD/sanitizer-reports/$label-$(basename "$report")"
        done
    fi
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    if [ "$f" -gt 0 ]; then
        echo "== $label: $f failed"; echo "$out" | sed 's/^/   /'
    else
        echo "== $label: $p passed${s:+, $s skipped}" | sed 's/, 0 skipped//'
    fi
    while IFS= read -r line; do skips+=("$label: ${line#SKIP }"); done < <(grep '^SKIP ' <<<"$out")
}

# These read one fixture set, $ESSENCE_FIXTURES: they run once more on the shared set. (A test that
# loops over test_shared_fixtures() itself, as test_tokenizer does, is not listed here.)
one_set_tests=" test_forward test_train_step "
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    run_one "$name" timeout 600 "$t"
    [[ $one_set_tests == *" $name "* ]] || continue
    if [ -n "$ESSENCE_SHARED_FIXTURES" ] && [ -d "$ESSENCE_SHARED_FIXTURES/models" ]; then
        run_one "$name[shared]" env ESSENCE_FIXTURES="$ESSENCE_SHARED_FIXTURES" timeout 600 "$t"
    else
        skipped=$((skipped + 1))
        skips+=("$name[shared]: no shared fixtures at ${ESSENCE_SHARED_FIXTURES:-(ESSENCE_SHARED_FIXTURES is empty)}; the in-repo set ran")
    fi
done
# The CUDA backend built for the host (tests/emulate/, docs/engine.md "The CUDA backend on the
# host"): the GPU checks that fit a CPU, against build/emu/libessence-cuda.so. Built where the
# CUDA-capable libessence is (nvcc found). Each check runs under two of the stream orders CUDA
# allows (tests/emulate/runtime.cpp): lazy, where work that misses a wait for another stream reads
# stale data, and eager, where a stream that overwrites what another still reads does so first.
if [ -n "${ESSENCE_SANITIZE:-}" ]; then
    skipped=$((skipped + 1)); skips+=("emulated-cuda: not under the sanitizers (make sanitize builds no build/emu: its fibers switch stacks by hand, which ASan cannot follow; make test runs it)")
elif compgen -G "$BUILD/emu/test_*" >/dev/null; then
    for t in "$BUILD"/emu/test_*; do
        [ -x "$t" ] || continue
        for order in lazy eager; do
            run_one "emulated-cuda[$order]:$(basename "$t")" env ESSENCE_EMU_STREAMS=$order timeout 900 "$t"
        done
    done
else
    skipped=$((skipped + 1)); skips+=("emulated-cuda: no $BUILD/emu/test_* (built on x86-64 where nvcc is found, which gives libessence its CUDA loader)")
fi
for t in tests/cli/test_*.sh; do
    [ -f "$t" ] || continue
    run_one "$(basename "$t")" timeout 600 bash "$t"
done
# essence-run --executor slurm on a one-node Slurm the test starts (root, slurm-wlm and munge;
# otherwise it prints SKIP).
for t in tests/slurm/test_*.sh; do
    [ -f "$t" ] || continue
    run_one "$(basename "$t")" timeout 600 bash "$t"
done
for t in tests/python/test_*.py; do
    [ -f "$t" ] || continue
    if [ -x "$ESSENCE_PYTHON" ]; then
        run_one "$(basename "$t")" timeout 600 "$ESSENCE_PYTHON" "$t"
    else
        skipped=$((skipped + 1)); skips+=("$(basename "$t"): no Python venv at $ESSENCE_PYTHON (run make deps)")
    fi
done
# Short fuzz runs (make fuzz runs each for FUZZ_SECONDS): a crash here is a failure.
for f in "$BUILD"/fuzz/fuzz_*; do
    [ -x "$f" ] || continue
    name=$(basename "$f")
    run_one "$name" bash -c "
        corpus=\$(mktemp -d); seeds=tests/fuzz/corpus/${name#fuzz_}
        [ -d \"\$seeds\" ] && cp -r \"\$seeds\"/. \"\$corpus\"/
        if \"$f\" -max_total_time=${TEST_FUZZ_SECONDS:-10} -rss_limit_mb=2048 -malloc_limit_mb=1048576 -max_len=65536 -artifact_prefix=\"\$TMPDIR/$name-\" \"\$corpus\" >\"\$TMPDIR/$name.log\" 2>&1
        then echo 'PASS $name (${TEST_FUZZ_SECONDS:-10} s)'
        else echo 'FAIL $name: finding, see log:'; tail -n 30 \"\$TMPDIR/$name.log\"; fi"
done

if [ ${#skips[@]} -gt 0 ]; then
    echo "skipped:"; printf '  %s\n' "${skips[@]}"
fi
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
