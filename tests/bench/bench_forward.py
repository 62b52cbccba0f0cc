"""CPU forward benchmark: essence against PyTorch (transformers, float32, eager attention) on
the same weights, the same tokens and the same thread count, in the same run: tiny-llama3 and
a 4-layer model of the real student's shape (random weights from essence-inspect mkmodel)."""
import json
import os
import subprocess
import sys
import tempfile
import time

BUILD = os.environ.get("BUILD", "build")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.environ.get("ESSENCE_FIXTURES", os.path.join(ROOT, "tests", "fixtures"))
THREADS = int(os.environ.get("ESSENCE_BENCH_THREADS", str(os.cpu_count() or 2)))
SEQUENCES, TOKENS = 4, 256
REPEATS = int(os.environ.get("ESSENCE_BENCH_REPEATS", "10"))  # best of: short runs on a shared VM are noisy


os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def torch_forward(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").model.eval()
    generator = torch.Generator().manual_seed(42)
    ids = torch.randint(0, model.config.vocab_size, (SEQUENCES, TOKENS), generator=generator)
    best = 1e30
    with torch.inference_mode():
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(input_ids=ids)
            best = min(best, time.perf_counter() - start)
    return SEQUENCES * TOKENS / best


def ours(model_dir):
    done = subprocess.run([os.path.join(BUILD, "bench", "bench_forward"), model_dir, str(SEQUENCES), str(TOKENS), str(THREADS)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return result["tokens_per_s"], result["device"]


def main():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"bench_forward: skipped: {exc.name} is not installed in the benchmark venv (pip install torch transformers)")
        return
    tmp = tempfile.mkdtemp()
    student = os.path.join(tmp, "student-4-layers")
    subprocess.run([os.path.join(BUILD, "essence-inspect"), "mkmodel", "--like",
                    os.path.join(ROOT, "tests", "bench", "configs", "deepseek-r1-distill-qwen-1.5b.json"), "--layers", "4",
                    "--seed", "1", "--out", student], check=True, capture_output=True)
    print(f"CPU forward, {SEQUENCES} sequences x {TOKENS} tokens, {THREADS} threads, fp32, best of {REPEATS}; "
          f"PyTorch {torch.__version__}")
    print(f"{'model':<34} {'essence tok/s':>14} {'PyTorch tok/s':>14} {'ratio':>7}  essence's device")
    for name, path in (("tiny-llama3 (in-repo fixture)", os.path.join(FIXTURES, "models", "tiny-llama3")),
                       ("student shape, 4 layers (random)", student)):
        (a, device), b = ours(path), torch_forward(path)
        print(f"{name:<34} {a:>14.0f} {b:>14.0f} {a / b:>6.2f}x  {device}", flush=True)


if __name__ == "__main__":
    main()
