"""Realistic one-token bugs in real code: every place in a function's body where a typical slip
could happen, as a text edit on one line that keeps the rest of the source byte for byte.

Kinds: off-by-one (an integer literal in a comparison, index, slice, range() or +/- gets +-1),
swapped operands (a - b -> b - a, also / // % on plain names), wrong comparison (< / <=,
> / >=, == / !=, is / is not, in / not in), dropped negation (`not x` -> `x`), wrong boolean
operator (and / or), inverted constant (`return True` / `return False`).
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass

COMPARE = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
}  # fmt: skip
SWAPPABLE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod)


@dataclass(frozen=True)
class Edit:
    """Replace lines[line][start:end] (0-based line, character columns) with `new`."""

    kind: str
    line: int
    start: int
    end: int
    new: str

    def apply(self, lines: tuple[str, ...]) -> tuple[str, ...]:
        text = lines[self.line]
        return (
            lines[: self.line]
            + (text[: self.start] + self.new + text[self.end :],)
            + lines[self.line + 1 :]
        )


def _one_line(*nodes: ast.AST) -> bool:
    return all(n.lineno == n.end_lineno == nodes[0].lineno for n in nodes)


def _plain(node: ast.AST) -> bool:
    """A name, attribute or number: swapping two of these is a slip, not a rewrite (a string
    on the left of % is formatting)."""
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float)
    return isinstance(node, (ast.Name, ast.Attribute))


def _gap_edit(kind: str, lines, a: ast.AST, b: ast.AST, old: str, new: str) -> Edit | None:
    """Replace the operator `old` written between nodes a and b (maybe with parentheses)."""
    if not _one_line(a, b):
        return None
    text = lines[a.lineno - 1]
    gap = text[a.end_col_offset : b.col_offset]
    if " ".join(gap.strip(" ()").split()) != old:
        return None
    at = a.end_col_offset + gap.index(old.split()[0])
    end = at + len(gap.strip(" ()").rstrip())
    return Edit(kind, a.lineno - 1, at, end, new)


def _int_edits(node: ast.Constant, lines) -> list[Edit]:
    text = lines[node.lineno - 1][node.col_offset : node.end_col_offset]
    if not text.isdigit():
        return []
    n = int(text)
    news = [n + 1] + ([n - 1] if n > 0 else [])
    return [Edit("off-by-one", node.lineno - 1, node.col_offset, node.end_col_offset, str(v))
            for v in news]  # fmt: skip


def _off_by_one_parent(parent: ast.AST, node: ast.AST) -> bool:
    if isinstance(parent, (ast.Compare, ast.Slice)):
        return True
    if isinstance(parent, ast.Subscript):
        return parent.slice is node
    if isinstance(parent, ast.BinOp):
        return isinstance(parent.op, (ast.Add, ast.Sub))
    if isinstance(parent, ast.Call):
        return isinstance(parent.func, ast.Name) and parent.func.id == "range"
    return False


def bug_edits(fn: ast.AST, lines: tuple[str, ...], first_line: int) -> list[Edit]:
    """Every candidate bug in fn (parsed from `lines`) on lines at index >= first_line (the body
    after the docstring), in source order."""
    out: list[Edit] = []
    parents = {c: p for p in ast.walk(fn) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(fn):
        if getattr(node, "lineno", 0) - 1 < first_line:
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            old, new = COMPARE[type(node.ops[0])]
            e = _gap_edit("wrong comparison", lines, node.left, node.comparators[0], old, new)
            out += [e] if e else []
        elif isinstance(node, ast.BoolOp) and len(node.values) == 2:
            old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            e = _gap_edit("wrong boolean operator", lines, *node.values, old, new)
            out += [e] if e else []
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            at = node.col_offset
            if _one_line(node) and lines[node.lineno - 1][at : at + 4] == "not ":
                out.append(Edit("dropped negation", node.lineno - 1, at, at + 4, ""))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, SWAPPABLE):
            left, right = node.left, node.right
            if _plain(left) and _plain(right) and _one_line(left, right):
                text = lines[node.lineno - 1]
                a = text[left.col_offset : left.end_col_offset]
                b = text[right.col_offset : right.end_col_offset]
                mid = text[left.end_col_offset : right.col_offset]
                if a != b and mid.strip() in ("-", "/", "//", "%"):
                    out.append(Edit("swapped operands", node.lineno - 1, left.col_offset,
                                    right.end_col_offset, b + mid + a))  # fmt: skip
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            if _off_by_one_parent(parents.get(node), node):
                out += _int_edits(node, lines)
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
            if type(node.value.value) is bool and _one_line(node.value):
                v = node.value
                out.append(Edit("inverted constant", v.lineno - 1, v.col_offset,
                                v.end_col_offset, str(not v.value)))  # fmt: skip
    return out


def inject(
    lines: tuple[str, ...], edits: list[Edit], rng: random.Random
) -> tuple[tuple[str, ...], Edit] | None:
    """The lines with one edit that still parses and changes the text, or None if none does.
    The kind is drawn first, uniformly over the kinds present, so that the common wrong
    comparison does not crowd out the rarer slips."""
    by_kind: dict[str, list[Edit]] = {}
    for e in edits:
        by_kind.setdefault(e.kind, []).append(e)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    for kind in kinds:
        options = by_kind[kind]
        rng.shuffle(options)
        for e in options:
            new = e.apply(lines)
            if new == lines:
                continue
            try:
                ast.parse("\n".join(new) + "\n")
            except SyntaxError:
                continue
            return new, e
    return None
