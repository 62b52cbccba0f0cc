"""The OpenBLAS kernels a program runs (docs/engine.md): a user's OPENBLAS_CORETYPE wins and is
not replaced; without one, the program runs the best kernel family the CPU supports (read here from
/proc/cpuinfo), and when it had to start again for that it says so exactly once."""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
LEVEL = {"prescott": 0, "core2": 0, "nehalem": 0, "sandybridge": 1, "haswell": 2, "zen": 2, "skylakex": 3, "cooperlake": 3,
         "sapphirerapids": 3}


def extract(tmp, env):
    data = os.path.join(tmp, "ids.jsonl")
    open(data, "w").write('{"ids": [1, 2, 3]}\n')
    done = subprocess.run([os.path.join(BUILD, "essence-extract"), "--model", repo_fixtures().teacher, "--data", data,
                           "--layers", "1", "--out", os.path.join(tmp, "out.h5")], capture_output=True, text=True, env=env)
    core = re.search(r"OpenBLAS (\w+) kernels\)", done.stderr)
    return done, core.group(1) if core else None


def cpu_level():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return 3
    return 2 if {"avx2", "fma"} <= flags else 1 if "avx" in flags else 0


def main():
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott")
    done, core = extract(tmp, env)
    report("users_coretype_wins", done.returncode == 0 and core == "Prescott" and "BLAS:" not in done.stderr, done.stderr)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    done, core = extract(tmp, env)
    notes = [line for line in done.stderr.splitlines() if "BLAS:" in line]
    ok = done.returncode == 0 and core is not None and LEVEL.get(core.lower(), 0) >= cpu_level() and len(notes) <= 1
    report("best_kernels_without_a_choice", ok, f"ran {core} on a CPU of level {cpu_level()}: {done.stderr}")
    if notes:
        chosen = re.search(r"chose its (\w+) kernels", notes[0])
        report("restart_said_once_naming_the_lesser_kernels",
               chosen is not None and LEVEL.get(chosen.group(1).lower(), 0) < LEVEL.get(core.lower(), 0), notes[0])
    else:
        print(f"  OpenBLAS chose {core} itself on this CPU: no restart to check")


if __name__ == "__main__":
    run_main(main, "test_blas_core")
