"""`essence-inspect tokenize` against the Hugging Face goldens, every line of every file of every
fixture set (in-repo, and ../shared/fixtures when present): ids exact for both add_special_tokens settings, byte offsets exact where NFC leaves the text
unchanged, and --decode giving the golden decoded text."""
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, plain_file, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")


def run(args, stdin_path):
    with open(stdin_path, "rb") as stdin:
        done = subprocess.run([INSPECT, "tokenize", *args], stdin=stdin, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace").strip())
    # split on "\n" only: texts may hold U+2028 and other characters splitlines() breaks on
    return [json.loads(line) for line in done.stdout.decode().split("\n") if line]


def check(fixtures, name, tokenizer, goldens_path, tmp):
    tmp = os.path.join(tmp, fixtures.label)
    os.makedirs(tmp, exist_ok=True)
    tokenizer = plain_file(tokenizer, tmp)
    goldens = [json.loads(line) for line in open(goldens_path, encoding="utf-8")]
    for add_special in (False, True):
        rows = [g for g in goldens if g["add_special_tokens"] == add_special]
        texts = os.path.join(tmp, f"{name}-{add_special}.jsonl")
        with open(texts, "w", encoding="utf-8") as f:
            for g in rows:
                f.write(json.dumps({"text": g["text"]}, ensure_ascii=False) + "\n")
        args = ["--tokenizer", tokenizer, "--jsonl", texts] + (["--add-special-tokens"] if add_special else [])
        ours = run(args, os.devnull)
        bad_ids = [g["i"] for g, o in zip(rows, ours) if o["ids"] != g["ids"]]
        report(fixtures.name(f"cli_{name}_special_{add_special}_ids"), len(ours) == len(rows) and not bad_ids,
               f"{len(ours)} outputs for {len(rows)} texts; texts with other ids: {bad_ids[:5]}")
        stable = [(g, o) for g, o in zip(rows, ours) if unicodedata.normalize("NFC", g["text"]) == g["text"]]
        bad_spans = [g["i"] for g, o in stable if o["byte_offsets"] != g["byte_offsets"]]
        report(fixtures.name(f"cli_{name}_special_{add_special}_offsets"), not bad_spans,
               f"{len(bad_spans)} of {len(stable)} NFC-stable texts differ: {bad_spans[:5]}")
    rows = [g for g in goldens if "decoded" in g]
    ids_path = os.path.join(tmp, f"{name}-ids.jsonl")
    with open(ids_path, "w") as f:
        for g in rows:
            f.write(json.dumps({"ids": g["ids"]}) + "\n")
    decoded = run(["--tokenizer", tokenizer, "--decode", "--jsonl", ids_path], os.devnull)
    bad = [g["i"] for g, d in zip(rows, decoded) if d["text"] != g["decoded"]]
    report(fixtures.name(f"cli_{name}_decode"), len(decoded) == len(rows) and not bad, f"decoded texts differ: {bad[:5]}")


def main():
    tmp = tempfile.mkdtemp()
    for fixtures in fixture_sets("tokenize_cli"):
        for name, tokenizer, goldens in fixtures.tokenizer_goldens():
            check(fixtures, name, tokenizer, goldens, tmp)


if __name__ == "__main__":
    run_main(main, "test_tokenize_cli")
