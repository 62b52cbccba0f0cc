"""essence-eval against Hugging Face (golden_generate.json, written by tests/fixtures/make_fixtures.py
with transformers' generate(do_sample=False)): for both tiny architectures, every prompt's greedy
tokens, prompt length and decoded text equal the golden's, whatever the prompts side by side
(--batch) and the forward's token budget (--batch-tokens, small enough to cut prompts into
pieces); texts' cross entropy equals transformers' to 1e-6. Then: answers checked (the last
number, a marker, a regex) and the summary's accuracy and Wilson interval recomputed here; stops
at --max-new-tokens and --max-seq; bad records exit 3 naming FILE:LINE and leave no results;
misuse exits 2."""
import json
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testing import fixture_sets, repo_fixtures, report, run_main  # noqa: E402

BUILD = os.environ.get("ESSENCE_BUILD", "build")
EVAL = os.path.join(BUILD, "essence-eval")
MODELS = ("tiny-llama3", "tiny-qwen2")


def run(args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def results(path):
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return lines[:-1], lines[-1]


def golden_of(fixtures, model):
    path = os.path.join(fixtures.root, "models", model, "golden_generate.json")
    return json.load(open(path)) if os.path.exists(path) else None


def tasks(gold, answers=None):
    records = [{"id": p["id"], "prompt": p["prompt"], "answer": (answers or {}).get(p["id"], "none")} for p in gold["prompts"]]
    # texts between the prompts: the lines keep the input order
    return records[:3] + [{"id": t["id"], "text": t["text"]} for t in gold["texts"]] + records[3:]


def eval_argv(model_dir, data, out, gold, *extra):
    return [EVAL, "--model", model_dir, "--data", data, "--out", out, "--template", gold["template"],
            "--max-new-tokens", str(gold["max_new_tokens"]), "--threads", "2", *extra]


def test_goldens(tmp, fixtures):
    for model in MODELS:
        name = fixtures.name(f"eval_greedy_equals_hugging_face[{model}]")
        gold = golden_of(fixtures, model)
        if gold is None:
            print(f"SKIP {name}: {fixtures.root}/models/{model} has no golden_generate.json", flush=True)
            continue
        model_dir = os.path.join(fixtures.root, "models", model)
        data = write_jsonl(os.path.join(tmp, f"{model}.jsonl"), tasks(gold))
        longest = max(len(p["prompt_ids"]) for p in gold["prompts"])
        for batch, budget in ((1, 4096), (3, 7), (len(gold["prompts"]), longest + 1), (4, 4)):
            out = os.path.join(tmp, f"{model}-{batch}-{budget}.jsonl")
            result = run(eval_argv(model_dir, data, out, gold, "--batch", str(batch), "--batch-tokens", str(budget)))
            label = f"{name} --batch {batch} --batch-tokens {budget}"
            if result.returncode != 0:
                report(label, False, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
                continue
            lines, summary = results(out)
            order = [line["id"] for line in lines] == [r["id"] for r in tasks(gold)]
            by_id = {line["id"]: line for line in lines}
            wrong = []
            for p in gold["prompts"]:
                got = by_id.get(p["id"], {})
                if got.get("generated_ids") != p["generated_ids"]:
                    first = next((i for i, (a, b) in enumerate(zip(got.get("generated_ids", []), p["generated_ids"])) if a != b), None)
                    wrong.append(f"{p['id']}: tokens differ from {first} ({len(got.get('generated_ids', []))} vs {len(p['generated_ids'])})")
                elif got["prompt_tokens"] != len(p["prompt_ids"]) or got["generated"] != p["text"]:
                    wrong.append(f"{p['id']}: prompt length {got['prompt_tokens']} vs {len(p['prompt_ids'])} or the text differs")
                want_stop = "eos" if p["generated_ids"] and p["generated_ids"][-1] == gold["eos_token_id"] else "length"
                if got.get("stop") != want_stop:
                    wrong.append(f"{p['id']}: stop {got.get('stop')}, want {want_stop}")
            for t in gold["texts"]:
                got = by_id.get(t["id"], {})
                if got.get("tokens") != len(t["ids"]) or abs(got.get("ce_sum", 0) - t["ce_sum"]) > 1e-6 * abs(t["ce_sum"]):
                    wrong.append(f"{t['id']}: {got.get('tokens')} tokens, ce_sum {got.get('ce_sum')} vs {len(t['ids'])}, {t['ce_sum']}")
            predicted = sum(t["predicted"] for t in gold["texts"])
            mean = sum(t["ce_sum"] for t in gold["texts"]) / predicted
            if summary["text"]["predicted"] != predicted or abs(summary["text"]["mean_ce"] - mean) > 1e-6 * mean:
                wrong.append(f"summary text {summary['text']} vs mean {mean}")
            full = sum(len(p["generated_ids"]) == gold["max_new_tokens"] for p in gold["prompts"])
            report(label, order and not wrong and full >= 8, f"order {order}, {full} prompts of full length; " + "; ".join(wrong[:4]))


def wilson(k, n, z=1.959963984540054):
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


NUMBER = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")


def normal(text):
    text = text.strip()
    if not re.fullmatch(NUMBER.pattern, text):
        return text
    value = text.replace(",", "").lstrip("+")
    negative = value.startswith("-")
    whole, _, fraction = value.lstrip("-").partition(".")
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    out = whole + ("." + fraction if fraction else "")
    return out if not negative or out == "0" else "-" + out


def test_answers(tmp):
    """Answers made from the golden generations: every other prompt gets the last number of its
    golden text (correct), the rest a number not there (wrong); accuracy and the interval follow."""
    fixtures = repo_fixtures()
    model = "tiny-llama3"
    gold = golden_of(fixtures, model)
    model_dir = os.path.join(fixtures.root, "models", model)
    answers, expected = {}, {}
    for i, p in enumerate(gold["prompts"]):
        numbers = NUMBER.findall(p["text"])
        if i % 2 == 0 and numbers:
            answers[p["id"]], expected[p["id"]] = " " + numbers[-1] + " ", True
        else:
            answers[p["id"]], expected[p["id"]] = 123456789 if i % 4 == 1 else "-987.50", False
    data = write_jsonl(os.path.join(tmp, "answers.jsonl"), tasks(gold, answers))
    out = os.path.join(tmp, "answers-out.jsonl")
    result = run(eval_argv(model_dir, data, out, gold, "--batch", "4"))
    if result.returncode != 0:
        report("eval_answers_and_accuracy", False, f"exit {result.returncode}: {result.stderr.strip()[-400:]}")
        return
    lines, summary = results(out)
    by_id = {line["id"]: line for line in lines}
    bad = [i for i, want in expected.items() if by_id[i]["correct"] != want]
    bad += [i for i, p in ((p["id"], p) for p in gold["prompts"])
            if by_id[i]["extracted"] != (normal(NUMBER.findall(p["text"])[-1]) if NUMBER.findall(p["text"]) else None)]
    k, n = sum(expected.values()), len(expected)
    low, high = wilson(k, n)
    g = summary["generate"]
    ok = (not bad and g["samples"] == n and g["correct"] == k and abs(g["accuracy"] - k / n) < 1e-12
          and abs(g["wilson95"][0] - low) < 1e-9 and abs(g["wilson95"][1] - high) < 1e-9 and k >= 2)
    report("eval_answers_and_accuracy", ok, f"bad {bad}, summary {g}, want {k}/{n} [{low}, {high}]")

    # a marker and a regex on the same generations: the text after the last "e" up to the line's end; a group
    for label, extra, find in (
            ("marker", ["--answer-marker", "e"], lambda t: (t.rsplit("e", 1)[1].split("\n")[0].strip() or None) if "e" in t else None),
            ("regex", ["--answer-regex", "([a-z]+)[0-9]"], lambda t: (re.findall(r"([a-z]+)[0-9]", t) or [None])[-1])):
        out = os.path.join(tmp, f"answers-{label}.jsonl")
        result = run(eval_argv(model_dir, data, out, gold, *extra))
        if result.returncode != 0:
            report(f"eval_answer_{label}", False, f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
            continue
        lines, _ = results(out)
        by_id = {line["id"]: line for line in lines}
        wants = {p["id"]: find(p["text"]) for p in gold["prompts"]}
        wants = {i: (normal(w) if w is not None else None) for i, w in wants.items()}
        bad = [(i, by_id[i]["extracted"], w) for i, w in wants.items() if by_id[i]["extracted"] != w]
        found = sum(w is not None for w in wants.values())
        report(f"eval_answer_{label}", not bad and found >= 3, f"{found} found; differ: {bad[:3]}")


def test_stops(tmp):
    """--max-new-tokens caps each generation ("length"); --max-seq caps prompt + generation
    ("context"): the tokens are the golden's first ones."""
    fixtures = repo_fixtures()
    gold = golden_of(fixtures, "tiny-qwen2")
    model_dir = os.path.join(fixtures.root, "models", "tiny-qwen2")
    data = write_jsonl(os.path.join(tmp, "stops.jsonl"), [{"id": p["id"], "prompt": p["prompt"], "answer": 1} for p in gold["prompts"]])
    out = os.path.join(tmp, "stops-out.jsonl")
    shortest = min(len(p["prompt_ids"]) for p in gold["prompts"])
    argv = eval_argv(model_dir, data, out, gold, "--batch", "3")
    argv[argv.index("--max-new-tokens") + 1] = "5"
    result = run(argv)
    lines, _ = results(out) if result.returncode == 0 else ([], None)
    ok = len(lines) == len(gold["prompts"]) and all(
        line["stop"] == "length" and line["generated_ids"] == p["generated_ids"][:5] for line, p in zip(lines, gold["prompts"]))
    report("eval_stops_at_max_new_tokens", ok, f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    result = run(argv[:argv.index("--max-new-tokens")] + ["--max-new-tokens", "32", "--max-seq", str(shortest + 3)] + argv[argv.index("--max-new-tokens") + 2:])
    # prompts longer than --max-seq are bad input: only the shortest fits, generating 3 tokens
    report("eval_refuses_prompt_past_max_seq", result.returncode == 3 and "--max-seq" in result.stderr and "stops.jsonl:" in result.stderr,
           f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    one = write_jsonl(os.path.join(tmp, "stops-one.jsonl"), [{"id": "short", "prompt": p["prompt"], "answer": 1}
                                                             for p in gold["prompts"] if len(p["prompt_ids"]) == shortest][:1])
    out = os.path.join(tmp, "stops-one-out.jsonl")
    result = run(eval_argv(model_dir, one, out, gold, "--max-seq", str(shortest + 3)))
    lines, _ = results(out) if result.returncode == 0 else ([], None)
    want = next(p for p in gold["prompts"] if len(p["prompt_ids"]) == shortest)["generated_ids"][:3]
    report("eval_stops_at_max_seq", len(lines) == 1 and lines[0]["stop"] == "context" and lines[0]["generated_ids"] == want,
           f"exit {result.returncode}, {lines}: {result.stderr.strip()[-300:]}")


def test_bad_records(tmp):
    fixtures = repo_fixtures()
    gold = golden_of(fixtures, "tiny-qwen2")
    model_dir = os.path.join(fixtures.root, "models", "tiny-qwen2")
    good = json.dumps({"id": "ok", "prompt": "two plus two", "answer": 4})
    cases = {
        "no_answer": ({"id": "a", "prompt": "two plus two"}, "needs an \"answer\""),
        "answer_object": ({"id": "a", "prompt": "x", "answer": {"v": 1}}, "needs an \"answer\""),
        "response": ({"id": "a", "prompt": "x", "response": "y", "answer": 1}, "not a \"response\""),
        "text_not_string": ({"id": "a", "text": 5}, "\"text\" is not a string"),
        "ids_out_of_range": ({"id": "a", "ids": [1, 10 ** 6]}, "ids[1]"),
        "not_json": ("{\"id\": \"a\", \"prompt\": ", "stops-"),
        "empty_text": ({"id": "a", "text": ""}, "empty"),
    }
    for label, (record, needle) in cases.items():
        data = write_jsonl(os.path.join(tmp, f"bad-{label}.jsonl"), [good, good, record])
        out = os.path.join(tmp, f"bad-{label}-out.jsonl")
        result = run(eval_argv(model_dir, data, out, gold))
        named = f"bad-{label}.jsonl:3" in result.stderr
        left = os.path.exists(out) or os.path.exists(out + ".partial")
        report(f"eval_bad_record_{label}", result.returncode == 3 and named and (needle in result.stderr or label == "not_json") and not left,
               f"exit {result.returncode}, named {named}, left {left}: {result.stderr.strip()[-300:]}")


def test_misuse(tmp):
    fixtures = repo_fixtures()
    model_dir = os.path.join(fixtures.root, "models", "tiny-qwen2")
    data = write_jsonl(os.path.join(tmp, "misuse.jsonl"), [{"id": "a", "prompt": "x", "answer": 1}])
    base = [EVAL, "--model", model_dir, "--data", data, "--out", os.path.join(tmp, "misuse-out.jsonl")]
    for label, extra, needle in (("regex_and_marker", ["--answer-regex", "x", "--answer-marker", "y"], "one or the other"),
                                 ("bad_regex", ["--answer-regex", "(x"], "--answer-regex"),
                                 ("budget_below_batch", ["--batch", "8", "--batch-tokens", "4"], "--batch-tokens"),
                                 ("out_is_data", ["--out", data], "--out")):
        result = run(base + extra)
        report(f"eval_usage_{label}", result.returncode == 2 and needle in result.stderr, f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    result = run([EVAL, "--help"])
    report("eval_help", result.returncode == 0 and "--answer-regex" in result.stdout and "--max-new-tokens" in result.stdout, result.stderr)


def main():
    with tempfile.TemporaryDirectory(prefix="essence-eval-") as tmp:
        for fixtures in fixture_sets("eval_greedy_equals_hugging_face"):
            test_goldens(tmp, fixtures)
        test_answers(tmp)
        test_stops(tmp)
        test_bad_records(tmp)
        test_misuse(tmp)


if __name__ == "__main__":
    run_main(main, "test_eval")
