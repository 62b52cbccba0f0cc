"""essence-inspect geometry on data with known structure (docs/geometry.md).

A real teacher.h5 (essence-extract on tiny-llama3) has its /latents/layer_002 overwritten with
tight, well-separated clusters of 11 rows each (and its /stats recomputed from the stored bf16
values); the real essence-project turns it into a genuine student.h5 (tiny-qwen2, D = 48). Then:
  1. the mutual k-NN overlap (k = 10) between x̂ and the targets is far above its shuffled null
     (> 0.3 and > 5x the null) and so is linear CKA;
  2. the measured kernel-fidelity RMS error is within 0.5-2x of the random-feature prediction, and
     its mean error near 0;
  3. --sigma-sweep: 6 rows, the mean-target MSE rising with σ towards 1, and the recomputed
     targets at the file's σ = 1 giving the stored targets' overlap;
  4. the teacher files default to the student's recorded --in (same figures);
  5. exit codes: a missing student or teacher file 2; a teacher of the wrong length, a teacher with
     a non-finite latent in a sampled row, or a non-student file 3.
What breaks it: a wrong kernel or variance formula (σ² vs σ, a missing 1/d, the variance of one
term not divided by m: the ratio leaves 0.5-2), neighbour lists that ignore the targets or a null
that is not shuffled (overlap = null), an off-by-one teacher row (overlap and fidelity collapse),
the standardisation not applied (the kernel changes), or the checks on the teacher missing."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
LAYER = 2
CLUSTER = 11  # rows per cluster: k = 10 neighbours are the cluster mates


def run(program, *args):
    return subprocess.run([os.path.join(BUILD, program), *map(str, args)], capture_output=True, text=True)


def must(program, *args):
    result = run(program, *args)
    if result.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(map(str, args))}: {result.stderr.strip()}")
    return result


def corpus(n):
    words = ["river", "stone", "quietly", "the", "seven", "lanterns", "across", "bright", "number", "42", "code", "x = y + 1;",
             "mountain", "because", "often", "blue", "reasoning", "step", "first", "then"]
    rng = np.random.default_rng(5)
    return [{"id": f"s{i}", "text": " ".join(rng.choice(words, size=12))} for i in range(n)]


def write_corpus(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


def clusterise(path):
    """Overwrites the layer's latents with clusters (centres ~ N(0, 4), noise 0.05 * that) and
    recomputes /stats from what is stored."""
    with h5py.File(path, "r+") as f:
        data = f[f"latents/layer_{LAYER:03d}"]
        rows, d = data.shape
        rng = np.random.default_rng(11)
        centres = rng.normal(0, 2.0, size=((rows + CLUSTER - 1) // CLUSTER, d))
        values = centres[np.arange(rows) // CLUSTER] + rng.normal(0, 0.1, size=(rows, d))
        data[...] = values.astype(np.float32)
        stored = data[...].astype(np.float64)
        stats = f[f"stats/layer_{LAYER:03d}"]
        stats["count"][...] = rows
        stats["mean"][...] = stored.mean(axis=0)
        stats["m2"][...] = ((stored - stored.mean(axis=0)) ** 2).sum(axis=0)
        return rows


def geometry(*args):
    result = run("essence-inspect", "geometry", *args)
    return result, (json.loads(result.stdout) if result.returncode == 0 and "--json" in args else None)


def test_model(tmp, fixtures, student, teacher):
    """(c) --model: the untrained student (tiny-qwen2) against one essence-align trained on these
    targets: the trained one's states reach a lower latent MSE, a higher R², and neighbourhoods
    closer to the targets'; the figures of the file itself do not change; a checkpoint of another
    width is exit 3 naming it."""
    aligned = os.path.join(tmp, "aligned")
    must("essence-align", "--model", fixtures.student, "--data", student, "--out", aligned, "--steps", 120, "--lr", 3e-3, "--warmup", 5,
         "--batch-tokens", 512, "--eval-every", 0, "--save-every", 0, "--eval-fraction", 0, "--threads", 2)
    figures = {}
    for label, model in (("untrained", fixtures.student), ("trained", aligned)):
        result, doc = geometry(student, "--teacher", teacher, "--json", "--model", model)
        if doc is None:
            report(f"geometry_model_{label}_runs", False, result.stderr.strip()[-400:])
            return
        figures[label] = doc["pairs"][0]
    u, t = figures["untrained"]["model"], figures["trained"]["model"]
    print(f"  --model: untrained MSE {u['latent_mse']:.4f} R2 {u['r2']:.3f} overlap {u['targets']['overlap']:.3f} "
          f"(null {u['targets']['overlap_null']:.3f}); trained MSE {t['latent_mse']:.4f} R2 {t['r2']:.3f} "
          f"overlap {t['targets']['overlap']:.3f} (null {t['targets']['overlap_null']:.3f}), with x^ {t['teacher']['overlap']:.3f}")
    report("geometry_model_trained_closer_to_targets",
           t["latent_mse"] < 0.8 * u["latent_mse"] and t["r2"] > u["r2"] + 0.1 and t["targets"]["overlap"] > u["targets"]["overlap"]
           and t["targets"]["overlap"] > 3 * max(t["targets"]["overlap_null"], figures["trained"]["chance"]), json.dumps(figures)[:600])
    same = {k: v for k, v in figures["untrained"].items() if k != "model"} == {k: v for k, v in figures["trained"].items() if k != "model"}
    report("geometry_model_leaves_file_figures", same, "the file's own figures changed with --model")
    text = run("essence-inspect", "geometry", student, "--teacher", teacher, "--model", aligned)
    report("geometry_model_text_output", text.returncode == 0 and "student checkpoint" in text.stdout and "R^2" in text.stdout, text.stderr)
    wrong = run("essence-inspect", "geometry", student, "--teacher", teacher, "--model", fixtures.teacher)
    report("geometry_model_other_width_exit_3", wrong.returncode == 3 and "tiny-llama3" in wrong.stderr and "width" in wrong.stderr,
           f"{wrong.returncode} {wrong.stderr.strip()}")


def main():
    fixtures = repo_fixtures()
    tmp = tempfile.mkdtemp(prefix="essence-geometry-")
    try:
        teacher_model = fixtures.teacher_folder(os.path.join(tmp, "teacher"), bos_config=False)
        student_model = os.path.join(tmp, "student")
        os.makedirs(student_model)
        shutil.copy(os.path.join(fixtures.student, "config.json"), student_model)
        os.symlink(fixtures.student_tokenizer, os.path.join(student_model, "tokenizer.json"))
        samples = corpus(60)
        data, short_data = os.path.join(tmp, "data.jsonl"), os.path.join(tmp, "short.jsonl")
        write_corpus(data, samples)
        write_corpus(short_data, samples[:10])
        teacher, short_teacher = os.path.join(tmp, "t.h5"), os.path.join(tmp, "t-short.h5")
        common = ["--model", teacher_model, "--layers", LAYER, "--max-seq", 110, "--truncate", "--batch-tokens", 256]
        must("essence-extract", *common, "--data", data, "--out", teacher)
        must("essence-extract", *common, "--data", short_data, "--out", short_teacher)
        rows = clusterise(teacher)
        student = os.path.join(tmp, "s.h5")
        must("essence-project", "--in", teacher, "--student", student_model, "--out", student, "--layer-map", f"{LAYER}:1",
             "--sigma", 1.0, "--seed", 3)

        result, doc = geometry(student, "--teacher", teacher, "--json", "--sigma-sweep")
        report("geometry_runs", result.returncode == 0 and doc is not None, result.stderr.strip())
        if doc is None:
            return
        p = doc["pairs"][0]
        nb = p["neighbourhood"]
        print(f"  {rows} teacher rows, {doc['rows']} sampled; overlap {nb['overlap']:.3f} (null {nb['overlap_null']:.3f}, "
              f"chance {p['chance']:.3f}); CKA {nb['cka']:.3f} (null {nb['cka_null']:.3f}); kernel rms {p['error_rms']:.4f} "
              f"predicted {p['predicted_rms']:.4f} ratio {p['ratio']:.3f}, mean error {p['error_mean']:+.4f}")
        report("geometry_one_layer_pair_2_1", len(doc["pairs"]) == 1 and p["teacher_layer"] == LAYER and p["student_layer"] == 1
               and p["D"] == 48 and p["d"] == 64 and p["sigma"] == 1.0, json.dumps(p)[:300])
        report("geometry_overlap_far_above_shuffled_null", nb["overlap"] > 0.3 and nb["overlap"] > 5 * max(nb["overlap_null"], p["chance"]),
               json.dumps(nb))
        report("geometry_cka_above_shuffled_null", nb["cka"] > nb["cka_null"] + 0.2, json.dumps(nb))
        report("geometry_kernel_fidelity_rms_within_prediction", 0.5 < p["ratio"] < 2 and abs(p["error_mean"]) < 3 * p["predicted_rms"],
               json.dumps(p)[:400])
        sweep = p.get("sweep", [])
        sigmas = [s["sigma"] for s in sweep]
        mse = [s["mean_mse"] for s in sweep]
        report("geometry_sigma_sweep_mse_rises_towards_1",
               sigmas == [0.25, 0.5, 1, 2, 4, 8] and all(a < b + 1e-3 for a, b in zip(mse, mse[1:])) and 0.9 < mse[-1] < 1.05
               and mse[0] < 0.2, json.dumps(sweep))
        at_one = sweep[2] if len(sweep) == 6 else {}
        report("geometry_sigma_sweep_reproduces_stored_targets",
               abs(at_one.get("overlap", -1) - nb["overlap"]) < 0.05 and abs(at_one.get("mean_mse", -1) - p["mean_mse"]) < 0.01,
               f"{at_one} vs {nb} {p['mean_mse']}")

        result, again = geometry(student, "--json")
        report("geometry_teacher_defaults_to_recorded_in", result.returncode == 0 and again and again["pairs"][0]["neighbourhood"] == nb,
               result.stderr.strip())
        text = run("essence-inspect", "geometry", student, "--teacher", teacher)
        report("geometry_text_output", text.returncode == 0 and "mutual k-NN overlap" in text.stdout and "predicted rms" in text.stdout, text.stderr)

        missing = run("essence-inspect", "geometry", os.path.join(tmp, "none.h5"), "--teacher", teacher)
        report("geometry_missing_student_exit_2", missing.returncode == 2, f"{missing.returncode} {missing.stderr.strip()}")
        missing = run("essence-inspect", "geometry", student, "--teacher", os.path.join(tmp, "none.h5"))
        report("geometry_missing_teacher_exit_2", missing.returncode == 2 and "none.h5" in missing.stderr, f"{missing.returncode} {missing.stderr.strip()}")
        short = run("essence-inspect", "geometry", student, "--teacher", short_teacher)
        report("geometry_teacher_wrong_length_exit_3", short.returncode == 3 and "t-short.h5" in short.stderr, f"{short.returncode} {short.stderr.strip()}")
        unmarked = os.path.join(tmp, "s-unmarked.h5")
        shutil.copy(student, unmarked)
        with h5py.File(unmarked, "r+") as f:
            del f.attrs["teacher_fingerprints"]
        short = run("essence-inspect", "geometry", unmarked, "--teacher", short_teacher)
        report("geometry_teacher_too_short_for_teacher_row_exit_3",
               short.returncode == 3 and "teacher_row" in short.stderr and "rows" in short.stderr, f"{short.returncode} {short.stderr.strip()}")
        bad = os.path.join(tmp, "t-nan.h5")
        shutil.copy(teacher, bad)
        with h5py.File(bad, "r+") as f:
            data = f[f"latents/layer_{LAYER:03d}"]
            data[:, 0] = np.nan  # every row: whichever are sampled
        nan = run("essence-inspect", "geometry", student, "--teacher", bad)
        report("geometry_non_finite_latent_exit_3",
               nan.returncode == 3 and "t-nan.h5" in nan.stderr and f"layer_{LAYER:03d}" in nan.stderr, f"{nan.returncode} {nan.stderr.strip()}")
        wrong = run("essence-inspect", "geometry", teacher, "--teacher", teacher)
        report("geometry_teacher_file_as_student_exit_3", wrong.returncode == 3, f"{wrong.returncode} {wrong.stderr.strip()}")
        usage = run("essence-inspect", "geometry")
        report("geometry_no_file_exit_2", usage.returncode == 2, f"{usage.returncode} {usage.stderr.strip()}")
        test_model(tmp, fixtures, student, teacher)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, "test_geometry")
