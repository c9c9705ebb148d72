"""Functions of the running Python's standard library, as source text, split by module.

Every `def` (methods and nested functions included) whose source dedents cleanly becomes a
`Function`: its verbatim source, where its docstring and body start, and its first docstring
paragraph. A module goes to the held-out split by a hash of its dotted name, so a split never
depends on which other files were read; a function whose source occurs in more than one module
is dropped, so no text can be in both splits.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass

# test suites, GUI demos and vendored code: not library code, or huge and repetitive
SKIP_DIRS = {
    "__pycache__", "test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3",
    "ensurepip", "venv", "tkinter", "pydoc_data",
}  # fmt: skip
MAX_SOURCE_CHARS = 520  # with its docstring: keeps every sample within seq_len 192
MAX_CODE_CHARS = 400  # without it
MAX_DOC_CHARS = 160  # the docstring's first paragraph
MIN_BODY_LINES = 2


@dataclass(frozen=True)
class Function:
    """One stdlib function. lines: its dedented source lines (decorators left out); doc_end: the
    index of the first line after its docstring (1 when it has none: the body follows the
    header); body_start: the index of the first body line (after header and docstring)."""

    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # qualified name within the module, e.g. "JSONDecoder.decode"
    lines: tuple[str, ...]
    doc_start: int  # index of the docstring's first line, or -1 without a docstring
    body_start: int
    doc: str  # first paragraph of the cleaned docstring, one line ("" without one)
    node: ast.AST  # the def, re-parsed from the dedented text (line 1 = the header)

    @property
    def source(self) -> str:
        return "\n".join(self.lines) + "\n"

    @property
    def code(self) -> str:
        """The source without its docstring lines."""
        return "\n".join(self.code_lines()) + "\n"

    def code_lines(self, lines: tuple[str, ...] | list[str] | None = None) -> list[str]:
        lines = list(self.lines if lines is None else lines)
        if self.doc_start < 0:
            return lines
        return lines[: self.doc_start] + lines[self.body_start :]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_files(root: str) -> list[tuple[str, str]]:
    """(dotted module name, path) of every .py file under root, sorted, skipping SKIP_DIRS."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("config-"))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[: -len(".py")]
                mod = rel.replace(os.sep, ".").removesuffix(".__init__")
                out.append((mod, os.path.join(d, f)))
    return sorted(out)


def is_eval_module(module: str, percent: int) -> bool:
    """Held out when sha256(module) mod 100 < percent: stable across runs and file subsets."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100 < percent


def _qualnames(tree: ast.AST) -> dict[ast.AST, str]:
    names: dict[ast.AST, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                names[child] = name
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return names


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def _function(module: str, name: str, node: ast.AST, src_lines: list[str]) -> Function | None:
    """A Function if node's text dedents cleanly and fits the size limits, else None."""
    indent = node.col_offset
    raw = src_lines[node.lineno - 1 : node.end_lineno]
    if any("\t" in line for line in raw):
        return None
    # a line less indented than the def (a multi-line string's continuation) cannot dedent
    if indent and any(line.strip() and line[:indent].strip() for line in raw):
        return None
    lines = [line[indent:].rstrip() for line in raw]
    if any(not line.isascii() for line in lines):
        return None  # ast column offsets are in bytes: ASCII keeps them equal to characters
    try:
        fn = ast.parse("\n".join(lines) + "\n").body[0]
    except SyntaxError:
        return None
    body = fn.body
    doc_start, body_start, doc = -1, body[0].lineno - 1, ""
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        if isinstance(first.value.value, str):
            if len(body) == 1 or first.lineno == fn.lineno:
                return None  # nothing but a docstring, or a one-line def
            tail = lines[first.end_lineno - 1][first.end_col_offset :].strip()
            if tail or body[1].lineno == first.end_lineno:
                return None  # something shares the docstring's last line
            doc_start, body_start = first.lineno - 1, body[1].lineno - 1
            doc = _first_paragraph(ast.get_docstring(fn) or "")
            if len(doc) > MAX_DOC_CHARS or len(doc) < 8:
                return None
    if body_start <= 0 or len(lines) - body_start < MIN_BODY_LINES:
        return None
    f = Function(module, name, tuple(lines), doc_start, body_start, doc, fn)
    if len(f.code) > MAX_CODE_CHARS or len(f.source) > MAX_SOURCE_CHARS:
        return None
    return f


def functions_of(module: str, path: str) -> list[Function]:
    """The usable functions of one file ([] if it does not parse as this Python's syntax)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    src_lines = text.splitlines()
    out = []
    for node, name in _qualnames(tree).items():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            f = _function(module, name, node, src_lines)
            if f is not None:
                out.append(f)
    return out


def collect(root: str | None = None, max_files: int | None = None) -> list[Function]:
    """Every usable function of the stdlib (or of its first max_files modules), in file order;
    a function whose code occurs more than once anywhere is dropped (copies across modules such
    as the encodings' codec boilerplate would leak between the splits)."""
    files = module_files(root or stdlib_root())[:max_files]
    fns = [f for mod, path in files for f in functions_of(mod, path)]
    counts = Counter(f.code for f in fns)
    return [f for f in fns if counts[f.code] == 1]
