#!/usr/bin/env bash
# make soak (not in CI): a long run. A synthetic corpus goes through essence-extract,
# essence-project and essence-align on the in-repo tiny checkpoints at two sizes, SOAK_TOKENS / 10
# and SOAK_TOKENS (default 1 M teacher tokens), and each stage's peak resident memory is reported
# for both. Memory must stay bounded: the large run's peak may exceed the small run's by at most
# SOAK_RSS_SLACK (default 1.25x + 32 MiB). The outputs are checked too: every sample present,
# no NaN (essence-inspect stats), the final model written.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
TOKENS=${SOAK_TOKENS:-1000000}
THREADS=${SOAK_THREADS:-0}
FIXTURES=$ROOT/tests/fixtures/models
work=${SOAK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/essence-soak.XXXXXX")}
[ -n "${SOAK_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
echo "soak: $TOKENS teacher tokens at full size; work in $work"

# corpus FILE TOKENS: reasoning-like samples, varied in length (about 60..1100 tokens each with the
# tiny Llama's 1024-entry vocabulary), until about TOKENS tokens (estimated at 3 bytes a token).
corpus() {
    python3 - "$1" "$2" <<'PY'
import json, random, sys
path, tokens = sys.argv[1], int(sys.argv[2])
rng = random.Random(1234)
words = ("let me think step by step so the answer is therefore we need first then check "
         "because wait actually compute sum product prime number equation solve value").split()
budget, n = tokens * 3, 0
with open(path, "w") as out:
    while budget > 0:
        k = rng.randint(40, 450)
        text = " ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 99999)) for _ in range(k))
        out.write(json.dumps({"text": f"Problem {n}: {text}."}) + "\n")
        budget -= len(text); n += 1
PY
}

# peak NAME LOG, program args...: runs it under GNU time, prints and records its peak RSS (KiB).
declare -A peak_kib
stage() {
    local key=$1; shift
    local log=$work/$key.log
    /usr/bin/time -f '%M %e' -o "$work/$key.time" "$@" >"$log" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAIL soak $key: exit status $rc"; tail -n 20 "$log"; exit 1
    fi
    read -r kib secs < "$work/$key.time"
    peak_kib[$key]=$kib
    printf '  %-22s peak RSS %7.1f MiB  %7.1f s\n' "$key" "$(awk "BEGIN{print $kib/1024}")" "$secs"
}

run_size() { # label tokens
    local label=$1 tokens=$2 dir=$work/$1
    mkdir -p "$dir"
    corpus "$dir/texts.jsonl" "$tokens"
    echo "$label: $(wc -l < "$dir/texts.jsonl") samples"
    stage "extract.$label" "$BUILD/essence-extract" --model "$FIXTURES/tiny-llama3" --data "$dir/texts.jsonl" \
        --layers 2,4 --max-seq 4096 --threads "$THREADS" --out "$dir/teacher.h5"
    stage "project.$label" "$BUILD/essence-project" --in "$dir/teacher.h5" --student "$FIXTURES/tiny-qwen2" \
        --layer-map 2:1,4:3 --threads "$THREADS" --out "$dir/student.h5"
    # One pass over the data: steps = student tokens / batch tokens.
    local student_tokens steps
    student_tokens=$("$BUILD/essence-inspect" "$dir/student.h5" | awk '/^tokens/ {print $2; exit}')
    steps=$(( ${student_tokens:-0} / 8192 + 1 ))
    stage "align.$label" "$BUILD/essence-align" --model "$FIXTURES/tiny-qwen2" --data "$dir/student.h5" \
        --steps "$steps" --batch-tokens 8192 --lr 1e-3 --eval-every "$steps" --save-every "$steps" \
        --threads "$THREADS" --out "$dir/aligned"
    echo "  teacher tokens: $("$BUILD/essence-inspect" "$dir/teacher.h5" | awk '/^tokens/ {print $2; exit}'), student tokens: $student_tokens, align steps: $steps"
    [ -f "$dir/aligned/model.safetensors" ] || { echo "FAIL soak $label: no final model"; exit 1; }
    if "$BUILD/essence-inspect" stats "$dir/student.h5" | grep -Eq 'nan[^ ]* *[1-9]|inf[^ ]* *[1-9]'; then
        echo "FAIL soak $label: NaN/Inf in student.h5"; exit 1
    fi
}

run_size small $((TOKENS / 10))
run_size full "$TOKENS"
status=0
for stage_name in extract project align; do
    small=${peak_kib[$stage_name.small]} full=${peak_kib[$stage_name.full]}
    limit=$(( small * 125 / 100 + 32 * 1024 ))
    ratio=$(awk "BEGIN{print $full/$small}")
    if [ "$full" -le "$limit" ]; then
        printf 'PASS soak %s: peak RSS %.1f -> %.1f MiB as the corpus grows x10 (x%.2f)\n' "$stage_name" "$(awk "BEGIN{print $small/1024}")" "$(awk "BEGIN{print $full/1024}")" "$ratio"
    else
        printf 'FAIL soak %s: peak RSS %.1f -> %.1f MiB as the corpus grows x10 (x%.2f; limit %.1f MiB)\n' "$stage_name" "$(awk "BEGIN{print $small/1024}")" "$(awk "BEGIN{print $full/1024}")" "$ratio" "$(awk "BEGIN{print $limit/1024}")"
        status=1
    fi
done
exit $status
