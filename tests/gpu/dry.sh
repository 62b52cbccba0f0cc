#!/usr/bin/env bash
# The GPU benchmarks at their real sizes, here, on the CUDA backend built for the host in its dry
# mode (ESSENCE_EMU_DRY=1, tests/emulate/emulation.h): every launch configuration, allocation and
# cuBLASLt product shape that tests/gpu/run.sh's bench_layer (one Llama-70B layer, 4 x 4096 tokens),
# bench_stream (8 layers streamed under --max-memory 16G) and bench_train (Qwen2-1.5B, 4 x 2048
# tokens a step: latent + CE, with --recompute, latent only) and the end-to-end essence-extract (2
# layers of the 70B shape, 32 x 4096 tokens) make is checked as the emulation
# checks them (grid and block limits, shared memory, alignment, device memory), but no kernel or
# product runs: their timings and values are garbage; their device memory counts are the
# allocations' own (what the engine would hold on a GPU). bench_project is left out: its host
# logic reads the kernels' results (the non-finite row check). PASS per benchmark when it ran to
# its end without a fault. Needs the real models' configs (tests/fixtures/configs), ~14 GB of memory and ~4 GB of disk
# for the checkpoints; about 5 minutes on 2 cores.
#   tests/gpu/dry.sh [OUT_DIR]   (default gpu-dry/: each benchmark's log and JSON)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-gpu-dry}
BACKEND=$PWD/build/emu/libessence-cuda.so
configs=tests/fixtures/configs
if [ ! -f "$BACKEND" ] || [ ! -x build/gpu/bench_train ]; then
    echo "FAIL dry: no $BACKEND or build/gpu/bench_* (make, where nvcc is found)"; exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT"
failed=0
run() { # name, then the command
    local name=$1; shift
    ESSENCE_CUDA_BACKEND=$BACKEND ESSENCE_EMU_DRY=1 timeout 1200 "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && ! grep -q "^FAIL\|emulated kernel\|emulated CUDA" "$OUT/$name.log"; then
        echo "PASS dry_$name"
    else
        echo "FAIL dry_$name: rc $rc: $(grep -m3 "FAIL\|emulated\|error" "$OUT/$name.log" | tr '\n' ' ')"
        failed=$((failed + 1))
    fi
    grep "held at most\|peak\|need" "$OUT/$name.log" | sed 's/^/  /'
}
run bench_layer build/gpu/bench_layer "$OUT" "$configs/deepseek-r1-distill-llama-70b.config.json"
run bench_stream build/gpu/bench_stream "$OUT" "$configs/deepseek-r1-distill-llama-70b.config.json"
if build/essence-inspect mkmodel --like "$configs/deepseek-r1-distill-qwen-1.5b.config.json" --out "$OUT/qwen1.5b" \
    >"$OUT/mkmodel.log" 2>&1; then
    run bench_train build/gpu/bench_train "$OUT" "$OUT/qwen1.5b"
else
    echo "FAIL dry_bench_train: mkmodel failed: $(tail -2 "$OUT/mkmodel.log")"; failed=$((failed + 1))
fi
rm -rf "$OUT/qwen1.5b"
# run.sh's extract end to end: 2 layers of the 70B shape (a 1024-token vocabulary), 32 x 4096 tokens
python3 tests/gpu/e2e_inputs.py "$configs/deepseek-r1-distill-llama-70b.config.json" "$OUT"
if build/essence-inspect mkmodel --like "$OUT/like.json" --layers 2 --out "$OUT/e2e" >"$OUT/mkmodel_e2e.log" 2>&1; then
    run extract_e2e build/essence-extract --model "$OUT/e2e" --data "$OUT/ids.jsonl" --layers 1,2 --batch-tokens 16384 \
        --max-seq 4096 --out "$OUT/teacher.h5" --device cuda
else
    echo "FAIL dry_extract_e2e: mkmodel failed: $(tail -2 "$OUT/mkmodel_e2e.log")"; failed=$((failed + 1))
fi
rm -rf "$OUT/e2e" "$OUT/teacher.h5"
exit $((failed > 0))
