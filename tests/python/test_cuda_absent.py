"""--device cuda where no GPU can be used (a build without nvcc, or no CUDA device): each stage (extract, project, align)
fails with exit 1 and a message naming --device cuda, and leaves no output (no file, no .partial).
On a machine with a usable GPU the checks print SKIP: tests/gpu/ covers the GPU there."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import ROOT, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")


def run(program, *args):
    return subprocess.run([os.path.join(BUILD, program), *args], capture_output=True, text=True, timeout=300)


def gpu_usable(tmp):
    """Whether this build opens a CUDA device here: then the failure is not what this test is about."""
    probe = run("essence-extract", "--model", os.path.join(MODELS, "tiny-llama3"), "--data", os.path.join(tmp, "data.jsonl"),
                "--layers", "1", "--out", os.path.join(tmp, "probe.h5"), "--device", "cuda")
    return probe.returncode == 0


def left_behind(tmp, name):
    return [f for f in os.listdir(tmp) if f.startswith(name)]


def main():
    tmp = tempfile.mkdtemp(prefix="essence-cuda-absent-")
    try:
        with open(os.path.join(tmp, "data.jsonl"), "w") as f:
            for i in range(3):
                f.write(json.dumps({"id": f"s{i}", "text": f"Sample number {i}: the cat sat on the mat."}) + "\n")
        if gpu_usable(tmp):
            print("SKIP cuda_absent: this build opens a CUDA device here (tests/gpu/run.sh checks --device cuda)")
            return
        teacher = os.path.join(MODELS, "tiny-llama3")
        extract = run("essence-extract", "--model", teacher, "--data", os.path.join(tmp, "data.jsonl"), "--layers", "1,2",
                      "--out", os.path.join(tmp, "teacher_cuda.h5"), "--device", "cuda")
        report("extract_device_cuda_without_gpu_exit_1",
               extract.returncode == 1 and "--device cuda" in extract.stderr and not left_behind(tmp, "teacher_cuda"),
               f"rc {extract.returncode}, stderr {extract.stderr.strip()[-300:]!r}, left {left_behind(tmp, 'teacher_cuda')}")
        missing = subprocess.run([os.path.join(BUILD, "essence-extract"), "--model", teacher, "--data", os.path.join(tmp, "data.jsonl"),
                                  "--layers", "1", "--out", os.path.join(tmp, "nolib.h5"), "--device", "cuda"], capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "ESSENCE_CUDA_BACKEND": os.path.join(tmp, "no-such-backend.so")})
        report("extract_device_cuda_backend_library_missing_exit_1",
               missing.returncode == 1 and "--device cuda" in missing.stderr and not left_behind(tmp, "nolib"),
               f"rc {missing.returncode}: {missing.stderr.strip()[-300:]}")
        for name in ("cuda:1", "cuda:0"):
            again = run("essence-extract", "--model", teacher, "--data", os.path.join(tmp, "data.jsonl"), "--layers", "1",
                        "--out", os.path.join(tmp, "again.h5"), "--device", name, "--resume")
            report(f"extract_device_{name.replace(':', '_')}_resume_without_gpu_exit_1",
                   again.returncode == 1 and not left_behind(tmp, "again"), f"rc {again.returncode}: {again.stderr.strip()[-300:]}")
        # project needs a teacher file: made on the CPU
        cpu = run("essence-extract", "--model", teacher, "--data", os.path.join(tmp, "data.jsonl"), "--layers", "1,2",
                  "--out", os.path.join(tmp, "teacher.h5"))
        if cpu.returncode:
            report("project_device_cuda_without_gpu_exit_1", False, f"the CPU extract failed: {cpu.stderr.strip()[-300:]}")
            return
        project = run("essence-project", "--in", os.path.join(tmp, "teacher.h5"), "--student", os.path.join(MODELS, "tiny-qwen2"),
                      "--out", os.path.join(tmp, "student_cuda.h5"), "--layer-map", "2:1", "--device", "cuda")
        report("project_device_cuda_without_gpu_exit_1",
               project.returncode == 1 and "--device cuda" in project.stderr and not left_behind(tmp, "student_cuda"),
               f"rc {project.returncode}, stderr {project.stderr.strip()[-300:]!r}, left {left_behind(tmp, 'student_cuda')}")
        # align: its targets made on the CPU; training on cuda fails before OUT exists
        student = run("essence-project", "--in", os.path.join(tmp, "teacher.h5"), "--student", os.path.join(MODELS, "tiny-qwen2"),
                      "--out", os.path.join(tmp, "student.h5"), "--layer-map", "2:1")
        if student.returncode:
            report("align_device_cuda_without_gpu_exit_1", False, f"the CPU project failed: {student.stderr.strip()[-300:]}")
            return
        align = run("essence-align", "--model", os.path.join(MODELS, "tiny-qwen2"), "--data", os.path.join(tmp, "student.h5"),
                    "--out", os.path.join(tmp, "run_cuda"), "--steps", "2", "--device", "cuda")
        report("align_device_cuda_without_gpu_exit_1",
               align.returncode == 1 and "--device cuda" in align.stderr and not left_behind(tmp, "run_cuda"),
               f"rc {align.returncode}, stderr {align.stderr.strip()[-300:]!r}, left {left_behind(tmp, 'run_cuda')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, "cuda_absent")
