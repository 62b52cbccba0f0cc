"""essence-extract end to end, checked with h5py against the Hugging Face goldens of every fixture
set (the in-repo one, and ../shared/fixtures when present): ids input on both tiny models, real
text tokenised with the teacher's tokenizer, the chat template with DeepSeek-V3's; then, on the
in-repo teacher, independence from batching and sharding, resume after SIGKILL, and bad input."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, plain_file, read_safetensors, repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
EXTRACT = os.path.join(BUILD, "essence-extract")


def extract(*args, check=True):
    run = subprocess.run([EXTRACT, *args], capture_output=True, text=True)
    if check and run.returncode != 0:
        raise RuntimeError(f"essence-extract {' '.join(args)}: {run.stderr.strip()}")
    return run


def datasets(path):
    """Every dataset of a file as numpy arrays (ids as bytes), for exact comparisons."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def same_datasets(a, b):
    if sorted(a) != sorted(b):
        return f"datasets {sorted(set(a) ^ set(b))} differ"
    for name in a:
        if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name]):
            return f"{name} differs"
    return ""


def golden_ids(tmp, folder):
    goldens = read_safetensors(os.path.join(folder, "golden_hidden.safetensors"))
    path = os.path.join(tmp, "ids.jsonl")
    with open(path, "w") as f:
        for s in range(4):
            f.write(json.dumps({"id": f"seq{s}", "ids": [int(x) for x in goldens[f"seq{s}/input_ids"]]}) + "\n")
    return goldens, path


def check_goldens(tmp, fixtures, folder):
    model = os.path.basename(folder)
    tmp = os.path.join(tmp, model)
    os.makedirs(tmp)
    goldens, data = golden_ids(tmp, folder)
    n_layers = json.load(open(os.path.join(folder, "config.json")))["num_hidden_layers"]
    out = os.path.join(tmp, f"{model}.h5")
    extract("--model", folder, "--data", data, "--out", out,
            "--layers", ",".join(str(l) for l in range(n_layers + 1)), "--batch-tokens", "64")
    worst = 0.0
    with h5py.File(out, "r") as f:
        starts = f["/samples/token_start"][...]
        for s in range(4):
            for layer in range(n_layers + 1):
                want = goldens[f"seq{s}/embed" if layer == 0 else f"seq{s}/layer{layer:02d}"]
                got = f[f"/latents/layer_{layer:03d}"][starts[s]:starts[s + 1]]
                # bf16 keeps 8 significant bits: within half a unit in the last place, plus float noise
                excess = np.abs(got - want) - (2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max())
                worst = max(worst, float(excess.max()))
        ids_ok = all(np.array_equal(f["/tokens/id"][starts[s]:starts[s + 1]], goldens[f"seq{s}/input_ids"]) for s in range(4))
        names_ok = [x.decode() for x in f["/samples/id"][...]] == [f"seq{s}" for s in range(4)]
        attrs_ok = f.attrs["format"] == "essence.teacher" and int(f.attrs["format_version"]) == 1
    report(fixtures.name(f"{model}_latents_equal_goldens_within_bf16"), worst <= 0, f"exceeds bf16 rounding by {worst}")
    report(fixtures.name(f"{model}_ids_and_attributes"), ids_ok and names_ok and attrs_ok, "ids, sample ids or attributes differ")


def check_real_text(tmp, fixtures):
    """Texts tokenised by a teacher folder whose tokenizer_config.json adds the BOS (as R1-Distill's
    does) give the goldens' ids and spans with specials."""
    rows = [json.loads(line) for line in open(fixtures.teacher_bos_goldens, encoding="utf-8")]
    rows = [r for r in rows if r["add_special_tokens"] and r["text"]][:300]
    data = os.path.join(tmp, "texts.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": str(r["i"]), "text": r["text"]}, ensure_ascii=False) + "\n")
    folder = fixtures.teacher_folder(os.path.join(tmp, "teacher"))
    out = os.path.join(tmp, "text.h5")
    extract("--model", folder, "--data", data, "--out", out, "--layers", "1", "--max-seq", "100000")
    bad = []
    with h5py.File(out, "r") as f:
        starts, ids = f["/samples/token_start"][...], f["/tokens/id"][...]
        begin, end = f["/tokens/byte_start"][...], f["/tokens/byte_end"][...]
        text_bytes, text_start = f["/samples/text_bytes"][...], f["/samples/text_start"][...]
        for s, r in enumerate(rows):
            span = slice(starts[s], starts[s + 1])
            spans = np.stack([begin[span], end[span]], 1).tolist()
            text = bytes(text_bytes[text_start[s]:text_start[s + 1]]).decode()
            if ids[span].tolist() != r["ids"] or spans != r["byte_offsets"] or text != r["text"]:
                bad.append(r["i"])
    report(fixtures.name("real_text_ids_and_spans_equal_goldens"), not bad, f"samples {bad[:5]} differ")
    # essence-inspect sample shows the sample's tokens with their text pieces and latent norms
    shown = subprocess.run([os.path.join(BUILD, "essence-inspect"), "sample", out, "--index", "3"], capture_output=True, text=True)
    lines = [l for l in shown.stdout.splitlines()[2:] if l.strip()]
    want = rows[3]
    pieces_ok = len(lines) == len(want["ids"]) and all(
        l.split()[1] == str(i) and f"[{b}, {e})" in l for l, i, (b, e) in zip(lines, want["ids"], want["byte_offsets"]))
    norms_ok = all(float(l.split()[-1]) > 0 for l in lines)
    report(fixtures.name("inspect_sample_shows_tokens"), shown.returncode == 0 and pieces_ok and norms_ok, shown.stdout[:300] + shown.stderr)


def check_template(tmp, fixtures):
    """prompt/response samples: rendered with the default DeepSeek-R1 template, tokenised without
    added specials (the template holds the BOS), the rendered text stored."""
    # a random teacher with DeepSeek-V3's vocabulary size, so its special tokens are ids of the model
    config = json.load(open(os.path.join(fixtures.teacher, "config.json")))
    config["vocab_size"] = 129280
    like = os.path.join(tmp, "deepseek-like.json")
    json.dump(config, open(like, "w"))
    folder = os.path.join(tmp, "teacher-deepseek")
    subprocess.run([os.path.join(BUILD, "essence-inspect"), "mkmodel", "--like", like, "--layers", "1", "--out", folder],
                   check=True, capture_output=True)
    tokenizer = plain_file(fixtures.deepseek_tokenizer, tmp)
    os.symlink(tokenizer, os.path.join(folder, "tokenizer.json"))
    data = os.path.join(tmp, "chat.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "q1", "prompt": "What is 2+2?", "response": "<think>\nadd</think>\n4"}) + "\n")
        f.write(json.dumps({"id": "t1", "text": "plain text"}) + "\n")
    out = os.path.join(tmp, "chat.h5")
    extract("--model", folder, "--data", data, "--out", out, "--layers", "1")
    rendered = "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\nadd</think>\n4"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print(f"SKIP {fixtures.name('template_rendering')}: the Python package `tokenizers` is not installed")
        return
    reference = Tokenizer.from_file(tokenizer)
    with h5py.File(out, "r") as f:
        starts, text_start = f["/samples/token_start"][...], f["/samples/text_start"][...]
        text = bytes(f["/samples/text_bytes"][text_start[0]:text_start[1]]).decode()
        ids = f["/tokens/id"][starts[0]:starts[1]].tolist()
        plain_ids = f["/tokens/id"][starts[1]:starts[2]].tolist()
        flags = f["/samples/add_special_tokens"][...].tolist()
    ok = text == rendered and ids == reference.encode(rendered, add_special_tokens=False).ids
    ok = ok and plain_ids == reference.encode("plain text", add_special_tokens=True).ids and flags == [0, 1]
    report(fixtures.name("template_rendering"), ok, f"text {text!r}, ids {ids[:8]}, flags {flags}")


def check_batching_and_shards(tmp, model):
    data = os.path.join(tmp, "many.jsonl")
    rng = random.Random(5)
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    with open(data, "w") as f:
        for s in range(40):
            f.write(json.dumps({"id": f"s{s}", "ids": [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]}) + "\n")
    runs, device = {}, ""
    for label, extra in (("one_batch", ["--batch-tokens", "100000"]), ("small_batches", ["--batch-tokens", "37"])):
        out = os.path.join(tmp, f"{label}.h5")
        run = extract("--model", model, "--data", data, "--out", out, "--layers", "0,2,4", "--chunk-rows", "16", *extra)
        device = device or next((line for line in run.stderr.splitlines() if "depend on the batching" in line), "")
        runs[label] = datasets(out)
    parts = []
    for shard in range(3):
        out = os.path.join(tmp, f"shard{shard}.h5")
        extract("--model", model, "--data", data, "--out", out, "--layers", "0,2,4", "--shard", f"{shard}/3", "--chunk-rows", "16")
        parts.append(datasets(out))
    whole = runs["one_batch"]
    shards = {name: np.concatenate([p[name] for p in parts]) for name in whole if name.startswith(("latents/", "tokens/"))}
    counts = [p["samples/token_start"][-1] for p in parts]
    same_tokens = sum(counts) == whole["samples/token_start"][-1] and all(
        np.array_equal(shards[name], whole[name]) for name in shards if name.startswith("tokens/"))
    if not device:  # the kernels compute a row alike wherever it sits in a block: the same bits
        why = same_datasets(runs["one_batch"], runs["small_batches"])
        report("output_independent_of_batch_size", not why, why)
        ok = same_tokens and all(np.array_equal(shards[name], whole[name]) for name in shards)
        report("shards_concatenated_equal_whole", ok, "shard outputs differ")
    else:  # the device said its kernels do not: then at most one bf16 step apart (docs/engine.md)
        print(f"SKIP output_independent_of_batch_size_bit_for_bit: {device.split(': ', 1)[-1]}")
        why = within_a_bf16_step(runs["one_batch"], runs["small_batches"])
        report("output_independent_of_batch_size_within_a_bf16_step", not why, why)
        why = within_a_bf16_step({n: whole[n] for n in shards}, shards)
        report("shards_concatenated_equal_whole_within_a_bf16_step", same_tokens and not why, why or "tokens differ")
    return data, runs["one_batch"]


def within_a_bf16_step(a, b):
    """Every latent row within one bf16 rounding step (2^-8 relative, in norm) of the other, the rest
    equal but the statistics (sums over those latents)."""
    if sorted(a) != sorted(b):
        return f"datasets {sorted(set(a) ^ set(b))} differ"
    for name in a:
        if a[name].shape != b[name].shape:
            return f"{name}: shapes differ"
        if name.startswith("stats/"):
            continue  # sums over those latents
        if not name.startswith("latents/"):
            if not np.array_equal(a[name], b[name]):
                return f"{name} differs"
            continue
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        rows = np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(np.maximum(np.abs(x), np.abs(y)), axis=1), 1e-30)
        print(f"  {name}: {int((x != y).sum())} of {x.size} values differ, worst row {rows.max():.2e} relative")
        if rows.max() > 2.0 ** -8:
            return f"{name}: a row differs by {rows.max():.3g} relative, more than a bf16 step"
    return ""


def check_max_memory(tmp, model, data):
    """--max-memory too small for every layer streams them through two slots, then one: the same
    bytes as with every layer resident; too small for one layer is an error naming the sizes."""
    common = ["--model", model, "--data", data, "--layers", "0,2,4", "--batch-tokens", "64", "--max-seq", "64"]
    extract(*common, "--out", os.path.join(tmp, "resident.h5"))
    resident = datasets(os.path.join(tmp, "resident.h5"))
    seen = {}
    for kib in (4096, 3072, 2048, 1536, 1280, 1024, 896, 768, 640, 512, 384, 256):
        out = os.path.join(tmp, f"budget{kib}.h5")
        run = extract(*common, "--max-memory", f"{kib}K", "--out", out, check=False)
        slots = re.search(r"pass through (\d) slot", run.stderr)
        mode = slots.group(1) if slots else "resident" if run.returncode == 0 else "refused"
        if mode in seen:
            continue
        seen[mode] = (kib, run)
        if run.returncode == 0:
            why = same_datasets(datasets(out), resident)
            report(f"max_memory_{mode}{(' slot' if mode == '1' else ' slots') if slots else ''}_same_bytes".replace(' ', '_'), not why, f"{kib} KiB: {why}")
    print(f"  budgets: {', '.join(f'{mode} at {kib} KiB' for mode, (kib, _) in seen.items())}")
    report("max_memory_streams_through_two_then_one_slot", "2" in seen and "1" in seen, f"seen {sorted(seen)}")
    refused = seen.get("refused")
    report("max_memory_too_small_is_an_error", refused is not None and refused[1].returncode == 1 and "--max-memory" in refused[1].stderr,
           refused[1].stderr if refused else "no budget was refused")


def check_threads(tmp, model, data):
    """The thread count changes no bit: every product is cut into the same tiles whatever it is."""
    results = []
    for threads in ("1", "2", "3"):
        out = os.path.join(tmp, f"threads{threads}.h5")
        extract("--model", model, "--data", data, "--out", out, "--layers", "0,2,4", "--threads", threads)
        results.append(datasets(out))
    why = same_datasets(results[0], results[1]) or same_datasets(results[0], results[2])
    report("threads_1_2_3_byte_identical", not why, why)


def check_writer_thread(tmp, model, data):
    """With the writer thread (how a GPU run stores: $ESSENCE_WRITER_THREAD=1 runs it on the CPU
    too), batches computed ahead of the one being stored give the same file, and a batch whose
    hidden state is not finite is refused after the batches before it were committed. HDF5 keeps
    its error stacks per thread: the writer's prints nothing of its own either (it did, as
    "HDF5-DIAG" traces on a successful run, before the writer thread silenced its stack)."""
    results, noise = [], []
    for thread in ("0", "1"):
        out = os.path.join(tmp, f"writer{thread}.h5")
        run = subprocess.run([EXTRACT, "--model", model, "--data", data, "--out", out, "--layers", "0,2,4", "--batch-tokens", "40"],
                             capture_output=True, text=True, env={**os.environ, "ESSENCE_WRITER_THREAD": thread})
        if run.returncode:
            report("writer_thread_same_bytes", False, run.stderr.strip()[-300:])
            return
        results.append(datasets(out))
        noise += [line for line in run.stderr.splitlines() if "HDF5-DIAG" in line]
    why = same_datasets(results[0], results[1])
    report("writer_thread_same_bytes", not why, why)
    report("writer_thread_no_hdf5_traces", not noise, f"{len(noise)} HDF5-DIAG traces on stderr: {noise[:1]}")


def check_mkmodel_shapes(tmp, like):
    """mkmodel makes a loadable checkpoint; a config.json that disagrees with it is named."""
    inspect = os.path.join(BUILD, "essence-inspect")
    folder = os.path.join(tmp, "random-model")
    made = subprocess.run([inspect, "mkmodel", "--like", like, "--layers", "2", "--seed", "7", "--out", folder],
                          capture_output=True, text=True)
    data = os.path.join(tmp, "one-ids.jsonl")
    open(data, "w").write('{"ids": [1, 2, 3, 4]}\n')
    run = extract("--model", folder, "--data", data, "--out", os.path.join(tmp, "random.h5"), "--layers", "2", check=False)
    report("mkmodel_checkpoint_extracts", made.returncode == 0 and run.returncode == 0, made.stderr + run.stderr)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["intermediate_size"] += 8
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    out = os.path.join(tmp, "mismatch.h5")
    run = extract("--model", folder, "--data", data, "--out", out, "--layers", "1", check=False)
    report("bad_tensor_shape_names_tensor", run.returncode == 3 and "mlp.gate_proj.weight" in run.stderr and not os.path.exists(out),
           f"exit {run.returncode}: {run.stderr.strip()}")


def check_resume_after_kill(tmp, model, data):
    """A run killed at a random point and resumed writes the file the same run uninterrupted writes."""
    out = os.path.join(tmp, "killed.h5")
    args = ["--model", model, "--data", data, "--out", out, "--layers", "0,2,4", "--chunk-rows", "16",
            "--batch-tokens", "30", "--threads", "1"]
    started = time.monotonic()
    extract(*args)
    duration = time.monotonic() - started  # kills land inside a run of this length
    reference = datasets(out)
    rng = random.Random(11)
    problems, kills = [], 0
    for trial in range(8):
        for leftover in (out, out + ".partial"):
            if os.path.exists(leftover):
                os.remove(leftover)
        process = subprocess.Popen([EXTRACT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode != -signal.SIGKILL:
            continue  # it finished first: nothing to resume
        if os.path.exists(out):  # killed between its last rename and its exit: then it must be the whole file
            if same_datasets(datasets(out), reference):
                problems.append(f"trial {trial}: a killed run left an incomplete {out}")
            continue
        kills += 1
        run = extract(*args, "--resume", check=False)
        if run.returncode != 0:
            problems.append(f"trial {trial}: resume failed: {run.stderr.strip()}")
            continue
        why = same_datasets(datasets(out), reference)
        if why:
            problems.append(f"trial {trial}: {why}")
    if kills < 5:
        problems.append(f"only {kills} of 8 runs were killed before finishing")
    report("resume_after_sigkill_equals_uninterrupted", not problems, "; ".join(problems[:3]))


def check_bad_input(tmp, model, tokenizer):
    cases = {
        "malformed_line": ('{"text": "fine"}\n{"text": "oops"\n', ["--tokenizer", tokenizer], 3, ":2:"),
        "wrong_type": ('{"text": 17}\n', [], 3, 'field "text" is not a string'),
        "empty_text": ('{"text": ""}\n', ["--tokenizer", tokenizer], 3, "empty"),
        "ids_beyond_vocabulary": ('{"ids": [1, 2, 999999]}\n', [], 3, "ids[2]"),
        "layer_out_of_range": ('{"ids": [1]}\n', ["--layers", "9"], 2, "layer 9"),
    }
    for name, (text, extra, code, expect) in cases.items():
        data = os.path.join(tmp, f"{name}.jsonl")
        open(data, "w").write(text)
        out = os.path.join(tmp, f"{name}.h5")
        layers = [] if "--layers" in extra else ["--layers", "1"]
        run = extract("--model", model, "--data", data, "--out", out, *layers, *extra, check=False)
        ok = run.returncode == code and expect in run.stderr and not os.path.exists(out)
        report(f"bad_{name}", ok, f"exit {run.returncode}: {run.stderr.strip()}")
    run = extract("--model", os.path.join(tmp, "nowhere"), "--data", data, "--out", out, "--layers", "1", check=False)
    report("bad_missing_model", run.returncode in (2, 3) and "nowhere" in run.stderr, run.stderr.strip())
    # A sample longer than --max-seq is an error naming it; with --truncate it is cut, flagged and named.
    data = os.path.join(tmp, "long.jsonl")
    open(data, "w").write('{"id": "short", "ids": [7, 8]}\n{"id": "long", "ids": [1, 2, 3, 4, 5, 6]}\n')
    out = os.path.join(tmp, "long.h5")
    run = extract("--model", model, "--data", data, "--out", out, "--layers", "1", "--max-seq", "4", check=False)
    report("bad_text_longer_than_max_seq", run.returncode == 3 and "long.jsonl:2" in run.stderr and '"long"' in run.stderr
           and not os.path.exists(out), f"exit {run.returncode}: {run.stderr.strip()}")
    run = extract("--model", model, "--data", data, "--out", out, "--layers", "1", "--max-seq", "4", "--truncate", check=False)
    with h5py.File(out, "r") as f:
        ok = f["/samples/truncated"][...].tolist() == [0, 1] and f["/tokens/id"][...].tolist() == [7, 8, 1, 2, 3, 4]
    report("truncate_cuts_and_flags", run.returncode == 0 and ok and '"long"' in run.stderr, run.stderr.strip())


def main():
    tmp = tempfile.mkdtemp()
    for fixtures in fixture_sets("extract_goldens"):
        where = os.path.join(tmp, fixtures.label)
        os.makedirs(where)
        check_goldens(where, fixtures, fixtures.teacher)
        check_goldens(where, fixtures, fixtures.student)
        check_real_text(where, fixtures)
        check_template(where, fixtures)
    # properties of the program, not of a checkpoint: on the in-repo teacher
    repo = repo_fixtures()
    data, _ = check_batching_and_shards(tmp, repo.teacher)
    check_resume_after_kill(tmp, repo.teacher, data)
    check_threads(tmp, repo.teacher, data)
    check_writer_thread(tmp, repo.teacher, data)
    check_max_memory(tmp, repo.teacher, data)
    check_mkmodel_shapes(tmp, os.path.join(repo.student, "config.json"))
    check_bad_input(tmp, repo.teacher, repo.teacher_tokenizer)


if __name__ == "__main__":
    run_main(main, "test_extract")
