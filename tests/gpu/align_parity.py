"""GPU check: the training losses of two essence-align runs (metrics.jsonl) agree step by step.
Usage: align_parity.py OURS.jsonl REFERENCE.jsonl TOLERANCE [FIRST_STEP]
Every step of the reference from FIRST_STEP on must be in OURS with |loss / reference − 1| <= TOLERANCE."""
import json
import sys


def losses(path):
    steps = {}
    for line in open(path):
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record["loss"]
    return steps


def main():
    ours, reference, tolerance = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    wanted = [s for s in sorted(reference) if s >= first]
    if not wanted:
        print(f"FAIL no reference steps from {first} in {sys.argv[2]}")
        return 1
    worst, worst_step = 0.0, None
    for step in wanted:
        if step not in ours:
            print(f"FAIL step {step} missing in {sys.argv[1]}")
            return 1
        error = abs(ours[step] / reference[step] - 1)
        if error > worst:
            worst, worst_step = error, step
    print(f"  {len(wanted)} steps: worst relative loss difference {worst:.3g} (step {worst_step}; tolerance {tolerance})")
    if worst > tolerance:
        print(f"FAIL loss differs by {worst:.3g} at step {worst_step}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
