#!/bin/sh
# Makes the demo's inputs under pipelines/demo/work/: the tiny random teacher (Llama, DeepSeek-V3
# tokenizer) and student (Qwen2, Qwen tokenizer) checkpoints, made by essence-inspect mkmodel, and
# the reasoning corpus. Run by `make demo`; run it again and it does only what is missing or
# older than what it is made from. Every step writes a temporary name and renames it, so a run
# killed halfway leaves nothing that a later run would mistake for done. Same seeds, same bytes:
# re-making a file does not change its fingerprint, so essence-run re-plans nothing.
#
#   BUILD=build pipelines/demo/prepare.sh
set -eu

demo=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$demo/../.." && pwd)
build=${BUILD:-build}
case $build in /*) ;; *) build=$root/$build ;; esac
inspect=$build/essence-inspect
work=$demo/work
[ -x "$inspect" ] || { echo "prepare.sh: $inspect not found: run make first" >&2; exit 1; }
command -v zstd >/dev/null || { echo "prepare.sh: zstd not found: run make deps" >&2; exit 1; }
command -v python3 >/dev/null || { echo "prepare.sh: python3 not found: run make deps" >&2; exit 1; }

# up_to_date OUT SRC...: OUT exists and is newer than every SRC.
up_to_date() {
    out=$1; shift
    [ -e "$out" ] || return 1
    for src in "$@"; do [ -n "$(find "$out" -prune -newer "$src")" ] || return 1; done
}

# model NAME TOKENIZER.zst SEED: config.json + model.safetensors + tokenizer.json in work/models/NAME.
model() {
    name=$1 tokenizer=$2 seed=$3
    dir=$work/models/$name
    mkdir -p "$dir"
    if ! up_to_date "$dir/model.safetensors" "$demo/$name.config.json"; then
        rm -rf "$dir.tmp"
        "$inspect" mkmodel --like "$demo/$name.config.json" --seed "$seed" --out "$dir.tmp"
        mv "$dir.tmp/config.json" "$dir/config.json"
        mv "$dir.tmp/model.safetensors" "$dir/model.safetensors"
        rmdir "$dir.tmp"
    fi
    if ! up_to_date "$dir/tokenizer.json" "$demo/$tokenizer"; then
        # --long: the files were compressed with a long window (zstd -19 --long=27).
        # Through a pipe: zstd would give a file output the source's modification time.
        zstd -dq --long=27 -c "$demo/$tokenizer" > "$dir/tokenizer.json.tmp"
        mv "$dir/tokenizer.json.tmp" "$dir/tokenizer.json"
        echo "$dir/tokenizer.json: from pipelines/demo/$tokenizer"
    fi
}

model teacher deepseek-v3.tokenizer.json.zst 1
model student qwen.tokenizer.json.zst 2

# The teacher's tokenizer_config.json: LlamaTokenizerFast with add_bos_token, as DeepSeek's
# checkpoints ship it, so plain-text samples start with <｜begin▁of▁sentence｜> as in R1.
if ! up_to_date "$work/models/teacher/tokenizer_config.json" "$demo/teacher.tokenizer_config.json"; then
    cp "$demo/teacher.tokenizer_config.json" "$work/models/teacher/tokenizer_config.json.tmp"
    mv "$work/models/teacher/tokenizer_config.json.tmp" "$work/models/teacher/tokenizer_config.json"
fi

mkdir -p "$work/data"
corpus=$work/data/texts.jsonl
if ! up_to_date "$corpus" "$demo/gen_corpus.py"; then
    python3 "$demo/gen_corpus.py" --count 300 --seed 1 --out "$corpus.tmp"
    mv "$corpus.tmp" "$corpus"
    echo "$corpus: $(wc -l < "$corpus") samples"
fi
tasks=$work/data/tasks.jsonl
if ! up_to_date "$tasks" "$demo/gen_corpus.py"; then
    python3 "$demo/gen_corpus.py" --tasks --count 32 --seed 2 --out "$tasks.tmp"
    mv "$tasks.tmp" "$tasks"
    echo "$tasks: $(wc -l < "$tasks") evaluation records"
fi
