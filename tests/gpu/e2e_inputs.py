"""The inputs of tests/gpu/run.sh's extract end to end (and of tests/gpu/dry.sh's run of it): the
70B config with a 1024-token vocabulary, for essence-inspect mkmodel --like --layers 2, and 32
sequences of 4096 random ids (seeded).
    e2e_inputs.py CONFIG_70B OUT_DIR   -> OUT_DIR/like.json, OUT_DIR/ids.jsonl"""
import json
import os
import random
import sys

config = json.load(open(sys.argv[1]))
config["vocab_size"] = 1024
json.dump(config, open(os.path.join(sys.argv[2], "like.json"), "w"))
random.seed(3)
with open(os.path.join(sys.argv[2], "ids.jsonl"), "w") as f:
    for i in range(32):
        f.write(json.dumps({"id": f"e{i}", "ids": [random.randrange(1024) for _ in range(4096)]}) + "\n")
