"""The thread count changes no bit of any stage's output: essence-extract's latents,
essence-project's targets and essence-align's weights and optimizer state after 20 steps are
byte-identical for --threads 1, 2 and 3, with the OpenBLAS kernels this machine runs and with
the other kernel families its CPU can run (OPENBLAS_CORETYPE), since OpenBLAS picks others on
other CPUs. Models: a teacher of the real student's shape cut to width 360, MLP width 1000 and 2
layers (random weights from essence-inspect mkmodel: products large enough that OpenBLAS's threads
would cut them, inner dimensions over 320 and not multiples of 32; the real MLP width, 8960, only
made the generic kernels' run a minute long) with the in-repo tiny Llama's tokenizer, and the
in-repo tiny student (tests/fixtures); texts: the demo's corpus generator."""
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
ROOT = os.environ.get("ESSENCE_ROOT", ".")
DEMO = os.path.join(ROOT, "pipelines", "demo")


def run(program, *args, env=None):
    done = subprocess.run([os.path.join(BUILD, program), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(args)}: {done.stderr.strip()}")
    return done


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


def stages(tmp, teacher, student, data, threads, env):
    out = os.path.join(tmp, f"threads{threads}")
    os.makedirs(out)
    t = ["--threads", str(threads)]
    run("essence-extract", "--model", teacher, "--data", data, "--layers", "0,1,2", "--max-seq", "1024", "--batch-tokens", "700",
        "--out", os.path.join(out, "teacher.h5"), *t, env=env)
    run("essence-project", "--in", os.path.join(out, "teacher.h5"), "--student", student, "--layer-map", "1:1,2:2",
        "--out", os.path.join(out, "student.h5"), *t, env=env)
    run("essence-align", "--model", student, "--data", os.path.join(out, "student.h5"), "--out", os.path.join(out, "aligned"),
        "--steps", "20", "--warmup", "2", "--lr", "1e-3", "--batch-tokens", "512", "--seq-len", "128", "--ce-weight", "0.5",
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
    fixtures = repo_fixtures()
    teacher, student = os.path.join(tmp, "teacher-360"), fixtures.student
    with open(os.path.join(ROOT, "tests", "bench", "configs", "deepseek-r1-distill-qwen-1.5b.json")) as f:
        shape = json.load(f)
    shape["intermediate_size"] = 1000
    like = os.path.join(tmp, "teacher-360.json")
    with open(like, "w") as f:
        json.dump(shape, f)
    run("essence-inspect", "mkmodel", "--like", like, "--hidden", "360", "--layers", "2", "--seed", "5", "--out", teacher)
    shutil.copy(fixtures.teacher_tokenizer, os.path.join(teacher, "tokenizer.json"))
    data = os.path.join(tmp, "texts.jsonl")
    subprocess.run([sys.executable, os.path.join(DEMO, "gen_corpus.py"), "--count", "40", "--seed", "3", "--out", data], check=True)
    compare = os.path.join(BUILD, "essence-inspect")
    families = kernel_families()
    if os.environ.get("ESSENCE_SANITIZE"):
        # our thread pool is the same code whatever kernels OpenBLAS runs, and OpenBLAS is not instrumented
        for family in families[1:]:
            print(f"SKIP {family}_same_for_threads_1_2_3: under the sanitizers the first family only (make test runs each)")
        families = families[:1]
    for family in families:
        env = dict(os.environ)
        if family:
            env["OPENBLAS_CORETYPE"] = family
        label = family or "native"
        work = os.path.join(tmp, label)
        outs = [stages(work, teacher, student, data, threads, env) for threads in (1, 2, 3)]
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
