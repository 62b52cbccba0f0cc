"""essence-inspect on store files, checked against numpy: the summary's facts, and `stats`
(non-finite counts, row-norm percentiles, per-dimension mean/std extremes); error exits."""
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")
TOOL = os.path.join(BUILD, "tests", "tools", "write_latents")


def inspect(*args):
    return subprocess.run([INSPECT, *args], capture_output=True, text=True)


def close(a, b, rel=2e-3):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def main():
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "t.h5")
    rows, width, chunk = 700, 33, 50
    subprocess.run([TOOL, path, str(rows), str(width), str(chunk), "3", "nonfinite"], check=True)
    values = np.fromfile(path + ".f32", dtype="<f4").reshape(rows, width).astype(np.float64)

    summary = inspect(path)
    out = summary.stdout
    report("summary_exit_0", summary.returncode == 0, summary.stderr)
    report("summary_format", "format: essence.test (version 1)" in out, out[:300])
    line = next((l for l in out.splitlines() if "/latents/layer_001" in l), "")
    report("summary_dataset_line",
           "bf16" in line and f"[{rows}, {width}]" in line and f"[{chunk}, {width}]" in line
           and "shuffle+zstd(3)" in line and "ratio" in line, line)

    stats = inspect("stats", path, "--layer", "1")
    out = stats.stdout
    report("stats_exit_0", stats.returncode == 0, stats.stderr)
    finite_rows = np.all(np.isfinite(values), axis=1)
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    report("stats_nonfinite", f"{nan} NaN, {inf} Inf" in out, out)
    norms = np.sort(np.linalg.norm(values[finite_rows], axis=1))
    got = dict(re.findall(r"p(\d+)=([-0-9.e+]+)", out))
    ok = len(got) == 9
    for p in (0, 1, 5, 25, 50, 75, 95, 99, 100):
        want = norms[int(round(p / 100 * (len(norms) - 1)))]
        ok = ok and str(p) in got and close(float(got[str(p)]), want)
    report("stats_norm_percentiles", ok, f"{got} vs numpy p50={np.median(norms)}")
    masked = np.where(np.isfinite(values), values, np.nan)
    mean = np.nanmean(masked, axis=0)
    std = np.nanstd(masked, axis=0)
    m = re.search(r"mean: min ([-0-9.e+]+) \(dim (\d+)\), max ([-0-9.e+]+) \(dim (\d+)\)", out)
    s = re.search(r"std:\s+min ([-0-9.e+]+) \(dim (\d+)\), max ([-0-9.e+]+) \(dim (\d+)\)", out)
    report("stats_mean_extremes", m is not None and int(m.group(2)) == int(np.argmin(mean))
           and int(m.group(4)) == int(np.argmax(mean)) and close(float(m.group(3)), mean.max()), out)
    report("stats_std_extremes", s is not None and int(s.group(2)) == int(np.argmin(std))
           and int(s.group(4)) == int(np.argmax(std)) and close(float(s.group(3)), std.max()), out)

    missing = inspect(os.path.join(tmp, "nope.h5"))
    report("missing_file_exit_2", missing.returncode == 2 and "nope.h5" in missing.stderr, missing.stderr)
    junk = os.path.join(tmp, "junk.h5")
    with open(junk, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # HDF5's signature, then nothing valid
    bad = inspect(junk)
    report("junk_file_exit_3", bad.returncode == 3 and "junk.h5" in bad.stderr, bad.stderr)
    no_layer = inspect("stats", path, "--layer", "9")
    report("stats_missing_layer_exit_3", no_layer.returncode == 3 and "layer 9" in no_layer.stderr, no_layer.stderr)
    usage = inspect("stats")
    report("stats_usage_exit_2", usage.returncode == 2, usage.stderr)
    helped = inspect("--help")
    report("help_exit_0", helped.returncode == 0 and "stats" in helped.stdout, helped.stdout[:200])


if __name__ == "__main__":
    run_main(main, "test_inspect")
