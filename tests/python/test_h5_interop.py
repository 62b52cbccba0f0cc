"""Other HDF5 readers read the store's files: h5py + hdf5plugin, plain h5py with our plugin
library, and h5dump with and without it. Prints PASS/FAIL/SKIP lines for tests/run.sh."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
PLUGINS = os.path.join(BUILD, "plugins")
TOOL = os.path.join(BUILD, "tests", "tools", "write_latents")


def run_child(code, env_extra):
    """Runs Python code in a fresh interpreter (a plugin path is read when HDF5 loads)."""
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def main():
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "latents.h5")
    rows, width, chunk = 1000, 96, 64  # 15 full chunks and a partial one
    subprocess.run([TOOL, path, str(rows), str(width), str(chunk), "7"], check=True)
    expected = np.fromfile(path + ".f32", dtype="<f4").reshape(rows, width)

    # 1. h5py + hdf5plugin (hdf5plugin registers its own zstd filter for id 32015).
    import h5py
    import hdf5plugin  # noqa: F401

    with h5py.File(path, "r") as f:
        d = f["/latents/layer_001"]
        got = d[...]
        report("h5py_hdf5plugin_dtype", got.dtype == np.float32 and d.shape == (rows, width),
               f"dtype {got.dtype} shape {d.shape}")
        report("h5py_hdf5plugin_values_exact", np.array_equal(got, expected),
               f"max |diff| {np.max(np.abs(got - expected))}")
        report("h5py_chunks_and_filters", d.chunks == (chunk, width) and d.shuffle and "32015" in str(d._filters),
               f"chunks {d.chunks} filters {d._filters}")
        report("h5py_partial_rows", np.array_equal(d[990:1000], expected[990:]), "last partial chunk differs")
        report("h5py_attributes", f.attrs["format"] == "essence.test" and f.attrs["format_version"] == 1,
               str(dict(f.attrs)))

    # 2. plain h5py (no hdf5plugin) finds our plugin library through HDF5_PLUGIN_PATH.
    code = (f"import h5py, numpy as np\n"
            f"d = h5py.File({path!r}, 'r')['/latents/layer_001'][...]\n"
            f"e = np.fromfile({path + '.f32'!r}, dtype='<f4').reshape(d.shape)\n"
            f"print('EQUAL' if np.array_equal(d, e) else 'DIFFERENT')\n")
    child = run_child(code, {"HDF5_PLUGIN_PATH": os.path.abspath(PLUGINS)})
    report("h5py_with_libh5zstd_plugin", child.stdout.strip() == "EQUAL", child.stdout + child.stderr[-800:])
    child = run_child(code, {"HDF5_PLUGIN_PATH": tmp})  # no plugin there: reading must fail
    report("h5py_without_plugin_fails", child.returncode != 0 and "EQUAL" not in child.stdout,
           "read succeeded without any zstd filter?")

    # 3. h5dump: with the plugin it prints the values; without it, DATA {} (exit 0!) or an error.
    if not shutil.which("h5dump"):
        print("SKIP h5dump_with_plugin: h5dump not installed (apt-get install hdf5-tools)")
        return
    dump = subprocess.run(["h5dump", "-d", "/latents/layer_001", "-s", "0,0", "-c", "3," + str(width), path],
                          env=dict(os.environ, HDF5_PLUGIN_PATH=os.path.abspath(PLUGINS)),
                          capture_output=True, text=True)
    report("h5dump_with_plugin_prints_values",
           dump.returncode == 0 and _dump_values(dump.stdout, 3 * width, expected[:3].ravel()),
           dump.stdout[:400] + dump.stderr[-400:])
    bare = subprocess.run(["h5dump", "-d", "/latents/layer_001", "-c", "2,2", path],
                          env=dict(os.environ, HDF5_PLUGIN_PATH=tmp), capture_output=True, text=True)
    empty = re.search(r"DATA\s*\{\s*\}", bare.stdout) is not None
    report("h5dump_without_plugin_detected", empty or bare.returncode != 0 or "error" in bare.stderr.lower(),
           "h5dump printed values without the filter?")


def _dump_values(text, count, expected):
    """The values h5dump printed in its DATA block (index prefixes removed), compared as float32."""
    block = text.split("DATA {", 1)[1].split("}", 1)[0]
    block = re.sub(r"\(\d+(?:,\d+)*\):", " ", block)
    values = np.array([float(x) for x in block.replace(",", " ").split()], dtype=np.float64)
    if values.size != count:
        print(f"  h5dump printed {values.size} values, expected {count}")
        return False
    # h5dump prints 6 significant digits (%g): compare within that precision.
    return bool(np.allclose(values, expected.astype(np.float64), rtol=5e-6, atol=1e-30))


if __name__ == "__main__":
    run_main(main, "test_h5_interop")
