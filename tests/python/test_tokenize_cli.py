"""`essence-inspect tokenize` against the Hugging Face goldens, every line of every file:
ids exact for both add_special_tokens settings, byte offsets exact where NFC leaves the text
unchanged, and --decode giving the golden decoded text."""
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")
FIXTURES = os.environ.get("ESSENCE_FIXTURES", "../shared/fixtures")


def run(args, stdin_path):
    with open(stdin_path, "rb") as stdin:
        done = subprocess.run([INSPECT, "tokenize", *args], stdin=stdin, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace").strip())
    # split on "\n" only: texts may hold U+2028 and other characters splitlines() breaks on
    return [json.loads(line) for line in done.stdout.decode().split("\n") if line]


def check(name, tmp):
    tokenizer = os.path.join(FIXTURES, "tokenizers", f"{name}.json")
    goldens_path = os.path.join(FIXTURES, "tokenizer-goldens", f"{name}.jsonl")
    if not os.path.exists(tokenizer):
        print(f"SKIP cli_{name}: {tokenizer} not found (set ESSENCE_FIXTURES)")
        return
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
        report(f"cli_{name}_special_{add_special}_ids", len(ours) == len(rows) and not bad_ids,
               f"{len(ours)} outputs for {len(rows)} texts; texts with other ids: {bad_ids[:5]}")
        stable = [(g, o) for g, o in zip(rows, ours) if unicodedata.normalize("NFC", g["text"]) == g["text"]]
        bad_spans = [g["i"] for g, o in stable if o["byte_offsets"] != g["byte_offsets"]]
        report(f"cli_{name}_special_{add_special}_offsets", not bad_spans,
               f"{len(bad_spans)} of {len(stable)} NFC-stable texts differ: {bad_spans[:5]}")
    rows = [g for g in goldens if "decoded" in g]
    ids_path = os.path.join(tmp, f"{name}-ids.jsonl")
    with open(ids_path, "w") as f:
        for g in rows:
            f.write(json.dumps({"ids": g["ids"]}) + "\n")
    decoded = run(["--tokenizer", tokenizer, "--decode", "--jsonl", ids_path], os.devnull)
    bad = [g["i"] for g, d in zip(rows, decoded) if d["text"] != g["decoded"]]
    report(f"cli_{name}_decode", len(decoded) == len(rows) and not bad, f"decoded texts differ: {bad[:5]}")


def main():
    tmp = tempfile.mkdtemp()
    for name in ("llama3", "llama3_1", "qwen3", "deepseek_v3"):
        check(name, tmp)


if __name__ == "__main__":
    run_main(main, "test_tokenize_cli")
