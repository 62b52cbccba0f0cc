"""--resume refuses what another run began, and non-finite values are refused where they appear.

Resume keys: a .partial (extract, project) or a checkpoint (align) begun with other inputs or
options is refused with exit 2 naming what differs, and left untouched; the same arguments resume.
A fresh essence-align into a --out holding checkpoints is refused unless --force, which clears them.
NaN/Inf: in the teacher's hidden states (a checkpoint with NaN weights), in a teacher.h5 latent, in
a student.h5 target: exit 3 naming the file, sample and layer, nothing left that looks complete."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import h5_content, models, must, program, reset, run, same_content, write_corpus  # noqa: E402
from testing import repo_fixtures, report, run_main  # noqa: E402


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def committed_partial(argv, out):
    """Kills argv at growing fractions of its run time until it leaves OUT.partial holding a commit."""
    reset(out, out + ".partial")
    started = time.monotonic()
    must(os.path.basename(argv[0]), *argv[1:])
    duration = time.monotonic() - started
    for fraction in (0.5, 0.3, 0.7, 0.2, 0.8, 0.9, 0.4, 0.6):
        reset(out, out + ".partial")
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if os.path.exists(out + ".partial") and not os.path.exists(out):
            try:
                with h5py.File(out + ".partial", "r") as f:
                    if int(f.attrs.get("commit", 0)) > 0:
                        return True
            except OSError:
                pass
    return False


def check_refusals(name, argv, out, changes):
    """changes: (label, argv with one thing changed, the words the message must hold)."""
    reference = None
    must(os.path.basename(argv[0]), *argv[1:])
    reference = h5_content(out)
    if not committed_partial(argv, out):
        report(f"{name}_resume_refuses_other_runs", False, "could not leave a committed .partial by killing the run")
        return
    before = digest(out + ".partial")
    for label, changed, words in changes:
        result = subprocess.run(changed + ["--resume"], capture_output=True, text=True, timeout=120)
        ok = (result.returncode == 2 and all(w in result.stderr for w in words) and out + ".partial" in result.stderr
              and digest(out + ".partial") == before and not os.path.exists(out))
        report(f"{name}_resume_refuses_{label}", ok, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    result = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=120)
    why = same_content(h5_content(out), reference) if result.returncode == 0 else result.stderr.strip()[-300:]
    report(f"{name}_resume_same_arguments_continues", result.returncode == 0 and "committed samples" in result.stderr and not why,
           why)


def check_damaged_record(argv, out):
    """A byte flipped inside the newest commit record of a .partial: --resume refuses (exit 3)
    naming the record, and keeps the .partial for the user to remove."""
    if not committed_partial(argv, out):
        report("extract_damaged_commit_record_refused", False, "could not leave a committed .partial by killing the run")
        return
    partial = out + ".partial"
    with h5py.File(partial, "r") as f:
        number = int(f.attrs["commit"])
        record = f[f"/_commit/record_{number}"]
        offset, size = record.id.get_offset(), record.shape[0]
    with open(partial, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x5A]))
    result = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=120)
    with h5py.File(partial, "r") as f:  # kept as it was (HDF5's open flags in the superblock aside)
        kept = int(f.attrs["commit"]) == number and f"/_commit/record_{number}" in f
    ok = (result.returncode == 3 and f"/_commit/record_{number}" in result.stderr and "damaged" in result.stderr
          and partial in result.stderr and kept and not os.path.exists(out))
    report("extract_damaged_commit_record_refused", ok, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    must(os.path.basename(argv[0]), *argv[1:])  # a fresh run without --resume starts again: the later checks read OUT


def copy_model(source, dest, poison=None):
    """A real copy of a model folder; poison = (tensor name, value) writes value over that tensor."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(source):
        shutil.copy(os.path.realpath(os.path.join(source, name)), os.path.join(dest, name))
    if poison:
        index = os.path.join(dest, "model.safetensors.index.json")
        shard = json.load(open(index))["weight_map"][poison[0]] if os.path.exists(index) else "model.safetensors"
        path = os.path.join(dest, shard)
        blob = bytearray(open(path, "rb").read())
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + header_len])
        info = header[poison[0]]
        start, end = (8 + header_len + x for x in info["data_offsets"])
        pattern = {"F32": np.float32, "F16": np.float16}.get(info["dtype"])
        if pattern is not None:
            blob[start:end] = np.full((end - start) // np.dtype(pattern).itemsize, poison[1], pattern).tobytes()
        else:  # BF16: the top half of a float32
            blob[start:end] = (np.full((end - start) // 2, poison[1], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        open(path, "wb").write(bytes(blob))
    return dest


def check_align(tmp, student, student_h5):
    out = os.path.join(tmp, "aligned")
    base = [program("essence-align"), "--model", student, "--data", student_h5, "--out", out, "--steps", "4", "--save-every", "2",
            "--seq-len", "32", "--batch-tokens", "64", "--eval-every", "0", "--threads", "1"]
    must("essence-align", *base[1:])
    for label, extra, word in (("lr", ["--lr", "2e-4"], "--lr"), ("seed", ["--seed", "1"], "--seed")):
        result = subprocess.run(base + extra + ["--resume"], capture_output=True, text=True, timeout=120)
        ok = result.returncode == 2 and word in result.stderr and "checkpoint-4" in result.stderr
        report(f"align_resume_refuses_{label}", ok, f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    result = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=120)
    report("align_resume_same_arguments_continues", result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-300:])
    # a fresh run into the used folder: refused, naming what is there; --force clears it
    fresh = base[:base.index("--steps")] + ["--steps", "2", "--save-every", "1", "--seq-len", "32", "--batch-tokens", "64",
                                            "--eval-every", "0", "--threads", "1"]
    result = subprocess.run(fresh, capture_output=True, text=True, timeout=120)
    ok = result.returncode == 2 and "checkpoint-4" in result.stderr and "--force" in result.stderr and \
        os.path.isdir(os.path.join(out, "checkpoint-4"))
    report("align_fresh_run_refuses_used_out", ok, f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    result = subprocess.run(fresh + ["--force"], capture_output=True, text=True, timeout=120)
    left = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    report("align_force_clears_the_other_runs_checkpoints", result.returncode == 0 and left == ["checkpoint-1", "checkpoint-2"],
           f"exit {result.returncode}, checkpoints {left}: {result.stderr.strip()[-300:]}")


def check_non_finite(tmp, teacher, student, data, teacher_h5, student_h5):
    # extract: NaN weights in decoder layer 2 (0-based model.layers.1) give a NaN hidden state from layer 2 on
    names = json.load(open(os.path.join(teacher, "model.safetensors.index.json")))["weight_map"]
    tensor = next(k for k in names if k.startswith("model.layers.1.") and "down_proj" in k)
    poisoned = copy_model(teacher, os.path.join(tmp, "poisoned"), (tensor, np.nan))
    out = os.path.join(tmp, "nan.h5")
    result = run("essence-extract", "--model", poisoned, "--data", data, "--layers", "1,2,4", "--out", out)
    ok = (result.returncode == 3 and "layer 2" in result.stderr and "not finite" in result.stderr and f"{data}:1:" in result.stderr
          and poisoned in result.stderr and not os.path.exists(out) and not os.path.exists(out + ".partial"))
    report("extract_nan_weights_refused_naming_layer", ok, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    # the same through the writer thread (how a GPU run stores), batches after the bad one computed ahead
    threaded = subprocess.run([program("essence-extract"), "--model", poisoned, "--data", data, "--layers", "1,2,4", "--out", out,
                               "--batch-tokens", "40"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "ESSENCE_WRITER_THREAD": "1"})
    ok = (threaded.returncode == 3 and "not finite" in threaded.stderr and f"{data}:1:" in threaded.stderr
          and not os.path.exists(out) and not os.path.exists(out + ".partial"))
    report("extract_nan_weights_refused_through_the_writer_thread", ok, f"exit {threaded.returncode}: {threaded.stderr.strip()[-400:]}")
    # project: a NaN latent in the teacher file
    bad_teacher = os.path.join(tmp, "nan-teacher.h5")
    shutil.copy(teacher_h5, bad_teacher)
    with h5py.File(bad_teacher, "r+") as f:
        f["/latents/layer_002"][3, 0] = np.nan
    out = os.path.join(tmp, "nan-student.h5")
    result = run("essence-project", "--in", bad_teacher, "--student", student, "--out", out, "--layer-map", "2:1,4:3")
    ok = (result.returncode == 3 and "layer_002 row 3" in result.stderr and "not finite" in result.stderr and
          bad_teacher in result.stderr and not os.path.exists(out) and not os.path.exists(out + ".partial"))
    report("project_nan_latent_refused_naming_row", ok, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    # align: a NaN target in the student file
    bad_student = os.path.join(tmp, "nan-targets.h5")
    shutil.copy(student_h5, bad_student)
    with h5py.File(bad_student, "r+") as f:
        f["/targets/layer_001"][0, 5] = np.inf
    out = os.path.join(tmp, "nan-aligned")
    result = run("essence-align", "--model", student, "--data", bad_student, "--out", out, "--steps", "2", "--seq-len", "32",
                 "--batch-tokens", "4096", "--eval-fraction", "0", "--no-shuffle")
    ok = (result.returncode == 3 and "target layer 1" in result.stderr and "non-finite" in result.stderr and
          bad_student in result.stderr and not os.path.exists(os.path.join(out, "fingerprint")))
    report("align_nan_target_refused_naming_layer", ok, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")


def main():
    with tempfile.TemporaryDirectory(prefix="essence-resume-") as tmp:
        teacher, student = models(tmp)
        data = write_corpus(os.path.join(tmp, "data.jsonl"), 200, words=30)
        other_data = write_corpus(os.path.join(tmp, "other.jsonl"), 200, seed=7, words=30)
        other_model = copy_model(teacher, os.path.join(tmp, "other-teacher"))
        last_shard = sorted(n for n in os.listdir(other_model) if n.startswith("model-"))[-1]
        with open(os.path.join(other_model, last_shard), "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x00\x80\x3f")  # the last weight becomes 1.0: another checkpoint
        out = os.path.join(tmp, "t.h5")
        extract = [program("essence-extract"), "--model", teacher, "--data", data, "--layers", "1,2,4", "--out", out,
                   "--batch-tokens", "64", "--threads", "1"]
        def changed(flag, value):
            argv = list(extract)
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
            return argv
        check_refusals("extract", extract, out, [
            ("other_data", changed("--data", other_data), ["--data"]),
            ("other_layers", changed("--layers", "1,2"), ["--layers", "1,2,4 there, 1,2 now"]),
            ("other_model", changed("--model", other_model), ["--model"]),
            ("other_max_seq", changed("--max-seq", "100"), ["--max-seq"]),
            # the same weights and tokenizer.json, and a tokenizer_config.json naming a BOS token
            ("other_tokenizer_config", changed("--model", repo_fixtures().teacher_folder(os.path.join(tmp, "teacher-bos"), bos_config=True)),
             ["tokenizer_config.json"]),
        ])
        check_damaged_record(extract, out)
        other_teacher = os.path.join(tmp, "t-other.h5")
        must("essence-extract", *changed("--data", other_data)[1:-6], "--out", other_teacher)
        student_h5 = os.path.join(tmp, "s.h5")
        project = [program("essence-project"), "--in", out, "--student", student, "--out", student_h5, "--layer-map", "2:1,4:3",
                   "--threads", "1"]
        def project_with(flag, value):
            argv = list(project)
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
            return argv
        check_refusals("project", project, student_h5, [
            ("other_seed", project_with("--seed", "1"), ["--seed"]),
            ("other_teacher", project_with("--in", other_teacher), ["--in"]),
        ])
        check_align(tmp, student, student_h5)
        check_non_finite(tmp, teacher, student, data, out, student_h5)


if __name__ == "__main__":
    run_main(main, "test_resume_checks")
