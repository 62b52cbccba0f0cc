"""essence-project end to end, checked with h5py and numpy: every stored target recomputed in
float64 from teacher.h5, /projection/omega and the stored standardisation; teacher_row re-derived
from the byte spans with the rule as DESIGN.md words it; the student's tokens against Hugging Face
`tokenizers`; shards read as one; independence from the thread count; the precision guard; bad input.

Teacher tiny-llama3, student tiny-qwen2, each with its own tokenizer, on a mixed corpus (prose, code,
math, CJK, emoji, numbers, chat-template special strings): the recomputation for every fixture set
(in the repository: the two small tokenizers; in ../shared/fixtures when present: Llama 3's and
Qwen3's), the other checks on the in-repo set."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
TEACHER_LAYERS = "1,2,4"
LAYER_MAP = "2:1,4:3"


def corpus():
    """Mixed texts; every kind in several variants so both tokenizers meet each."""
    prose = ["The committee postponed its decision until the spring, citing incomplete data.",
             "She'd never seen the lighthouse lit; tonight, though, it blazed across the bay.",
             "Reasoning step by step: first list the constraints, then eliminate the impossible cases."]
    code = ["def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
            "for (int i = 0; i < n; ++i) { sum += x[i] * w[i]; }  // dot product",
            "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;"]
    math = ["Let $f(x) = x^2 - 4x + 3$. Then $f'(x) = 2x - 4$, so the minimum is at $x = 2$.",
            "∫₀^∞ e^{-x²} dx = √π / 2, and ∑_{n≥1} 1/n² = π²/6.",
            "If 3x + 7 = 22 then x = 5; check: 3·5 + 7 = 22 ✓"]
    cjk = ["今天天气很好，我们去公园散步吧。", "日本語のテキストも正しく分割されるべきです。", "한국어 문장도 포함되어 있습니다."]
    emoji = ["Great job! 🎉🎉 Let's celebrate 🥳 with 👨‍👩‍👧‍👦 and 🇯🇵.", "Status: ✅ done, ❌ failed, ⚠️ warning 🤗"]
    numbers = ["The population was 8,045,311 in 2023; growth 1.75% (±0.02).", "π ≈ 3.14159265358979323846, e ≈ 2.718281828",
               "Order #0042-7781 shipped 2024-03-15T09:30:00Z, total $1,299.99"]
    special = ["<|begin_of_text|>System note<|eot_id|> then plain text.", "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
               "<think>\nThe user asks about 2+2.\n</think>\n\nThe answer is 4."]
    samples = []
    groups = [prose, code, math, cjk, emoji, numbers, special]
    for g, group in enumerate(groups):
        for i, text in enumerate(group):
            samples.append({"id": f"g{g}-{i}", "text": text})
    # mixtures, and the prompt/response form rendered with the DeepSeek-R1 template
    for i in range(6):
        mixed = " ".join(groups[(i + k) % len(groups)][(i * 7 + k) % 3 if len(groups[(i + k) % len(groups)]) > 2 else 0] for k in range(3))
        samples.append({"id": f"mix-{i}", "text": mixed})
        samples.append({"id": f"chat-{i}", "prompt": math[i % 3] + " " + cjk[i % 3],
                        "response": "<think>\n" + prose[i % 3] + "\n</think>\n\n" + emoji[i % 2] + " " + numbers[i % 3]})
    return samples


def run(program, *args):
    return subprocess.run([os.path.join(BUILD, program), *args], capture_output=True, text=True)


def must(program, *args):
    result = run(program, *args)
    if result.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(args)}: {result.stderr.strip()}")
    return result


def setup(tmp, fixtures):
    teacher = fixtures.teacher_folder(os.path.join(tmp, "teacher"), bos_config=False)
    student = os.path.join(tmp, "student")  # project needs only config.json and tokenizer.json
    os.makedirs(student)
    shutil.copy(os.path.join(fixtures.student, "config.json"), student)
    os.symlink(fixtures.student_tokenizer, os.path.join(student, "tokenizer.json"))
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for sample in corpus():
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    common = ["--model", teacher, "--data", data, "--layers", TEACHER_LAYERS, "--max-seq", "110", "--truncate", "--batch-tokens", "256"]
    must("essence-extract", *common, "--out", os.path.join(tmp, "t.h5"))
    must("essence-extract", *common[:6], "--out", os.path.join(tmp, "t-full.h5"))  # nothing truncated: the README's figures
    for shard in range(2):
        must("essence-extract", *common, "--shard", f"{shard}/2", "--out", os.path.join(tmp, f"t{shard}.h5"))
    return teacher, student


def read_all(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        out["@"] = dict(f.attrs)
    return out


def teacher_concat(paths):
    """The shards as one teacher file: rows, spans and texts concatenated in order."""
    parts = [read_all(p) for p in paths]
    t = {"latents": {}, "spans": [], "texts": [], "token_start": [0], "ids": [], "truncated": [], "add_special": []}
    for layer in TEACHER_LAYERS.split(","):
        t["latents"][int(layer)] = np.concatenate([p[f"latents/layer_{int(layer):03d}"] for p in parts]).astype(np.float64)
    for p in parts:
        ts, xs = p["samples/token_start"], p["samples/text_start"]
        for s in range(len(ts) - 1):
            t["spans"].append((p["tokens/byte_start"][ts[s]:ts[s + 1]], p["tokens/byte_end"][ts[s]:ts[s + 1]]))
            t["texts"].append(bytes(p["samples/text_bytes"][xs[s]:xs[s + 1]]))
            t["token_start"].append(t["token_start"][-1] + ts[s + 1] - ts[s])
        t["ids"] += [x.decode() if isinstance(x, bytes) else x for x in p["samples/id"]]
        t["truncated"] += list(p["samples/truncated"])
        t["add_special"] += list(p["samples/add_special_tokens"])
    return t, parts


def rule_rows(s_start, s_end, t_start, t_end, rule):
    """DESIGN.md "Token alignment", word for word."""
    rows = []
    for i in range(len(s_end)):
        row = -1
        for j in range(len(t_end)):
            if rule == "exact" and t_end[j] == s_end[i] and t_end[j] > t_start[j] and s_end[i] > s_start[i]:
                row = j
            if rule == "causal" and t_end[j] <= s_end[i]:
                row = j
        rows.append(row)
    return rows


def byte_offsets(text, offsets):
    """HF character offsets -> UTF-8 byte offsets."""
    position = [0]
    for ch in text:
        position.append(position[-1] + len(ch.encode("utf-8")))
    return [(position[a], position[b]) for a, b in offsets]


def check_student(out, teacher_paths, student, rule, input_norm, tolerance=5e-3, precision_name="fp32"):
    """Everything acceptance point 1 asks of one student.h5; returns (problems, aligned fraction, error)."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(os.path.join(student, "tokenizer.json"))
    t, parts = teacher_concat(teacher_paths)
    s = read_all(out)
    problems = []
    a = s["@"]
    if a["format"] != "essence.student" or int(a["format_version"]) != 1 or a["align"] != rule or a["input_norm"] != input_norm \
            or a["precision"] != precision_name or a["layer_map"] != LAYER_MAP:
        problems.append(f"attributes {a['format']} {a['align']} {a['input_norm']} {a['precision']} {a['layer_map']}")
    for key in ("teacher_fingerprints", "sigma", "seed", "model_config", "fingerprint", "created", "tool_version"):
        if key not in a:
            problems.append(f"attribute {key} missing")
    if a["teacher_fingerprints"] != ",".join(p["@"]["fingerprint"] for p in parts):
        problems.append("teacher_fingerprints differ from the teacher files'")
    # samples: the same, in the same order
    ids = [x.decode() if isinstance(x, bytes) else x for x in s["samples/id"]]
    if ids != t["ids"] or list(s["samples/truncated"]) != t["truncated"] or list(s["samples/add_special_tokens"]) != t["add_special"]:
        problems.append("samples differ from the teacher's")
    xs, ss = s["samples/text_start"], s["samples/token_start"]
    omega = s["projection/omega"].astype(np.float64)
    m, d = omega.shape
    if 2 * m != json.load(open(os.path.join(student, "config.json")))["hidden_size"]:
        problems.append(f"omega has {m} rows")
    expected_rows = []
    for k, text in enumerate(t["texts"]):
        if bytes(s["samples/text_bytes"][xs[k]:xs[k + 1]]) != text:
            problems.append(f"sample {k}: text differs")
            continue
        # the student's tokens are HF's (cut where the teacher stopped reading, for truncated samples)
        enc = hf.encode(text.decode("utf-8"), add_special_tokens=bool(t["add_special"][k]))
        spans = byte_offsets(text.decode("utf-8"), enc.offsets)
        ids_k, spans_k = list(enc.ids), spans
        if t["truncated"][k]:
            covered = int(t["spans"][k][1].max())
            keep = 0
            while keep < len(spans) and spans[keep][1] <= covered:
                keep += 1
            ids_k, spans_k = ids_k[:keep], spans[:keep]
        got_ids = list(s["tokens/id"][ss[k]:ss[k + 1]])
        got_start, got_end = s["tokens/byte_start"][ss[k]:ss[k + 1]], s["tokens/byte_end"][ss[k]:ss[k + 1]]
        if got_ids != ids_k:
            problems.append(f"sample {k}: student ids differ from HF tokenizers")
            continue
        # HF gives inserted specials [0, 0) and NFC-free text here, so spans must agree exactly
        if [(int(x), int(y)) for x, y in zip(got_start, got_end)] != [tuple(p) for p in spans_k]:
            problems.append(f"sample {k}: student spans differ from HF tokenizers")
        rows = rule_rows(got_start, got_end, t["spans"][k][0], t["spans"][k][1], rule)
        expected_rows += [r + t["token_start"][k] if r >= 0 else -1 for r in rows]
    teacher_row = s["tokens/teacher_row"]
    if list(teacher_row) != expected_rows:
        problems.append(f"teacher_row differs from the rule at {int(np.sum(np.array(expected_rows) != teacher_row))} tokens")
    aligned = teacher_row >= 0
    worst = 0.0
    for pair in LAYER_MAP.split(","):
        teacher_layer, student_layer = (int(x) for x in pair.split(":"))
        mean = s[f"projection/layer_{teacher_layer:03d}/input_mean"].astype(np.float64)
        scale = s[f"projection/layer_{teacher_layer:03d}/input_scale"].astype(np.float64)
        x = t["latents"][teacher_layer][teacher_row[aligned]]
        if input_norm == "rms":
            if not (np.all(mean == 0) and np.all(scale == 1)):
                problems.append("rms: stored mean/scale are not 0/1")
            x_hat = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True))
        else:
            # the stored standardisation is the teacher's statistics over all tokens of all shards
            all_rows = t["latents"][teacher_layer]
            want_mean, want_scale = all_rows.mean(axis=0), np.maximum(all_rows.std(axis=0), 1e-6)
            if np.max(np.abs(mean - want_mean) / want_scale) > 1e-5 or np.max(np.abs(scale / want_scale - 1)) > 1e-5:
                problems.append(f"layer {teacher_layer}: stored standardisation differs from the teacher's statistics")
            x_hat = (x - mean) / scale
        phases = x_hat @ omega.T
        want = np.sqrt(2.0) * np.concatenate([np.cos(phases), np.sin(phases)], axis=1)
        got = s[f"targets/layer_{student_layer:03d}"].astype(np.float64)
        error = np.linalg.norm(got[aligned] - want) / np.linalg.norm(want)
        worst = max(worst, error)
        if error > tolerance:
            problems.append(f"layer {student_layer}: relative Frobenius error {error:.2e} > {tolerance}")
        if np.any(got[~aligned] != 0):
            problems.append(f"layer {student_layer}: unaligned rows are not zero")
    return problems, float(np.mean(aligned)), worst


def test_recompute(tmp, student, fixtures):
    shards = [os.path.join(tmp, "t0.h5"), os.path.join(tmp, "t1.h5")]
    results = {}
    for rule, norm, sigma in (("exact", "standardize", "1.5"), ("causal", "rms", "3")):
        out = os.path.join(tmp, f"s-{rule}.h5")
        must("essence-project", "--in", ",".join(shards), "--student", student, "--out", out, "--layer-map", LAYER_MAP,
             "--align", rule, "--input-norm", norm, "--sigma", sigma, "--seed", "11")
        problems, fraction, worst = check_student(out, shards, student, rule, norm)
        print(f"  {fixtures.label}: {rule}/{norm}: aligned fraction {fraction:.4f}, worst relative error {worst:.2e}")
        report(fixtures.name(f"recompute_float64_{rule}_{norm}"), not problems, "; ".join(problems[:5]))
        results[rule] = fraction
    report(fixtures.name("aligned_fractions_plausible"), 0.5 < results["exact"] <= results["causal"] <= 1.0, str(results))
    # the README's figures: the whole corpus, nothing truncated
    figures = {}
    for rule in ("exact", "causal"):
        out = os.path.join(tmp, f"s-full-{rule}.h5")
        must("essence-project", "--in", os.path.join(tmp, "t-full.h5"), "--student", student, "--out", out, "--layer-map", LAYER_MAP,
             "--align", rule)
        with h5py.File(out, "r") as f:
            rows = f["/tokens/teacher_row"][...]
            figures[rule] = (int(np.sum(rows >= 0)), len(rows))
    print("  aligned fraction, %s teacher -> student tokenizers, %d samples: exact %d/%d = %.1f%%, causal %d/%d = %.1f%%" % (
        fixtures.label, len(corpus()), *figures["exact"], 100 * figures["exact"][0] / figures["exact"][1],
        *figures["causal"], 100 * figures["causal"][0] / figures["causal"][1]))
    # essence-inspect reports the same fraction, and the per-sample extremes
    shown = must("essence-inspect", os.path.join(tmp, "s-exact.h5")).stdout
    line = next((l for l in shown.splitlines() if l.startswith("aligned:")), "")
    report(fixtures.name("inspect_reports_aligned_fraction"), f"({100 * results['exact']:.1f}%)" in line and "aligned per sample: lowest" in shown,
           line or shown[:300])
    # shards read as one give what the whole file gives (the statistics merged as one)
    whole = os.path.join(tmp, "s-whole.h5")
    must("essence-project", "--in", os.path.join(tmp, "t.h5"), "--student", student, "--out", whole, "--layer-map", LAYER_MAP,
         "--sigma", "1.5", "--seed", "11")
    a, b = read_all(whole), read_all(os.path.join(tmp, "s-exact.h5"))
    same_rows = np.array_equal(a["tokens/teacher_row"], b["tokens/teacher_row"]) and np.array_equal(a["tokens/id"], b["tokens/id"])
    close = all(np.max(np.abs(a[k].astype(np.float64) - b[k])) <= 2 ** -7 for k in a if k.startswith("targets/"))
    report(fixtures.name("shards_read_as_one_equal_whole"), same_rows and close, f"rows equal {same_rows}, targets close {close}")


def test_threads(tmp, student):
    files = []
    for threads in ("1", "2", "3"):
        out = os.path.join(tmp, f"s-threads{threads}.h5")
        must("essence-project", "--in", os.path.join(tmp, "t.h5"), "--student", student, "--out", out, "--layer-map", LAYER_MAP,
             "--threads", threads, "--sigma", "2", "--seed", "3")
        files.append(read_all(out))
    differ = [k for k in files[0] if k != "@" and any(not np.array_equal(files[0][k], f[k]) for f in files[1:])]
    report("identical_datasets_whatever_threads", not differ, f"{differ} differ")
    again = os.path.join(tmp, "s-again.h5")
    must("essence-project", "--in", os.path.join(tmp, "t.h5"), "--student", student, "--out", again, "--layer-map", LAYER_MAP,
         "--threads", "2", "--sigma", "2", "--seed", "4")
    report("seed_changes_omega", not np.array_equal(read_all(again)["projection/omega"], files[0]["projection/omega"]), "same Ω")


def test_precision(tmp, student):
    teacher = os.path.join(tmp, "t.h5")
    base = ["--in", teacher, "--student", student, "--layer-map", LAYER_MAP]
    out = os.path.join(tmp, "s-bf16.h5")
    must("essence-project", *base, "--out", out, "--precision", "bf16", "--sigma", "1")
    problems, _, worst = check_student(out, [teacher], student, "exact", "standardize", tolerance=1e-2, precision_name="bf16")
    fp32 = os.path.join(tmp, "s-fp32.h5")
    must("essence-project", *base, "--out", fp32, "--sigma", "1")
    differs = not np.array_equal(read_all(out)["targets/layer_001"], read_all(fp32)["targets/layer_001"])
    print(f"  bf16 GEMM inputs at sigma 1: relative error {worst:.2e}")
    report("bf16_precision_within_its_predicted_error", not problems and differs, "; ".join(problems[:3]) or "no effect")
    for precision, sigma in (("bf16", "10"), ("fp8", "1")):
        refused = run("essence-project", *base, "--out", os.path.join(tmp, "s-refused.h5"), "--precision", precision, "--sigma", sigma)
        report(f"refuses_{precision}_at_sigma_{sigma}",
               refused.returncode == 2 and "--force-precision" in refused.stderr and "1%" in refused.stderr
               and not os.path.exists(os.path.join(tmp, "s-refused.h5")), refused.stderr.strip())
    forced = run("essence-project", *base, "--out", os.path.join(tmp, "s-forced.h5"), "--precision", "fp8", "--sigma", "1",
                 "--force-precision")
    report("force_precision_runs", forced.returncode == 0, forced.stderr.strip())


def test_bad_input(tmp, teacher_dir, student):
    teacher = os.path.join(tmp, "t.h5")
    base = ["--student", student, "--layer-map", LAYER_MAP]
    cases = {}
    # a teacher file from token ids: no text to align
    ids = os.path.join(tmp, "ids.jsonl")
    with open(ids, "w") as f:
        f.write('{"id": "x", "ids": [1, 2, 3]}\n')
    must("essence-extract", "--model", teacher_dir, "--data", ids, "--layers", TEACHER_LAYERS, "--out", os.path.join(tmp, "ids.h5"))
    cases["ids_only_teacher"] = (["--in", os.path.join(tmp, "ids.h5"), *base], 3, ["ids.h5", "token ids", "\"x\""])
    # D odd
    odd = os.path.join(tmp, "student-odd")
    os.makedirs(odd)
    config = json.load(open(os.path.join(student, "config.json")))
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]  # keep the heads as they are
    config["hidden_size"] = config["hidden_size"] - 1
    json.dump(config, open(os.path.join(odd, "config.json"), "w"))
    os.symlink(os.path.join(student, "tokenizer.json"), os.path.join(odd, "tokenizer.json"))
    cases["odd_student_width"] = (["--in", teacher, "--student", odd, "--layer-map", LAYER_MAP], 3, ["hidden_size", "odd"])
    # standardize without /stats
    no_stats = os.path.join(tmp, "no-stats.h5")
    shutil.copy(teacher, no_stats)
    with h5py.File(no_stats, "a") as f:
        del f["stats"]
    cases["standardize_without_stats"] = (["--in", no_stats, *base], 3, ["no-stats.h5", "/stats", "rms"])
    # a layer-map entry naming a layer the teacher file lacks
    cases["layer_the_teacher_lacks"] = (["--in", teacher, "--student", student, "--layer-map", "3:1"], 3, ["teacher layer 3", "t.h5", "1,2,4"])
    cases["student_layer_out_of_range"] = (["--in", teacher, "--student", student, "--layer-map", "2:9"], 2, ["student layer 9"])
    # a truncated file and a foreign HDF5 file
    cut = os.path.join(tmp, "cut.h5")
    with open(teacher, "rb") as f:
        blob = f.read()
    with open(cut, "wb") as f:
        f.write(blob[:len(blob) // 2])
    cases["truncated_hdf5"] = (["--in", cut, *base], 3, ["cut.h5"])
    foreign = os.path.join(tmp, "foreign.h5")
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(10)
    cases["foreign_hdf5"] = (["--in", foreign, *base], 3, ["foreign.h5", "not an essence teacher file"])
    cases["second_shard_missing"] = (["--in", teacher + "," + os.path.join(tmp, "nope.h5"), *base], 2, ["nope.h5"])
    # student folder without tokenizer.json
    no_tok = os.path.join(tmp, "student-no-tokenizer")
    os.makedirs(no_tok)
    shutil.copy(os.path.join(student, "config.json"), no_tok)
    cases["student_without_tokenizer"] = (["--in", teacher, "--student", no_tok, "--layer-map", LAYER_MAP], 3,
                                          ["student-no-tokenizer", "tokenizer.json"])
    for name, (args, code, words) in cases.items():
        out = os.path.join(tmp, f"bad-{name}.h5")
        result = run("essence-project", *args, "--out", out)
        leftover = [p for p in (out, out + ".partial") if os.path.exists(p)]
        ok = result.returncode == code and all(w in result.stderr for w in words) and not leftover
        report(f"bad_{name}", ok, f"exit {result.returncode} (want {code}), leftover {leftover}: {result.stderr.strip()}")


def test_corrupted_teacher(tmp, student):
    """Random bytes overwritten anywhere in teacher.h5: an error or a result, never a crash or a hang."""
    teacher = os.path.join(tmp, "t.h5")
    with open(teacher, "rb") as f:
        blob = f.read()
    rng = np.random.default_rng(2026)
    crashes, outcomes = [], {}
    for trial in range(40):
        data = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(data) - 16))
            data[at:at + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        path = os.path.join(tmp, "corrupt.h5")
        with open(path, "wb") as f:
            f.write(bytes(data))
        out = os.path.join(tmp, "s-corrupt.h5")
        try:
            result = subprocess.run([os.path.join(BUILD, "essence-project"), "--in", path, "--student", student, "--out", out,
                                     "--layer-map", LAYER_MAP], capture_output=True, text=True, timeout=60)
            code = result.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        outcomes[code] = outcomes.get(code, 0) + 1
        if code not in (0, 1, 3) or (code != 0 and os.path.exists(out)):
            crashes.append(f"trial {trial}: {code}")
        for leftover in (out, out + ".partial"):
            if os.path.exists(leftover):
                os.remove(leftover)
    print(f"  corrupted teacher files: exit codes {outcomes}")
    report("corrupted_teacher_never_crashes", not crashes, "; ".join(crashes))


def main():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("SKIP test_project: the Python package `tokenizers` is not installed (run make deps)")
        return
    with tempfile.TemporaryDirectory(prefix="essence-project-") as base:
        for fixtures in fixture_sets("project_recompute"):
            tmp = os.path.join(base, fixtures.label)
            os.makedirs(tmp)
            teacher_dir, student = setup(tmp, fixtures)
            test_recompute(tmp, student, fixtures)
        # the rest checks the program, not the fixtures: on the in-repo set (set up first)
        tmp = os.path.join(base, "repo")
        teacher_dir, student = os.path.join(tmp, "teacher"), os.path.join(tmp, "student")
        test_threads(tmp, student)
        test_precision(tmp, student)
        test_bad_input(tmp, teacher_dir, student)
        test_corrupted_teacher(tmp, student)


if __name__ == "__main__":
    run_main(main, "test_project")
