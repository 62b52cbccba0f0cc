"""essence-inspect plot: a metrics.jsonl as essence-align writes it becomes a PNG (signature, size
from the PNG header, nothing left behind); output names gnuplot would misread if quoted badly;
and the errors: missing file (2), malformed lines (3, FILE:LINE), nothing to plot (3), no
gnuplot on PATH (1), bad -o (2)."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
INSPECT = os.path.abspath(os.path.join(BUILD, "essence-inspect"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def inspect(*args, env=None):
    return subprocess.run([INSPECT, *args], capture_output=True, text=True, errors="replace", env=env)


def write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def training_run(steps=300, eval_every=50, first=1):
    """Lines as essence-align writes them: a training line per step, an eval line now and then."""
    lines = []
    for s in range(first, steps + 1):
        lines.append({"step": s, "loss": 2.0 * math.exp(-s / 80) + 0.1, "latent_mse": 1.8 * math.exp(-s / 90) + 0.2,
                      "ce": 0.5 + 1.0 / s, "lr": 3e-4 * min(1.0, s / 30) * (0.5 + 0.5 * math.cos(math.pi * s / steps)),
                      "grad_norm": 1.5, "tokens_per_s": 12000.0})
        if s % eval_every == 0:
            lines.append({"step": s, "eval_latent_mse": 1.8 * math.exp(-s / 90) + 0.25, "eval_cosine": 0.6,
                          "eval_ce": 2.5, "eval_const_mse": 0.78, "eval_r2": 0.2})
    return lines


def png_size(path):
    """(width, height) from the IHDR chunk, or None for anything that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".partial") or n.startswith("essence-plot-")]


def main():
    tmp = tempfile.mkdtemp()
    scratch = os.path.join(tmp, "scratch")  # gnuplot's data files go here (TMPDIR): must end up empty
    os.mkdir(scratch)
    env = dict(os.environ, TMPDIR=scratch)
    metrics = os.path.join(tmp, "metrics.jsonl")
    write_lines(metrics, training_run())
    have_gnuplot = shutil.which("gnuplot") is not None

    if not have_gnuplot:
        print("SKIP plot_png: gnuplot is not installed (make deps installs gnuplot-nox)")
    else:
        out = os.path.join(tmp, "loss.png")
        done = inspect("plot", metrics, "-o", out, env=env)
        report("plot_exit_0", done.returncode == 0, done.stderr)
        size = png_size(out) if os.path.exists(out) else None
        report("plot_png_header", size == (1000, 840), f"{size}")
        nbytes = os.path.getsize(out) if os.path.exists(out) else 0
        report("plot_png_size", 10_000 < nbytes < 2_000_000, f"{nbytes} bytes")
        report("plot_nothing_left", not leftovers(tmp) and not os.listdir(scratch), f"{os.listdir(tmp)} {os.listdir(scratch)}")
        report("plot_summary_line", "300 training steps, 6 eval points" in done.stdout, done.stdout)

        # names with every character gnuplot's strings treat specially, and non-ASCII
        odd_dir = os.path.join(tmp, "it's a \"dir\" @x $y \\ `z`")
        os.mkdir(odd_dir)
        odd_metrics = os.path.join(odd_dir, "m'e\"t @r $i \\c s.jsonl")
        shutil.copy(metrics, odd_metrics)
        odd_out = os.path.join(odd_dir, "lo'ss \"é\" @out $HOME \\n.png")
        done = inspect("plot", odd_metrics, "--out", odd_out, env=env)
        report("plot_quoted_names", done.returncode == 0 and png_size(odd_out) is not None
               and sorted(os.listdir(odd_dir)) == sorted([os.path.basename(odd_metrics), os.path.basename(odd_out)]),
               done.stderr + str(os.listdir(odd_dir)))

        # gnuplot runs "|cmd" outputs and "<cmd" data files through a shell: a relative name
        # that looks like one must stay a plain file name
        pipe_dir = os.path.join(tmp, "pipe")
        os.mkdir(pipe_dir)
        os.mkdir(os.path.join(pipe_dir, "<touch pwned"))
        pipe_env = dict(env, TMPDIR="<touch pwned")
        done = subprocess.run([INSPECT, "plot", metrics, "-o", "|touch pwned; cat >x.png"], capture_output=True,
                              text=True, errors="replace", env=pipe_env, cwd=pipe_dir)
        made = sorted(os.listdir(pipe_dir))
        report("plot_pipe_like_names", done.returncode == 0 and made == ["<touch pwned", "|touch pwned; cat >x.png"]
               and not os.listdir(os.path.join(pipe_dir, "<touch pwned")), done.stderr + str(made))

        # a resumed run repeats steps; eval-only and lr-only files are plottable too (one panel)
        resumed = os.path.join(tmp, "resumed.jsonl")
        write_lines(resumed, training_run(200) + training_run(300, first=151))
        done = inspect("plot", resumed, "-o", os.path.join(tmp, "resumed.png"), env=env)
        report("plot_resumed_run", done.returncode == 0 and "300 training steps" in done.stdout, done.stderr + done.stdout)
        eval_only = os.path.join(tmp, "eval.jsonl")
        write_lines(eval_only, [l for l in training_run() if "eval_r2" in l])
        done = inspect("plot", eval_only, "-o", os.path.join(tmp, "eval.png"), env=env)
        report("plot_eval_only", done.returncode == 0 and png_size(os.path.join(tmp, "eval.png")) == (1000, 420),
               done.stderr)
        # non-positive values: linear scale instead of a log scale gnuplot would refuse
        zero = os.path.join(tmp, "zero.jsonl")
        write_lines(zero, [{"step": 1, "loss": 0.0, "lr": 0.0}, {"step": 2, "loss": -0.5, "lr": 1e-4}])
        done = inspect("plot", zero, "-o", os.path.join(tmp, "zero.png"), env=env)
        report("plot_nonpositive_values", done.returncode == 0, done.stderr)
        # an output that exists is replaced
        done = inspect("plot", zero, "-o", out, env=env)
        report("plot_replaces_output", done.returncode == 0 and png_size(out) == (1000, 840), done.stderr)

    def expect(name, args, code, *needles, run_env=None):
        done = inspect(*args, env=run_env or env)
        ok = done.returncode == code and all(n in done.stderr for n in needles)
        report(name, ok, f"exit {done.returncode}: {done.stderr.strip()}")

    missing = os.path.join(tmp, "nope.jsonl")
    expect("missing_file_exit_2", ["plot", missing, "-o", os.path.join(tmp, "x.png")], 2, "nope.jsonl")

    bad_json = os.path.join(tmp, "bad.jsonl")
    write_lines(bad_json, training_run(2, 10) + ['{"step": 3, "loss": '] + training_run(5, 10)[3:])
    expect("malformed_line_exit_3", ["plot", bad_json, "-o", os.path.join(tmp, "x.png")], 3, "bad.jsonl:3:")

    not_number = os.path.join(tmp, "text.jsonl")
    write_lines(not_number, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 3, "loss": "0.8"}])
    expect("field_not_a_number_exit_3", ["plot", not_number, "-o", os.path.join(tmp, "x.png")], 3,
           "text.jsonl:3:", "\"loss\"")

    no_step = os.path.join(tmp, "nostep.jsonl")
    write_lines(no_step, [{"step": 1, "loss": 1.0}, {"loss": 0.9}])
    expect("missing_step_exit_3", ["plot", no_step, "-o", os.path.join(tmp, "x.png")], 3, "nostep.jsonl:2:", "step")
    not_object = os.path.join(tmp, "list.jsonl")
    write_lines(not_object, [{"step": 1, "loss": 1.0}, "[1, 2]"])
    expect("not_an_object_exit_3", ["plot", not_object, "-o", os.path.join(tmp, "x.png")], 3, "list.jsonl:2:")

    nothing = os.path.join(tmp, "nothing.jsonl")
    write_lines(nothing, [{"step": 1, "grad_norm": 1.0}, {"step": 2, "ce": 0.0, "tokens_per_s": 5.0}])
    expect("no_plottable_lines_exit_3", ["plot", nothing, "-o", os.path.join(tmp, "x.png")], 3,
           "nothing.jsonl", "no plottable lines")
    empty = os.path.join(tmp, "empty.jsonl")
    write_lines(empty, [])
    expect("empty_file_exit_3", ["plot", empty, "-o", os.path.join(tmp, "x.png")], 3, "empty.jsonl")

    no_path = os.path.join(tmp, "empty-path")
    os.mkdir(no_path)
    gone = os.path.join(tmp, "nognuplot.png")
    expect("gnuplot_missing_exit_1", ["plot", metrics, "-o", gone], 1, "gnuplot-nox",
           run_env=dict(env, PATH=no_path))
    report("gnuplot_missing_leaves_nothing", not os.path.exists(gone) and not leftovers(tmp) and not os.listdir(scratch),
           f"{os.listdir(tmp)} {os.listdir(scratch)}")

    # gnuplot's own failures: its message comes through; nothing is left under the output's name
    fake = os.path.join(tmp, "fake-gnuplot")
    os.mkdir(fake)
    # cat by its full path: PATH holds only the fake, and a fake that does not read its input
    # races essence's writes to it (a broken pipe instead of the case meant)
    cat = shutil.which("cat")
    with open(os.path.join(fake, "gnuplot"), "w") as f:
        f.write(f"#!/bin/sh\n{cat} >/dev/null\necho '         line 7: fake failure' >&2\nexit 1\n")
    os.chmod(os.path.join(fake, "gnuplot"), 0o755)
    failed = os.path.join(tmp, "failed.png")
    expect("gnuplot_failure_exit_1", ["plot", metrics, "-o", failed], 1, "failed.png", "fake failure",
           run_env=dict(env, PATH=fake))
    with open(os.path.join(fake, "gnuplot"), "w") as f:
        f.write(f"#!/bin/sh\n{cat} >/dev/null\nexit 0\n")
    expect("gnuplot_wrote_no_png_exit_1", ["plot", metrics, "-o", failed], 1, "did not write a PNG",
           run_env=dict(env, PATH=fake))
    report("gnuplot_failure_leaves_nothing", not os.path.exists(failed) and not leftovers(tmp)
           and not os.listdir(scratch), f"{os.listdir(tmp)} {os.listdir(scratch)}")

    expect("no_output_exit_2", ["plot", metrics], 2, "-o OUT.png")
    expect("no_input_exit_2", ["plot", "-o", os.path.join(tmp, "x.png")], 2, "usage")
    expect("control_character_exit_2", ["plot", metrics, "-o", os.path.join(tmp, "a\nb.png")], 2, "control character")
    expect("output_folder_missing_exit_1", ["plot", metrics, "-o", os.path.join(tmp, "no", "dir", "x.png")], 1,
           os.path.join(tmp, "no", "dir", "x.png.partial"))
    helped = inspect("--help")
    report("help_mentions_plot", helped.returncode == 0 and "plot METRICS.jsonl -o OUT.png" in helped.stdout,
           helped.stdout[:300])
    shutil.rmtree(tmp)


if __name__ == "__main__":
    run_main(main, "test_plot")
