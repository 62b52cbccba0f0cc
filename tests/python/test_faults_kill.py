"""The fault matrix, SIGKILL: each stage (extract, project, align) killed at seeded random moments
spread over its measured run time, then resumed, gives the uninterrupted result byte for byte
(every dataset and attribute but created and config: faults.py), and a late kill resumes from a
committed point past the start."""
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import folder_content, h5_content, models, must, program, reset, same_content, write_corpus  # noqa: E402
from testing import report, run_main  # noqa: E402

KILLS = 6


def kill_matrix(name, argv, out, leftovers, content, resumed_from, seed, complete=os.path.exists):
    """Runs argv once to time it and keep its result, then KILLS times killed at a random moment
    and resumed; checks every resumed result against the uninterrupted one."""
    reset(*leftovers)
    started = time.monotonic()
    must(os.path.basename(argv[0]), *argv[1:])
    duration = time.monotonic() - started
    reference = content(out)
    rng = random.Random(seed)
    problems, kills, late_points, points = [], 0, [], []
    for trial in range(KILLS):
        reset(*leftovers)
        at = (0.05 + 0.8 * (trial + rng.random()) / KILLS) * duration  # spread over the run
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode != -signal.SIGKILL:
            if os.path.exists(out) and same_content(content(out), reference):
                problems.append(f"kill {trial}: a run that ended by itself wrote another result")
            continue
        if complete(out):  # killed after it finished its output: then that is the whole result
            why = same_content(content(out), reference)
            if why:
                problems.append(f"kill {trial}: a killed run left an incomplete {out}: {why}")
            continue
        kills += 1
        resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=120)
        if resumed.returncode != 0:
            problems.append(f"kill {trial} at {at:.2f}s: resume failed ({resumed.returncode}): {resumed.stderr.strip()[-300:]}")
            continue
        point = resumed_from(resumed.stderr)
        points.append(point)
        if at > 0.5 * duration:
            late_points.append(point)
        why = same_content(content(out), reference)
        if why:
            problems.append(f"kill {trial} at {at:.2f}s (resumed from {point}): {why}")
    if kills < KILLS // 2:
        problems.append(f"only {kills} of {KILLS} runs were killed before they finished ({duration:.2f}s)")
    if any(point <= 0 for point in late_points) or (points and max(points) <= 0):
        problems.append(f"kills resumed from {points} (late ones from {late_points}): committed progress was lost")
    print(f"  {name}: run {duration:.2f}s, {kills} kills resumed from {points} (late ones: {late_points})")
    report(f"{name}_killed_and_resumed_equals_uninterrupted", not problems, "; ".join(problems[:3]))


def committed_samples(stderr):
    found = re.search(r"after (\d+) committed samples", stderr)
    return int(found.group(1)) if found else 0


def checkpoint_step(stderr):
    found = re.search(r"resumed from \S+checkpoint-(\d+) at step", stderr)
    return int(found.group(1)) if found else 0


def main():
    with tempfile.TemporaryDirectory(prefix="essence-kill-") as tmp:
        teacher, student = models(tmp)
        data = write_corpus(os.path.join(tmp, "data.jsonl"), 240, words=30)
        # extract: a commit per batch of about 64 tokens
        out = os.path.join(tmp, "t.h5")
        extract = [program("essence-extract"), "--model", teacher, "--data", data, "--layers", "1,2,4", "--out", out,
                   "--batch-tokens", "64", "--chunk-rows", "16", "--threads", "1"]
        kill_matrix("extract", extract, out, [out, out + ".partial"], h5_content, committed_samples, 1)
        must("essence-extract", *extract[1:])  # the teacher file project reads
        # project: a commit per block of 2048 teacher rows
        student_out = os.path.join(tmp, "s.h5")
        project = [program("essence-project"), "--in", out, "--student", student, "--out", student_out, "--layer-map", "2:1,4:3",
                   "--threads", "1"]
        kill_matrix("project", project, student_out, [student_out, student_out + ".partial"], h5_content, committed_samples, 2)
        # align: a checkpoint every step
        must("essence-project", *project[1:])
        aligned = os.path.join(tmp, "aligned")
        align = [program("essence-align"), "--model", student, "--data", student_out, "--out", aligned, "--steps", "16",
                 "--save-every", "1", "--keep-checkpoints", "2", "--eval-every", "4", "--seq-len", "32", "--batch-tokens", "64",
                 "--threads", "1", "--warmup", "2"]
        kill_matrix("align", align, aligned, [aligned], folder_content, checkpoint_step, 3,
                    complete=lambda folder: os.path.exists(os.path.join(folder, "fingerprint")))


if __name__ == "__main__":
    run_main(main, "test_faults_kill")
