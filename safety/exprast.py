"""The rule language's syntax tree: its nodes, their strict evaluation, and the pretty-printer.

The nodes are frozen dataclasses; :meth:`Expr.eval` evaluates one against a state (flat
``instrument.channel`` names -> values) with the strict typing described in
:mod:`safety.expr` (which re-exports these names), :func:`to_source` prints one back as
rule text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from safety.exprerrors import EvaluationError

# Precedence levels (higher binds tighter), used by the pretty-printer.
P_IMPLIES, P_OR, P_AND, P_NOT, P_COMPARE, P_SUM, P_PRODUCT, P_UNARY, P_ATOM = range(9)


class Expr:
    """Base of the AST nodes. ``pos`` (offset in the source text) is not part of equality."""

    prec: ClassVar[int] = P_ATOM
    pos: int

    def children(self) -> Iterator[Expr]:
        return iter(())

    def eval(self, state: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def names(self) -> set[str]:
        out: set[str] = set()
        for node in self.walk():
            if isinstance(node, Name):
                out.add(node.name)
        return out

    def walk(self) -> Iterator[Expr]:
        yield self
        for child in self.children():
            yield from child.walk()

    def __str__(self) -> str:
        return to_source(self)


@dataclass(frozen=True, eq=True)
class Num(Expr):
    value: int | float
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Str(Expr):
    value: str
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Bool(Expr):
    value: bool
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Name(Expr):
    name: str
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        try:
            return state[self.name]
        except KeyError:
            raise EvaluationError(f"unknown name '{self.name}'") from None


@dataclass(frozen=True, eq=True)
class ListLit(Expr):
    items: tuple[Expr, ...]
    pos: int = field(default=0, compare=False, repr=False)

    def children(self) -> Iterator[Expr]:
        return iter(self.items)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return [item.eval(state) for item in self.items]


@dataclass(frozen=True, eq=True)
class Unary(Expr):
    op: str  # "-" | "not"
    operand: Expr
    pos: int = field(default=0, compare=False, repr=False)

    @property
    def prec(self) -> int:  # type: ignore[override]
        return P_NOT if self.op == "not" else P_UNARY

    def children(self) -> Iterator[Expr]:
        yield self.operand

    def eval(self, state: Mapping[str, Any]) -> Any:
        value = self.operand.eval(state)
        if self.op == "not":
            return not _need_bool("not", self.operand, value)
        return -_need_number("-", self.operand, value)


_BINARY_PREC = {"->": P_IMPLIES, "or": P_OR, "and": P_AND, "+": P_SUM, "-": P_SUM}
_BINARY_PREC.update({"*": P_PRODUCT, "/": P_PRODUCT})


@dataclass(frozen=True, eq=True)
class Binary(Expr):
    op: str  # -> or and + - * /
    left: Expr
    right: Expr
    pos: int = field(default=0, compare=False, repr=False)

    @property
    def prec(self) -> int:  # type: ignore[override]
        return _BINARY_PREC[self.op]

    def children(self) -> Iterator[Expr]:
        yield self.left
        yield self.right

    def eval(self, state: Mapping[str, Any]) -> Any:
        op = self.op
        if op in ("and", "or", "->"):
            left = _need_bool(op, self.left, self.left.eval(state))
            if op == "and" and not left:
                return False
            if op == "or" and left:
                return True
            if op == "->" and not left:
                return True
            return _need_bool(op, self.right, self.right.eval(state))
        a = _need_number(op, self.left, self.left.eval(state))
        b = _need_number(op, self.right, self.right.eval(state))
        if op == "/" and b == 0:
            raise EvaluationError(f"division by zero: {_show(self.right, b)} in {to_source(self)}")
        try:
            if op == "+":
                value = a + b
            elif op == "-":
                value = a - b
            elif op == "*":
                value = a * b
            else:
                value = a / b
        except OverflowError:
            value = math.inf
        if isinstance(value, float) and not math.isfinite(value):
            raise EvaluationError(
                f"{to_source(self)} overflows with {_show(self.left, a)} and {_show(self.right, b)}"
            )
        return value


@dataclass(frozen=True, eq=True)
class Compare(Expr):
    """``operands[0] ops[0] operands[1] ops[1] operands[2] ...`` (chained like Python)."""

    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    pos: int = field(default=0, compare=False, repr=False)
    prec: ClassVar[int] = P_COMPARE

    def children(self) -> Iterator[Expr]:
        return iter(self.operands)

    def eval(self, state: Mapping[str, Any]) -> Any:
        left_node = self.operands[0]
        left = left_node.eval(state)
        for op, right_node in zip(self.ops, self.operands[1:], strict=True):
            right = right_node.eval(state)
            if not compare(op, left, right, left_node, right_node):
                return False
            left, left_node = right, right_node
        return True


@dataclass(frozen=True, eq=True)
class Member(Expr):
    """``value in [items]``, or ``value in name`` where the state holds a list under ``name``
    (``negated``: ``not in``)."""

    value: Expr
    items: ListLit | Name
    negated: bool = False
    pos: int = field(default=0, compare=False, repr=False)
    prec: ClassVar[int] = P_COMPARE

    def children(self) -> Iterator[Expr]:
        yield self.value
        yield self.items

    def eval(self, state: Mapping[str, Any]) -> Any:
        value = self.value.eval(state)
        found = False
        if isinstance(self.items, Name):  # a named list: its items are values, not nodes
            items = self.items.eval(state)
            if not isinstance(items, list | tuple):
                raise EvaluationError(
                    f"'in' needs a list on its right, got {_show(self.items, items)}"
                )
            for item in items:
                if compare("==", value, item, self.value, self.items):
                    found = True
                    break
            return found != self.negated
        for node in self.items.items:
            if compare("==", value, node.eval(state), self.value, node):
                found = True
                break
        return found != self.negated


# ------------------------------------------------------------------ evaluation
def _kind(value: Any) -> str | None:
    """number | string | bool | None (anything else)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Real):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _show(node: Expr, value: Any) -> str:
    """How an operand appears in a message: ``name=value`` for non-literals, else the value."""
    if isinstance(node, Num | Str | Bool):
        return repr(value)
    return f"{to_source(node)}={value!r}"


def _need_bool(op: str, node: Expr, value: Any) -> bool:
    if not isinstance(value, bool):
        raise EvaluationError(f"'{op}' needs true/false, got {_show(node, value)}")
    return value


def _not_finite(value: Any) -> bool:
    """A NaN or an infinity (a rule refuses them rather than compute with them)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)
        and (not math.isfinite(value))
    )


def _need_number(op: str, node: Expr, value: Any) -> Any:
    if _kind(value) != "number":
        raise EvaluationError(f"'{op}' needs a number, got {_show(node, value)}")
    if _not_finite(value):
        raise EvaluationError(f"'{op}' needs a finite number, got {_show(node, value)}")
    return value


def compare(op: str, a: Any, b: Any, a_node: Expr, b_node: Expr) -> bool:
    """``a op b`` with the language's strict typing (see the module docstring)."""
    ka, kb = _kind(a), _kind(b)
    if ka is None or kb is None or ka != kb or (op not in ("==", "!=") and ka == "bool"):
        raise EvaluationError(f"cannot apply '{op}' to {_show(a_node, a)} and {_show(b_node, b)}")
    if _not_finite(a) or _not_finite(b):
        raise EvaluationError(
            f"cannot apply '{op}' to {_show(a_node, a)} and {_show(b_node, b)}: not a finite number"
        )
    if op == "==":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def evaluate(node: Expr, state: Mapping[str, Any]) -> Any:
    """Evaluate an AST against ``state`` (flat ``instrument.channel`` names -> values)."""
    return node.eval(state)


def _quote(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _number(value: int | float) -> str:
    text = repr(value)
    if isinstance(value, float) and text in ("inf", "nan", "-inf"):
        raise ValueError(f"{value} has no literal in the rule language")
    return text


def to_source(node: Expr) -> str:
    """The rule text of an AST, with the fewest parentheses that parse back to the same AST."""

    def wrap(child: Expr, min_prec: int) -> str:
        text = to_source(child)
        return f"({text})" if child.prec < min_prec else text

    if isinstance(node, Num):
        return _number(node.value)
    if isinstance(node, Str):
        return _quote(node.value)
    if isinstance(node, Bool):
        return "true" if node.value else "false"
    if isinstance(node, Name):
        return node.name
    if isinstance(node, ListLit):
        return "[" + ", ".join(wrap(i, P_SUM) for i in node.items) + "]"
    if isinstance(node, Unary):
        if node.op == "not":
            return "not " + wrap(node.operand, P_NOT)
        return "-" + wrap(node.operand, P_UNARY)
    if isinstance(node, Binary):
        p = node.prec
        if node.op == "->":  # right associative
            return f"{wrap(node.left, p + 1)} -> {wrap(node.right, p)}"
        return f"{wrap(node.left, p)} {node.op} {wrap(node.right, p + 1)}"
    if isinstance(node, Compare):
        parts = [wrap(node.operands[0], P_SUM)]
        for op, operand in zip(node.ops, node.operands[1:], strict=True):
            parts += [op, wrap(operand, P_SUM)]
        return " ".join(parts)
    if isinstance(node, Member):
        op = "not in" if node.negated else "in"
        return f"{wrap(node.value, P_SUM)} {op} {to_source(node.items)}"
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


__all__ = [
    "Binary",
    "Bool",
    "Compare",
    "Expr",
    "ListLit",
    "Member",
    "Name",
    "Num",
    "Str",
    "Unary",
    "compare",
    "evaluate",
    "to_source",
]
