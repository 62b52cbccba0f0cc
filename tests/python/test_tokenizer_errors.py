"""Bad tokenizer.json files and bad texts: a clear error, exit code 3, naming the file (and
the component or line). The tiny tokenizer itself must work and match Hugging Face."""
import copy
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")


def tokenize(path, stdin):
    return subprocess.run([INSPECT, "tokenize", "--tokenizer", path], input=stdin, capture_output=True)


def main():
    tmp = tempfile.mkdtemp()
    good = tiny_tokenizer()
    good_path = os.path.join(tmp, "good.json")
    json.dump(good, open(good_path, "w"), ensure_ascii=False)
    run = tokenize(good_path, "the cat and <think> in\n".encode())
    report("tiny_tokenizer_works", run.returncode == 0 and b'"ids"' in run.stdout, run.stderr.decode())
    try:
        from tokenizers import Tokenizer
        want = Tokenizer.from_file(good_path).encode("the cat and <think> in", add_special_tokens=False).ids
        got = json.loads(run.stdout)["ids"] if run.returncode == 0 else None
        report("tiny_tokenizer_matches_hf", got == want, f"{got} != {want}")
    except ImportError:
        print("SKIP tiny_tokenizer_matches_hf: the Python package `tokenizers` is not installed")

    def broken(name, change, expect):
        data = copy.deepcopy(good)
        change(data)
        path = os.path.join(tmp, f"{name}.json")
        if isinstance(data, str):
            open(path, "w").write(data)
        else:
            json.dump(data, open(path, "w"), ensure_ascii=False)
        run = tokenize(path, b"hello\n")
        err = run.stderr.decode()
        report(f"bad_{name}_exit_3", run.returncode == 3 and f"{name}.json" in err and expect in err and not run.stdout,
               f"exit {run.returncode}: {err.strip()}")

    broken("missing_model", lambda d: d.pop("model"), "model")
    broken("unknown_pre_tokenizer", lambda d: d["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Foo"}), "Foo")
    broken("unknown_normalizer", lambda d: d.update(normalizer={"type": "Lowercase2"}), "Lowercase2")
    broken("unknown_decoder", lambda d: d.update(decoder={"type": "WordPiece"}), "WordPiece")
    broken("unknown_model", lambda d: d["model"].update(type="Unigram"), "Unigram")
    broken("merge_unknown_token", lambda d: d["model"]["merges"].append("zz qq"), "zz")
    broken("invalid_regex", lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex="(unclosed"), "(unclosed")
    broken("added_token_without_id", lambda d: d["added_tokens"][0].pop("id"), "added_tokens[0]")

    truncated = os.path.join(tmp, "truncated.json")
    text = json.dumps(good, ensure_ascii=False)
    open(truncated, "w").write(text[: len(text) // 2])
    run = tokenize(truncated, b"x\n")
    report("bad_truncated_exit_3", run.returncode == 3 and "truncated.json" in run.stderr.decode(), run.stderr.decode())
    not_json = os.path.join(tmp, "not_json.json")
    open(not_json, "wb").write(b"\x00\x01binary")
    run = tokenize(not_json, b"x\n")
    report("bad_not_json_exit_3", run.returncode == 3 and "not_json.json" in run.stderr.decode(), run.stderr.decode())
    run = tokenize(os.path.join(tmp, "missing.json"), b"x\n")
    report("missing_file_exit_2", run.returncode == 2 and "missing.json" in run.stderr.decode(), run.stderr.decode())

    # Invalid UTF-8 text: an error naming the line (Hugging Face cannot take such text at all).
    run = tokenize(good_path, b"fine\nbad \xff\xfe text\n")
    err = run.stderr.decode()
    report("invalid_utf8_names_line", run.returncode == 3 and "<stdin>:2" in err and "UTF-8" in err, err)
    jsonl = os.path.join(tmp, "texts.jsonl")
    open(jsonl, "w").write('{"text": "ok"}\n{"text": 5}\n')
    run = subprocess.run([INSPECT, "tokenize", "--tokenizer", good_path, "--jsonl", jsonl], capture_output=True)
    err = run.stderr.decode()
    report("wrong_field_type_names_line", run.returncode == 3 and "texts.jsonl:2" in err and '"text"' in err, err)
    check_regex_failures(good, tmp)
    check_stage_tokenizer_failure(tmp)


def with_split_regex(good, tmp, name, pattern):
    data = copy.deepcopy(good)
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    path = os.path.join(tmp, f"{name}.json")
    json.dump(data, open(path, "w"), ensure_ascii=False)
    return path


def check_regex_failures(good, tmp):
    """A regex that PCRE2 cannot run to the end (Hugging Face's Rust regexes never fail) must not
    pass for "no more matches", which made the rest of the text one piece (other ids, exit 0)."""
    # Backtracking through 50,000 repeats of a group exhausts PCRE2's JIT stack: the interpreter
    # takes over and the pieces are Hugging Face's ("the" alone, not merged with the space).
    path = with_split_regex(good, tmp, "deep_backtracking", r"(?:a|b)*c|\s")
    text = "ab" * 50000 + "c the end"
    jsonl = os.path.join(tmp, "long.jsonl")
    open(jsonl, "w").write(json.dumps({"text": text}) + "\n")
    run = subprocess.run([INSPECT, "tokenize", "--tokenizer", path, "--jsonl", jsonl], capture_output=True)
    got = json.loads(run.stdout)["ids"] if run.returncode == 0 else None
    try:
        from tokenizers import Tokenizer
        want = Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
        report("regex_jit_stack_exhausted_matches_hf", got == want,
               f"exit {run.returncode}: {run.stderr.decode().strip()}; {len(got or [])} ids, Hugging Face {len(want)}")
    except ImportError:
        print("SKIP regex_jit_stack_exhausted_matches_hf: the Python package `tokenizers` is not installed")
    # Catastrophic backtracking reaches PCRE2's match limit: an error naming the line, exit 3.
    path = with_split_regex(good, tmp, "catastrophic", r"(a+)+$|\s")
    run = tokenize(path, b"fine\n" + b"a" * 40 + b"b\n")
    err = run.stderr.decode()
    report("regex_match_limit_exit_3", run.returncode == 3 and "<stdin>:2" in err and "catastrophic.json" in err and
           "match limit" in err and run.stdout.count(b"\n") == 1, f"exit {run.returncode}: {err.strip()}")


def check_stage_tokenizer_failure(tmp):
    """A text the tokenizer fails on in the middle of a file (sample 3 of 6: a regex at PCRE2's match
    limit) through essence-extract and essence-project: exit 3 naming the file and sample, no output
    under its final name. This is the path where project once leaked the encodings of the samples
    tokenised beside the failing one: run with ESSENCE_BUILD=build-asan and LeakSanitizer fails it."""
    fixtures = repo_fixtures()
    teacher, student = os.path.join(tmp, "stage-teacher"), os.path.join(tmp, "stage-student")
    os.makedirs(teacher), os.makedirs(student)
    for name in os.listdir(fixtures.teacher):
        if not name.startswith("golden"):
            os.symlink(os.path.join(fixtures.teacher, name), os.path.join(teacher, name))
    os.symlink(os.path.join(fixtures.student, "config.json"), os.path.join(student, "config.json"))
    data = json.load(open(fixtures.student_tokenizer, encoding="utf-8"))
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"] = {"Regex": r"(a+)+$|" + split["pattern"]["Regex"]}
    json.dump(data, open(os.path.join(student, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
    texts = os.path.join(tmp, "stage.jsonl")
    with open(texts, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"s{i}", "text": "a" * 40 + "b" if i == 3 else f"fine text number {i}"}) + "\n")
    layers = ["--layers", "2"]
    run = subprocess.run([os.path.join(BUILD, "essence-extract"), "--model", teacher, "--data", texts, *layers, "--out",
                          os.path.join(tmp, "stage-teacher.h5")], capture_output=True, text=True)
    if run.returncode != 0:
        report("project_tokenizer_fails_midway_exit_3", False, f"extract: {run.stderr.strip()}")
        return
    out = os.path.join(tmp, "stage-student.h5")
    run = subprocess.run([os.path.join(BUILD, "essence-project"), "--in", os.path.join(tmp, "stage-teacher.h5"), "--student",
                          student, "--out", out, "--layer-map", "2:1"], capture_output=True, text=True)
    left = [p for p in (out, out + ".partial") if os.path.exists(p)]
    report("project_tokenizer_fails_midway_exit_3", run.returncode == 3 and 'sample 3 ("s3")' in run.stderr and
           "match limit" in run.stderr and not left, f"exit {run.returncode}, left {left}: {run.stderr.strip()[-600:]}")
    out = os.path.join(tmp, "stage-teacher-2.h5")
    run = subprocess.run([os.path.join(BUILD, "essence-extract"), "--model", teacher, "--tokenizer", student, "--data", texts,
                          *layers, "--batch-tokens", "16", "--out", out], capture_output=True, text=True)
    report("extract_tokenizer_fails_midway_exit_3", run.returncode == 3 and "stage.jsonl:4" in run.stderr and
           "match limit" in run.stderr and not os.path.exists(out), f"exit {run.returncode}: {run.stderr.strip()[-600:]}")


if __name__ == "__main__":
    run_main(main, "test_tokenizer_errors")
