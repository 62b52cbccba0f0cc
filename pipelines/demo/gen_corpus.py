#!/usr/bin/env python3
"""The demo's corpus: short reasoning-style texts in the two JSONL forms essence-extract reads.

    python3 gen_corpus.py [--count N] [--seed S] [--out FILE]
    python3 gen_corpus.py --tasks [--count N] [--seed S] [--out FILE]   # essence-eval's records

Each sample is a small problem (arithmetic, algebra, a logic puzzle, a piece of code to trace,
a word problem) with its worked reasoning. About three in four are chat samples
{"id", "prompt", "response"} whose response is "<think>\\n...\\n</think>\\n\\nANSWER", as the
R1-distilled models write; the rest are plain {"id", "text"} notes. Standard library only, and
deterministic: the same seed gives the same bytes on every machine (the pipeline fingerprints
the file, so a different corpus would re-run every stage). Each text stays far below 300 tokens.
"""
import argparse
import json
import random
import sys

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena"]
THINGS = ["apples", "books", "marbles", "stamps", "tickets", "pencils", "shells", "coins"]


def arithmetic(rng):
    a, b = rng.randint(12, 99), rng.choice([n for n in range(12, 100) if n % 10])
    op = rng.choice(["×", "+", "−"])
    if op == "×":
        tens, ones = b // 10 * 10, b % 10
        steps = [f"Split {b} into {tens} + {ones}.", f"{a} × {tens} = {a * tens}.", f"{a} × {ones} = {a * ones}.",
                 f"Add them: {a * tens} + {a * ones} = {a * b}."]
        value = a * b
    elif op == "+":
        steps = [f"Tens first: {a // 10 * 10} + {b // 10 * 10} = {a // 10 * 10 + b // 10 * 10}.",
                 f"Then the ones: {a % 10} + {b % 10} = {a % 10 + b % 10}.",
                 f"Together: {a // 10 * 10 + b // 10 * 10} + {a % 10 + b % 10} = {a + b}."]
        value = a + b
    else:
        a, b = max(a, b), min(a, b)
        up = b // 10 * 10 + 10  # count up to the next ten, then on to a
        if a < up:
            steps = [f"{a} and {b} are in the same ten: {a % 10} − {b % 10} = {a - b}."]
        else:
            steps = [f"{a} − {b}: count up from {b} to {up} ({up - b}),", f"then from {up} to {a} ({a - up}).",
                     f"In all {up - b} + {a - up} = {a - b}."]
        value = a - b
    return f"What is {a} {op} {b}?", steps, f"{a} {op} {b} = **{value}**."


def algebra(rng):
    x, a, b = rng.randint(-9, 12), rng.randint(2, 9), rng.randint(-20, 20)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    steps = [f"The equation is {a}x {sign} {abs(b)} = {c}.",
             f"{'Subtract' if b >= 0 else 'Add'} {abs(b)} on both sides: {a}x = {c - b}.",
             f"Divide by {a}: x = {c - b} / {a} = {x}.",
             f"Check: {a} · ({x}) {sign} {abs(b)} = {a * x} {sign} {abs(b)} = {c}. Correct."]
    return f"Solve for x: {a}x {sign} {abs(b)} = {c}", steps, f"x = {x}"


def ordering(rng):
    people = rng.sample(NAMES, 4)  # tallest first: the hidden truth the clues describe
    clues = [f"{people[0]} is taller than {people[1]}.", f"{people[2]} is shorter than {people[1]}.",
             f"{people[3]} is the shortest of the four."]
    rng.shuffle(clues)
    steps = [f"{people[3]} is last, so the other three come before.",
             f"{people[0]} > {people[1]} and {people[1]} > {people[2]}, so {people[0]} > {people[1]} > {people[2]}.",
             f"Nobody is said to be taller than {people[0]}, and {people[0]} is above everyone else we can place.",
             f"Order: {' > '.join(people)}."]
    prompt = " ".join(clues) + " Who is the tallest, and who is second?"
    return prompt, steps, f"{people[0]} is the tallest; {people[1]} is second."


def knights(rng):
    a, b = rng.sample(NAMES, 2)
    if rng.random() < 0.5:
        claim = "we are both knaves"
        steps = [f"If {a} were a knight, the statement would make {a} a knave: impossible.",
                 f"So {a} is a knave, and the statement is false.",
                 f"Not both are knaves, but {a} is one, so {b} must be a knight."]
        answer = f"{a} is a knave and {b} is a knight."
    else:
        claim = "we are the same kind"
        steps = [f"Case 1: {a} is a knight. The statement is true, so {b} is a knight too.",
                 f"Case 2: {a} is a knave. The statement is false, so they differ and {b} is a knight.",
                 f"Either way {b} is a knight; {a} can be either."]
        answer = f"{b} is a knight; {a} could be a knight or a knave."
    prompt = (f"On an island, knights always tell the truth and knaves always lie. {a} says: "
              f"\"{claim[0].upper() + claim[1:]}.\" What can you say about {a} and {b}?")
    return prompt, steps, answer


def code_trace(rng):
    n, k = rng.randint(3, 7), rng.randint(2, 4)
    kind = rng.choice(["sum", "filter", "while"])
    arg = n
    if kind == "sum":
        code = f"def f(n):\n    total = 0\n    for i in range(n):\n        total += i * {k}\n    return total"
        values = [i * k for i in range(n)]
        steps = [f"The loop runs i = 0 … {n - 1} and adds i × {k}.",
                 f"Terms: {', '.join(map(str, values))}.", f"Sum: {sum(values)}."]
        result = sum(values)
    elif kind == "filter":
        xs = [rng.randint(1, 20) for _ in range(n)]
        code = f"def f(xs):\n    return [x for x in xs if x % {k} == 0]"
        kept = [x for x in xs if x % k == 0]
        steps = [f"Keep the elements of {xs} divisible by {k}."] + \
                [f"{x} % {k} = {x % k} → {'keep' if x % k == 0 else 'drop'}" for x in xs] + [f"Result: {kept}."]
        result, arg = kept, xs
    else:
        code = f"def f(n):\n    steps = 0\n    while n > 1:\n        n = n // {k}\n        steps += 1\n    return steps"
        arg = rng.randint(10, 200)
        trail, m = [], arg
        while m > 1:
            trail.append(f"{m} // {k} = {m // k}")
            m //= k
        steps = ["Each pass divides n by " + str(k) + " (rounding down) and counts one step."] + trail + [f"{len(trail)} steps."]
        result = len(trail)
    prompt = f"What does f({arg}) return?\n\n```python\n{code}\n```"
    return prompt, steps, f"`f({arg})` returns `{result}`."


def word_problem(rng):
    who, thing = rng.choice(NAMES), rng.choice(THINGS)
    start, pct = rng.randint(1, 10) * 20, rng.choice([10, 20, 25, 40, 50])  # whole results
    given = start * pct // 100
    bought = rng.randint(3, 15)
    end = start - given + bought
    steps = [f"{who} starts with {start} {thing}.", f"{pct}% of {start} is {start} × {pct} / 100 = {given}; those are given away.",
             f"{start} − {given} = {start - given} left.", f"Buying {bought} more: {start - given} + {bought} = {end}."]
    prompt = (f"{who} has {start} {thing}, gives {pct}% of them to a friend, then buys {bought} more. "
              f"How many {thing} does {who} have now?")
    return prompt, steps, f"{who} has {end} {thing}."


KINDS = [("arith", arithmetic), ("algebra", algebra), ("order", ordering), ("logic", knights),
         ("code", code_trace), ("word", word_problem)]


def sample(rng, index):
    tag, make = KINDS[index % len(KINDS)]
    prompt, steps, answer = make(rng)
    if rng.random() < 0.25:  # a plain note: the teacher's tokenizer adds its BOS to these
        text = f"Problem: {prompt}\n\nReasoning:\n" + "\n".join(f"- {s}" for s in steps) + f"\n\nAnswer: {answer}"
        return {"id": f"{tag}-{index:04d}", "text": text}
    opener = rng.choice(["Okay, let me work through this.", "Let me think step by step.", "Alright."])
    thinking = opener + "\n" + "\n".join(steps)
    return {"id": f"{tag}-{index:04d}", "prompt": prompt, "response": f"<think>\n{thinking}\n</think>\n\n{answer}"}


def task(rng, index):
    """One of essence-eval's records: an arithmetic question and its number (checked against the
    last number the model writes), or every fourth a worked note to score by cross entropy."""
    if index % 4 == 3:
        tag, make = KINDS[index % len(KINDS)]
        prompt, steps, answer = make(rng)
        text = f"Problem: {prompt}\n\nReasoning:\n" + "\n".join(f"- {s}" for s in steps) + f"\n\nAnswer: {answer}"
        return {"id": f"note-{index:04d}", "text": text}
    prompt, _, answer = arithmetic(rng)
    return {"id": f"task-{index:04d}", "prompt": prompt, "answer": int(answer.split("**")[1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="-")
    parser.add_argument("--tasks", action="store_true", help="essence-eval's records instead of the corpus")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8", newline="\n")
    for i in range(args.count):
        out.write(json.dumps((task if args.tasks else sample)(rng, i), ensure_ascii=False) + "\n")
    if out is not sys.stdout:
        out.close()


if __name__ == "__main__":
    main()
