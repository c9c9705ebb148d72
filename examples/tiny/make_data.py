"""Write the tiny multi-task example's data (deterministic; rerun to regenerate).

Three tasks built from the same small families of Python functions, with random names:
- data/completion/*.jsonl  Python completion, {"prompt": signature + docstring, "completion": body}
- data/bugs/*.csv          bug detection, columns code,verdict ("ok" or "bug: <kind>"),label
                           ("ok" or "bug": the classify task's label)
- data/docstrings/*.jsonl  docstring generation, MFTCoder chat_rounds (system/human/bot and
                           user/assistant turns)

    python examples/tiny/make_data.py
"""

from __future__ import annotations

import csv
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
N_PER_TASK = 320

NAMES = [
    "x",
    "y",
    "a",
    "b",
    "n",
    "m",
    "value",
    "other",
    "left",
    "right",
    "count",
    "total",
    "size",
    "item",
    "num",
    "key",
    "first",
    "second",
    "base",
    "step",
]
LISTS = ["items", "values", "nums", "data", "xs", "scores", "words", "parts", "rows", "costs"]
SUFFIX = ["", "_all", "_of", "_values", "_pair", "_fast", "_simple", "_safe"]

# family: (function name, params kind, body, docstring, [(buggy body, bug kind), ...])
# params kind "2": two scalars {a}, {b}; "1": one scalar {a}; "L": one list {xs}
FAMILIES = [
    (
        "add",
        "2",
        "return {a} + {b}",
        "Return the sum of {a} and {b}.",
        [("return {a} - {b}", "wrong operator")],
    ),
    (
        "subtract",
        "2",
        "return {a} - {b}",
        "Return {a} minus {b}.",
        [("return {b} - {a}", "swapped operands")],
    ),
    (
        "multiply",
        "2",
        "return {a} * {b}",
        "Return the product of {a} and {b}.",
        [("return {a} + {b}", "wrong operator")],
    ),
    (
        "larger",
        "2",
        "return {a} if {a} > {b} else {b}",
        "Return the larger of {a} and {b}.",
        [("return {a} if {a} < {b} else {b}", "flipped comparison")],
    ),
    (
        "smaller",
        "2",
        "return {a} if {a} < {b} else {b}",
        "Return the smaller of {a} and {b}.",
        [("return {a} if {a} > {b} else {b}", "flipped comparison")],
    ),
    (
        "square",
        "1",
        "return {a} * {a}",
        "Return {a} squared.",
        [("return {a} * 2", "wrong operator")],
    ),
    (
        "is_even",
        "1",
        "return {a} % 2 == 0",
        "Return True if {a} is even.",
        [("return {a} % 2 == 1", "wrong constant")],
    ),
    (
        "negate",
        "1",
        "return -{a}",
        "Return {a} with its sign flipped.",
        [("return {a}", "missing operation")],
    ),
    (
        "total",
        "L",
        "result = 0\n    for v in {xs}:\n        result += v\n    return result",
        "Return the sum of the numbers in {xs}.",
        [
            (
                "result = 0\n    for v in {xs}:\n        result = v\n    return result",
                "overwrites accumulator",
            ),
            (
                "result = 0\n    for v in {xs}:\n        result += v\n    return v",
                "returns wrong variable",
            ),
        ],
    ),
    (
        "count_positive",
        "L",
        "return sum(1 for v in {xs} if v > 0)",
        "Return how many numbers in {xs} are positive.",
        [("return sum(1 for v in {xs} if v < 0)", "flipped comparison")],
    ),
    (
        "last",
        "L",
        "return {xs}[len({xs}) - 1]",
        "Return the last element of {xs}.",
        [("return {xs}[len({xs})]", "off by one")],
    ),
    (
        "first",
        "L",
        "return {xs}[0]",
        "Return the first element of {xs}.",
        [("return {xs}[1]", "off by one")],
    ),
    (
        "reverse",
        "L",
        "return {xs}[::-1]",
        "Return the elements of {xs} in reverse order.",
        [("return {xs}[::1]", "missing operation")],
    ),
    (
        "indices",
        "L",
        "return list(range(len({xs})))",
        "Return the list of valid indices of {xs}.",
        [("return list(range(len({xs}) + 1))", "off by one")],
    ),
    (
        "average",
        "L",
        "return sum({xs}) / len({xs})",
        "Return the mean of the numbers in {xs}.",
        [("return sum({xs}) / (len({xs}) - 1)", "off by one")],
    ),
    (
        "double_all",
        "L",
        "return [2 * v for v in {xs}]",
        "Return a list with every element of {xs} doubled.",
        [("return [2 + v for v in {xs}]", "wrong operator")],
    ),
]


def make_function(rng: random.Random):
    fam = rng.choice(FAMILIES)
    name, kind, body, doc, bugs = fam
    fname = name + rng.choice(SUFFIX)
    a, b = rng.sample(NAMES, 2)
    xs = rng.choice(LISTS)
    params = {"2": f"{a}, {b}", "1": a, "L": xs}[kind]
    fmt = {"a": a, "b": b, "xs": xs}
    header = f"def {fname}({params}):"
    return header, body.format(**fmt), doc.format(**fmt), [(bb.format(**fmt), k) for bb, k in bugs]


def completion_records(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_PER_TASK):
        header, body, doc, _ = make_function(rng)
        out.append({"prompt": f'{header}\n    """{doc}"""\n    ', "completion": body + "\n"})
    return out


def bug_rows(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_PER_TASK):
        header, body, _, bugs = make_function(rng)
        if rng.random() < 0.5:
            out.append({"code": f"{header}\n    {body}", "verdict": "ok", "label": "ok"})
        else:
            bad, kind = rng.choice(bugs)
            out.append({"code": f"{header}\n    {bad}", "verdict": f"bug: {kind}", "label": "bug"})
    return out


def docstring_records(rng: random.Random) -> list[dict]:
    out = []
    for i in range(N_PER_TASK):
        header, body, doc, _ = make_function(rng)
        human, bot = ("user", "assistant") if i % 3 == 0 else ("human", "bot")
        rounds = []
        if i % 4 == 0:
            rounds.append({"role": "system", "content": "You write one-line Python docstrings."})
        rounds.append({"role": human, "content": f"Write a docstring for:\n{header}\n    {body}"})
        rounds.append({"role": bot, "content": f'"""{doc}"""'})
        out.append({"chat_rounds": rounds})
    return out


def main() -> None:
    rng = random.Random(1234)
    paths = {
        name: os.path.join(HERE, "data", name) for name in ("completion", "bugs", "docstrings")
    }
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    recs = completion_records(rng)
    half = len(recs) // 2  # two files, to exercise the glob
    for k, chunk in enumerate((recs[:half], recs[half:])):
        with open(os.path.join(paths["completion"], f"part{k}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in chunk)
    with open(os.path.join(paths["bugs"], "bugs.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["code", "verdict", "label"])
        w.writeheader()
        w.writerows(bug_rows(rng))
    with open(os.path.join(paths["docstrings"], "chat.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in docstring_records(rng))
    print("wrote", ", ".join(sorted(paths)))


if __name__ == "__main__":
    main()
