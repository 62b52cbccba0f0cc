#!/usr/bin/env bash
# The one prepared GPU script: run on the GPU machine from the project root, in one go, after
# tests/gpu/prepare.sh filled gpu-carry/ here (carry = [gpu-carry]). Results go to $OUT (or gpu-out/)
# as three files, since the device hands back at most 8 from $OUT: checks.txt (every PASS/FAIL/SKIP
# line and the parts' times, written as they come), summary.md (the table, at the end) and
# results.tar.xz (the benchmarks' JSON, the baselines' perf.json / offload.json, every log and the
# checks' whole output; packed again as each part starts, so a run cut short still hands back what it
# had). The runs' own files (HDF5, checkpoints, models of several GB) stay in $WORK (gpu-work/).
#   1. the per-op harness: every CUDA op against the CPU and the double reference (test_ops),
#      the bf16 conversions (test_convert), golden parity of the tiny models with resident and
#      streamed layers (test_forward_cuda);
#   2. the programs: essence-extract and essence-project with --device cuda against --device cpu,
#      compared with essence-inspect compare; essence-eval against the goldens; essence-align's
#      losses on cuda against cpu, checkpoints continued on the other device, and two ranks
#      against one with twice the batch (with and without --zero1);
#   3. the benchmarks beside Hugging Face + PyTorch on the same GPU in the same call: one
#      Llama-70B layer, 8 layers streamed under --max-memory 16G, the projection, Qwen2-1.5B training
#      steps, extract end to end.
# The offload baseline needs ~3 minutes to set up its host weights: it starts first and its set-up
# overlaps the checks (which time nothing); every benchmark runs after it, one at a time.
#
# SECTIONS (default "checks programs baselines bench e2e") picks parts for a rerun; BUDGET (seconds,
# default 540, under the device's 600 s per call) stops starting new parts once spent, saying so,
# and the summary is written whatever ran.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
WORK=${WORK:-gpu-work}
RAW=$WORK/raw # what results.tar.xz holds
CARRY=${CARRY:-gpu-carry}
BIN=$CARRY/bin
rm -rf "$WORK" "$OUT/checks.txt" "$OUT/summary.md" "$OUT/results.tar.xz" && mkdir -p "$OUT" "$RAW"
START=$(date +%s)
SECTIONS=${SECTIONS:-checks programs baselines bench e2e}
BUDGET=${BUDGET:-540}
wanted() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
in_time() { # name: whether there is time left to start it (else a SKIP line)
    if [ $(( $(date +%s) - START )) -lt "$BUDGET" ]; then return 0; fi
    echo "SKIP $1: the run's budget of $BUDGET s is spent" | tee -a "$OUT/checks.txt"; return 1
}
pack() { # results.tar.xz from $RAW as it is now (replaced whole, so never half-written)
    tar -C "$WORK" -cJf "$OUT/results.tar.xz.part" raw && mv "$OUT/results.tar.xz.part" "$OUT/results.tar.xz"
}
stamp() { pack; echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/checks.txt"; }
if [ ! -x "$BIN/essence-extract" ]; then
    echo "FAIL run.sh: no $BIN/essence-extract (run tests/gpu/prepare.sh on the build machine first)" | tee -a "$OUT/checks.txt"
    exit 1
fi
if [ -f "$CARRY/libs.tar.xz" ] && [ ! -d "$CARRY/libs" ]; then tar xJf "$CARRY/libs.tar.xz" -C "$CARRY"; fi
if [ -f "$CARRY/ompi.tar.xz" ] && [ ! -d "$CARRY/ompi" ]; then tar xJf "$CARRY/ompi.tar.xz" -C "$CARRY"; fi
# the checks linked with libessence-cuda.so find it beside them (their rpath is the build tree's)
export LD_LIBRARY_PATH=$PWD/$CARRY/libs:$PWD/$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RAW/device.txt"
date -u +%Y-%m-%d >>"$RAW/device.txt"

offload=
if wanted baselines; then
    timeout $(( BUDGET - 120 > 60 ? BUDGET - 120 : 60 )) python3 "$CARRY/gpu_offload_baselines.py" "$RAW" >"$RAW/offload.log" 2>&1 &
    offload=$!
fi

# The end-to-end run's checkpoint (2 layers of the 70B shape, a 1024-token vocabulary, ~3.4 GB of
# random weights) is written in the background meanwhile: it is host work.
W=$WORK/work && mkdir -p "$W/e2e"
python3 tests/gpu/e2e_inputs.py "$CARRY/llama70b/config.json" "$W/e2e"
mkmodel=
if wanted e2e; then
    "$BIN/essence-inspect" mkmodel --like "$W/e2e/like.json" --layers 2 --out "$W/e2e/model" >"$W/e2e/mkmodel.log" 2>&1 &
    mkmodel=$!
fi
# the student's real shape (1.78 B parameters, 3.6 GB in bf16) for the training benchmark
mkqwen=
if wanted bench; then
    "$BIN/essence-inspect" mkmodel --like "$CARRY/qwen1.5b/config.json" --out "$W/qwen1.5b" >"$W/mkqwen.log" 2>&1 &
    mkqwen=$!
fi

passed=0 failed=0
count() { # counts a check program's PASS/FAIL lines; a crash without FAIL lines is one failure
    local out=$1 rc=$2 f
    passed=$((passed + $(grep -c '^PASS ' <<<"$out"))); f=$(grep -c '^FAIL ' <<<"$out")
    [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    failed=$((failed + f))
}
check() { # name, command...: one line PASS/FAIL
    local name=$1; shift
    local out rc; out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then echo "PASS $name"; else echo "FAIL $name: $(tail -3 <<<"$out" | tr '\n' ' ')"; fi | tee -a "$OUT/checks.txt"
    [ $rc -eq 0 ] && passed=$((passed + 1)) || failed=$((failed + 1))
}

# ---- 1. the op harness and the golden parity -------------------------------------------------------
wanted checks && for t in "$BIN"/test_*; do
    [ -x "$t" ] || continue
    stamp "$(basename "$t")"
    out=$(ESSENCE_FIXTURES=tests/fixtures timeout 300 "$t" 2>&1); rc=$?
    echo "$out" >>"$RAW/checks_output.txt"
    lines=$(grep -E '^(PASS|FAIL|SKIP)|worst' <<<"$out")
    echo "$lines" >>"$OUT/checks.txt"
    head -80 <<<"$lines"
    count "$out" "$rc"
done

# ---- 2. the programs on cuda against cpu -----------------------------------------------------------
if wanted programs && in_time programs; then
stamp "programs"
python3 - "$W/data.jsonl" <<'EOF'
import json, random, sys
random.seed(7)
words = "the of reasoning step first then because therefore each layer token model 12 345 = + ( ) ; : é 数 🙂".split()
with open(sys.argv[1], "w") as f:
    for i in range(48):
        n = random.randint(1, 300)
        f.write(json.dumps({"id": f"s{i}", "text": " ".join(random.choice(words) for _ in range(n))}) + "\n")
EOF
T=tests/fixtures/models
for dev in cpu cuda; do
    check "extract_$dev" "$BIN/essence-extract" --model $T/tiny-llama3 --data "$W/data.jsonl" --layers 0,2,4 --batch-tokens 2048 \
        --out "$W/teacher_$dev.h5" --device $dev
done
check extract_cuda_vs_cpu "$BIN/essence-inspect" compare "$W/teacher_cuda.h5" "$W/teacher_cpu.h5" --tol 2e-2
for dev in cpu cuda; do
    for precision in fp32 bf16; do
        check "project_${dev}_$precision" "$BIN/essence-project" --in "$W/teacher_cpu.h5" --student $T/tiny-qwen2 --layer-map 2:1,4:3 \
            --precision $precision --out "$W/student_${dev}_$precision.h5" --device $dev
    done
done
check project_cuda_vs_cpu_fp32 "$BIN/essence-inspect" compare "$W/student_cuda_fp32.h5" "$W/student_cpu_fp32.h5" --tol 1e-2
check project_cuda_vs_cpu_bf16 "$BIN/essence-inspect" compare "$W/student_cuda_bf16.h5" "$W/student_cpu_bf16.h5" --tol 2e-2
# essence-eval's greedy generation on cuda (bf16 weights) against transformers' fp32 goldens: the
# tokens agree until a step whose top two logits are closer than bf16's rounding; the check asks
# for the first token everywhere and a mean agreeing prefix of at least 8 of 32 tokens
for model in tiny-llama3 tiny-qwen2; do
    python3 - "$T/$model/golden_generate.json" "$W/eval_$model.jsonl" "$W/eval_$model.template" <<'EOF'
import json, sys
g = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    for p in g["prompts"]:
        f.write(json.dumps({"id": p["id"], "prompt": p["prompt"], "answer": 0}) + "\n")
open(sys.argv[3], "w").write(g["template"])
EOF
    check "eval_cuda_$model" "$BIN/essence-eval" --model $T/$model --data "$W/eval_$model.jsonl" --out "$W/eval_${model}_cuda.out.jsonl" \
        --template "$(cat "$W/eval_$model.template")" --max-new-tokens 32 --batch 4 --batch-tokens 16 --device cuda
    check "eval_cuda_vs_golden_$model" python3 "$CARRY/eval_vs_golden.py" "$T/$model/golden_generate.json" "$W/eval_${model}_cuda.out.jsonl"
done
# essence-align on cuda against cpu: 20 steps of tiny-qwen2 on the CPU's student.h5, CE and latent
# terms, losses within 2% step by step; then each run's step-10 checkpoint continued on the other
# device (the state is fp32 on both), its steps 11..20 within 2% of the uninterrupted run's
for dev in cpu cuda; do
    check "align_$dev" "$BIN/essence-align" --model $T/tiny-qwen2 --data "$W/student_cpu_fp32.h5" --out "$W/align_$dev" \
        --steps 20 --save-every 10 --keep-checkpoints 2 --ce-weight 0.5 --eval-every 10 --device $dev
done
check align_cuda_vs_cpu_losses python3 "$CARRY/align_parity.py" "$W/align_cuda/metrics.jsonl" "$W/align_cpu/metrics.jsonl" 0.02
for pair in cuda:cpu cpu:cuda; do
    from=${pair%%:*} to=${pair##*:}
    rm -rf "$W/resume_$from" && cp -r "$W/align_$from" "$W/resume_$from" 2>/dev/null && rm -rf "$W/resume_$from/checkpoint-20"
    # it must continue the step-10 checkpoint, not start afresh
    check "align_resume_${from}_on_$to" bash -c 'set -o pipefail; [ -d "$1/checkpoint-10" ] || { echo "no step-10 checkpoint in $1"; exit 1; }
        "${@:3}" 2>&1 | tee "$1.log" && grep -q "resumed from .*checkpoint-10" "$1.log"' _ "$W/resume_$from" - \
        "$BIN/essence-align" --model $T/tiny-qwen2 --data "$W/student_cpu_fp32.h5" \
        --out "$W/resume_$from" --steps 20 --save-every 10 --keep-checkpoints 2 --ce-weight 0.5 --eval-every 10 --device $to --resume
    check "align_resume_${from}_on_${to}_losses" python3 "$CARRY/align_parity.py" "$W/resume_$from/metrics.jsonl" \
        "$W/align_$to/metrics.jsonl" 0.02 11
done
# data parallel: two ranks with batch b against one with 2b, 10 steps: the weights within bf16
# rounding of what the steps changed (ranks_parity.py), and --zero1 the same bits as without. Two
# GPUs or more: NCCL, one rank per GPU, its id shared through the file in --out (Slurm's variables,
# no MPI); one GPU: the carried Open MPI's launcher, and the ranks, sharing the GPU, sum through MPI
# on the host (NCCL takes one rank per GPU)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
ranks_flags=(--model $T/tiny-qwen2 --data "$W/student_cpu_fp32.h5" --steps 10 --save-every 0 --eval-every 0 --ce-weight 0.5)
two_ranks() { # OUT_DIR EXTRA...: essence-align as two ranks with half the batch
    local out=$1; shift
    if [ "$gpus" -ge 2 ]; then
        local pids=() rc=0 r
        for r in 0 1; do
            LD_LIBRARY_PATH=$LD_LIBRARY_PATH${nccl_lib:+:$nccl_lib} SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_JOB_ID=gpu$$ \
                SLURM_STEP_ID=$(basename "$out") "$BIN/essence-align" "${ranks_flags[@]}" --batch-tokens 2048 --out "$out" \
                --device cuda:$r "$@" >"$out.rank$r.log" 2>&1 &
            pids+=($!)
        done
        for r in "${pids[@]}"; do wait "$r" || rc=1; done
        cat "$out".rank*.log; return $rc
    fi
    local ompi=$PWD/$CARRY/ompi
    [ -x "$ompi/bin/orterun" ] || { echo "no $CARRY/ompi (tests/gpu/prepare.sh carries Open MPI for one GPU)"; return 1; }
    OPAL_PREFIX=$ompi PMIX_INSTALL_PREFIX=$ompi/pmix PMIX_MCA_mca_base_component_path=$ompi/pmix/lib/pmix \
        LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$ompi/pmix/lib OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
        "$ompi/bin/orterun" --oversubscribe -np 2 "$BIN/essence-align" "${ranks_flags[@]}" --batch-tokens 2048 --out "$out" \
        --device cuda "$@"
}
stamp "two ranks against one ($gpus GPU(s))"
check align_cuda_one_rank_2b "$BIN/essence-align" "${ranks_flags[@]}" --batch-tokens 4096 --out "$W/ranks_1" --device cuda
check align_cuda_two_ranks two_ranks "$W/ranks_2"
check align_cuda_two_ranks_zero1 two_ranks "$W/ranks_2_zero1" --zero1
check align_cuda_two_ranks_vs_one python3 "$CARRY/ranks_parity.py" "$W/ranks_2/checkpoint-10" "$W/ranks_1/checkpoint-10" $T/tiny-qwen2
check align_cuda_zero1_same_bits cmp "$W/ranks_2/checkpoint-10/essence-state/state.safetensors" \
    "$W/ranks_2_zero1/checkpoint-10/essence-state/state.safetensors"
"$BIN/essence-inspect" compare "$W/teacher_cuda.h5" "$W/teacher_cpu.h5" >"$RAW/compare_teacher.txt" 2>&1
"$BIN/essence-inspect" compare "$W/student_cuda_fp32.h5" "$W/student_cpu_fp32.h5" >"$RAW/compare_student.txt" 2>&1
fi

# ---- 3. benchmarks, each after the other ------------------------------------------------------------
if [ -n "$offload" ]; then
    stamp "waiting for the offload baseline's set-up and run"
    wait $offload; echo "offload baseline exit $?" >>"$OUT/checks.txt"
fi
if wanted baselines && in_time gpu_baselines; then
    stamp "gpu_baselines.py"
    timeout 300 python3 "$CARRY/gpu_baselines.py" "$RAW" >"$RAW/baselines.log" 2>&1; echo "baselines exit $?" >>"$OUT/checks.txt"
fi
wanted bench && for b in bench_layer bench_stream bench_project; do
    in_time "$b" || continue
    stamp "$b"
    config=$CARRY/llama70b/config.json; [ $b = bench_project ] && config=
    out=$(timeout 300 "$BIN/$b" "$RAW" $config 2>&1); rc=$?
    echo "$out" | tee -a "$RAW/bench.txt"
    count "$out" "$rc" # bench_project's precision lines are checks; the others print figures only
done
# training: the Qwen2-1.5B shape, 4 x 2048 tokens a step, beside the baseline's qwen2_1p5b_train
if wanted bench && [ -n "$mkqwen" ] && in_time bench_train; then
    stamp "bench_train"
    wait $mkqwen
    out=$(timeout 300 "$BIN/bench_train" "$RAW" "$W/qwen1.5b" 2>&1); rc=$?
    echo "$out" | tee -a "$RAW/bench.txt"
    count "$out" "$rc"
fi
rm -rf "$W/qwen1.5b"
[ -n "$mkqwen" ] && kill $mkqwen 2>/dev/null
# extract end to end on that checkpoint: where the time goes, and whether the writer keeps up
if [ -n "$mkmodel" ] && in_time extract_end_to_end; then
stamp "extract end to end"
wait $mkmodel
TIMED=; [ -x /usr/bin/time ] && TIMED="/usr/bin/time -v"
$TIMED "$BIN/essence-extract" --model "$W/e2e/model" --data "$W/e2e/ids.jsonl" --layers 1,2 --batch-tokens 16384 \
    --max-seq 4096 --out "$W/e2e/teacher.h5" --device cuda >"$RAW/extract_e2e.log" 2>&1
grep -E "time:|tokens/s|wrote|device:|Elapsed|Maximum resident" "$RAW/extract_e2e.log" | tee -a "$RAW/bench.txt"
rm -rf "$W/e2e/model"
fi
[ -n "$mkmodel" ] && kill $mkmodel 2>/dev/null

stamp "summary"
python3 tests/gpu/summary.py "$RAW" | tee "$OUT/summary.md"
echo "$passed passed, $failed failed" | tee -a "$OUT/checks.txt"
cp "$OUT/summary.md" "$OUT/checks.txt" "$RAW/" && pack
[ "$failed" -eq 0 ]
