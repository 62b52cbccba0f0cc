"""essence-align end to end: the golden training step through the command line (--dump-step) for
every fixture set (in-repo, and ../shared/fixtures when present); on the in-repo set, the tiny
teacher → project → student run lowering the held-out latent MSE, bit-identical resume after
SIGKILL, data parallelism over MPI, bounded memory, and bad input."""
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, mpi_env, read_safetensors, repo_fixtures, report, run_main, write_safetensors  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
REPO = repo_fixtures()
STUDENT = REPO.student
GOLDEN = os.path.join(STUDENT, "golden_train_step.safetensors")
GOLDEN_FLAGS = ["--steps", "1", "--seq-len", "24", "--batch-tokens", "48", "--no-shuffle", "--eval-fraction", "0",
                "--latent-weight", "1", "--ce-weight", "0.5"]


def program(name):
    return os.path.join(BUILD, name)


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def must(args):
    result = run(args)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result


def golden_student(tmp, copies=1, extra=(), golden=GOLDEN):
    path = os.path.join(tmp, f"golden-{copies}{''.join(extra)}.h5")
    must([program("tests/tools/golden_student"), golden, path, str(copies), *extra])
    return path


def state_tensors(folder):
    return read_safetensors(os.path.join(folder, "essence-state", "state.safetensors"))


def latest_checkpoint(out):
    steps = [int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def test_golden_cli(tmp, fixtures):
    tmp = os.path.join(tmp, fixtures.label)
    os.makedirs(tmp)
    path = os.path.join(fixtures.student, "golden_train_step.safetensors")
    golden = read_safetensors(path)
    data = golden_student(tmp, golden=path)
    dump = os.path.join(tmp, "dump.safetensors")
    out = os.path.join(tmp, "golden-out")
    must([program("essence-align"), "--model", fixtures.student, "--data", data, "--out", out, *GOLDEN_FLAGS, "--dump-step", dump])
    got = read_safetensors(dump)
    # the targets went through bf16 in student.h5: the loss moves by that rounding only
    terms = {k: (float(got[k][0]), float(golden[k][0])) for k in ("loss", "latent_mse", "ce")}
    terms_ok = all(abs(a / b - 1) < 1e-3 for a, b in terms.values()) and abs(terms["ce"][0] / terms["ce"][1] - 1) < 1e-5
    worst, worst_name = 0.0, ""
    for name, want in golden.items():
        if not name.startswith("grad/"):
            continue
        grad = got[name]
        base = name[5:]
        if base in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = golden["embed_rows" if "embed" in base else "lm_head_rows"]
            grad = grad[rows]
        error = float(np.max(np.abs(grad - want)) / np.max(np.abs(want)))
        if error > worst:
            worst, worst_name = error, name
    print(f"  {fixtures.label}: CLI golden step: loss {terms['loss'][0]:.7f} (HF {terms['loss'][1]:.7f}), latent {terms['latent_mse'][0]:.7f} "
          f"(HF {terms['latent_mse'][1]:.7f}), ce {terms['ce'][0]:.7f} (HF {terms['ce'][1]:.7f}); worst gradient {worst:.2e} ({worst_name})")
    report(fixtures.name("golden_step_through_cli"), terms_ok and worst < 5e-3, f"{terms}, worst gradient {worst:.3g} at {worst_name}")


def test_student_head(tmp):
    out, dump = os.path.join(tmp, "head-out"), os.path.join(tmp, "head-dump.safetensors")
    must([program("essence-align"), "--model", STUDENT, "--data", golden_student(tmp), "--out", out, "--steps", "3", "--seq-len", "24",
          "--batch-tokens", "48", "--eval-fraction", "0", "--student-head", "linear", "--lr", "1e-2", "--dump-step", dump])
    head = read_safetensors(os.path.join(out, "student_head.safetensors")).get("student_head.layer_002.weight")
    grad = read_safetensors(dump).get("grad/student_head.layer_002.weight")
    ok = head is not None and head.shape == (48, 48) and not np.allclose(head, np.eye(48)) and grad is not None and np.any(grad != 0)
    # the head starts as the identity: the first step's model gradients equal those without a head
    plain = os.path.join(tmp, "plain-dump.safetensors")
    must([program("essence-align"), "--model", STUDENT, "--data", golden_student(tmp), "--out", os.path.join(tmp, "plain-out"),
          "--steps", "1", "--seq-len", "24", "--batch-tokens", "48", "--eval-fraction", "0", "--dump-step", plain])
    a, b = read_safetensors(dump), read_safetensors(plain)
    same = all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-9) for k in b if k.startswith("grad/model."))
    report("student_head_linear_trains_and_saves", ok and same, f"head saved {head is not None}, grads equal at identity {same}")


def test_grad_accum(tmp):
    """Two micro-batches of b equal one batch of 2b when each holds as many aligned tokens (the
    golden samples repeated: the same masks)."""
    data = golden_student(tmp, 2)
    flags = ["--model", STUDENT, "--data", data, "--steps", "3", "--seq-len", "24", "--eval-fraction", "0", "--no-shuffle",
             "--ce-weight", "0.5", "--save-every", "0", "--eval-every", "0"]
    one, two = os.path.join(tmp, "accum1"), os.path.join(tmp, "accum2")
    must([program("essence-align"), *flags, "--batch-tokens", "96", "--out", one])
    must([program("essence-align"), *flags, "--batch-tokens", "48", "--grad-accum", "2", "--out", two])
    a, b = state_tensors(latest_checkpoint(one)), state_tensors(latest_checkpoint(two))
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k.startswith("master/"))
    report("grad_accum_equals_bigger_batch", worst <= 1e-5, f"max difference {worst:.3g}")


def test_recompute(tmp):
    """--recompute: the same master weights and moments, bit for bit, after a few steps."""
    data = golden_student(tmp, 2)
    flags = ["--model", STUDENT, "--data", data, "--steps", "3", "--seq-len", "24", "--eval-fraction", "0", "--no-shuffle",
             "--ce-weight", "0.5", "--save-every", "0", "--eval-every", "0", "--batch-tokens", "96"]
    keep, redo = os.path.join(tmp, "keep"), os.path.join(tmp, "recompute")
    must([program("essence-align"), *flags, "--out", keep])
    must([program("essence-align"), *flags, "--recompute", "--out", redo])
    a, b = state_tensors(latest_checkpoint(keep)), state_tensors(latest_checkpoint(redo))
    same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    report("recompute_same_bits_through_cli", same, f"{sum(not np.array_equal(a[k], b[k]) for k in a)} tensors differ")


def make_pipeline_data(tmp, n_texts=300):
    """teacher tiny-llama3 -> essence-project -> student tiny-qwen2, each with its own tokenizer."""
    teacher = REPO.teacher_folder(os.path.join(tmp, "teacher"), bos_config=False)
    student = REPO.student_folder(os.path.join(tmp, "student"))
    rng = random.Random(7)
    words = ("we check whether the sum of two odd numbers is even so let n equal 2k plus 1 and m equal 2j plus 1 then n plus m "
             "equals 2 times k plus j plus 1 which is even therefore the claim holds wait let me verify with 3 and 5 giving 8").split()
    data = os.path.join(tmp, "texts.jsonl")
    with open(data, "w") as f:
        for i in range(n_texts):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"id": f"t{i}", "prompt": f"Question {i}: is {rng.randint(1, 99)} odd?", "response": text}) + "\n")
    teacher_h5, student_h5 = os.path.join(tmp, "teacher.h5"), os.path.join(tmp, "student.h5")
    must([program("essence-extract"), "--model", teacher, "--data", data, "--layers", "2,4", "--out", teacher_h5])
    must([program("essence-project"), "--in", teacher_h5, "--student", student, "--out", student_h5, "--layer-map", "2:1,4:2"])
    return student, student_h5


def metrics(out):
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [l for l in lines if "loss" in l], [l for l in lines if "eval_latent_mse" in l]


def test_end_to_end(tmp):
    """essence-align's defaults (500 steps, its learning rate, schedule and evaluation) but a
    quarter of their 8192-token batch: the data are some 21 k tokens, so even then each is seen
    about 50 times (with 8192 the drop was 62.5% for 61.6% here, in four times the time)."""
    student, data = make_pipeline_data(tmp)
    out = os.path.join(tmp, "e2e")
    # Under the sanitizers the steps after the first few run the same code again, slower: 50 steps
    # there (the output and metrics checks hold; what is learnt in 500 steps is make test's check).
    sanitized = bool(os.environ.get("ESSENCE_SANITIZE"))
    sanitized_steps = 50
    steps = ["--steps", str(sanitized_steps), "--eval-every", str(sanitized_steps // 2)] if sanitized else []
    started = time.time()
    result = run([program("essence-align"), "--model", student, "--data", data, "--out", out, "--batch-tokens", "2048", *steps])
    seconds = time.time() - started
    if result.returncode != 0:
        report("end_to_end_lowers_eval_latent_mse", False, result.stderr[-2000:])
        return student, data
    train, evals = metrics(out)
    first, last = evals[0], evals[-1]
    # the first eval line is after eval-every steps: the untrained baseline comes from a 0-step run
    base_out = os.path.join(tmp, "e2e-base")
    must([program("essence-align"), "--model", student, "--data", data, "--out", base_out, "--steps", "1", "--lr", "1e-12"])
    base = metrics(base_out)[1][-1]["eval_latent_mse"]
    drop = 1 - last["eval_latent_mse"] / base
    print(f"  end to end: {len(train)} steps in {seconds:.1f} s; eval latent MSE {base:.4f} -> {last['eval_latent_mse']:.4f} "
          f"({100 * drop:.1f}% lower; constant baseline {last['eval_const_mse']:.4f}, R² {last['eval_r2']:.3f}, cosine {last['eval_cosine']:.3f})")
    png = os.path.join(out, "loss.png")
    png_ok = os.path.exists(png) and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    hf_ok = all(os.path.exists(os.path.join(out, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))
    # the time is printed, not tested: speed is the benchmarks' business (a loaded machine is slower)
    if sanitized:
        print(f"SKIP end_to_end_lowers_eval_latent_mse: under the sanitizers {sanitized_steps} steps, not the default 500 "
              "(make test runs it)")
    else:
        report("end_to_end_lowers_eval_latent_mse", drop >= 0.30,
               f"drop {100 * drop:.1f}% in {seconds:.0f} s (first eval {first['eval_latent_mse']:.4f})")
    report("end_to_end_writes_loss_png_and_hf_folder", png_ok and hf_ok, f"png {png_ok}, HF files {hf_ok}")
    keys_ok = all(set(l) >= {"step", "loss", "latent_mse", "ce", "lr", "grad_norm", "tokens_per_s"} for l in train) and \
        all(set(l) >= {"eval_latent_mse", "eval_cosine", "eval_ce", "eval_const_mse", "eval_r2"} for l in evals)
    default_steps = int(next(l.split(":")[1] for l in must([program("essence-align"), "--print-config"]).stdout.splitlines()
                             if l.startswith("steps:")))
    want_steps = sanitized_steps if sanitized else default_steps
    report("metrics_lines_complete", keys_ok and len(train) == want_steps, f"{len(train)} train lines, {want_steps} steps")
    return student, data


def test_resume(tmp, student, data):
    flags = ["--model", student, "--data", data, "--steps", "40", "--save-every", "5", "--eval-every", "10", "--threads", "2",
             "--batch-tokens", "2048"]
    full = os.path.join(tmp, "full")
    must([program("essence-align"), *flags, "--out", full])
    killed = os.path.join(tmp, "killed")
    identical, attempts = False, 0
    for attempts in range(1, 4):
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([program("essence-align"), *flags, "--out", killed], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill once a checkpoint exists and before the end
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(killed) and any(d.startswith("checkpoint-") and not d.endswith(".partial") for d in os.listdir(killed)):
                time.sleep(random.Random(attempts).uniform(0.0, 0.5))
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            continue  # finished before the kill: try again
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        must([program("essence-align"), *flags, "--out", killed, "--resume"])
        a, b = state_tensors(latest_checkpoint(full)), state_tensors(latest_checkpoint(killed))
        identical = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        with open(os.path.join(full, "model.safetensors"), "rb") as f1, open(os.path.join(killed, "model.safetensors"), "rb") as f2:
            identical = identical and f1.read() == f2.read()
        break
    report("resume_after_sigkill_bit_identical", identical, f"after {attempts} attempt(s)")
    # latent only, deepest mapped layer 2 of 3: layer 3, the final norm and the head never train. No
    # gradients or moments are held for them, yet the checkpoint carries their moments as zeros and
    # their master weights as loaded; the trained tensors' moments moved.
    state = state_tensors(latest_checkpoint(full))
    given = read_safetensors(os.path.join(student, "model.safetensors"))
    frozen = [n for n in given if n.startswith("model.layers.2.") or n in ("model.norm.weight", "lm_head.weight")]
    bad = [n for n in frozen if state[f"m/{n}"].any() or state[f"v/{n}"].any() or not np.array_equal(state[f"master/{n}"], given[n])]
    moved = [n for n in given if n not in frozen and state[f"v/{n}"].any()]
    report("latent_only_frozen_tensors_saved_as_loaded", len(frozen) > 2 and not bad and len(moved) == len(given) - len(frozen),
           f"{len(frozen)} frozen, changed: {bad[:3]}; {len(moved)} of {len(given) - len(frozen)} trained tensors with moments")


def tied_student(tmp, student):
    """The student with its output head tied to the embedding (Qwen2-0.5B's and 1.5B's layout)."""
    folder = os.path.join(tmp, "student-tied")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(student):
        if name not in ("config.json", "model.safetensors") and not os.path.lexists(os.path.join(folder, name)):
            os.symlink(os.path.realpath(os.path.join(student, name)), os.path.join(folder, name))
    config = json.load(open(os.path.join(student, "config.json")))
    config["tie_word_embeddings"] = True
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    tensors = dict(read_safetensors(os.path.join(student, "model.safetensors")))
    del tensors["lm_head.weight"]
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return folder


def test_mpi(tmp, student, data):
    """Two ranks with batch b against one with 2b: the same weights to rounding. Each layer's
    gradients are summed while the backward goes on below it (align/reduce.c), so the cases cover
    what decides when a bucket is final: the plain student; a tied head (the embedding's bucket
    waits for the embedding's backward) with the linear heads and two micro-batches (only the
    last one's backward starts the sums); latent only (the layers above the last target idle)."""
    mpirun = shutil.which("mpirun")
    if not mpirun:
        print("SKIP mpi_two_ranks_equal_one: mpirun not found (apt-get install openmpi-bin)")
        return
    env = mpi_env()
    cases = [("mpi_two_ranks_equal_one", student, []),
             ("mpi_two_ranks_equal_one_tied_heads_accum", tied_student(tmp, student), ["--student-head", "linear", "--grad-accum", "2"]),
             ("mpi_two_ranks_equal_one_latent_only", student, ["--ce-weight", "0"])]
    for name, model, extra in cases:
        flags = ["--model", model, "--data", data, "--steps", "8", "--eval-every", "0", "--save-every", "0", "--threads", "1", *extra]
        one, two = os.path.join(tmp, name + "-np1"), os.path.join(tmp, name + "-np2")
        r1 = run([mpirun, "-np", "1", program("essence-align"), *flags, "--batch-tokens", "2048", "--out", one], env=env)
        r2 = run([mpirun, "-np", "2", program("essence-align"), *flags, "--batch-tokens", "1024", "--out", two], env=env)
        if r1.returncode or r2.returncode:
            report(name, False, (r1.stderr + r2.stderr)[-2000:])
            continue
        a, b = state_tensors(latest_checkpoint(one)), state_tensors(latest_checkpoint(two))
        worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k.startswith("master/"))
        print(f"  {' '.join(extra) or 'plain'}: mpirun -np 2 (batch b) vs -np 1 (batch 2b), 8 steps: max |Δ weight| {worst:.2e}")
        report(name, worst <= 1e-5, f"max difference {worst:.3g}")


def device_peaks(stderr):
    """Each rank's "device: 1.23 MiB held at most" line, in bytes."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    found = re.findall(r"device: ([0-9.]+) (B|KiB|MiB|GiB) held at most", stderr)
    return [float(value) * units[unit] for value, unit in found]


def test_zero1(tmp, student, data):
    """--zero1 shards AdamW's moments over the ranks (align/reduce.c): every bucket's owner alone
    updates it and broadcasts the weights. Two ranks with and without it must agree to the bit
    (master weights and moments of every checkpoint, the --dump-step gradients), hold less device
    memory with it, and resume exactly: a --zero1 checkpoint continued with and without --zero1."""
    mpirun = shutil.which("mpirun")
    if not mpirun:
        print("SKIP zero1_*: mpirun not found (apt-get install openmpi-bin)")
        return
    model = tied_student(tmp, student)  # the head is the embedding's bucket; the linear heads sit outside the arena
    flags = ["--model", model, "--data", data, "--steps", "8", "--eval-every", "0", "--save-every", "4", "--keep-checkpoints", "2",
             "--threads", "1", "--student-head", "linear", "--grad-accum", "2", "--batch-tokens", "1024"]
    outs, peaks = {}, {}
    for mode in ("plain", "zero1"):
        out = outs[mode] = os.path.join(tmp, "zero1-" + mode)
        extra = ["--zero1"] if mode == "zero1" else []
        result = run([mpirun, "-np", "2", program("essence-align"), *flags, *extra, "--out", out, "--dump-step",
                      os.path.join(tmp, f"zero1-{mode}-dump.safetensors")], env=mpi_env())
        if result.returncode:
            report("zero1_same_bits_as_replicated", False, result.stderr[-2000:])
            return
        peaks[mode] = device_peaks(result.stderr)
    differing = []
    for step in (4, 8):
        a = state_tensors(os.path.join(outs["plain"], f"checkpoint-{step}"))
        b = state_tensors(os.path.join(outs["zero1"], f"checkpoint-{step}"))
        differing += [f"{k} at step {step}" for k in a if k not in b or a[k].tobytes() != b[k].tobytes()]
    dumps = [read_safetensors(os.path.join(tmp, f"zero1-{mode}-dump.safetensors")) for mode in ("plain", "zero1")]
    differing += [f"dump {k}" for k in dumps[0] if k not in dumps[1] or dumps[0][k].tobytes() != dumps[1][k].tobytes()]
    print(f"  2 ranks, tied head + linear heads, 2 micro-batches: {len(differing)} state tensors differ with --zero1")
    report("zero1_same_bits_as_replicated", not differing, ", ".join(differing[:5]))
    print(f"  device memory held at most per rank: {peaks['plain']} bytes replicated, {peaks['zero1']} with --zero1")
    report("zero1_less_device_memory", len(peaks["plain"]) == 2 and len(peaks["zero1"]) == 2 and max(peaks["zero1"]) < min(peaks["plain"]),
           f"{peaks}")
    final = state_tensors(os.path.join(outs["plain"], "checkpoint-8"))
    for name, extra in (("zero1_resume_exact", ["--zero1"]), ("zero1_checkpoint_resumes_without_zero1", [])):
        out = os.path.join(tmp, name)
        shutil.copytree(outs["zero1"], out, ignore=shutil.ignore_patterns("checkpoint-8", "fingerprint"))
        result = run([mpirun, "-np", "2", program("essence-align"), *flags, *extra, "--out", out, "--resume"], env=mpi_env())
        got = state_tensors(latest_checkpoint(out)) if not result.returncode else {}
        differing = [k for k in final if k not in got or final[k].tobytes() != got[k].tobytes()]
        report(name, not result.returncode and "resumed from" in result.stderr and not differing,
               f"exit {result.returncode}, {len(differing)} tensors differ: {differing[:3]} {result.stderr[-600:]}")


def test_srun_without_mpi(tmp, student, data):
    """srun's ranks without MPI sum gradients through a device group (NCCL on cuda); on the CPU,
    which has none, they are refused (exit 2) before --out exists: never N independent runs."""
    out = os.path.join(tmp, "srun_cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX"))}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_ID="77")
    result = run([program("essence-align"), "--model", student, "--data", data, "--steps", "2", "--out", out], env=env)
    report("srun_ranks_without_mpi_on_cpu_refused", result.returncode == 2 and "without MPI" in result.stderr and not os.path.exists(out),
           f"exit {result.returncode}, exists {os.path.exists(out)}: {result.stderr.strip()[-400:]}")


def peak_rss_kb(args):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss, proc.returncode


def test_memory(tmp):
    if os.environ.get("ESSENCE_SANITIZE"):
        # AddressSanitizer's quarantine and shadow memory, not the program, set the peak there.
        print("SKIP peak_rss_bounded_whatever_the_data_size: RSS under AddressSanitizer says nothing of the program (make test runs it)")
        return
    small, large = golden_student(tmp, 200), golden_student(tmp, 2500)  # the file about 10x larger
    flags = ["--model", STUDENT, "--steps", "30", "--seq-len", "24", "--batch-tokens", "96", "--eval-every", "0", "--save-every", "0"]
    rss_small, rc1 = peak_rss_kb([program("essence-align"), *flags, "--data", small, "--out", os.path.join(tmp, "rss-small")])
    rss_large, rc2 = peak_rss_kb([program("essence-align"), *flags, "--data", large, "--out", os.path.join(tmp, "rss-large")])
    print(f"  peak RSS: {rss_small / 1024:.1f} MB with {os.path.getsize(small) / 1e6:.2f} MB of data, "
          f"{rss_large / 1024:.1f} MB with {os.path.getsize(large) / 1e6:.2f} MB (10x)")
    report("peak_rss_bounded_whatever_the_data_size", rc1 == 0 and rc2 == 0 and rss_large <= 1.10 * rss_small,
           f"{rss_small} kB vs {rss_large} kB (exit {rc1}, {rc2})")


def test_bad_input(tmp):
    golden = golden_student(tmp)
    cases = {}
    # target width != hidden size: the golden file (48 wide) for tiny-llama3 (64)
    cases["target_width"] = (["--model", REPO.teacher, "--data", golden], 3, ["48", "64"])
    # a mapped layer beyond the model: a one-layer student
    one_layer = os.path.join(tmp, "one-layer")
    must([program("essence-inspect"), "mkmodel", "--like", os.path.join(STUDENT, "config.json"), "--layers", "1", "--out", one_layer])
    cases["layer_beyond_model"] = (["--model", one_layer, "--data", golden], 3, ["layer", "2"])
    cases["empty_dataset"] = (["--model", STUDENT, "--data", golden_student(tmp, 0)], 3, ["no samples"])
    cases["nan_target"] = (["--model", STUDENT, "--data", golden_student(tmp, 1, ["nan"])], 3, ["sample 1", "seq1"])
    cases["missing_data"] = (["--model", STUDENT, "--data", os.path.join(tmp, "nope.h5")], 2, ["nope.h5"])
    for name, (args, code, words) in cases.items():
        out = os.path.join(tmp, f"bad-{name}")
        result = run([program("essence-align"), *args, "--out", out, "--steps", "2", "--seq-len", "24", "--batch-tokens", "48",
                      "--eval-fraction", "0"])
        no_checkpoint = not os.path.isdir(out) or not any(d.startswith("checkpoint-") for d in os.listdir(out))
        ok = result.returncode == code and all(w in result.stderr for w in words) and no_checkpoint
        report(f"bad_{name}", ok, f"exit {result.returncode} (want {code}): {result.stderr.strip()[-500:]}")


def test_disk_full(tmp):
    """A tmpfs that holds one checkpoint but not two: the second fails cleanly, the first stays valid."""
    if os.geteuid() != 0:
        print("SKIP checkpoint_disk_full: mounting a small tmpfs needs root")
        return
    flags = ["--model", STUDENT, "--data", golden_student(tmp, 4), "--save-every", "2", "--keep-checkpoints", "5", "--seq-len", "24",
             "--batch-tokens", "48", "--eval-fraction", "0"]
    # the disk's size from one checkpoint of this model: room for it and half of another
    probe = os.path.join(tmp, "disk-probe")
    must([program("essence-align"), *flags, "--steps", "2", "--out", probe])
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(probe, "checkpoint-2")) for f in files)
    mount = os.path.join(tmp, "small-disk")
    os.makedirs(mount)
    if run(["mount", "-t", "tmpfs", "-o", f"size={(3 * one // 2 + 65536) // 1024}k", "tmpfs", mount]).returncode != 0:
        print("SKIP checkpoint_disk_full: this machine does not allow mounting a tmpfs")
        return
    try:
        out = os.path.join(mount, "out")
        result = run([program("essence-align"), *flags, "--steps", "4", "--out", out])
        folders = sorted(os.listdir(out)) if os.path.isdir(out) else []
        valid = os.path.join(out, "checkpoint-2")
        intact = os.path.isdir(valid) and not any(f.endswith(".partial") for f in folders)
        if intact:
            state = state_tensors(valid)
            intact = len(state) > 0 and all(np.all(np.isfinite(v)) for v in state.values())
        report("checkpoint_disk_full", result.returncode == 1 and "No space left" in result.stderr and intact,
               f"exit {result.returncode}, folders {folders}: {result.stderr.strip()[-400:]}")
    finally:
        run(["umount", mount])


def main():
    with tempfile.TemporaryDirectory(prefix="essence-align-") as tmp:
        for fixtures in fixture_sets("align_golden_step"):
            test_golden_cli(tmp, fixtures)
        test_student_head(tmp)
        test_grad_accum(tmp)
        test_recompute(tmp)
        test_bad_input(tmp)
        test_memory(tmp)
        test_disk_full(tmp)
        student, data = test_end_to_end(tmp)
        test_resume(tmp, student, data)
        test_mpi(tmp, student, data)
        test_zero1(tmp, student, data)
        test_srun_without_mpi(tmp, student, data)


if __name__ == "__main__":
    run_main(main, "test_align")
