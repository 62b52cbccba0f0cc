"""essence-inspect on checkpoints: the fixtures list completely, and every malformed file
(built here byte by byte) is rejected with exit code 3 and a message naming file and tensor."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.join(BUILD, "essence-inspect")


def safetensors_bytes(header, data, header_bytes=None):
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def good_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


def main():
    tmp = tempfile.mkdtemp()
    for fixtures, folder in ((f, m) for f in fixture_sets("safetensors_fixtures") for m in (f.teacher, f.student)):
        name = os.path.basename(folder)
        run = subprocess.run([INSPECT, folder], capture_output=True, text=True)
        index = os.path.join(folder, "model.safetensors.index.json")
        expected = len(json.load(open(index))["weight_map"]) if os.path.exists(index) else None
        total = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        ok = run.returncode == 0 and total.startswith("total: ")
        if expected is not None:
            ok = ok and total.startswith(f"total: {expected} tensors")
        report(fixtures.name(f"fixture_{name}_lists"), ok, run.stderr + total)

    data = bytes(24)
    cases = {
        "truncated": safetensors_bytes(good_header(), data)[:-5],
        "header_past_end": struct.pack("<Q", 10**6) + b"{}",
        "overlap": safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, data),
        "unknown_dtype": safetensors_bytes({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 24]}}, data),
        "shape_mismatch": safetensors_bytes({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 24]}}, data),
        "bad_utf8_name": safetensors_bytes(None, data, b'{"a\xff\xfe": {"dtype": "U8", "shape": [24], "data_offsets": [0, 24]}}'),
    }
    expect_in_message = {"overlap": '"b"', "unknown_dtype": "Q4", "shape_mismatch": '"a"'}
    for case, blob in cases.items():
        path = os.path.join(tmp, f"{case}.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        run = subprocess.run([INSPECT, path], capture_output=True, text=True)
        ok = run.returncode == 3 and f"{case}.safetensors" in run.stderr
        ok = ok and expect_in_message.get(case, "") in run.stderr and "Traceback" not in run.stderr
        report(f"malformed_{case}_exit_3", ok, f"exit {run.returncode}: {run.stderr.strip()}")

    # A sharded folder whose index points outside the folder.
    folder = os.path.join(tmp, "escape")
    os.mkdir(folder)
    with open(os.path.join(tmp, "x"), "wb") as f:
        f.write(safetensors_bytes(good_header(), data))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "../x", "b": "../x"}}, f)
    run = subprocess.run([INSPECT, folder], capture_output=True, text=True)
    report("shard_outside_folder_exit_3", run.returncode == 3 and "../x" in run.stderr, run.stderr)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    run_main(main, "test_safetensors_cli")
