#!/usr/bin/env bash
# make sanitize, second half: one run of each program under valgrind memcheck, on the in-repo tiny
# checkpoints: any invalid read or write, use of uninitialised memory, or definite leak fails it.
# OpenBLAS runs its SSE3 (Prescott) kernels here: valgrind computes each FMA instruction in a
# helper function of its own, which made OpenBLAS's AVX2 kernels 15 times slower than these (a
# minute for essence-eval alone), and what is checked is our code, the same with any kernels.
# Prints "PASS name" / "FAIL name: why" per program and ends with a count, as tests/run.sh does.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
FIXTURES=$ROOT/tests/fixtures/models
command -v valgrind >/dev/null || { echo "FAIL valgrind: not installed (make deps)"; exit 1; }
export OPENBLAS_CORETYPE=Prescott
work=$(mktemp -d "${TMPDIR:-/tmp}/essence-valgrind.XXXXXX")
trap 'rm -rf "$work"' EXIT

for i in $(seq 1 12); do
    printf '{"text": "Sample %d: let me think step by step. %d + %d = %d, so the answer is %d."}\n' \
        "$i" "$i" "$((i * 7))" "$((i * 8))" "$((i * 8))"
done > "$work/texts.jsonl"
{ printf '{"id": "p%d", "prompt": "What is %d + %d?", "answer": %d}\n' 1 2 3 5 2 40 2 42 3 7 8 15
  printf '{"id": "t1", "text": "Sample: 3 + 4 = 7."}\n'; } > "$work/tasks.jsonl"
cat > "$work/pipeline.yaml" <<YAML
stages:
  extract:
    program: essence-extract
    inputs: {model: $FIXTURES/tiny-llama3, data: $work/texts.jsonl}
    params: {layers: "2", max_seq: 64}
    outputs: {out: $work/run/teacher.h5}
YAML

passed=0 failed=0
memcheck() { # name, the output it must leave, program, args...
    local name=$1 made=$2; shift 2
    local log=$work/$name.valgrind
    if valgrind --tool=memcheck --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
            --show-leak-kinds=definite --track-origins=yes --trace-children=no --log-file="$log" \
            "$@" >"$work/$name.out" 2>&1 && [ -e "$made" ]; then
        echo "PASS valgrind $name"; passed=$((passed + 1))
    else
        echo "FAIL valgrind $name: exit $?, or no $made (program output, then valgrind's log):"
        tail -n 20 "$work/$name.out"; grep -v '^==[0-9]*== *$' "$log" | tail -n 60
        failed=$((failed + 1))
    fi
}
memcheck essence-extract "$work/teacher.h5" "$BUILD/essence-extract" --model "$FIXTURES/tiny-llama3" --data "$work/texts.jsonl" \
    --layers 2,4 --max-seq 64 --threads 2 --out "$work/teacher.h5"
memcheck essence-project "$work/student.h5" "$BUILD/essence-project" --in "$work/teacher.h5" --student "$FIXTURES/tiny-qwen2" \
    --layer-map 2:1,4:3 --threads 2 --out "$work/student.h5"
memcheck essence-align "$work/aligned/model.safetensors" "$BUILD/essence-align" --model "$FIXTURES/tiny-qwen2" --data "$work/student.h5" \
    --steps 3 --batch-tokens 256 --eval-every 3 --save-every 3 --threads 2 --out "$work/aligned"
memcheck essence-eval "$work/eval.jsonl" "$BUILD/essence-eval" --model "$work/aligned" --data "$work/tasks.jsonl" \
    --max-new-tokens 6 --batch 2 --batch-tokens 8 --threads 2 --out "$work/eval.jsonl"
memcheck essence-inspect "$work/student.h5" "$BUILD/essence-inspect" stats "$work/student.h5" --threads 2
memcheck essence-run "$work/run/teacher.h5" "$BUILD/essence-run" "$work/pipeline.yaml" run
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
