"""The thread count changes no bit of any stage's output: essence-extract's latents,
essence-project's targets and essence-align's weights and optimizer state after 20 steps are
byte-identical for --threads 1, 2 and 3, with the OpenBLAS kernels this machine runs and with
the other kernel families its CPU can run (OPENBLAS_CORETYPE), since OpenBLAS picks others on
other CPUs. Models: the demo's shapes, random weights (essence-inspect mkmodel) and the
tokenizers the repository ships, so nothing outside the repository is needed."""
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
ROOT = os.environ.get("ESSENCE_ROOT", ".")
DEMO = os.path.join(ROOT, "pipelines", "demo")


def run(program, *args, env=None):
    done = subprocess.run([os.path.join(BUILD, program), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(args)}: {done.stderr.strip()}")
    return done


def make_model(tmp, name, tokenizer, seed, layers):
    folder = os.path.join(tmp, name)
    run("essence-inspect", "mkmodel", "--like", os.path.join(DEMO, f"{name}.config.json"), "--layers", str(layers),
        "--seed", str(seed), "--out", folder)
    with open(os.path.join(folder, "tokenizer.json"), "wb") as out:
        subprocess.run(["zstd", "-dq", "--long=27", "-c", os.path.join(DEMO, tokenizer)], stdout=out, check=True)
    return folder


def kernel_families():
    """The environment's choice first, then the families this CPU can run (from its flags)."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    families = [os.environ.get("OPENBLAS_CORETYPE", "")]
    families.append("Prescott")
    if {"avx2", "fma"} <= flags:
        families.append("Haswell")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        families.append("SkylakeX")
    return list(dict.fromkeys(families))  # once each


def stages(tmp, teacher, student, data, threads, env, ce_weight):
    out = os.path.join(tmp, f"threads{threads}")
    os.makedirs(out)
    t = ["--threads", str(threads)]
    run("essence-extract", "--model", teacher, "--data", data, "--layers", "0,1,2", "--max-seq", "512", "--batch-tokens", "700",
        "--out", os.path.join(out, "teacher.h5"), *t, env=env)
    run("essence-project", "--in", os.path.join(out, "teacher.h5"), "--student", student, "--layer-map", "1:1,2:2",
        "--out", os.path.join(out, "student.h5"), *t, env=env)
    run("essence-align", "--model", student, "--data", os.path.join(out, "student.h5"), "--out", os.path.join(out, "aligned"),
        "--steps", "20", "--warmup", "2", "--lr", "1e-3", "--batch-tokens", "384", "--seq-len", "128", "--ce-weight", ce_weight,
        "--student-head", "linear", "--eval-every", "10", "--save-every", "20", *t, env=env)
    return out


def same_files(a, b):
    """Every file under a and b (checkpoints, optimizer state) byte for byte; not the metrics, whose
    tokens_per_s is a timing, nor the fingerprint, a hash of the command line (its paths differ)."""
    names = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, files in os.walk(a) for f in files)
    for name in names:
        if name.endswith(("metrics.jsonl", "loss.png", "fingerprint")):
            continue
        if not filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False):
            return name
    return None


def main():
    tmp = tempfile.mkdtemp()
    teacher = make_model(tmp, "teacher", "deepseek-v3.tokenizer.json.zst", 1, 2)
    student = make_model(tmp, "student", "qwen.tokenizer.json.zst", 2, 2)
    data = os.path.join(tmp, "texts.jsonl")
    subprocess.run([sys.executable, os.path.join(DEMO, "gen_corpus.py"), "--count", "24", "--seed", "3", "--out", data], check=True)
    compare = os.path.join(BUILD, "essence-inspect")
    for family in kernel_families():
        env = dict(os.environ)
        if family:
            env["OPENBLAS_CORETYPE"] = family
        label = family or "native"
        work = os.path.join(tmp, label)
        # the cross entropy over the 151,936-token vocabulary is the slow part: with the native kernels only
        ce_weight = "0.5" if family == kernel_families()[0] else "0"
        outs = [stages(work, teacher, student, data, threads, env, ce_weight) for threads in (1, 2, 3)]
        for stage in ("teacher.h5", "student.h5"):
            problems = []
            for other in outs[1:]:
                done = subprocess.run([compare, "compare", os.path.join(outs[0], stage), os.path.join(other, stage)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    problems.append(f"{os.path.basename(other)}: {done.stdout.strip().splitlines()[-1:]}")
            report(f"{label}_{stage.split('.')[0]}_h5_same_for_threads_1_2_3", not problems, "; ".join(problems))
        differing = [same_files(os.path.join(outs[0], "aligned"), os.path.join(o, "aligned")) for o in outs[1:]]
        report(f"{label}_align_weights_after_20_steps_same_for_threads_1_2_3", not any(differing), f"differs: {differing}")
        shutil.rmtree(work)


if __name__ == "__main__":
    run_main(main, "test_threads")
