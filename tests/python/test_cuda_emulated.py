"""The programs with --device cuda on the CUDA backend built for the host (build/emu/libessence-cuda.so,
tests/emulate/), against --device cpu: the second section of tests/gpu/run.sh at sizes a CPU can emulate.
essence-extract's teacher.h5 (tiny-llama3, layers 0, 2, 4) within 2e-2 of the CPU's (essence-inspect compare), and the
same bits with the emulated streams, blocks and threads run in other orders;
essence-project's student.h5 at fp32 and bf16 within 1e-2 and 2e-2; essence-eval's greedy generations of both tiny
models against transformers' goldens (tests/gpu/eval_vs_golden.py); 8 steps of essence-align (tiny-qwen2, CE and
latent terms) with losses within 2% of the CPU's step by step, and each device's step-4 checkpoint continued on the
other within 2% of the uninterrupted run; two MPI ranks sharing the (emulated) device, with and without --zero1,
against one rank with twice the batch (tests/gpu/ranks_parity.py; --zero1 the same bits), and that one rank's
training in the other orders the same bits. No run may print HDF5's
error traces. What this checks is the backend's logic and the stages' use of it (layer
streams, overlapped downloads, checkpoints across devices); a GPU's own behaviour is tests/gpu/run.sh's."""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import ROOT, mpi_env, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", os.path.join(ROOT, "build"))
BACKEND = os.path.join(BUILD, "emu", "libessence-cuda.so")
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
GPU_TOOLS = os.path.join(ROOT, "tests", "gpu")


def run(program, *args, ranks=0, order="lazy", threads="forward"):
    """One of our programs on the emulated backend, its streams in `order` (tests/emulate/runtime.cpp)
    and each launch's blocks and threads in `threads` order (tests/emulate/cuda_host.cpp)."""
    env = {**os.environ, "ESSENCE_CUDA_BACKEND": BACKEND, "ESSENCE_EMU_STREAMS": order, "ESSENCE_EMU_THREADS": threads}
    command = [os.path.join(BUILD, program), *args]
    if ranks:  # under Open MPI, the ranks on this machine
        env = mpi_env(env)
        command = [shutil.which("mpirun"), "-np", str(ranks), "-x", "ESSENCE_CUDA_BACKEND", "-x", "ESSENCE_EMU_STREAMS",
                   "-x", "ESSENCE_EMU_THREADS", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def tool(script, *args):
    return subprocess.run([sys.executable, os.path.join(GPU_TOOLS, script), *args], capture_output=True, text=True, timeout=60)


def tail(result):
    return (result.stdout + result.stderr).strip()[-600:]


def same_bytes(a, b):
    return os.path.exists(a) and os.path.exists(b) and open(a, "rb").read() == open(b, "rb").read()


def check(name, result):
    """A run passes when it succeeds and prints no HDF5 error traces (our threads silence HDF5's own
    printing, per thread: common/h5file.h)."""
    traces = result.stderr.count("HDF5-DIAG")
    report(name, result.returncode == 0 and not traces, f"rc {result.returncode}, {traces} HDF5-DIAG traces: {tail(result)}")
    return result.returncode == 0 and not traces


def main():
    if os.environ.get("ESSENCE_SANITIZE"):
        print("SKIP cuda_emulated: not under the sanitizers (make sanitize builds no emulated CUDA backend; make test runs this)")
        return
    if not os.path.exists(BACKEND):
        print(f"SKIP cuda_emulated: no {BACKEND} (built where nvcc is found, with the CUDA-capable libessence)")
        return
    tmp = tempfile.mkdtemp(prefix="essence-cuda-emulated-")
    try:
        data = os.path.join(tmp, "data.jsonl")
        rng = random.Random(7)
        words = "the of reasoning step first then because therefore each layer token model 12 345 = + ( ) ; : é 数 🙂".split()
        with open(data, "w") as f:
            for i in range(12):
                f.write(json.dumps({"id": f"s{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))}) + "\n")
        teacher, student = os.path.join(MODELS, "tiny-llama3"), os.path.join(MODELS, "tiny-qwen2")
        path = lambda *parts: os.path.join(tmp, *parts)  # noqa: E731

        for dev in ("cpu", "cuda"):
            check(f"emulated_extract_{dev}", run("essence-extract", "--model", teacher, "--data", data, "--layers", "0,2,4",
                                                 "--batch-tokens", "512", "--out", path(f"teacher_{dev}.h5"), "--device", dev))
        check("emulated_extract_cuda_vs_cpu", run("essence-inspect", "compare", path("teacher_cuda.h5"), path("teacher_cpu.h5"),
                                                  "--tol", "2e-2"))
        # the other order of the streams, and of every launch's blocks and threads: the copies to
        # the host and the writer thread see the stored layers in another interleaving, a kernel
        # missing a barrier reads what another thread has not written yet, and the file has the
        # same bits
        check("emulated_extract_cuda_other_order", run("essence-extract", "--model", teacher, "--data", data, "--layers", "0,2,4",
                                                       "--batch-tokens", "512", "--out", path("teacher_cuda_other.h5"),
                                                       "--device", "cuda", order="eager", threads="reverse"))
        check("emulated_extract_cuda_other_order_same_bits", run("essence-inspect", "compare", path("teacher_cuda_other.h5"),
                                                                 path("teacher_cuda.h5")))
        for dev in ("cpu", "cuda"):
            for precision in ("fp32", "bf16"):
                check(f"emulated_project_{dev}_{precision}",
                      run("essence-project", "--in", path("teacher_cpu.h5"), "--student", student, "--layer-map", "2:1,4:3",
                          "--precision", precision, "--out", path(f"student_{dev}_{precision}.h5"), "--device", dev))
        for precision, tol in (("fp32", "1e-2"), ("bf16", "2e-2")):
            check(f"emulated_project_cuda_vs_cpu_{precision}",
                  run("essence-inspect", "compare", path(f"student_cuda_{precision}.h5"), path(f"student_cpu_{precision}.h5"),
                      "--tol", tol))

        for model in ("tiny-llama3", "tiny-qwen2"):
            golden_path = os.path.join(MODELS, model, "golden_generate.json")
            golden = json.load(open(golden_path))
            with open(path(f"eval_{model}.jsonl"), "w") as f:
                for p in golden["prompts"]:
                    f.write(json.dumps({"id": p["id"], "prompt": p["prompt"], "answer": 0}) + "\n")
            out = path(f"eval_{model}.out.jsonl")
            if check(f"emulated_eval_cuda_{model}",
                     run("essence-eval", "--model", os.path.join(MODELS, model), "--data", path(f"eval_{model}.jsonl"), "--out", out,
                         "--template", golden["template"], "--max-new-tokens", "32", "--batch", "4", "--batch-tokens", "16",
                         "--device", "cuda")):
                check(f"emulated_eval_cuda_vs_golden_{model}", tool("eval_vs_golden.py", golden_path, out))

        align = ["--model", student, "--data", path("student_cpu_fp32.h5"), "--steps", "8", "--batch-tokens", "256", "--save-every", "4",
                 "--keep-checkpoints", "2", "--ce-weight", "0.5", "--eval-every", "4"]
        for dev in ("cpu", "cuda"):
            check(f"emulated_align_{dev}", run("essence-align", *align, "--out", path(f"align_{dev}"), "--device", dev))
        check("emulated_align_cuda_vs_cpu_losses",
              tool("align_parity.py", path("align_cuda", "metrics.jsonl"), path("align_cpu", "metrics.jsonl"), "0.02"))
        for source, target in (("cuda", "cpu"), ("cpu", "cuda")):
            resumed = path(f"resume_{source}")
            shutil.copytree(path(f"align_{source}"), resumed)
            shutil.rmtree(os.path.join(resumed, "checkpoint-8"), ignore_errors=True)
            result = run("essence-align", *align, "--out", resumed, "--device", target, "--resume")
            report(f"emulated_align_resume_{source}_on_{target}",
                   result.returncode == 0 and "checkpoint-4" in result.stderr and "resumed from" in result.stderr,
                   f"rc {result.returncode}: {tail(result)}")
            check(f"emulated_align_resume_{source}_on_{target}_losses",
                  tool("align_parity.py", os.path.join(resumed, "metrics.jsonl"), path(f"align_{target}", "metrics.jsonl"), "0.02", "5"))

        # data parallel: the ranks share the one device, so they sum through MPI on the host (align/comm.c)
        if not shutil.which("mpirun"):
            print("SKIP emulated_align_two_ranks: mpirun not found (apt-get install openmpi-bin)")
            return
        ranks = ["--model", student, "--data", path("student_cpu_fp32.h5"), "--steps", "4", "--save-every", "0", "--eval-every", "0",
                 "--ce-weight", "0.5", "--device", "cuda"]
        check("emulated_align_one_rank_2b", run("essence-align", *ranks, "--batch-tokens", "512", "--out", path("ranks_1")))
        # the same run in the other orders (streams, blocks, threads): the training kernels' bits do
        # not depend on the schedule
        check("emulated_align_other_order", run("essence-align", *ranks, "--batch-tokens", "512", "--out", path("ranks_1_other"),
                                                order="eager", threads="reverse"))
        state = os.path.join("checkpoint-4", "essence-state", "state.safetensors")
        report("emulated_align_other_order_same_bits", same_bytes(path("ranks_1", state), path("ranks_1_other", state)),
               "the weights and moments trained in the other orders differ from the first run's (or are missing)")
        for name, extra in (("ranks_2", []), ("ranks_2_zero1", ["--zero1"])):
            result = run("essence-align", *ranks, "--batch-tokens", "256", "--out", path(name), *extra, ranks=2)
            report(f"emulated_align_{name}", result.returncode == 0 and "sum through MPI on the host" in result.stderr,
                   f"rc {result.returncode}: {tail(result)}")
        check("emulated_align_two_ranks_vs_one",
              tool("ranks_parity.py", path("ranks_2", "checkpoint-4"), path("ranks_1", "checkpoint-4"), student))
        report("emulated_align_zero1_same_bits", same_bytes(path("ranks_2", state), path("ranks_2_zero1", state)),
               "the --zero1 run's state differs from the replicated run's (or is missing)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


run_main(main, "cuda_emulated")
