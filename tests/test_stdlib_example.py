"""examples/stdlib/make_data.py on a slice of the standard library: deterministic output, a
module-level split that shares no function, every task populated, conflicting pairs that share
their prompts but not their answers, balanced bug labels, and bugs that are real one-line edits.
No training here."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import re
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                    "stdlib")  # fmt: skip
MAX_FILES = 90  # the first 90 stdlib modules: a few hundred functions, a couple of seconds


def _load_make_data():
    """examples/stdlib/make_data.py under a private name (examples/tiny has a make_data too);
    its helpers have unique names and import as they are."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    name = "_stdlib_make_data"
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "make_data.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


make_data = _load_make_data()
import stdlib_bugs as bugs  # noqa: E402
import stdlib_code as code  # noqa: E402


def _read(d: str) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for split in ("train", "eval"):
        out[split] = {}
        for task in make_data.TASKS:
            with open(os.path.join(d, split, f"{task}.jsonl"), encoding="utf-8") as f:
                out[split][task] = [json.loads(line) for line in f]
    return out


def _files(d: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), d)] = f.read()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    manifest = make_data.build(str(a), max_files=MAX_FILES, log=lambda msg: None)
    make_data.build(str(b), max_files=MAX_FILES, log=lambda msg: None)
    return str(a), str(b), manifest, _read(str(a))


def test_deterministic(built):
    a, b, _, _ = built
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"two builds differ in {differ}"


def test_split_by_module_shares_no_function(built):
    _, _, manifest, data = built
    train_mods, eval_mods = set(manifest["modules"]["train"]), set(manifest["modules"]["eval"])
    assert train_mods and eval_mods and not train_mods & eval_mods
    for mod in train_mods | eval_mods:  # the hash decides, not the slice
        assert code.is_eval_module(mod, make_data.EVAL_PERCENT) == (mod in eval_mods)
    seen: dict[str, set] = {"train": set(), "eval": set()}
    texts: dict[str, set] = {"train": set(), "eval": set()}
    for split, tasks in data.items():
        for recs in tasks.values():
            for r in recs:
                assert r["module"] in (eval_mods if split == "eval" else train_mods)
                seen[split].add((r["module"], r["name"]))
                if r["prompt"].startswith("def "):  # complete/doc2code: verbatim source
                    texts[split].add(r["prompt"] + r["completion"])
    assert not seen["train"] & seen["eval"]
    assert not texts["train"] & texts["eval"], "the same function text in both splits"


def test_every_task_has_samples(built):
    _, _, manifest, data = built
    for split in ("train", "eval"):
        for task in make_data.TASKS:
            assert len(data[split][task]) >= 10, f"{split}/{task}: {len(data[split][task])}"
            assert manifest["samples"][task][split] == len(data[split][task])
            for r in data[split][task]:
                assert r["completion"].strip() and isinstance(r["prompt"], str)


@pytest.mark.parametrize("pair", [("doc2code", "inject_bug"), ("code2doc", "name")])
def test_conflicting_pair_same_prompts_different_answers(built, pair):
    _, _, _, data = built
    for split in ("train", "eval"):
        a, b = (data[split][t] for t in pair)
        assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
        for ra, rb in zip(a, b):
            assert ra["completion"] != rb["completion"], ra["prompt"]


def test_inject_bug_is_one_line_edit_that_parses(built):
    _, _, _, data = built
    for split in ("train", "eval"):
        for good, bad in zip(data[split]["doc2code"], data[split]["inject_bug"]):
            g, b = good["completion"].splitlines(), bad["completion"].splitlines()
            assert len(g) == len(b)
            assert sum(x != y for x, y in zip(g, b)) == 1
            ast.parse(good["prompt"] + bad["completion"])


def test_bug_labels_balanced(built):
    _, _, _, data = built
    for split in ("train", "eval"):
        recs = data[split]["verdict"]
        n_bug = sum(r["completion"] == " True" for r in recs)
        assert {r["completion"] for r in recs} == {" False", " True"}
        assert 0.4 <= n_bug / len(recs) <= 0.6, f"{split}: {n_bug} of {len(recs)} bug"
        for r in recs:  # a bug sample names its kind, an ok sample none
            assert bool(r["kind"]) == (r["completion"] == " True")


def test_masked_name_does_not_leak(built):
    _, _, _, data = built
    for r in data["train"]["name"] + data["eval"]["name"]:
        assert "def _(" in r["prompt"]
        name = re.escape(r["completion"].strip())
        assert not re.search(rf"\b{name}\b", r["prompt"]), r["prompt"]


@pytest.mark.parametrize(
    "src, kind, want",
    [
        ("def f(a, n):\n    return a[n - 1] if n > 0 else None\n", "off-by-one", None),
        ("def f(a, b):\n    return a - b\n", "swapped operands", "    return b - a"),
        ("def f(a, b):\n    return a < b\n", "wrong comparison", "    return a <= b"),
        ("def f(a, b):\n    return (a) <= b\n", "wrong comparison", "    return (a) < b"),
        ("def f(a, b):\n    return a >= b\n", "wrong comparison", "    return a > b"),
        ("def f(a, b):\n    return a not in b\n", "wrong comparison", "    return a in b"),
        ("def f(a):\n    return a is not None\n", "wrong comparison", "    return a is None"),
        ("def f(a):\n    if not (a):\n        return 1\n", "dropped negation", "    if (a):"),
        ("def f(a, b):\n    return a and b\n", "wrong boolean operator", "    return a or b"),
        ("def f():\n    return True\n", "inverted constant", "    return False"),
    ],
)
def test_bug_kinds(src, kind, want):
    lines = tuple(src.splitlines())
    fn = ast.parse(src).body[0]
    edits = [e for e in bugs.bug_edits(fn, lines, 1) if e.kind == kind]
    assert edits, f"no {kind} found in {src!r}"
    for e in edits:
        new = e.apply(lines)
        ast.parse("\n".join(new))
        assert new != lines and new[0] == lines[0]
    if want is not None:
        assert want in [e.apply(lines)[e.line] for e in edits]
    # a header line is never edited (defaults stay), and "%" formatting is not "swapped"
    assert not bugs.bug_edits(ast.parse("def f(n=1):\n    return '%s' % n\n").body[0],
                              ("def f(n=1):", "    return '%s' % n"), 1)  # fmt: skip
    assert bugs.inject(lines, [], random.Random(0)) is None


def test_collect_skips_tests_and_drops_copies(tmp_path):
    """A function copied into two modules is dropped from both (it would sit in both splits);
    test folders and tab-indented code are skipped; a docstring-only def is no sample."""
    body = "def shared(a, b):\n    x = a - b\n    return x\n"
    (tmp_path / "one.py").write_text(body + "def own(a):\n    y = a + 1\n    return y\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(body)
    (tmp_path / "pkg" / "two.py").write_text(
        'class K:\n    def m(self):\n        """Doc of m."""\n        z = 1\n        return z\n'
        'def only_doc():\n    """Nothing else."""\n'
        "def tabbed(a):\n\tb = a\n\treturn b\n"
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("def t(a):\n    b = a\n    return b\n")
    assert [m for m, _ in code.module_files(str(tmp_path))] == ["one", "pkg", "pkg.two"]
    fns = {(f.module, f.name): f for f in code.collect(str(tmp_path))}
    assert sorted(fns) == [("one", "own"), ("pkg.two", "K.m")]
    m = fns[("pkg.two", "K.m")]
    assert m.lines[0] == "def m(self):" and m.doc == "Doc of m."
    assert m.code == "def m(self):\n    z = 1\n    return z\n"
