"""The package's shape, as docs/ARCHITECTURE.md states it: imports point down the layers, with no
circles; function-local imports only for optional dependencies; small files.

The graph is read from the source (ast), so a lazy import that hides a circle counts too.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mftk")

# Bottom to top. A module may import modules of its own layer (never in a circle) or below.
LAYERS = [
    ("kernels", ["mftk.kernels"]),
    ("ops", ["mftk.ops"]),
    ("values", ["mftk.spec", "mftk.route"]),
    ("nn", ["mftk.nn"]),
    ("core", ["mftk.core"]),
    ("model", ["mftk.quant", "mftk.routing", "mftk.pyramid", "mftk.patch", "mftk.heads",
               "mftk.segment_router", "mftk.peft_io", "mftk.checkpoint"]),
    ("plan", ["mftk.plan"]),
    ("train", ["mftk.train"]),
    ("apps", ["mftk.apps"]),
    ("api", ["mftk", "mftk.cli", "mftk.__main__"]),
]  # fmt: skip

# What a function-local import may name: optional dependencies, and the Triton backend (which
# imports triton) loaded only when a CUDA tensor asks for it.
OPTIONAL = (
    "bitsandbytes",
    "datasets",
    "flash_attn",
    "matplotlib",
    "torch.utils.tensorboard",
    "triton",
)
# transformers, tokenizers and peft are optional too (the train extra), but the modules that need
# them (mftk.train, mftk.apps, mftk.plan.model) import them at the top.
LAZY_OK = {("mftk.ops.functional", "mftk.ops.triton_ops")}
MAX_LINES = 400


def _modules() -> dict[str, str]:
    mods = {}
    for dp, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = path
    return mods


MODS = _modules()


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{mod}: in no layer of LAYERS"
    return rank


def _targets(mod: str, node: ast.AST) -> list[str]:
    """The mftk modules an import statement loads (a submodule, not its package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        pkg = mod.split(".")
        if not MODS[mod].endswith("__init__.py"):
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODS]
    return subs if len(subs) == len(node.names) else [base, *subs]


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported mftk module, line, at module level) for every import in mftk/."""
    out = []
    for mod, path in MODS.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        top: set[int] = set()

        def walk(body, top=top):
            for n in body:
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    top.add(id(n))
                for attr in ("body", "orelse", "finalbody"):
                    if isinstance(n, (ast.If, ast.Try)) and hasattr(n, attr):
                        walk(getattr(n, attr), top)
                for h in getattr(n, "handlers", []):
                    walk(h.body, top)

        walk(tree.body)
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                for t in _targets(mod, n):
                    out.append((mod, t, n.lineno, id(n) in top))
    return out


IMPORTS = _imports()


def test_every_module_has_a_layer():
    for mod in MODS:
        _layer(mod)


def test_imports_point_down_the_layers():
    up = [
        f"{a}:{line} imports {b}"
        for a, b, line, _ in IMPORTS
        if b in MODS and b != a and _layer(b) > _layer(a)
    ]
    assert not up, "imports up the layers:\n" + "\n".join(up)


def test_no_import_circles():
    graph: dict[str, set[str]] = {m: set() for m in MODS}
    for a, b, _, _ in IMPORTS:
        if b in MODS and b != a and not b == a.rpartition(".")[0]:
            graph[a].add(b)
    # a package's __init__ importing its own submodules is how packages work, not a circle
    for m in MODS:
        graph[m] = {
            b for b in graph[m] if not (b.startswith(m + ".") and MODS[m].endswith("__init__.py"))
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycle = stack[stack.index(w) :] + [w]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_function_local_imports_only_for_optional_dependencies():
    local = []
    for mod, path in MODS.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if isinstance(n, ast.Import):
                    names = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom) and not n.level:
                    names = [t for t in _targets(mod, n) if t in MODS] or [n.module or ""]
                else:
                    continue
                for name in names:
                    if name.startswith(OPTIONAL) or (mod, name) in LAZY_OK:
                        continue
                    local.append(f"{mod}:{n.lineno} imports {name} inside {fn.name}()")
    assert not local, "function-local imports of required modules:\n" + "\n".join(local)


def test_files_are_small():
    big = []
    for path in MODS.values():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            big.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}: {n} lines")
    assert not big, f"files over {MAX_LINES} lines:\n" + "\n".join(big)


def test_kernels_import_only_triton_and_torch():
    kroot = os.path.join(os.path.dirname(ROOT), "kernels")
    bad = []
    for f in sorted(os.listdir(kroot)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(kroot, f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                names = [] if n.level else [n.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root not in ("triton", "torch", "mftk", *sys.stdlib_module_names):
                    bad.append(f"kernels/{f}:{n.lineno} imports {name}")
                if root == "mftk" and not name.startswith("mftk.kernels"):
                    bad.append(f"kernels/{f}:{n.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_trainer_is_small_and_not_forked():
    """Trainer stays under 250 lines, and no subclass overrides its methods (distribution is a
    strategy, mftk.train.parallel / distributed, not a fork of the loop)."""
    tree = ast.parse(open(MODS["mftk.train.loop"], encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert cls.end_lineno - cls.lineno + 1 < 250
    for mod, path in MODS.items():
        for n in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(n, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id == "Trainer" for b in n.bases
            ):
                defs = [b.name for b in n.body if isinstance(b, ast.FunctionDef)]
                assert not defs, f"{mod}.{n.name} overrides {defs}"
