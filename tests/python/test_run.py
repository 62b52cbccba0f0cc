"""essence-run with the local executor on a small three-stage pipeline (the in-repo fixtures'
tiny-llama3 teacher and tiny-qwen2 student): status and run, fingerprints that follow content and parameters rather than
modification times, a re-run that produces the same result stopping there, --set, --force,
--dry-run, and bad pipeline files reported with FILE:LINE."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
RUN = os.path.join(BUILD, "essence-run")

PIPELINE = """\
# a test pipeline
stages:
  extract:
    program: essence-extract
    shards: 2
    inputs:
      model: models/teacher
      data: data/texts.jsonl
    params:
      layers: [1, 2]
      batch_tokens: 256
    outputs:
      out: work/teacher.h5
  project:
    program: essence-project
    inputs:
      in: extract.out
      student: models/student
    params: {layer_map: "2:1", sigma: 1.0}
    outputs: {out: work/student.h5}
  align:
    program: essence-align
    inputs: {model: models/student, data: project.out}
    params: {steps: 4, batch_tokens: 512, eval_fraction: 0.1, eval_every: 2, save_every: 0}
    outputs: {out: work/aligned}
"""


def essence_run(folder, *args):
    return subprocess.run([RUN, os.path.join(folder, "pipeline.yaml"), *args], capture_output=True, text=True)


def status(folder, *args):
    result = essence_run(folder, "status", *args)
    return dict(line.split(" ", 1) for line in result.stdout.splitlines()) if result.returncode == 0 else {"error": result.stderr}


def setup(tmp):
    folder = os.path.join(tmp, "pipe")
    os.makedirs(os.path.join(folder, "models", "teacher"))
    os.makedirs(os.path.join(folder, "models", "student"))
    os.makedirs(os.path.join(folder, "data"))
    # copies, not links: the test touches and changes its inputs
    fixtures = repo_fixtures()
    for source, role in ((fixtures.teacher, "teacher"), (fixtures.student, "student")):
        for name in os.listdir(source):
            if not name.startswith("golden"):
                shutil.copy(os.path.join(source, name), os.path.join(folder, "models", role))
    with open(os.path.join(folder, "data", "texts.jsonl"), "w") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"s{i}", "prompt": f"What is {i} + {i}?", "response": f"<think>{i} plus {i} is {2 * i}</think> {2 * i}"}) + "\n")
    with open(os.path.join(folder, "pipeline.yaml"), "w") as f:
        f.write(PIPELINE)
    return folder


def test_runs(folder):
    first = status(folder)
    report("status_before_any_run", all(v.startswith("will-run") for v in first.values()) and len(first) == 3, str(first))
    dry = essence_run(folder, "run", "--dry-run")
    report("dry_run_prints_commands_runs_nothing", dry.returncode == 0 and "--shard 1/2" in dry.stdout
           and not os.path.exists(os.path.join(folder, "work")), dry.stdout[-500:] + dry.stderr[-500:])
    result = essence_run(folder, "run")
    if result.returncode != 0:
        report("run_all_stages", False, result.stderr[-1500:])
        return False
    outputs = ["work/teacher-00000-of-00002.h5", "work/teacher-00001-of-00002.h5", "work/student.h5", "work/aligned/fingerprint",
               "work/aligned/model.safetensors"]
    report("run_all_stages", all(os.path.exists(os.path.join(folder, o)) for o in outputs), result.stdout[-500:])
    now = status(folder)
    report("up_to_date_after_run", all(v == "up-to-date" for v in now.values()), str(now))
    started = time.time()
    again = essence_run(folder, "run")
    seconds = time.time() - started
    report("second_run_does_nothing_fast", again.returncode == 0 and "every stage is up to date" in again.stdout and seconds < 2,
           f"{seconds:.2f} s: {again.stdout} {again.stderr}")
    # inputs naming another stage's output under other spellings are that output
    with open(os.path.join(folder, "aliases.yaml"), "w") as f:
        f.write(PIPELINE.replace("in: extract.out", "in: work//teacher.h5").replace("data: project.out", "data: ./data/../work/./student.h5"))
    aliases = subprocess.run([RUN, os.path.join(folder, "aliases.yaml"), "status"], capture_output=True, text=True)
    report("input_spellings_name_the_stage_output", aliases.returncode == 0 and aliases.stdout.count(" up-to-date") == 3,
           aliases.stdout + aliases.stderr)
    os.remove(os.path.join(folder, "aliases.yaml"))
    return True


def test_replanning(folder):
    changed = status(folder, "--set", "project.sigma=3.5")
    report("set_replans_project_and_align_only", changed.get("extract") == "up-to-date" and changed.get("project", "").startswith("will-run")
           and "sigma" in changed.get("project", "") and changed.get("align", "").startswith("will-run"), str(changed))
    for root, _, files in os.walk(os.path.join(folder, "work")):
        for name in files:
            os.utime(os.path.join(root, name))
    for root, _, files in os.walk(os.path.join(folder, "models")):
        for name in files:
            os.utime(os.path.join(root, name))
    touched = status(folder)
    report("touching_files_replans_nothing", all(v == "up-to-date" for v in touched.values()), str(touched))
    os.remove(os.path.join(folder, "work", "student.h5"))
    deleted = status(folder)
    ok = deleted.get("project", "").startswith("will-run") and deleted.get("align") == "up-to-date" and deleted.get("extract") == "up-to-date"
    rerun = essence_run(folder, "run")
    ran = [line.split(":")[0] for line in rerun.stdout.splitlines() if ": /" in line]
    report("deleted_output_reruns_only_its_stage", ok and rerun.returncode == 0 and ran == ["project"], f"{deleted} ran {ran} {rerun.stderr[-300:]}")
    # one shard lost: only it runs again
    os.remove(os.path.join(folder, "work", "teacher-00001-of-00002.h5"))
    shard = status(folder)
    rerun = essence_run(folder, "run")
    ran = [line for line in rerun.stdout.splitlines() if ": /" in line]
    report("lost_shard_reruns_alone", "(shard 1)" in shard.get("extract", "") and len(ran) == 1 and "--shard 1/2" in ran[0]
           and status(folder).get("project") == "up-to-date", f"{shard} {ran}")
    forced = status(folder, "--force", "project")
    report("force_runs_a_stage", forced.get("project") == "will-run: --force" and forced.get("extract") == "up-to-date", str(forced))
    # an input's content changes: its stage and what follows re-plan
    with open(os.path.join(folder, "data", "texts.jsonl"), "a") as f:
        f.write(json.dumps({"id": "new", "text": "One more sample."}) + "\n")
    content = status(folder)
    report("changed_input_content_replans", all(content.get(s, "").startswith("will-run") for s in ("extract", "project", "align"))
           and "input data changed" in content.get("extract", ""), str(content))


def test_bad_files(tmp):
    cases = {
        "unknown_key": (PIPELINE.replace("    shards: 2\n", "    shards: 2\n    shardz: 3\n"), 6, "shardz"),
        "unknown_top_key": ("stage:\n  a: {}\n", 1, "unknown key"),
        "cycle": (PIPELINE.replace("data: data/texts.jsonl", "data: align.out"), None, "cycle"),
        "input_nobody_makes": (PIPELINE.replace("data: data/texts.jsonl", "data: data/missing.jsonl"), 8, "data/missing.jsonl"),
        "unknown_output_reference": (PIPELINE.replace("in: extract.out", "in: extract.latents"), 17, "no output"),
        "missing_program": (PIPELINE.replace("program: essence-project", "program: essence-projekt"), 15, "essence-projekt"),
        "no_outputs": (PIPELINE.replace("    outputs: {out: work/student.h5}\n", ""), 14, "no outputs"),
        "same_output_twice": (PIPELINE.replace("out: work/aligned", "out: work/student.h5"), 25, "writes"),
        "bad_yaml": ("stages:\n  a: [\n", None, ""),
        # only essence's programs, found beside essence-run
        "program_not_essence": (PIPELINE.replace("program: essence-project", "program: bash"), 15, 'program "bash" is not a program of essence'),
        "program_a_path": (PIPELINE.replace("program: essence-project", "program: /bin/sh"), 15, "is not a program of essence"),
        "program_inspect": (PIPELINE.replace("program: essence-project", "program: essence-inspect"), 15, "is not a program of essence"),
        # (run by a copy of essence-run in a folder without essence-eval: programs are looked for beside it)
        "program_not_built": (PIPELINE.replace("program: essence-project", "program: essence-eval"), 15, "not found beside essence-run"),
        # one file under several spellings
        "same_output_dot": (PIPELINE.replace("out: work/aligned", "out: work/./student.h5"), 25, "writes work/./student.h5, as stage project"),
        "same_output_slashes": (PIPELINE.replace("out: work/aligned", "out: work//student.h5"), 25, "as stage project"),
        "same_output_dotdot": (PIPELINE.replace("out: work/aligned", "out: models/../work/student.h5"), 25, "as stage project"),
        "same_output_symlinked_folder": (PIPELINE.replace("out: work/aligned", "out: alias/student.h5").replace("work/student.h5", "real/student.h5"),
                                         25, "writes alias/student.h5, as stage project"),
        "same_output_link_dotdot": (PIPELINE.replace("out: work/aligned", "out: alias/../elsewhere/student.h5")
                                    .replace("work/student.h5", "deep/elsewhere/student.h5"), 25, "as stage project"),
        "output_is_a_shard": (PIPELINE.replace("out: work/aligned", "out: work/teacher-00001-of-00002.h5"), 25,
                              "writes work/teacher-00001-of-00002.h5, as stage extract does (its shard 1)"),
        "reads_own_output_dot": (PIPELINE.replace("in: extract.out", "in: work/./student.h5"), 17, "reads its own output"),
        # what would reach an #SBATCH line or a shell: refused whatever the executor, the key named
        "slurm_partition_command": (PIPELINE + 'slurm:\n  partition: "$(touch /tmp/pwned)"\n', 27, "slurm.partition"),
        "slurm_partition_option": (PIPELINE + "slurm:\n  partition: gpu,--exclusive\n", 27, "slurm.partition"),
        "slurm_account_leading_dash": (PIPELINE + 'slurm:\n  gpus: 1\n  account: "-x"\n', 28, "slurm.account"),
        "slurm_account_backticks": (PIPELINE + "slurm:\n  account: '`id`'\n", 27, "slurm.account"),
        "slurm_time_dashes": (PIPELINE.replace("    program: essence-align\n", '    program: essence-align\n    slurm: {time: "--"}\n'), 23, "slurm.time"),
        "slurm_time_semicolon": (PIPELINE + "slurm:\n  time: 04:00:00; rm -rf /\n", 27, "slurm.time"),
        "slurm_mem_newline": (PIPELINE + 'slurm:\n  mem: "1G\\n#SBATCH --x"\n', 27, "slurm.mem"),
        "slurm_gpus_not_a_count": (PIPELINE + "slurm:\n  gpus: +1\n", 27, "slurm.gpus"),
        "stage_name_leading_dash": (PIPELINE.replace("  align:\n", "  -align:\n"), 21, 'stage name "-align"'),
        "flag_leading_dash": (PIPELINE.replace("{steps: 4,", "{-steps: 4,"), 24, "a flag name"),
    }
    for name, (text, line, words) in cases.items():
        folder = os.path.join(tmp, f"bad-{name}")
        shutil.copytree(os.path.join(tmp, "pipe"), folder, ignore=shutil.ignore_patterns("work", "essence.lock"))
        # real/ and deep/elsewhere/ exist; alias links to real/ (alias/.. is the pipeline's folder, not deep/)
        os.makedirs(os.path.join(folder, "deep", "elsewhere"))
        os.makedirs(os.path.join(folder, "real"))
        os.symlink("real" if name != "same_output_link_dotdot" else "deep/elsewhere", os.path.join(folder, "alias"))
        with open(os.path.join(folder, "pipeline.yaml"), "w") as f:
            f.write(text)
        if name == "program_not_built":
            lonely = os.path.join(tmp, "lonely")
            os.makedirs(lonely, exist_ok=True)
            shutil.copy(RUN, lonely)
            for program in ("essence-extract", "essence-project", "essence-align"):  # all but essence-eval
                if not os.path.lexists(os.path.join(lonely, program)):
                    os.symlink(os.path.abspath(os.path.join(BUILD, program)), os.path.join(lonely, program))
            result = subprocess.run([os.path.join(lonely, "essence-run"), os.path.join(folder, "pipeline.yaml"), "status"],
                                    capture_output=True, text=True)
        else:
            result = essence_run(folder, "status")
        where = f"pipeline.yaml:{line}:" if line else "pipeline.yaml:"
        report(f"bad_pipeline_{name}", result.returncode == 2 and where in result.stderr and words in result.stderr, result.stderr.strip())


def test_slurm_script(tmp):
    """Values with shell syntax from the pipeline file reach the program literally through the
    sbatch script the Slurm executor writes: each script (from --dry-run) run by bash with `exec`
    made a function that prints its arguments; nothing in them is run."""
    folder = os.path.join(tmp, "slurm-script")
    shutil.copytree(os.path.join(tmp, "pipe"), folder, ignore=shutil.ignore_patterns("work", "essence.lock"))
    marker = os.path.join(tmp, "pwned")
    template = f"$(touch {marker}) `touch PWNED`; rm -rf NOPE 'q' \"dq\" \\ $HOME\n#SBATCH --x -- -x {{prompt}}{{response}}"
    output = f"work/t $(touch {marker}) `touch PWNED2`; 'q' \"dq\" -x.h5"
    text = PIPELINE.replace("      batch_tokens: 256\n", f"      batch_tokens: 256\n      template: {json.dumps(template)}\n") \
                   .replace("out: work/teacher.h5", f"out: {json.dumps(output)}") \
        + "slurm:\n  partition: gpu,debug\n  account: proj-1\n  time: 1-00:00:00\n  mem: 120G\n"
    with open(os.path.join(folder, "pipeline.yaml"), "w") as f:
        f.write(text)
    dry = essence_run(folder, "run", "--executor", "slurm", "--dry-run")
    scripts, name = {}, None
    for line in dry.stdout.splitlines(keepends=True):
        if line.startswith("# ") and line.rstrip().endswith(".sbatch") and ": " in line:
            name = line[2:].split(":")[0]
            scripts[name] = ""
        elif name:
            scripts[name] += line
    scratch = os.path.join(tmp, "slurm-script-cwd")
    os.makedirs(scratch)
    argvs = {}
    for stage, script in scripts.items():
        shown = subprocess.run(["bash", "-c", "exec() { printf '%s\\0' \"$@\"; }\n" + script], cwd=scratch, capture_output=True,
                               env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
        argvs[stage] = shown.stdout.decode().split("\0")[:-1]
    shard = os.path.join(folder, output.replace(".h5", "-00001-of-00002.h5"))
    shards = ",".join(os.path.join(folder, output.replace(".h5", f"-0000{i}-of-00002.h5")) for i in range(2))
    extract, project = argvs.get("extract", []), argvs.get("project", [])
    literal = (extract[extract.index("--template") + 1] if "--template" in extract else None) == template \
        and (extract[extract.index("--out") + 1] if "--out" in extract else None) == shard \
        and (project[project.index("--in") + 1] if "--in" in project else None) == shards
    made = [p for p in (marker, os.path.join(scratch, "PWNED"), os.path.join(scratch, "PWNED2")) if os.path.exists(p)]
    report("slurm_script_values_literal", dry.returncode == 0 and literal and not made and "#SBATCH --partition=gpu,debug\n" in dry.stdout
           and "#SBATCH --time=1-00:00:00\n" in dry.stdout, f"rc {dry.returncode} {dry.stderr[-300:]} made {made} argv {argvs}")


# ---- two essence-runs at once, and a runner killed ----------------------------------------------

# align made long enough (a few seconds here) for other calls to meet it running
LONG_ALIGN = ("--set", "align.steps=300", "--set", "align.eval_every=0")


def holder_text(folder):
    try:
        with open(os.path.join(folder, "essence-run.lock")) as f:
            return f.read()
    except OSError:
        return ""


def wait_for_stage(folder, process, stage, seconds=20):
    """Until `stage` runs (True: the lock file says so, or its program, essence-STAGE in this
    pipeline, is seen running), or the runner has ended (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if f"stage={stage}\n" in holder_text(folder) or any(f"essence-{stage} " in line for line in stage_processes(folder).values()):
            return True
        time.sleep(0.005)
    return False


def lock_is_whole(folder):
    """essence.lock parses as JSON and no temporary file of a save is left beside it."""
    try:
        with open(os.path.join(folder, "essence.lock")) as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"essence.lock: {exc}"
    left = [n for n in os.listdir(folder) if n.startswith("essence.lock.")]
    return f"left: {left}" if left else ""


def test_concurrent(folder):
    """A long align runs; a second run refuses naming its pid and stage; many statuses all succeed."""
    # A lock the size of a big folder's (5000 cached hashes, 800 kB): slow enough to write that
    # writers sharing one temporary name meet (the old code: a third of the statuses failed).
    path = os.path.join(folder, "essence.lock")
    with open(path) as f:
        padded = json.load(f)
    for i in range(5000):
        padded["files"][f"/data/elsewhere/file-{i:05d}.bin"] = {"size": i, "mtime_ns": i, "sha256": f"{i:064x}"}
    with open(path, "w") as f:
        json.dump(padded, f, indent=1)
    holder = subprocess.Popen([RUN, os.path.join(folder, "pipeline.yaml"), "run", *LONG_ALIGN], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    if not wait_for_stage(folder, holder, "align"):
        out, errs = holder.communicate()
        report("second_run_refuses", False, f"the first run never ran align: {holder.returncode} {errs[-500:]}")
        return
    # The stage's process can be seen a moment before the runner notes its pid in the lock file.
    deadline = time.time() + 10
    while "stage_pid=" not in holder_text(folder) and time.time() < deadline and holder.poll() is None:
        time.sleep(0.005)
    stage_pid = ([line[len("stage_pid="):] for line in holder_text(folder).splitlines() if line.startswith("stage_pid=")] or ["0"])[0]
    try:
        fds = [os.readlink(f"/proc/{stage_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{stage_pid}/fd")]
    except OSError as exc:
        fds = [str(exc)]
    report("stage_inherits_the_run_lock", os.path.join(folder, "essence-run.lock") in fds, f"stage pid {stage_pid}: {fds}")
    second = essence_run(folder, "run", *LONG_ALIGN)
    want = f"another essence-run (pid {holder.pid}) is running pipeline.yaml in this folder, stage align as pid"
    report("second_run_refuses", second.returncode == 1 and want in second.stderr and os.path.join(folder, "pipeline.yaml") in second.stderr
           and holder.poll() is None, f"rc {second.returncode}: {second.stderr.strip()[-600:]}")
    # statuses, eight at a time, for as long as the run lasts (its saves of essence.lock included)
    # and three batches after it; an input touched before each batch makes every status re-hash it
    # and want to save the cache: they meet the run and each other
    failed, calls, after_run = [], 0, 0
    while holder.poll() is None or after_run < 3:
        after_run += holder.poll() is not None
        os.utime(os.path.join(folder, "data", "texts.jsonl"))
        batch = [subprocess.Popen([RUN, os.path.join(folder, "pipeline.yaml"), "status", *LONG_ALIGN], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        for p in batch:
            out, errs = p.communicate()
            calls += 1
            lines = out.splitlines()
            if p.returncode != 0 or len(lines) != 3 or errs.strip():
                failed.append(f"rc {p.returncode}: {out!r} {errs.strip()[-300:]}")
    out, errs = holder.communicate()
    report("statuses_during_a_run_all_succeed", not failed and holder.returncode == 0,
           f"{len(failed)} of {calls} failed, first: {failed[:1]}; the run: {holder.returncode} {errs[-300:]}")
    whole = lock_is_whole(folder)
    kept = not whole and len(json.load(open(path))["files"]) > 5000
    after = status(folder, *LONG_ALIGN)
    report("lock_whole_after_concurrent_calls", not whole and kept and all(v == "up-to-date" for v in after.values()),
           f"{whole} {after} kept the cache: {kept}")
    # two runs started together: one runs, the other refuses naming it
    runs = [subprocess.Popen([RUN, os.path.join(folder, "pipeline.yaml"), "run", "--force", "align", *LONG_ALIGN],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(), p.returncode) for p in runs]
    codes = sorted(r[3] for r in results)
    winner = [r[0] for r in results if r[3] == 0]
    named = codes == [0, 1] and f"another essence-run (pid {winner[0]})" in [r[2] for r in results if r[3] == 1][0]
    report("two_runs_at_once_one_refuses", codes == [0, 1] and named and not lock_is_whole(folder),
           f"exit codes {codes}: {[r[2].strip()[-300:] for r in results]}")


def test_orphan_stage_refused(tmp):
    """A stage that outlived its runner (here: this test, holding the lock as an inherited stage
    would, under a runner pid that has ended) makes the next run refuse, naming the stage."""
    import fcntl
    folder = os.path.join(tmp, "orphan")
    shutil.copytree(os.path.join(tmp, "pipe"), folder, ignore=shutil.ignore_patterns("work", "essence.lock", "essence-run.lock"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open(os.path.join(folder, "essence-run.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"pid={gone.pid}\nrole=run\npipeline={folder}/pipeline.yaml\nstage=extract\nstage_pid={os.getpid()}\n")
        held.flush()
        started = time.time()
        result = essence_run(folder, "run")
        seconds = time.time() - started
        looked = status(folder)
    want = f"the essence-run (pid {gone.pid}) that ran pipeline.yaml here is gone, but its stage extract (pid {os.getpid()}) still runs"
    report("orphan_stage_refused", result.returncode == 1 and want in result.stderr and not os.path.exists(os.path.join(folder, "work"))
           and seconds < 5, f"rc {result.returncode} in {seconds:.1f} s: {result.stderr.strip()[-400:]}")
    report("status_while_locked", len(looked) == 3 and all(v.startswith("will-run") for v in looked.values()), str(looked))


def stage_processes(folder):
    """pid -> command line of every process (but this one) whose command line names the folder."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in line:
            found[int(pid)] = line
    return found


def h5_content(path):
    """Every dataset's bytes, dtype and shape and every attribute, but `created` (when it was made)."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the zstd filter)
    import numpy as np
    def raw(value):  # variable-length strings are objects: their bytes, not their pointers
        array = np.asarray(value)
        return (str(array.dtype), array.shape, list(array.ravel()) if array.dtype.kind == "O" else array.tobytes())
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out["data:" + name] = (str(obj.dtype), raw(obj[()]))
            for key, value in obj.attrs.items():
                if key != "created":
                    out[f"attr:{name}@{key}"] = raw(value)
        visit("/", f)
        f.visititems(visit)
    return out


def output_differences(a, b):
    """Where the work folders a and b differ: HDF5 files by content (h5_content), metrics.jsonl
    without tokens_per_s (a speed), loss.png not at all (a picture of the metrics), every other file
    byte for byte."""
    def files(root):
        return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)
    if files(a) != files(b):
        return [f"files {files(a)} != {files(b)}"]
    diffs = []
    for name in files(a):
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".h5"):
            same = h5_content(pa) == h5_content(pb)
        elif name.endswith("loss.png"):
            same = True
        elif name.endswith("metrics.jsonl"):
            def rows(p):
                return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(p)]
            same = rows(pa) == rows(pb)
        else:
            same = open(pa, "rb").read() == open(pb, "rb").read()
        if not same:
            diffs.append(name)
    return diffs


# How long a stage may take to die once its runner is killed (SIGKILL, then the kernel's teardown).
SURVIVOR_S = 0.5


def test_killed_runner(tmp):
    """essence-run SIGKILLed inside each stage and at random moments: no stage outlives it, the
    next run goes on from what is complete, and the outputs equal an uninterrupted run's."""
    import random
    folder = setup(os.path.join(tmp, "killed"))
    # align long enough (about a second) that a stage left running after its runner's death is
    # still seen SURVIVOR_S later
    sets = ("--set", "align.steps=300", "--set", "align.eval_every=100")
    started = time.time()
    reference = essence_run(folder, "run", *sets)
    length = time.time() - started
    if reference.returncode != 0:
        report("killed_runner_reference", False, reference.stderr[-800:])
        return
    shutil.move(os.path.join(folder, "work"), os.path.join(tmp, "killed", "reference-work"))
    os.remove(os.path.join(folder, "essence.lock"))
    seed = int(os.environ.get("ESSENCE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    survivors, kills, started = [], [], time.time()
    for target in ("extract", "project", "align", None, None, None):
        # no pipes: a stage left running would hold them open, and waiting for the runner would wait for it
        runner = subprocess.Popen([RUN, os.path.join(folder, "pipeline.yaml"), "run", *sets], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        if target:
            inside = wait_for_stage(folder, runner, target)
            time.sleep(rng.uniform(0, 0.03))
        else:
            inside = True
            time.sleep(rng.uniform(0, length))
        if runner.poll() is None:
            runner.kill()
            kills.append(target or "random")
        runner.wait()
        if not inside:
            kills.append(f"({target} never ran: done already)")
        deadline = time.time() + SURVIVOR_S
        while stage_processes(folder) and time.time() < deadline:
            time.sleep(0.01)
        left = stage_processes(folder)
        if left:
            survivors.append(f"after a kill in {target or 'a random moment'}: {left}")
            for pid in left:  # so that the test goes on
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.2)
    report("killed_runner_leaves_no_stage", not survivors and kills, f"seed {seed}, kills {kills}: {survivors}")
    # what a runner killed inside a save of essence.lock leaves: the next run removes it
    with open(os.path.join(folder, "essence.lock.partial-Xy12Zq"), "w") as f:
        f.write('{"version": 1, "fi')
    final = essence_run(folder, "run", *sets)
    diffs = output_differences(os.path.join(tmp, "killed", "reference-work"), os.path.join(folder, "work")) if final.returncode == 0 else []
    report("killed_runner_rerun_equals_uninterrupted", final.returncode == 0 and not diffs and not lock_is_whole(folder),
           f"seed {seed}, kills {kills}, {time.time() - started:.1f} s: rc {final.returncode} {final.stderr[-600:]} differ: {diffs}")


def main():
    if not os.path.exists(RUN):
        report("essence_run_built", False, f"{RUN} missing")
        return
    with tempfile.TemporaryDirectory(prefix="essence-run-") as tmp:
        folder = setup(tmp)
        if test_runs(folder):
            test_replanning(folder)
            test_concurrent(folder)
        test_bad_files(tmp)
        test_slurm_script(tmp)
        test_orphan_stage_refused(tmp)
        test_killed_runner(tmp)


if __name__ == "__main__":
    run_main(main, "test_run")
