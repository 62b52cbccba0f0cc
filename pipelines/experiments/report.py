#!/usr/bin/env python3
"""The end of `make experiment`: scores every student checkpoint on the curve problems
(essence-eval), gathers the held-out accuracies of the pipeline's eval stages and align's final
eval figures, plots accuracy against step per arm (gnuplot), and rewrites the "Results" section of
docs/experiments.md and the experiment block of README.md. Standard library only.

    BUILD=build EXPERIMENT_START=<epoch seconds> python3 pipelines/experiments/report.py"""
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORK = os.path.join(HERE, "work")
BUILD = os.path.join(ROOT, os.environ.get("BUILD", "build"))
ARMS = {"ce": "CE only", "latent": "CE + latent MSE", "linear": "CE + latent MSE, linear head"}
SEEDS = (1, 2, 3)
TEMPLATE = "{prompt}{response}"


def summary(path):
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1])


def evaluate(model, data, out):
    """essence-eval of one checkpoint, unless its results are already there and newer than it."""
    weights = os.path.join(model, "model.safetensors")
    if os.path.exists(out) and os.path.getmtime(out) > os.path.getmtime(weights):
        return summary(out), ""
    result = subprocess.run([os.path.join(BUILD, "essence-eval"), "--model", model, "--data", data, "--out", out, "--template", TEMPLATE,
                             "--max-new-tokens", "64", "--batch", "64", "--max-seq", "256"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"report.py: essence-eval on {model} failed: {result.stderr.strip()}")
    return summary(out), result.stderr


def final_eval(run):
    """align's last eval line of a run: eval_ce, and eval_r2 where there is a latent loss."""
    last = {}
    with open(os.path.join(WORK, run, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval_ce" in record:
                last = record
    return last


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curves(device_line):
    """Accuracy on the curve problems at every checkpoint: {arm: {step: [per seed]}}."""
    data = os.path.join(WORK, "data", "curve.jsonl")
    out_dir = os.path.join(WORK, "curves")
    os.makedirs(out_dir, exist_ok=True)
    table = {}
    for arm in ARMS:
        for seed in SEEDS:
            run = os.path.join(WORK, f"{arm}-{seed}")
            steps = sorted(int(m.group(1)) for m in (re.fullmatch(r"checkpoint-(\d+)", n) for n in os.listdir(run)) if m)
            for step in steps:
                s, log = evaluate(os.path.join(run, f"checkpoint-{step}"), data, os.path.join(out_dir, f"{arm}-{seed}-{step}.jsonl"))
                device_line = device_line or next((line for line in log.splitlines() if "device: cpu" in line), "")
                table.setdefault(arm, {}).setdefault(step, []).append(s["generate"]["accuracy"])
    return table, device_line


def plot(table, png):
    data = os.path.join(WORK, "curves", "curves.dat")
    with open(data, "w") as f:
        for arm, by_step in table.items():
            f.write(f"# {arm}\n")
            for step, accs in sorted(by_step.items()):
                m, s = mean_std(accs)
                f.write(f"{step} {m:.6f} {s:.6f}\n")
            f.write("\n\n")
    plots = ", ".join(f"'{data}' index {i} using 1:2:3 with yerrorlines title '{ARMS[arm]}'" for i, arm in enumerate(table))
    script = (f"set terminal png size 800,500\nset output '{png}'\nset xlabel 'training step'\n"
              f"set ylabel 'accuracy on 200 held-out problems (mean and sd of 3 seeds)'\nset yrange [0:1]\nset key top left\n"
              f"set grid\nplot {plots}\n")
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def machine(device_line):
    if not device_line:  # every score was already there: ask one short evaluation which kernels the CPU runs
        data = os.path.join(WORK, "curves", "one.jsonl")
        with open(os.path.join(WORK, "data", "curve.jsonl")) as f, open(data, "w") as out:
            out.write(f.readline())
        result = subprocess.run([os.path.join(BUILD, "essence-eval"), "--model", os.path.join(WORK, "teacher"), "--data", data, "--out",
                                 os.path.join(WORK, "curves", "one-out.jsonl"), "--template", TEMPLATE, "--max-new-tokens", "1"],
                                capture_output=True, text=True)
        os.remove(os.path.join(WORK, "curves", "one-out.jsonl")) if result.returncode == 0 else None
        device_line = next((line for line in result.stderr.splitlines() if "device: cpu" in line), "")
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    device = re.search(r"device: (cpu \([^)]*\))", device_line)
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}" + \
        (f"; essence's device: {device.group(1)}" if device else "")


def replace_block(path, begin, end, body):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text, n = re.subn(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)
    if n != 1:
        sys.exit(f"report.py: {path} lacks its {begin} block")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main():
    start = float(os.environ.get("EXPERIMENT_START", time.time()))
    table, device_line = curves("")
    rows, per_arm = [], {}
    for arm, label in ARMS.items():
        accs, ces, r2s, runs = [], [], [], []
        for seed in SEEDS:
            g = summary(os.path.join(WORK, f"eval-{arm}-{seed}.jsonl"))["generate"]
            last = final_eval(f"{arm}-{seed}")
            accs.append(g["accuracy"]), ces.append(last["eval_ce"])
            if "eval_r2" in last:
                r2s.append(last["eval_r2"])
            runs.append(f"{g['accuracy']:.3f} [{g['wilson95'][0]:.3f}, {g['wilson95'][1]:.3f}]")
        per_arm[arm] = mean_std(accs)
        acc_m, acc_s = per_arm[arm]
        ce_m, ce_s = mean_std(ces)
        r2 = "—" if not r2s else "%.3f ± %.3f" % mean_std(r2s)
        rows.append(f"| `{arm}` ({label}) | **{acc_m:.3f} ± {acc_s:.3f}** | {'; '.join(runs)} | {ce_m:.4f} ± {ce_s:.4f} | {r2} |")
    teacher = summary(os.path.join(WORK, "eval-teacher.jsonl"))["generate"]
    teacher_ce = final_eval("teacher")["eval_ce"]
    rows.append(f"| teacher (reference; its own tokenizer) | {teacher['accuracy']:.3f} | {teacher['accuracy']:.3f} "
                f"[{teacher['wilson95'][0]:.3f}, {teacher['wilson95'][1]:.3f}] | {teacher_ce:.4f} | — |")
    png = os.path.join(ROOT, "docs", "experiments-accuracy.png")
    plot(table, png)
    base_m, base_s = per_arm["ce"]
    helped = [arm for arm in ("latent", "linear") if per_arm[arm][0] - base_m > per_arm[arm][1] + base_s]
    hurt = [arm for arm in ("latent", "linear") if base_m - per_arm[arm][0] > per_arm[arm][1] + base_s]
    if helped:
        verdict = f"Latent distillation helped on this task: {', '.join(f'`{a}`' for a in helped)} beat `ce` by more than the seeds' spread."
    else:
        verdict = ("Latent distillation did not help on this task: no latent arm beat `ce` by more than the seeds' spread"
                   + (f" ({', '.join(f'`{a}`' for a in hurt)} did worse by more than it)." if hurt else "."))
    wall = time.time() - start
    curve_steps = sorted(table["ce"])
    table_md = "\n".join(["| arm | held-out accuracy (mean ± sd, 3 seeds) | per seed [95% Wilson] | final eval CE | final eval latent R² |",
                          "|---|---|---|---|---|"] + rows)
    body = f"""Measured {time.strftime('%Y-%m-%d', time.gmtime())} by `make experiment` (wall time {wall / 60:.1f} min, everything included) on
{machine(device_line)}.

{table_md}

400 held-out problems per run; accuracy is exact match of the sum. CE: align's eval cross entropy per
token on its held-out 5% of the training texts (the students' tokens; the teacher's own). R²: align's
`eval_r2` of the latent loss, 1 − eval latent MSE / the best input-independent MSE.

{verdict}

![accuracy against step](experiments-accuracy.png)

Accuracy on the first 200 held-out problems at every checkpoint ({', '.join(map(str, curve_steps))}), mean and standard
deviation over the seeds (`pipelines/experiments/work/curves/`). Every arm that was run is reported here;
nothing in the protocol was changed after seeing these results."""
    replace_block(os.path.join(ROOT, "docs", "experiments.md"), "<!-- results -->", "<!-- /results -->", body)
    replace_block(os.path.join(ROOT, "README.md"), "<!-- experiment -->", "<!-- /experiment -->",
                  f"{table_md}\n\n{verdict} (`make experiment`, {wall / 60:.0f} min on 2 cores; protocol and plot: `docs/experiments.md`.)")
    print(table_md)
    print(verdict)


if __name__ == "__main__":
    main()
