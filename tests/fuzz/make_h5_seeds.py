"""Makes the seed corpus of fuzz_h5 (tests/fuzz/corpus/h5/) from a tiny teacher.h5 and
student.h5 (essence-extract and essence-project on the in-repo fixtures), cut to their first
samples and rewritten with small chunks so each seed is a few KB:

    HDF5_PLUGIN_PATH=build/plugins .venv/bin/python tests/fuzz/make_h5_seeds.py TEACHER.h5 STUDENT.h5 OUT_DIR

Zstandard chunks are written through HDF5_PLUGIN_PATH's filter 32015 (build/plugins/libh5zstd.so,
ours: frames with content checksums), so hdf5plugin must not be imported here. Seeds:
  teacher.h5 / student.h5   our layout: shuffle + zstd chunks of whole rows, bf16 latents/targets
  teacher_h5py_types.h5     what other tools write: int64/float64/bool columns, float16 latents,
                            gzip, fixed-length ids and attributes, int64 hidden_size and an integer
                            layers array"""
import os
import sys

import h5py
import numpy as np

SAMPLES = 1   # samples kept
CHUNK = 8     # rows per chunk
ZSTD = {"compression": 32015, "compression_opts": (3,), "shuffle": True}


def short(value):
    """Long text attributes (configs) cut: the seed stays small, the type stays."""
    if isinstance(value, str) and len(value) > 48:
        return value[:48]
    return value


def copy_raw(src, dst, name, rows, options):
    """A row dataset cut to `rows` rows, in its own file type (bf16 stays bf16), chunked."""
    d = src[name]
    tid = d.id.get_type()
    shape = (rows,) + d.shape[1:]
    data = np.empty(shape, dtype=f"V{tid.get_size()}" if tid.get_class() == h5py.h5t.FLOAT and tid.get_size() == 2 else d.dtype)
    space = h5py.h5s.create_simple(shape)
    if rows:
        file_space = d.id.get_space()
        file_space.select_hyperslab((0,) * len(shape), shape)
        d.id.read(space, file_space, data, mtype=tid)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((min(CHUNK, max(rows, 1)),) + d.shape[1:])
    if options.get("shuffle"):
        dcpl.set_shuffle()
    if options.get("compression") == 32015:
        dcpl.set_filter(32015, h5py.h5z.FLAG_MANDATORY, options["compression_opts"])
    elif options.get("compression") == "gzip":
        dcpl.set_deflate(4)
    parent = os.path.dirname(name)
    if parent not in dst:
        dst.create_group(parent)
    out = h5py.h5d.create(dst.id, name.encode(), tid, space, dcpl=dcpl)
    if rows:
        out.write(h5py.h5s.ALL, h5py.h5s.ALL, data, mtype=tid)


def cut(src_path, dst_path, convert=False):
    with h5py.File(src_path, "r") as src, h5py.File(dst_path, "w", libver=("v110", "v110")) as dst:
        token_start = src["/samples/token_start"][...]
        text_start = src["/samples/text_start"][...]
        tokens, text = int(token_start[SAMPLES]), int(text_start[SAMPLES])
        for key, value in src.attrs.items():  # other tools' seed: fixed-length strings
            value = short(value)
            dst.attrs[key] = np.bytes_(value.encode()) if convert and isinstance(value, str) else value
        ids = [x.decode() if isinstance(x, bytes) else x for x in src["/samples/id"][:SAMPLES]]
        if convert:
            dst.create_dataset("/samples/id", data=np.array([i.encode() for i in ids]))  # fixed-length
        else:
            dst.create_dataset("/samples/id", data=ids, dtype=h5py.string_dtype(), chunks=(4,), maxshape=(None,))
        rows = {"/samples/text_start": SAMPLES + 1, "/samples/token_start": SAMPLES + 1, "/samples/text_bytes": text,
                "/samples/truncated": SAMPLES, "/samples/add_special_tokens": SAMPLES}
        for name in src["/tokens"]:
            rows[f"/tokens/{name}"] = tokens
        for group in ("latents", "targets"):
            for name in src.get(group, {}):
                rows[f"/{group}/{name}"] = tokens
        for name, n in rows.items():
            if not convert:
                copy_raw(src, dst, name, n, ZSTD)
                continue
            data = src[name][:n]
            if name.startswith("/latents"):
                dst.create_dataset(name, data=data.astype(np.float16), chunks=(CHUNK,) + data.shape[1:], compression="gzip")
            elif name == "/samples/truncated":
                dst.create_dataset(name, data=data != 0)  # h5py's bool: an enum
            elif name.startswith("/tokens/byte"):
                dst.create_dataset(name, data=data.astype(np.float64), chunks=(CHUNK,), compression="gzip", shuffle=True)
            else:
                dst.create_dataset(name, data=data.astype(np.int64))
        for name in src.get("stats", {}):
            for leaf in ("count", "mean", "m2"):
                dst.create_dataset(f"/stats/{name}/{leaf}", data=src[f"/stats/{name}/{leaf}"][...])
        if convert:
            dst.attrs["hidden_size"] = np.int64(int(src.attrs["hidden_size"]))
            dst.attrs["layers"] = np.array([int(x) for x in str(src.attrs["layers"]).split(",")])


def main():
    teacher, student, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    cut(teacher, os.path.join(out, "teacher.h5"))
    cut(student, os.path.join(out, "student.h5"))
    cut(teacher, os.path.join(out, "teacher_h5py_types.h5"), convert=True)
    for name in sorted(os.listdir(out)):
        print(name, os.path.getsize(os.path.join(out, name)), "bytes")


if __name__ == "__main__":
    main()
