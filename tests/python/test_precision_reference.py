"""The GEMM input roundings of essence-project (es_round_precision: bf16, fp8 e4m3) against ml_dtypes, a
reference nobody here wrote: bit for bit on the CPU backend and, where it is built, on the CUDA backend
compiled for the host (its kernel is the one the GPU runs). The values: random float32 bit patterns,
every tie halfway between neighbours of the format, its subnormals, its overflow edge, ±0, ±inf, NaN.
Where ml_dtypes' float8_e4m3fn overflows to NaN the projection saturates at ±448 by design (DESIGN.md),
as CUDA's __NV_SATFINITE conversion does: that is what is expected there. tf32 has no ml_dtypes type:
tests/unit/test_precision.c holds its cases."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

try:
    import ml_dtypes
    import numpy as np
except ImportError as missing:  # main() says so
    ml_dtypes = np = None
    MISSING = missing

BUILD = os.environ.get("ESSENCE_BUILD", "build")
BACKEND = os.path.join(BUILD, "emu", "libessence-cuda.so")


def rounded(values, precision, device):
    env = {**os.environ, "ESSENCE_CUDA_BACKEND": BACKEND} if device == "cuda" else None
    result = subprocess.run([os.path.join(BUILD, "tests", "tools", "round_values"), precision, device],
                            input=values.astype("<f4").tobytes(), capture_output=True, timeout=600, env=env)
    if result.returncode:
        raise RuntimeError(f"round_values {precision} {device}: exit {result.returncode}: {result.stderr.decode()[-400:]}")
    return np.frombuffer(result.stdout, "<f4")


def inputs(fmt):
    """Random bit patterns, each representable value of fmt and the ties between neighbours."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    out = [bits.view(np.float32)]
    if fmt is ml_dtypes.bfloat16:
        grid = (np.arange(0, 2**16, dtype=np.uint32) << 16).view(np.float32)
    else:
        grid = np.arange(0, 256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        # magnitudes where e4m3 lives, log-uniform from below its smallest subnormal to past 448
        out.append((rng.choice([-1, 1], 200_000) * 2.0 ** rng.uniform(-12, 9.5, 200_000)).astype(np.float32))
    grid = np.unique(grid[np.isfinite(grid)]).astype(np.float64)
    ties = (grid[:-1] + grid[1:]) / 2  # exact in float64, and in float32 too for these formats
    near = np.concatenate([np.nextafter(ties.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(ties.astype(np.float32), np.float32(-np.inf))])
    out += [grid.astype(np.float32), ties.astype(np.float32), near,
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 448, 464, -464, 470, 480, 1e30, -1e30], dtype=np.float32)]
    return np.concatenate(out)


def expected(values, fmt):
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(fmt).astype(np.float32)
    if fmt is ml_dtypes.float8_e4m3fn:  # e4m3fn overflows to NaN; the projection saturates
        overflow = np.isnan(want) & ~np.isnan(values)
        want = np.where(overflow, np.copysign(np.float32(448), values), want).astype(np.float32)
    return want


def main():
    if ml_dtypes is None:
        print(f"SKIP precision_matches_ml_dtypes: {MISSING} (make deps installs ml_dtypes into .venv)")
        return
    devices = ["cpu"]
    if os.path.exists(BACKEND) and not os.environ.get("ESSENCE_SANITIZE"):
        devices.append("cuda")
    else:
        print(f"SKIP precision_matches_ml_dtypes[cuda]: no {BACKEND} here, or a sanitizer build (make test runs it where nvcc is)")
    for precision, fmt in (("bf16", ml_dtypes.bfloat16), ("fp8", ml_dtypes.float8_e4m3fn)):
        values = inputs(fmt)
        want = expected(values, fmt)
        for device in devices:
            got = rounded(values, precision, device)
            same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
            bad = np.flatnonzero(~same)
            print(f"  {precision} on {device}: {len(values)} values, {len(bad)} differ from ml_dtypes {ml_dtypes.__version__}")
            report(f"precision_matches_ml_dtypes[{precision},{device}]", len(got) == len(values) and not len(bad),
                   ", ".join(f"{values[i]!r} -> {got[i]!r}, expected {want[i]!r}" for i in bad[:5]))


if __name__ == "__main__":
    run_main(main, "test_precision_reference")
