"""essence-align on a JSONL of texts (cross entropy only, no teacher): the first step's loss on the
golden step's ids equals the golden training step's CE term; a corpus of real text records trains
(the loss goes down, eval_ce is logged); bad records exit 3 naming FILE:LINE; options that need
teacher targets exit 2; --resume refuses a checkpoint begun on another corpus."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, read_safetensors, repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
STUDENT = repo_fixtures().student
ALIGN = os.path.join(BUILD, "essence-align")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Knowledge is power, and power is knowledge.",
    "Where there is a will, there is a way.",
    "Actions speak louder than words.",
]


def run(args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_golden_ce(tmp, fixtures):
    """The acceptance: the golden step's 2 × 24 ids as {"id","ids"} records, seq-len 24, one
    global batch of 48 tokens: the first step's loss (CE alone) is the golden's CE term."""
    name = f"align_texts_first_step_is_golden_ce[{fixtures.label}]"
    golden_path = os.path.join(fixtures.student, "golden_train_step.safetensors")
    if not os.path.exists(golden_path):
        print(f"SKIP {name}: no {golden_path}", flush=True)
        return
    golden = read_safetensors(golden_path)
    ids = golden["input_ids"].reshape(2, 24)
    want = float(golden["ce"].reshape(-1)[0])
    data = write_jsonl(os.path.join(tmp, f"golden-{fixtures.label}.jsonl"),
                       [{"id": f"golden-{i}", "ids": [int(x) for x in row]} for i, row in enumerate(ids)])
    out = os.path.join(tmp, f"golden-out-{fixtures.label}")
    result = run([ALIGN, "--model", fixtures.student, "--data", data, "--out", out, "--steps", "1", "--seq-len", "24",
                  "--batch-tokens", "48", "--no-shuffle", "--eval-fraction", "0"])
    if result.returncode != 0:
        report(name, False, f"exit {result.returncode}: {result.stderr.strip()[-600:]}")
        return
    first = metrics(out)[0]
    ok = first["step"] == 1 and abs(first["ce"] / want - 1) < 1e-5 and first["loss"] == first["ce"] and first["latent_mse"] == 0
    print(f"  first step on texts: loss {first['loss']:.9g}, ce {first['ce']:.9g}; golden CE {want:.9g} "
          f"(relative difference {abs(first['ce'] / want - 1):.2e})", flush=True)
    report(name, ok, f"first step {first}, golden ce {want}")


def test_text_records_tokenise_as_hugging_face(tmp):
    """{"text"} records are encoded as Hugging Face's tokenizer encodes them with special tokens:
    the first step on the fixture's tokenizer goldens as texts has the CE of the same goldens'
    ids as {"ids"} records, to the bit."""
    goldens = os.path.join(repo_fixtures().root, "tokenizer-goldens", "tiny-qwen2.jsonl")
    with open(goldens) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["add_special_tokens"] and len(r["ids"]) >= 3][:24]
    texts = write_jsonl(os.path.join(tmp, "hf-texts.jsonl"), [{"id": f"t{i}", "text": r["text"]} for i, r in enumerate(rows)])
    ids = write_jsonl(os.path.join(tmp, "hf-ids.jsonl"), [{"id": f"t{i}", "ids": r["ids"]} for i, r in enumerate(rows)])
    ce = []
    for label, data in [("texts", texts), ("ids", ids)]:
        out = os.path.join(tmp, f"hf-{label}-out")
        result = run([ALIGN, "--model", STUDENT, "--data", data, "--out", out, "--steps", "1", "--seq-len", "64",
                      "--batch-tokens", "8192", "--no-shuffle", "--eval-fraction", "0"])
        if result.returncode != 0:
            report("align_texts_tokenised_as_hugging_face", False, f"{label}: exit {result.returncode}: {result.stderr.strip()[-400:]}")
            return
        ce.append(metrics(out)[0]["ce"])
    report("align_texts_tokenised_as_hugging_face", len(rows) == 24 and ce[0] == ce[1], f"{len(rows)} goldens, CE {ce}")


def corpus(tmp, name="corpus.jsonl", sentences=SENTENCES, copies=4):
    records = [{"id": f"s{k}-{i}", "text": s} for k in range(copies) for i, s in enumerate(sentences)]
    return write_jsonl(os.path.join(tmp, name), records)


TRAIN_FLAGS = ["--seq-len", "32", "--batch-tokens", "128", "--lr", "3e-3", "--warmup", "0", "--eval-fraction", "0.1",
               "--eval-every", "0", "--grad-clip", "1"]


def test_trains(tmp):
    data = corpus(tmp)
    out = os.path.join(tmp, "train-out")
    result = run([ALIGN, "--model", STUDENT, "--data", data, "--out", out, "--steps", "20", *TRAIN_FLAGS])
    if result.returncode != 0:
        report("align_texts_loss_goes_down", False, f"exit {result.returncode}: {result.stderr.strip()[-600:]}")
        return
    lines = metrics(out)
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_ce" in m]
    first = sum(m["ce"] for m in steps[:3]) / 3
    last = sum(m["ce"] for m in steps[-3:]) / 3
    print(f"  texts: mean CE of steps 1-3 {first:.4f}, of steps 18-20 {last:.4f}; eval CE {evals[-1]['eval_ce'] if evals else None}",
          flush=True)
    report("align_texts_loss_goes_down", len(steps) == 20 and last < 0.8 * first and all(m["latent_mse"] == 0 for m in steps),
           f"first {first}, last {last}")
    report("align_texts_eval_ce_logged", len(evals) == 1 and evals[0]["step"] == 20 and evals[0]["eval_ce"] > 0
           and "eval_latent_mse" not in evals[0], f"eval lines {evals}")
    report("align_texts_log_says_ce_only", "cross entropy only" in result.stderr, result.stderr.strip()[-400:])


def test_bad_records(tmp):
    good = json.dumps({"id": "a", "text": SENTENCES[0]})
    cases = [
        ("no_text", [good, json.dumps({"id": "b"})], ":2:"),
        ("not_json", [good, good, "{not json"], ":3:"),
        ("id_outside_vocabulary", [json.dumps({"id": "c", "ids": [1, 2, 100000]})], ":1:"),
        ("empty_text", [good, json.dumps({"id": "d", "text": ""})], ":2:"),
    ]
    for label, lines, where in cases:
        path = write_jsonl(os.path.join(tmp, f"bad-{label}.jsonl"), lines)
        result = run([ALIGN, "--model", STUDENT, "--data", path, "--out", os.path.join(tmp, f"bad-out-{label}"), "--steps", "1"])
        report(f"align_texts_bad_record_{label}", result.returncode == 3 and f"bad-{label}.jsonl{where}" in result.stderr,
               f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    empty = write_jsonl(os.path.join(tmp, "empty.jsonl"), [])
    result = run([ALIGN, "--model", STUDENT, "--data", empty, "--out", os.path.join(tmp, "empty-out"), "--steps", "1"])
    report("align_texts_empty_file", result.returncode == 3 and "empty.jsonl" in result.stderr and "no records" in result.stderr,
           f"exit {result.returncode}: {result.stderr.strip()[-400:]}")


def test_misuse(tmp):
    data = corpus(tmp, "misuse.jsonl", copies=1)
    for label, extra, needle in [("latent_weight", ["--latent-weight", "1"], "--latent-weight"),
                                 ("student_head_linear", ["--student-head", "linear"], "--student-head linear"),
                                 ("ce_weight_zero", ["--ce-weight", "0"], "--ce-weight")]:
        result = run([ALIGN, "--model", STUDENT, "--data", data, "--out", os.path.join(tmp, f"misuse-{label}"), "--steps", "1",
                      *extra])
        report(f"align_texts_usage_{label}", result.returncode == 2 and needle in result.stderr,
               f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    # --latent-weight 0 given explicitly is what texts train with: accepted
    result = run([ALIGN, "--model", STUDENT, "--data", data, "--out", os.path.join(tmp, "misuse-ok"), "--steps", "1",
                  "--latent-weight", "0", "--ce-weight", "0.5", "--seq-len", "32", "--batch-tokens", "64"])
    report("align_texts_latent_weight_zero_accepted", result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")


def test_resume_other_corpus(tmp):
    """A finished 4-step run with checkpoints 2 and 4; checkpoint-4 removed, as if the run had
    stopped after step 2. The same arguments on another corpus (same path, other records) are
    refused naming the data; the original corpus resumes from step 2."""
    data = corpus(tmp, "resume.jsonl")
    out = os.path.join(tmp, "resume-out")
    argv = [ALIGN, "--model", STUDENT, "--data", data, "--out", out, "--steps", "4", "--save-every", "2", *TRAIN_FLAGS]
    result = run(argv)
    if result.returncode != 0 or not os.path.isdir(os.path.join(out, "checkpoint-2")):
        report("align_texts_resume_refuses_other_corpus", False, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
        return
    shutil.rmtree(os.path.join(out, "checkpoint-4"))
    corpus(tmp, "resume.jsonl", sentences=SENTENCES[::-1])  # the same path, another corpus
    result = run(argv + ["--resume"])
    report("align_texts_resume_refuses_other_corpus",
           result.returncode == 2 and "other inputs or options" in result.stderr and "--data" in result.stderr,
           f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
    corpus(tmp, "resume.jsonl")  # the original corpus again: the checkpoint continues
    result = run(argv + ["--resume"])
    steps = [m["step"] for m in metrics(out) if "loss" in m] if result.returncode == 0 else []
    report("align_texts_resume_same_corpus_continues",
           result.returncode == 0 and "resumed from" in result.stderr and steps == [1, 2, 3, 4],
           f"exit {result.returncode}, steps {steps}: {result.stderr.strip()[-400:]}")


def main():
    with tempfile.TemporaryDirectory(prefix="essence-align-texts-") as tmp:
        for fixtures in fixture_sets("align_texts_golden_ce"):
            test_golden_ce(tmp, fixtures)
        test_text_records_tokenise_as_hugging_face(tmp)
        test_trains(tmp)
        test_bad_records(tmp)
        test_misuse(tmp)
        test_resume_other_corpus(tmp)


if __name__ == "__main__":
    run_main(main, "test_align_texts")
