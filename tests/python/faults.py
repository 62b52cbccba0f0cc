"""What the fault tests (test_faults_*.py, test_resume_checks.py) share: running the programs, a
small corpus and the tiny models, and comparing outputs.

Outputs are compared dataset by dataset and attribute by attribute, ignoring only the root
attributes that record when or how a run was started, not what it made:
  created  the time the file was finished
  config   the effective YAML of the run's command line (a resumed run's says resume: true)
"""
import json
import os
import shutil
import subprocess
import sys

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
RUN_ATTRIBUTES = ("created", "config")


def program(name):
    return os.path.join(BUILD, name)


def run(name, *args, timeout=120):
    return subprocess.run([program(name), *args], capture_output=True, text=True, timeout=timeout)


def must(name, *args):
    result = run(name, *args)
    if result.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def write_corpus(path, n, seed=0, words=12):
    """n text samples of mixed lengths."""
    rng = np.random.default_rng(seed)
    vocabulary = ("the proof follows since every even number greater than two is a sum of primes, "
                  "and 量子 states 🎉 collapse when observed; x = 42").split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choice(vocabulary, size=int(rng.integers(3, words))))
            f.write(json.dumps({"id": f"s{i}", "text": text}, ensure_ascii=False) + "\n")
    return path


def models(tmp):
    """(teacher folder, student folder) from the in-repo fixtures, as links in tmp."""
    fixtures = repo_fixtures()
    teacher = fixtures.teacher_folder(os.path.join(tmp, "teacher"), bos_config=False)
    student = fixtures.student_folder(os.path.join(tmp, "student"))
    return teacher, student


def h5_content(path):
    """Every dataset (as numpy arrays) and every attribute but RUN_ATTRIBUTES, of every object."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for key, value in obj.attrs.items():
                if not (name == "" and key in RUN_ATTRIBUTES):
                    out[f"{name}@{key}"] = value
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]
        visit("", f)
        f.visititems(visit)
    return out


def same_content(a, b):
    """'' when equal, else what differs."""
    if sorted(a) != sorted(b):
        return f"entries {sorted(set(a) ^ set(b))[:5]} differ"
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if np.shape(x) != np.shape(y) or not np.array_equal(x, y, equal_nan=False):
                return f"{name} differs"
        elif x != y:
            return f"{name} differs ({x!r} vs {y!r})"
    return ""


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def folder_content(path, skip=("loss.png", "fingerprint")):
    """Every file under a folder, bytes; metrics.jsonl without its timings (tokens_per_s)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if name in skip:
                continue
            if name == "metrics.jsonl":
                lines = [json.loads(line) for line in open(full)]
                for line in lines:
                    line.pop("tokens_per_s", None)
                out[rel] = lines
            else:
                out[rel] = file_bytes(full)
    return out


def reset(*paths):
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
