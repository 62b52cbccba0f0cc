"""Unicode normalization against Hugging Face `tokenizers`, live: texts that put every combining
mark (canonical combining class != 0), every canonical composition and every compatibility
decomposition next to base letters, blocking marks and each other, encoded by `essence-inspect
tokenize` and by `tokenizers`, ids compared. `tokenizers` normalizes with Unicode 9.0 tables,
utf8proc with a newer version: marks and compositions added since must behave as unassigned
(docs/tokenizer.md). The marks are those of utf8proc (through ctypes: the library essence links)
and of Python's unicodedata together, so a newer utf8proc is covered too.
Tokenizers: the in-repo tiny-qwen2 (its NFC, and variants with NFD, NFKC, NFKD) and Qwen
tokenizer, and ../shared/fixtures' qwen3.json when present."""
import ctypes
import ctypes.util
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
CODE_POINTS = [c for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]


class Utf8proc:
    """The few utf8proc calls the texts need: combining class, NFD, NFKD of one code point."""

    def __init__(self):
        self.lib = ctypes.CDLL(ctypes.util.find_library("utf8proc") or "libutf8proc.so.2")
        self.lib.utf8proc_get_property.restype = ctypes.POINTER(ctypes.c_int16)  # category, combining_class
        self.lib.utf8proc_NFD.restype = self.lib.utf8proc_NFKD.restype = ctypes.c_void_p
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))

    def has_data(self, c):
        """A combining class or a decomposition (decomp_seqindex set)."""
        properties = self.lib.utf8proc_get_property(c)
        return properties[1] != 0 or ctypes.cast(properties, ctypes.POINTER(ctypes.c_uint16))[4] != 0xFFFF

    def combining(self, c):
        return self.lib.utf8proc_get_property(c)[1]

    def normalize(self, form, text):
        pointer = getattr(self.lib, "utf8proc_" + form)(text.encode())
        result = ctypes.string_at(pointer).decode()
        self.libc.free(ctypes.c_void_p(pointer))
        return result


def texts():
    """(label, text) pairs: one text per mark, per composite, and per 8 compatibility characters."""
    u = Utf8proc()
    out = []
    candidates = [c for c in CODE_POINTS if u.has_data(c) or unicodedata.combining(chr(c)) or
                  unicodedata.decomposition(chr(c))]
    marks = [c for c in candidates if u.combining(c) or unicodedata.combining(chr(c))]
    for c in marks:
        m = chr(c)
        # blocked or not from composing e + U+0301, reordered against classes 1, 220, 230, 240, at the start
        out.append((f"mark U+{c:04X}", f"{m}e e{m}\u0301 a\u0301{m} o{m}\u0334 u\u0345{m}\u0316 A{m}{m}\u0323 x{m}"))
    composites, compat = set(), []
    hangul = [c for c in range(0xAC00, 0xD7A4, 97)]  # algorithmic: a sample is enough
    for c in [c for c in candidates if not 0xAC00 <= c <= 0xD7A3] + hangul:
        for d in {unicodedata.normalize("NFD", chr(c)), u.normalize("NFD", chr(c))} - {chr(c)}:
            composites.add(c)
            # composed from its parts, with a class-1 mark between them, a trailing mark, doubled,
            # after a mark that its decomposition may reorder with
            out.append((f"composite U+{c:04X}",
                        f"{d} {chr(c)}\u0316 {d[0]}\u0334{d[1:]} x{d}\u0301 {d}{d} a\u0345{chr(c)}"))
        if c not in composites and (unicodedata.normalize("NFKD", chr(c)) != chr(c) or
                                    u.normalize("NFKD", chr(c)) != chr(c)):
            compat.append(c)
    for k in range(0, len(compat), 8):
        group = compat[k:k + 8]
        # after a mark, a Hangul L and LV syllable (compatibility jamo), each other
        out.append((f"compatibility U+{group[0]:04X}..U+{group[-1]:04X}",
                    " ".join(f"a{chr(c)}\u0301{chr(c)} a\u0345{chr(c)} \u1100{chr(c)} \uac00{chr(c)}" for c in group) +
                    " " + "".join(chr(c) for c in group)))
    return out, len(marks), len(composites), len(compat)


def essence_ids(tokenizer, texts_path):
    run = subprocess.run([INSPECT, "tokenize", "--tokenizer", tokenizer, "--jsonl", texts_path], capture_output=True)
    if run.returncode != 0:
        raise RuntimeError(f"essence-inspect tokenize exited {run.returncode}: {run.stderr.decode().strip()}")
    return [json.loads(line)["ids"] for line in run.stdout.decode().split("\n") if line]


def check(name, tokenizer, cases, texts_path):
    from tokenizers import Tokenizer
    want = [e.ids for e in Tokenizer.from_file(tokenizer).encode_batch([t for _, t in cases], add_special_tokens=False)]
    got = essence_ids(tokenizer, texts_path)
    bad = [label for (label, _), g, w in zip(cases, got, want) if g != w]
    report(name, len(got) == len(cases) and not bad,
           f"{len(got)} outputs for {len(cases)} texts; {len(bad)} with other ids than Hugging Face: {bad[:8]}")


def main():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("SKIP normalization: the Python package `tokenizers` is not installed (make deps installs it)")
        return
    tmp = tempfile.mkdtemp()
    cases, n_marks, n_composites, n_compat = texts()
    print(f"# {len(cases)} texts: {n_marks} combining marks, {n_composites} compositions, "
          f"{n_compat} compatibility characters")
    texts_path = os.path.join(tmp, "texts.jsonl")
    with open(texts_path, "w", encoding="utf-8") as f:
        for _, text in cases:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    for fixtures in fixture_sets("normalization"):
        if fixtures.label == "shared":
            check(fixtures.name("qwen3_nfc"), fixtures.path("tokenizers", "qwen3.json"), cases, texts_path)
            continue
        check(fixtures.name("qwen_nfc"), plain_file(fixtures.path("tokenizers", "qwen.json.zst"), tmp), cases, texts_path)
        base = json.load(open(fixtures.student_tokenizer, encoding="utf-8"))
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            base["normalizer"] = {"type": form}
            path = os.path.join(tmp, f"tiny-qwen2-{form}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(base, f, ensure_ascii=False)
            check(fixtures.name(f"tiny_qwen2_{form.lower()}"), path, cases, texts_path)


if __name__ == "__main__":
    run_main(main, "test_tokenizer_normalization")
