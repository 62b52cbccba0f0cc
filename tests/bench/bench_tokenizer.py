"""Tokenizer benchmark: essence against Hugging Face `tokenizers` (Rust core, one thread) in
the same run, on (a) the golden texts and (b) a 50 MB generated mixed-script corpus.
Reports load time and single-thread encode MB/s (add_special_tokens off) side by side."""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its pool
BUILD = os.environ.get("BUILD", "build")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.environ.get("ESSENCE_FIXTURES", os.path.join(ROOT, "tests", "fixtures"))
SHARED = os.environ.get("ESSENCE_SHARED_FIXTURES", os.path.join(ROOT, "..", "shared", "fixtures"))
CORPUS_MB = float(os.environ.get("ESSENCE_BENCH_TOKENIZER_MB", "50"))


def corpus(path, megabytes, seed=1234):
    """Deterministic mixed-script text: prose, code, numbers, CJK, Cyrillic, Arabic, emoji, spaces."""
    rng = random.Random(seed)
    words = ("the of and to in is that for it with as was on be by this reasoning model latent teacher student "
             "distillation step answer therefore because consider").split()
    scripts = ["的是不了人我在有他这中大来上国个到说们为子和你地出道也时年", "абвгдежзийклмнопрстуфхцчшщъыьэюя",
               "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "🤗🙂🚀🧠✨🔥👍🏽🎉", "αβγδεζηθικλμνξοπρστυφχψω"]
    code = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
            "SELECT id, name FROM users WHERE age > 30;", "<think>\nLet me check.\n</think>"]
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < megabytes * 1e6:
            parts = []
            for _ in range(rng.randint(20, 60)):
                kind = rng.random()
                if kind < 0.6:
                    parts.append(rng.choice(words) + rng.choice([" ", " ", " ", ", ", ". ", "\n"]))
                elif kind < 0.75:
                    s = rng.choice(scripts)
                    parts.append("".join(rng.choice(s) for _ in range(rng.randint(1, 12))) + " ")
                elif kind < 0.85:
                    parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))) + rng.choice([" ", ".", "%", "\n"]))
                elif kind < 0.95:
                    parts.append(rng.choice(code))
                else:
                    parts.append(" " * rng.randint(2, 9))
            text = "".join(parts)
            line = json.dumps({"text": text}, ensure_ascii=False)
            f.write(line + "\n")
            size += len(text.encode())


def golden_texts(goldens, path):
    with open(path, "w", encoding="utf-8") as out:
        for line in open(goldens, encoding="utf-8"):
            row = json.loads(line)
            if not row["add_special_tokens"]:
                out.write(json.dumps({"text": row["text"]}, ensure_ascii=False) + "\n")


def hf(tokenizer_path, texts_path, repeats):
    from tokenizers import Tokenizer
    start = time.perf_counter()
    tok = Tokenizer.from_file(tokenizer_path)
    load = time.perf_counter() - start
    texts = [json.loads(line)["text"] for line in open(texts_path, encoding="utf-8")]
    size = sum(len(t.encode()) for t in texts)
    start = time.perf_counter()
    for _ in range(repeats):
        tok.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return {"load_s": load, "mb_per_s": size * repeats / 1e6 / seconds}


def ours(tokenizer_path, texts_path, repeats):
    done = subprocess.run([os.path.join(BUILD, "bench", "bench_tokenizer"), tokenizer_path, texts_path, str(repeats)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main():
    try:
        import tokenizers
    except ImportError:
        print("bench_tokenizer: skipped: the Python package `tokenizers` is missing (make deps installs it)")
        return
    tmp = tempfile.mkdtemp()
    # the tokenizers the repository ships (with their in-repo goldens' texts), and Llama 3's where the
    # shared fixtures are present
    cases = []
    for name in ("deepseek-v3", "qwen"):
        plain = os.path.join(tmp, f"{name}.json")
        with open(os.path.join(FIXTURES, "tokenizers", f"{name}.json.zst"), "rb") as source, open(plain, "wb") as out:
            subprocess.run(["zstd", "-dq", "--long=27"], stdin=source, stdout=out, check=True)
        cases.append((name, plain, os.path.join(FIXTURES, "tokenizer-goldens", f"{name}.jsonl")))
    if os.path.isdir(os.path.join(SHARED, "tokenizers")):
        cases.append(("llama3", os.path.join(SHARED, "tokenizers", "llama3.json"), os.path.join(SHARED, "tokenizer-goldens", "llama3.jsonl")))
    else:
        print(f"bench_tokenizer: llama3.json left out: no shared fixtures at {SHARED}")
    big = os.path.join(tmp, "corpus.jsonl")
    corpus(big, CORPUS_MB)
    print(f"Tokenizer benchmark, one thread, add_special_tokens off; Hugging Face tokenizers {tokenizers.__version__}")
    print(f"{'tokenizer':<14} {'texts':<22} {'ours MB/s':>10} {'HF MB/s':>9} {'ratio':>7} {'ours load':>10} {'HF load':>8}")
    for name, path, goldens in cases:
        small = os.path.join(tmp, f"{name}-goldens.jsonl")
        golden_texts(goldens, small)
        for label, texts, repeats in ((f"golden texts x5", small, 5), (f"{CORPUS_MB:.0f} MB mixed corpus", big, 1)):
            a, b = ours(path, texts, repeats), hf(path, texts, repeats)
            print(f"{name:<14} {label:<22} {a['mb_per_s']:>10.2f} {b['mb_per_s']:>9.2f} {a['mb_per_s'] / b['mb_per_s']:>6.2f}x"
                  f" {a['load_s']:>9.3f}s {b['load_s']:>7.3f}s", flush=True)


if __name__ == "__main__":
    main()
