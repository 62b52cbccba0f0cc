#!/usr/bin/env python3
"""The distillation experiment's data and tokenizers (docs/experiments.md "Protocol").

    python3 make_data.py --out DIR     # DIR/data/*.jsonl (standard library only)

The tokenizers beside this file (teacher.tokenizer.json, student.tokenizer.json) were made by it
too: delete them and run it with Hugging Face `tokenizers` installed to make them again.

The task: the sum of two 3-digit numbers, written with a worked trace from the ones up, one
carry at a time (as the chain-of-thought traces of Deng et al. 2023, "Implicit Chain of Thought
Reasoning via Knowledge Distillation", but for addition):

    Q 347+586
    T 7+6=13 c1; 4+8+1=13 c1; 3+5+1=9 c0
    A 933
    <|end|>

The training problems and the held-out ones are disjoint pairs (a, b). Two byte-level BPE
tokenizers are trained on the training texts with Hugging Face `tokenizers`, differing as Llama 3
and Qwen2 differ in their digits: the teacher's splits digits in runs of up to three (so "347" can
be one token), the students' one digit at a time. Deterministic: seeded, one thread."""
import argparse
import json
import os
import random

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")


HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, HELD_OUT, CURVE = 6000, 400, 200  # problems; CURVE: the held-out problems each checkpoint is scored on
# Llama 3's split (digits in runs of up to three) and Qwen2's (single digits)
TEACHER_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
STUDENT_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TOKENIZERS = {"teacher": (TEACHER_SPLIT, 512), "student": (STUDENT_SPLIT, 320)}  # name: (split, most BPE tokens)
END = "<|end|>"  # each text's last token, the models' eos_token_id: generation stops there


def trace(a, b):
    """The worked sum: each column from the ones up, with the carry it passes on."""
    steps, carry = [], 0
    for da, db in zip(reversed(f"{a:03d}"), reversed(f"{b:03d}")):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}{f'+{carry}' if carry else ''}={total} c{total // 10}")
        carry = total // 10
    return "; ".join(steps)


def prompt(a, b):
    return f"Q {a}+{b}\n"


def response(a, b):
    return f"T {trace(a, b)}\nA {a + b}\n{END}"


def problems(rng):
    """Disjoint (a, b) pairs: training first, then the held-out ones."""
    seen, out = set(), []
    while len(out) < TRAIN + HELD_OUT:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out[:TRAIN], out[TRAIN:]


def train_tokenizer(texts, split, vocab):
    # only to make the shipped tokenizers again: the data alone needs the standard library
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(END, special=True)])
    return tok


def write_jsonl(path, records):
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the experiment's work folder")
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train, held_out = problems(rng)
    texts = [prompt(a, b) + response(a, b) for a, b in train]
    for name, (split, vocab) in TOKENIZERS.items():
        path = os.path.join(HERE, f"{name}.tokenizer.json")
        if not os.path.exists(path):  # shipped: made once by this script, then kept
            train_tokenizer(texts, split, vocab).save(path)
    data = os.path.join(args.out, "data")
    os.makedirs(data, exist_ok=True)
    write_jsonl(os.path.join(data, "train.jsonl"), ({"id": f"train-{i:05d}", "text": t} for i, t in enumerate(texts)))
    tasks = [{"id": f"test-{i:04d}", "prompt": prompt(a, b), "answer": a + b} for i, (a, b) in enumerate(held_out)]
    write_jsonl(os.path.join(data, "held_out.jsonl"), tasks)
    write_jsonl(os.path.join(data, "curve.jsonl"), tasks[:CURVE])
    print(f"{len(train)} training problems, {len(held_out)} held out (first {CURVE} for the curves), in {data}")


if __name__ == "__main__":
    main()
