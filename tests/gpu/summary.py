"""The short table at the end of tests/gpu/run.sh: essence against Hugging Face + PyTorch measured in
the same call (perf.json from gpu_baselines.py, offload.json from gpu_offload_baselines.py) and the
goals of the CUDA inference and training issues. Missing figures print as "-" with the file that lacks them."""
import json
import os
import sys

OUT = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(OUT, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pick(d, *keys):
    """The first of keys present in d, looking one level into nested objects too."""
    for key in keys:
        if key in d:
            return d[key]
    for value in d.values():
        if isinstance(value, dict):
            found = pick(value, *keys)
            if found is not None:
                return found
    return None


def fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:.4g}{unit}"
    return str(x)


def ratio(ours, theirs, higher_is_better):
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or not ours or not theirs:
        return "-"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"


hf, offload = load("perf.json"), load("offload.json")
layer, stream, project = load("bench_layer.json"), load("bench_stream.json"), load("bench_project.json")
train = load("bench_train.json")
device = open(os.path.join(OUT, "device.txt")).read().strip().replace("\n", ", ") if os.path.exists(os.path.join(OUT, "device.txt")) else "-"
rows = []
ours = pick(layer, "llama_layer_fwd_s", "s_per_layer")
theirs = pick(hf, "llama_layer_fwd_s")
rows.append(("70B layer forward, 4 x 4096 tokens (s)", fmt(ours), fmt(theirs), ratio(ours, theirs, False), "<= 1.0x HF time"))
ours = pick(layer, "llama_layer_tflops")
rows.append(("  TFLOPS", fmt(ours), fmt(pick(hf, "llama_layer_tflops")), ratio(ours, pick(hf, "llama_layer_tflops"), True), ""))
ours = pick(stream, "stream_s_per_layer_16k_tokens")
theirs = pick(offload, "stream_s_per_layer_16k_tokens")
rows.append(("8 layers streamed, 16G, s per layer", fmt(ours), fmt(theirs), ratio(ours, theirs, False), ">= 1.05x the PyTorch loop"))
embed = pick(stream, "stream_embed_s")
layers_only = (ours * 8 - embed) / 8 if isinstance(ours, (int, float)) and isinstance(embed, (int, float)) else None
rows.append(("  the same, the embedding's gather left out", fmt(layers_only), fmt(theirs), ratio(layers_only, theirs, False),
             "(the baseline's table is on the GPU)"))
ours = pick(stream, "stream_est_80layer_tok_per_s")
rows.append(("  tokens/s for 80 layers", fmt(ours), fmt(pick(offload, "stream_est_80layer_tok_per_s")),
             ratio(ours, pick(offload, "stream_est_80layer_tok_per_s"), True), "accelerate: " +
             fmt(pick(offload, "accelerate_offload_est_80layer_tok_per_s"))))
rows.append(("  peak VRAM (GiB)", fmt(pick(stream, "stream_vram_used_GiB")) + " (held " + fmt(pick(stream, "stream_peak_GiB")) + ")", fmt(pick(offload, "stream_peak_GiB")), "-",
             "<= 16 GB"))
for precision in ("bf16", "fp8", "tf32", "fp32"):
    ours = project.get(f"proj_{precision}_features_tok_per_s")
    rows.append((f"projection 8192->1536, {precision} (tokens/s)", fmt(ours), fmt(pick(hf, "proj_torch_eager_tok_per_s")),
                 ratio(ours, pick(hf, "proj_torch_eager_tok_per_s"), True), ">= 40 M tokens/s"))
hf_train = hf.get("qwen2_amp_fp32_master", {}) if isinstance(hf.get("qwen2_amp_fp32_master"), dict) else {}
ours = train.get("qwen2_latent_ce_tok_per_s")
rows.append(("Qwen2-1.5B train, 4 x 2048, latent@14 + CE (tokens/s)", fmt(ours), fmt(hf_train.get("tok_per_s")),
             ratio(ours, hf_train.get("tok_per_s"), True), ">= 1.25x HF mixed precision"))
rows.append(("  TFLOPS / MFU (989 dense bf16)", fmt(train.get("qwen2_latent_ce_tflops")) + " / " + fmt(train.get("qwen2_latent_ce_mfu")),
             fmt(hf_train.get("tflops")), ratio(train.get("qwen2_latent_ce_tflops"), hf_train.get("tflops"), True), ""))
rows.append(("  peak memory (GiB)", fmt(train.get("qwen2_latent_ce_peak_GiB")), fmt(hf_train.get("peak_GiB")), "-", "<= 40 GiB"))
ours = train.get("qwen2_latent_ce_recompute_tok_per_s")
rows.append(("  the same with --recompute, tokens/s", fmt(ours), fmt(hf_train.get("tok_per_s")), ratio(ours, hf_train.get("tok_per_s"), True),
             "peak " + fmt(train.get("qwen2_latent_ce_recompute_peak_GiB")) + " GiB (<= 40 GiB: docs/align.md)"))
rows.append(("  latent only (--ce-weight 0), tokens/s", fmt(train.get("qwen2_latent_only_tok_per_s")), "-", "-",
             "peak " + fmt(train.get("qwen2_latent_only_peak_GiB")) + " GiB"))
print(f"# GPU run: {device}\n")
print("| figure | essence | Hugging Face / PyTorch | ratio | goal |")
print("|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
missing = [name for name, d in (("perf.json", hf), ("offload.json", offload), ("bench_layer.json", layer),
                                ("bench_stream.json", stream), ("bench_project.json", project), ("bench_train.json", train)) if not d]
if missing:
    print(f"\nmissing: {', '.join(missing)}")
print("\nAll figures: the JSON files in results.tar.xz (raw/); the checks in checks.txt.")
