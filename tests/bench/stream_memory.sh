#!/usr/bin/env bash
# The layer stream against a model larger than its budget (docs/engine.md "Weights by layer"):
# essence-extract on a 3-layer random checkpoint of the Llama-70B shape (essence-inspect mkmodel,
# about 9.3 GB of bf16) over a few short samples, once with --max-memory 8G and once without a
# limit. Prints the peak anonymous resident memory (RssAnon, polled from /proc: the mapped
# checkpoint is page cache, not counted) and the time of each run; fails when the limited run's
# peak passes 8.5 GiB or its latents are not byte-identical to the unlimited run's.
#
#   BUILD=build tests/bench/stream_memory.sh      (make bench runs it; needs ~12 GB of disk, 16 GB of RAM)
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
WORK=${ESSENCE_STREAM_WORK:-${TMPDIR:-/tmp}/essence-stream-70b}
need_disk_kb=$((12 * 1024 * 1024)) need_mem_kb=$((16 * 1024 * 1024))
mkdir -p "$WORK"
free_disk=$(df -Pk "$WORK" | awk 'NR == 2 {print $4}')
free_mem=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ ! -f "$WORK/model/model.safetensors.index.json" ] && [ ! -f "$WORK/model/model.safetensors" ] && [ "$free_disk" -lt "$need_disk_kb" ]; then
    echo "stream_memory: skipped: $WORK has $((free_disk / 1024 / 1024)) GB free, the checkpoint needs about 10"; exit 0
fi
if [ "$free_mem" -lt "$need_mem_kb" ]; then
    echo "stream_memory: skipped: $((free_mem / 1024 / 1024)) GB available, the unlimited run needs about 14"; exit 0
fi
if [ ! -f "$WORK/model/config.json.done" ]; then
    rm -rf "$WORK/model"
    "$BUILD"/essence-inspect mkmodel --like tests/bench/configs/deepseek-r1-distill-llama-70b.json --layers 3 --seed 1 --out "$WORK/model" >/dev/null
    touch "$WORK/model/config.json.done"
fi
# a few short samples of token ids (no tokenizer needed)
awk 'BEGIN { srand(7); for (s = 0; s < 6; s++) { printf "{\"id\": \"s%d\", \"ids\": [", s;
      n = 20 + int(rand() * 40); for (i = 0; i < n; i++) printf "%s%d", i ? ", " : "", int(rand() * 128256); print "]}" } }' \
    > "$WORK/ids.jsonl"

# run NAME ARGS...: essence-extract, its peak RssAnon (kB) polled every 20 ms, and its time
run() {
    local name=$1; shift
    local start end pid peak=0 kb
    start=$(date +%s%N)
    "$BUILD"/essence-extract --model "$WORK/model" --data "$WORK/ids.jsonl" --layers 1,2,3 --out "$WORK/$name.h5" "$@" \
        2> "$WORK/$name.log" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        kb=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ -n "$kb" ] && [ "$kb" -gt "$peak" ] && peak=$kb
        sleep 0.02
    done
    wait "$pid" || { echo "stream_memory: essence-extract $name failed:"; cat "$WORK/$name.log"; exit 1; }
    end=$(date +%s%N)
    printf '%-10s peak RssAnon %6.2f GiB  %6.1f s   %s\n' "$name" "$(awk "BEGIN {print $peak / 1048576}")" \
        "$(awk "BEGIN {print ($end - $start) / 1e9}")" "$(grep -E 'pass through|held at most' "$WORK/$name.log" | sed 's/^essence-extract: //' | tr '\n' ' ')"
    eval "peak_$name=$peak"
}

rm -f "$WORK"/*.h5
echo "essence-extract, 3 layers of the Llama-70B shape ($(du -sh "$WORK/model" | cut -f1) of bf16), $(wc -l < "$WORK/ids.jsonl") samples; OpenBLAS $("$BUILD"/bench/bench_forward --blas-core) kernels"
run limited --max-memory 8G
run unlimited
limit_kb=$((85 * 1024 * 1024 / 10)) # 8.5 GiB
status=0
if [ "$peak_limited" -gt "$limit_kb" ]; then echo "FAIL: the limited run's peak RssAnon passes 8.5 GiB"; status=1; fi
if "$BUILD"/essence-inspect compare "$WORK/limited.h5" "$WORK/unlimited.h5" > "$WORK/compare.txt"; then
    echo "latents: byte-identical ($(tail -n 1 "$WORK/compare.txt" | sed 's/^summary: //'))"
else
    echo "FAIL: the latents differ:"; cat "$WORK/compare.txt"; status=1
fi
exit $status
