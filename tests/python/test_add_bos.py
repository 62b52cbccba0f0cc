"""--add-bos auto|always|never (docs/tokenizer.md "BOS") in essence-inspect tokenize, essence-extract
and essence-project: the first token each value gives, on tokenizers that add a BOS through their
own post-processor, through tokenizer_config.json's LlamaTokenizerFast rule, or not at all; a
value other than the three is exit 2; the choice is recorded in the output files."""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
TEXT = "Hello world, the cat"


def program(name, *args):
    return subprocess.run([os.path.join(BUILD, name), *args], capture_output=True, text=True)


def tokenize(tokenizer, *args, text=TEXT):
    """(exit code, the ids of `text`, or the error message)."""
    run = subprocess.run([os.path.join(BUILD, "essence-inspect"), "tokenize", "--tokenizer", tokenizer, *args],
                         input=text + "\n", capture_output=True, text=True)
    return run.returncode, (json.loads(run.stdout)["ids"] if run.returncode == 0 else run.stderr.strip())


def tokenizer_variants(tmp, fixtures):
    """The teacher's tokenizer four ways, and the student's (Qwen: no BOS at all)."""
    teacher = json.load(open(fixtures.teacher_tokenizer, encoding="utf-8"))
    config = json.load(open(os.path.join(fixtures.teacher, "tokenizer_config.json"), encoding="utf-8"))
    plain = dict(teacher, post_processor=teacher["post_processor"]["processors"][0])  # ByteLevel alone: adds nothing

    def write(name, data, tokenizer_config=None):
        folder = os.path.join(tmp, name)
        os.makedirs(folder)
        json.dump(data, open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
        if tokenizer_config is None:
            return os.path.join(folder, "tokenizer.json")
        json.dump(tokenizer_config, open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8"))
        return folder

    return {
        "template": write("template", teacher),                 # its TemplateProcessing adds the BOS
        "llama_config": write("llama_config", plain, config),   # the R1-Distill layout: add_bos_token true
        "llama_config_no_bos": write("llama_config_no_bos", plain, dict(config, add_bos_token=False)),
        "plain": write("plain", plain),                         # nothing adds or names a BOS
        "qwen": fixtures.student_tokenizer,
    }


def check_inspect(tokenizers, bos):
    # what each value gives: True = the BOS first, False = the text's tokens alone, 2 = exit 2
    expected = {
        "template": {"auto": True, "always": True, "never": False},
        "llama_config": {"auto": True, "always": True, "never": False},
        "llama_config_no_bos": {"auto": False, "always": True, "never": False},
        "plain": {"auto": False, "always": 2, "never": False},
        "qwen": {"auto": False, "always": 2, "never": False},
    }
    for name, path in tokenizers.items():
        code, plain = tokenize(path)
        for mode, want in expected[name].items():
            code, got = tokenize(path, "--add-special-tokens", "--add-bos", mode)
            if want == 2:
                ok = code == 2 and "--add-bos always" in got and "BOS" in got
            else:
                ok = code == 0 and got == ([bos] if want else []) + plain
            report(f"inspect_{name}_add_bos_{mode}", ok, f"exit {code}: {got}; without specials {plain}")
        code, got = tokenize(path, "--add-bos", "always" if expected[name]["always"] != 2 else "never")
        report(f"inspect_{name}_without_specials_adds_nothing", code == 0 and got == plain, f"{got} != {plain}")
    code, got = tokenize(tokenizers["template"], "--add-special-tokens", "--add-bos", "sometimes")
    report("inspect_bad_add_bos_exit_2", code == 2 and "--add-bos sometimes" in got, f"exit {code}: {got}")


def first_tokens_and_attributes(path):
    with h5py.File(path, "r") as f:
        ids, starts = f["tokens/id"][...], f["samples/token_start"][...]
        return [int(ids[s]) for s in starts[:-1]], {k: f.attrs[k] for k in ("add_bos", "specials_template", "fingerprint")}


def check_stages(tmp, fixtures, tokenizers, bos):
    teacher = fixtures.teacher_folder(os.path.join(tmp, "teacher"))  # the fixture's tokenizer_config.json: the BOS
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"id": "a", "text": TEXT}) + "\n" + json.dumps({"id": "b", "text": "and the end"}) + "\n")
    common = ["--model", teacher, "--data", data, "--layers", "2"]
    outputs = {}
    for mode in ("auto", "never"):
        out = os.path.join(tmp, f"teacher-{mode}.h5")
        run = program("essence-extract", *common, "--out", out, "--add-bos", mode)
        outputs[mode] = first_tokens_and_attributes(out) if run.returncode == 0 else None
        if not outputs[mode]:
            report(f"extract_add_bos_{mode}", False, run.stderr.strip())
            return
    (auto_first, auto_attrs), (never_first, never_attrs) = outputs["auto"], outputs["never"]
    report("extract_add_bos_auto_starts_with_bos", auto_first == [bos, bos] and auto_attrs["add_bos"] == "auto" and
           auto_attrs["specials_template"] == f"{bos},$A", f"{auto_first}, {auto_attrs}")
    report("extract_add_bos_never_has_no_bos", bos not in never_first and never_attrs["add_bos"] == "never" and
           never_attrs["specials_template"] == "$A", f"{never_first}, {never_attrs}")
    report("extract_add_bos_in_fingerprint", auto_attrs["fingerprint"] != never_attrs["fingerprint"], "same fingerprint")
    for name, args in {"bad_value": ["--add-bos", "sometimes"],
                       "always_without_bos": ["--add-bos", "always", "--tokenizer", tokenizers["plain"]]}.items():
        out = os.path.join(tmp, f"teacher-{name}.h5")
        run = program("essence-extract", *common, "--out", out, *args)
        report(f"extract_{name}_exit_2", run.returncode == 2 and "--add-bos" in run.stderr and not os.path.exists(out),
               f"exit {run.returncode}: {run.stderr.strip()}")

    # project: the student (Qwen) has no BOS of its own; a tokenizer_config.json naming one lets always add it
    student = os.path.join(tmp, "student")
    os.makedirs(student)
    os.symlink(os.path.join(fixtures.student, "config.json"), os.path.join(student, "config.json"))
    os.symlink(fixtures.student_tokenizer, os.path.join(student, "tokenizer.json"))
    student_named = os.path.join(tmp, "student-named-bos")
    os.makedirs(student_named)
    for name in ("config.json", "tokenizer.json"):
        os.symlink(os.path.join(student, name), os.path.join(student_named, name))
    json.dump({"tokenizer_class": "Qwen2TokenizerFast", "bos_token": "<|endoftext|>"},
              open(os.path.join(student_named, "tokenizer_config.json"), "w"))
    student_bos = tokenize(fixtures.student_tokenizer, text="<|endoftext|>")[1][0]
    base = ["--in", os.path.join(tmp, "teacher-auto.h5"), "--layer-map", "2:1"]
    results = {}
    for label, folder, mode in (("auto", student, "auto"), ("always", student_named, "always")):
        out = os.path.join(tmp, f"student-{label}.h5")
        run = program("essence-project", *base, "--student", folder, "--out", out, "--add-bos", mode)
        results[label] = first_tokens_and_attributes(out) if run.returncode == 0 else run.stderr.strip()
    first, attrs = results["auto"] if isinstance(results["auto"], tuple) else (None, results["auto"])
    report("project_add_bos_auto_student_without_bos", first is not None and student_bos not in first and
           attrs["add_bos"] == "auto" and attrs["specials_template"] == "$A", f"{first}, {attrs}")
    first, attrs = results["always"] if isinstance(results["always"], tuple) else (None, results["always"])
    report("project_add_bos_always_named_bos_first", first == [student_bos, student_bos] and attrs["add_bos"] == "always"
           and attrs["specials_template"] == f"{student_bos},$A", f"{first}, {attrs}")
    for name, args in {"bad_value": ["--student", student, "--add-bos", "maybe"],
                       "always_without_bos": ["--student", student, "--add-bos", "always"]}.items():
        out = os.path.join(tmp, f"student-{name}.h5")
        run = program("essence-project", *base, *args, "--out", out)
        left = [p for p in (out, out + ".partial") if os.path.exists(p)]
        report(f"project_{name}_exit_2", run.returncode == 2 and "--add-bos" in run.stderr and not left,
               f"exit {run.returncode}, left {left}: {run.stderr.strip()}")


def main():
    tmp = tempfile.mkdtemp()
    fixtures = repo_fixtures()
    bos_text = json.load(open(os.path.join(fixtures.teacher, "tokenizer_config.json")))["bos_token"]
    tokenizers = tokenizer_variants(tmp, fixtures)
    code, bos = tokenize(tokenizers["plain"], text=bos_text)
    assert code == 0 and len(bos) == 1, f"{bos_text} is not one token: {bos}"
    check_inspect(tokenizers, bos[0])
    check_stages(tmp, fixtures, tokenizers, bos[0])


if __name__ == "__main__":
    run_main(main, "test_add_bos")
