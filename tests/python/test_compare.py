"""essence-inspect compare A.h5 B.h5 [--tol X], checked against numpy: files written by essence
(write_latents, essence-extract, essence-project) and by plain h5py; one changed value found with
its count, position and error figures; --tol judged by the per-row relative error; shapes, types,
datasets in one file only, NaN/Inf, strings, integers, rank 0 and 3, and the exit codes."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter, to edit essence's files)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")
WRITE_LATENTS = os.path.join(BUILD, "tests", "tools", "write_latents")


def compare(a, b, *args):
    return subprocess.run([INSPECT, "compare", a, b, *args], capture_output=True, text=True)


def line_of(result, path):
    """The report line of dataset `path` ("" when there is none)."""
    return next((l for l in result.stdout.splitlines() if l.startswith(path + " ") or l.startswith(path + ":")), "")


def figures(line):
    """The numbers of a numeric line: differing, values, max abs, its index, max rel, nmse."""
    m = re.search(r"(\d+) of (\d+) values differ(?:, max abs ([^ ]+) at (\[[^\]]*\]), max rel ([^ ,]+)"
                  r"(?: at row (\d+))?, nmse ([^ ,]+))?", line)
    if not m:
        return None
    return {"differing": int(m.group(1)), "values": int(m.group(2)),
            "max_abs": float(m.group(3)) if m.group(3) else None, "at": m.group(4),
            "max_rel": float(m.group(5)) if m.group(5) else None,
            "row": int(m.group(6)) if m.group(6) else None, "nmse": float(m.group(7)) if m.group(7) else None}


def close(a, b, rel=1e-5):
    return a is not None and abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def test_essence_latents(tmp):
    a, b = os.path.join(tmp, "lat_a.h5"), os.path.join(tmp, "lat_b.h5")
    subprocess.run([WRITE_LATENTS, a, "700", "33", "50", "3", "nonfinite"], check=True)
    subprocess.run([WRITE_LATENTS, b, "700", "33", "50", "3", "nonfinite"], check=True)
    same = compare(a, b)
    report("bf16_identical_exit_0", same.returncode == 0 and "/latents/layer_001 [700, 33] bf16: identical" in same.stdout
           and "the files are identical" in same.stdout, same.stdout + same.stderr)

    # One value changed through h5py (HDF5 converts to bf16; hdf5plugin recompresses the chunk).
    with h5py.File(b, "r+") as f:
        d = f["/latents/layer_001"]
        old = float(d[123, 7])
        d[123, 7] = old + 1.5
        new = float(d[123, 7])
    with h5py.File(a, "r") as f:
        va = f["/latents/layer_001"][...].astype(np.float64)
    with h5py.File(b, "r") as f:
        vb = f["/latents/layer_001"][...].astype(np.float64)
    one = compare(a, b)
    got = figures(line_of(one, "/latents/layer_001"))
    row_rel = abs(new - old) / max(np.linalg.norm(va[123]), np.linalg.norm(vb[123]))
    finite = np.isfinite(va) & np.isfinite(vb)
    nmse = ((va[finite] - vb[finite]) ** 2).sum() / (vb[finite] ** 2).sum()
    report("bf16_one_value_exit_1", one.returncode == 1 and "the files differ" in one.stdout
           and a in one.stderr and b in one.stderr, one.stdout + one.stderr)
    report("bf16_one_value_count_and_position", got is not None and got["differing"] == 1 and got["values"] == 700 * 33
           and got["at"] == "[123, 7]" and got["row"] == 123, one.stdout)
    report("bf16_one_value_figures", got is not None and close(got["max_abs"], abs(new - old))
           and close(got["max_rel"], row_rel) and close(got["nmse"], nmse), f"{got} vs {abs(new - old)}, {row_rel}, {nmse}")
    within = compare(a, b, "--tol", repr(float(row_rel) * 1.01))
    outside = compare(a, b, "--tol", repr(float(row_rel) * 0.99))
    report("bf16_within_tol_exit_0", within.returncode == 0 and "within tolerance" in line_of(within, "/latents/layer_001")
           and "agree within --tol" in within.stdout, within.stdout + within.stderr)
    report("bf16_outside_tol_exit_1", outside.returncode == 1 and "differ:" in line_of(outside, "/latents/layer_001"),
           outside.stdout)
    # The NaN and Infs of "nonfinite" sit in both files at the same places: no mismatch counted.
    report("bf16_same_nonfinite_not_counted", "NaN/Inf" not in line_of(one, "/latents/layer_001"), one.stdout)
    threads = [compare(a, b, "--threads", n).stdout for n in ("1", "2", "5")]
    report("figures_do_not_depend_on_threads", threads[0] == threads[1] == threads[2], "\n".join(threads))


def test_streaming(tmp):
    """A dataset of several 32 MB blocks: a change in a later block is found at its place."""
    a, b = os.path.join(tmp, "big_a.h5"), os.path.join(tmp, "big_b.h5")
    subprocess.run([WRITE_LATENTS, a, "9000", "4096", "64", "5"], check=True)
    shutil.copy(a, b)
    with h5py.File(b, "r+") as f:
        d = f["/latents/layer_001"]
        d[8999, :] = d[8999, :] * 0.5  # the last row halved (exact in bf16): row relative error 0.5
        d[4321, 0] = float(d[4321, 0]) - 3
    result = compare(a, b, "--threads", "2")
    got = figures(line_of(result, "/latents/layer_001"))
    report("streaming_blocks_count_and_row", got is not None and got["differing"] == 4096 + 1 and got["values"] == 9000 * 4096
           and got["row"] == 8999 and close(got["max_rel"], 0.5), result.stdout)


def test_essence_stages(tmp):
    """teacher.h5 and student.h5 from the real stages: a rerun is identical but for root attributes."""
    fixtures = repo_fixtures()  # the in-repo checkpoints hold their tokenizers
    teacher, student = fixtures.teacher, fixtures.student
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.write('{"id": "a", "text": "The committee postponed its decision until the spring."}\n')
        f.write('{"id": "b", "text": "def gcd(a, b):\\n    return a if b == 0 else gcd(b, a % b)"}\n')
        f.write('{"id": "c", "text": "今天天气很好 🎉 and 3x + 7 = 22"}\n')
    outs = []
    for run in range(2):
        time.sleep(1.1 * run)  # `created` has a resolution of a second: make the runs' times differ
        out = os.path.join(tmp, f"teacher{run}.h5")
        subprocess.run([os.path.join(BUILD, "essence-extract"), "--model", teacher, "--data", data, "--layers", "1,2",
                        "--out", out, "--threads", "1"], check=True, capture_output=True)
        outs.append(out)
    rerun = compare(*outs)
    attrs = next((l for l in rerun.stdout.splitlines() if l.startswith("root attributes")), "")
    report("teacher_rerun_identical_exit_0", rerun.returncode == 0 and "/latents/layer_002" in rerun.stdout
           and "/samples/id [3] string (vlen): identical" in rerun.stdout, rerun.stdout + rerun.stderr)
    report("teacher_root_attributes_listed_not_counted", "created" in attrs and "not counted" in attrs, attrs)
    students = []
    for run in range(2):
        out = os.path.join(tmp, f"student{run}.h5")
        subprocess.run([os.path.join(BUILD, "essence-project"), "--in", outs[0], "--student", student, "--out", out,
                        "--layer-map", "2:1"], check=True, capture_output=True)
        students.append(out)
    with h5py.File(students[1], "r+") as f:
        t = f["/targets/layer_001"]
        t[5, :] = t[5, :] * 0.5  # a whole token's target halved: row relative error 0.5
        f["/tokens/teacher_row"][3] = f["/tokens/teacher_row"][3] + 1
    changed = compare(*students, "--tol", "0.6")
    target = figures(line_of(changed, "/targets/layer_001"))
    report("student_target_row_rel_within_tol", target is not None and target["row"] == 5 and close(target["max_rel"], 0.5, 1e-3)
           and "within tolerance" in line_of(changed, "/targets/layer_001"), changed.stdout)
    report("student_integers_exact_even_with_tol", changed.returncode == 1
           and "differ: 1 of" in line_of(changed, "/tokens/teacher_row"), changed.stdout)


def write(path, datasets, attrs=None):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if isinstance(value, dict):
                f.create_dataset(name, **value)
            else:
                f[name] = value
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def test_plain_h5py(tmp):
    rng = np.random.default_rng(7)
    cube = rng.standard_normal((6, 5, 4))
    base = {
        "/g/cube": {"data": cube, "chunks": (2, 5, 4), "compression": "gzip"},
        "/g/h/half": rng.standard_normal(50).astype(np.float16),
        "/ints": np.arange(-20, 20, dtype=np.int16),
        "/big": np.array([2**64 - 1, 2**64 - 2, 5], dtype=np.uint64),
        "/scalar": np.float64(3.25),
        "/empty": np.zeros((0, 3), dtype=np.float32),
        "/words": np.array(["alpha", "beta", "γάμμα"], dtype=h5py.string_dtype()),
        "/fixed": np.array([b"ab", b"cd"], dtype="S4"),
        "/pairs": np.array([(1, 2.5), (3, 4.5)], dtype=[("i", "<i4"), ("x", "<f8")]),
        "/seq": {"data": np.array([np.array([1, 2, 3]), np.array([4])], dtype=object), "dtype": h5py.vlen_dtype(np.int64)},
    }
    a, b = os.path.join(tmp, "plain_a.h5"), os.path.join(tmp, "plain_b.h5")
    write(a, base, {"note": "x", "n": 3})
    write(b, base, {"note": "x", "n": 3})
    same = compare(a, b)
    report("h5py_identical_exit_0", same.returncode == 0 and same.stdout.count(": identical") == len(base)
           and "root attributes: the same" in same.stdout, same.stdout + same.stderr)
    dataset_lines = [l.split(" ")[0].rstrip(":") for l in same.stdout.splitlines() if l.startswith("/")]
    report("h5py_sorted_recursive_walk", dataset_lines == sorted(base), str(dataset_lines))

    changed = dict(base)
    cube2 = cube.copy()
    cube2[4, 3, 2] += 0.25
    changed["/g/cube"] = {"data": cube2, "chunks": (2, 5, 4), "compression": "gzip"}
    changed["/big"] = np.array([2**64 - 1, 2**64 - 3, 5], dtype=np.uint64)  # int64 would saturate both to the same
    changed["/words"] = np.array(["alpha", "BETA", "γάμμα"], dtype=h5py.string_dtype())
    changed["/seq"] = {"data": np.array([np.array([1, 2, 3]), np.array([4, 5])], dtype=object), "dtype": h5py.vlen_dtype(np.int64)}
    changed["/pairs"] = np.array([(1, 2.5), (3, 4.75)], dtype=[("i", "<i4"), ("x", "<f8")])
    write(b, changed, {"note": "y", "extra": 1})
    diff = compare(a, b)
    cube_fig = figures(line_of(diff, "/g/cube"))
    report("h5py_rank3_gzip_position", cube_fig is not None and cube_fig["differing"] == 1 and cube_fig["at"] == "[4, 3, 2]"
           and cube_fig["row"] == 4 and close(cube_fig["max_abs"], 0.25, 1e-9), line_of(diff, "/g/cube"))
    report("h5py_uint64_exact", "differ: 1 of 3 values differ" in line_of(diff, "/big"), line_of(diff, "/big"))
    report("h5py_strings_count", "differ: 1 of 3 values differ, first at [1]" in line_of(diff, "/words"), line_of(diff, "/words"))
    report("h5py_vlen_sequences_count", "differ: 1 of 2 values differ, first at [1]" in line_of(diff, "/seq"), line_of(diff, "/seq"))
    report("h5py_compound_bytes_count", "differ: 1 of 2 values differ, first at [1]" in line_of(diff, "/pairs"), line_of(diff, "/pairs"))
    report("h5py_unchanged_still_identical", ": identical" in line_of(diff, "/g/h/half") and ": identical" in line_of(diff, "/scalar")
           and ": identical" in line_of(diff, "/empty"), diff.stdout)
    attrs = next((l for l in diff.stdout.splitlines() if l.startswith("root attributes")), "")
    report("h5py_root_attributes_info", "note" in attrs and f"only in {a}: n" in attrs and f"only in {b}: extra" in attrs, attrs)
    report("h5py_summary_counts", diff.returncode == 1 and re.search(r"summary: 10 datasets: 5 identical, 0 within tolerance, 5 differ, 0 only in one file", diff.stdout),
           diff.stdout)

    # Shapes, classes, presence.
    write(a, {"/x": np.zeros(10), "/y": np.arange(4, dtype=np.int32), "/only_a": np.ones(2), "/s": np.array([b"ab"], dtype="S3")})
    write(b, {"/x": np.zeros(11), "/y": np.arange(4, dtype=np.float32), "/only_b": np.ones(2), "/s": np.array(["ab"], dtype=h5py.string_dtype())})
    odd = compare(a, b, "--tol", "1")
    report("shape_differs", "/x: shape [10] vs [11]: differ" in odd.stdout, odd.stdout)
    report("class_differs", "type int32 vs float32: differ" in line_of(odd, "/y"), odd.stdout)
    report("dataset_in_one_file_only", f"/only_a: only in {a}" in odd.stdout and f"/only_b: only in {b}" in odd.stdout
           and "2 only in one file" in odd.stdout and odd.returncode == 1, odd.stdout)
    report("fixed_and_vlen_string_same_text", "within tolerance: 0 of 1 values differ" in line_of(odd, "/s"), line_of(odd, "/s"))


def test_nan_and_integers(tmp):
    a, b = os.path.join(tmp, "nan_a.h5"), os.path.join(tmp, "nan_b.h5")
    write(a, {"/v": np.array([np.nan, 1.0, 2.0, np.inf, 0.0]), "/i": np.array([1, 2, 3], dtype=np.int64)})
    write(b, {"/v": np.array([np.nan, 1.0, 2.0, np.inf, 0.0]), "/i": np.array([1, 2, 3], dtype=np.int64)})
    same = compare(a, b)
    report("nan_same_position_identical", same.returncode == 0 and ": identical" in line_of(same, "/v"), same.stdout)
    write(b, {"/v": np.array([np.nan, 1.0, 2.5, np.inf, np.nan]), "/i": np.array([1, 2, 4], dtype=np.int64)})
    diff = compare(a, b, "--tol", "1e9")
    v = line_of(diff, "/v")
    got = figures(v)
    report("nan_against_number_counted", got is not None and got["differing"] == 2 and "1 NaN/Inf mismatches" in v
           and close(got["max_abs"], 0.5), v)
    report("nan_mismatch_never_within_tol", "differ:" in v and diff.returncode == 1, diff.stdout)
    report("integers_never_within_tol", "differ: 1 of 3" in line_of(diff, "/i"), diff.stdout)
    # A long 1-D dataset is one vector; equal Inf and NaN next to a change (the same piece of work).
    rng = np.random.default_rng(3)
    va = rng.standard_normal(5000).astype(np.float32)
    va[10], va[12] = np.inf, np.nan
    vb = va.copy()
    vb[11] += np.float32(0.75)
    vb[4000] -= np.float32(0.25)
    write(a, {"/w": va})
    write(b, {"/w": vb})
    w = compare(a, b)
    got = figures(line_of(w, "/w"))
    fa, fb = va.astype(np.float64), vb.astype(np.float64)
    ok = np.isfinite(fa)
    rel = np.linalg.norm(fa[ok] - fb[ok]) / max(np.linalg.norm(fa[ok]), np.linalg.norm(fb[ok]))
    report("vector_1d_figures", got is not None and got["differing"] == 2 and got["at"] == "[11]" and got["row"] is None
           and close(got["max_abs"], float(abs(fa[11] - fb[11]))) and close(got["max_rel"], rel)
           and "NaN/Inf" not in line_of(w, "/w"), f"{line_of(w, '/w')} vs rel {rel}")
    # -0 against +0 and another NaN payload: equal values, other bits.
    nan2 = np.frombuffer(np.uint64(0x7ff8000000000001).tobytes(), dtype=np.float64)[0]
    write(a, {"/z": np.array([0.0, np.nan])})
    write(b, {"/z": np.array([-0.0, nan2])})
    strict, loose = compare(a, b), compare(a, b, "--tol", "0")
    report("equal_values_other_bits", strict.returncode == 1 and "0 of 2 values differ (the bits differ" in line_of(strict, "/z")
           and loose.returncode == 0 and "within tolerance" in line_of(loose, "/z"), strict.stdout + loose.stdout)


def test_errors(tmp):
    good = os.path.join(tmp, "good.h5")
    write(good, {"/x": np.zeros(3)})
    junk = os.path.join(tmp, "junk.h5")
    with open(junk, "wb") as f:
        f.write(b"this is not HDF5\n" * 10)
    for order, (x, y) in enumerate([(junk, good), (good, junk)]):
        bad = compare(x, y)
        report(f"not_hdf5_exit_3_{order}", bad.returncode == 3 and "junk.h5" in bad.stderr and "not an HDF5" in bad.stderr, bad.stderr)
    missing = compare(good, os.path.join(tmp, "nope.h5"))
    report("missing_file_exit_2_naming_it", missing.returncode == 2 and "nope.h5" in missing.stderr, missing.stderr)
    one = subprocess.run([INSPECT, "compare", good], capture_output=True, text=True)
    report("missing_argument_exit_2", one.returncode == 2 and "usage" in one.stderr, one.stderr)
    for value in ("-1", "abc", "nan"):
        bad_tol = compare(good, good, "--tol", value)
        report(f"bad_tol_{value}_exit_2", bad_tol.returncode == 2 and "--tol" in bad_tol.stderr, bad_tol.stderr)
    helped = subprocess.run([INSPECT, "--help"], capture_output=True, text=True)
    report("help_lists_compare", helped.returncode == 0 and "compare A.h5 B.h5" in helped.stdout and "--tol" in helped.stdout,
           helped.stdout[:400])


def main():
    with tempfile.TemporaryDirectory(prefix="essence-compare-") as tmp:
        test_essence_latents(tmp)
        test_streaming(tmp)
        test_essence_stages(tmp)
        test_plain_h5py(tmp)
        test_nan_and_integers(tmp)
        test_errors(tmp)


if __name__ == "__main__":
    run_main(main, "test_compare")
