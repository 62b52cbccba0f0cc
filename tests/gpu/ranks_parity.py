"""GPU check: the master weights of two essence-align checkpoints begun from the same model agree
within bf16 rounding. Usage: ranks_parity.py CHECKPOINT CHECKPOINT_REFERENCE START_MODEL_FOLDER
What the steps changed must agree: for each trained tensor, ‖w − w_ref‖ ≤ 2^-8 ‖w_ref − w_start‖
(bf16 keeps 8 significant bits). A share of the weights themselves would say nothing: ten steps
move them by a few per cent, so even another batch size would pass such a test."""
import json
import os
import struct
import sys

import numpy as np

LIMIT = 2.0 ** -8
DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path):
    """name -> float64 array (bf16 widened)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data[begin:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float64)
    return tensors


def masters(checkpoint):
    state = read_safetensors(os.path.join(checkpoint, "essence-state", "state.safetensors"))
    return {k[len("master/"):]: v for k, v in state.items() if k.startswith("master/")}


def start_weights(folder):
    weights = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("model") and name.endswith(".safetensors"):
            weights.update(read_safetensors(os.path.join(folder, name)))
    return weights


def main():
    ours, reference, start = masters(sys.argv[1]), masters(sys.argv[2]), start_weights(sys.argv[3])
    if set(ours) != set(reference) or not ours:
        print(f"FAIL the checkpoints hold other tensors: {sorted(set(ours) ^ set(reference))[:5]}")
        return 1
    missing = [name for name in reference if name not in start or start[name].shape != reference[name].shape]
    if missing:
        print(f"FAIL {sys.argv[3]} lacks the checkpoint's tensors {missing[:3]}")
        return 1
    worst, worst_name, of_weights = 0.0, None, 0.0
    for name in sorted(reference):
        a, b = ours[name], reference[name]
        difference, change = np.linalg.norm(a - b), np.linalg.norm(b - start[name])
        share = difference / change if change > 0 else (0.0 if difference == 0 else np.inf)
        of_weights = max(of_weights, float(difference / max(np.linalg.norm(b), 1e-30)))
        if share >= worst:
            worst, worst_name = float(share), name
    verdict = "PASS" if worst <= LIMIT else "FAIL"
    print(f"{verdict} master weights: worst ‖Δ‖ {worst:.2e} of what the steps changed ({worst_name}; limit {LIMIT:.2e}); "
          f"{of_weights:.2e} of the weights")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
