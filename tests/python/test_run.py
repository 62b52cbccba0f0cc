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
    }
    for name, (text, line, words) in cases.items():
        folder = os.path.join(tmp, f"bad-{name}")
        shutil.copytree(os.path.join(tmp, "pipe"), folder, ignore=shutil.ignore_patterns("work", "essence.lock"))
        with open(os.path.join(folder, "pipeline.yaml"), "w") as f:
            f.write(text)
        result = essence_run(folder, "status")
        where = f"pipeline.yaml:{line}:" if line else "pipeline.yaml:"
        report(f"bad_pipeline_{name}", result.returncode == 2 and where in result.stderr and words in result.stderr, result.stderr.strip())


def main():
    if not os.path.exists(RUN):
        report("essence_run_built", False, f"{RUN} missing")
        return
    with tempfile.TemporaryDirectory(prefix="essence-run-") as tmp:
        folder = setup(tmp)
        if test_runs(folder):
            test_replanning(folder)
        test_bad_files(tmp)


if __name__ == "__main__":
    run_main(main, "test_run")
