"""Reading teacher.h5 / student.h5 as other tools write them, and damaged ones (issue 12).

A tiny teacher.h5 (essence-extract) and student.h5 (essence-project) are rewritten with h5py:
wider or float integer datasets, h5py's bool, float16/float64 latents, LZ4/Blosc filters,
fixed-length strings, attributes of other types. essence-inspect sample, essence-project and
essence-align must read what has the same values (and give the same results) and refuse the rest
with exit 3 naming the file, dataset (or attribute) and row, type or filter; never a signal.
Then the fault matrix: a flipped byte inside a compressed chunk of a latent and of a
sample/token dataset, files cut short at several points, and damaged global heaps (where the
variable-length strings live: libhdf5 itself crashes or loops on some)."""
import json
import os
import random
import struct
import shutil
import subprocess
import sys
import tempfile

import h5py
import hdf5plugin
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
FIX = repo_fixtures()
LAYER_MAP = "2:1"
TEXTS = ["Hello world, this is a test of the reader.", "Second sample: numbers 12345 and more text here.", "short",
         "The quick brown fox jumps over the lazy dog, twice over.", "Ünïcödé — ✓ and 日本語 too."]


def program(name):
    return os.path.join(BUILD, name)


def run(args, env=None, timeout=300):
    """A program's run; one that hangs past `timeout` is killed and reads as exit -999 (a failure)."""
    try:
        # a damaged file may hold any bytes, which inspect shows: read them, never fail on them
        return subprocess.run(args, capture_output=True, text=True, errors="backslashreplace", env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -999, "", f"timed out after {timeout} s")


def must(args):
    result = run(args)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()[-1500:]}")
    return result


class Files:
    def __init__(self, tmp):
        self.tmp = tmp
        data = os.path.join(tmp, "data.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for i, text in enumerate(TEXTS):
                f.write(json.dumps({"id": f"s{i}", "text": text}, ensure_ascii=False) + "\n")
        self.student_dir = os.path.join(tmp, "student-model")  # project needs config.json and tokenizer.json
        os.makedirs(self.student_dir)
        shutil.copy(os.path.join(FIX.student, "config.json"), self.student_dir)
        os.symlink(os.path.join(FIX.student, "tokenizer.json"), os.path.join(self.student_dir, "tokenizer.json"))
        self.teacher = os.path.join(tmp, "teacher.h5")
        self.student = os.path.join(tmp, "student.h5")
        must([program("essence-extract"), "--model", FIX.teacher, "--data", data, "--layers", "1,2", "--out", self.teacher])
        must([program("essence-project"), "--in", self.teacher, "--student", self.student_dir, "--layer-map", LAYER_MAP,
              "--out", self.student])
        self.count = 0

    def path(self, stem):
        self.count += 1
        return os.path.join(self.tmp, f"{self.count:03d}-{stem}.h5")

    def variant(self, source, stem, edit):
        path = self.path(stem)
        shutil.copy(source, path)
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def project(self, teacher, env=None):
        out = os.path.join(self.tmp, f"out-{self.count:03d}.h5")
        if os.path.exists(out):
            os.remove(out)
        result = run([program("essence-project"), "--in", teacher, "--student", self.student_dir, "--layer-map", LAYER_MAP,
                      "--out", out], env=env)
        return result, out

    def align(self, student):
        out = os.path.join(self.tmp, f"align-{self.count:03d}")
        result = run([program("essence-align"), "--model", FIX.student, "--data", student, "--out", out, "--steps", "1",
                      "--seq-len", "24", "--batch-tokens", "48", "--eval-fraction", "0", "--no-shuffle"])
        model = os.path.join(out, "model.safetensors")
        return result, (open(model, "rb").read() if result.returncode == 0 and os.path.exists(model) else None)

    def inspect_sample(self, path, index=1):
        return run([program("essence-inspect"), "sample", path, "--index", str(index)])


def rewrite(f, name, data, **options):
    """Replaces a dataset by one h5py writes from `data` (numpy chooses the type)."""
    del f[name]
    f.create_dataset(name, data=data, **options)


def targets(path):
    with h5py.File(path, "r") as f:
        return {name: f[f"targets/{name}"][...] for name in f["targets"]}


def same_targets(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def signal_free(result):
    return result.returncode >= 0  # a hang (-999) is no better


def refused(result, *words):
    """Exit 3 with every word in the message."""
    return result.returncode == 3 and all(w in result.stderr for w in words)


def why(result):
    return f"exit {result.returncode}: {result.stderr.strip()[-600:]}"


def test_wider_types(files):
    """Issue 12.1: the integer datasets in wider and float types read as their values."""
    base_result, base_out = files.project(files.teacher)
    base = targets(base_out)
    base_sample = files.inspect_sample(files.teacher).stdout
    report("baseline_project_and_inspect", base_result.returncode == 0 and "tokens" in base_sample, why(base_result))
    with h5py.File(files.teacher, "r") as f:
        report("writer_hidden_size_int64", isinstance(f.attrs["hidden_size"], np.integer) and f.attrs["hidden_size"] == 64,
               repr(f.attrs["hidden_size"]))
    with h5py.File(base_out, "r") as f:
        report("student_writer_hidden_size_int64", isinstance(f.attrs["hidden_size"], np.integer), repr(f.attrs["hidden_size"]))
    columns = ["/tokens/id", "/tokens/byte_start", "/tokens/byte_end", "/samples/text_bytes", "/samples/truncated",
               "/samples/add_special_tokens", "/samples/text_start", "/samples/token_start"]
    for name in columns:
        for dtype, options in ((np.int64, {"chunks": True, "maxshape": (None,), **hdf5plugin.Zstd()}), (np.float64, {}),
                               (np.uint16 if "start" not in name else np.uint64, {"chunks": (3,), "compression": "gzip"}),
                               (">i4", {})):
            label = f"{name.strip('/').replace('/', '_')}_{np.dtype(dtype).name}{'_be' if str(dtype).startswith('>') else ''}"
            path = files.variant(files.teacher, label,
                                 lambda f: rewrite(f, name, f[name][...].astype(dtype), **options))
            sample = files.inspect_sample(path)
            result, out = files.project(path)
            ok = sample.returncode == 0 and sample.stdout == base_sample.replace(files.teacher, path)
            ok = ok and result.returncode == 0 and same_targets(targets(out), base)
            report(f"reads_{label}", ok, why(sample) + " / " + why(result))
    path = files.variant(files.teacher, "bool_flags", lambda f: rewrite(f, "/samples/truncated", f["/samples/truncated"][...] != 0))
    result, out = files.project(path)
    report("reads_h5py_bool_flags", result.returncode == 0 and same_targets(targets(out), base), why(result))
    # student.h5: align reads ids, teacher_row and token_start in other types to the same model
    base_align, base_model = files.align(files.student)
    report("baseline_align", base_model is not None, why(base_align))
    for name, dtype in (("/tokens/id", np.int64), ("/tokens/teacher_row", np.float64), ("/samples/token_start", np.int32),
                        ("/tokens/id", np.float32)):
        label = f"student_{name.strip('/').replace('/', '_')}_{np.dtype(dtype).name}"
        path = files.variant(files.student, label, lambda f: rewrite(f, name, f[name][...].astype(dtype)))
        result, model = files.align(path)
        sample = files.inspect_sample(path)
        report(f"align_reads_{label}", model is not None and model == base_model and sample.returncode == 0,
               why(result) + " / " + why(sample))


def test_bad_values(files):
    """Values that do not fit the type we read: exit 3 naming file, dataset, row and value."""
    def bump(name, dtype, row, delta):
        def edit(f):
            data = f[name][...].astype(dtype)
            data[row] += delta
            rewrite(f, name, data)
        return edit
    cases = {
        "out_of_range": (bump("/tokens/byte_start", np.int64, 10, 2 ** 40), "/tokens/byte_start", ["row 10", "above the range of int32"]),
        "fraction": (bump("/tokens/byte_end", np.float64, 12, 0.5), "/tokens/byte_end", ["row 12", "not an integer"]),
        "nan_flag": (lambda f: rewrite(f, "/samples/truncated", np.array([0, np.nan, 0, 0, 0])), "/samples/truncated", ["row 1", "nan"]),
        "negative_flag": (lambda f: rewrite(f, "/samples/add_special_tokens", np.array([0, 0, -1, 0, 0], np.int8)),
                          "/samples/add_special_tokens", ["row 2", "below the range of uint8"]),
        "pointer_fraction": (bump("/samples/token_start", np.float64, 3, 0.25), "/samples/token_start", ["row 3", "not an integer"]),
    }
    for label, (edit, dataset, words) in cases.items():
        path = files.variant(files.teacher, label, edit)
        result, out = files.project(path)
        report(f"refuses_{label}", refused(result, os.path.basename(path), dataset, *words) and not os.path.exists(out), why(result))
    path = files.variant(files.teacher, "ids_2d", lambda f: rewrite(f, "/tokens/byte_start", np.stack([f["/tokens/byte_start"][...]] * 2, 1)))
    sample = files.inspect_sample(path)
    report("refuses_2d_token_column", refused(sample, "/tokens/byte_start", "expected 1-D"), why(sample))
    path = files.variant(files.teacher, "string_ids", lambda f: rewrite(f, "/tokens/id", np.array([b"x"] * len(f["/tokens/id"]))))
    sample = files.inspect_sample(path)
    report("refuses_strings_as_numbers", refused(sample, "/tokens/id", "string[1]", "expected numbers"), why(sample))
    path = files.variant(files.student, "teacher_row_range",
                         lambda f: rewrite(f, "/tokens/teacher_row", f["/tokens/teacher_row"][...].astype(np.float64) + 1e30))
    result, model = files.align(path)
    report("align_refuses_out_of_range", refused(result, "/tokens/teacher_row", "row 0", "above the range of int64"), why(result))


def test_latent_types_and_filters(files):
    """Issue 12.3: float16/float32/float64 latents read; an unavailable filter is named."""
    _, base_out = files.project(files.teacher)
    base = targets(base_out)
    layers = ("/latents/layer_001", "/latents/layer_002")
    for dtype in (np.float32, np.float64, np.float16):
        path = files.variant(files.teacher, f"latents_{np.dtype(dtype).name}",
                             lambda f: [rewrite(f, n, f[n][...].astype(dtype), chunks=(16, 64)) for n in layers])
        result, out = files.project(path)
        sample = files.inspect_sample(path)
        stats = run([program("essence-inspect"), "stats", path])
        ok = result.returncode == 0 and sample.returncode == 0 and stats.returncode == 0
        if ok and dtype != np.float16:  # bf16 values are exact in float32 and float64
            ok = same_targets(targets(out), base)
        if ok and dtype == np.float16:  # the projection of float16-rounded latents: close
            got = targets(out)
            ok = all(np.allclose(got[k].astype(np.float32), base[k].astype(np.float32), atol=0.05) for k in base)
        report(f"latents_{np.dtype(dtype).name}", ok, why(result) + " / " + why(sample) + " / " + why(stats))
    path = files.variant(files.student, "targets_float16",
                         lambda f: rewrite(f, "/targets/layer_001", f["/targets/layer_001"][...].astype(np.float16)))
    result, model = files.align(path)
    report("align_reads_float16_targets", model is not None, why(result))

    no_plugins = dict(os.environ, HDF5_PLUGIN_PATH=os.path.join(files.tmp, "no-plugins-here"))
    with_plugins = dict(os.environ, HDF5_PLUGIN_PATH=hdf5plugin.PLUGIN_PATH)
    lz4 = files.variant(files.teacher, "lz4", lambda f: [rewrite(f, n, f[n][...], **hdf5plugin.LZ4()) for n in layers])
    result, out = files.project(lz4, env=no_plugins)
    report("unavailable_lz4_named", refused(result, os.path.basename(lz4), "/latents/layer_001", "32004", "LZ4", "HDF5_PLUGIN_PATH")
           and not os.path.exists(out), why(result))
    result, out = files.project(lz4, env=with_plugins)
    report("lz4_with_plugin_path", result.returncode == 0 and same_targets(targets(out), base), why(result))
    blosc = files.variant(files.teacher, "blosc", lambda f: rewrite(f, "/tokens/byte_start", f["/tokens/byte_start"][...], **hdf5plugin.Blosc()))
    sample = run([program("essence-inspect"), "sample", blosc, "--index", "0"], env=no_plugins)
    report("unavailable_blosc_named", refused(sample, "/tokens/byte_start", "32001", "Blosc", "HDF5_PLUGIN_PATH"), why(sample))
    student_lz4 = files.variant(files.student, "student_lz4", lambda f: rewrite(f, "/tokens/id", f["/tokens/id"][...], **hdf5plugin.LZ4()))
    result = run([program("essence-align"), "--model", FIX.student, "--data", student_lz4, "--out", os.path.join(files.tmp, "a-lz4"),
                  "--steps", "1"], env=no_plugins)
    report("align_unavailable_lz4_named", refused(result, "/tokens/id", "32004", "HDF5_PLUGIN_PATH"), why(result))


def test_strings_and_attributes(files):
    """Issue 12.2/12.3: fixed-length strings read; integer attributes as integers or strings."""
    _, base_out = files.project(files.teacher)
    base = targets(base_out)
    with h5py.File(files.teacher, "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else x for x in f["/samples/id"][...]]
    for label, edit in {
        "fixed_length_ids": lambda f: rewrite(f, "/samples/id", np.array([i.encode() for i in ids])),
        "space_padded_ids": lambda f: _space_padded_ids(f, ids),
        "hidden_size_string": lambda f: f.attrs.__setitem__("hidden_size", "64"),  # as files before int64
        "hidden_size_int32": lambda f: f.attrs.__setitem__("hidden_size", np.int32(64)),
        "hidden_size_float": lambda f: f.attrs.__setitem__("hidden_size", 64.0),
        "layers_int_array": lambda f: f.attrs.__setitem__("layers", np.array([1, 2])),
        "fixed_length_format": lambda f: f.attrs.__setitem__("format", np.bytes_(b"essence.teacher")),
        "format_version_uint8": lambda f: f.attrs.__setitem__("format_version", np.uint8(1)),
    }.items():
        path = files.variant(files.teacher, label, edit)
        result, out = files.project(path)
        ok = result.returncode == 0 and same_targets(targets(out), base)
        if ok:
            with h5py.File(out, "r") as f:
                ok = [x.decode() for x in f["/samples/id"][...]] == ids
        report(f"reads_{label}", ok, why(result))
    for label, (edit, words) in {
        "hidden_size_not_a_number": (lambda f: f.attrs.__setitem__("hidden_size", "64 wide"), ["hidden_size", "64 wide", "not an integer"]),
        "hidden_size_fraction": (lambda f: f.attrs.__setitem__("hidden_size", 64.5), ["hidden_size", "float64", "not an integer"]),
        "hidden_size_uint64_max": (lambda f: f.attrs.__setitem__("hidden_size", np.uint64(2 ** 64 - 1)), ["hidden_size", "uint64", "above the range"]),
        "hidden_size_array": (lambda f: f.attrs.__setitem__("hidden_size", np.array([64, 64])), ["hidden_size", "2 values"]),
        "format_integer": (lambda f: f.attrs.__setitem__("format", 7), ["format", "int64", "expected a string"]),
        "layers_garbage": (lambda f: f.attrs.__setitem__("layers", "one,two"), ["layers", "one,two"]),
        "ids_integers": (lambda f: rewrite(f, "/samples/id", np.arange(len(ids))), ["/samples/id", "int64", "expected strings"]),
    }.items():
        path = files.variant(files.teacher, label, edit)
        result, out = files.project(path)
        report(f"refuses_{label}", refused(result, os.path.basename(path), *words) and not os.path.exists(out), why(result))


def _space_padded_ids(f, ids):
    """A fixed-length, space-padded string dataset (Fortran-style), through the low-level API."""
    width = max(len(i) for i in ids) + 3
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(width)
    tid.set_strpad(h5py.h5t.STR_SPACEPAD)
    del f["/samples/id"]
    space = h5py.h5s.create_simple((len(ids),))
    dataset = h5py.h5d.create(f.id, b"/samples/id", tid, space)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array([i.encode().ljust(width) for i in ids], dtype=f"S{width}"), mtype=tid)


def flip(source, path, dataset, chunk=0):
    """A copy of source with one byte flipped in the middle of the dataset's stored chunk."""
    shutil.copy(source, path)
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as g:
        g.seek(info.byte_offset + info.size // 2)
        byte = g.read(1)[0]
        g.seek(info.byte_offset + info.size // 2)
        g.write(bytes([byte ^ 0x5a]))
    return path


def test_flipped_bytes(files):
    """Fault matrix: a flipped byte inside a compressed chunk is reported with the file, the
    dataset and the chunk's rows, exit 3, by each program that reads that dataset."""
    with h5py.File(files.teacher, "r") as f:
        tokens = len(f["/tokens/id"])
    with h5py.File(files.student, "r") as f:
        student_tokens = len(f["/tokens/id"])
    for dataset in ("/latents/layer_002", "/tokens/byte_start", "/samples/text_bytes", "/samples/token_start"):
        path = flip(files.teacher, files.path("flip"), dataset)
        result, out = files.project(path)
        report(f"project_flipped_{dataset.strip('/').replace('/', '_')}",
               refused(result, os.path.basename(path), dataset, "chunk 0", "rows 0..") and not os.path.exists(out), why(result))
    path = flip(files.teacher, files.path("flip"), "/latents/layer_002")
    result, _ = files.project(path)  # the rows the chunk holds, not its padded size
    report("project_flipped_latent_rows", refused(result, "/latents/layer_002", f"rows 0..{tokens - 1})", "corrupt"), why(result))
    for dataset in ("/tokens/id", "/latents/layer_001"):
        path = flip(files.teacher, files.path("flip"), dataset)
        sample = files.inspect_sample(path)
        report(f"inspect_flipped_teacher_{dataset.strip('/').replace('/', '_')}", refused(sample, os.path.basename(path), dataset, "rows 0.."),
               why(sample))
    for dataset in ("/targets/layer_001", "/tokens/id", "/tokens/teacher_row", "/samples/token_start"):
        path = flip(files.student, files.path("flip"), dataset)
        result, _ = files.align(path)
        rows = f"rows 0..{student_tokens - 1}" if dataset != "/samples/token_start" else "rows 0.."
        report(f"align_flipped_{dataset.strip('/').replace('/', '_')}", refused(result, os.path.basename(path), dataset, "chunk 0", rows),
               why(result))
        # inspect sample reads all but teacher_row, which the summary's alignment figures read
        sample = files.inspect_sample(path) if dataset != "/tokens/teacher_row" else run([program("essence-inspect"), path])
        report(f"inspect_flipped_student_{dataset.strip('/').replace('/', '_')}", refused(sample, dataset, "rows 0.."), why(sample))
    # A dataset another tool wrote (gzip, whose stream has a checksum, through HDF5's own
    # filter path, small chunks): the bad chunk is found among several and named with its rows.
    path = files.variant(files.teacher, "small_chunks",
                         lambda f: rewrite(f, "/tokens/byte_end", f["/tokens/byte_end"][...].astype(np.int64), chunks=(16,),
                                           compression="gzip", shuffle=True))
    path = flip(path, files.path("flip-small-chunks"), "/tokens/byte_end", chunk=2)
    result, _ = files.project(path)
    report("project_flipped_third_of_several_chunks", refused(result, "/tokens/byte_end", "chunk 2 (rows 32..47)"), why(result))


def test_truncated(files):
    """Fault matrix: a file cut short anywhere is a clear exit 3 naming it, never a signal."""
    for source, label in ((files.teacher, "teacher"), (files.student, "student")):
        size = os.path.getsize(source)
        messages, ok = [], True
        for cut in sorted({0, 7, 100, 600, size // 3, size // 2, 2 * size // 3, size - 1}):
            path = files.path(f"cut-{label}-{cut}")
            with open(source, "rb") as f, open(path, "wb") as g:
                g.write(f.read(cut))
            runs = [files.inspect_sample(path), run([program("essence-inspect"), path])]
            if label == "teacher":
                runs.append(files.project(path)[0])
            else:
                runs.append(files.align(path)[0])
            for result in runs:
                good = signal_free(result) and refused(result, os.path.basename(path)) and (
                    "truncated" in result.stderr or "not an HDF5 file" in result.stderr)
                if not good:
                    ok = False
                    messages.append(f"cut {cut}: {why(result)}")
        report(f"truncated_{label}_at_several_points", ok, "; ".join(messages)[:1500])


def heap_collections(raw):
    """(offset, size, objects) of every global heap collection ("GCOL") in the bytes; objects are
    (offset, index, size) of each object header, the free-space object (index 0) last."""
    found, at = [], raw.find(b"GCOL")
    while at >= 0:
        size = struct.unpack_from("<Q", raw, at + 8)[0]
        objects, q = [], at + 16
        while 16 <= size <= len(raw) - at and q + 16 <= at + size:
            index, _ = struct.unpack_from("<HH", raw, q)
            length = struct.unpack_from("<Q", raw, q + 8)[0]
            objects.append((q, index, length))
            if index == 0:
                break
            q += 16 + (length + 7) // 8 * 8
        if objects:
            found.append((at, size, objects))
        at = raw.find(b"GCOL", at + 4)
    return found


def damaged(source, path, edit):
    raw = bytearray(open(source, "rb").read())
    edit(raw)
    with open(path, "wb") as f:
        f.write(raw)
    return path


def readers(files, path, label):
    """The programs that read such a file, each under a time limit (a hang is a failure)."""
    runs = [run([program("essence-inspect"), path]), run([program("essence-inspect"), "sample", path, "--index", "1"])]
    runs.append(files.project(path)[0] if label == "teacher" else files.align(path)[0])
    return runs


def test_damaged_global_heap(files):
    """Fault matrix: a damaged global heap (the variable-length strings: ids and attributes). libhdf5
    1.10 crashes or loops on some; every program refuses the file with exit 3 naming it and what
    it was reading, never a signal or a hang. Damage HDF5 reports as an error is fine either way
    (exit 0 when nothing needed was touched)."""
    for source, label in ((files.teacher, "teacher"), (files.student, "student")):
        raw = open(source, "rb").read()
        collections = heap_collections(raw)
        report(f"global_heap_found_{label}", bool(collections), "no GCOL in the file")
        if not collections:
            continue
        at, size, objects = collections[0]
        free_space, first = objects[-1], objects[0]
        cases = {
            "free_space_size_0": lambda b: struct.pack_into("<Q", b, free_space[0] + 8, 0),  # libhdf5 loops
            "object_size_huge": lambda b: struct.pack_into("<Q", b, first[0] + 8, 1 << 40),  # libhdf5 segfaults
            "object_index_wrong": lambda b: struct.pack_into("<H", b, first[0], 60000),
            "collection_size_huge": lambda b: struct.pack_into("<Q", b, at + 8, 1 << 32),
        }
        paths, results = {}, {}
        for name, edit in cases.items():
            path = paths[name] = damaged(source, files.path(f"heap-{label}-{name}"), edit)
            results[name] = readers(files, path, label)
            bad = [why(r) for r in results[name]
                   if not (signal_free(r) and (r.returncode == 0 or refused(r, os.path.basename(path))))]
            report(f"global_heap_{label}_{name}", not bad, "; ".join(bad)[:1500])
        for name in ("free_space_size_0", "object_size_huge"):  # the two that libhdf5 cannot survive
            result = results[name][0]
            report(f"global_heap_{label}_{name}_named", refused(result, os.path.basename(paths[name]), "damaged", "global heap"),
                   why(result))
        # Random damage inside the collections (seeded): whatever it is, exit 0 or 3, no signal, no hang.
        rng = random.Random(12)
        bad = []
        for trial in range(12):
            def scramble(b):
                for _ in range(rng.randint(1, 4)):
                    at, size, _ = rng.choice(collections)
                    spot = at + rng.randrange(min(size, len(b) - at))
                    b[spot] ^= 1 << rng.randrange(8)
            path = damaged(source, files.path(f"heap-{label}-random-{trial}"), scramble)
            result = run([program("essence-inspect"), path])
            if not (signal_free(result) and result.returncode in (0, 3)):
                bad.append(f"trial {trial}: {why(result)}")
        report(f"global_heap_{label}_random_damage", not bad, "; ".join(bad)[:1500])
    # The ids' references themselves (in /samples/id's chunk, which our writer does not compress):
    # a wrong heap index, a length of 4 GiB, a collection address past the end.
    with h5py.File(files.teacher, "r") as f:
        info = f["/samples/id"].id.get_chunk_info(0)
    for name, offset, value, form in (("index", 12, 0xFFFF, "<I"), ("length", 0, 0xFFFFFFFF, "<I"), ("address", 4, 1 << 50, "<Q")):
        path = damaged(files.teacher, files.path(f"heap-reference-{name}"),
                       lambda b: struct.pack_into(form, b, info.byte_offset + 16 + offset, value))
        bad = [why(r) for r in readers(files, path, "teacher")
               if not (signal_free(r) and r.returncode in (0, 3) and (r.returncode == 0 or os.path.basename(path) in r.stderr))]
        report(f"global_heap_reference_{name}", not bad, "; ".join(bad)[:1500])


def main():
    with tempfile.TemporaryDirectory(prefix="essence-h5read-") as tmp:
        files = Files(tmp)
        test_wider_types(files)
        test_bad_values(files)
        test_latent_types_and_filters(files)
        test_strings_and_attributes(files)
        test_flipped_bytes(files)
        test_truncated(files)
        test_damaged_global_heap(files)


if __name__ == "__main__":
    run_main(main, "test_h5_read")
