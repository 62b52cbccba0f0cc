"""The shared bits of the Python tests: PASS/FAIL lines for tests/run.sh, a main() wrapper that
turns an unexpected exception into one FAIL line and the exit status, the fixture sets, and a
safetensors reader."""
import json
import os
import struct
import subprocess
import sys

failures = 0
ROOT = os.environ.get("ESSENCE_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def report(name, ok, why=""):
    global failures
    print(f"PASS {name}" if ok else f"FAIL {name}: {why}", flush=True)
    failures += 0 if ok else 1


def run_main(main, name):
    global failures
    try:
        main()
    except Exception as exc:  # a crash of the test itself is a failure with its message
        failures += 1
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    sys.exit(1 if failures else 0)


def mpi_env(base=None):
    """The environment for mpirun here: ranks as root (the tests run as root) and more ranks than cores."""
    env = dict(base if base is not None else os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    if os.environ.get("ESSENCE_SANITIZE"):
        # make sanitize: Open MPI's libraries keep allocations for the process's life and are built
        # without frame pointers, so LeakSanitizer needs the slow unwinder (and the components kept
        # loaded) to see whose they are and apply tests/sanitize/lsan.supp.
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":fast_unwind_on_malloc=0"
        env["OMPI_MCA_mca_base_component_disable_dlclose"] = "1"
    return env


# ---- fixtures -----------------------------------------------------------------------------------

class FixtureSet:
    """One fixture folder: "repo" (tests/fixtures, always there) or "shared" (../shared/fixtures,
    large, optional). Both hold models/tiny-llama3 (the teacher) and models/tiny-qwen2 (the student)
    with goldens in the same formats; they differ in where the tokenizers live."""

    def __init__(self, label, root):
        self.label, self.root = label, root
        self.teacher = os.path.join(root, "models", "tiny-llama3")
        self.student = os.path.join(root, "models", "tiny-qwen2")
        if label == "shared":  # tokenizer-less checkpoints; the real Llama 3 / Qwen3 files beside them
            self.teacher_tokenizer = os.path.join(root, "tokenizers", "llama3.json")
            self.student_tokenizer = os.path.join(root, "tokenizers", "qwen3.json")
            self.teacher_bos_goldens = os.path.join(root, "tokenizer-goldens", "llama3_1.jsonl")
            self.deepseek_tokenizer = os.path.join(root, "tokenizers", "deepseek_v3.json")
        else:
            self.teacher_tokenizer = os.path.join(self.teacher, "tokenizer.json")
            self.student_tokenizer = os.path.join(self.student, "tokenizer.json")
            self.teacher_bos_goldens = os.path.join(root, "tokenizer-goldens", "tiny-llama3.jsonl")
            self.deepseek_tokenizer = os.path.join(root, "tokenizers", "deepseek-v3.json.zst")

    def name(self, test):
        return f"{test}[{self.label}]"

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def teacher_folder(self, dest, bos_config=True):
        """A teacher model folder at dest (links): the checkpoint, its tokenizer.json and, with
        bos_config, a tokenizer_config.json adding the BOS as the R1-Distill checkpoints do."""
        self._link_model(self.teacher, dest, self.teacher_tokenizer)
        config = os.path.join(dest, "tokenizer_config.json")
        if bos_config and not os.path.exists(config):
            bos = "<|begin_of_text|>" if self.label == "shared" else None
            bos = bos or json.load(open(os.path.join(self.teacher, "tokenizer_config.json")))["bos_token"]
            json.dump({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "bos_token": bos}, open(config, "w"))
        if not bos_config and os.path.lexists(config):
            os.remove(config)
        return dest

    def student_folder(self, dest):
        """A student model folder at dest (links): the checkpoint and its tokenizer.json."""
        return self._link_model(self.student, dest, self.student_tokenizer)

    @staticmethod
    def _link_model(source, dest, tokenizer):
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(source):
            if not name.startswith("golden") and not os.path.lexists(os.path.join(dest, name)):
                os.symlink(os.path.join(source, name), os.path.join(dest, name))
        if not os.path.lexists(os.path.join(dest, "tokenizer.json")):
            os.symlink(tokenizer, os.path.join(dest, "tokenizer.json"))
        return dest

    def tokenizer_goldens(self):
        """(name, tokenizer file, goldens file) for every tokenizer-goldens/NAME.jsonl; its tokenizer
        is tokenizers/NAME.json, or NAME.json.zst (compressed)."""
        out = []
        for file in sorted(os.listdir(self.path("tokenizer-goldens"))):
            if file.endswith(".jsonl"):
                name = file[:-len(".jsonl")]
                tokenizer = self.path("tokenizers", name + ".json")
                if not os.path.exists(tokenizer):
                    tokenizer += ".zst"
                out.append((name, tokenizer, self.path("tokenizer-goldens", file)))
        return out


def repo_fixtures():
    return FixtureSet("repo", os.environ.get("ESSENCE_FIXTURES") or os.path.join(ROOT, "tests", "fixtures"))


def fixture_sets(family):
    """The in-repo set, then the shared one when it exists; without it, one SKIP line for the family."""
    sets = [repo_fixtures()]
    shared = os.environ.get("ESSENCE_SHARED_FIXTURES", os.path.join(ROOT, "..", "shared", "fixtures"))
    if shared and os.path.isdir(os.path.join(shared, "models")):
        sets.append(FixtureSet("shared", shared))
    else:
        print(f"SKIP {family}[shared]: no shared fixtures at {shared or '(ESSENCE_SHARED_FIXTURES is empty)'}; "
              "the in-repo set ran (set ESSENCE_SHARED_FIXTURES to add the large one)", flush=True)
    return sets


def plain_file(path, tmp):
    """path itself, or for NAME.zst its decompressed copy in tmp (the shipped tokenizers were
    compressed with a long window, hence --long)."""
    if not path.endswith(".zst"):
        return path
    out = os.path.join(tmp, os.path.basename(path)[:-len(".zst")])
    if not os.path.exists(out):  # through stdin: zstd refuses a symbolic link as its input
        with open(path, "rb") as source, open(out + ".tmp", "wb") as f:
            subprocess.run(["zstd", "-dq", "--long=27"], stdin=source, stdout=f, check=True)
        os.rename(out + ".tmp", out)
    return out


# ---- safetensors ---------------------------------------------------------------------------------

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """Every tensor of a .safetensors file as a numpy array (read-only); BF16 and F16 come back as
    float32, bf16 exactly (its 16 bits are the top half of a float32)."""
    import numpy as np
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    data = memoryview(blob)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, _DTYPES[info["dtype"]])
            if info["dtype"] == "F16":
                values = values.astype(np.float32)
        out[name] = values.reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    """A .safetensors file of float32 tensors (name -> numpy array), in name order."""
    import numpy as np
    header, blobs, at = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(tensors[name])), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
