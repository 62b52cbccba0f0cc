"""The fault matrix, a full disk: each stage writes to a small tmpfs sized so its output fills it
half way. Every stage exits 1 with a message naming the file and "No space left on device", no
signal, nothing under the final name, the .partial (extract, project) or the last checkpoint
(align) kept; after the tmpfs is enlarged, --resume gives the full result.

Mounting needs root; otherwise the test runs itself again under `unshare -r -m` (a user and mount
namespace where it is root), and prints SKIP when neither is possible."""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import folder_content, h5_content, models, must, program, reset, same_content, write_corpus  # noqa: E402
from testing import report, run_main  # noqa: E402


def mount(folder, size):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True, text=True)


def remount(folder, size):
    return subprocess.run(["mount", "-o", f"remount,size={size}", folder], capture_output=True, text=True)


def tree_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def full_disk(name, argv_for, out_name, content, complete, kept, tmp, reference_size):
    """argv_for(folder) runs the stage with its output in folder."""
    folder = os.path.join(tmp, f"disk-{name}")
    os.makedirs(folder)
    # a little more than half the output: it fills the disk part way through
    mounted = mount(folder, f"{max(reference_size // 2 // 4096, 8) * 4}k")
    if mounted.returncode != 0:
        report(f"{name}_disk_full", False, f"mount failed: {mounted.stderr.strip()}")
        return
    try:
        out = os.path.join(folder, out_name)
        result = subprocess.run(argv_for(folder), capture_output=True, text=True, timeout=120)
        problems = []
        if result.returncode != 1:
            problems.append(f"exit {result.returncode}")
        if "No space left on device" not in result.stderr or folder not in result.stderr:
            problems.append(f"message: {result.stderr.strip()[-300:]}")
        if complete(out):
            problems.append("a complete-looking output was left")
        if not kept(out):
            problems.append("nothing was kept for --resume")
        report(f"{name}_disk_full_exit_1_named_nothing_final", not problems, "; ".join(problems))
        remount(folder, f"{reference_size * 4 // 1024 + 1024}k")
        resumed = subprocess.run(argv_for(folder) + ["--resume"], capture_output=True, text=True, timeout=120)
        why = content(out) if resumed.returncode == 0 else None
        report(f"{name}_disk_enlarged_resume_gives_full_result", resumed.returncode == 0 and why == "",
               resumed.stderr.strip()[-300:] if resumed.returncode else why)
    finally:
        subprocess.run(["umount", folder], capture_output=True)


def main():
    if os.geteuid() != 0 and not os.environ.get("ESSENCE_IN_UNSHARE"):
        again = subprocess.run(["unshare", "-r", "-m", sys.executable, os.path.abspath(__file__)],
                               env=dict(os.environ, ESSENCE_IN_UNSHARE="1"))
        if again.returncode == 0 or again.returncode == 1:
            sys.exit(again.returncode)
        print(f"SKIP disk_full: not root, and unshare -r -m failed (status {again.returncode}): cannot mount a small tmpfs")
        return
    with tempfile.TemporaryDirectory(prefix="essence-nospace-") as tmp:
        probe = os.path.join(tmp, "probe")
        os.makedirs(probe)
        if mount(probe, "64k").returncode != 0:
            print("SKIP disk_full: cannot mount a tmpfs here (no CAP_SYS_ADMIN in this namespace)")
            return
        subprocess.run(["umount", probe])
        teacher, student = models(tmp)
        data = write_corpus(os.path.join(tmp, "data.jsonl"), 200, words=30)
        extract = lambda folder: [program("essence-extract"), "--model", teacher, "--data", data, "--layers", "1,2,4", "--out",
                                  os.path.join(folder, "t.h5"), "--batch-tokens", "64", "--threads", "1"]
        teacher_h5 = os.path.join(tmp, "t.h5")
        must("essence-extract", *extract(tmp)[1:])
        reference = h5_content(teacher_h5)
        full_disk("extract", extract, "t.h5", lambda out: same_content(h5_content(out), reference), os.path.exists,
                  lambda out: os.path.exists(out + ".partial"), tmp, tree_size(teacher_h5))
        project = lambda folder: [program("essence-project"), "--in", teacher_h5, "--student", student, "--out",
                                  os.path.join(folder, "s.h5"), "--layer-map", "2:1,4:3", "--threads", "1"]
        student_h5 = os.path.join(tmp, "s.h5")
        must("essence-project", *project(tmp)[1:])
        reference_s = h5_content(student_h5)
        full_disk("project", project, "s.h5", lambda out: same_content(h5_content(out), reference_s), os.path.exists,
                  lambda out: os.path.exists(out + ".partial"), tmp, tree_size(student_h5))
        align = lambda folder: [program("essence-align"), "--model", student, "--data", student_h5, "--out",
                                os.path.join(folder, "aligned"), "--steps", "6", "--save-every", "1", "--keep-checkpoints", "3",
                                "--eval-every", "0", "--seq-len", "32", "--batch-tokens", "64", "--threads", "1"]
        aligned = os.path.join(tmp, "aligned")
        must("essence-align", *align(tmp)[1:])
        reference_a = folder_content(aligned)
        def align_same(out):
            got = folder_content(out)
            return "" if got == reference_a else f"files differ: {sorted(set(got) ^ set(reference_a)) or 'contents'}"
        full_disk("align", align, "aligned", align_same, lambda out: os.path.exists(os.path.join(out, "fingerprint")),
                  lambda out: any(n.startswith("checkpoint-") and not n.endswith(".partial") for n in os.listdir(out)),
                  tmp, tree_size(aligned))
        reset(aligned)


if __name__ == "__main__":
    run_main(main, "test_faults_nospace")
