"""Compose expressions reduced to their canonical form: (behavior, weight) terms.

`listen * 1.0 + (concise - sycophancy) * 0.5` becomes listen 1.0, concise 0.5,
sycophancy -0.5. Anything that is not linear in behaviors (`a * b`, `1 / a`, a plain
number added to behaviors) is a located error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from behaviorc.core.diagnostics import DiagnosticSink
from behaviorc.lang import ast


@dataclass
class Linear:
    weights: dict[str, float] = field(default_factory=dict)  # in order of first mention
    constant: float = 0.0
    refs: dict[str, ast.Ref] = field(default_factory=dict)  # first mention of each name

    @property
    def is_number(self) -> bool:
        return not self.weights

    def scaled(self, factor: float) -> "Linear":
        return Linear({n: w * factor for n, w in self.weights.items()}, self.constant * factor,
                      self.refs)

    def plus(self, other: "Linear", sign: float = 1.0) -> "Linear":
        weights = dict(self.weights)
        for name, weight in other.weights.items():
            weights[name] = weights.get(name, 0.0) + sign * weight
        return Linear(weights, self.constant + sign * other.constant, {**other.refs, **self.refs})


MAX_DEPTH = 500  # recursion below stays well inside Python's 1,000 frames


def depth(expr: ast.Expr) -> int:
    """How deeply the expression nests, counted without recursion (a generated spec may
    nest deeper than Python's stack)."""
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, ast.Neg):
            stack.append((node.operand, level + 1))
        elif isinstance(node, ast.Binary):
            stack += [(node.left, level + 1), (node.right, level + 1)]
    return deepest


def references(expr: ast.Expr) -> list[ast.Ref]:
    """Every behavior reference in the expression, left to right."""
    found, stack = [], [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Ref):
            found.append(node)
        elif isinstance(node, ast.Neg):
            stack.append(node.operand)
        elif isinstance(node, ast.Binary):
            stack += [node.right, node.left]
    return found


def linearize(expr: ast.Expr, sink: DiagnosticSink) -> Linear | None:
    """The expression's linear form, or None after reporting why it is not linear."""
    if depth(expr) > MAX_DEPTH:
        sink.error(f"expression nested more than {MAX_DEPTH} levels deep", expr.loc,
                   "write the terms out: `a * 0.5 + b * 0.25`")
        return None
    return _linearize(expr, sink)


def _linearize(expr: ast.Expr, sink: DiagnosticSink) -> Linear | None:
    if isinstance(expr, ast.Ref):
        return Linear({expr.name: 1.0}, 0.0, {expr.name: expr})
    if isinstance(expr, ast.Const):
        value = expr.number.value
        if not math.isfinite(value):
            sink.error("number too large", expr.loc)
            return None
        return Linear({}, value)
    if isinstance(expr, ast.Neg):
        operand = _linearize(expr.operand, sink)
        return operand.scaled(-1.0) if operand else None
    left, right = _linearize(expr.left, sink), _linearize(expr.right, sink)
    if left is None or right is None:
        return None
    if expr.op in "+-":
        return left.plus(right, 1.0 if expr.op == "+" else -1.0)
    if expr.op == "*":
        if left.is_number:
            return right.scaled(left.constant)
        if right.is_number:
            return left.scaled(right.constant)
        sink.error("not linear: two behaviors multiplied together", expr.loc,
                   "scale a behavior by a number, e.g. `listen * 0.5`")
        return None
    if not right.is_number:
        sink.error("not linear: dividing by a behavior", expr.loc,
                   "divide by a number, e.g. `listen / 2`")
        return None
    if right.constant == 0:
        sink.error("division by zero", expr.right.loc)
        return None
    return left.scaled(1.0 / right.constant)


def canonical_text(terms: list[tuple[str, float]]) -> str:
    """`listen * 1.0 + concise * 0.5 - sycophancy * 0.8`"""
    parts = []
    for i, (name, weight) in enumerate(terms):
        sign = "-" if weight < 0 else "+"
        term = f"{name} * {abs(weight)!r}"
        parts.append(("-" + term if sign == "-" else term) if i == 0 else f" {sign} {term}")
    return "".join(parts)
