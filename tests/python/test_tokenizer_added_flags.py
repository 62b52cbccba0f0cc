"""Added tokens with every flag (lstrip, rstrip, single_word, normalized, special or not),
split exactly as Hugging Face `tokenizers` splits them. This test writes variants of Qwen-style
tokenizers (NFC normalizer, <think> and the chat tokens): the in-repo tiny-qwen2 and the shipped
Qwen tokenizer, and ../shared/fixtures' qwen3.json when present; it compares `essence-inspect
tokenize` with the `tokenizers` package on texts around the tokens."""
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

TEXTS = [
    "a <think> b", "x<think>y", "  <think>\t\n", "<think>", "</think>word", "word </think> word",
    "say </think>, then </think>_x and é</think>", "\u2000<think>\u3000end", "<think>  <think>  </think>",
    "café and cafe\u0301 and CAFÉ café", "hello hellothere _hello hello_ (hello) hello",
    "<tool_call>x</tool_call> <tool_call>", "<|im_start|>user\n hi <|im_end|>\n", "  <|im_end|>  x",
    "mixed<think>hello</think>café<|im_start|>", "", " ", "emoji 🤗<think>🤗",
    "café! cafe\u0301! a x b  x  x<think> x </think>", "e\u0301y \u0301y a\u0301y", "<think> </think>  x ",
    " world", "  two  spaces  ", "line one\nline two\n\n three \n", " ",
]


def variant(base, tmp, name, changes, extra, components=None):
    """Copies tokenizer.json with flags changed on existing added tokens, new ones added and
    components replaced."""
    data = json.loads(json.dumps(base))
    data.update(components or {})
    for token in data["added_tokens"]:
        token.update(changes.get(token["content"], {}))
    next_id = max(t["id"] for t in data["added_tokens"]) + 1
    for content, flags in extra:
        token = dict(id=next_id, content=content, single_word=False, lstrip=False, rstrip=False, normalized=True,
                     special=False)
        token.update(flags)
        data["added_tokens"].append(token)
        next_id += 1
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return path


def byte_offsets(text, char_offsets):
    starts = [0]
    for ch in text:
        starts.append(starts[-1] + len(ch.encode()))
    return [[starts[s], starts[e]] for s, e in char_offsets]


def main():
    try:
        from tokenizers import Tokenizer  # noqa: F401
    except ImportError:
        print("SKIP added_token_flags: the Python package `tokenizers` is not installed (make deps installs it)")
        return
    tmp = tempfile.mkdtemp()
    for fixtures in fixture_sets("added_token_flags"):
        if fixtures.label == "shared":
            sources = {"qwen3": fixtures.path("tokenizers", "qwen3.json")}
        else:
            sources = {"tiny-qwen2": fixtures.student_tokenizer, "qwen": fixtures.path("tokenizers", "qwen.json.zst")}
        for label, source in sources.items():
            folder = os.path.join(tmp, f"{fixtures.label}-{label}")
            os.makedirs(folder)
            check_variants(json.load(open(plain_file(source, folder), encoding="utf-8")), folder,
                           lambda name: fixtures.name(f"{label}_{name}"))


def check_variants(base, tmp, test_name):
    """Every variant of tokenizer.json `base`, both add_special_tokens settings: one PASS/FAIL each."""
    from tokenizers import Tokenizer
    variants = {
        "strip": ({"<think>": dict(lstrip=True, rstrip=True), "</think>": dict(single_word=True),
                   "<|im_end|>": dict(lstrip=True)}, []),
        "normalized": ({"<tool_call>": dict(normalized=True), "</think>": dict(rstrip=True, single_word=True)},
                       [("café", {}), ("hello", dict(single_word=True, normalized=False))]),
        "nfc_and_spaces": ({"<think>": dict(rstrip=True), "</think>": dict(lstrip=True, normalized=True)},
                           [("cafe\u0301!", dict(normalized=True)), (" x ", dict(lstrip=True, rstrip=True)),
                            ("\u0301y", dict(single_word=True, normalized=False))]),
        "special_flags": ({"<|im_start|>": dict(rstrip=True, single_word=True)},
                          [("cafe\u0301", dict(special=True, normalized=False, lstrip=True)),
                           ("hello", dict(normalized=True, lstrip=True, rstrip=True))]),
    }
    texts_path = os.path.join(tmp, "texts.jsonl")
    with open(texts_path, "w", encoding="utf-8") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    # Components the fixture files do not use: a String split with another behaviour, and a
    # ByteLevel post-processor that trims offsets (keeping a first token's prefix space).
    pre = json.loads(json.dumps(base["pre_tokenizer"]))
    pre["pretokenizers"].insert(0, {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithPrevious", "invert": False})
    trim = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    variants["string_split_and_trimmed_offsets"] = ({}, [], {"pre_tokenizer": pre, "post_processor": trim})
    for name, (changes, extra, *components) in variants.items():
        path = variant(base, tmp, name, changes, extra, components[0] if components else None)
        reference = Tokenizer.from_file(path)
        for add_special in (False, True):
            args = [INSPECT, "tokenize", "--tokenizer", path, "--jsonl", texts_path]
            if add_special:
                args.append("--add-special-tokens")
            run = subprocess.run(args, capture_output=True, text=True)
            if run.returncode != 0:
                report(test_name(f"{name}_special_{add_special}"), False, run.stderr.strip())
                continue
            ours = [json.loads(line) for line in run.stdout.split("\n") if line]
            bad = []
            for i, text in enumerate(TEXTS):
                want = reference.encode(text, add_special_tokens=add_special)
                got = ours[i] if i < len(ours) else {"ids": None, "byte_offsets": None}
                if got["ids"] != want.ids:
                    bad.append(f"{text!r}: ids {got['ids']} != {want.ids}")
                elif unicodedata.normalize("NFC", text) == text and got["byte_offsets"] != byte_offsets(text, want.offsets):
                    bad.append(f"{text!r}: spans {got['byte_offsets']} != {byte_offsets(text, want.offsets)}")
            report(test_name(f"{name}_special_{add_special}"), not bad, "; ".join(bad[:3]))


if __name__ == "__main__":
    run_main(main, "test_tokenizer_added_flags")
