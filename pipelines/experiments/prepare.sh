#!/bin/sh
# Makes the experiment's inputs under pipelines/experiments/work/: the data (make_data.py: the
# training texts, the held-out problems), the random initial teacher (seed 1) and students (seeds
# 1, 2, 3) from essence-inspect mkmodel, each with its shipped tokenizer. Skips what is already
# made and newer than what it is made from; every file is written under a temporary name and
# renamed, so a killed run leaves nothing that looks done. Same seeds, same bytes.
#
#   BUILD=build pipelines/experiments/prepare.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${BUILD:-build}
case $build in /*) ;; *) build=$root/$build ;; esac
inspect=$build/essence-inspect
work=$here/work
[ -x "$inspect" ] || { echo "prepare.sh: $inspect not found: run make first" >&2; exit 1; }

up_to_date() { # OUT SRC...: OUT exists and is newer than every SRC
    out=$1; shift
    [ -e "$out" ] || return 1
    for src in "$@"; do [ -n "$(find "$out" -prune -newer "$src")" ] || return 1; done
}

if ! up_to_date "$work/data/held_out.jsonl" "$here/make_data.py"; then
    python3 "$here/make_data.py" --out "$work"
fi

# model NAME CONFIG TOKENIZER SEED: a random checkpoint with its tokenizer in work/models/NAME
model() {
    dir=$work/models/$1
    if ! up_to_date "$dir/model.safetensors" "$here/$2" || ! up_to_date "$dir/tokenizer.json" "$here/$3"; then
        rm -rf "$dir.tmp" "$dir"
        mkdir -p "$work/models"
        "$inspect" mkmodel --like "$here/$2" --seed "$4" --out "$dir.tmp" >/dev/null
        cp "$here/$3" "$dir.tmp/tokenizer.json"
        mv "$dir.tmp" "$dir"
        echo "$dir: random $(sed -n 's/.*"model_type": "\([a-z0-9]*\)".*/\1/p' "$here/$2") weights, seed $4"
    fi
}
model teacher-init teacher.config.json teacher.tokenizer.json 1
for seed in 1 2 3; do
    model "student-init-$seed" student.config.json student.tokenizer.json "$seed"
done
