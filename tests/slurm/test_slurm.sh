#!/usr/bin/env bash
# essence-run --executor slurm on a real one-node Slurm started here (local_slurm.sh): the demo
# pipeline (pipelines/demo.yaml, extract as a 2-task job array, project and align after it with
# --dependency=afterok) submitted and waited for, its outputs equal to a local run's; then one
# shard made to fail, its log named, the stages after it cancelled, and the next run submitting
# that shard alone and ending with every stage up to date. Skipped without root or Slurm.
#
#   BUILD=build bash tests/slurm/test_slurm.sh     (tests/run.sh runs it)
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${ESSENCE_BUILD:-$ROOT/${BUILD:-build}}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
PY=${ESSENCE_PYTHON:-$ROOT/.venv/bin/python}
RUN=$BUILD/essence-run

skip() { echo "SKIP slurm: $*"; exit 0; }
failures=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }
check() { # name, why-if-false, command...
    local name=$1 why=$2; shift 2
    if "$@"; then pass "$name"; else fail "$name" "$why"; fi
}

for p in essence-run essence-extract essence-project essence-align essence-inspect; do
    [ -x "$BUILD/$p" ] || skip "$BUILD/$p is not built"
done
[ -x "$PY" ] || skip "no Python venv at $PY (make deps)"
command -v zstd >/dev/null || skip "zstd not found (make deps)"

. tests/slurm/local_slurm.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/essence-slurm.XXXXXX") || exit 1
cleanup() { local_slurm_stop; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 143' TERM INT  # so that cleanup runs when tests/run.sh's timeout ends the test
local_slurm_start "$work/slurm"
case $? in
    0) ;;
    2) skip "$LOCAL_SLURM_WHY" ;;
    *) fail slurm_start "$LOCAL_SLURM_WHY"; exit 1 ;;
esac

# The demo's inputs, made once (prepare.sh), hard-linked into two copies: one run locally, one
# on Slurm. Fewer alignment steps than the demo's 150 and shorter generations than its 24 tokens, all
# prompts in one batch: the machinery is under test, not the model (the CPU pads a decoding step's
# products to 256 rows, so the demo's evaluation was half of each run's time).
base=$work/base
mkdir -p "$base"
tar -C pipelines --exclude=demo/work -cf - demo.yaml demo | tar -C "$base" -xf - || skip "cannot copy pipelines/demo"
BUILD=$BUILD sh "$base/demo/prepare.sh" >"$work/prepare.log" 2>&1 || {
    fail slurm_setup "prepare.sh failed: $(tail -n 5 "$work/prepare.log" | tr '\n' ' ')"; exit 1; }
cp -al "$base" "$work/local" && cp -al "$base" "$work/onslurm" || exit 1
sets=(--set align.steps=6 --set align.eval_every=6 --set align.save_every=6 --set eval.max_new_tokens=4 --set eval.batch=32)
local_pipe=$work/local/demo.yaml pipe=$work/onslurm/demo.yaml

"$RUN" "$local_pipe" run "${sets[@]}" >"$work/local.log" 2>&1 || {
    fail slurm_local_reference "the local run failed: $(tail -n 5 "$work/local.log" | tr '\n' ' ')"; exit 1; }

# only_up_to_date PIPELINE: `status` prints nothing but "STAGE up-to-date" lines.
only_up_to_date() {
    local out
    out=$("$RUN" "$1" status "${sets[@]}" 2>&1) || return 1
    [ -n "$out" ] && ! grep -qv ' up-to-date$' <<<"$out"
}

# same_outputs: the HDF5 datasets and attributes of both runs equal (but when they were made, and
# with the runs' folders, which the stored configurations name, set aside), and the aligned
# checkpoints and the evaluations byte for byte.
same_outputs() {
    "$PY" - "$work/local" "$work/onslurm" <<'EOF'
import os, sys
import h5py, hdf5plugin, numpy as np  # noqa: F401  (hdf5plugin: the zstd filter)
roots = sys.argv[1:]
a, b = (os.path.join(r, "demo", "work") for r in roots)
def content(path, root):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset): out[name] = obj[...]
            for k, v in obj.attrs.items():
                if isinstance(v, bytes): v = v.decode()
                if isinstance(v, str): v = v.replace(root, "RUN_FOLDER")
                if k != "created": out[f"{name}@{k}"] = v
        visit("/", f)
        f.visititems(visit)
    return out
bad = []
names = sorted(n for n in os.listdir(a) if n.endswith(".h5"))
if len(names) != 3: bad.append(f"expected 2 teacher shards and student.h5, found {names}")
for n in names:
    x, y = content(os.path.join(a, n), roots[0]), content(os.path.join(b, n), roots[1])
    if x.keys() != y.keys(): bad.append(f"{n}: other datasets or attributes: {sorted(x.keys() ^ y.keys())}")
    for k in x.keys() & y.keys():
        if not np.array_equal(np.asarray(x[k]), np.asarray(y[k])): bad.append(f"{n}: {k} differs")
for n in ("model.safetensors", "config.json", "fingerprint"):
    with open(os.path.join(a, "aligned", n), "rb") as f1, open(os.path.join(b, "aligned", n), "rb") as f2:
        if f1.read() != f2.read(): bad.append(f"aligned/{n} differs")
with open(os.path.join(a, "eval.jsonl"), "rb") as f1, open(os.path.join(b, "eval.jsonl"), "rb") as f2:
    if f1.read() != f2.read(): bad.append("eval.jsonl differs")
print("\n".join(bad[:10]), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
}

# 1. Everything on Slurm: three submissions, a job array for extract, dependencies, --wait.
"$RUN" "$pipe" run --executor slurm --wait "${sets[@]}" >"$work/run1.log" 2>&1
rc=$?
log1=$(cat "$work/run1.log")
check slurm_run_waits "exit status $rc: $(tail -n 8 "$work/run1.log" | tr '\n' ' ')" test "$rc" = 0
check slurm_submitted_all "not every stage submitted: $log1" \
    grep -q 'extract submitted as job [0-9]*' "$work/run1.log"
grep -q 'project submitted as job' "$work/run1.log" && grep -q 'align submitted as job' "$work/run1.log" || fail slurm_submitted_all "project or align not submitted"
extract_job=$(sed -n 's/^extract submitted as job \([0-9]*\)$/\1/p' "$work/run1.log")
project_job=$(sed -n 's/^project submitted as job \([0-9]*\)$/\1/p' "$work/run1.log")
check slurm_job_array "extract.sbatch has no --array=0,1" grep -qx '#SBATCH --array=0,1' "$work/onslurm/slurm-scripts/extract.sbatch"
check slurm_dependencies "project.sbatch does not wait for extract's job $extract_job" \
    grep -qx "#SBATCH --dependency=afterok:$extract_job" "$work/onslurm/slurm-scripts/project.sbatch"
grep -qx "#SBATCH --dependency=afterok:$project_job" "$work/onslurm/slurm-scripts/align.sbatch" || fail slurm_dependencies "align.sbatch does not wait for project's job"
check slurm_logs "no log for both shards" test -s "$work/onslurm/slurm-logs/extract-${extract_job}_0.out" -a -s "$work/onslurm/slurm-logs/extract-${extract_job}_1.out"
check slurm_up_to_date_after_run "status after the run: $("$RUN" "$pipe" status "${sets[@]}" 2>&1 | tr '\n' ' ')" only_up_to_date "$pipe"
check slurm_outputs_equal_local "$(same_outputs 2>&1 | tr '\n' ' ')" same_outputs

# 2. Shard 1 fails once: its output gone and a folder where its OUT.partial must go. student.h5
# gone too, so that project runs after it and must be cancelled when the shard fails.
shard1=$work/onslurm/demo/work/teacher-00001-of-00002.h5
rm -f "$shard1" "$work/onslurm/demo/work/student.h5"
mkdir "$shard1.partial"
"$RUN" "$pipe" run --executor slurm --wait "${sets[@]}" >"$work/run2.log" 2>&1
rc=$?
job2=$(sed -n 's/^extract submitted as job \([0-9]*\)$/\1/p' "$work/run2.log")
check slurm_failed_shard_exit "exit status $rc, expected 1: $(tail -n 5 "$work/run2.log" | tr '\n' ' ')" test "$rc" = 1
check slurm_failed_shard_named "no \"extract shard 1 failed\" line with its log: $(tr '\n' ' ' <"$work/run2.log")" \
    grep -q "^extract shard 1 failed (.*): see $work/onslurm/slurm-logs/extract-${job2}_1.out$" "$work/run2.log"
check slurm_failed_shard_log "the shard's log does not say why" test -s "$work/onslurm/slurm-logs/extract-${job2}_1.out"
check slurm_failed_shard_alone "the failing run submitted other shards" grep -qx '#SBATCH --array=1' "$work/onslurm/slurm-scripts/extract.sbatch"
check slurm_downstream_cancelled "project was not submitted, then cancelled: $(tr '\n' ' ' <"$work/run2.log")" \
    grep -q '^project not run: a stage it reads from failed (job [0-9]* cancelled)$' "$work/run2.log"
check slurm_queue_empty "jobs left in the queue: $(squeue -h -o '%A %j %t %r' | tr '\n' ' ')" test -z "$(squeue -h -o %A)"
rmdir "$shard1.partial"

# 3. The next run submits shard 1 alone and ends with everything up to date.
"$RUN" "$pipe" run --executor slurm --wait "${sets[@]}" >"$work/run3.log" 2>&1
rc=$?
check slurm_rerun_waits "exit status $rc: $(tail -n 8 "$work/run3.log" | tr '\n' ' ')" test "$rc" = 0
check slurm_rerun_shard_alone "extract.sbatch: $(grep -- --array "$work/onslurm/slurm-scripts/extract.sbatch")" \
    grep -qx '#SBATCH --array=1' "$work/onslurm/slurm-scripts/extract.sbatch"
check slurm_rerun_one_task "a task other than shard 1 ran" test "$(grep -c "^1)$\|^0)$" "$work/onslurm/slurm-scripts/extract.sbatch")" = 1
check slurm_rerun_downstream "project did not run after the shard: $(tr '\n' ' ' <"$work/run3.log")" grep -q '^project done (job [0-9]*)$' "$work/run3.log"
check slurm_up_to_date_after_rerun "status: $("$RUN" "$pipe" status "${sets[@]}" 2>&1 | tr '\n' ' ')" only_up_to_date "$pipe"
check slurm_outputs_equal_local_after_rerun "$(same_outputs 2>&1 | tr '\n' ' ')" same_outputs

# 4. Shell syntax in a parameter and in an output's name, from the pipeline file through sbatch's
# script on a real Slurm: the job array runs, the program gets both literally, nothing in them
# runs (a file $work/pwned, or PWNED in the jobs' folder, would say otherwise).
"$PY" - "$work" <<'EOF' || fail slurm_hostile_setup "cannot write hostile.yaml"
import json, os, sys
work = sys.argv[1]
template = f"$(touch {work}/pwned) `touch PWNED`; rm -rf NOPE 'q' \"dq\" \\ $HOME\n#SBATCH --x -- -x {{prompt}}{{response}}"
output = f"work/t $(touch {work}/pwned) `touch PWNED2`; 'q' -x.h5"
with open(os.path.join(work, "onslurm", "hostile.yaml"), "w") as f:
    f.write("stages:\n  extract:\n    program: essence-extract\n    shards: 2\n"
            "    inputs: {model: demo/work/models/teacher, data: demo/work/data/texts.jsonl}\n"
            f"    params: {{layers: \"1\", max_seq: 512, template: {json.dumps(template)}}}\n"
            f"    outputs: {{out: {json.dumps(output)}}}\n"
            "    slurm: {partition: test, time: \"10:00\"}\n")
json.dump({"template": template, "output": output}, open(os.path.join(work, "hostile.json"), "w"))
EOF
"$RUN" "$work/onslurm/hostile.yaml" run --executor slurm --wait >"$work/run4.log" 2>&1
rc=$?
check slurm_hostile_values_run "exit status $rc: $(tail -n 8 "$work/run4.log" | tr '\n' ' ')" test "$rc" = 0
hostile_check=$(cd "$work/onslurm" && "$PY" - "$work" 2>&1 <<'EOF'
import json, os, sys
import h5py, hdf5plugin, yaml  # noqa: F401  (hdf5plugin: the zstd filter)
work = sys.argv[1]
want = json.load(open(os.path.join(work, "hostile.json")))
bad = []
for shard in range(2):
    path = os.path.join(work, "onslurm", want["output"].replace(".h5", f"-0000{shard}-of-00002.h5"))
    if not os.path.exists(path):
        bad.append(f"no {path!r}")
        continue
    with h5py.File(path, "r") as f:
        got = yaml.safe_load(f.attrs["config"])["template"]
    if got != want["template"]:
        bad.append(f"shard {shard}: template {got!r}, not {want['template']!r}")
for made in (os.path.join(work, "pwned"), "PWNED", "PWNED2", os.path.join(os.environ.get("HOME", "/"), "PWNED")):
    if os.path.exists(made):
        bad.append(f"{made} was made")
print(" ".join(bad))
sys.exit(1 if bad else 0)
EOF
)
check slurm_hostile_values_literal "$hostile_check" test -z "$hostile_check"

[ "$failures" = 0 ]
