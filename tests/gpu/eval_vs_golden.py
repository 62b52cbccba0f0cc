"""essence-eval's generations on a device against transformers' goldens (golden_generate.json):
each prompt's agreeing prefix of tokens. bf16 weights round the logits by about 1e-2, so a step
whose top two logits are closer than that may differ from fp32 and the rest with it: the check
asks for the first token everywhere and a mean agreeing prefix of at least 8 tokens.

    python3 eval_vs_golden.py GOLDEN.json RESULTS.jsonl"""
import json
import sys

golden = {p["id"]: p["generated_ids"] for p in json.load(open(sys.argv[1]))["prompts"]}
lines = [json.loads(line) for line in open(sys.argv[2])][:-1]
prefix = []
for line in lines:
    want, got = golden[line["id"]], line["generated_ids"]
    prefix.append(next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got))))
print(f"agreeing prefixes {prefix} of {[len(golden[line['id']]) for line in lines]}")
sys.exit(0 if len(prefix) == len(golden) and min(prefix) >= 1 and sum(prefix) / len(prefix) >= 8 else 1)
